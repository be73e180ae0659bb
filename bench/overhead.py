"""Per-row cost outside the model (issue 23, item 7): the scoring process's CPU per row that is not the
model's forward, for loose files, tar members, parquet bytes and HTTP; and end-to-end rows/s against a
plain ``multiprocessing.Pool`` Pillow decode of the same files with the same worker count.

    python bench/overhead.py [--images 600] [--repeats 3] [--workers W] [--batch-size 8]
                             [--model minimal|tiny] [--threads 1]

Builds ``--images`` distinct 640x480 JPEGs (quality 85, crops of scikit-image's bundled photos, as the
tests' photos), then holds the very same bytes four ways:

1. a folder of loose files;
2. webdataset tar shards (``bench/inputs.py``'s img2dataset layout, 100 samples a shard, images only read);
3. a parquet file written by the ``datasets`` library (an ``Image`` feature: bytes and file name);
4. a CSV manifest of URLs served on 127.0.0.1 by ``tests/servers.py``'s ``FaultyHTTPServer`` with no added
   latency, in a process of its own (TCP_NODELAY, listen backlog 128, as ``bench/inputs.py`` serves).

Each timed run is one ``Scorer.score`` call (listing, decode workers' start, assembly of the DataFrame
included). Around it the script reads ``getrusage(RUSAGE_SELF)``: the scoring process's CPU, every thread
of it. The model's forward is wrapped (``Predictor.models``) to add up its own thread's CPU time
(``time.thread_time``); with ``--threads 1`` torch runs the forward in that thread, so the difference is the
scoring process's CPU outside the forward: reading, batching, normalisation, the prefetch, row assembly.
The decode workers are child processes: their CPU is ``RUSAGE_CHILDREN`` gained over the run (they are
joined at its end). The HTTP server's CPU is read in its own process.

The baseline is a plain ``multiprocessing.Pool(workers)`` whose workers open each loose file with Pillow,
convert it to RGB, resize the short side to 224 (bilinear, the filter memorability's preprocessing uses)
and center-crop 224, and send the uint8 crop back, ``--batch-size`` files a chunk; pool start included.
The model is a random release-layout checkpoint as small as the loader takes (``--model minimal``: 1
layer, width 64): its forward is small next to decoding (~1.2 ms a row on 1 thread: 257 tokens still go
through patch embedding, attention and MLP), and it is timed and subtracted. The normalisation of the
uint8 crops (the Predictor's ``preprocess.Normalizer``, ``Predictor.normalizers``) is timed the same way and
shown apart: on CUDA it runs on the device, not in the scoring process.

Every configuration runs once as a warm-up, then ``--repeats`` interleaved rounds; figures are medians,
and each ratio is the median of each round's ratio to that round's Pool run (they share that moment's
load). Goals (issue 23): <= 0.25 ms of scoring-process CPU per row outside the forward, and >= 0.9x the
Pool's rows/s. A missed goal is reported, not an error; wrong rows exit with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.server
import io
import multiprocessing as mp
import os
import resource
import shutil
import socketserver
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

# The photos, the release-layout checkpoint, the HTTP server and the shard writer are the tests' and the
# input bench's own helpers.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from inputs import MODELS, write_shards  # noqa: E402

from perceptscore.scorer import Scorer  # noqa: E402

from photos import sample  # noqa: E402
from release_reference import make_release_checkpoint  # noqa: E402
from servers import FaultyHTTPServer  # noqa: E402

SIDE = 224
POOL = "plain Pool decode"
KINDS = ("loose files", "tar members", "parquet bytes", "HTTP")
GOAL_MS, GOAL_RATIO = 0.25, 0.9


def photo_bytes(count: int) -> list[bytes]:
    """``count`` distinct 640x480 JPEGs (random crops of three photos), encoded once: every input kind
    holds exactly these bytes."""
    sources = [sample(n).resize((1200, 900)) for n in ("coffee.png", "astronaut.png", "chelsea.png")]
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        x, y = (int(v) for v in rng.integers(0, (560, 420)))
        buffer = io.BytesIO()
        sources[i % 3].crop((x, y, x + 640, y + 480)).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def write_parquet(path: Path, photos: list[bytes]) -> None:
    """The photos as ``datasets`` publishes them: an ``Image`` feature of bytes and the file's name."""
    import datasets  # the dev extra: imported here so that a failure names the one input that needs it

    datasets.disable_progress_bars()  # no bar in the bench's output
    features = datasets.Features({"image": datasets.Image()})
    rows = [{"bytes": data, "path": f"{i:05d}.jpg"} for i, data in enumerate(photos)]
    datasets.Dataset.from_dict({"image": rows}, features=features).to_parquet(str(path))


