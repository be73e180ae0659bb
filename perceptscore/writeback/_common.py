"""What both write-backs share: the result, the output folder, JSON cells, change checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from perceptscore import remote
from perceptscore.errors import UsageError


@dataclass
class WrittenBack:
    files: list[str] = field(default_factory=list)  # the shard / parquet files written, in order
    samples: int = 0  # samples (tar) or rows (parquet) written
    missing: list[str] = field(default_factory=list)  # one line per kept row that could not be written


class Missing:
    """The ``missing`` lines, given in any order (rows that are no tar member are found before any shard
    is read) and answered in the order of the rows in the scores table."""

    def __init__(self) -> None:
        self._lines: list[tuple[int, str]] = []

    def add(self, position: int, uri: str, reason: str) -> None:
        self._lines.append((position, f"{shown(uri)}: {reason}"))

    def lines(self) -> list[str]:
        return [line for _, line in sorted(self._lines, key=lambda item: item[0])]


def prepare_folder(out_dir: Path | str) -> Path:
    """``out_dir``, created if new; one line if it exists as anything but an empty folder: a write-back
    never writes over a file, or beside files, that the user did not name."""
    out = Path(out_dir)
    if out.is_symlink() and not out.exists():
        raise UsageError(f"{out}: a broken symlink; name a new or empty folder for the output")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{out}: exists and is not a folder; name a new or empty folder for the output")
        if any(out.iterdir()):
            raise UsageError(f"{out}: not empty; name a new or empty folder for the output")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{out}: can't create the folder ({exc.strerror or exc})") from None
    return out


def check_columns(rows: pd.DataFrame, score_columns: Sequence[str]) -> list[str]:
    """The score columns, each once; one line naming any the table lacks (and ``path``, if missing)."""
    wanted = list(dict.fromkeys(score_columns))
    absent = [c for c in ("path", *wanted) if c not in rows.columns]
    if absent:
        raise UsageError(f"the scores table has no column {', '.join(map(repr, absent))}")
    return wanted


def json_value(value: Any) -> Any:
    """A cell as JSON: numpy scalars as Python numbers, NaN / None / NA / infinities as null (JSON has no
    NaN: a reader in another language would refuse the file)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


Stat = tuple[int, int | float]


def expected_stat(size: Any, version: Any) -> Stat | None:
    """(file_size, file_mtime_ns) as the scores table recorded them, or None when either is unknown:
    what tells a source changed since it was scored. A version read back as a float (a column that
    gained nulls, as ``pd.concat`` gives) stays one: ``same_stat`` rounds the other side alike."""
    if size is None or version is None or pd.isna(size) or pd.isna(version):
        return None
    return int(size), version if isinstance(version, float) else int(version)


def same_stat(expected: Stat, size: int, version: int) -> bool:
    """Whether a source's (size, version) now is what was recorded; a float record (53 bits, less than
    a nanosecond mtime or a digest holds) is compared with the version rounded to a float in turn."""
    recorded = expected[1]
    return expected[0] == size and recorded == (float(version) if isinstance(recorded, float) else version)


def shown(uri: str) -> str:
    """A row's path as a ``missing`` line shows it: credentials in a URL are never printed."""
    return remote.without_secrets(uri) if "://" in uri else uri


def column_values(rows: pd.DataFrame, name: str) -> list[Any]:
    return rows[name].tolist() if name in rows.columns else [None] * len(rows)
