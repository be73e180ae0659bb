"""Scorer: stream sources -> decode (DataLoader workers) -> batches -> every task's model -> rows in order.

Each file is decoded once per run whatever the number of tasks, and prepared once per distinct
preprocessing (memorability and emotion share theirs). Workers ship small uint8 crops; normalisation
runs on the model's device. A file that cannot be decoded becomes a row with ``error`` set; the run goes on.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from perceptscore.checkpoints import PRECISIONS, load_model, resolve_device, resolve_precision
from perceptscore.errors import UsageError
from perceptscore.hub import Weights, resolve
from perceptscore.images import DecodeError, decode, draft_side
from perceptscore.model import PerceptModel
from perceptscore.outputs import output_schema, provenance
from perceptscore.preprocess import normalize, prepare
from perceptscore.sources import SourceItem, Sources
from perceptscore.tasks import Preprocess, Task, get_task, output_columns


@dataclass
class Decoded:
    item: SourceItem
    error: str | None
    pixels: dict[Preprocess, np.ndarray]  # per preprocessing: (crops, 3, H, W) uint8
    stat: tuple[int, int] | None = None  # (size, mtime_ns) of the file scored, for incremental runs


@dataclass
class Batch:
    items: list[SourceItem]
    errors: list[str | None]
    pixels: dict[Preprocess, torch.Tensor]  # per preprocessing: the decoded items' crops, stacked
    stats: list[tuple[int, int] | None] | None = None

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True) for custom batch types
        self.pixels = {spec: t.pin_memory() for spec, t in self.pixels.items()}
        return self


class DecodeDataset(Dataset[Decoded]):
    """Indexed by ``SourceItem`` itself: the DataLoader's sampler streams the items to the workers."""

    def __init__(self, specs: Sequence[Preprocess], draft: int | None) -> None:
        self.specs, self.draft = list(specs), draft

    def __getitem__(self, item: SourceItem) -> Decoded:  # type: ignore[override]
        if item.error:
            return Decoded(item, item.error, {})
        stat = file_stat(item.path)
        in_worker = get_worker_info() is not None
        if in_worker:
            signal.setitimer(signal.ITIMER_REAL, DECODE_TIMEOUT_S)
        try:
            img = decode(item.path, self.draft)
            return Decoded(item, None, {spec: prepare(img, spec) for spec in self.specs}, stat)
        except DecodeError as exc:
            return Decoded(item, str(exc), {}, stat)
        finally:
            if in_worker:
                signal.setitimer(signal.ITIMER_REAL, 0)


def collate(decoded: list[Decoded]) -> Batch:
    ok = [d for d in decoded if d.error is None]
    pixels = (
        {spec: torch.from_numpy(np.concatenate([d.pixels[spec] for d in ok])) for spec in ok[0].pixels}
        if ok
        else {}
    )
    return Batch([d.item for d in decoded], [d.error for d in decoded], pixels, [d.stat for d in decoded])


def file_stat(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns): what an incremental run compares to decide a file is unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class _Chunks:
    """A batch sampler over a stream: consecutive lists of ``size`` items, read lazily. ``outstanding``
    holds the chunks handed to the workers and not yet scored: what to redo if a worker dies."""

    def __init__(self, items: Iterator[SourceItem], size: int) -> None:
        self.items, self.size = items, size
        self.outstanding: deque[list[SourceItem]] = deque()

    def __iter__(self) -> Iterator[list[SourceItem]]:
        while chunk := list(islice(self.items, self.size)):
            self.outstanding.append(chunk)
            yield chunk


def decode_worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode workers must not fight the model for cores
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle, cleanly
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the decode time limit: see DecodeDataset


# A decode that takes longer than this kills its worker (SIGALRM at its default action, which stops C code
# too), and the file is isolated like one that crashes its decoder: a hostile file must not hang a cron job.
# A 12 MP JPEG takes ~0.2 s; Pillow's largest allowed image a few seconds.
DECODE_TIMEOUT_S = float(os.environ.get("PERCEPTSCORE_DECODE_TIMEOUT", "60"))


def _worker_died(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc)


# torch's DataLoader installs a SIGCHLD handler that raises in whatever code the main thread is running when
# a worker dies (possibly the caller's, between batches). Marking it installed keeps torch's other check,
# which raises from the iterator itself (within 5 s), where iter_batches can catch it and isolate the file.
torch.utils.data._utils.signal_handling._SIGCHLD_handler_set = True


