"""CPU throughput of perceptscore against the release's way of scoring, all baselines measured in this run.

    python bench/cpu_throughput.py [--images 8] [--threads 2]

Builds a photo set from bundled sample images (12 MP and 1 MP JPEGs) and a random full-size ViT-L/14
checkpoint in the release's layout (needs the dev extra: transformers + peft), then prints:

- end to end from files, images/s: (a) the release's way (one image at a time, PIL + torchvision transforms,
  its transformers+peft model in fp32, no batching) against perceptscore fp32 (exact) and bf16 + fast decode,
  with the bf16 score deviation from fp32 (max abs, Spearman);
- decode + preprocess only, images/s: (b) plain Pillow against ours, default and --fast-decode, on 12 MP;
- model only, images/s at several batch sizes, and (c) the machine's GEMM ceiling measured with the model's
  own matrix shapes in fp32 and bf16, giving the model's fraction of it;
- peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import perceptscore  # noqa: E402
from perceptscore.images import decode, draft_side  # noqa: E402
from perceptscore.preprocess import prepare  # noqa: E402
from perceptscore.scorer import Scorer  # noqa: E402
from perceptscore.tasks import get_task  # noqa: E402

from photos import sample  # noqa: E402
from release_reference import FULL_SIZE, make_release_checkpoint  # noqa: E402

FLOP_PER_IMAGE = 2 * 257 * 24 * (12 * 1024 * 1024) + 2 * 2 * 24 * 257 * 257 * 1024  # matmuls + attention


def rate(fn: Callable[[], object], n: int, repeats: int = 1) -> float:
    """Items per second: best of ``repeats`` timed calls of ``fn`` (after one warm-up call)."""
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def photo_set(folder: Path, count: int) -> list[Path]:
    """Half 12 MP (4000x3000), half 1 MP (1200x900) JPEGs made from different crops of the samples."""
    paths = []
    bases = [sample(n) for n in ("coffee.png", "astronaut.png", "chelsea.png", "rocket.jpg")]
    for i in range(count):
        base = bases[i % len(bases)]
        size = (4000, 3000) if i % 2 == 0 else (1200, 900)
        img = base.crop((i % 7, i % 5, base.width - i % 3, base.height - i % 4)).resize(
            size, Image.Resampling.BICUBIC
        )
        path = folder / f"{i:03d}_{size[0]}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def gemm_ceiling(dtype: torch.dtype, batch: int) -> float:
    """GFLOP/s of the model's own matmul shapes at this batch, weighted as the model weights them."""
    tokens = 257 * batch
    shapes = [(tokens, 1024, 3072), (tokens, 1024, 1024), (tokens, 1024, 4096), (tokens, 4096, 1024)]
    total_flop = total_s = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        per_s = rate(lambda a=a, b=b: torch.matmul(a, b), 1, repeats=3)
        total_flop += 2 * m * k * n
        total_s += 1 / per_s
    return total_flop / total_s / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="photos end to end (half 12 MP, half 1 MP)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("memorability")
    arch = task.architecture
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photos = folder / "photos"
        photos.mkdir()
        paths = photo_set(photos, args.images)
        checkpoint = folder / "perceptCLIP_Memorability.pth"
        release = make_release_checkpoint(checkpoint, 1, size=FULL_SIZE, seed=1).eval()
        rows: list[tuple[str, str, str]] = []

        # (a) end to end: the release's way, then ours
        release_tf = T.Compose(
            [T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(arch.mean, arch.std)]
        )

        def release_way() -> list[float]:
            with torch.no_grad():
                return [release(release_tf(Image.open(p).convert("RGB"))[None]).item() for p in paths]

        with torch.no_grad():
            release(torch.zeros(1, 3, 224, 224))  # warm-up, as ours gets one
        start = time.perf_counter()
        release_scores = release_way()
        base_rate = len(paths) / (time.perf_counter() - start)
        rows.append(("end to end", "release's way: 1 image, PIL + torchvision, fp32", f"{base_rate:.3f}"))
        results = {}
        for label, kwargs in [
            ("perceptscore fp32 (exact)", {"precision": "fp32"}),
            ("perceptscore bf16 + fast decode", {"precision": "bf16", "fast_decode": True}),
        ]:
            scorer = Scorer(
                ["memorability"], {"memorability": str(checkpoint)}, device="cpu", batch_size=8, **kwargs
            )
            scorer.score([str(p) for p in paths[:2]])  # warm-up: worker start, first kernels
            start = time.perf_counter()
            df = scorer.score([str(photos)])
            seconds = time.perf_counter() - start
            results[label] = df["memorability"].to_numpy()
            ratio = (len(paths) / seconds) / base_rate
            rows.append(("end to end", label, f"{len(paths) / seconds:.3f}  ({ratio:.2f}x release)"))
        fp32, bf16 = results["perceptscore fp32 (exact)"], results["perceptscore bf16 + fast decode"]
        deviation = np.abs(fp32 - np.array(release_scores)).max()
        rows.append(("fidelity", "fp32 vs release's way, max |d|", f"{deviation:.2e}"))
        rho = spearmanr(fp32, bf16).statistic
        rows.append(
            (
                "fidelity",
                "bf16+fast vs fp32: max |d|, Spearman",
                f"{np.abs(bf16 - fp32).max():.2e}, {rho:.4f}",
            )
        )

        # (b) decode + preprocess of the 12 MP photos, one thread
        big = [p for p in paths if "_4000" in p.name]
        spec = task.preprocess

        def plain_pillow() -> None:
            for p in big:
                T.CenterCrop(224)(T.Resize(224)(Image.open(p).convert("RGB")))

        pillow_rate = rate(plain_pillow, len(big))
        rows.append(("decode 12 MP", "plain Pillow (decode + resize + crop)", f"{pillow_rate:.1f}"))
        for label, draft in [("ours, default", None), ("ours, --fast-decode", draft_side([spec]))]:
            ours = rate(lambda draft=draft: [prepare(decode(p, draft), spec) for p in big], len(big))
            rows.append(("decode 12 MP", label, f"{ours:.1f}  ({ours / pillow_rate:.2f}x Pillow)"))
        img = decode(big[0])
        exact = prepare(img, spec).astype(np.int16)
        fast = prepare(decode(big[0], draft_side([spec])), spec).astype(np.int16)
        rows.append(
            (
                "decode 12 MP",
                "fast-decode pixel deviation (mean, max)",
                f"{np.abs(exact - fast).mean():.2f}, {np.abs(exact - fast).max()}",
            )
        )

        # (c) model only, and the GEMM ceiling with the model's shapes
        for precision, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
            model = perceptscore.load_model("memorability", checkpoint=checkpoint, precision=precision)
            for batch in (1, 4, 8):
                x = torch.randn(batch, 3, 224, 224, dtype=dtype)
                with torch.inference_mode():
                    images_s = rate(lambda x=x, model=model: model(x), batch, repeats=2)
                ceiling = gemm_ceiling(dtype, batch)
                achieved = images_s * FLOP_PER_IMAGE / 1e9
                share = f"{achieved:.0f} of {ceiling:.0f} = {achieved / ceiling:.0%}"
                what = f"batch {batch}: images/s, GFLOP/s of ceiling"
                rows.append((f"model {precision}", what, f"{images_s:.3f}, {share}"))

    rows.append(("memory", "peak RSS", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"))
    width = max(len(r[1]) for r in rows)
    print(f"{'part':<14} {'what':<{width}} value (images/s unless said)")
    for part, what, value in rows:
        print(f"{part:<14} {what:<{width}} {value}")


if __name__ == "__main__":
    main()
