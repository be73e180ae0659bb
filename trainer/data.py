"""Images for training and evaluation.

Training order and augmentation are functions of (seed, stage, epoch, step) and of each example's index,
never of a random state that runs on: a run resumed at step k sees exactly the images, crops and flips an
uninterrupted run sees from step k, whatever the number of decode workers.

Augmentation (our choice; the release's is UNKNOWN): the task's own inference geometry with a random crop
in place of the centre crop, and a horizontal flip with probability 1/2. Nothing that changes colour,
sharpness or scale: those would alter the very quality, emotion or memorability being learnt. Evaluation
uses the inference preprocessing exactly, through the scorer's own code, so the trainer's metrics are the
metrics of what ``perceptscore score`` outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from perceptscore.columns import ERROR
from perceptscore.engines.local import LocalEngine, worker_init
from perceptscore.errors import DecodeError
from perceptscore.images import decode
from perceptscore.items import Item
from perceptscore.locators import locate
from perceptscore.plan import ScoringPlan
from perceptscore.predict import Predictor
from perceptscore.preprocess import resize
from perceptscore.tasks import Preprocess, Task
from perceptscore.trainer.datasets import Example

Key = tuple[int, int]  # (dataset number within the stage, example index within its train split)


def rng_for(*seed: int) -> np.random.Generator:
    return np.random.default_rng([s & 0xFFFFFFFF for s in seed])


@dataclass
class TrainBatch:
    dataset: int
    pixels: torch.Tensor  # (n, 3, crop, crop) uint8
    labels: torch.Tensor  # (n,) float32 (scores, or class indices)
    skipped: list[str]  # "path: reason" of images that could not be decoded

    def pin_memory(self) -> TrainBatch:  # called by DataLoader(pin_memory=True) for custom batch types
        self.pixels, self.labels = self.pixels.pin_memory(), self.labels.pin_memory()
        return self


class AugmentedImages(Dataset[tuple[int, np.ndarray | None, float, str | None]]):
    """``(dataset, example)`` keys -> an augmented uint8 crop, its label, and an error if undecodable."""

    def __init__(self, sets: Sequence[Sequence[Example]], spec: Preprocess, seed: int) -> None:
        self.sets, self.spec, self.seed = sets, spec, seed
        self.epoch_seed = (0, 0)  # (stage, epoch): set before each epoch's loader is made

    def __getitem__(self, key: Key) -> tuple[int, np.ndarray | None, float, str | None]:  # type: ignore[override]
        d, i = key
        example = self.sets[d][i]
        try:
            with locate(example.path).open() as f:
                img = decode(f)
        except DecodeError as exc:
            return d, None, example.label, f"{example.path}: {exc}"
        rng = rng_for(self.seed, *self.epoch_seed, d, i)
        pixels = np.asarray(resize(img, self.spec.resize))
        height, width = pixels.shape[:2]
        c = self.spec.crop
        if height < c or width < c:
            return d, None, example.label, f"{example.path}: smaller than the {c}px crop after resizing"
        top, left = int(rng.integers(0, height - c + 1)), int(rng.integers(0, width - c + 1))
        crop = pixels[top : top + c, left : left + c]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return d, np.ascontiguousarray(crop.transpose(2, 0, 1)), example.label, None


def collate_train(items: list[tuple[int, np.ndarray | None, float, str | None]]) -> TrainBatch:
    ok = [(px, label) for _, px, label, err in items if err is None]
    pixels = (
        torch.from_numpy(np.stack([px for px, _ in ok])) if ok else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    )
    labels = torch.tensor([label for _, label in ok], dtype=torch.float32)
    return TrainBatch(items[0][0], pixels, labels, [err for *_, err in items if err is not None])


def batches_in(size: int, batch_size: int) -> int:
    """Micro-batches a dataset of ``size`` gives per epoch: full batches only (the last partial one is
    dropped), or one batch of all of it when it is smaller than a batch."""
    return size // batch_size if size >= batch_size else 1


def epoch_batches(
    sizes: Sequence[int], batch_size: int, seed: int, stage: int, epoch: int
) -> list[list[Key]]:
    """One epoch's micro-batches: each dataset shuffled and cut into full batches (a dataset smaller than
    a batch gives one batch of all of it), then the batches of all datasets shuffled together, so every
    step trains one dataset's head on one dataset's images."""
    batches: list[list[Key]] = []
    for d, size in enumerate(sizes):
        order = rng_for(seed, stage, epoch, d, 1).permutation(size)
        batches += [
            [(d, int(i)) for i in order[b * batch_size : (b + 1) * batch_size]]
            for b in range(batches_in(size, batch_size))
        ]
    mix = rng_for(seed, stage, epoch, 2).permutation(len(batches))
    return [batches[i] for i in mix]


def train_loader(
    images: AugmentedImages, batches: list[list[Key]], workers: int, pin: bool
) -> Iterator[TrainBatch]:
    loader = DataLoader(
        images,
        batch_sampler=batches,  # type: ignore[arg-type]
        num_workers=workers,
        collate_fn=collate_train,
        pin_memory=pin,
        generator=torch.Generator(),  # keep the global RNG (dropout) untouched by the loader's seeding
        worker_init_fn=worker_init if workers else None,
        persistent_workers=False,
    )
    return iter(loader)


def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    task: Task,
    examples: Sequence[Example],
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    workers: int,
) -> tuple[np.ndarray, list[str | None]]:
    """Raw outputs (n, outputs) for ``examples`` as ``perceptscore score`` computes them (NaN rows where a
    file could not be decoded), and each row's error. Runs on the local engine, so a file that crashes or
    hangs its decoder costs one error row, not the training run."""
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    plan = ScoringPlan((task.name,), (), str(device), precision, batch_size, workers)
    engine = LocalEngine(lambda _: Predictor([task], {task.name: model}, device, dtype, batch_size))
    items = [Item(i, locate(e.path)) for i, e in enumerate(examples)]
    batches = list(engine.run(plan, items))
    if not batches:
        return np.full((0, task.outputs), np.nan), []
    table = pa.Table.from_batches(batches)
    return task.raw_from(table.to_pandas()), table.column(ERROR).to_pylist()
