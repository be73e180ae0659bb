"""The model side of scoring: every task's model on one device; a ``Batch`` of crops -> core rows.

Knows nothing of how the batch was made (DataLoader workers, Ray tasks), so an engine can run it anywhere:
the local engine's main process, a ``--processes`` child, a Ray actor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from perceptscore.batches import Batch
from perceptscore.checkpoints import PRECISIONS, load_model
from perceptscore.columns import scored_batch
from perceptscore.preprocess import Normalizer
from perceptscore.tasks import Preprocess, Task

Model = Callable[[torch.Tensor], torch.Tensor]
_log = logging.getLogger(__name__)


class Launched:
    """Raw outputs on their way to this process: on a GPU, copied into pinned memory behind the model's
    kernels with an event recorded after them, so the caller can fetch the next batch while they run;
    ``numpy()`` waits for the event. On the CPU, done already."""

    def __init__(self, out: torch.Tensor) -> None:
        self.event: torch.cuda.Event | None = None
        if out.device.type == "cuda":
            self.host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            self.host.copy_(out, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = out

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


@torch.inference_mode()
def launch_raw(
    model: Model,
    task: Task,
    crops: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    normalizer: Normalizer | None = None,
) -> Launched:
    """uint8 crops (n * crops_per_image, 3, H, W) -> raw outputs (n, outputs) averaged over each image's
    crops, launched (``Launched``). The one place images meet a model: scoring and the trainer's
    evaluation both go through it.

    Normalised one model chunk at a time on ``device`` (``normalizer``'s reused buffers; pass the same one
    from call to call): the values equal ``preprocess.normalize`` of the whole batch bit for bit, and no
    float copy of all the crops is ever held (15 crops an image for quality)."""
    arch = task.architecture
    norm = normalizer if normalizer is not None else Normalizer(arch.mean, arch.std)
    pixels = crops.to(device, non_blocking=True)
    out = torch.cat([model(norm(chunk, dtype)).float() for chunk in pixels.split(batch_size)])
    return Launched(out.view(-1, task.preprocess.crops, out.shape[-1]).mean(dim=1))


def raw_outputs(
    model: Model,
    task: Task,
    crops: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    normalizer: Normalizer | None = None,
) -> np.ndarray:
    """``launch_raw``, waited for."""
    return launch_raw(model, task, crops, device, dtype, batch_size, normalizer).numpy()


class Pending:
    """A batch's rows once its model outputs are here (``result``): a GPU computes them meanwhile.
    ``ready``: computed already (on the CPU), so an engine gives them at once instead of holding them
    while it waits for the next batch (which may be slow to come: remote objects)."""

    def __init__(self, finish: Callable[[], pa.RecordBatch], ready: bool = False) -> None:
        self._finish, self.ready = finish, ready

    def result(self) -> pa.RecordBatch:
        return self._finish()


class Predictor:
    def __init__(
        self,
        tasks: Sequence[Task],
        models: Mapping[str, Model],
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        self.tasks, self.models = list(tasks), dict(models)
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        # per task, each with its buffers: kept across batches, where their reuse is what makes them cheap
        self.normalizers = {t.name: Normalizer(t.architecture.mean, t.architecture.std) for t in self.tasks}

    @classmethod
    def from_plan(cls, plan: Any) -> Predictor:
        """Load every task's weights of a ``ScoringPlan`` onto its device, in its precision."""
        device = torch.device(plan.device)
        for w in plan.weights:  # seconds and a GB or more each: worth a debug line (and a test's probe)
            _log.debug("loading weights for %s from %s", w.task, w.path)
        models = {
            w.task: load_model(w.task, w.path, device=device, precision=plan.precision) for w in plan.weights
        }
        return cls(plan.task_specs(), models, device, PRECISIONS[plan.precision], plan.batch_size)

    @property
    def specs(self) -> list[Preprocess]:
        """The distinct preprocessings the tasks need (memorability and emotion share theirs)."""
        return list(dict.fromkeys(t.preprocess for t in self.tasks))

    def __call__(self, batch: Batch) -> pa.RecordBatch:
        return self.submit(batch).result()

    def submit(self, batch: Batch) -> Pending:
        """Start scoring ``batch``; its rows come from ``result()``. An engine submits the next batch before
        asking for this one's rows, so the GPU computes while it reads the next batch from its workers
        (on the CPU the work is done here, and nothing changes)."""
        return self.launch([i.path for i in batch.items], batch.errors, batch.stats, batch.pixels)

    def rows(
        self,
        uris: Sequence[str],
        errors: Sequence[str | None],
        stats: Sequence[tuple[int, int] | None],
        pixels: Mapping[Preprocess, torch.Tensor],
    ) -> pa.RecordBatch:
        """Core rows for items given by their parts: ``pixels`` holds the crops of the rows without an
        error, stacked per preprocessing."""
        return self.launch(uris, errors, stats, pixels).result()

    def launch(
        self,
        uris: Sequence[str],
        errors: Sequence[str | None],
        stats: Sequence[tuple[int, int] | None],
        pixels: Mapping[Preprocess, torch.Tensor],
    ) -> Pending:
        launched: dict[str, Launched] = {}
        if any(e is None for e in errors):
            for task in self.tasks:
                launched[task.name] = launch_raw(
                    self.models[task.name], task, pixels[task.preprocess], self.device, self.dtype,
                    self.batch_size, self.normalizers[task.name],
                )  # fmt: skip

        def finish() -> pa.RecordBatch:
            values: dict[str, list[Any]] = {}
            for task in self.tasks:
                if task.name in launched:
                    values |= task.values(launched[task.name].numpy())
            return scored_batch(self.tasks, uris, errors, stats, values)

        return Pending(finish, ready=all(out.event is None for out in launched.values()))
