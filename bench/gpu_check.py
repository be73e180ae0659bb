"""GPU readiness check: one script for a lent CUDA device (issue 25). Prints each result as it comes.

    python bench/gpu_check.py [--images 4096] [--workers N]     # on the device (about 2-3 min on an H100)
    python bench/gpu_check.py --dry-run                         # every step on CPU, tiny tower, seconds
    PERCEPTSCORE_GPU_CHECK_DRY_RUN=1 python bench/gpu_check.py  # the same

Steps, in order, each printing lines ``[step] ...`` (a step that fails prints ``[step] FAILED <error>`` in
one line and the next step runs; the last line counts them; exit code 1 if any failed):
- device: GPU name, memory, compute capability, CUDA and torch versions, the package's path and version.
- setup: a random model of the full ViT-L/14 size (built from the task's architecture: no download) saved
  per task in our split format (one shared base), and 1 MP photo-like JPEGs: a few distinct ones made in
  parallel, linked to ``--images`` names (decoding each costs what it would; making 4,096 took minutes).
- precision: the emotion model's raw outputs on the device in fp32, fp16 and bf16 against the CPU in fp32,
  on 64 images with strong structure (stripes, checkerboards, gradients, smooth colour fields). A random
  head gives every image nearly the same output (differences ~1e-5, below fp16's rounding of the output),
  so Spearman would measure rounding. The head's last layer is refit on the CPU's own fp32 activations
  before it: its 8 outputs are 8 random directions in the space of those 256 activations (centred over
  the images), each scaled to mean 0 and standard deviation 1. Every output then spreads as widely as the
  tower lets it, and differences are in units of that spread. Limits (LIMITS below): max |difference|,
  Spearman's rho of each output (the smallest is shown), and how often the argmax (the emotion label)
  agrees.
- model-only: images/s and TFLOP/s of the merged model at batch 64, 128 and 256 in fp16 and bf16 (best of
  5 timed runs after 2 warm-ups; FLOP counted from the architecture, ~162 GFLOP per image at full size).
- decode-only: the local engine's own decode workers (the default count on this device) with a stand-in
  model that costs nothing: images/s exact, with --fast-decode, and with --decode gpu (the workers read,
  the scoring process decodes each batch with nvJPEG on the device: also its own CPU ms per image, what
  one process spends to feed the GPU), and ms per image per worker.
- cli-defaults, cli-three-tasks, cli-fast-decode, cli-decode-gpu, cli-three-tasks-decode-gpu,
  cli-processes-2, cli-explain: ``perceptscore`` itself (``python -m perceptscore``) on the JPEGs: rows,
  errors, the run's own seconds (weights loading included), rows/s, and the wall time of the command.
  cli-decode-gpu also shows how far its memorability moved from cli-defaults' (same images, same model:
  nvJPEG and the float resize against Pillow; no limit, a figure to record). ``--processes 2`` runs only
  where 2 GPUs are visible.
- device-index: ``--device cuda:<count>`` must be a one-line error (exit 2); ``--processes <count + 1>``
  is shown as it ends (the line a wrong count gives).
- trainer: an fp16 training step whose micro-batches were all unreadable (the GradScaler crash), and what
  ``--precision auto`` trains in on this GPU next to ``torch.cuda.is_bf16_supported()``.

Imports only the installed package (``pip install -e .`` or a wheel), never the source tree by path, and
needs no network: see bench/README.md for the wheels to carry and the device command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

TASKS = {"memorability": "mem", "quality": "iqa", "emotion": "emotion"}
BATCHES = (64, 128, 256)
DRY_BATCHES = (2, 4, 8)  # the dry run's: the same code, no minute of CPU time
# Per precision: (max |difference| in units of the outputs' spread, smallest Spearman rho, argmax agreement).
# fp32 allows TF32 (cuDNN's default for the patch convolution); fp16 keeps 11 bits, bf16 8. The full-size
# tower in bf16 on a CPU gave 0.098 / 0.9957 / 96% (24 images; fp16 should be ~8x closer).
LIMITS = {"fp32": (0.02, 0.999, 0.98), "fp16": (0.10, 0.995, 0.90), "bf16": (0.30, 0.98, 0.85)}
DRY_ENV = "PERCEPTSCORE_GPU_CHECK_DRY_RUN"


def say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


@dataclass
class Check:
    dry: bool
    images: int
    workers: int | None
    folder: Path
    device: str = "cuda"
    gpus: int = 0
    checkpoints: dict[str, Path] = field(default_factory=dict)
    photos: Path | None = None
    failed: list[str] = field(default_factory=list)

    def needs_setup(self) -> None:
        if not self.checkpoints or self.photos is None:
            raise RuntimeError("setup did not finish: no checkpoints or photos to use")


# ---- device and setup ------------------------------------------------------------------------------------


def step_device(c: Check) -> None:
    import torch

    import perceptscore

    say("device", f"perceptscore {perceptscore.__version__} from {Path(perceptscore.__file__).parent}")
    say("device", f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}")
    c.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(c.gpus):
        p = torch.cuda.get_device_properties(i)
        say("device", f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
                      f"{p.multi_processor_count} SMs")  # fmt: skip
    cores = len(os.sched_getaffinity(0))
    say("device", f"{c.gpus} GPU(s) visible, {cores} cores usable; checking on {c.device}")
    if not c.dry and c.gpus == 0:
        raise RuntimeError("no CUDA device visible to torch (use --dry-run to check on the CPU)")


def architecture(dry: bool, outputs: int) -> Any:
    """The release's ViT-L/14, or a 2-layer 64-wide tower for the dry run."""
    from perceptscore.tasks import get_task

    arch = replace(get_task("memorability").architecture, outputs=outputs)
    if dry:
        arch = replace(arch, width=64, layers=2, heads=1, embed_dim=48, head_dims=(32, 16))
    return arch


