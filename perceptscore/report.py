"""What a report shows, computed from scores files: counts, per-task statistics and histograms (with their
axes' ticks), the top and bottom rows, emotion's classes, the error rows and the provenance. Reads only the
columns it needs; numbers only, no HTML (``commands/report.py`` renders them with the template) and no
torch.

Every number of a task is of the column it is ranked by (``Task.sort_column``): the display score
(``quality``, not ``quality_raw``; memorability's raw value is its display score) or emotion's confidence,
over its scored rows (error rows and missing scores take no part)."""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from perceptscore.columns import ERROR, FILE_MTIME, FILE_SIZE, PATH
from perceptscore.errors import UsageError
from perceptscore.formats import format_of, is_scores_file, read_columns, read_provenance
from perceptscore.tasks import Task, all_tasks

BINS = 30
X_TICKS, Y_TICKS = 6, 4  # about how many ticks each histogram axis gets
MAX_ERRORS_SHOWN = 1000  # a run where everything failed must not make a 100 MB page; the count is exact


@dataclass
class Row:
    """One image shown: where it was scored from (``root``), its score, its label (emotion), and the file's
    (size, mtime_ns) when scored: a picture is drawn only from the very file scored."""

    path: str
    root: str
    score: float
    label: str | None = None
    stat: tuple[int, int] | None = None


@dataclass
class Tick:
    at: float  # where on its axis, from 0 (the axis' start) to 1 (its end)
    label: str


@dataclass
class Histogram:
    edges: list[float]  # BINS + 1 bin edges
    counts: list[int]
    top: int = 0  # the count axis ends here: the first count tick at or above the highest bar
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)

    def at(self, value: float) -> float:
        """Where ``value`` is on the score axis, from 0 to 1."""
        low, high = self.edges[0], self.edges[-1]
        return (value - low) / (high - low)


@dataclass
class Stats:
    """Of a task's scored rows: numpy's mean, and quartiles by linear interpolation (numpy's default,
    ``statistics.quantiles(method="inclusive")``)."""

    count: int
    mean: float
    q1: float
    median: float
    q3: float
    low: float
    high: float


@dataclass
class TaskSection:
    task: Task
    column: str  # the number shown and sorted by: display score, or emotion's confidence
    scored: int
    histogram: Histogram
    stats: Stats | None = None  # None: nothing scored
    top: list[Row] = field(default_factory=list)
    bottom: list[Row] = field(default_factory=list)
    # when the whole collection is no more than top and bottom together: every image once, best first,
    # instead of a top and a bottom that would show the same images twice
    ranked: list[Row] = field(default_factory=list)
    classes: list[tuple[str, int, list[Row]]] = field(default_factory=list)  # emotion: label, count, best


@dataclass
class ReportData:
    sources: list[str]
    rows: int
    errors: int
    error_rows: list[tuple[str, str]]  # (path, error), the first MAX_ERRORS_SHOWN
    tasks: list[TaskSection]
    provenance: list[tuple[str, dict[str, Any]]]  # per scores file


def _wanted(schema: pa.Schema) -> list[str]:
    """The columns a report reads: path, error, the file's size and mtime, and each task's label and shown
    score."""
    tasks = (c for t in all_tasks().values() for c in (t.name, t.sort_column))
    wanted = [PATH, ERROR, FILE_SIZE, FILE_MTIME, *tasks]
    return [c for c in dict.fromkeys(wanted) if c in schema.names]


@dataclass
class Roots:
    """Which folder each row was scored from (relative paths are relative to it): one per scores file."""

    starts: list[int]  # the first row of each file
    folders: list[str]

    def __call__(self, row: int) -> str:
        return self.folders[bisect.bisect_right(self.starts, row) - 1]


def read_report_table(paths: Sequence[str]) -> tuple[pa.Table, Roots, list[tuple[str, dict[str, Any]]]]:
    """The needed columns of every scores file as one table, where each file was scored from, and each
    file's provenance."""
    tables, roots, provenance = [], Roots([], []), []
    for path in paths:
        check_scores_file(path)
        about = recorded_provenance(read_provenance(path))
        table = read_columns(path, _wanted)
        if PATH not in table.column_names:
            raise UsageError(f"{path}: has no {PATH} column")
        roots.starts.append(sum(t.num_rows for t in tables))
        roots.folders.append(str(about.get("cwd") or "."))
        tables.append(table)
        provenance.append((path, about))
    try:  # permissive: a CSV's text may read as large_string where a parquet file's is string
        return pa.concat_tables(tables, promote_options="permissive"), roots, provenance
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        raise UsageError(f"these scores files cannot be reported together: {exc}") from None


