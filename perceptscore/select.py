"""Rank and filter scored rows, and place the chosen files (copy or symlink) without ever overwriting."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from perceptscore.columns import ERROR, PATH
from perceptscore.errors import UsageError
from perceptscore.formats import defuse_cell
from perceptscore.tasks import Task, get_task


def require_columns(df: pd.DataFrame, tasks: Iterable[Task], source: str) -> None:
    missing = [t.sort_column for t in tasks if t.sort_column not in df.columns] + (
        [PATH] if PATH not in df.columns else []
    )
    if missing:
        found = ", ".join(map(str, df.columns))
        raise UsageError(f"{source} lacks column(s) {', '.join(missing)} (columns found: {found})")


def scored_only(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that were scored: error rows (and rows with a missing score) take no part in a selection."""
    return df[df[ERROR].isna()] if ERROR in df.columns else df


def rank(df: pd.DataFrame, task: Task, top: int = 0, ascending: bool = False) -> pd.DataFrame:
    """Scored rows sorted by the task's score (display score; confidence for emotion), ties in input
    order; the first ``top`` of them (0: all)."""
    ranked = scored_only(df).dropna(subset=[task.sort_column])
    ranked = ranked.sort_values(task.sort_column, ascending=ascending, kind="stable")
    return ranked.head(top) if top > 0 else ranked


@dataclass
class Criteria:
    """Thresholds on display scores (inclusive), emotion labels, and a top fraction by one task."""

    minimum: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    emotions: Sequence[str] = ()
    top_fraction: float | None = None
    by: str | None = None

    def tasks(self) -> list[Task]:
        names = [
            *self.minimum,
            *self.maximum,
            *(["emotion"] if self.emotions else []),
            *([self.by] if self.by else []),
        ]
        return list({t.name: t for t in map(get_task, names)}.values())

    def validate(self) -> None:
        # The pair first: "--top-fraction 0.1" alone is a criterion half given, not none.
        if self.top_fraction is not None and self.by is None:
            raise UsageError("--top-fraction needs --by TASK")
        if self.by is not None and self.top_fraction is None:
            raise UsageError("--by needs --top-fraction F")
        if not self.tasks():
            raise UsageError(
                "filter needs a criterion: --min-<task>, --max-<task>, --emotion or --top-fraction"
            )
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise UsageError(f"--top-fraction must be in (0, 1], got {self.top_fraction}")
        if self.emotions:
            labels = get_task("emotion").labels or ()
            unknown = [e for e in self.emotions if e not in labels]
            if unknown:
                raise UsageError(f"unknown emotion(s) {', '.join(unknown)}; known: {', '.join(labels)}")


def select(df: pd.DataFrame, criteria: Criteria) -> pd.DataFrame:
    """Scored rows meeting every threshold and label; then, if asked, the best ``top_fraction`` of those
    by ``by`` (rounded up). Rows keep their input order."""
    chosen = scored_only(df)
    for name, low in criteria.minimum.items():
        chosen = chosen[chosen[get_task(name).sort_column] >= low]
    for name, high in criteria.maximum.items():
        chosen = chosen[chosen[get_task(name).sort_column] <= high]
    if criteria.emotions:
        chosen = chosen[chosen["emotion"].isin(list(criteria.emotions))]
    if criteria.top_fraction is not None and criteria.by is not None and len(chosen):
        keep = math.ceil(criteria.top_fraction * len(chosen))
        best = rank(chosen, get_task(criteria.by), top=keep)
        chosen = chosen.loc[chosen.index.isin(best.index)]
    return chosen


@dataclass
class Placement:
    """Where each kept file went (source -> destination), and why any did not."""

    placed: list[tuple[str, Path]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def place(files: Iterable[tuple[str, str]], dest: str | Path, symlink: bool = False) -> Placement:
    """Copy (or symlink) each file into ``dest``; a name already taken there gets ``-1``, ``-2``, ... (a
    count per name, so many files of one name cost no more than a few). ``files``: (the path as recorded,
    the file to read). A file given twice is placed once. Every file not placed has its message."""
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    result, next_number, done = Placement(), {}, set()
    for shown_as, src in files:
        real = os.path.realpath(src)
        if real in done:
            continue
        done.add(real)
        name = Path(src)
        n = next_number.get(name.name, 0)
        while True:
            target = folder / (name.name if n == 0 else f"{name.stem}-{n}{name.suffix}")
            n += 1
            try:
                if symlink:
                    os.symlink(os.path.abspath(src), target)
                else:
                    _copy_exclusive(src, target)
                result.placed.append((shown_as, target))
                break
            except FileExistsError:
                continue
            except OSError as exc:
                result.failed.append(f"{shown_as}: {exc.strerror or exc}")
                break
        next_number[name.name] = n
    return result


def write_placement_map(folder: str | Path, placed: list[tuple[str, Path]]) -> Path | None:
    """``perceptscore-placed.csv`` beside the copies (a new name if taken): which file became which.
    Raises ``OSError`` if it cannot be written (a full disk)."""
    if not placed:
        return None
    rows = "".join(f"{_csv_cell(src)},{_csv_cell(str(dst))}\n" for src, dst in placed)
    data = ("source,destination\n" + rows).encode("utf-8", "surrogateescape")
    for n in range(1000):
        target = Path(folder) / ("perceptscore-placed.csv" if n == 0 else f"perceptscore-placed-{n}.csv")
        try:
            with open(target, "xb") as f:
                f.write(data)
            return target
        except FileExistsError:
            continue
    return None


def _csv_cell(text: str) -> str:
    text = defuse_cell(text)
    return '"' + text.replace('"', '""') + '"'


def _copy_exclusive(src: str, target: Path) -> None:
    """Copy data and timestamps; "x" mode creates the file or fails if any file has that name."""
    with open(src, "rb") as fin, open(target, "xb") as fout:
        try:
            shutil.copyfileobj(fin, fout, 1 << 20)
        except BaseException:
            target.unlink(missing_ok=True)  # no truncated copy left behind (disk full, Ctrl-C)
            raise
    shutil.copystat(src, target)
