"""The local engine: decode in DataLoader worker processes, batch, run the models here.

A file that kills its decode worker (a crash in a decoder, or a decode over the time limit) does not stop
the run: the batches in flight are decoded again one file at a time, and the file that kills a worker again
becomes an error row. So does a batch that never comes back (``batch_wait``): no wait here is unbounded.
Items go to the workers without their passthrough columns. This is the only module that touches torch's
DataLoader internals, and only while a run is in progress.

With ``--decode gpu`` (``ScoringPlan.decode``) the workers read each plain JPEG and send its bytes; this
process decodes each batch's JPEGs on the model's device (``batches.DeviceDecode``) before the model runs.
Every other file is decoded in its worker as ever, and a JPEG that torchvision refuses is decoded in an
isolated child process: a hostile file still costs one error row, never this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from itertools import chain, islice
from typing import Any

import pyarrow as pa
import torch
from PIL import ImageFile
from torch.utils.data import DataLoader, Dataset

from perceptscore import remote
from perceptscore.batches import ENCODED_FILE_BYTES, Batch, Decoded, DeviceDecode, collate
from perceptscore.containers import is_container
from perceptscore.engines._containers import GROUP, ContainerRun, Job, Reading, timed_decode
from perceptscore.images import draft_side
from perceptscore.items import Item
from perceptscore.limits import Limits, current, install
from perceptscore.locators import RemoteFile
from perceptscore.plan import ScoringPlan
from perceptscore.predict import Pending, Predictor
from perceptscore.prefetch import prefetched
from perceptscore.tasks import Preprocess


def decode_timeout() -> float:
    """Seconds a decode may take before its worker is killed and the file isolated: a hostile file must not
    hang a cron job. A 12 MP JPEG takes ~0.2 s; Pillow's largest allowed image a few seconds. This
    process's limit; a run's engine takes its plan's (``Limits.decode_timeout``)."""
    return current().decode_timeout


POLL_S = 5.0  # how often a wait for the workers looks up (torch's own check for dead workers: 5 s too)
START_S = 10.0  # what a worker may take, beyond its decodes, to start and hand a batch back


def batch_wait(size: int, timeout: float, fetch: float = 0.0) -> float:
    """The longest the main process waits for a batch of ``size`` before giving its workers up as stuck:
    every decode in it at its time limit, the batch's remote objects fetched (together, within ``fetch``
    seconds: ``Limits.deadline_seconds``), plus the start. Past it a batch that will never come (an item
    that failed to pickle on its way to a worker: torch drops it and waits for ever) is isolated like a
    worker's death, so no wait here is unbounded (a nightly job holds its run's lock while it waits)."""
    if timeout <= 0:  # no time limit on a decode (PERCEPTSCORE_DECODE_TIMEOUT=0): none on a batch either
        return float("inf")
    return size * timeout + fetch + max(START_S, timeout)


SHM_SHARE = 0.5  # of /dev/shm's free space, the most the batches in flight from the workers may hold
PREFETCH = 4  # batches a worker decodes ahead, where they fit


FILE_BYTES = ENCODED_FILE_BYTES  # a file's share of a batch under --decode gpu (larger: its worker decodes)


def batch_bytes(specs: list[Preprocess], size: int, encoded: bool = False) -> int:
    """What one batch of crops holds in shared memory (uint8: 3 x crop x crop per crop, every spec);
    ``encoded`` (``--decode gpu``): a row holds its file's bytes or its crops, counted as the larger of
    crops and ``FILE_BYTES`` (the files' sizes are not known before they are read)."""
    crops = sum(3 * s.crop * s.crop * s.crops for s in specs)
    return size * (max(crops, FILE_BYTES) if encoded else crops)


def prefetch_for(per_batch: int, workers: int, shm_free: int | None) -> int:
    """Batches each worker decodes ahead: ``PREFETCH``, fewer where the batches in flight (workers x that,
    each ``per_batch`` bytes in /dev/shm) would pass ``SHM_SHARE`` of its free space, never under 1.
    (56 batches of quality's 15 crops at 64 images, 144 MB each, filled a 4 GB /dev/shm: a worker's bus
    error then sent the run into one-file-at-a-time isolation.)"""
    if not workers or shm_free is None or per_batch <= 0:
        return PREFETCH
    fits = int(SHM_SHARE * shm_free) // (workers * per_batch)
    return max(1, min(PREFETCH, fits))


