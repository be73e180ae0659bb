"""What the Ray driver reads and holds: tar shards and a parquet dataset scored with ``--engine ray``, its
containers read by the workers (now) against read by the driver (before: the same engine told it cannot
read containers, so ``scoring`` expands them in the driver and ships each image's bytes to Ray).

    python bench/ray_driver.py                       # 8 shards x 64 JPEGs + the same images as parquet
    python bench/ray_driver.py --address HOST:PORT   # a running cluster (else a local Ray, started here)

Per mode it prints the rows, the driver's bytes read (``/proc/self/io`` rchar: every read syscall of this
process, Ray's own sockets included), its peak RSS growth (the bytes it held to put into Ray), the Ray
Data runs (each starts an actor pool, loading the weights again) and rows/s; then the bytes read as a
ratio of the driver-reads baseline measured in the same run. The model is the minimal random
release-layout checkpoint; scores are checked equal between the modes.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from inputs import MODELS  # noqa: E402

from perceptscore.engines.ray import RayEngine  # noqa: E402
from perceptscore.plan import ScoreOptions, make_plan  # noqa: E402
from perceptscore.scoring import scored  # noqa: E402

from release_reference import make_release_checkpoint  # noqa: E402


def noise_jpegs(count: int, side: int, seed: int = 0) -> list[bytes]:
    """Incompressible images: a JPEG of noise is as big as a photo many times its size."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_inputs(folder: Path, shards: int, per_shard: int, side: int) -> tuple[list[str], int]:
    """Tar shards and a parquet dataset (``datasets``' Image layout) of the same images; their bytes."""
    images = noise_jpegs(shards * per_shard, side)
    inputs = []
    for number in range(shards):
        shard = folder / f"{number:05d}.tar"
        with tarfile.open(shard, "w") as archive:
            for offset, data in enumerate(images[number * per_shard : (number + 1) * per_shard]):
                member = tarfile.TarInfo(f"{number:05d}{offset:04d}.jpg")
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
        inputs.append(str(shard))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = pa.table({"image": pa.array([{"bytes": d, "path": None} for d in images], image)})
    pq.write_table(rows, folder / "dataset.parquet", row_group_size=per_shard)
    inputs.append(str(folder / "dataset.parquet"))
    return inputs, 2 * sum(len(d) for d in images)


def io_counters() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def measure(engine: RayEngine, inputs: list[str], checkpoint: str, containers: bool) -> dict[str, Any]:
    options = ScoreOptions(tasks=["memorability"], checkpoints={"memorability": checkpoint}, device="cpu")
    plan = make_plan(options, inputs, device_elsewhere="cpu")
    sources = options.sources(inputs)
    engine.reads_containers = containers  # type: ignore[misc]  # False: the driver expands them, as before
    runs = 0
    window = engine._window

    def counted(*args: Any) -> Any:
        nonlocal runs
        runs += 1
        return window(*args)

    engine._window = counted  # type: ignore[method-assign]
    before, rss, start = io_counters(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    rows = [batch for _, batch in scored(engine, plan, sources, sources.passthrough)]
    seconds, after = time.monotonic() - start, io_counters()
    table = pa.Table.from_batches(rows)
    return {
        "rows": table.num_rows,
        "read": after["rchar"] - before["rchar"],
        "rss": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024,
        "runs": runs,
        "rows/s": table.num_rows / seconds,
        "scores": table.column("memorability").to_pylist(),
        "paths": table.column("path").to_pylist(),
        "errors": table.num_rows - table.column("error").null_count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=None, help="a running Ray cluster (default: a local Ray)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--side", type=int, default=256, help="noise JPEG side in pixels (~150 KB at 256)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs, image_bytes = write_inputs(work, opts.shards, opts.per_shard, opts.side)
        checkpoint = work / "memorability.pth"
        make_release_checkpoint(checkpoint, 1, MODELS["minimal"], seed=0)
        with RayEngine(opts.address) as engine:
            results = {
                "driver reads (before)": measure(engine, inputs, str(checkpoint), containers=False),
                "workers read (now)": measure(engine, inputs, str(checkpoint), containers=True),
            }
    before, now = results.values()
    same_rows = before["paths"] == now["paths"]
    # batches are cut otherwise (a container's rows are batched apart): float32 sums in another order
    differ = (
        float(np.max(np.abs(np.array(before["scores"]) - np.array(now["scores"])))) if same_rows else None
    )
    if opts.json:
        out = {k: {n: v for n, v in r.items() if n not in ("scores", "paths")} for k, r in results.items()}
        print(
            json.dumps({"image_bytes": image_bytes, "same_rows": same_rows, "max_difference": differ, **out})
        )
        return
    print(f"{len(inputs) - 1} tar shards + 1 parquet dataset: {image_bytes / 1e6:.1f} MB of images in all")
    head = ("rows", 6), ("read MB", 10), ("RSS+ MB", 9), ("Ray runs", 10), ("rows/s", 9)
    print(f"{'mode':<24}" + "".join(f"{name:>{width}}" for name, width in head))
    for name, r in results.items():
        print(
            f"{name:<24}{r['rows']:>6}{r['read'] / 1e6:>10.1f}"
            f"{r['rss'] / 1e6:>9.1f}{r['runs']:>10}{r['rows/s']:>9.1f}"
        )
    print(
        f"read: {now['read'] / max(before['read'], 1):.3f}x the baseline; same rows in the same order: "
        f"{same_rows}; scores' max abs difference: {differ}"
    )


if __name__ == "__main__":
    main()
