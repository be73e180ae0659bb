"""``writeback.to_shards``: samples/s against copying the same bytes with Python's tarfile, and peak RSS
over 10 against 1,000 shards (streaming must keep it flat).

    python bench/writeback.py [--shards 8] [--per-shard 500] [--image-kb 24] [--rounds 3]

Throughput: --shards img2dataset-layout shards of --per-shard samples (``key.jpg`` of --image-kb random
bytes, ``key.txt``, ``key.json``), every sample kept (``filter --all``), written back into shards of the
same size; the baseline reads the same shards with ``tarfile`` (stream mode) and writes every member into
new shards of the same size, without scores. Rounds are interleaved (baseline, write-back, ...) and the
ratio is the median of each round's. GNU ``tar -A`` (concatenating the archives: no per-member work at
all) is shown for scale.

Memory: ``to_shards`` of 10 and of 1,000 shards of 5 small samples each, every sample kept, each run in a
fresh subprocess that reports its own ``ru_maxrss``. Under ~2 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MTIME = 1_700_000_000


def make_shards(folder: Path, shards: int, per_shard: int, image_bytes: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    made = []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                members = {
                    "jpg": rng.bytes(image_bytes),
                    "txt": f"a caption for sample {key}".encode(),
                    "json": json.dumps({"url": f"https://example.com/{key}.jpg", "width": 640}).encode(),
                }
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size, info.mtime = len(data), MTIME
                    archive.addfile(info, io.BytesIO(data))
        made.append(path)
    return made


def scores_table(shards: list[Path], per_shard: int, image_bytes: int) -> pd.DataFrame:
    """What ``score`` writes for these shards (one row per image member), with made-up scores."""
    keys = [(str(shard), f"{s:05d}{i:04d}") for s, shard in enumerate(shards) for i in range(per_shard)]
    return pd.DataFrame(
        {
            "path": [f"tar://{key}.jpg::{shard}" for shard, key in keys],
            "memorability": np.random.default_rng(1).random(len(keys)),
            "error": [None] * len(keys),
            "file_size": [image_bytes] * len(keys),
            "file_mtime_ns": [MTIME * 10**9] * len(keys),
            "shard": [shard for shard, _ in keys],
            "key": [key for _, key in keys],
        }
    )


def tarfile_copy(shards: list[Path], out: Path, per_shard: int) -> int:
    """The baseline: every member read with tarfile and written into shards of ``per_shard`` samples."""
    out.mkdir()
    written, archive, key = 0, None, None
    for shard in shards:
        with tarfile.open(shard, "r|") as source:
            for info in source:
                data = source.extractfile(info).read()  # type: ignore[union-attr]
                sample = info.name.split(".", 1)[0]
                if sample != key:
                    key = sample
                    if written % per_shard == 0:
                        if archive is not None:
                            archive.close()
                        # closed when the next shard starts or after the loop: one open at a time
                        archive = tarfile.open(out / f"{written // per_shard:05d}.tar", "w")  # noqa: SIM115
                    written += 1
                assert archive is not None
                archive.addfile(info, io.BytesIO(data))
    if archive is not None:
        archive.close()
    return written


def write_back(rows: pd.DataFrame, out: Path, per_shard: int) -> int:
    from perceptscore.writeback import to_shards

    done = to_shards(rows, out, score_columns=["memorability"], samples_per_shard=per_shard)
    assert not done.missing, done.missing[:3]
    return done.samples


def gnu_tar_concat(shards: list[Path], out: Path) -> None:
    out.mkdir()
    target = out / "all.tar"
    shutil.copyfile(shards[0], target)
    subprocess.run(["tar", "-Af", str(target), *map(str, shards[1:])], check=True)


def timed(what: object, *args: object) -> float:
    start = time.perf_counter()
    what(*args)  # type: ignore[operator]
    return time.perf_counter() - start


def throughput(args: argparse.Namespace, folder: Path) -> None:
    image = args.image_kb * 1024
    shards = make_shards(folder / "in", args.shards, args.per_shard, image)
    rows = scores_table(shards, args.per_shard, image)
    samples = len(rows)
    size_mb = sum(s.stat().st_size for s in shards) / 1e6
    base, ours, gnu = [], [], []
    for r in range(args.rounds + 1):  # round 0 warms the page cache and the imports
        b = timed(tarfile_copy, shards, folder / f"base{r}", args.per_shard)
        o = timed(write_back, rows, folder / f"ours{r}", args.per_shard)
        g = timed(gnu_tar_concat, shards, folder / f"gnu{r}") if shutil.which("tar") else float("nan")
        for kept in (f"base{r}", f"ours{r}", f"gnu{r}"):
            shutil.rmtree(folder / kept, ignore_errors=True)
        if r:
            base.append(b)
            ours.append(o)
            gnu.append(g)
    ratios = [b / o for b, o in zip(base, ours, strict=True)]
    print(f"{samples} samples in {args.shards} shards, {size_mb:.0f} MB; {args.rounds} rounds, median")
    print(f"{'what':<34} {'seconds':>8} {'samples/s':>10} {'MB/s':>7}")
    for name, times in (
        ("tarfile copy (baseline)", base),
        ("writeback.to_shards (all kept)", ours),
        ("GNU tar -A (concatenate only)", gnu),
    ):
        t = statistics.median(times)
        print(f"{name:<34} {t:>8.2f} {samples / t:>10.0f} {size_mb / t:>7.0f}")
    print(
        f"to_shards / tarfile copy: {statistics.median(ratios):.2f}x "
        f"(rounds {min(ratios):.2f}-{max(ratios):.2f}; goal >= 0.8x)"
    )


CHILD = """
import resource, sys, pandas as pd
from perceptscore.writeback import to_shards
rows = pd.read_parquet(sys.argv[1])
done = to_shards(rows, sys.argv[2], score_columns=["memorability"], samples_per_shard=100)
assert not done.missing and done.samples == len(rows), done.missing[:3]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, done.samples, len(done.files))
"""


def peak_rss(
    folder: Path, shards: int, per_shard: int = 5, image_bytes: int = 16 * 1024
) -> tuple[float, int]:
    made = make_shards(folder / f"rss{shards}", shards, per_shard, image_bytes)
    table = folder / f"rows{shards}.parquet"
    scores_table(made, per_shard, image_bytes).to_parquet(table)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(table), str(folder / f"rss_out{shards}")],
        capture_output=True,
        text=True,
        check=True,
    )
    rss_kb, samples, _ = (int(v) for v in done.stdout.split())
    return rss_kb / 1024, samples


def memory(folder: Path) -> None:
    print(f"{'input shards':>12} {'samples':>8} {'peak RSS MB':>12}")
    results = {}
    for shards in (10, 1000):
        rss, samples = peak_rss(folder, shards)
        results[shards] = rss
        print(f"{shards:>12,} {samples:>8,} {rss:>12.0f}")
    print(f"RSS ratio 1,000/10 shards: {results[1000] / results[10]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--image-kb", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        throughput(args, Path(tmp))
        memory(Path(tmp))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
