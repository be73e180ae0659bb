"""GPU throughput of perceptscore on one CUDA device: end to end from JPEG files, model only, and the
bf16/fp16 GEMM ceiling with the model's own matrix shapes. Prepared for the lent H200; not run in CI.

    python bench/gpu_throughput.py [--images 4096] [--batch 256] [--workers 14]

Everything is built on the spot (no network): 1100x800 photo-like JPEGs and a full-size random PerceptModel
saved in our format. On the device machine open_clip_torch and ftfy must be installed first
(carried wheels); see bench/RESULTS.md for the exact command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perceptscore.checkpoints import save_converted  # noqa: E402
from perceptscore.model import PerceptModel  # noqa: E402
from perceptscore.scorer import Scorer  # noqa: E402
from perceptscore.tasks import get_task  # noqa: E402

FLOP_PER_IMAGE = 2 * 257 * 24 * (12 * 1024 * 1024) + 2 * 2 * 24 * 257 * 257 * 1024


def cuda_rate(fn, n: int, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return n / best


def gemm_ceiling(dtype: torch.dtype, batch: int) -> float:
    tokens = 257 * batch
    flop = seconds = 0.0
    for m, k, n in [(tokens, 1024, 3072), (tokens, 1024, 1024), (tokens, 1024, 4096), (tokens, 4096, 1024)]:
        a = torch.randn(m, k, dtype=dtype, device="cuda")
        b = torch.randn(k, n, dtype=dtype, device="cuda")
        seconds += 1 / cuda_rate(lambda a=a, b=b: a @ b, 1, repeats=20)
        flop += 2 * m * k * n
    return flop / seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=14)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    task = get_task("memorability")
    rows = [("device", torch.cuda.get_device_name(0))]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photos = folder / "photos"
        photos.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            # photo-like content (smooth colour fields plus grain): JPEG decoding costs what it does on photos
            coarse = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((1100, 800), 3)
            grain = rng.normal(0, 6, (800, 1100, 3))
            pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(photos / f"{i:06d}.jpg", quality=90)
        with torch.device("meta"):
            model = PerceptModel(task.architecture)
        model = model.to_empty(device="cpu")
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        weights = folder / "memorability.safetensors"
        save_converted(model, task, weights, "random", "0" * 64)

        for precision in ("fp16", "bf16"):
            scorer = Scorer(["memorability"], {"memorability": str(weights)}, device="cuda",
                            precision=precision, batch_size=args.batch, workers=args.workers)  # fmt: skip
            scorer.score([str(p) for p in sorted(photos.iterdir())[: args.batch]])  # warm-up
            for fast in (False, True):
                scorer.fast_decode = fast
                start = time.perf_counter()
                df = scorer.score([str(photos)])
                seconds = time.perf_counter() - start
                assert df["error"].isna().all()
                label = f"end to end {precision}{' + fast decode' if fast else ''}"
                rows.append((label, f"{len(df) / seconds:,.0f} images/s"))
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
            net = scorer.models["memorability"]
            x = torch.randn(args.batch, 3, 224, 224, dtype=dtype, device="cuda")
            with torch.inference_mode():
                images_s = cuda_rate(lambda x=x, net=net: net(x), args.batch)
            ceiling = gemm_ceiling(dtype, args.batch)
            achieved = images_s * FLOP_PER_IMAGE / 1e12
            rows.append((f"model only {precision}", f"{images_s:,.0f} images/s = {achieved:.0f} TFLOP/s"))
            rows.append(
                (f"GEMM ceiling {precision}", f"{ceiling:.0f} TFLOP/s; model at {achieved / ceiling:.0%}")
            )
    for what, value in rows:
        print(f"{what:<34} {value}")


if __name__ == "__main__":
    main()
