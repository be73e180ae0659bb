"""Rank and filter scored rows by any numeric output column, and place the chosen files (copy or symlink)
without ever overwriting, nor placing again a file already there."""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import math
import os
import shutil
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from perceptscore.columns import ERROR, PATH
from perceptscore.errors import UsageError
from perceptscore.formats import defuse_cell, restore_cell
from perceptscore.sinks import write_atomic
from perceptscore.tasks import Task, all_tasks, get_task

RECORD = "perceptscore-placed.csv"
_RECORD_HEADER = "source,destination"


def numeric_columns() -> dict[str, Task]:
    """Every numeric output column of every registered task -> its task (a classifier's label is text), so
    a new task's columns can be ranked and filtered by with no CLI change."""
    return {c: t for t in all_tasks().values() for c in t.columns if not (t.labels and c == t.name)}


def resolve_column(name: str, option: str = "") -> str:
    """The numeric column a user named: ``emotion_awe`` or ``emotion-awe`` (any case), or a task's name or
    alias for its score (``mem``; ``emotion``: the confidence). Unknown: one line with the likely one.
    ``option``: the option that named it, for the message."""
    key = name.strip().lower().replace("-", "_")
    columns = numeric_columns()
    if key in columns:
        return key
    try:
        return get_task(name).sort_column
    except UsageError:
        pass
    where = f" ({option})" if option else ""
    known = f"columns: {', '.join(columns)}; or a task name for its score: {', '.join(all_tasks())}"
    hint = _suggest_column(key, columns)
    if hint:
        raise UsageError(f"unknown column {name!r}{where}: did you mean {hint!r}? ({known})")
    raise UsageError(f"unknown column {name!r}{where}; {known}")


def _suggest_column(key: str, columns: Iterable[str]) -> str | None:
    """A column (or task) the mistyped ``key`` most likely meant: the one it begins, else the closest."""
    tasks = {alias: t.name for t in all_tasks().values() for alias in (t.name, *t.aliases)}
    begun = [c for c in columns if key and c.startswith(key)]
    if len(begun) == 1:
        return begun[0]
    # A prefix of a task's spellings next: "emo" means emotion, though difflib finds "mem" closer.
    begun_tasks = {task for alias, task in tasks.items() if key and alias.startswith(key)}
    if len(begun_tasks) == 1:
        return begun_tasks.pop()
    close = difflib.get_close_matches(key, [*columns, *tasks], n=1)
    return tasks.get(close[0], close[0]) if close else None


def tasks_of(columns: Iterable[str]) -> list[Task]:
    """The tasks whose scoring gives these (resolved) columns, in order, once each."""
    table = numeric_columns()
    return list({table[c].name: table[c] for c in columns}.values())


def require_columns(df: pd.DataFrame, columns: Sequence[str], source: str, text: Sequence[str] = ()) -> None:
    """``df`` has ``path``, each of ``columns`` as numbers and each of ``text``: else one line naming what
    is wrong."""
    wanted = [*columns, *text, PATH]
    missing = [c for c in dict.fromkeys(wanted) if c not in df.columns]
    if missing:
        found = ", ".join(map(str, df.columns))
        raise UsageError(f"{source} lacks column(s) {', '.join(missing)} (columns found: {found})")
    # A column with no value at all (every row an error) reads as text in some formats: nothing to compare.
    words = [c for c in columns if not pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()]
    if words:
        raise UsageError(f"{source}'s column(s) {', '.join(words)} hold text, not numbers")


