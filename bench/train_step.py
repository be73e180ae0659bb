"""One training step of the full-size network: perceptscore's trainer against the release's structure.

    python bench/train_step.py [--batch 4] [--steps 3] [--threads 2] [--device cpu]

The baseline is what the authors' modeling.py trains: transformers' CLIP vision tower wrapped by peft
(LoRA r=16 on q/k/v) + projection + MLP head (tests/release_reference.py; needs the dev extra). Ours is
``trainer.loop.TrainNet``: open_clip's tower with fused q/k/v and three adapters, SDPA attention. Both run
AdamW on the same trainable parameters with an MSE loss on random CLIP-normalised images; the time is the
median of ``--steps`` steps after one warm-up step, all in this run. Prints the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from perceptscore.tasks import get_task  # noqa: E402
from perceptscore.trainer.loop import TrainNet  # noqa: E402

from release_reference import FULL_SIZE, ReleaseModel  # noqa: E402

Forward = Callable[[torch.Tensor], torch.Tensor]


def step_time(model: nn.Module, forward: Forward, x: torch.Tensor, steps: int, autocast: bool) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    target = torch.rand(x.shape[0], device=x.device)
    model.train()

    def step() -> None:
        bf16 = torch.autocast(x.device.type, dtype=torch.bfloat16)
        with bf16 if autocast else contextlib.nullcontext():
            out = forward(x)
        loss = torch.nn.functional.mse_loss(out.float().squeeze(-1), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, device=device)

    release = ReleaseModel(1, FULL_SIZE).to(device)
    release.proj.weight.requires_grad_(False)  # frozen in the release, as the tower is
    release_trainable = sum(p.numel() for p in release.parameters() if p.requires_grad)
    baseline = step_time(release, release, x, args.steps, autocast=False)
    del release

    ours = TrainNet(get_task("memorability").architecture, ["lamem"]).to(device)
    ours_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    fp32 = step_time(ours, lambda t: ours(t, "lamem"), x, args.steps, autocast=False)
    bf16 = step_time(ours, lambda t: ours(t, "lamem"), x, args.steps, autocast=True)

    print(f"device {device}, batch {args.batch}, {args.threads} threads, median of {args.steps} steps")
    print(f"trainable parameters: release structure {release_trainable:,}, ours {ours_trainable:,}")
    print(f"{'':34} {'s/step':>8} {'images/s':>9} {'vs release':>11}")
    for name, seconds in [
        ("release structure (peft), fp32", baseline),
        ("ours (TrainNet), fp32", fp32),
        ("ours (TrainNet), bf16 autocast", bf16),
    ]:
        print(f"{name:34} {seconds:8.2f} {args.batch / seconds:9.2f} {baseline / seconds:10.2f}x")
    if device.type == "cpu":
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
