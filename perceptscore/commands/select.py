"""``perceptscore rank`` and ``perceptscore filter``: scored rows (from scores files, stdin, or scoring now)
ranked or selected, and the kept files written as rows, listed, copied or symlinked."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from perceptscore import select
from perceptscore.columns import FILE_MTIME, FILE_SIZE, PATH
from perceptscore.commands.score import MakeReporter, Scored, scored_rows, write_list, write_rows
from perceptscore.errors import UsageError
from perceptscore.formats import format_of
from perceptscore.images import is_image
from perceptscore.locators import LocalFile
from perceptscore.plan import ScoreOptions
from perceptscore.remote import scheme
from perceptscore.replacing import refuse_replacing
from perceptscore.safety import check_list_output, refuse_overwriting_an_input
from perceptscore.sinks import check_output
from perceptscore.tasks import get_task


@dataclass(frozen=True)
class Ranking:
    """What rank sorts by (a numeric column), the tasks to score for it, and what a table shows beside it:
    each task's score and each classifier's label."""

    column: str
    tasks: list[str]
    scores: list[str]
    labels: list[str]

    @property
    def shown(self) -> list[str]:
        return [self.column, *self.scores, *self.labels]


def ranking(task: str | None, by: str | None) -> Ranking:
    """``-t TASK``: by its score; ``--by COLUMN`` (with or without -t): by that column."""
    if task is None and by is None:
        raise UsageError("rank needs -t TASK or --by COLUMN (e.g. --by emotion_awe)")
    column = select.resolve_column(by, "--by") if by is not None else get_task(str(task)).sort_column
    tasks = [*([get_task(task)] if task is not None else []), *select.tasks_of([column])]
    tasks = list({t.name: t for t in tasks}.values())
    scores = [t.sort_column for t in tasks if t.sort_column != column]
    labels = [t.name for t in tasks if t.labels]
    return Ranking(column, [t.name for t in tasks], scores, labels)


def ranked(
    inputs: Sequence[str] | None,
    plan: Ranking,
    options: ScoreOptions,
    make_reporter: MakeReporter,
    top: int,
    ascending: bool,
    out: str | None = None,
    overwrite: bool = False,
) -> tuple[pd.DataFrame, Scored]:
    """The top rows by ``plan``'s column, and the rows they were taken from."""
    if out is not None:
        check_output(out)
        refuse_overwriting_an_input(out, inputs or [])
        refuse_replacing(out, "scores", overwrite)
    scored = scored_rows(inputs, options, make_reporter)
    select.require_columns(scored.frame, [plan.column, *plan.scores], "input", text=plan.labels)
    return select.rank(scored.frame, plan.column, top, ascending), scored


def column_options(
    args: Sequence[str], known: Sequence[str] = ()
) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """``filter``'s arguments as Typer passed them through (options it does not declare are kept among
    the inputs) -> (the inputs, minimum and maximum per column). ``--min-COLUMN X``, ``--max-COLUMN X``
    and ``--min-COLUMN=X`` for any numeric column (checked later, with the rest of the criteria); any
    other option is one line, with the likely one from ``known`` (the command's own options)."""
    inputs: list[str] = []
    bounds: dict[str, dict[str, float]] = {"min": {}, "max": {}}
    tokens = iter(args)
    for token in tokens:
        # a file whose name starts with "-" (given after "--", which Click takes away) is an input
        if token == "-" or not token.startswith("-") or os.path.lexists(token):
            inputs.append(token)
            continue
        option, eq, value = token.partition("=")
        side, _, column = option[2:].partition("-")
        if not option.startswith("--") or side not in bounds or not column:
            hint = difflib.get_close_matches(option, known, n=1)
            raise UsageError(f"no such option: {option}" + (f" (did you mean {hint[0]}?)" if hint else ""))
        value = value if eq else next(tokens, "")
        bounds[side][column] = _number(option, value)
    return inputs, bounds["min"], bounds["max"]