def shm_free() -> int | None:
    """Free bytes of /dev/shm, where the workers' batches travel; None where there is none to ask."""
    import shutil

    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


class _Stalled(RuntimeError):
    """No batch came within ``batch_wait``."""


def _bare(item: Item) -> Item:
    """What a decode worker needs of an item: not its passthrough columns. They stay in this process
    (``scoring`` matches rows back to its own items); a value nested thousands deep can't be pickled."""
    return dataclasses.replace(item, extras={}) if item.extras else item


class _DecodeDataset(Dataset[Decoded]):
    """Indexed by ``Item`` itself: the DataLoader's sampler streams the items to the workers, a chunk at a
    time. A chunk's remote objects are fetched by the worker that decodes them, all at once
    (``prefetched``, under the run's limits): no process but the decoding one holds their bytes, and a
    chunk waits for its slowest object, not for the sum of their latencies. ``read``: ``--decode gpu``
    (plain JPEGs are read, not decoded: ``batches.read_item``)."""

    def __init__(
        self,
        specs: list[Preprocess],
        draft: int | None,
        timeout: float,
        max_pixels: int,
        limits: Limits,
        read: bool = False,
    ) -> None:
        self.specs, self.draft, self.timeout, self.max_pixels = specs, draft, timeout, max_pixels
        self.limits, self.read = limits, read

    def __getitem__(self, item: Item) -> Decoded:  # type: ignore[override]
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[Item]) -> list[Decoded]:  # the DataLoader's call for a whole chunk
        fetched = prefetched(items, self.limits)
        return [
            timed_decode(i, self.specs, self.draft, self.max_pixels, self.timeout, self.read) for i in fetched
        ]


class _Chunks:
    """A batch sampler over a stream: consecutive lists of ``size`` items, read lazily. ``outstanding``
    holds the chunks handed to the workers and not yet scored: what to redo if a worker dies."""

    def __init__(self, items: Iterator[Item], size: int) -> None:
        self.items, self.size = items, size
        self.outstanding: deque[list[Item]] = deque()

    def __iter__(self) -> Iterator[list[Item]]:
        while chunk := list(islice(self.items, self.size)):
            self.outstanding.append(chunk)
            yield chunk


def worker_init(_: int, limits: Limits | None = None, storage: remote.Settings | None = None) -> None:
    """Set up a decode worker process: the run's limits and storage options (what a file opened here
    reads under, however the worker was started), the model gets the cores, the main process handles
    Ctrl-C, the decode time limit kills, and a truncated file is an error row (never silently grey
    pixels)."""
    install(limits, storage=storage)
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _worker_died(exc: BaseException) -> bool:
    """A worker died, or never sent a batch back (``_Stalled``): either way its files are isolated."""
    return isinstance(exc, _Stalled) or (isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc))


def _next_batch(batches: Iterator[Batch], bound: float) -> Batch | None:
    """The loader's next batch (None at the end), waiting at most ``bound`` seconds: the loader gives up
    every ``POLL_S`` (its timeout), and the wait goes on until the bound is spent."""
    deadline = time.monotonic() + bound
    while True:
        try:
            return next(batches, None)
        except RuntimeError as exc:
            if "DataLoader timed out" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise _Stalled(f"no batch from the decode workers in {bound:.0f} s") from None


@contextlib.contextmanager
def isolating_worker_deaths() -> Iterator[None]:
    """torch's DataLoader installs a SIGCHLD handler that raises in whatever code the main thread is running
    when a worker dies (possibly the caller's, between batches). Marking it installed, for the length of a
    run only, keeps torch's other check, which raises from the iterator itself (within 5 s), where the
    engine can catch it and isolate the file. A program with DataLoaders of its own (the trainer) holds
    this for as long as it runs: torch installs the handler once, with the first DataLoader."""
    handling = torch.utils.data._utils.signal_handling
    before = handling._SIGCHLD_handler_set
    handling._SIGCHLD_handler_set = True
    try:
        yield
    finally:
        handling._SIGCHLD_handler_set = before


