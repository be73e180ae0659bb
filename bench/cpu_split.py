"""CPU split between torch threads and decode workers (issue 23, item 7): rows/s of a full-size ViT-L/14
for each (torch threads, decode workers) pair, against the current default measured in the same run.

    python bench/cpu_split.py [--images 16] [--repeats 2] [--precisions fp32,bf16]
                              [--splits 1,1 2,1 2,0 1,0] [--batch-size 8]

The photos are ``bench/cpu_throughput.py``'s set (half 12 MP, half 1 MP JPEGs made from bundled samples):
camera-sized files, where decoding costs as much as a bf16 forward, so the split matters. The model is a
random full-size ViT-L/14 checkpoint in the release's layout (needs the dev extra: transformers + peft).

Each run is one ``Scorer.score`` call over the photo folder with the plan's ``cpu_threads`` and
``workers`` set to the pair (the local engine applies ``cpu_threads`` with ``torch.set_num_threads``;
``workers`` 0 decodes in the scoring process). "default" is what a CLI run gets today on this machine:
torch's own thread count at start and ``plan.default_workers("cpu")``. Every pair runs once on two photos
as a warm-up (worker start, first kernels), then ``--repeats`` interleaved rounds over all pairs;
rows/s is the median, and each ratio is the median of each round's ratio to that round's default run
(they share that moment's load). The load average is printed before and after: other work on the machine
takes cores from every pair alike only if it is steady.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

# torch's thread count before anything sets it: the default a CLI run gets
DEFAULT_THREADS = torch.get_num_threads()

from cpu_throughput import photo_set  # noqa: E402

from perceptscore.plan import default_workers  # noqa: E402
from perceptscore.scorer import Scorer  # noqa: E402

from release_reference import FULL_SIZE, make_release_checkpoint  # noqa: E402

Split = tuple[int, int]  # (torch threads, decode workers)


def parse_split(text: str) -> Split:
    threads, workers = (int(v) for v in text.split(","))
    if threads < 1 or workers < 0:
        raise argparse.ArgumentTypeError(f"{text}: threads >= 1, workers >= 0")
    return threads, workers


def timed_score(scorer: Scorer, split: Split, inputs: list[str], count: int) -> tuple[float, np.ndarray]:
    """Seconds for one ``score`` call with ``split``, and its scores (every row checked scored)."""
    threads, workers = split
    scorer.plan = replace(scorer.plan, cpu_threads=threads, workers=workers)
    start = time.perf_counter()
    frame = scorer.score(inputs)
    wall = time.perf_counter() - start
    if len(frame) != count or frame["error"].notna().any():
        errors = frame["error"].dropna()
        raise SystemExit(f"split {split}: {len(frame)} rows of {count}, errors: {errors[:1].tolist()}")
    return wall, frame["memorability"].to_numpy()


def measure(
    scorer: Scorer, splits: list[Split], folder: Path, warm: list[str], repeats: int
) -> tuple[dict[Split, list[float]], float]:
    """Wall seconds per split over ``repeats`` interleaved rounds (after a warm-up of each), and the
    largest score difference between any two runs."""
    count = len(list(folder.iterdir()))
    for split in splits:
        timed_score(scorer, split, warm, len(warm))
    walls: dict[Split, list[float]] = {s: [] for s in splits}
    scores: list[np.ndarray] = []
    for _ in range(repeats):
        for split in splits:
            wall, got = timed_score(scorer, split, [str(folder)], count)
            walls[split].append(wall)
            scores.append(got)
    spread = max(float(np.abs(s - scores[0]).max()) for s in scores)
    return walls, spread


def table(precision: str, walls: dict[Split, list[float]], default: Split, count: int, spread: float) -> None:
    print(f"\n{precision}: largest score difference between runs {spread:.2e}")
    print("| torch threads | decode workers | rows/s | vs default (min-max) |")
    print("|---|---|---|---|")
    for split, taken in walls.items():
        ratios = [d / w for d, w in zip(walls[default], taken, strict=True)]
        label = " (default)" if split == default else ""
        print(f"| {split[0]}{label} | {split[1]} | {count / statistics.median(taken):.3f} | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="photos (half 12 MP, half 1 MP)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--splits", nargs="+", type=parse_split, default=[(1, 1), (2, 1), (2, 0), (1, 0)])
    parser.add_argument("--batch-size", type=int, default=8)
    opts = parser.parse_args()
    warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes (release_reference)
    default = (DEFAULT_THREADS, default_workers("cpu"))
    splits = list(dict.fromkeys([default, *opts.splits]))
    print(f"{len(os.sched_getaffinity(0))} cores; torch {torch.__version__}; {opts.images} photos "
          f"(half 12 MP, half 1 MP); batch {opts.batch_size}; {opts.repeats} interleaved rounds after a "
          f"warm-up; default split: {default[0]} threads, {default[1]} worker(s)")  # fmt: skip
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        paths = photo_set(folder, opts.images)
        warm = [str(p) for p in paths[:2]]  # one 12 MP and one 1 MP photo
        checkpoint = Path(tmp) / "perceptCLIP_Memorability.pth"
        make_release_checkpoint(checkpoint, 1, size=FULL_SIZE, seed=1)
        for precision in opts.precisions.split(","):
            scorer = Scorer(["memorability"], {"memorability": str(checkpoint)}, device="cpu",
                            precision=precision, batch_size=opts.batch_size)  # fmt: skip
            walls, spread = measure(scorer, splits, folder, warm, opts.repeats)
            table(precision, walls, default, opts.images, spread)
            del scorer
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")


if __name__ == "__main__":
    main()
