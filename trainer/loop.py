"""One training stage: a shared LoRA tower with one head per dataset, AdamW, warmup + cosine, optional
mixed precision and gradient accumulation, evaluation each epoch, checkpoints and exact resume.

A checkpoint (``checkpoint.pt``, read back with ``weights_only=True``) holds only what training changes:
the adapters and heads (11 MB at full size), the optimizer and grad-scaler state, the torch RNG states
(dropout) and the step. The frozen tower is rebuilt from ``--init``, whose sha256 the run records. Data
order and augmentation are functions of the step (``data``), so nothing else needs saving.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from perceptscore.errors import CheckpointError
from perceptscore.model import PerceptHead, PerceptModel
from perceptscore.preprocess import normalize
from perceptscore.runs import Interrupted, StopOnSignal
from perceptscore.sinks import replaced_whole
from perceptscore.tasks import Architecture, Task
from perceptscore.trainer import metrics
from perceptscore.trainer.base import Base
from perceptscore.trainer.data import (
    AugmentedImages,
    TrainBatch,
    batches_in,
    epoch_batches,
    predict,
    train_loader,
)
from perceptscore.trainer.datasets import LabelledSet
from perceptscore.trainer.losses import LOSSES


class TrainNet(nn.Module):
    """PerceptModel's tower (frozen CLIP + trainable q/k/v LoRA) and one trainable head per dataset."""

    def __init__(self, arch: Architecture, heads: list[str]) -> None:
        super().__init__()
        self.arch = arch
        self.visual = PerceptModel(arch).visual
        for name, param in self.visual.named_parameters():
            param.requires_grad = ".lora_" in name
        self.heads = nn.ModuleDict(
            {h: PerceptHead(arch.embed_dim, arch.head_dims, arch.outputs, arch.head_dropout) for h in heads}
        )

    def forward(self, x: torch.Tensor, head: str) -> torch.Tensor:
        return self.heads[head](self.visual(x))

    def trainable(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.named_parameters() if v.requires_grad}

    def percept_state(self, head: str) -> dict[str, torch.Tensor]:
        """The state dict of a ``PerceptModel`` with this tower and ``head``: what gets exported."""
        state = {k: v for k, v in self.state_dict().items() if k.startswith("visual.")}
        prefix = f"heads.{head}."
        state |= {
            "head." + k.removeprefix(prefix): v for k, v in self.state_dict().items() if k.startswith(prefix)
        }
        return state


def build_net(base: Base, arch: Architecture, heads: list[str], seed: int) -> TrainNet:
    """Adapters (peft's init) and heads drawn from ``seed``; the tower's frozen tensors from ``base``."""
    torch.manual_seed(seed)
    net = TrainNet(arch, heads)
    missing, unexpected = net.load_state_dict(base.tensors, strict=False)
    frozen_missing = [k for k in missing if k.startswith("visual.") and ".lora_" not in k]
    if frozen_missing or unexpected:
        bad = (frozen_missing + unexpected)[0]
        raise CheckpointError(f"base {base.source} does not fit the tower (e.g. {bad})")
    return net


@dataclass
class Settings:
    """Everything that decides a stage's numbers (saved in the run, compared on --resume)."""

    loss: str
    lr: float
    batch_size: int
    epochs: int
    weight_decay: float
    warmup_fraction: float
    seed: int
    accumulate: int = 1
    max_steps: int | None = None