def check_scores_file(path: str) -> None:
    """One line, unless ``path`` is a scores file written by ``perceptscore score`` on this machine."""
    if format_of(path) is None or not is_scores_file(path):
        raise UsageError(f"{path}: not a scores file written by perceptscore score (.csv/.parquet/.jsonl)")


TEXT_FIELDS = ("perceptscore", "created", "device", "precision", "cwd")
WEIGHTS_FIELDS = ("checkpoint", "origin", "sha256")


def recorded_provenance(about: Any) -> dict[str, Any]:
    """The provenance fields a report uses, each kept only when it has the type ``score`` writes: a scores
    file edited or written by another tool (``"seconds": "12"``, ``"tasks": {"memorability": "oops"}``)
    shows "not recorded" for what is malformed instead of failing the report."""
    if not isinstance(about, dict):
        return {}
    kept: dict[str, Any] = {k: about[k] for k in TEXT_FIELDS if isinstance(about.get(k), str)}
    seconds = about.get("seconds")
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds):
        kept["seconds"] = float(seconds)
    tasks = about.get("tasks")
    if isinstance(tasks, dict):  # a task stays listed; its malformed weights fields are left out
        kept["tasks"] = {
            str(task): {k: w[k] for k in WEIGHTS_FIELDS if isinstance(w.get(k), str)} if isinstance(w, dict)
            else {}
            for task, w in tasks.items()
        }  # fmt: skip
    return kept


def histogram(values: np.ndarray, bins: int = BINS) -> Histogram:
    """Counts of the finite values in ``bins`` equal bins between their minimum and maximum, with ticks on
    both axes."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return Histogram([], [])
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(finite, bins=bins, range=(low, high))
    peak = int(counts.max())
    step = int(nice_step(peak, Y_TICKS, integer=True))
    top = max(step, -(-peak // step) * step)  # the first multiple of the step at or above the peak
    y_ticks = [Tick(c / top, str(c)) for c in range(0, top + 1, step)]
    return Histogram(edges.tolist(), counts.tolist(), top, axis_ticks(low, high), y_ticks)


def nice_step(span: float, target: int, integer: bool = False) -> float:
    """The step of about ``target`` ticks over ``span``: 1, 2, 2.5 or 5 times a power of ten (whole
    numbers only, for counts)."""
    if span <= 0:
        return 1.0
    raw = span / target
    power = 10.0 ** math.floor(math.log10(raw))
    factors = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(f * power for f in factors if raw <= f * power * (1 + 1e-9))
    return max(1.0, round(step)) if integer else step


def axis_ticks(low: float, high: float, target: int = X_TICKS) -> list[Tick]:
    """Round values between ``low`` and ``high`` (both included), labelled with as many decimals as their
    step needs (0.25: two; 0.2: one; 5: none)."""
    step = nice_step(high - low, target)
    decimals = next((d for d in range(16) if abs(round(step, d) - step) <= step * 1e-9), 15)
    first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
    ticks = []
    for k in range(first, last + 1):
        value = k * step
        label = f"{value:.{decimals}f}"
        ticks.append(
            Tick(min(1.0, max(0.0, (value - low) / (high - low))), "0" if float(label) == 0 else label)
        )
    return ticks


def statistics(values: np.ndarray) -> Stats | None:
    """Count, mean, quartiles and range of the finite ``values``; None when there are none."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return None
    q1, median, q3 = (float(q) for q in np.quantile(finite, [0.25, 0.5, 0.75]))
    return Stats(
        int(finite.size), float(finite.mean()), q1, median, q3, float(finite.min()), float(finite.max())
    )


def _taken(table: pa.Table, name: str, order: np.ndarray) -> list[Any]:
    """The values of a column at ``order``; all None when the file has no such column."""
    if name not in table.column_names:
        return [None] * len(order)
    return table.column(name).take(pa.array(order)).to_pylist()


def _stat(size: Any, mtime: Any) -> tuple[int, int] | None:
    """(size, mtime_ns) as recorded; None when either is missing or not a whole number (a forged file)."""
    if type(size) is int and type(mtime) is int:  # not a bool, a float or a string
        return size, mtime
    return None


