"""What a report shows, computed from scores files: counts, per-task histograms, the top and bottom rows,
emotion's classes, the error rows and the provenance. Reads only the columns it needs; numbers only, no
HTML (``commands/report.py`` renders them with the template) and no torch."""

from __future__ import annotations

import bisect
import math
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
class Histogram:
    edges: list[float]  # BINS + 1 bin edges
    counts: list[int]


@dataclass
class TaskSection:
    task: Task
    column: str  # the number shown and sorted by: display score, or emotion's confidence
    scored: int
    histogram: Histogram
    top: list[Row] = field(default_factory=list)
    bottom: list[Row] = field(default_factory=list)
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
        if format_of(path) is None or not is_scores_file(path):
            raise UsageError(
                f"{path}: not a scores file written by perceptscore score (.csv/.parquet/.jsonl)"
            )
        about = recorded_provenance(read_provenance(path))
        table = read_columns(path, _wanted)
        if PATH not in table.column_names:
            raise UsageError(f"{path}: has no {PATH} column")
        roots.starts.append(sum(t.num_rows for t in tables))
        roots.folders.append(str(about.get("cwd") or "."))
        tables.append(table)
        provenance.append((path, about))
    return pa.concat_tables(tables, promote_options="default"), roots, provenance


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
    """Counts of the finite values in ``bins`` equal bins between their minimum and maximum."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return Histogram([], [])
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(finite, bins=bins, range=(low, high))
    return Histogram(edges.tolist(), counts.tolist())


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


def task_section(table: pa.Table, roots: Roots, task: Task, top: int) -> TaskSection | None:
    column = task.sort_column
    if column not in table.column_names or (task.labels and task.name not in table.column_names):
        return None
    ok = table.column(ERROR).is_null() if ERROR in table.column_names else pa.array([True] * table.num_rows)
    # error rows and missing scores become NaN: they take no part in histograms or rankings
    values = pc.if_else(ok, table.column(column), None).to_numpy(zero_copy_only=False).astype(np.float64)
    scored = np.flatnonzero(np.isfinite(values))
    section = TaskSection(task, column, int(scored.size), histogram(values))
    if not task.labels:
        section.top = _rows(table, roots, _ranked(values, scored, top, True), column, task)
        section.bottom = _rows(table, roots, _ranked(values, scored, top, False), column, task)
        return section
    labels = table.column(task.name).to_numpy(zero_copy_only=False)
    per_class = max(1, math.ceil(top / 4))
    for label in task.labels:
        mine = scored[labels[scored] == label]
        best = _rows(table, roots, _ranked(values, mine, per_class, True), column, task)
        section.classes.append((label, int(mine.size), best))
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