@dataclass
class Stage:
    name: str
    number: int  # seeds this stage's data order
    sets: list[LabelledSet]
    settings: Settings
    start: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable tensors to start from (stage 2)

    def steps_per_epoch(self) -> int:
        micro = sum(batches_in(len(s.split("train")), self.settings.batch_size) for s in self.sets)
        return max(1, micro // self.settings.accumulate)

    def total_steps(self) -> int:
        total = self.steps_per_epoch() * self.settings.epochs
        return min(total, self.settings.max_steps) if self.settings.max_steps else total


@dataclass
class Device:
    device: torch.device
    precision: str  # fp32, bf16 or fp16 (autocast; fp16 with a grad scaler)
    workers: int
    eval_batch_size: int

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warmup over the first ``warmup_fraction`` of the steps, then cosine decay to 0."""
    warmup = max(1, round(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class StageRun:
    """Trains one stage in ``folder``: log.csv (a row per step), metrics.csv (a row per epoch and dataset),
    checkpoint.pt, best.safetensors + best.json (the adapters and heads of the best epoch), done.json."""

    def __init__(
        self, stage: Stage, net: TrainNet, task: Task, folder: Path, dev: Device, console: Console,
        save_every: int = 0,
    ) -> None:  # fmt: skip
        self.stage, self.net, self.task, self.folder, self.dev = stage, net, task, folder, dev
        self.console, self.save_every = console, save_every
        self.s = stage.settings
        self.loss_fn = LOSSES[self.s.loss]
        params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.s.lr, weight_decay=self.s.weight_decay)
        # the scaler of the device's own type (torch.amp has a CPU one): the same code path runs everywhere
        self.scaler = torch.amp.GradScaler(dev.device.type, enabled=dev.precision == "fp16")
        self.step = 0
        self.best: dict[str, Any] = {}
        self.images = AugmentedImages([s.split("train") for s in stage.sets], task.preprocess, self.s.seed)

    # ---- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.folder / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "trainable": {k: v.detach().cpu() for k, v in self.net.trainable().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.dev.device.type == "cuda" else [],
            "best": json.dumps(self.best),
        }
        with replaced_whole(self.checkpoint_path, follow=False) as tmp:  # a kill keeps the last whole one
            torch.save(state, tmp)

    def load_checkpoint(self) -> None:
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step = int(state["step"])
        self.best = json.loads(state["best"])
        # Rows logged after the checkpoint belong to steps that will run again.
        for log in ("log.csv", "metrics.csv"):
            _truncate_csv(self.folder / log, self.step)

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self, resume: bool) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        if resume and self.checkpoint_path.is_file():
            self.load_checkpoint()
            self.console.print(f"{self.stage.name}: resumed at step {self.step}")
        elif self.stage.start:
            self.net.load_state_dict(self.stage.start, strict=False)
        total, per_epoch = self.stage.total_steps(), self.stage.steps_per_epoch()
        with StopOnSignal() as stop, _Progress(self.console, self.stage.name, total, self.step) as progress:
            while self.step < total:
                epoch, position = divmod(self.step, per_epoch)
                batches = epoch_batches(
                    [len(s.split("train")) for s in self.stage.sets],
                    self.s.batch_size, self.s.seed, self.stage.number, epoch,
                )  # fmt: skip
                start = position * self.s.accumulate
                batches = batches[start : per_epoch * self.s.accumulate]
                self.images.epoch_seed = (self.stage.number, epoch)
                loader = train_loader(self.images, batches, self.dev.workers, self.dev.device.type == "cuda")
                for _ in range(position, per_epoch):
                    loss, seen, skipped = self.train_step(loader, total)
                    self.step += 1
                    self._log(epoch, loss, seen, skipped)
                    progress.update(self.step, loss)
                    if self.step % per_epoch == 0 or self.step == total:
                        self.evaluate(epoch)
                        self.save_checkpoint()
                    elif self.save_every and self.step % self.save_every == 0:
                        self.save_checkpoint()
                    if stop.signum is not None:
                        self.save_checkpoint()
                        raise Interrupted(
                            f"stopped at step {self.step} of {self.stage.name}; run the same command with "
                            "--resume to continue",
                            stop.signum,
                        )
                    if self.step >= total:
                        break
        result = {"stage": self.stage.name, "steps": self.step, "best": self.best}
        (self.folder / "done.json").write_text(json.dumps(result, indent=2))
        return result

    def train_step(self, loader: Iterator[TrainBatch], total: int) -> tuple[float, int, list[str]]:
        self.net.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.s.lr * lr_factor(self.step, total, self.s.warmup_fraction)
        losses, seen, skipped = [], 0, []
        for _ in range(self.s.accumulate):
            batch = next(loader)
            skipped += batch.skipped
            if len(batch.labels) < (2 if self.s.loss == "pearson" else 1):
                continue  # every image of this micro-batch was unreadable
            arch = self.net.arch
            x = normalize(batch.pixels.to(self.dev.device, non_blocking=True), arch.mean, arch.std)
            with self.dev.autocast():
                out = self.net(x, self.stage.sets[batch.dataset].name)
            loss = self.loss_fn(out, batch.labels.to(self.dev.device)) / self.s.accumulate
            self.scaler.scale(loss).backward()
            losses.append(loss.item() * self.s.accumulate)
            seen += len(batch.labels)
        self.apply_gradients(backward_ran=bool(losses))
        return (float(np.mean(losses)) if losses else float("nan")), seen, skipped

    def apply_gradients(self, backward_ran: bool) -> None:
        """One optimizer step, skipped when every micro-batch of the step was unreadable: an enabled
        GradScaler asserts in ``step`` when no ``scale(loss).backward()`` ran before it, and there is
        nothing to apply anyway. The step still counts (the schedule and data order are functions of it)."""
        if backward_ran:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, epoch: int) -> None:
        """Each dataset's validation metrics; keeps the adapters and heads of the best epoch so far."""
        results = {s.name: self.metrics(s, "val")[0] for s in self.stage.sets}
        key = metrics.primary(next(iter(results.values())))[0]
        score = float(np.mean([r[key] for r in results.values()]))
        for name, result in results.items():
            _append_csv(
                self.folder / "metrics.csv", {"step": self.step, "epoch": epoch, "dataset": name, **result}
            )
        shown = ", ".join(f"{n} {key} {r[key]:.4f}" for n, r in results.items())
        self.console.print(f"{self.stage.name} epoch {epoch + 1}: {shown}")
        previous = self.best.get("score", float("nan"))
        if (score == score and (previous != previous or score > previous)) or not self.best:  # NaN: no score
            self.best = {"score": score, "metric": key, "epoch": epoch + 1, "step": self.step, "val": results}
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.net.trainable().items()}
            with replaced_whole(self.folder / "best.safetensors", follow=False) as tmp:
                save_file(tensors, tmp)

    def metrics(self, data: LabelledSet, split: str) -> tuple[dict[str, float], np.ndarray]:
        self.net.eval()
        examples = data.split(split)
        with self.dev.autocast():
            raw, _ = predict(
                lambda x: self.net(x, data.name), self.task, examples, self.dev.device, torch.float32,
                self.dev.eval_batch_size, self.dev.workers,
            )  # fmt: skip
        return evaluate_raw(self.task, raw, [e.label for e in examples]), raw

    def _log(self, epoch: int, loss: float, seen: int, skipped: list[str]) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        row = {
            "step": self.step,
            "epoch": epoch,
            "lr": lr,
            "loss": loss,
            "images": seen,
            "skipped": len(skipped),
        }
        _append_csv(self.folder / "log.csv", row | {"time": round(time.time(), 3)})
        for message in skipped:
            self.console.print(f"skipped {message}")