@torch.inference_mode()
def raw_outputs(
    model: Callable[[torch.Tensor], torch.Tensor],
    task: Task,
    crops: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
) -> np.ndarray:
    """uint8 crops (n * crops_per_image, 3, H, W) -> raw outputs (n, outputs) averaged over each image's
    crops. The one place images meet a model: scoring and the trainer's evaluation both go through it."""
    arch = task.architecture
    x = normalize(crops.to(device, non_blocking=True), arch.mean, arch.std, dtype)
    out = torch.cat([model(chunk).float() for chunk in x.split(batch_size)])
    per_image = out.view(-1, task.preprocess.crops, out.shape[-1]).mean(dim=1)
    return per_image.cpu().numpy()


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(16, max(2, cores - 2))
    # On CPU the model needs the cores and decoding is cheap, but one worker still keeps a crashing
    # decoder out of the main process (and overlaps decoding with the model).
    return 1 if cores <= 8 else min(4, cores // 4)


class Scorer:
    """Score images for one or more tasks; ``score()`` returns a DataFrame, ``iter_batches()`` streams rows.

    ``checkpoints`` maps task name -> weights file (or resolved ``hub.Weights``); a task without one gets
    its weights by ``hub.resolve`` (local folders, caches, then a download). ``device`` auto/cpu/cuda[:i];
    ``precision`` auto (fp16 on CUDA, fp32 on CPU)/fp32/fp16/bf16. ``fast_decode`` uses JPEG draft mode
    (faster, pixels differ slightly from the release's decoding).
    """

    def __init__(
        self,
        tasks: Sequence[str] | str,
        checkpoints: dict[str, str | Path | Weights] | None = None,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        fast_decode: bool = False,
    ) -> None:
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        self.tasks: list[Task] = list({t.name: t for t in map(get_task, names)}.values())
        if not self.tasks:
            raise UsageError("no task given")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 8)
        self.workers = default_workers(self.device) if workers is None else workers
        if self.batch_size < 1 or self.workers < 0:
            raise UsageError("--batch-size must be at least 1 and --workers at least 0")
        self.fast_decode = fast_decode
        given = {get_task(k).name: v for k, v in (checkpoints or {}).items()}
        self.weights = {
            t.name: w if isinstance(w := given.get(t.name), Weights) else resolve(t, w) for t in self.tasks
        }
        self.models: dict[str, PerceptModel] = {
            t.name: load_model(
                t.name, self.weights[t.name].path, device=self.device, precision=self.precision
            )
            for t in self.tasks
        }
        self.specs = list(dict.fromkeys(t.preprocess for t in self.tasks))

    # ---- what the output looks like -------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        return output_columns(self.tasks)

    def schema(self, passthrough: pa.Schema | None = None) -> pa.Schema:
        return output_schema(self.tasks, passthrough)

    def provenance(self) -> dict[str, Any]:
        return provenance(self.tasks, self.weights, str(self.device), self.precision, self.fast_decode)

    # ---- scoring ---------------------------------------------------------------------------------
    def loader(self, chunks: _Chunks, workers: int | None = None, prefetch: int = 4) -> DataLoader:
        dataset = DecodeDataset(self.specs, draft_side(self.specs) if self.fast_decode else None)
        workers = self.workers if workers is None else workers
        return DataLoader(
            dataset,
            batch_sampler=chunks,  # type: ignore[arg-type]
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=decode_worker_init if workers else None,
            prefetch_factor=prefetch if workers else None,
        )

    def _raw(self, task: Task, crops: torch.Tensor) -> np.ndarray:
        model = self.models[task.name]
        return raw_outputs(model, task, crops, self.device, self.dtype, self.batch_size)

    def rows(self, batch: Batch) -> list[dict[str, Any]]:
        ok = [i for i, e in enumerate(batch.errors) if e is None]
        values: dict[str, list[Any]] = {}
        if ok:
            for task in self.tasks:
                values |= task.values(self._raw(task, batch.pixels[task.preprocess]))
        empty = dict.fromkeys(c for t in self.tasks for c in t.columns)
        rows = []
        position = {i: n for n, i in enumerate(ok)}
        stats = batch.stats or [None] * len(batch.items)
        for i, (item, error, stat) in enumerate(zip(batch.items, batch.errors, stats, strict=True)):
            scored = {c: v[position[i]] for c, v in values.items()} if error is None else empty
            size, mtime = stat or (None, None)
            row = {"path": item.path, **scored, "error": error, "file_size": size, "file_mtime_ns": mtime}
            rows.append(row | item.extras)
        return rows

    def iter_batches(self, items: Iterable[SourceItem]) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
        """(input indices, rows) in input order, one pair per batch, as soon as each batch is scored.

        A file that kills its decode worker (a crash, or a decode over ``DECODE_TIMEOUT_S``) does not stop
        the run: the batches in flight are decoded again one file at a time, and the file that kills a
        worker again becomes an error row.
        """
        stream = iter(items)
        while True:
            chunks = _Chunks(stream, self.batch_size)
            try:
                for batch in self.loader(chunks):
                    rows = self.rows(batch)
                    chunks.outstanding.popleft()
                    yield [item.index for item in batch.items], rows
                return
            except RuntimeError as exc:
                if not _worker_died(exc):
                    raise
                yield from self._isolate([item for chunk in chunks.outstanding for item in chunk])

    def _isolate(self, items: list[SourceItem]) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
        remaining = iter(items)
        while True:
            single = _Chunks(remaining, 1)
            try:
                # One file in flight: a worker that dies can only have died on it. (With more, results it
                # had queued just before dying can be lost, and the blame would fall on the wrong file.)
                for batch in self.loader(single, workers=1, prefetch=1):
                    rows = self.rows(batch)
                    single.outstanding.popleft()
                    yield [batch.items[0].index], rows
                return
            except RuntimeError as exc:
                if not _worker_died(exc):
                    raise
                (culprit,) = single.outstanding.popleft()
                reason = f"the decoder crashed, or hung for {DECODE_TIMEOUT_S:.0f} s, in its worker process"
                crashed = Batch([culprit], [reason], {})
                yield [culprit.index], self.rows(crashed)
                # the items prefetched behind the culprit go again, ahead of the rest
                remaining = chain([item for chunk in single.outstanding for item in chunk], remaining)

    def score(
        self, inputs: Sequence[str] | str, recursive: bool = True, path_column: str | None = None
    ) -> pd.DataFrame:
        """Score files, folders, globs, @lists or manifests; a DataFrame with the CLI's columns."""
        sources = Sources(
            [inputs] if isinstance(inputs, str) else inputs, recursive, path_column, self.columns
        )
        rows = [row for _, batch in self.iter_batches(sources) for row in batch]
        schema = self.schema(sources.passthrough)
        return pa.Table.from_pylist(rows, schema=schema).to_pandas()