def _rows(table: pa.Table, roots: Roots, order: np.ndarray, column: str, task: Task) -> list[Row]:
    paths, scores = _taken(table, PATH, order), _taken(table, column, order)
    labels = _taken(table, task.name, order) if task.labels else [None] * len(order)
    stats = map(_stat, _taken(table, FILE_SIZE, order), _taken(table, FILE_MTIME, order))
    return [
        Row(p, roots(i), float(s), label, stat)
        for i, p, s, label, stat in zip(order.tolist(), paths, scores, labels, stats, strict=True)
    ]


def _ranked(values: np.ndarray, candidates: np.ndarray, n: int, descending: bool) -> np.ndarray:
    """The ``n`` candidates with the highest (lowest) values, best first, ties in input order. Partial
    selection first: a million rows are never fully sorted for 24 of them."""
    if not candidates.size or n <= 0:
        return candidates[:0]
    keys = -values[candidates] if descending else values[candidates]
    if candidates.size > n:
        threshold = np.partition(keys, n - 1)[n - 1]
        candidates = candidates[keys <= threshold]
        keys = keys[keys <= threshold]
    return candidates[np.lexsort((candidates, keys))][:n]


class Images:
    """Which image a row is: its file (a relative path resolved against the folder it was scored from),
    or its URL. Two scores files may hold the same image; a section shows each image once."""

    def __init__(self, table: pa.Table, roots: Roots) -> None:
        self.paths, self.roots = table.column(PATH), roots

    def __call__(self, row: int) -> str:
        path = str(self.paths[row].as_py())
        return path if "://" in path else os.path.normpath(os.path.join(self.roots(row), path))


def _distinct(
    values: np.ndarray, candidates: np.ndarray, n: int, descending: bool, image: Images, shown: set[str]
) -> np.ndarray:
    """As ``_ranked``, skipping a row whose image is in ``shown`` or came earlier (another scores file's
    row of it); the images taken are added to ``shown``."""
    take = n
    while True:
        kept, seen = [], set(shown)
        chosen = _ranked(values, candidates, take, descending)
        for row in chosen.tolist():
            if (key := image(row)) not in seen:
                seen.add(key)
                kept.append(row)
            if len(kept) == n:
                break
        if len(kept) == n or chosen.size == candidates.size:
            shown.update(seen)
            return np.array(kept, dtype=np.int64)
        take *= 2  # repeated images filled the first ``take``: look further down the ranking


def task_section(table: pa.Table, roots: Roots, task: Task, top: int) -> TaskSection | None:
    column = task.sort_column
    if column not in table.column_names or (task.labels and task.name not in table.column_names):
        return None
    ok = table.column(ERROR).is_null() if ERROR in table.column_names else pa.array([True] * table.num_rows)
    # error rows and missing scores become NaN: they take no part in statistics, histograms or rankings
    values = pc.if_else(ok, table.column(column), None).to_numpy(zero_copy_only=False).astype(np.float64)
    scored = np.flatnonzero(np.isfinite(values))
    section = TaskSection(task, column, int(scored.size), histogram(values), statistics(values))
    image, shown = Images(table, roots), set[str]()

    def rows(n: int, descending: bool, among: np.ndarray = scored) -> list[Row]:
        return _rows(table, roots, _distinct(values, among, n, descending, image, shown), column, task)

    if not task.labels:
        if scored.size <= 2 * top:  # a top and a bottom would overlap: each image once, ranked
            section.ranked = rows(top * 2, True)
        else:
            section.top, section.bottom = rows(top, True), rows(top, False)
        return section
    labels = table.column(task.name).to_numpy(zero_copy_only=False)
    per_class = max(1, math.ceil(top / 4))
    for label in task.labels:
        mine = scored[labels[scored] == label]
        section.classes.append((label, int(mine.size), rows(per_class, True, mine)))
    return section


def gather(paths: Sequence[str], top: int = 24) -> ReportData:
    """Everything a report of these scores files shows."""
    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    table, roots, provenance = read_report_table(paths)
    errors = (
        table.filter(table.column(ERROR).is_valid()) if ERROR in table.column_names else table.slice(0, 0)
    )
    shown = errors.slice(0, MAX_ERRORS_SHOWN)
    error_rows = list(zip(shown.column(PATH).to_pylist(), (shown.column(ERROR).to_pylist() if shown.num_rows
                                                             else []), strict=True))  # fmt: skip
    sections = [s for t in all_tasks().values() if (s := task_section(table, roots, t, top)) is not None]
    return ReportData(list(paths), table.num_rows, errors.num_rows, error_rows, sections, provenance)