def serve(files: dict[str, bytes], conn: Connection) -> None:
    """The HTTP server in a process of its own (a remote store's CPU is not the scorer's); answers "cpu"
    with its own CPU seconds so far. Nagle off and a backlog of 128, as bench/inputs.py explains."""
    http.server.BaseHTTPRequestHandler.disable_nagle_algorithm = True
    socketserver.TCPServer.request_queue_size = 128
    with FaultyHTTPServer(files) as server:
        conn.send(server.endpoint)
        while (command := conn.recv()) != "stop":
            if command == "cpu":
                conn.send(cpu_seconds(resource.RUSAGE_SELF))


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class Timed:
    """A callable that adds up the CPU time of its calls in the calling thread. With 1 torch thread,
    torch runs a forward (or an elementwise op) in that thread, so this is all of its CPU."""

    def __init__(self, call: Callable[..., torch.Tensor]) -> None:
        self.call, self.cpu = call, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.thread_time()
        out = self.call(*args, **kwargs)
        self.cpu += time.thread_time() - start
        return out


@dataclass
class Probes:
    """The scorer's timed parts: its model's forward and its normalisation of the crops."""

    forward: Timed
    normalize: Timed

    @classmethod
    def installed(cls, scorer: Scorer, task: str) -> Probes:
        predictor = scorer.predictor
        probes = cls(Timed(predictor.models[task]), Timed(predictor.normalizers[task]))
        predictor.models[task] = probes.forward
        predictor.normalizers[task] = probes.normalize  # type: ignore[assignment]: called alike
        return probes