def step_setup(c: Check) -> None:
    start = time.perf_counter()
    c.checkpoints = make_checkpoints(c.dry, c.folder / "weights")
    sizes = sum(p.stat().st_size for p in (c.folder / "weights").iterdir())
    kind = "tiny" if c.dry else "ViT-L/14"
    took = time.perf_counter() - start
    say("setup", f"random {kind} checkpoints for {', '.join(c.checkpoints)} ({sizes / 2**20:.0f} MiB, one "
                 f"shared base) in {took:.1f} s")  # fmt: skip
    start = time.perf_counter()
    c.photos = make_photos(c.folder / "photos", c.images, distinct=4 if c.dry else 32)
    size = np.mean([p.stat().st_size for p in (c.photos.parent / "src").iterdir()])
    say(
        "setup",
        f"{c.images} JPEGs of 1100x800 ({size / 1024:.0f} KiB each) in {time.perf_counter() - start:.1f} s",
    )


def make_checkpoints(dry: bool, folder: Path) -> dict[str, Path]:
    """One random tower (with non-zero LoRA adapters, so merging matters), one head per task."""
    import torch

    from perceptscore.checkpoints import save_converted
    from perceptscore.model import PerceptHead, PerceptModel
    from perceptscore.tasks import get_task

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = PerceptModel(architecture(dry, 1)).eval()
    paths = {}
    for seed, name in enumerate(TASKS, start=1):
        task = get_task(name)
        torch.manual_seed(seed)
        model.arch = architecture(dry, task.outputs)
        a = model.arch
        model.head = PerceptHead(a.embed_dim, a.head_dims, a.outputs, a.head_dropout).eval()
        for key, value in model.named_parameters():
            if ".lora_B" in key:
                torch.nn.init.normal_(value, std=0.02)
        paths[name] = save_converted(
            model, task, folder / f"{name}.safetensors", "random", "0" * 64, split=True
        )
    return paths


def _photo(args: tuple[int, Path]) -> None:
    """Photo-like content (smooth colour fields plus grain): JPEG decoding costs what it does on photos."""
    from PIL import Image

    seed, path = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((1100, 800), 3)
    grain = rng.normal(0, 6, (800, 1100, 3)).astype(np.float32)
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_photos(folder: Path, count: int, distinct: int) -> Path:
    """``distinct`` JPEGs made in parallel, then linked (copied where links fail) to ``count`` names: each
    file is read and decoded in full, as a distinct one would be, and the page cache holds them all alike."""
    (folder / "src").mkdir(parents=True)
    sources = [folder / "src" / f"{i:03d}.jpg" for i in range(distinct)]
    with ProcessPoolExecutor(min(distinct, len(os.sched_getaffinity(0)))) as pool:
        list(pool.map(_photo, enumerate(sources)))
    images = folder / "images"
    images.mkdir()
    for i in range(count):
        try:
            os.link(sources[i % distinct], images / f"{i:06d}.jpg")
        except OSError:
            shutil.copyfile(sources[i % distinct], images / f"{i:06d}.jpg")
    return images


