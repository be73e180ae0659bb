"""Decode + preprocess per worker: exact Pillow, draft Pillow (``--fast-decode``) and ``tv_decode``
(torchvision ``decode_jpeg`` + tensor resize) on the same 1 MP JPEGs, and what that means for 2,500 img/s.

    python bench/decode.py [--task memorability] [--images 8] [--seconds 2] [--rounds 3]
                           [--device cuda] [--batch 128] [--dry-run]

--images distinct ~1 MP photos (1152x864, quality 90, from scikit-image's samples; synthetic ones where
scikit-image is missing, as on the lent GPU machines: the output says which) are written once to a
temporary folder; each variant runs in its own process (one thread: ``torch.set_num_threads(1)`` and
OMP_NUM_THREADS=1, as one decode worker), reads the files into memory, warms up on one pass, then decodes
and prepares them round and round for --seconds. Rounds are interleaved (exact, draft, tv, exact, ...) and
each variant's figure is its median over rounds; ratios are against exact Pillow of the same run. The
figures are CPU time (``time.process_time``) per image: on a shared machine wall time also counts waits
for a core (the table shows it beside). File reading is not timed (bytes are in memory): it is the same
for every variant.

Then "images/s on N cores" = N * 1000 / CPU ms: a PROJECTION that assumes decoding scales linearly with cores
and that nothing else (reading, the model's process, the IPC of crops) takes CPU; the real local engine
reached ~1,050 / ~1,650 img/s (exact / draft) on 16 cores where this projects higher.

--engine N also runs the real local engine (N decode workers, a stand-in model that costs nothing) over
--images x 8 files with ``--decode cpu`` and ``--decode gpu`` (the workers read, the scoring process decodes
each batch with tv_decode on --device, the CPU by default): images/s, and the scoring process's own CPU ms
per image (``time.process_time``: its threads, not the workers'). On the CPU that is the decode moved into
the scoring process, by design; on a GPU it is what one process spends to feed nvJPEG.

--device cuda also times ``tv_decode.decode_batch`` on the GPU (batched nvJPEG + resize on the GPU), in
batches of --batch, in this process: wall ms per image (synchronised) and the scoring process's own CPU
ms per image (what one process must spend to feed the GPU). --dry-run: two images, tiny durations, every
variant in this process; with --device cuda on a machine without CUDA the device variant runs on the CPU
(so the code path imports and runs anywhere, e.g. in the tests). Runs from a bare source tree too (no
install: the registry is read from weights/registry.json). About 1 minute; on a GPU machine:

    python bench/decode.py --device cuda --task memorability,quality
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import perceptscore  # noqa: F401 - installed (pip install -e . or a wheel)
except ModuleNotFoundError:  # a bare source tree (the lent GPU machines): its modules, from here
    sys.path.insert(0, str(ROOT))

GOAL = 2500  # images/s, issue 25
SIZE = (1152, 864)  # ~1 MP (995,328 pixels), 4:3 like most camera photos
SAMPLES = (
    "coffee.png",
    "astronaut.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
)
VARIANTS = ("exact", "draft", "tv")
LABELS = {
    "exact": "Pillow exact (default)",
    "draft": "Pillow draft (--fast-decode)",
    "tv": "tv_decode on CPU (libjpeg-turbo)",
}


def make_images(folder: Path, count: int) -> list[Path]:
    """``count`` distinct 1 MP JPEGs: scikit-image's samples resized (and mirrored past the first round),
    or, where scikit-image is missing (the lent GPU machines), synthetic ones."""
    from PIL import Image, ImageOps

    paths = []
    for i in range(count):
        img = sample(SAMPLES[i % len(SAMPLES)], i)
        if (i // len(SAMPLES)) % 2:
            img = ImageOps.mirror(img)
        paths.append(folder / f"{i:03d}.jpg")
        img.resize(SIZE, Image.Resampling.BICUBIC).save(paths[-1], quality=90)
    return paths


def sample(name: str, seed: int):
    from PIL import Image

    try:
        from importlib import resources

        with resources.files("skimage.data").joinpath(name).open("rb") as f:
            return Image.open(f).convert("RGB")
    except ModuleNotFoundError:
        return synthetic(seed)


def has_samples() -> bool:
    try:
        import skimage.data  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def synthetic(seed: int):
    """A photo-like stand-in: smooth colour fields (upsampled noise), hard-edged shapes, grain. Real
    photos usually carry more detail, so they decode somewhat slower: the output says which were used."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (27, 36, 3), dtype=np.uint8)).resize(
        SIZE, Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(base)
    for _ in range(40):
        x, y = int(rng.integers(0, SIZE[0])), int(rng.integers(0, SIZE[1]))
        w, h = (int(v) for v in rng.integers(10, 200, size=2))
        draw.ellipse((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    grain = rng.normal(0, 8, (SIZE[1], SIZE[0], 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def specs_of(tasks: str) -> list:
    """The tasks' preprocessings, from the installed package's registry or, run from a source tree that
    is not installed (a lent GPU machine), from weights/registry.json beside this folder."""
    from perceptscore.tasks import Preprocess, get_task

    try:
        return list(dict.fromkeys(get_task(t.strip()).preprocess for t in tasks.split(",")))
    except ModuleNotFoundError:  # perceptscore.weights exists only once the package is installed
        registry = json.loads((ROOT / "weights" / "registry.json").read_text(encoding="utf-8"))["tasks"]
        named = {a: d for n, d in registry.items() for a in (n, *d["aliases"])}
        return list(
            dict.fromkeys(Preprocess.from_dict(named[t.strip()]["preprocess"]) for t in tasks.split(","))
        )


def step(variant: str, specs: list, device: str, batch: int, data: list[bytes]) -> Callable[[], None]:
    """A function that decodes and prepares ``data`` (files' bytes) as ``variant`` does."""
    from perceptscore import tv_decode
    from perceptscore.images import decode, draft_side
    from perceptscore.preprocess import prepare

    if variant in ("exact", "draft"):
        draft = draft_side(specs) if variant == "draft" else None

        def pillow() -> None:
            for d in data:
                img = decode(io.BytesIO(d), draft)
                for s in specs:
                    prepare(img, s)

        return pillow

    # On a GPU the decode workers would hash the bytes for quality's crops (see tv_decode.crop_seed): not
    # the scoring process's work. On the CPU the worker does all of it, so it is timed.
    on_gpu = device.startswith("cuda")
    seeds = [tv_decode.crop_seed(d) for d in data] if on_gpu else None

    def tv() -> None:
        for start in range(0, len(data), batch):
            chunk = slice(start, start + batch)
            done = tv_decode.decode_batch(data[chunk], specs, device, seeds=seeds and seeds[chunk])
            tv_decode.stack(done, specs)
        if on_gpu:
            import torch

            torch.cuda.synchronize()

    return tv


def time_variant(variant: str, paths: Sequence[Path], specs: list, seconds: float, device: str, batch: int):
    """(wall ms, CPU ms) per image of ``variant``, after one warm-up pass."""
    data = [p.read_bytes() for p in paths]
    if device.startswith("cuda"):
        data = (data * math.ceil(batch / len(data)))[:batch]  # whole batches, as the scoring process gets
    run = step(variant, specs, device, batch, data)
    run()  # warm-up: first-call costs (nvJPEG handles, kernel selection, page faults)
    done, wall, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        run()
        done += len(data)
        if time.perf_counter() - wall >= seconds:
            break
    return (time.perf_counter() - wall) * 1000 / done, (time.process_time() - cpu) * 1000 / done


def worker_main(args: argparse.Namespace) -> None:
    """One variant in this process, one thread: prints its (wall, CPU) ms per image as JSON."""
    import torch

    torch.set_num_threads(1)
    paths = sorted(Path(args.folder).glob("*.jpg"))
    wall, cpu = time_variant(args.worker, paths, specs_of(args.task), args.seconds, "cpu", args.batch)
    print(json.dumps({"wall": wall, "cpu": cpu}))


def in_subprocess(variant: str, folder: Path, args: argparse.Namespace) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", variant, "--folder", str(folder), "--task", args.task]
    cmd += ["--seconds", str(args.seconds), "--batch", str(args.cpu_batch)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return got["cpu"], got["wall"]


def measure_cpu(folder: Path, paths: list[Path], args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Per CPU variant: median (CPU ms, wall ms) per image over interleaved rounds."""
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            if args.dry_run:
                wall, cpu = time_variant(v, paths, specs_of(args.task), args.seconds, "cpu", args.cpu_batch)
            else:
                cpu, wall = in_subprocess(v, folder, args)
            times[v].append((cpu, wall))
            print(f"  round {r + 1}: {v:<5} {cpu:7.2f} CPU ms/image ({wall:.2f} wall)", flush=True)
    return {
        v: (statistics.median(c for c, _ in t), statistics.median(w for _, w in t)) for v, t in times.items()
    }


def print_table(ms: dict[str, tuple[float, float]], cores: Sequence[int]) -> None:
    """Figures from CPU time: on a shared machine wall time also counts the waits for a core."""
    exact = ms["exact"][0]
    head = (
        "| variant (one process, one thread) | CPU ms/image | speed vs exact | images/s per core | wall ms |"
    )
    print("\n" + head)
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        cpu, wall = ms[v]
        print(f"| {LABELS[v]} | {cpu:.2f} | {exact / cpu:.2f}x | {1000 / cpu:.0f} | {wall:.2f} |")
    print("\nPROJECTION (N * 1000 / CPU ms: linear scaling, nothing else on the cores; not measured):")
    print("| variant | " + " | ".join(f"{n} cores" for n in cores) + f" | cores for {GOAL:,} img/s |")
    print("|---|" + "---|" * (len(cores) + 1))
    for v in VARIANTS:
        cells = " | ".join(f"{n * 1000 / ms[v][0]:,.0f}" for n in cores)
        print(f"| {LABELS[v]} | {cells} | {math.ceil(GOAL * ms[v][0] / 1000)} |")


def measure_device(paths: list[Path], args: argparse.Namespace) -> None:
    """tv_decode on the GPU (or, in a dry run without CUDA, on the CPU) in batches of --batch."""
    import torch

    device = args.device
    if not torch.cuda.is_available():
        if not args.dry_run:
            sys.exit(f"error: --device {device}: no CUDA device here (torch {torch.__version__})")
        print(f"\n(dry run: no CUDA here, the {device} variant runs on the cpu)")
        device = "cpu"
    wall, cpu = time_variant("tv", paths, specs_of(args.task), args.seconds, device, args.batch)
    print(f"\n| tv_decode on {device} (batch {args.batch}) | value |")
    print("|---|---|")
    print(f"| wall ms/image (synchronised) | {wall:.3f} |")
    print(f"| images/s, one process | {1000 / wall:,.0f} |")
    print(f"| scoring process CPU ms/image (all its threads) | {cpu:.3f} |")
    print(f"| images/s that CPU share allows one process | {1000 / max(cpu, 1e-9):,.0f} |")
    goal = "reaches" if 1000 / wall >= GOAL else "does not reach"
    print(f"\nOn its own, tv_decode on {device} {goal} {GOAL:,} img/s (before a model shares the device).")


def measure_engine(folder: Path, paths: list[Path], args: argparse.Namespace) -> None:
    """The local engine with each decode setting: images/s, the scoring process's CPU ms per image."""
    import torch

    from perceptscore.engines.local import LocalEngine
    from perceptscore.items import Item
    from perceptscore.locators import locate
    from perceptscore.plan import ScoringPlan
    from perceptscore.predict import Predictor
    from perceptscore.tasks import get_task

    device = args.device or "cpu"
    files = [str(folder / f"engine-{i:04d}.jpg") for i in range(len(paths) * 8)]
    for i, name in enumerate(files):
        os.link(paths[i % len(paths)], name)
    tasks = [get_task(t.strip()) for t in args.task.split(",")]

    def nothing(outputs: int):  # the model's place, at no cost: decoding alone is timed
        return lambda x: torch.zeros(len(x), outputs, device=x.device)

    batch = 4 if args.dry_run else 64
    print(f"\n| local engine, {args.engine} workers, batch {batch}, {len(files)} files | images/s | scoring "
          "process CPU ms/image |")  # fmt: skip
    print("|---|---|---|")
    for decode in ("cpu", "gpu"):
        on = device if decode == "gpu" else "cpu"
        plan = ScoringPlan(tuple(t.name for t in tasks), (), on, "fp32", batch, args.engine, decode=decode)
        models = {t.name: nothing(t.outputs) for t in tasks}
        predictor = Predictor(tasks, models, torch.device(on), torch.float32, batch)
        items = [Item(i, locate(f)) for i, f in enumerate(files)]
        wall, cpu = time.perf_counter(), time.process_time()
        rows = sum(b.num_rows for b in LocalEngine(lambda _, p=predictor: p).run(plan, items))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"| --decode {decode} (on {on}) | {rows / wall:,.0f} | {1000 * cpu / rows:.2f} |")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="memorability", help="task(s), comma-separated: their preprocessing")
    p.add_argument("--images", type=int, default=8, help="distinct 1 MP JPEGs (reused round and round)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default=None, help="also time tv_decode on this device (cuda, cuda:1)")
    p.add_argument("--batch", type=int, default=128, help="files per decode_batch call on the device")
    p.add_argument("--cpu-batch", type=int, default=16, help="files per decode_batch call on the CPU")
    p.add_argument("--cores", default="8,16,32", help="core counts for the projection")
    p.add_argument(
        "--engine", type=int, default=None, metavar="N", help="also run the local engine, N workers"
    )
    p.add_argument("--dry-run", action="store_true", help="2 images, tiny durations, in this process")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.images, args.seconds, args.rounds, args.batch = 2, 0.01, 1, 4
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        worker_main(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        paths = make_images(Path(tmp), args.images)
        kind = "scikit-image samples" if has_samples() else "SYNTHETIC: scikit-image is not installed"
        print(f"{len(paths)} JPEGs {SIZE[0]}x{SIZE[1]} (~1 MP, {kind}), task(s) {args.task}")
        print("per-worker timings:")
        ms = measure_cpu(Path(tmp), paths, args)
        print_table(ms, [int(n) for n in args.cores.split(",")])
        if args.device and args.device != "cpu":
            measure_device(paths, args)
        if args.engine is not None:
            measure_engine(Path(tmp), paths, args)


if __name__ == "__main__":
    main()