def scored_only(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that were scored: error rows (and rows with a missing score) take no part in a selection."""
    return df[df[ERROR].isna()] if ERROR in df.columns else df


def rank(df: pd.DataFrame, column: str, top: int = 0, ascending: bool = False) -> pd.DataFrame:
    """Scored rows sorted by ``column`` (highest first), ties in input order; the first ``top`` (0: all)."""
    ranked = scored_only(df).dropna(subset=[column])
    ranked = ranked.sort_values(column, ascending=ascending, kind="stable")
    return ranked.head(top) if top > 0 else ranked


@dataclass
class Criteria:
    """Inclusive thresholds on numeric columns, emotion labels, a least percentile and a top fraction by one
    column; or ``every`` row. Column names may be given as a user writes them (``emotion-awe``, ``mem``):
    they are resolved here."""

    minimum: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    emotions: Sequence[str] = ()
    top_fraction: float | None = None
    by: str | None = None
    min_percentile: float | None = None
    every: bool = False  # --all: keep every row, error rows too (write-back adds scores to every sample)

    def __post_init__(self) -> None:
        self.minimum = _bounds(self.minimum, "min")
        self.maximum = _bounds(self.maximum, "max")
        self.by = resolve_column(self.by, "--by") if self.by is not None else None

    def columns(self) -> list[str]:
        """The numeric columns the criteria read, once each."""
        return list(dict.fromkeys([*self.minimum, *self.maximum, *([self.by] if self.by else [])]))

    def tasks(self) -> list[Task]:
        emotion = [get_task("emotion")] if self.emotions else []
        return list({t.name: t for t in [*tasks_of(self.columns()), *emotion]}.values())

    def validate(self) -> None:
        if self.every:
            if self.tasks():
                raise UsageError("--all keeps every row: give it no --min/--max, --emotion, --top-fraction, "
                                 "--min-percentile or --by")  # fmt: skip
            return
        # The pair first: "--top-fraction 0.1" alone is a criterion half given, not none.
        if self.top_fraction is not None and self.by is None:
            raise UsageError("--top-fraction needs --by TASK")
        if self.min_percentile is not None and self.by is None:
            raise UsageError("--min-percentile needs --by TASK")
        if self.by is not None and self.top_fraction is None and self.min_percentile is None:
            raise UsageError("--by needs --top-fraction F")
        if not self.tasks():
            raise UsageError(
                "filter needs a criterion: --min-COLUMN, --max-COLUMN, --emotion, --top-fraction, "
                "--min-percentile, or --all"
            )
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise UsageError(f"--top-fraction must be in (0, 1], got {self.top_fraction}")
        if self.min_percentile is not None and not 0 <= self.min_percentile <= 100:
            raise UsageError(f"--min-percentile must be in [0, 100], got {self.min_percentile}")
        if self.emotions:
            labels = get_task("emotion").labels or ()
            unknown = [e for e in self.emotions if e not in labels]
            if unknown:
                raise UsageError(f"unknown emotion(s) {', '.join(unknown)}; known: {', '.join(labels)}")


def _bounds(given: dict[str, float], side: str) -> dict[str, float]:
    """Bounds by column as the user named them -> by resolved column; two names of one column (``--min-iqa``
    and ``--min-quality``) with different values are one line, not a silent choice."""
    bounds: dict[str, float] = {}
    named: dict[str, str] = {}
    for name, value in given.items():
        column = resolve_column(name, f"--{side}-{name}")
        if column in bounds and bounds[column] != value:
            raise UsageError(f"--{side}-{named[column]} and --{side}-{name} both bound {column}")
        bounds[column], named[column] = value, name
    return bounds


def select(df: pd.DataFrame, criteria: Criteria) -> pd.DataFrame:
    """Scored rows meeting every threshold, label and least percentile; then, if asked, the best
    ``top_fraction`` of those by ``by`` (rounded up); or every row (``every``). Rows keep their input
    order."""
    return df[verdicts(df, criteria).isna()]


def rejected(df: pd.DataFrame, criteria: Criteria) -> pd.DataFrame:
    """The rows ``select`` does not keep, in input order, each with a ``rejected`` column: why."""
    reasons = verdicts(df, criteria)
    dropped = reasons.notna()
    return with_column(df[dropped], REJECTED, reasons[dropped].astype(str), pa.string())


def verdicts(df: pd.DataFrame, criteria: Criteria) -> pd.Series:
    """Per row: None where the row is kept, else the first criterion it fails as one short phrase
    (``error``, ``no quality``, ``quality < 0.7``, ``emotion not in awe,joy``, ``quality_percentile < 90``,
    ``not in top 10% by quality``), checked in that order. The percentile is over every scored row of
    ``df``; the top fraction is of the rows that met everything else, as it always was."""
    reasons = pd.Series(None, index=df.index, dtype=object)
    if criteria.every:
        return reasons

    def fail(failing: pd.Series, why: str) -> None:
        reasons[reasons.isna() & failing.fillna(False).astype(bool)] = why

    if ERROR in df.columns:
        fail(df[ERROR].notna(), "error")
    for column in criteria.columns():
        fail(df[column].isna(), f"no {column}")
    for column, low in criteria.minimum.items():
        fail(df[column] < low, f"{column} < {_number(low)}")
    for column, high in criteria.maximum.items():
        fail(df[column] > high, f"{column} > {_number(high)}")
    if criteria.emotions:
        fail(~df["emotion"].isin(list(criteria.emotions)), f"emotion not in {','.join(criteria.emotions)}")
    by = criteria.by
    if criteria.min_percentile is not None and by is not None:
        fail(percentiles(df, by) < criteria.min_percentile,
             f"{percentile_column(by)} < {_number(criteria.min_percentile)}")  # fmt: skip
    if criteria.top_fraction is not None and by is not None:
        survivors = df[reasons.isna()]
        best = rank(survivors, by, top=top_count(criteria.top_fraction, len(survivors)))
        fail(~df.index.to_series().isin(best.index),
             f"not in top {criteria.top_fraction * 100:g}% by {by}")  # fmt: skip
    return reasons


def top_count(fraction: float, rows: int) -> int:
    """How many rows the best ``fraction`` of ``rows`` is: rounded up, but 0.1 of 30 is 3, not the 4 that
    ceil(3.0000000000000004) would give."""
    return math.ceil(round(fraction * rows, 9))


def _number(value: float) -> str:
    """A bound as the user wrote it: 0.7, 90, 1e-05; in full where six digits would change it."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


# ---- percentiles and the columns written back ---------------------------------------------------------
REJECTED, PERCENTILE = "rejected", "_percentile"


def percentile_column(column: str) -> str:
    return f"{column}{PERCENTILE}"


def percentiles(df: pd.DataFrame, column: str) -> pd.Series:
    """Each row's percentile of ``column`` among the scored rows of ``df`` that have a value: the share of
    them (x100) whose value is <= the row's. Ties share the highest: equal values all get the share at or
    below them, so the best row is 100 and a column of one value is 100 throughout. Error rows and rows
    without a value get none (NaN)."""
    values = scored_only(df)[column].dropna()
    numbers = values.to_numpy(dtype=float)
    result = pd.Series(np.nan, index=df.index, dtype=float)
    if len(numbers):
        at_or_below = np.searchsorted(np.sort(numbers), numbers, side="right")
        result.loc[values.index] = at_or_below * 100.0 / len(numbers)
    return result


def with_percentiles(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """``df`` with ``<column>_percentile`` for each of ``columns`` (replaced where the input had one)."""
    for column in dict.fromkeys(columns):
        df = with_column(df, percentile_column(column), percentiles(df, column), pa.float64())
    return df


def percentile_columns(df: pd.DataFrame, also: Iterable[str] = ()) -> list[str]:
    """The columns ``--percentiles`` rates: each task's score present in ``df``, then ``also`` (the column
    ranked or selected by)."""
    scores = [t.sort_column for t in all_tasks().values() if t.sort_column in df.columns]
    return list(dict.fromkeys([*scores, *also]))


def score_columns(df: pd.DataFrame) -> list[str]:
    """Every task column present in ``df``, then the percentile columns: what write-back adds to a sample."""
    tasks = [c for t in all_tasks().values() for c in t.columns if c in df.columns]
    rated = [percentile_column(c) for c in tasks if percentile_column(c) in df.columns]
    return [*tasks, *rated]


def with_column(df: pd.DataFrame, name: str, values: pd.Series, kind: pa.DataType) -> pd.DataFrame:
    """``df`` with one column set, and the Arrow schema it was read with (``attrs``) grown to match, so
    ``write_rows`` keeps the input's own types (a map column) for the rest."""
    schema = df.attrs.get("arrow_schema")
    df = df.assign(**{name: values})
    if isinstance(schema, pa.Schema):
        if name not in schema.names:
            schema = schema.append(pa.field(name, kind))
        df.attrs["arrow_schema"] = schema
    return df


@dataclass
class Placement:
    """Where each kept file is (source -> destination), in input order: placed by this run, or found
    already there; and why any file could not be placed."""

    mapped: list[tuple[str, Path]] = field(default_factory=list)
    placed: int = 0
    already: int = 0
    failed: list[str] = field(default_factory=list)


@dataclass
class Record:
    """``perceptscore-placed.csv`` in a destination folder: the file (ours, or a free name) and its rows."""

    path: Path
    rows: list[tuple[str, str]] = field(default_factory=list)  # (source, destination)

    def names_of(self) -> dict[str, list[str]]:
        """source -> the names in the folder the record says hold its copy. A name holds one file: where
        the record names several sources for one name (an older record, a copy deleted and its name
        taken by another file since), only its latest row counts."""
        owner = {Path(destination).name: source for source, destination in self.rows}
        found: dict[str, list[str]] = {}
        for name, source in owner.items():
            found.setdefault(source, []).append(name)
        return found


def read_record(folder: str | Path) -> Record:
    """The folder's record of what was placed there: the first of ``perceptscore-placed.csv``,
    ``perceptscore-placed-1.csv``, ... that is ours (a plain file with our header) or free. A file of
    that name that is not ours (a link, the user's own) is never read nor written."""
    for n in range(1000):
        path = Path(folder) / (RECORD if n == 0 else f"perceptscore-placed-{n}.csv")
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            text = path.read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            return Record(path)
        lines = list(csv.reader(io.StringIO(text, newline="")))
        if lines and ",".join(lines[0]) == _RECORD_HEADER:
            rows = [(restore_cell(a), restore_cell(b)) for a, b in (r for r in lines[1:] if len(r) == 2)]
            return Record(path, rows)
    raise UsageError(f"{folder}: no free name for {RECORD} (1000 taken)")


def place(files: Iterable[tuple[str, str]], dest: str | Path, symlink: bool = False) -> Placement:
    """Copy (or symlink) each file into ``dest``, never overwriting: a name taken by another file gets
    ``-1``, ``-2``, ...; a file already there (a copy the record names, of the same size and mtime, or
    any file of the same bytes under its name or a numbered one; for links, a link to the same file) is
    not placed again but counted and mapped. ``files``: (the path as recorded, the file to read). A file
    given twice is placed once. Every file not placed has its message."""
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    recorded = read_record(folder).names_of()
    result, families, done = Placement(), {}, set()
    for shown_as, src in files:
        real = os.path.realpath(src)
        if real in done:
            continue
        done.add(real)
        name = Path(src).name
        family = families.setdefault(name, _Family(folder, name, symlink))
        try:
            target, new = family.place(src, recorded.get(shown_as, ()))
        except OSError as exc:
            result.failed.append(f"{shown_as}: {exc.strerror or exc}")
            continue
        result.mapped.append((shown_as, target))
        result.placed, result.already = result.placed + new, result.already + (not new)
    return result


class _Family:
    """The slots of one file name in the destination folder (``name``, ``name-1``, ``name-2``, ...) found
    taken so far, and what each holds: many files of one name cost one probe per slot, not one per file
    and slot, and each file's bytes are read at most once."""

    def __init__(self, folder: Path, name: str, symlink: bool) -> None:
        self.folder, self.name, self.symlink = folder, Path(name), symlink
        self.taken: list[Path] = []
        self.next = 0  # the first slot not yet probed
        self._digests: dict[str, str] = {}

    def place(self, src: str, recorded: Sequence[str]) -> tuple[Path, bool]:
        """The slot now holding ``src``, and whether this call put it there."""
        # The record's copies of this very source: size and mtime suffice (rsync's quick check). Elsewhere
        # equal bytes are needed: many sources share one name, and two of them can share a size and an
        # mtime (files written in one clock tick).
        for target in (self.folder / name for name in recorded):
            if self._holds(target, src, quick=True):
                return target, False
        for target in self.taken:
            if self._holds(target, src, quick=False):
                return target, False
        while True:
            n, self.next = self.next, self.next + 1
            target = self.folder / (self.name.name if n == 0 else f"{self.name.stem}-{n}{self.name.suffix}")
            try:
                if self.symlink:
                    os.symlink(os.path.abspath(src), target)
                else:
                    _copy_exclusive(src, target)
            except FileExistsError:
                self.taken.append(target)
                if self._holds(target, src, quick=False):
                    return target, False
                continue
            self.taken.append(target)
            return target, True

    def _holds(self, target: Path, src: str, quick: bool) -> bool:
        """Whether ``target`` already is ``src`` placed: a link to it; or a plain file of its size, with its
        mtime (``quick``) or else its bytes."""
        try:
            mode, size, mtime = _lstat(target)
            if self.symlink:
                return stat.S_ISLNK(mode) and os.path.realpath(target) == os.path.realpath(src)
            source = os.stat(src)
            if not stat.S_ISREG(mode) or size != source.st_size:
                return False
            return (quick and mtime == source.st_mtime_ns) or self._digest(str(target)) == self._digest(src)
        except FileNotFoundError:
            return False

    def _digest(self, path: str) -> str:
        if path not in self._digests:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            self._digests[path] = digest.hexdigest()
        return self._digests[path]


def _lstat(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_size, st.st_mtime_ns


def write_placement_map(folder: str | Path, mapped: list[tuple[str, Path]]) -> Path | None:
    """Bring the folder's record up to date: which source each copy there is of. Its rows whose copy is
    gone are dropped, this run's rows (placed now or found there) added once each; written whole (a
    temporary file renamed). Raises ``OSError`` if it cannot be written (a full disk)."""
    if not mapped:
        return None
    folder = Path(folder)
    record = read_record(folder)
    owner: dict[str, str] = {}  # name in the folder -> the source its copy is of: one source a name
    for source, destination in record.rows:
        if os.path.lexists(folder / Path(destination).name):
            owner[Path(destination).name] = source
    for source, target in mapped:  # this run's word on a name is the last: it looked at the file
        if owner.get(target.name) != source:
            owner.pop(target.name, None)  # another source's row for this name is stale: it goes
            owner[target.name] = source
    lines = "".join(f"{_csv_cell(src)},{_csv_cell(str(folder / name))}\n" for name, src in owner.items())
    write_atomic(record.path, (_RECORD_HEADER + "\n" + lines).encode("utf-8", "surrogateescape"))
    return record.path


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
