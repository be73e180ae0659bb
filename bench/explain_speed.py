"""Seconds per image of ``explain`` at full ViT-L/14 size, against scoring the same image in the same run.

    python bench/explain_speed.py [--device cpu|cuda] [--precision fp32|bf16|fp16] [--quality]

A random full-size PerceptModel (no download); one 1 MP photo. Baseline: the model's forward on the
image's crop(s), as scoring runs it. Then ``relevance`` (forward with attention kept + backward to the
attention maps) and ``attention-shift`` (two forwards, adapters on and off) for memorability's one centre
crop, and with ``--quality`` relevance over quality's 15 crops. Prints seconds and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from perceptscore.architecture import Architecture  # noqa: E402
from perceptscore.checkpoints import PRECISIONS  # noqa: E402
from perceptscore.explain import explain_image  # noqa: E402
from perceptscore.model import PerceptModel  # noqa: E402
from perceptscore.preprocess import normalize, prepare  # noqa: E402
from perceptscore.tasks import get_task  # noqa: E402

from photos import sample  # noqa: E402


def timed(fn, repeat: int = 2) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS))
    parser.add_argument("--quality", action="store_true", help="also quality's 15 crops (slow on a CPU)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), PRECISIONS[args.precision]
    torch.manual_seed(0)
    unmerged = PerceptModel(Architecture()).to(device, dtype).eval()
    merged = PerceptModel(Architecture()).to(device, dtype).eval()
    merged.load_state_dict(unmerged.state_dict())
    merged.merge()
    image = sample("coffee.png").resize((1200, 800))
    print(f"ViT-L/14, {args.device}, {args.precision}, torch threads {torch.get_num_threads()}")
    tasks = [("memorability", 1)] + ([("quality", 15)] if args.quality else [])
    for name, crops in tasks:
        task = get_task(name)
        x = normalize(torch.from_numpy(prepare(image, task.preprocess)).to(device), task.architecture.mean,
                      task.architecture.std, dtype)  # fmt: skip

        def score(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                merged(x)

        base = timed(score)
        print(f"{name} ({crops} crop{'s' if crops > 1 else ''}): score forward {base:.2f} s")
        for method, model in (("relevance", merged), ("attention-shift", unmerged)):
            if method == "attention-shift" and crops > 1:
                continue

            def run(method: str = method, model: PerceptModel = model, task=task) -> None:  # type: ignore[no-untyped-def]
                explain_image(model, task, image, method, batch_size=4)

            seconds = timed(run, repeat=1)
            print(f"  explain {method}: {seconds:.2f} s per image ({seconds / base:.1f}x scoring it)")


if __name__ == "__main__":
    main()