# ---- precision -------------------------------------------------------------------------------------------


def structured_images(n: int, size: int = 224) -> np.ndarray:
    """uint8 (n, 3, size, size): stripes at many frequencies and angles, checkerboards, gradients and
    smooth colour fields, each with its own colours: content that moves a tower's features far apart."""
    from PIL import Image

    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        kind, freq, angle = i % 4, rng.uniform(1, 24), rng.uniform(0, np.pi)
        u = x * np.cos(angle) + y * np.sin(angle)
        if kind == 0:
            pattern = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u)
        elif kind == 1:
            pattern = ((np.floor(x * freq) + np.floor(y * freq)) % 2).astype(np.float32)
        elif kind == 2:
            pattern = u / max(float(u.max()), 1e-6)
        else:
            coarse = rng.random((4, 4)).astype(np.float32)
            pattern = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        rgb = low[:, None, None] + (high - low)[:, None, None] * np.clip(pattern, 0, 1)[None]
        out[i] = np.clip(rgb, 0, 255).astype(np.uint8)
    return out


def _batched(model: Any, x: Any, device: str, dtype: Any, batch: int = 16) -> np.ndarray:
    import torch

    with torch.inference_mode():
        chunks = [model(chunk.to(device, dtype)).float().cpu() for chunk in x.split(batch)]
    return torch.cat(chunks).double().numpy()


