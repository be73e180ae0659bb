"""Scorer: stream sources -> decode (DataLoader workers) -> batches -> every task's model -> rows in order.

Each file is decoded once per run whatever the number of tasks, and prepared once per distinct
preprocessing (memorability and emotion share theirs). Workers ship small uint8 crops; normalisation
runs on the model's device. A file that cannot be decoded becomes a row with ``error`` set; the run goes on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from perceptscore._version import __version__
from perceptscore.checkpoints import PRECISIONS, load_model, read_metadata, resolve_device, resolve_precision
from perceptscore.errors import UsageError
from perceptscore.hub import Weights, file_sha256, resolve
from perceptscore.images import DecodeError, decode, draft_side
from perceptscore.model import PerceptModel
from perceptscore.preprocess import normalize, prepare
from perceptscore.sources import SourceItem, Sources
from perceptscore.tasks import Preprocess, Task, get_task, output_columns


@dataclass
class Decoded:
    item: SourceItem
    error: str | None
    pixels: dict[Preprocess, np.ndarray]  # per preprocessing: (crops, 3, H, W) uint8


@dataclass
class Batch:
    items: list[SourceItem]
    errors: list[str | None]
    pixels: dict[Preprocess, torch.Tensor]  # per preprocessing: the decoded items' crops, stacked

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
        try:
            img = decode(item.path, self.draft)
            return Decoded(item, None, {spec: prepare(img, spec) for spec in self.specs})
        except DecodeError as exc:
            return Decoded(item, str(exc), {})


def collate(decoded: list[Decoded]) -> Batch:
    ok = [d for d in decoded if d.error is None]
    pixels = (
        {spec: torch.from_numpy(np.concatenate([d.pixels[spec] for d in ok])) for spec in ok[0].pixels}
        if ok
        else {}
    )
    return Batch([d.item for d in decoded], [d.error for d in decoded], pixels)


class _Chunks:
    """A batch sampler over a stream: consecutive lists of ``size`` items, read lazily."""

    def __init__(self, items: Iterable[SourceItem], size: int) -> None:
        self.items, self.size = items, size

    def __iter__(self) -> Iterator[list[SourceItem]]:
        it = iter(self.items)
        while chunk := list(islice(it, self.size)):
            yield chunk


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # decode workers must not fight the model for cores


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(16, max(2, cores - 2))
    return 0 if cores <= 4 else min(4, cores // 4)  # on CPU the model needs the cores; decoding is cheap


def _source(path: Path) -> dict[str, str]:
    """For a converted file: the release file it came from and that file's sha256."""
    if path.suffix.lower() != ".safetensors":
        return {}
    metadata = read_metadata(path)
    return {"source": metadata["source"], "source_sha256": metadata["source_sha256"]}


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
        fields = [pa.field("path", pa.string())]
        for task in self.tasks:
            fields += [
                pa.field(c, pa.string() if c == task.name and task.labels else pa.float64())
                for c in task.columns
            ]
        fields.append(pa.field("error", pa.string()))
        return pa.schema(fields + list(passthrough or []))

    def provenance(self) -> dict[str, Any]:
        return {
            "perceptscore": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": str(self.device),
            "precision": self.precision,
            "fast_decode": self.fast_decode,
            "tasks": {
                t.name: {
                    "checkpoint": str(self.weights[t.name].path),
                    "origin": self.weights[t.name].origin,
                    "sha256": file_sha256(self.weights[t.name].path),
                    **_source(self.weights[t.name].path),
                    "preprocessing": t.preprocess.describe(),
                    **({"labels": list(t.labels), "labels_note": "index order assumed"} if t.labels else {}),
                }
                for t in self.tasks
            },
        }

    # ---- scoring ---------------------------------------------------------------------------------
    def loader(self, items: Iterable[SourceItem]) -> DataLoader:
        dataset = DecodeDataset(self.specs, draft_side(self.specs) if self.fast_decode else None)
        return DataLoader(
            dataset,
            batch_sampler=_Chunks(items, self.batch_size),  # type: ignore[arg-type]
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_single_thread_worker if self.workers else None,
            prefetch_factor=4 if self.workers else None,
        )

    @torch.inference_mode()
    def _raw(self, task: Task, crops: torch.Tensor) -> np.ndarray:
        """uint8 crops (n * crops_per_image, 3, H, W) -> raw outputs averaged over each image's crops."""
        model, arch = self.models[task.name], task.architecture
        x = normalize(crops.to(self.device, non_blocking=True), arch.mean, arch.std, self.dtype)
        out = torch.cat([model(chunk).float() for chunk in x.split(self.batch_size)])
        per_image = out.view(-1, task.preprocess.crops, out.shape[-1]).mean(dim=1)
        return per_image.cpu().numpy()

    def rows(self, batch: Batch) -> list[dict[str, Any]]:
        ok = [i for i, e in enumerate(batch.errors) if e is None]
        values: dict[str, list[Any]] = {}
        if ok:
            for task in self.tasks:
                values |= task.values(self._raw(task, batch.pixels[task.preprocess]))
        empty = dict.fromkeys(c for t in self.tasks for c in t.columns)
        rows = []
        position = {i: n for n, i in enumerate(ok)}
        for i, (item, error) in enumerate(zip(batch.items, batch.errors, strict=True)):
            scored = {c: v[position[i]] for c, v in values.items()} if error is None else empty
            rows.append({"path": item.path, **scored, "error": error, **item.extras})
        return rows

    def iter_batches(self, sources: Iterable[SourceItem]) -> Iterator[list[dict[str, Any]]]:
        """Rows in input order, one list per batch, as soon as each batch is scored."""
        for batch in self.loader(sources):
            yield self.rows(batch)

    def score(
        self, inputs: Sequence[str] | str, recursive: bool = True, path_column: str | None = None
    ) -> pd.DataFrame:
        """Score files, folders, globs, @lists or manifests; a DataFrame with the CLI's columns."""
        sources = Sources(
            [inputs] if isinstance(inputs, str) else inputs, recursive, path_column, self.columns
        )
        rows = [row for batch in self.iter_batches(sources) for row in batch]
        schema = self.schema(sources.passthrough)
        return pa.Table.from_pylist(rows, schema=schema).to_pandas()
