"""PerceptCLIP scores as one step of your own Ray Data pipeline.

    import ray, perceptscore.ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.read_parquet("manifest.parquet")           # any dataset with a column of image paths
    ds = ds.map_batches(
        perceptscore.ray.Scorer,
        fn_constructor_kwargs={"tasks": ["quality", "memorability"]},
        compute=ActorPoolStrategy(min_size=1, max_size=8),
        batch_size=64,
        num_gpus=1,                                          # leave out on CPU-only clusters
        num_cpus=8,                                          # cores each actor decodes on (see below)
    )
    ds.write_parquet("scored/")

Each actor loads the weights on its own node, in its constructor (``perceptscore weights fetch`` on every
node, a shared ``HF_HOME``, or ``checkpoints`` paths every node can read). Each output batch is the input
batch, in the same format (pandas, pyarrow or numpy), plus the columns ``perceptscore score`` writes for the
tasks (``memorability``, ``quality`` and ``quality_raw``, ``emotion`` ...) and ``error``; an input column of
the same name is renamed ``input_<name>``. A file that cannot be read, cannot be decoded, or crashes or hangs
its decoder gets its ``error``, never a failed block: files are decoded in ``decode_processes`` child
processes of the actor. By default that is one per CPU Ray gave the actor (``num_cpus``; Ray Data's default
is 1) and at least 2 on a GPU, where decoding is what limits the rate (~80 images/s per core for 1 MP
JPEGs); on CPU, a quarter of them (the model needs the rest).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from perceptscore.columns import FILE_MTIME, FILE_SIZE, PATH
from perceptscore.errors import UsageError
from perceptscore.images import MAX_PIXELS
from perceptscore.isolated_decode import Decoded, IsolatedDecoder

__all__ = ["Scorer", "decode_concurrency"]


class Scorer:
    """A callable class for ``Dataset.map_batches`` (see the module's docstring).

    ``tasks``: task names (or one name); ``checkpoints``: task -> weights file, as in the Python API
    (default: the released weights, from this node's caches or the hub); ``device``: "auto" takes the
    actor's GPU when Ray gave it one; ``precision``: "auto" is fp16 on CUDA, fp32 on CPU; ``path_column``:
    the column of image paths; ``decode_processes``: files decoded at once per actor (default: from the
    CPUs Ray gave the actor, ``decode_concurrency``)."""

    def __init__(
        self,
        tasks: str | Sequence[str],
        checkpoints: Mapping[str, str] | None = None,
        device: str = "auto",
        precision: str = "auto",
        path_column: str = PATH,
        decode_processes: int | None = None,
        fast_decode: bool = False,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        from perceptscore.engines.ray import decoder_settings
        from perceptscore.plan import ScoreOptions, make_plan
        from perceptscore.predict import Predictor
        from perceptscore.tasks import parse_tasks

        names = parse_tasks([tasks] if isinstance(tasks, str) else list(tasks))
        options = ScoreOptions(
            names, dict(checkpoints or {}), device, precision, fast_decode=fast_decode, max_pixels=max_pixels
        )
        self.plan = make_plan(options)
        self.predictor = Predictor.from_plan(self.plan)
        self.path_column = path_column
        settings = decoder_settings(self.predictor.specs, fast_decode, max_pixels, self.plan.limits)
        if decode_processes is None:
            decode_processes = decode_concurrency(_actor_cpus(), self.plan.device.startswith("cuda"))
        self._decoders = [IsolatedDecoder.from_settings(settings) for _ in range(max(1, decode_processes))]
        self._threads = ThreadPoolExecutor(len(self._decoders))
        self._lock = threading.Lock()

    def __call__(self, batch: Any) -> Any:
        with self._lock:  # one batch at a time: each decoder has one file in flight (max_concurrency > 1)
            return self._scored(batch)

    def _scored(self, batch: Any) -> Any:
        uris = _column(batch, self.path_column)
        decoded = self._decode(uris)
        import torch

        ok = [d for d in decoded if d.error is None]
        pixels = {
            spec: torch.from_numpy(np.concatenate([d.pixels[i] for d in ok]))
            for i, spec in enumerate(self.predictor.specs)
            if ok
        }
        rows = self.predictor.rows(
            [u or "" for u in uris], [d.error for d in decoded], [d.stat for d in decoded], pixels
        )
        added = {
            name: rows.column(name) for name in rows.schema.names if name not in (PATH, FILE_SIZE, FILE_MTIME)
        }
        return _with_columns(batch, added)

    def _decode(self, uris: list[str | None]) -> list[Decoded]:
        """Every uri decoded; decoder k takes every n-th from the k-th, all at once (each on its child).
        URLs are fetched first, many at once, so no decoder waits on the network under its time limit."""
        from perceptscore.items import Item
        from perceptscore.locators import InMemory, Unavailable, locate
        from perceptscore.prefetch import prefetched

        items = list(prefetched(Item(i, locate(u or "")) for i, u in enumerate(uris)))
        n = len(self._decoders)

        def one(decoder: IsolatedDecoder, item: Item) -> Decoded:
            if not item.path:
                return Decoded("no path", None, [])
            if isinstance(item.locator, Unavailable):
                return Decoded(item.locator.reason, None, [])
            if isinstance(item.locator, InMemory):
                return decoder.decode(item.path, item.locator.data, item.locator.known)
            return decoder.decode(item.path)

        def share(k: int) -> list[Decoded]:
            return [one(self._decoders[k], item) for item in items[k::n]]

        shares = list(self._threads.map(share, range(n)))
        return [shares[i % n][i // n] for i in range(len(uris))]

    def __del__(self) -> None:
        for decoder in getattr(self, "_decoders", []):
            decoder.close()


def decode_concurrency(cpus: float, cuda: bool) -> int:
    """Files one actor decodes at once, given the ``cpus`` Ray reserved for it. On a GPU every reserved
    core decodes (the model runs on the GPU; decoding is the limit), and never fewer than 2, so one file
    decodes while the other's crops are handed over. On CPU the model needs the cores (a ViT-L/14 image costs
    a core a second or more, a 1 MP decode ~12 ms): a quarter of them, at least 1."""
    cores = max(1, int(cpus))
    return max(2, cores) if cuda else max(1, cores // 4)


def _actor_cpus() -> float:
    """The CPUs Ray reserved for this actor (``num_cpus`` of ``map_batches``; 0 if none); outside a Ray
    worker (the class called directly), the cores this process may run on."""
    try:
        import ray

        if ray.is_initialized():
            return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    except (ImportError, AssertionError):  # no Ray, or the driver: get_assigned_resources is for workers
        pass
    return float(len(os.sched_getaffinity(0)))


def _column(batch: Any, name: str) -> list[str | None]:
    names = list(batch.column_names if isinstance(batch, pa.Table) else batch.keys())
    if name not in names:
        raise UsageError(
            f"no column {name!r} in the batch (it has: {', '.join(map(str, names))}); set path_column"
        )
    values = batch[name]
    values = values.to_pylist() if isinstance(values, pa.ChunkedArray) else list(values)
    return [None if v is None else str(v) for v in values]


def _with_columns(batch: Any, added: dict[str, pa.Array]) -> Any:
    """``batch`` in its own format with ``added`` appended; its columns of the same names renamed."""
    names = [str(c) for c in (batch.column_names if isinstance(batch, pa.Table) else batch.keys())]
    if clash := sorted(set(names) & {f"input_{c}" for c in added if c in names}):
        raise UsageError(f"the batch has both {clash[0][6:]!r} and {clash[0]!r}: rename one before scoring")
    if isinstance(batch, pa.Table):
        table = batch.rename_columns([f"input_{c}" if c in added else c for c in batch.column_names])
        for name, values in added.items():
            table = table.append_column(name, values)
        return table
    renamed = {(f"input_{k}" if k in added else k): v for k, v in batch.items()}
    if isinstance(batch, pd.DataFrame):
        frame = pd.DataFrame(renamed, index=batch.index)
        for name, values in added.items():
            frame[name] = values.to_pandas().to_numpy()
        return frame
    return renamed | {name: values.to_numpy(zero_copy_only=False) for name, values in added.items()}