def evaluate_raw(task: Task, raw: np.ndarray, labels: list[float]) -> dict[str, float]:
    """Metrics of raw outputs against labels, leaving out rows that could not be scored (NaN)."""
    ok = ~np.isnan(raw).any(axis=1)
    y = np.asarray(labels, dtype=np.float64)[ok]
    if task.labels:
        result = metrics.classification(raw[ok].argmax(axis=1), y.astype(np.int64), task.labels)
    else:
        result = metrics.regression(raw[ok, 0], y)
    return result | {"errors": int((~ok).sum())}


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_csv(path: Path, step: int) -> None:
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    kept = [r for r in rows if int(r["step"]) <= step]
    with replaced_whole(path, follow=False) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)


class _Progress:
    """A Rich bar of steps with the loss on a terminal, a log line every 30 s otherwise."""

    def __init__(self, console: Console, label: str, total: int, done: int) -> None:
        self.console, self.label, self.total = console, label, total
        self.last = time.monotonic()
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[loss]}"), console=console,
            )  # fmt: skip
            self.task = self.bar.add_task(label, total=total, completed=done, loss="")

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"loss {loss:.4f}")
        elif time.monotonic() - self.last >= float(os.environ.get("PERCEPTSCORE_LOG_EVERY", "30")):
            self.last = time.monotonic()
            self.console.print(f"{self.label}: step {step}/{self.total}, loss {loss:.4f}")

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
