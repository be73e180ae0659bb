"""The local engine's containers (a tar shard, a dataset's row group: ``perceptscore.containers``), read in
the decode workers: each worker reads whole containers (worker k the group's k-th, k+W-th ...), decodes
their rows and hands back crops, so the scoring process never holds an image's encoded bytes. Rows are
scored as they come and given back in input order: a container's rows are held (scored: a few numbers
each) until every container before it has ended.

A worker that dies or hangs (a decoder crash, the decode time limit) leaves the containers it was reading
unfinished: they are read again from their first row not yet scored, one row at a time in one worker,
so the row that kills a worker again is known, and becomes an error row; the rest of the group goes on
as before.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from perceptscore.batches import Batch, Decoded, collate, decode_item, read_item
from perceptscore.columns import core_schema
from perceptscore.containers import Container
from perceptscore.items import EXTRAS, ITEM, Item
from perceptscore.locators import InMemory, Unavailable
from perceptscore.predict import Pending, Predictor
from perceptscore.tasks import Preprocess

GROUP = 8  # containers per worker read in one pass (one set of workers; their rows held until in order)


@dataclass
class Job:
    """A container to read, from row ``skip`` on (the rows before it are scored already)."""

    index: int
    container: Container
    skip: int = 0


@dataclass
class Sample:
    """One row decoded in a worker (``last``: its container's last), or (``decoded`` None) the end of a
    container that gave no rows here, after ``part`` rows."""

    index: int
    part: int
    extras: dict[str, Any]
    decoded: Decoded | None
    last: bool = False


class Reading(IterableDataset[Sample]):
    """``read``: ``--decode gpu`` (a row that is a plain JPEG comes back as its bytes: ``read_item``)."""

    def __init__(
        self,
        jobs: list[Job],
        specs: list[Preprocess],
        draft: int | None,
        timeout: float,
        max_pixels: int,
        read: bool = False,
    ) -> None:
        self.jobs, self.specs, self.draft = jobs, specs, draft
        self.timeout, self.max_pixels, self.read = timeout, max_pixels, read

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        mine = self.jobs[info.id :: info.num_workers] if info is not None else self.jobs
        for job in mine:
            yield from self._rows(job)

    def _rows(self, job: Job) -> Iterator[Sample]:
        """A container's rows from ``job.skip`` on, its last marked so, or one end marker if it gave none.
        A row is decoded only once the next is read (or the container has ended): the end rides on the
        last row and takes no place of its own in a batch, so rows are batched exactly as loose files
        would be (and a batch's rows are all the same float sums whatever the containers). The row read
        ahead is not decoded yet: with one row in flight, the row that kills a worker is still the first
        one not given back."""
        ahead: tuple[int, Any, dict[str, Any]] | None = None
        part = -1
        for part, (locator, extras) in enumerate(job.container.rows()):
            if part < job.skip:
                continue
            if ahead is not None:
                yield self._sample(job.index, *ahead, last=False)
            ahead = (part, locator, extras)
        if ahead is None:
            yield Sample(job.index, part + 1, {}, None)
        else:
            yield self._sample(job.index, *ahead, last=True)

    def _sample(self, index: int, part: int, locator: Any, extras: dict[str, Any], last: bool) -> Sample:
        return Sample(index, part, extras, self._decoded(index, part, locator), last)

    def _decoded(self, index: int, part: int, locator: Any) -> Decoded:
        reason = locator.reason if isinstance(locator, Unavailable) else None
        item = Item(index, locator, {}, reason, part)
        return timed_decode(item, self.specs, self.draft, self.max_pixels, self.timeout, self.read)


def timed_decode(
    item: Item,
    specs: list[Preprocess],
    draft: int | None,
    max_pixels: int,
    timeout: float,
    read: bool = False,
) -> Decoded:
    """``decode_item`` (``read``: ``read_item``) under the decode time limit in a worker (SIGALRM at its
    default action kills the worker even inside C code: a hang is isolated like a crash), its item's bytes
    left behind (a JPEG read carries them once, in ``Decoded.jpeg``)."""
    in_worker = get_worker_info() is not None
    if in_worker and not item.error:
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        if read:
            return without_bytes(read_item(item, specs, max_pixels))
        return without_bytes(decode_item(item, specs, draft, max_pixels))
    finally:
        if in_worker:
            signal.setitimer(signal.ITIMER_REAL, 0)


def without_bytes(decoded: Decoded) -> Decoded:
    """What goes back to the scoring process: the crops and the row's path, not the bytes it was decoded
    from (an item read in a worker holds them: pickled back, they would cost the scoring process)."""
    item = decoded.item
    if isinstance(item.locator, InMemory):
        decoded.item = replace(item, locator=Unavailable(item.locator.uri, "read in its worker"))
    return decoded


def _collate(samples: list[Sample]) -> tuple[list[Sample], Batch | None]:
    """The batch of crops (and of JPEGs' bytes), and the samples without theirs (they travel once, as the
    batch's tensors)."""
    decoded = [s.decoded for s in samples if s.decoded is not None]
    batch = collate(decoded) if decoded else None
    for sample in samples:
        if sample.decoded is not None:
            sample.decoded = replace(sample.decoded, pixels={}, jpeg=None)
    return samples, batch


@dataclass
class _Held:
    """A container's scored rows, in order, until it can be given back."""

    job: Job
    rows: list[pa.RecordBatch] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0  # rows scored (counting the skipped ones)
    ended: bool = False


class ContainerRun:
    """Reads groups of containers in ``workers`` decode workers and scores them with ``predictor``.
    ``reading``: the dataset of a list of jobs (the run's decode settings); ``loader_args``: how the
    engine's DataLoaders are made (worker set-up, pinning, timeouts); ``next_batch``: the engine's bounded
    wait for a batch of a loader of so many rows (raises when workers die or stall: ``died`` tells);
    ``reason``: the error of a row that killed its worker; ``prepare``: what a batch goes through before
    the model (``--decode gpu``: ``DeviceDecode``)."""

    def __init__(
        self,
        predictor: Predictor,
        reading: Callable[[list[Job]], Reading],
        size: int,
        workers: int,
        loader_args: Callable[[int], dict[str, Any]],
        next_batch: Callable[[Iterator[Any], int], Any],
        died: Callable[[BaseException], bool],
        reason: str,
        prepare: Callable[[Batch], Batch] | None = None,
    ) -> None:
        self.predictor, self.reading, self.size, self.workers = predictor, reading, size, workers
        self.loader_args, self.next_batch, self.died, self.reason = loader_args, next_batch, died, reason
        self.prepare = prepare
        self.schema = core_schema(predictor.tasks)

    def batches(self, containers: list[Item]) -> Iterator[pa.RecordBatch]:
        """The rows of ``containers`` (items, in input order), with ``ITEM`` and ``EXTRAS`` columns."""
        extras = pa.struct(list(containers[0].locator.schema))  # type: ignore[attr-defined]
        per_pass = GROUP * max(1, self.workers)
        for start in range(0, len(containers), per_pass):
            group = [_Held(Job(i.index, i.locator)) for i in containers[start : start + per_pass]]  # type: ignore[arg-type]
            yield from self._group(group, extras)

    def _group(self, group: list[_Held], extras: pa.DataType) -> Iterator[pa.RecordBatch]:
        by_index = {h.job.index: h for h in group}
        given = 0  # containers of the group given back so far
        todo, alone = group, False  # alone: one worker, one row at a time
        while todo:
            jobs = [Job(h.job.index, h.job.container, h.done) for h in todo]
            workers = 1 if alone else min(self.workers, len(jobs))
            pending: tuple[list[Sample], Pending | None] | None = None  # submitted: the GPU computes it
            try:
                for samples, batch in self._read(jobs, workers, alone):
                    submitted = (samples, self._submit(batch) if batch is not None else None)
                    if pending is not None:  # the last one's rows, once the next is on its way
                        self._place(*pending, by_index)
                        given = yield from self._ready(group, given, extras)
                    pending = submitted
                    if submitted[1] is None or submitted[1].ready:  # on the CPU: the rows go now
                        self._place(*pending, by_index)
                        given = yield from self._ready(group, given, extras)
                        pending = None
                if pending is not None:
                    self._place(*pending, by_index)
                    given = yield from self._ready(group, given, extras)
            except RuntimeError as exc:
                if not self.died(exc):
                    raise
                if pending is not None:  # decoded and scored before the death: placed, not read again
                    self._place(*pending, by_index)
                unfinished = [h for h in todo if not h.ended]
                if alone:  # the first row not scored is the one that killed its worker: an error row
                    self._fail(unfinished[0])
                    todo = [h for h in unfinished if not h.ended]
                else:  # each worker's container in progress is read again alone; the rest as before
                    todo = _in_progress(todo, workers, unfinished)
                    alone = True
                continue
            todo = [h for h in group if not h.ended] if alone else []  # alone done: the rest as before
            alone = False
        while given < len(group):
            yield from self._given(group[given], extras)
            given += 1

    def _submit(self, batch: Batch) -> Pending:
        return self.predictor.submit(self.prepare(batch) if self.prepare is not None else batch)

    def _ready(
        self, group: list[_Held], given: int, extras: pa.DataType
    ) -> Generator[pa.RecordBatch, None, int]:
        """Give back what can be, in order: the ended containers at the head, and the rows so far of the
        first one still being read (so a stop is honoured within a batch: a run's shards hold back a
        container's rows until it ends). Returns how many containers are given back whole."""
        while given < len(group):
            yield from self._given(group[given], extras)
            if not group[given].ended:
                break
            given += 1
        return given

    def _read(
        self, jobs: list[Job], workers: int, alone: bool
    ) -> Iterator[tuple[list[Sample], Batch | None]]:
        size = 1 if alone else self.size
        args = self.loader_args(workers)
        prefetch = args.pop("prefetch", 4)  # the engine's, bounded by the shared memory it may fill
        loader = DataLoader(
            self.reading(jobs),
            batch_size=size,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=(1 if alone else prefetch) if workers else None,
            **args,
        )
        batches = iter(loader)
        while (got := self.next_batch(batches, size)) is not None:
            yield got

    def _place(self, samples: list[Sample], pending: Pending | None, by_index: dict[int, _Held]) -> None:
        """A submitted batch's rows, handed to their containers (a container's rows in a batch are
        adjacent)."""
        rows = pending.result() if pending is not None else None
        position, start = 0, 0  # rows scored so far; where the current container's began
        for n, sample in enumerate(samples):
            held = by_index[sample.index]
            if sample.decoded is None:
                held.ended = True
                continue
            position += 1
            held.extras.append(sample.extras)
            held.done = sample.part + 1
            following = samples[n + 1] if n + 1 < len(samples) else None
            if following is None or following.index != sample.index or sample.last:
                assert rows is not None
                held.rows.append(rows.slice(start, position - start))
                start = position
            held.ended = sample.last

    def _fail(self, held: _Held) -> None:
        """The row that killed its worker again: an error row, found by reading the container here (only
        up to that row: no image is decoded in this process)."""
        found = _nth_row(held.job.container, held.done)
        if found is None:  # no row there: the container had ended (its end went with the worker)
            held.ended = True
            return
        locator, extras = found
        item = Item(held.job.index, locator, {}, self.reason, held.done)
        held.rows.append(self.predictor(Batch.failed([item], self.reason)))
        held.extras.append(extras)
        held.done += 1

    def _given(self, held: _Held, extras: pa.DataType) -> Iterator[pa.RecordBatch]:
        if not held.rows:
            return  # a container without rows: ``scoring`` sees none of its index
        table = pa.Table.from_batches(held.rows, schema=self.schema)
        table = table.append_column(ITEM, pa.array([held.job.index] * table.num_rows, pa.int64()))
        table = table.append_column(EXTRAS, pa.array(held.extras, extras))
        held.rows, held.extras = [], []
        yield from table.combine_chunks().to_batches()


def _in_progress(todo: list[_Held], workers: int, unfinished: list[_Held]) -> list[_Held]:
    """Each worker's first unfinished container (worker k read ``todo[k::workers]`` in order): the ones a
    dead worker may have been reading, or a stalled one still is."""
    left, step = {id(h) for h in unfinished}, max(1, workers)
    firsts = []
    for k in range(step):
        mine = [h for h in todo[k::step] if id(h) in left]
        if mine:
            firsts.append(mine[0])
    return firsts


def _nth_row(container: Container, n: int) -> tuple[Any, dict[str, Any]] | None:
    for part, row in enumerate(container.rows()):
        if part == n:
            return row
    return None
