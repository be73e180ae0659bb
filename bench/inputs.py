"""Input paths against each other: the same JPEGs scored as loose local files, as webdataset tar shards, and
over HTTP from a server that adds 50 ms to every request, all in one run with one model.

    python bench/inputs.py [--images 1000] [--repeats 3] [--workers W] [--batch-size 8] [--latency-ms 50]
                           [--model minimal|tiny] [--threads 1] [--plain-server]

Builds ``--images`` 480x360 JPEGs (quality 85, crops of scikit-image's bundled photos, as the tests'
``many_photos``), then writes the very same bytes three ways:

1. a folder of loose files (the baseline);
2. tar shards in img2dataset's layout (``key.jpg`` + ``key.txt`` + ``key.json``, 100 samples a shard),
   scored as ``shards/{00000..0000N}.tar``. Goal >= 1.0x loose: one sequential read per shard;
3. the files behind ``tests/servers.py``'s ``FaultyHTTPServer`` with ``latency_s`` per request (in a
   process of its own; ``--plain-server``: see ``serve``), named by a CSV manifest of URLs (URLs named
   on the command line are each checked with a HEAD while the inputs are listed, one after another).
   Goal >= 0.8x loose: the prefetch's concurrency hides the latency.

The model is a random checkpoint in the release's layout, as small as the loader takes (``--model
minimal``: 1 layer, width 64; ``tiny``: the tests' 2 layers, width 128), so that decoding and I/O, what
differs between the three, take most of the time. It runs on ``--threads 1``: on 2 shared cores, the model
on one core and the decode worker on the other is steadier than two torch threads, one of which waits for
the core the decode worker holds. The three are run interleaved (loose, tar, http, loose, ...) after one
warm-up of each (worker start-up, first kernels, page cache); each timed run is one ``Scorer.score`` call,
listing included. Reported: the median seconds, and the median of each repeat's ratio to its own loose
run (on a shared machine the load changes between repeats more than within one). Rows, errors and scores
(in order) must agree across the three: exit status 1 if they do not. A missed goal is reported, not an
error.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.server
import io
import json
import multiprocessing as mp
import os
import shutil
import socketserver
import statistics
import sys
import tarfile
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pandas as pd
import torch

# The photos, the release-layout checkpoint and the HTTP server are the tests' own helpers.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from perceptscore import remote  # noqa: E402
from perceptscore.scorer import Scorer  # noqa: E402

from photos import sample  # noqa: E402
from release_reference import TINY, make_release_checkpoint  # noqa: E402
from servers import FaultyHTTPServer  # noqa: E402

PER_SHARD = 100
# release_reference's TINY made smaller: one head of 64 (the loader's default, width // 64), one layer.
MINIMAL = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 1}
MODELS = {"minimal": MINIMAL, "tiny": TINY}
GOALS = {"loose local files": None, "tar shards": 1.0, "HTTP manifest": 0.8}


def photo_bytes(count: int) -> list[bytes]:
    """``count`` distinct 480x360 JPEGs (random crops of three photos), encoded once: every path reads
    exactly these bytes."""
    sources = [sample(n).resize((1200, 900)) for n in ("coffee.png", "astronaut.png", "chelsea.png")]
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        x, y = (int(v) for v in rng.integers(0, 700, size=2))
        buffer = io.BytesIO()
        sources[i % 3].crop((x, min(y, 540), x + 480, min(y, 540) + 360)).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def write_loose(folder: Path, photos: list[bytes]) -> None:
    folder.mkdir()
    for i, data in enumerate(photos):
        (folder / f"{i:05d}.jpg").write_bytes(data)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    archive.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, photos: list[bytes]) -> str:
    """img2dataset's layout; returns the brace list naming every shard."""
    folder.mkdir()
    count = 0
    for number, start in enumerate(range(0, len(photos), PER_SHARD)):
        with tarfile.open(folder / f"{number:05d}.tar", "w") as archive:
            for offset, data in enumerate(photos[start : start + PER_SHARD]):
                key = f"{number:05d}{offset:04d}"
                _add(archive, f"{key}.jpg", data)
                _add(archive, f"{key}.txt", f"photo {start + offset}".encode())
                _add(archive, f"{key}.json", json.dumps({"key": key, "index": start + offset}).encode())
        count += 1
    last = count - 1
    return str(folder / (f"{{00000..{last:05d}}}.tar" if last else "00000.tar"))