class LocalEngine:
    """``predictor``: builds the model side from the plan (default: load the plan's weights). The trainer
    passes its in-training model this way."""

    name = "local"
    reads_containers = True  # tar shards and dataset row groups are read by the decode workers

    def __init__(self, predictor: Callable[[ScoringPlan], Predictor] = Predictor.from_plan) -> None:
        self.make_predictor = predictor

    def describe(self, plan: ScoringPlan) -> str:
        return plan.device

    def run(self, plan: ScoringPlan, items: Iterable[Item]) -> Iterator[pa.RecordBatch]:
        stream = iter(items)
        first = next(stream, None)
        if first is None:  # nothing to score (a --processes child dealt no block): no weights loaded
            return
        if plan.cpu_threads:
            torch.set_num_threads(plan.cpu_threads)
        predictor = self.make_predictor(plan)
        specs = predictor.specs
        draft = draft_side(specs) if plan.fast_decode else None
        on_device = _device_decode(plan, predictor)
        read = on_device is not None
        dataset = _DecodeDataset(specs, draft, plan.limits.decode_timeout, plan.max_pixels, plan.limits, read)
        pin = torch.device(plan.device).type == "cuda"
        closing = contextlib.closing(on_device) if on_device is not None else contextlib.nullcontext()
        with isolating_worker_deaths(), closing:
            start = functools.partial(worker_init, limits=plan.limits, storage=remote.current())
            prefetch = prefetch_for(batch_bytes(specs, plan.batch_size, read), plan.workers, shm_free())
            run = _Run(dataset, predictor, plan.batch_size, plan.workers, pin, start, prefetch, on_device)
            containers = _container_run(run, plan, specs, draft)
            segments = _Segments(chain([first], stream), GROUP * max(1, plan.workers))
            while segments.more():
                if segments.at_container():
                    yield from containers.batches(segments.containers())
                else:  # files and remote objects, each read by the worker that decodes it
                    yield from run.batches(_bare(i) for i in segments.plain())


def _device_decode(plan: ScoringPlan, predictor: Predictor) -> DeviceDecode | None:
    """``--decode gpu``: this process decodes the batches' JPEGs on the model's device."""
    if plan.decode != "gpu":
        return None
    limits = plan.limits
    return DeviceDecode(predictor.specs, predictor.device, plan.max_pixels, limits.decode_timeout, limits)


def _container_run(run: _Run, plan: ScoringPlan, specs: list[Preprocess], draft: int | None) -> ContainerRun:
    """The containers' reader, with this run's decode settings, worker set-up and waits."""
    timeout = plan.limits.decode_timeout

    def reading(jobs: list[Job]) -> Reading:
        return Reading(jobs, specs, draft, timeout, plan.max_pixels, run.prepare is not None)

    def loader_args(workers: int) -> dict[str, Any]:
        return {
            "prefetch": run.prefetch,
            "pin_memory": run.pin,
            "worker_init_fn": run.start if workers else None,
            "generator": torch.Generator(),
            "timeout": POLL_S if workers else 0,
        }

    def next_batch(batches: Iterator[Any], size: int) -> Any:
        return _next_batch(batches, batch_wait(size, timeout))

    reason = f"the decoder crashed, or hung for {timeout:.0f} s, in its worker process"
    return ContainerRun(run.predictor, reading, plan.batch_size, plan.workers, loader_args, next_batch,
                        _worker_died, reason, run.prepare)  # fmt: skip


class _Segments:
    """The items as runs of plain items (a lazy stream: the map-style loader's) and of containers (a list
    of at most ``most``: one reading pass of the container workers)."""

    def __init__(self, items: Iterator[Item], most: int) -> None:
        self.items, self.most = items, most
        self.head: Item | None = next(items, None)

    def more(self) -> bool:
        return self.head is not None

    def at_container(self) -> bool:
        return self.head is not None and is_container(self.head.locator)

    def plain(self) -> Iterator[Item]:
        while self.head is not None and not is_container(self.head.locator):
            item, self.head = self.head, next(self.items, None)
            yield item

    def containers(self) -> list[Item]:
        taken = []
        while self.head is not None and is_container(self.head.locator) and len(taken) < self.most:
            taken.append(self.head)
            self.head = next(self.items, None)
        return taken


