"""How long ``perceptscore report`` takes on a large scores file, and how big the page is.

    python bench/report_scale.py [--rows 1000000] [--photos 400] [--format parquet|csv]

Writes a parquet scores file of --rows rows with every column ``score -t mem,quality,emotion`` writes (8
emotion probabilities included, plus a passthrough column), 1% error rows, paths cycling over --photos real
640x480 JPEGs (so the thumbnails shown are decoded, not placeholders). Then runs the real CLI
``perceptscore report`` on it and prints its wall time and the page's size, next to a baseline measured in
the same run: reading the whole file with pyarrow (every column, as a reader that does not pick its columns
would). Targets (issue 15): under 30 s and under 20 MB for a million rows. Needs the dev extra.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from photos import sample  # noqa: E402

EXE = str(Path(sys.executable).with_name("perceptscore"))
LABELS = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]


def write_photos(folder: Path, n: int) -> list[str]:
    sources = [sample(name).resize((1280, 960)) for name in ("coffee.png", "astronaut.png", "chelsea.png")]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        x, y = (int(v) for v in rng.integers(0, 640, size=2))
        path = folder / f"{i:05d}.jpg"
        sources[i % 3].crop((x, min(y, 480), x + 640, min(y, 480) + 480)).save(path, quality=85)
        paths.append(str(path))
    return paths


def write_scores(path: Path, rows: int, photos: list[str]) -> None:
    """As ``score`` writes it: parquet with provenance inside, or CSV with a ``.meta.json`` sidecar."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(rows, 8))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    quality_raw = rng.normal(0, 1.5, rows)
    error = np.where(rng.random(rows) < 0.01, "unreadable image: truncated", None)
    ok = error == None  # noqa: E711 - elementwise
    columns = {
        "path": [photos[i % len(photos)] for i in range(rows)],
        "memorability": np.where(ok, rng.normal(0.7, 0.1, rows), np.nan),
        "quality": np.where(ok, (quality_raw + 6.52) / 9.63, np.nan),
        "quality_raw": np.where(ok, quality_raw, np.nan),
        "emotion": np.where(ok, np.array(LABELS)[probs.argmax(axis=1)], None),
        "emotion_confidence": np.where(ok, probs.max(axis=1), np.nan),
        **{f"emotion_{label}": np.where(ok, probs[:, j], np.nan) for j, label in enumerate(LABELS)},
        "error": error,
        "file_size": np.full(rows, 60_000),
        "file_mtime_ns": np.full(rows, 1_700_000_000_000_000_000),
        "input_note": [f"row {i}" for i in range(rows)],
    }
    table = pa.table(columns)
    about = {"perceptscore": "bench", "created": "2026-11-29T00:00:00+00:00", "seconds": 1.0,
             "device": "cpu", "precision": "fp32", "cwd": str(path.parent), "tasks": {}}  # fmt: skip
    if path.suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
        Path(f"{path}.meta.json").write_text(json.dumps(about))
    else:
        pq.write_table(table.replace_schema_metadata({"perceptscore": json.dumps(about)}), path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="report-scale-") as tmp:
        folder = Path(tmp)
        (folder / "photos").mkdir()
        photos = write_photos(folder / "photos", args.photos)
        scores, page = folder / f"scores.{args.format}", folder / "report.html"
        write_scores(scores, args.rows, photos)
        start = time.perf_counter()
        if args.format == "csv":
            import pyarrow.csv as pacsv

            pacsv.read_csv(scores)
        else:
            pq.read_table(scores)
        full_read = time.perf_counter() - start
        start = time.perf_counter()
        done = subprocess.run([EXE, "report", str(scores), "-o", str(page)], capture_output=True, text=True)
        report = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(done.stderr)
        size = page.stat().st_size
        print(f"rows: {args.rows:,}; scores file {scores.stat().st_size / 1e6:.1f} MB")
        print(f"baseline: pyarrow reads every column: {full_read:.2f} s")
        print(
            f"perceptscore report (CLI, start-up included): {report:.2f} s ({report / full_read:.1f}x the "
            f"full read; target < 30 s)"
        )
        print(f"page: {size / 1e6:.2f} MB (target < 20 MB), {page.read_text().count('<img')} images")


if __name__ == "__main__":
    main()