def _number(option: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if math.isnan(number):
        raise UsageError(f"{option} needs a number, got {value!r}" if value else f"{option} needs a number")
    return number


@dataclass
class Kept:
    rows: pd.DataFrame
    scored: Scored
    placed: int = 0
    already: int = 0  # files found already placed (a rerun), not placed again
    failed: list[str] = field(default_factory=list)  # files that could not be copied or symlinked
    unlisted: list[str] = field(default_factory=list)  # names a line-based list cannot hold

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.unlisted else self.scored.outcome.exit_code


def keep(
    inputs: Sequence[str] | None,
    criteria: select.Criteria,
    options: ScoreOptions,
    make_reporter: MakeReporter,
    copy_to: Path | None = None,
    symlink_to: Path | None = None,
    out: str | None = None,
    print0: bool = False,
    overwrite: bool = False,
) -> Kept:
    """The rows meeting ``criteria``; their files placed into ``copy_to``/``symlink_to`` (each checked to
    be the very file scored, and an image); the rows (table formats) or their paths (a list file, or - for
    stdout) written to ``out``."""
    criteria.validate()
    if copy_to and symlink_to:
        raise UsageError("choose one of --copy-to and --symlink-to")
    if out is not None:
        if format_of(out) is not None:
            check_output(out)
        else:
            check_list_output(out)
        refuse_overwriting_an_input(out, inputs or [])
        refuse_replacing(out, "scores" if format_of(out) is not None else "list", overwrite)
    scored = scored_rows(inputs, options, make_reporter)
    labels = ["emotion"] if criteria.emotions else []
    select.require_columns(scored.frame, criteria.columns(), "input", text=labels)
    kept = Kept(select.select(scored.frame, criteria), scored)
    folder = copy_to or symlink_to
    if folder is not None:
        _place(kept, folder, symlink_to is not None)
    if out and format_of(out) is not None:
        write_rows(kept.rows, out, scored.provenance)
    elif out:
        paths = kept.rows[PATH].tolist()
        kept.unlisted = [] if print0 else [p for p in paths if "\n" in p or "\r" in p]
        unlisted = set(kept.unlisted)
        listed = [p for p in paths if p not in unlisted]
        write_list(listed, out, "\0" if print0 else "\n")
    return kept


def _place(kept: Kept, folder: Path, symlink: bool) -> None:
    """Kept files that are still as scored, copied or linked into ``folder`` (those already there
    counted), and the folder's record of them brought up to date."""
    files, kept.failed = _still_as_scored(kept.rows, kept.scored)
    placement = select.place(files, folder, symlink=symlink)
    kept.placed, kept.already = placement.placed, placement.already
    kept.failed += placement.failed
    try:
        select.write_placement_map(folder, placement.mapped)
    except OSError as exc:
        kept.failed.append(f"{folder}/{select.RECORD}: {exc.strerror or exc}")


def _still_as_scored(rows: pd.DataFrame, scored: Scored) -> tuple[list[tuple[str, str]], list[str]]:
    """(path as recorded, file to read) for every row whose file is still the one scored (size and mtime
    as recorded) and an image; one message for each other. A forged or stale scores file cannot make
    filter copy an arbitrary file."""
    files, failed = [], []
    sizes = rows[FILE_SIZE].tolist() if FILE_SIZE in rows else [None] * len(rows)
    mtimes = rows[FILE_MTIME].tolist() if FILE_MTIME in rows else [None] * len(rows)
    for row, path, size, mtime in zip(rows.index, rows[PATH].tolist(), sizes, mtimes, strict=True):
        src = os.path.join(scored.root(row), path)  # an absolute path stays as it is
        recorded = None if pd.isna(size) or pd.isna(mtime) else (int(size), int(mtime))
        if scheme(path) is not None:  # an object behind a URL, or a tar member
            failed.append(f"{path}: not a local file (copied and linked files are local; -o lists any row)")
        elif recorded is None:
            failed.append(f"{path}: no file size and mtime recorded, so it cannot be checked; score it again")
        elif LocalFile(src).stat() != recorded:
            failed.append(f"{path}: changed or gone since it was scored")
        elif not is_image(src):
            failed.append(f"{path}: not an image")
        else:
            files.append((path, src))
    return files, failed
