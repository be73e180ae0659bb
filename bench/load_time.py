"""Load time and fidelity of converted checkpoints against the release .pth, at full ViT-L/14 size.

    python bench/load_time.py [--repeats 5]

Builds a random checkpoint in the release's exact layout (transformers + peft, as tests/release_reference.py
does), converts it (fp32, fp16, split base + adapters), then for each file times ``load_model`` (median of
--repeats, warm page cache, the baseline measured in the same run) and compares raw outputs on random
images with the .pth's. Needs the dev extra (transformers, peft) and ~8 GB of memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import perceptscore  # noqa: E402
from perceptscore.checkpoints import save_converted  # noqa: E402
from perceptscore.hub import file_sha256  # noqa: E402
from perceptscore.tasks import get_task  # noqa: E402

from release_reference import FULL_SIZE, make_release_checkpoint  # noqa: E402


def timed_load(path: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        perceptscore.load_model("quality", checkpoint=path)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    task = get_task("quality")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pth = folder / "perceptCLIP_IQA.pth"
        make_release_checkpoint(pth, 1, size=FULL_SIZE, seed=5)
        model = perceptscore.load_model("quality", checkpoint=pth, merge=False)
        sha = file_sha256(pth)
        files = {"release .pth (baseline)": pth}
        for precision in ("fp32", "fp16"):
            out = folder / f"quality-{precision}.safetensors"
            save_converted(model, task, out, "bench", sha, precision=precision)
            files[f"ours {precision}"] = out
        split = folder / "cache" / "quality.safetensors"
        split.parent.mkdir()
        save_converted(model, task, split, "bench", sha, split=True)
        files["ours fp32, split base"] = split
        del model

        x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = perceptscore.load_model("quality", checkpoint=pth)(x)
        baseline = timed_load(pth, args.repeats)
        print(f"{'file':<26} {'MB on disk':>10} {'load s':>8} {'vs .pth':>8} {'max |d raw|':>12} {'rel':>9}")
        for name, path in files.items():
            parts = path.parent.glob("*.safetensors") if "split" in name else [path]
            size = sum(p.stat().st_size for p in parts)
            seconds = baseline if path == pth else timed_load(path, args.repeats)
            with torch.no_grad():
                diff = (perceptscore.load_model("quality", checkpoint=path)(x) - reference).abs().max().item()
            rel = diff / reference.abs().max().item()
            speed = baseline / seconds
            print(f"{name:<26} {size / 1e6:>10.0f} {seconds:>8.3f} {speed:>7.2f}x {diff:>12.2e} {rel:>9.2e}")


if __name__ == "__main__":
    main()