class _Run:
    def __init__(
        self,
        dataset: _DecodeDataset,
        predictor: Predictor,
        size: int,
        workers: int,
        pin: bool,
        start: Callable[[int], None] = worker_init,
        prefetch: int = PREFETCH,
        prepare: Callable[[Batch], Batch] | None = None,
    ) -> None:
        self.dataset, self.predictor, self.size, self.workers, self.pin = (
            dataset,
            predictor,
            size,
            workers,
            pin,
        )
        self.start = start  # each decode worker's set-up (``worker_init`` with the run's limits)
        self.prefetch = prefetch  # batches each worker decodes ahead (``prefetch_for``)
        self.prepare = prepare  # what a batch goes through before the model (``--decode gpu``)

    def _loader(self, chunks: _Chunks, workers: int, prefetch: int = 4) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_sampler=chunks,  # type: ignore[arg-type]
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.pin,
            worker_init_fn=self.start if workers else None,
            prefetch_factor=prefetch if workers else None,
            generator=torch.Generator(),  # the workers' seeds must not draw from the caller's global RNG
            # each wait for a batch raises after POLL_S (``_next_batch`` goes on waiting, up to its bound)
            timeout=POLL_S if workers else 0,
        )

    def batches(self, stream: Iterator[Item]) -> Iterator[pa.RecordBatch]:
        return self._attempts(stream, self.size, self.workers, self.prefetch, self._isolate)

    def _attempts(
        self,
        stream: Iterator[Item] | None,
        size: int,
        workers: int,
        prefetch: int,
        after_death: Callable[[_Chunks], Generator[pa.RecordBatch, None, Iterator[Item] | None]],
    ) -> Iterator[pa.RecordBatch]:
        """Score ``stream`` in chunks of ``size``; when a worker dies, ``after_death`` deals with the chunks
        in flight and returns the stream to go on with."""
        while stream is not None:
            chunks = _Chunks(stream, size)
            batches = iter(self._loader(chunks, workers, prefetch))
            pending: Pending | None = None  # submitted, its rows not given yet: the GPU computes them
            try:
                while (batch := _next_batch(batches, self._bound(chunks, size))) is not None:
                    # submitted before the last one's rows are waited for
                    submitted = self.predictor.submit(self.prepare(batch) if self.prepare else batch)
                    if pending is not None:
                        yield from _given(pending, chunks)
                    pending = submitted
                    if pending.ready:  # on the CPU: nothing to overlap, the rows go now
                        yield from _given(pending, chunks)
                        pending = None
                if pending is not None:
                    yield from _given(pending, chunks)
                return
            except RuntimeError as exc:
                if not _worker_died(exc):
                    raise
            # out of the except block, its traceback gone: torch shuts the workers down with the iterator
            del batches
            if pending is not None:  # decoded and scored before the death: given, not decoded again
                yield from _given(pending, chunks)
            stream = yield from after_death(chunks)

    def _bound(self, chunks: _Chunks, size: int) -> float:
        """How long the next batch may take (``batch_wait``): its remote objects' fetch deadline counts
        only where its chunk (the first outstanding) holds some, so a stuck batch of local files is
        still found out in seconds."""
        fetch = self.dataset.limits.deadline_seconds
        if chunks.outstanding and not any(isinstance(i.locator, RemoteFile) for i in chunks.outstanding[0]):
            fetch = 0.0
        return batch_wait(size, self.dataset.timeout, fetch)

    def _isolate(self, chunks: _Chunks) -> Generator[pa.RecordBatch, None, Iterator[Item] | None]:
        """A worker died with several files in flight: decode those again one at a time, with one file in
        flight, so a worker that dies can only have died on it. (With more, results it had queued just
        before dying can be lost, and the blame would fall on the wrong file.) Then go on as before."""
        yield from self._attempts(iter(_flat(chunks.outstanding)), 1, 1, 1, self._blame)
        return chunks.items

    def _blame(self, single: _Chunks) -> Generator[pa.RecordBatch, None, Iterator[Item] | None]:
        (culprit,) = single.outstanding.popleft()
        timeout = self.dataset.timeout
        reason = f"the decoder crashed, or hung for {timeout:.0f} s, in its worker process"
        yield self.predictor(Batch.failed([culprit], reason))
        # the items prefetched behind the culprit go again, ahead of the rest
        return chain(_flat(single.outstanding), single.items)


def _given(pending: Pending, chunks: _Chunks) -> Iterator[pa.RecordBatch]:
    """A submitted batch's rows; its chunk is no longer outstanding (a death after this redoes the rest)."""
    rows = pending.result()
    chunks.outstanding.popleft()
    yield rows


def _flat(chunks: Iterable[list[Item]]) -> list[Item]:
    return [item for chunk in chunks for item in chunk]
