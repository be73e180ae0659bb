"""The Ray engine's overhead on one machine: the same images through ``score`` with the local engine and
with ``--engine ray``, every run in this process's session, as a user runs them (the CLI, from the start of
the command to the output file).

    python bench/ray_engine.py [--images 96] [--size full] [--precision bf16]

Runs, on a photo set of 1200x900 JPEGs and a random checkpoint in the release's layout (``--size full`` is
ViT-L/14; ``tiny`` shows the per-file overhead alone):

1. local engine (the baseline);
2. ``--engine ray --ray-address`` a cluster started beforehand (Ray's steady-state cost);
3. ``--engine ray`` with no address: a local Ray started and stopped by the run (what a laptop user pays);

and prints wall seconds, images/s, each run's ratio to the local engine, the cluster's start-up time, and
the largest score difference between the engines. The goal: Ray >= 0.8x local on one machine.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from photos import sample  # noqa: E402
from release_reference import FULL_SIZE, TINY, make_release_checkpoint  # noqa: E402

SCRIPTS = Path(sysconfig.get_path("scripts"))


def photo_set(folder: Path, count: int) -> None:
    bases = [sample(n) for n in ("coffee.png", "astronaut.png", "chelsea.png", "rocket.jpg")]
    for i in range(count):
        base = bases[i % len(bases)]
        crop = base.crop((i % 7, i % 5, base.width - i % 3, base.height - i % 4))
        crop.resize((1200, 900), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)


@dataclass
class Timing:
    wall: float  # the command, start to end
    first_rows: float  # until the first rows were written (start-up: Ray, workers, weights)
    steady: float  # images/s from the first rows to the last


def timed_score(args: list[str], out: Path, env: dict[str, str]) -> Timing:
    """Run ``score``; its progress line after every batch (PERCEPTSCORE_LOG_EVERY=0) is timed here."""
    command = [str(SCRIPTS / "perceptscore"), *args, "-o", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env={**env, "PERCEPTSCORE_LOG_EVERY": "0"}, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    seen: list[tuple[float, int]] = []
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if match := re.match(r"scoring: (\d+)", line):
            seen.append((time.perf_counter() - start, int(match.group(1))))
    if proc.wait() != 0:
        raise SystemExit(f"score failed ({proc.returncode}): {''.join(lines)[-2000:]}")
    wall = time.perf_counter() - start
    (t0, n0), (t1, n1) = seen[0], seen[-1]
    return Timing(wall, t0, (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan"))


def start_cluster(cpus: int, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    start = time.perf_counter()
    head = subprocess.Popen(
        [str(SCRIPTS / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--num-cpus={cpus}", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )  # fmt: skip
    while b"block forever" not in log.read_bytes():
        if head.poll() is not None:
            raise SystemExit(log.read_text())
        time.sleep(0.1)
    return head, f"127.0.0.1:{port}", time.perf_counter() - start


def stop_cluster(head: subprocess.Popen[bytes]) -> None:
    """Every process of the cluster's session (its workers have process groups of their own)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == head.pid:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    head.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch-size", type=int, default=8)
    opts = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    photos = work / "photos"
    photos.mkdir()
    photo_set(photos, opts.images)
    checkpoint = work / "mem.pth"
    make_release_checkpoint(checkpoint, 1, FULL_SIZE if opts.size == "full" else TINY)
    # No token authentication (a local Ray writes ~/.ray/auth_token, then `ray start` would require it).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cpus = len(os.sched_getaffinity(0))
    common = ["score", str(photos), "-t", "mem", "--checkpoint", f"mem={checkpoint}", "--device", "cpu",
              "--precision", opts.precision, "--batch-size", str(opts.batch_size)]  # fmt: skip

    local = timed_score(common, work / "local.parquet", env)
    head, address, cluster_start = start_cluster(cpus, env)
    try:
        ray_args = [*common, "--engine", "ray", "--ray-address", address]
        on_cluster = timed_score(ray_args, work / "ray.parquet", env)
    finally:
        stop_cluster(head)
    own_ray = timed_score([*common, "--engine", "ray"], work / "ray-own.parquet", env)

    a, b = pd.read_parquet(work / "local.parquet"), pd.read_parquet(work / "ray.parquet")
    assert a["path"].tolist() == b["path"].tolist() and a["error"].isna().all() and b["error"].isna().all()
    diff = float(np.abs(a["memorability"] - b["memorability"]).max())

    n = opts.images
    print(f"{n} images 1200x900, {opts.size} model, {opts.precision}, batch {opts.batch_size}, {cpus} CPUs")
    print("| engine | wall s | images/s | vs local | first rows after s | steady images/s | vs local |")
    print("|---|---|---|---|---|---|---|")
    for name, t in [("local (baseline)", local), ("ray, running cluster", on_cluster),
                    ("ray, local Ray started by the run", own_ray)]:  # fmt: skip
        print(f"| {name} | {t.wall:.1f} | {n / t.wall:.2f} | {local.wall / t.wall:.2f}x | {t.first_rows:.1f} "
              f"| {t.steady:.2f} | {t.steady / local.steady:.2f}x |")  # fmt: skip
    print(f"cluster start (ray start --head): {cluster_start:.1f} s")
    print(f"Ray's start-up inside a run (own Ray - running cluster): {own_ray.wall - on_cluster.wall:.1f} s")
    print(f"max |score(local) - score(ray)|: {diff:.2e}")


if __name__ == "__main__":
    main()