def serve(files: dict[str, bytes], latency_s: float, plain: bool, conn: Connection) -> None:
    """The HTTP server, in a process of its own: a remote store is not in the scorer's process, and its
    handler threads must not take the scorer's GIL (they still share the machine's cores).

    Unless ``plain``, two defaults of Python's ``http.server`` that no object store has are changed here, in
    this process only, so that the added latency is the only delay a request meets: Nagle's algorithm
    (headers and body are two writes, so a body under one segment waits for the client's delayed ACK, ~40
    ms: every GET took ~2x the latency) and a listen backlog of 5 (32 connections opened at once overflow
    it: dropped SYNs are sent again after 1 s).
    """
    if not plain:
        http.server.BaseHTTPRequestHandler.disable_nagle_algorithm = True  # TCP_NODELAY on every connection
        socketserver.TCPServer.request_queue_size = 128
    with FaultyHTTPServer(files, latency_s=latency_s) as server:
        conn.send(server.endpoint)
        while (command := conn.recv()) != "stop":
            if command == "requests":
                conn.send(server.requests.snapshot())


def timed(scorer: Scorer, inputs: list[str], fields: tuple[str, ...]) -> tuple[float, pd.DataFrame]:
    start = time.perf_counter()
    frame = scorer.score(inputs, tar_fields=fields)
    return time.perf_counter() - start, frame


def order_key(path: str) -> int:
    """The photo's index from any of the three spellings of its path (its key or file name)."""
    name = path.removeprefix("tar://").split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".jpg")
    # a tar key is shard number (5 digits) + offset (4 digits); a file name is the index itself
    return int(name[:5]) * PER_SHARD + int(name[5:]) if len(name) == 9 else int(name)


