"""Writers: complete files only, with provenance, for every format."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perceptscore.errors import UsageError
from perceptscore.sinks import FileSink, writing

SCHEMA = pa.schema([("path", pa.string()), ("memorability", pa.float64()), ("error", pa.string())])
ROWS = [
    {"path": "a.jpg", "memorability": 0.5, "error": None},
    {"path": "b.jpg", "memorability": None, "error": "empty file"},
]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_an_interrupted_write_leaves_nothing_under_the_name(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"scores{suffix}"
    with pytest.raises(KeyboardInterrupt), writing(FileSink(str(out)), SCHEMA, {"run": 1}) as sink:
        sink.write(ROWS)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_rows_and_provenance_read_back(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"scores{suffix}"
    with writing(FileSink(str(out)), SCHEMA, {"run": 1}) as sink:
        sink.write(ROWS[:1])
        sink.write(ROWS[1:])
    df = {".csv": pd.read_csv, ".parquet": pd.read_parquet}.get(
        suffix, lambda p: pd.read_json(p, lines=True)
    )(out)
    assert df["path"].tolist() == ["a.jpg", "b.jpg"]
    assert df["memorability"].iloc[0] == 0.5 and pd.isna(df["memorability"].iloc[1])
    assert df["error"].iloc[1] == "empty file"
    if suffix == ".parquet":
        assert json.loads(pq.read_schema(out).metadata[b"perceptscore"]) == {"run": 1}
    else:
        assert json.loads(Path(f"{out}.meta.json").read_text()) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {out.name, f"{out.name}.meta.json"} - ({f"{out.name}.meta.json"} if suffix == ".parquet" else set())
    )


def test_output_mistakes_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"output folder .* does not exist"):
        FileSink(str(tmp_path / "no" / "x.csv"))
    with pytest.raises(UsageError, match="unknown format"):
        FileSink(str(tmp_path / "x.txt"))
