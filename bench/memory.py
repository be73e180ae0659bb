"""Peak RSS of a ``perceptscore score`` run as its manifest grows: streaming must keep it flat.

    python bench/memory.py [--small 10000] [--large 1000000]

Runs the real CLI (tiny model, parquet manifest, parquet output with resumable shards) on manifests of
--small and --large rows and prints each run's peak RSS (main process and its decode worker) and their
ratio. The rows name files that do not exist, so every row is an error row: the run measures what grows with
the row count (sources, batches, shards, final assembly), not decoding. Needs the dev extra.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from release_reference import make_release_checkpoint  # noqa: E402

EXE = str(Path(sys.executable).with_name("perceptscore"))


def peak_rss_mb(rows: int, folder: Path, checkpoint: Path) -> tuple[float, float, float]:
    manifest = folder / f"manifest_{rows}.parquet"
    pq.write_table(
        pa.table({"path": [f"missing/{i:08d}.jpg" for i in range(rows)], "id": range(rows)}), manifest
    )
    out = folder / f"scores_{rows}.parquet"
    command = [EXE, "score", str(manifest), "-t", "mem", "--checkpoint", str(checkpoint)]
    command += ["--batch-size", "256", "-o", str(out)]
    start = time.perf_counter()
    # wait4's ru_maxrss: the largest peak among the run's process and the workers it reaped
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    assert os.waitstatus_to_exitcode(status) == 1, "every row is an error row: exit code 1"
    assert pq.ParquetFile(out).metadata.num_rows == rows
    return usage.ru_maxrss / 1024, seconds, rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = folder / "tiny.pth"
        make_release_checkpoint(checkpoint, 1)
        small = peak_rss_mb(args.small, folder, checkpoint)
        large = peak_rss_mb(args.large, folder, checkpoint)
    print(f"{'manifest rows':>14} {'peak RSS MB':>12} {'seconds':>8} {'rows/s':>8}")
    for rows, (rss, seconds, per_s) in ((args.small, small), (args.large, large)):
        print(f"{rows:>14,} {rss:>12.0f} {seconds:>8.1f} {per_s:>8.0f}")
    print(f"RSS ratio large/small: {large[0] / small[0]:.3f}")


if __name__ == "__main__":
    main()