def check(name: str, frame: pd.DataFrame, reference: pd.DataFrame | None, count: int) -> list[str]:
    """What is wrong with one run's rows: count, error rows, order, and scores against the reference."""
    problems = []
    if len(frame) != count:
        problems.append(f"{name}: {len(frame)} rows, expected {count}")
    errors = frame["error"].dropna()
    if len(errors):
        problems.append(f"{name}: {len(errors)} error rows, first: {errors.iloc[0]!r}")
    order = [order_key(p) for p in frame["path"]]
    if order != list(range(count)):
        problems.append(f"{name}: rows out of input order")
    if reference is not None and len(frame) == len(reference):
        diff = float(np.abs(frame["memorability"].to_numpy() - reference["memorability"].to_numpy()).max())
        if not diff <= 1e-5:
            problems.append(f"{name}: scores differ from loose files by up to {diff:.2e}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 1000: each run lasts seconds, long against its start-up (a worker, a thread pool, the first fetches)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: the CLI's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", choices=tuple(MODELS), default="minimal")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the model")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the HTTP server's delay per request")
    parser.add_argument("--plain-server", action="store_true",
                        help="keep http.server's Nagle and listen backlog of 5 (see serve)")  # fmt: skip
    opts = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-inputs-"))
    try:
        run(opts, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(opts: argparse.Namespace, work: Path) -> None:
    photos = photo_bytes(opts.images)
    write_loose(work / "photos", photos)
    shard_list = write_shards(work / "shards", photos)
    checkpoint = work / "mem.pth"
    make_release_checkpoint(checkpoint, 1, MODELS[opts.model], seed=0)
    torch.set_num_threads(opts.threads)
    files = {f"/photos/{i:05d}.jpg": data for i, data in enumerate(photos)}

    # spawn: the server's process starts clean, not as a fork of one that has torch's threads
    parent, child = mp.get_context("spawn").Pipe()
    # daemon: a failure here must not leave the interpreter waiting on a server that waits for "stop"
    server = mp.get_context("spawn").Process(
        target=serve, args=(files, opts.latency_ms / 1000, opts.plain_server, child), daemon=True
    )
    server.start()
    child.close()  # the server's end: if the server dies, recv() ends with EOFError instead of waiting
    try:
        endpoint = parent.recv()
        manifest = work / "urls.csv"
        with manifest.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path"])
            writer.writerows([f"{endpoint}{p}"] for p in files)
        configs: dict[str, tuple[list[str], tuple[str, ...]]] = {
            "loose local files": ([str(work / "photos")], ()),
            # txt and json pass through as img2dataset users ask for them: part of reading a shard
            "tar shards": ([shard_list], ("txt", "json")),
            "HTTP manifest": ([str(manifest)], ()),
        }
        scorer = Scorer(["memorability"], {"memorability": str(checkpoint)}, device="cpu",
                        workers=opts.workers, batch_size=opts.batch_size)  # fmt: skip

        problems: list[str] = []
        reference: pd.DataFrame | None = None
        for name, (inputs, fields) in configs.items():  # warm-up: workers, first kernels, page cache
            _, frame = timed(scorer, inputs, fields)
            problems += check(f"{name} (warm-up)", frame, reference, opts.images)
            reference = frame if reference is None else reference
        parent.send("requests")
        warm_requests = parent.recv()

        seconds: dict[str, list[float]] = {name: [] for name in configs}
        for repeat in range(opts.repeats):
            for name, (inputs, fields) in configs.items():
                took, frame = timed(scorer, inputs, fields)
                seconds[name].append(took)
                problems += check(f"{name} (repeat {repeat + 1})", frame, reference, opts.images)
        parent.send("requests")
        all_requests = parent.recv()
    finally:
        with contextlib.suppress(OSError):  # BrokenPipeError: the server has died already
            parent.send("stop")
        server.join(timeout=10)
        if server.is_alive():
            server.kill()

    n = opts.images
    cores = len(os.sched_getaffinity(0))
    print(f"{n} JPEGs 480x360 q85 ({sum(map(len, photos)) / n / 1024:.0f} KiB mean), {n // PER_SHARD} shards "
          f"of {PER_SHARD}; HTTP latency {opts.latency_ms:.0f} ms a request; {cores} cores (os.cpu_count "
          f"{os.cpu_count()}), torch threads {torch.get_num_threads()}")  # fmt: skip
    size = MODELS[opts.model]
    print(f"model: {opts.model} random checkpoint in the release's layout ({size['num_hidden_layers']} "
          f"layer(s), width {size['hidden_size']}), {scorer.precision}, "
          f"batch {scorer.plan.batch_size}, {scorer.plan.workers} decode worker(s); remote concurrency "
          f"{remote.concurrency()}")  # fmt: skip
    server_kind = "plain http.server" if opts.plain_server else "http.server with TCP_NODELAY, backlog 128"
    print(f"HTTP server: tests/servers.py FaultyHTTPServer ({server_kind}) in its own process")
    print(
        f"{opts.repeats} interleaved repeats after a warm-up of each; seconds: the median; ratio: the "
        "median of each repeat's ratio to that repeat's loose files run (they share that moment's load)"
    )
    print()
    print("| configuration | seconds | images/s | vs loose files | ratios, min-max | goal | met |")
    print("|---|---|---|---|---|---|---|")
    loose = seconds["loose local files"]
    for name, goal in GOALS.items():
        s = statistics.median(seconds[name])
        ratios = [base / took for base, took in zip(loose, seconds[name], strict=True)]
        ratio = statistics.median(ratios)
        verdict = "baseline" if goal is None else ("met" if ratio >= goal else "**not met**")
        target = "" if goal is None else f">= {goal:.1f}x"
        print(f"| {name} | {s:.2f} | {n / s:.1f} | {ratio:.2f}x | {min(ratios):.2f}-{max(ratios):.2f} "
              f"| {target} | {verdict} |")  # fmt: skip
    print()
    for name, runs in seconds.items():
        print(f"{name}: " + ", ".join(f"{s:.2f}" for s in runs) + " s")
    timed_requests = {k: v - warm_requests.get(k, 0) for k, v in all_requests.items()}
    by_method: dict[str, int] = {}
    for (method, _), count in timed_requests.items():
        by_method[method] = by_method.get(method, 0) + count
    per_image = ", ".join(f"{m} {c / (n * opts.repeats):.2f}" for m, c in sorted(by_method.items()))
    trips = sum(by_method.values()) / (n * opts.repeats)
    line = f"HTTP requests per image: {per_image}"
    if opts.latency_ms > 0:
        bound = remote.concurrency() / (trips * opts.latency_ms / 1000)
        line += (f"; latency alone bounds the HTTP path at {remote.concurrency()} in flight / ({trips:.0f} x "
                 f"{opts.latency_ms:.0f} ms) = {bound:.0f} images/s")  # fmt: skip
    print(line)
    if problems:
        print("\nCORRECTNESS FAILED:\n" + "\n".join(problems))
        raise SystemExit(1)
    print("correctness: same rows, no errors, same scores (<= 1e-5) in the same order in every run")


if __name__ == "__main__":
    main()