def spread_head(c: Check, x: Any) -> tuple[Path, np.ndarray]:
    """Refit the emotion head's last layer on the CPU fp32 activations it reads (see the module's
    docstring); returns the refit checkpoint and the CPU reference outputs (n, 8), computed in float64."""
    import torch

    from perceptscore.checkpoints import load_model, save_converted
    from perceptscore.tasks import get_task

    seen: list[torch.Tensor] = []
    cpu = load_model("emotion", c.checkpoints["emotion"], device="cpu", precision="fp32")
    hook = cpu.head.fc3.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    _batched(cpu, x, "cpu", torch.float32)
    hook.remove()
    h = torch.cat(seen).double().numpy()
    mean = h.mean(axis=0)
    # random directions, not principal components: each carries the activations' whole spread, where the
    # last of 8 components can be so narrow that scaling it to unit spread scales up rounding as well
    directions = np.random.default_rng(0).standard_normal((cpu.head.fc3.out_features, h.shape[1]))
    scale = ((h - mean) @ directions.T).std(axis=0)
    scale[scale == 0] = 1.0
    weight = directions / scale[:, None]
    bias = -(mean @ weight.T)
    model = load_model("emotion", c.checkpoints["emotion"], device="cpu", precision="fp32", merge=False)
    model.head.fc3.weight.data = torch.from_numpy(weight).float()
    model.head.fc3.bias.data = torch.from_numpy(bias).float()
    path = c.checkpoints["emotion"].with_name("emotion-spread.safetensors")
    save_converted(model, get_task("emotion"), path, "random, head refit for spread", "0" * 64, split=True)
    return path, h @ weight.T + bias


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort().astype(np.float64), b.argsort().argsort().astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def step_precision(c: Check) -> None:
    import torch

    from perceptscore.checkpoints import load_model
    from perceptscore.preprocess import normalize
    from perceptscore.tasks import get_task

    c.needs_setup()
    n = 16 if c.dry else 64
    arch = get_task("emotion").architecture
    x = normalize(torch.from_numpy(structured_images(n)), arch.mean, arch.std)
    start = time.perf_counter()
    path, reference = spread_head(c, x)
    took, std = time.perf_counter() - start, reference.std(axis=0)
    say("precision", f"CPU fp32 reference on {n} structured images in {took:.1f} s; outputs' std "
                     f"{std.min():.3f}-{std.max():.3f}")  # fmt: skip
    if c.device.startswith("cuda"):
        say("precision", f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN "
                         f"{torch.backends.cudnn.allow_tf32}")  # fmt: skip
    labels = reference.argmax(axis=1)
    bad = []
    for precision, (max_diff, min_rho, min_agree) in LIMITS.items():
        model = load_model("emotion", path, device=c.device, precision=precision)
        dtype = next(model.parameters()).dtype
        out = _batched(model, x, c.device, dtype)
        del model
        diff = float(np.abs(out - reference).max())
        rho = min(spearman(out[:, j], reference[:, j]) for j in range(reference.shape[1]))
        agree = float((out.argmax(axis=1) == labels).mean())
        ok = diff <= max_diff and rho >= min_rho and agree >= min_agree
        bad += [] if ok else [precision]
        say("precision", f"{c.device} {precision}: max |diff| {diff:.4f} (limit {max_diff}), Spearman min "
                         f"{rho:.5f} (limit {min_rho}), argmax {agree:.1%} (limit {min_agree:.0%}) "
                         f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
    if bad:
        raise RuntimeError(f"outside the limits: {', '.join(bad)}")


# ---- speed: model only, decode only ----------------------------------------------------------------------


def flop_per_image(arch: Any) -> float:
    """Forward FLOP of the vision tower (multiply-adds x 2): patch embedding, per layer the q/k/v, output
    and MLP matrices (12 d^2 a token) and attention's two T x T products, the class token's projection."""
    tokens = (arch.image_size // arch.patch_size) ** 2 + 1
    d = arch.width
    mlp = int(d * arch.mlp_ratio)
    per_layer = 2 * tokens * (4 * d * d + 2 * d * mlp) + 2 * 2 * tokens * tokens * d
    patch = 2 * (tokens - 1) * 3 * arch.patch_size**2 * d
    return float(arch.layers * per_layer + patch + 2 * d * arch.embed_dim)


def timed(fn: Callable[[], Any], sync: Callable[[], None], warm: int = 2, repeats: int = 5) -> float:
    """Best seconds of ``repeats`` runs after ``warm`` runs (kernel choice, allocator)."""
    for _ in range(warm):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def step_model_only(c: Check) -> None:
    import torch

    from perceptscore.checkpoints import PRECISIONS, load_model

    c.needs_setup()
    cuda = c.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for precision in ("fp16", "bf16"):
        model = load_model(
            "memorability", c.checkpoints["memorability"], device=c.device, precision=precision
        )
        flop = flop_per_image(model.arch)
        for batch in DRY_BATCHES if c.dry else BATCHES:
            x = torch.randn(batch, 3, 224, 224, device=c.device, dtype=PRECISIONS[precision])
            with torch.inference_mode():
                seconds = timed(lambda x=x, m=model: m(x), sync, *((1, 1) if c.dry else (2, 5)))
            rate = batch / seconds
            memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
            say("model-only", f"{precision} batch {batch}: {rate:,.0f} images/s = "
                              f"{rate * flop / 1e12:.1f} TFLOP/s{memory}")  # fmt: skip
        del model
        if cuda:
            torch.cuda.empty_cache()


def step_decode_only(c: Check) -> None:
    from perceptscore.plan import default_workers

    c.needs_setup()
    assert c.photos is not None
    workers = c.workers if c.workers is not None else default_workers("cpu" if c.dry else "cuda")
    paths = sorted(str(p) for p in c.photos.iterdir())
    for how in ("exact", "--fast-decode", "--decode gpu"):
        rows, seconds, cpu = decode_only_run(c, paths, workers, how)
        per_worker = 1000 * seconds * max(workers, 1) / rows
        own = f"; scoring process {1000 * cpu / rows:.2f} CPU ms per image" if how == "--decode gpu" else ""
        say("decode-only", f"{how}: {rows / seconds:,.0f} images/s on {workers} workers ({per_worker:.1f} ms "
                           f"per image per worker, workers' start included{own})")  # fmt: skip


def decode_only_run(c: Check, paths: list[str], workers: int, how: str) -> tuple[int, float, float]:
    """Rows, seconds and this process's CPU seconds of the local engine on ``paths`` with a stand-in model
    that costs nothing. --decode gpu decodes on the check's device (here: CPU in a dry run)."""
    import torch

    from perceptscore.engines.local import LocalEngine
    from perceptscore.items import Item
    from perceptscore.locators import locate
    from perceptscore.plan import ScoringPlan
    from perceptscore.predict import Predictor
    from perceptscore.tasks import get_task

    task = get_task("memorability")
    gpu = how == "--decode gpu"
    device = c.device if gpu else "cpu"

    def nothing(x: torch.Tensor) -> torch.Tensor:  # the model's place, at no cost: decoding alone is timed
        return torch.zeros(len(x), task.outputs, device=x.device)

    plan = ScoringPlan((task.name,), (), device, "fp32", 64, workers, fast_decode=how == "--fast-decode",
                       decode="gpu" if gpu else "cpu")  # fmt: skip
    predictor = Predictor([task], {task.name: nothing}, torch.device(device), torch.float32, 64)
    engine = LocalEngine(lambda _: predictor)
    start, cpu = time.perf_counter(), time.process_time()
    rows = sum(b.num_rows for b in engine.run(plan, [Item(i, locate(p)) for i, p in enumerate(paths)]))
    return rows, time.perf_counter() - start, time.process_time() - cpu


# ---- the CLI ---------------------------------------------------------------------------------------------


def cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the device reaches no network: never wait on one
    return subprocess.run([sys.executable, "-m", "perceptscore", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def last_line(text: str) -> str:
    """The last line with words in it (a usage error's box drawn by Rich ends in its border)."""
    lines = [line.strip("│╭╮╰╯─ ") for line in text.strip().splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else "(nothing)"


def score_run(c: Check, step: str, tasks: list[str], count: int, *extra: str) -> None:
    """``perceptscore score`` on the first ``count`` JPEGs; its JSON summary and provenance read back."""
    import pyarrow.parquet as pq

    c.needs_setup()
    assert c.photos is not None
    listing = c.folder / f"{step}.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(c.photos.iterdir())[:count]))
    out = c.folder / f"{step}.parquet"
    weights = [a for t in tasks for a in ("--checkpoint", f"{t}={c.checkpoints[t]}")]
    device = ["--device", "cpu"] if c.dry else []
    args = ["score", f"@{listing}", "-t", ",".join(TASKS[t] for t in tasks), *weights, *device, *extra]
    start = time.perf_counter()
    done = cli([*args, "-o", str(out), "--json", "-q"])
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {last_line(done.stderr)}")
    about = json.loads(last_line(done.stdout))
    meta = json.loads(pq.read_schema(out).metadata[b"perceptscore"])
    run_s = float(meta.get("seconds", about["seconds"]))
    ok = about["scored"] == count and about["errors"] == 0
    say(step, f"{about['scored']} rows, {about['errors']} errors on {meta['device']} {meta['precision']}: "
              f"{about['scored'] / run_s:,.0f} rows/s over the run's {run_s:.1f} s (weights loading "
              f"included); command {wall:.1f} s {'PASS' if ok else 'FAIL'}")  # fmt: skip
    if not ok:
        raise RuntimeError(f"expected {count} rows scored without errors")


def step_cli_defaults(c: Check) -> None:
    score_run(c, "cli-defaults", ["memorability"], c.images)


def step_cli_three_tasks(c: Check) -> None:
    score_run(c, "cli-three-tasks", list(TASKS), max(1, c.images // 4))  # quality: 15 crops an image


def step_cli_fast_decode(c: Check) -> None:
    score_run(c, "cli-fast-decode", ["memorability"], c.images, "--fast-decode")


def step_cli_decode_gpu(c: Check) -> None:
    import pandas as pd

    score_run(c, "cli-decode-gpu", ["memorability"], c.images, "--decode", "gpu")
    defaults = c.folder / "cli-defaults.parquet"
    if not defaults.exists():
        say("cli-decode-gpu", "no comparison: cli-defaults did not run")
        return
    pillow = pd.read_parquet(defaults, columns=["path", "memorability"])
    device = pd.read_parquet(c.folder / "cli-decode-gpu.parquet", columns=["path", "memorability"])
    if pillow["path"].tolist() != device["path"].tolist():
        raise RuntimeError("--decode gpu gave other rows than the defaults")
    diff = (pillow["memorability"] - device["memorability"]).abs()
    say("cli-decode-gpu", f"memorability against cli-defaults' (Pillow in the workers): max |diff| "
                          f"{diff.max():.2e}, mean {diff.mean():.2e}")  # fmt: skip


def step_cli_three_tasks_decode_gpu(c: Check) -> None:
    score_run(c, "cli-three-tasks-decode-gpu", list(TASKS), max(1, c.images // 4), "--decode", "gpu")


def step_cli_processes(c: Check) -> None:
    if c.gpus < 2:  # the dry run too: two CPU processes are test_reliability's (and cost it a minute)
        say("cli-processes-2", f"skipped: {c.gpus} GPU(s) visible, --processes 2 needs 2")
        return
    score_run(c, "cli-processes-2", ["memorability"], c.images, "--processes", "2")


def step_cli_explain(c: Check) -> None:
    c.needs_setup()
    assert c.photos is not None
    photos = sorted(c.photos.iterdir())[:4]
    out = c.folder / "maps"
    device = ["--device", "cpu"] if c.dry else []
    start = time.perf_counter()
    done = cli(["explain", *map(str, photos), "-t", "mem", "--checkpoint", str(c.checkpoints["memorability"]),
                *device, "-o", str(out)])  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {last_line(done.stderr)}")
    maps = sorted(out.rglob("*.png"))
    say("cli-explain", f"{len(maps)} heatmaps for {len(photos)} images in {wall:.1f} s (command) "
                       f"{'PASS' if len(maps) == len(photos) else 'FAIL'}")  # fmt: skip
    if len(maps) != len(photos):
        raise RuntimeError(f"expected {len(photos)} heatmaps, found {len(maps)}")


# ---- defects only a GPU shows ----------------------------------------------------------------------------


def step_device_index(c: Check) -> None:
    c.needs_setup()
    assert c.photos is not None
    photo = str(sorted(c.photos.iterdir())[0])
    base = ["score", photo, "-t", "mem", "--checkpoint", str(c.checkpoints["memorability"]), "-o", "-"]
    done = cli([*base, "--device", f"cuda:{c.gpus}"])
    lines = done.stderr.strip().splitlines()
    ok = done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: cuda:{c.gpus}: ")
    say("device-index", f"--device cuda:{c.gpus}: exit {done.returncode}, {len(lines)} stderr line(s): "
                        f"{last_line(done.stderr)} {'PASS' if ok else 'FAIL'}")  # fmt: skip
    if c.gpus:
        too_many_processes(c)
    else:
        say("device-index", "--processes past the GPU count: skipped, no GPU")
    if not ok:
        raise RuntimeError("a CUDA index past the GPUs must be a one-line error with exit code 2")


def too_many_processes(c: Check) -> None:
    """More processes than GPUs: how it ends today (the process engine's check, not a part of this package
    that gpu_check owns). Enough rows that the last process is dealt a block (4 batches of 64 at CUDA's
    default batch size)."""
    assert c.photos is not None
    out, listing = c.folder / "too-many.parquet", c.folder / "too-many.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(c.photos.iterdir())[: 256 * (c.gpus + 1) + 1]))
    weights = str(c.checkpoints["memorability"])
    try:
        more = cli(["score", f"@{listing}", "-t", "mem", "--checkpoint", weights, "--processes",
                    str(c.gpus + 1), "-o", str(out)], timeout=90)  # fmt: skip
    except subprocess.TimeoutExpired:
        more = subprocess.CompletedProcess([], -1, "", "still running after 90 s (a hang): stopped")
    count = len(more.stderr.strip().splitlines())
    say("device-index", f"--processes {c.gpus + 1} on {c.gpus} GPU(s): exit {more.returncode}, "
                        f"{count} stderr line(s): {last_line(more.stderr)}")  # fmt: skip


def step_trainer(c: Check) -> None:
    import torch
    from rich.console import Console

    from perceptscore.tasks import get_task
    from perceptscore.trainer import datasets
    from perceptscore.trainer.data import TrainBatch
    from perceptscore.trainer.loop import Device, Settings, Stage, StageRun, TrainNet
    from perceptscore.trainer.run import auto_precision

    if c.gpus:
        capability = torch.cuda.get_device_capability(0)
        say("trainer", f"capability {capability[0]}.{capability[1]}: --precision auto trains in "
                       f"{auto_precision(True, capability)}; torch.cuda.is_bf16_supported() = "
                       f"{torch.cuda.is_bf16_supported()}")  # fmt: skip
    arch = architecture(True, 1)
    net = TrainNet(arch, ["set"]).to(c.device)
    data = datasets.LabelledSet("set", "memorability", {"train": [datasets.Example("x", 0.0)]})
    stage = Stage("s", 1, [data], Settings("mse", 1e-3, 4, 1, 0.01, 0.0, 0, accumulate=2))
    dev = Device(torch.device(c.device), "fp16", 0, 4)
    runner = StageRun(stage, net, get_task("memorability"), c.folder / "train", dev, Console(quiet=True))
    empty = TrainBatch(0, torch.zeros(0, 3, 224, 224, dtype=torch.uint8), torch.zeros(0), ["x: unreadable"])
    before = {k: v.detach().clone() for k, v in net.trainable().items()}
    loss, seen, _ = runner.train_step(iter([empty, empty]), total=4)
    pixels = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    loss2, seen2, _ = runner.train_step(iter([empty, TrainBatch(0, pixels, torch.rand(4), [])]), total=4)
    moved = any(not torch.equal(v, before[k]) for k, v in net.trainable().items())
    ok = seen == 0 and np.isnan(loss) and seen2 == 4 and np.isfinite(loss2) and moved
    say("trainer", f"fp16 on {c.device}, GradScaler {'on' if runner.scaler.is_enabled() else 'off'}: a step "
                   f"of unreadable micro-batches skipped, the next trained (loss {loss2:.4f}) "
                   f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
    if not ok:
        raise RuntimeError("the fp16 step after a skipped one did not train")


# ---- running the steps -----------------------------------------------------------------------------------

STEPS: list[tuple[str, Callable[[Check], None]]] = [
    ("device", step_device),
    ("setup", step_setup),
    ("precision", step_precision),
    ("model-only", step_model_only),
    ("decode-only", step_decode_only),
    ("cli-defaults", step_cli_defaults),
    ("cli-three-tasks", step_cli_three_tasks),
    ("cli-fast-decode", step_cli_fast_decode),
    ("cli-decode-gpu", step_cli_decode_gpu),
    ("cli-three-tasks-decode-gpu", step_cli_three_tasks_decode_gpu),
    ("cli-processes-2", step_cli_processes),
    ("cli-explain", step_cli_explain),
    ("device-index", step_device_index),
    ("trainer", step_trainer),
]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def run_steps(c: Check, only: set[str] | None) -> None:
    for name, step in STEPS:
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            step(c)
        except Exception as exc:  # the next step still runs: one failure must not hide the rest
            c.failed.append(name)
            say(name, f"FAILED {one_line(exc)}")
            if os.environ.get("PERCEPTSCORE_GPU_CHECK_TRACEBACK"):
                traceback.print_exc()
        say(name, f"done in {time.perf_counter() - start:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help=f"every step on CPU, tiny tower (or {DRY_ENV}=1)"
    )
    parser.add_argument("--images", type=int, default=None, help="JPEGs for the speed steps (4096; dry: 8)")
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: the CLI's)")
    parser.add_argument("--steps", default="", help="comma-separated step names to run (default: all)")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    opts = parser.parse_args()
    dry = opts.dry_run or os.environ.get(DRY_ENV) == "1"
    images = opts.images or (8 if dry else 4096)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folder = opts.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        c = Check(dry, images, opts.workers, folder, device="cpu" if dry else "cuda")
        only = {s for s in opts.steps.split(",") if s} or None
        if only:  # the device is always shown; setup is made when a step uses its files
            only |= {"device"} | ({"setup"} if only - {"device", "trainer"} else set())
        run_steps(c, only)
    ran = len(only) if only else len(STEPS)
    failed = f": {', '.join(c.failed)}" if c.failed else ""
    say("summary", f"{ran} steps, {len(c.failed)} failed{failed}; {time.perf_counter() - started:.0f} s"
                   f"{' (dry run on CPU)' if dry else ''}")  # fmt: skip
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