def pool_decode(path: str) -> np.ndarray:
    """The baseline's whole work per file: open, RGB, short side to 224 (bilinear, as the engine), center
    crop 224."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    scale = SIDE / min(w, h)
    rgb = rgb.resize((max(SIDE, round(w * scale)), max(SIDE, round(h * scale))), Image.Resampling.BILINEAR)
    left, top = (rgb.width - SIDE) // 2, (rgb.height - SIDE) // 2
    return np.asarray(rgb.crop((left, top, left + SIDE, top + SIDE)))


@dataclass
class Run:
    wall: float
    scorer_cpu: float  # the scoring process, all threads (for the Pool: its parent)
    forward_cpu: float
    normalize_cpu: float  # uint8 crops -> normalised float, in the scoring process (on CUDA: on the device)
    children_cpu: float  # decode workers (joined during the run)


def run_pool(paths: list[str], workers: int, chunk: int) -> Run:
    self0, child0 = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with mp.Pool(workers) as pool:
        crops = sum(1 for _ in pool.imap(pool_decode, paths, chunksize=chunk))
        pool.close()
        pool.join()  # joined: the workers' CPU is in RUSAGE_CHILDREN
    wall = time.perf_counter() - start
    assert crops == len(paths)
    self1, child1 = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    return Run(wall, self1 - self0, 0.0, 0.0, child1 - child0)


def run_scorer(scorer: Scorer, probes: Probes, inputs: list[str]) -> tuple[Run, pd.DataFrame]:
    self0, child0 = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    fwd0, norm0 = probes.forward.cpu, probes.normalize.cpu
    start = time.perf_counter()
    frame = scorer.score(inputs)
    wall = time.perf_counter() - start
    self1, child1 = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    took = Run(wall, self1 - self0, probes.forward.cpu - fwd0, probes.normalize.cpu - norm0, child1 - child0)
    return took, frame


def check(name: str, frame: pd.DataFrame, reference: pd.DataFrame | None, count: int) -> list[str]:
    """What is wrong with one run's rows: count, error rows, and scores (in order) against loose files."""
    problems = []
    if len(frame) != count:
        return [f"{name}: {len(frame)} rows, expected {count}"]
    errors = frame["error"].dropna()
    if len(errors):
        problems.append(f"{name}: {len(errors)} error rows, first: {errors.iloc[0]!r}")
    if reference is not None:
        diff = float(np.abs(frame["memorability"].to_numpy() - reference["memorability"].to_numpy()).max())
        if not diff <= 1e-5:  # also catches rows out of input order: the photos score differently
            problems.append(f"{name}: scores differ from loose files by up to {diff:.2e}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: the CLI's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", choices=tuple(MODELS), default="minimal")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the forward's CPU is only counted whole at 1")  # fmt: skip
    opts = parser.parse_args()
    warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes (release_reference)
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        run(opts, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_inputs(work: Path, photos: list[bytes], endpoint: str) -> dict[str, list[str]]:
    """The same bytes as the four input kinds; what ``Scorer.score`` is given for each."""
    (work / "photos").mkdir()
    for i, data in enumerate(photos):
        (work / "photos" / f"{i:05d}.jpg").write_bytes(data)
    shard_list = write_shards(work / "shards", photos)
    write_parquet(work / "photos.parquet", photos)
    manifest = work / "urls.csv"
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows([["path"], *([f"{endpoint}/photos/{i:05d}.jpg"] for i in range(len(photos)))])
    return {
        "loose files": [str(work / "photos")],
        "tar members": [shard_list],
        "parquet bytes": [str(work / "photos.parquet")],
        "HTTP": [str(manifest)],
    }


def run(opts: argparse.Namespace, work: Path) -> None:
    photos = photo_bytes(opts.images)
    checkpoint = work / "mem.pth"
    make_release_checkpoint(checkpoint, 1, MODELS[opts.model], seed=0)
    torch.set_num_threads(opts.threads)
    files = {f"/photos/{i:05d}.jpg": data for i, data in enumerate(photos)}
    # spawn: the server's process starts clean, not as a fork of one that has torch's threads
    parent, child = mp.get_context("spawn").Pipe()
    server = mp.get_context("spawn").Process(target=serve, args=(files, child), daemon=True)
    server.start()
    child.close()  # if the server dies, recv() ends with EOFError instead of waiting
    try:
        inputs = build_inputs(work, photos, parent.recv())
        scorer = Scorer(["memorability"], {"memorability": str(checkpoint)}, device="cpu",
                        workers=opts.workers, batch_size=opts.batch_size)  # fmt: skip
        probes = Probes.installed(scorer, "memorability")
        paths = sorted(str(p) for p in (work / "photos").iterdir())
        runs, server_cpu, problems = measure(opts, scorer, probes, inputs, paths, parent)
    finally:
        with contextlib.suppress(OSError):  # BrokenPipeError: the server has died already
            parent.send("stop")
        server.join(timeout=10)
        if server.is_alive():
            server.kill()
    report(opts, scorer, photos, runs, server_cpu)
    if problems:
        print("\nCORRECTNESS FAILED:\n" + "\n".join(problems))
        raise SystemExit(1)
    print("correctness: every run gave every row, no errors, the loose files' scores (<= 1e-5) in order")


def measure(
    opts: argparse.Namespace,
    scorer: Scorer,
    probes: Probes,
    inputs: dict[str, list[str]],
    paths: list[str],
    server: Connection,
) -> tuple[dict[str, list[Run]], float, list[str]]:
    """One warm-up of each configuration, then ``repeats`` interleaved rounds: the Pool, then each kind.
    Returns the timed runs per configuration, the HTTP server's CPU over the timed HTTP runs, problems."""
    workers, n = scorer.plan.workers, len(paths)
    problems: list[str] = []
    reference: pd.DataFrame | None = None
    run_pool(paths, max(workers, 1), opts.batch_size)  # warm-up: page cache, first imports in workers
    for name, given in inputs.items():
        _, frame = run_scorer(scorer, probes, given)
        problems += check(f"{name} (warm-up)", frame, reference, n)
        reference = frame if reference is None else reference
    runs: dict[str, list[Run]] = {name: [] for name in (POOL, *KINDS)}
    server_cpu = 0.0
    for repeat in range(opts.repeats):
        runs[POOL].append(run_pool(paths, max(workers, 1), opts.batch_size))
        for name, given in inputs.items():
            if name == "HTTP":
                server.send("cpu")
                before = server.recv()
            took, frame = run_scorer(scorer, probes, given)
            if name == "HTTP":
                server.send("cpu")
                server_cpu += server.recv() - before
            runs[name].append(took)
            problems += check(f"{name} (repeat {repeat + 1})", frame, reference, n)
    return runs, server_cpu, problems


def ms(values: list[float], n: int) -> str:
    return f"{statistics.median(values) * 1000 / n:.3f}"


def report(
    opts: argparse.Namespace, scorer: Scorer, photos: list[bytes], runs: dict[str, list[Run]], server: float
) -> None:
    n, workers = len(photos), scorer.plan.workers
    size = MODELS[opts.model]
    print(f"{n} JPEGs 640x480 q85 ({sum(map(len, photos)) / n / 1024:.0f} KiB mean); "
          f"{len(os.sched_getaffinity(0))} cores; torch.get_num_threads() = {torch.get_num_threads()}; "
          f"decode workers {workers} (Pool: {max(workers, 1)}); batch {scorer.plan.batch_size}; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"model: {opts.model} random release-layout checkpoint ({size['num_hidden_layers']} layer(s), "
          f"width {size['hidden_size']}), {scorer.precision}; {opts.repeats} interleaved rounds after a "
          f"warm-up; medians; ratios: median of each round's ratio to its Pool run")  # fmt: skip
    print()
    print("| input | scoring process CPU ms/row outside forward | of it normalisation | the rest | forward "
          "ms/row | decode workers CPU ms/row | rows/s | vs Pool | <= 0.25 ms | >= 0.9x |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, taken in runs.items():
        print(row(name, taken, runs[POOL], n))
    print()
    print(
        f"HTTP server CPU (its own process, not in the table): "
        f"{server * 1000 / (n * opts.repeats):.3f} ms/row"
    )
    for name, taken in runs.items():
        print(f"{name}: " + ", ".join(f"{r.wall:.2f}" for r in taken) + " s")


def row(name: str, taken: list[Run], pool: list[Run], n: int) -> str:
    """One table row: CPU figures per row are medians over the rounds; the ratio is the median of each
    round's ratio to that round's Pool run."""
    rate = n / statistics.median(r.wall for r in taken)
    workers = ms([r.children_cpu for r in taken], n)
    if name == POOL:
        parent = ms([r.scorer_cpu for r in taken], n)
        return (
            f"| {name} (baseline) | ({parent}: the parent) | - | - | - | {workers} | {rate:.1f} | 1.00x | | |"
        )
    outside = statistics.median(r.scorer_cpu - r.forward_cpu for r in taken) * 1000 / n
    rest = ms([r.scorer_cpu - r.forward_cpu - r.normalize_cpu for r in taken], n)
    ratios = [p.wall / r.wall for p, r in zip(pool, taken, strict=True)]
    ratio = statistics.median(ratios)
    return (f"| {name} | {outside:.3f} | {ms([r.normalize_cpu for r in taken], n)} | {rest} | "
            f"{ms([r.forward_cpu for r in taken], n)} | {workers} | {rate:.1f} | {ratio:.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {verdict(outside <= GOAL_MS)} | "
            f"{verdict(ratio >= GOAL_RATIO)} |")  # fmt: skip


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


if __name__ == "__main__":
    main()
