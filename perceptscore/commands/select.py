"""``perceptscore rank`` and ``perceptscore filter``: scored rows (from scores files, stdin, or scoring now)
ranked or selected, and the kept files written as rows, listed, copied or symlinked."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from perceptscore import select
from perceptscore._text import shown
from perceptscore.columns import FILE_MTIME, FILE_SIZE, PATH
from perceptscore.commands.score import MakeReporter, Scored, scored_rows, write_list, write_rows
from perceptscore.errors import UsageError
from perceptscore.folders import check_output_folder
from perceptscore.formats import format_of
from perceptscore.images import is_image
from perceptscore.locators import LocalFile
from perceptscore.plan import ScoreOptions
from perceptscore.remote import scheme
from perceptscore.replacing import refuse_replacing
from perceptscore.safety import check_list_output, refuse_overwriting_an_input
from perceptscore.shards import KEY, SHARD
from perceptscore.sinks import check_output
from perceptscore.tables import ROW
from perceptscore.tasks import get_task

if TYPE_CHECKING:
    from perceptscore.writeback import WrittenBack


@dataclass(frozen=True)
class Ranking:
    """What rank sorts by (a numeric column), the tasks to score for it, and what a table shows beside it:
    each task's score and each classifier's label."""

    column: str
    tasks: list[str]
    scores: list[str]
    labels: list[str]
    percentiles: bool = False  # each score's percentile among all the input's rows, written with the rows

    @property
    def shown(self) -> list[str]:
        rated = [select.percentile_column(self.column)] if self.percentiles else []
        return [self.column, *rated, *self.scores, *self.labels]


def ranking(task: str | None, by: str | None, percentiles: bool = False) -> Ranking:
    """``-t TASK``: by its score; ``--by COLUMN`` (with or without -t): by that column. ``percentiles``:
    with ``<column>_percentile`` for each task's score and the column ranked by."""
    if task is None and by is None:
        raise UsageError("rank needs -t TASK or --by COLUMN (e.g. --by emotion_awe)")
    column = select.resolve_column(by, "--by") if by is not None else get_task(str(task)).sort_column
    tasks = [*([get_task(task)] if task is not None else []), *select.tasks_of([column])]
    tasks = list({t.name: t for t in tasks}.values())
    scores = [t.sort_column for t in tasks if t.sort_column != column]
    labels = [t.name for t in tasks if t.labels]
    return Ranking(column, [t.name for t in tasks], scores, labels, percentiles)


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
    frame = scored.frame
    if plan.percentiles:  # over every input row, not only the top ones shown
        frame = select.with_percentiles(frame, select.percentile_columns(frame, [plan.column]))
    return select.rank(frame, plan.column, top, ascending), scored


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


@dataclass(frozen=True)
class Wanted:
    """What filter writes besides the kept paths: the kept rows or paths (``out``), the kept files copied
    or linked, the dropped rows and why (``rejected``), the kept samples written back into new shards or a
    parquet dataset, and percentile columns on every row written."""

    out: str | None = None
    print0: bool = False
    copy_to: Path | None = None
    symlink_to: Path | None = None
    rejected: str | None = None
    to_shards: Path | None = None
    to_parquet: Path | None = None
    samples_per_shard: int | None = None
    percentiles: bool = False
    overwrite: bool = False

    @property
    def write_back(self) -> tuple[str, Path] | None:
        """(the option, its folder) of a write-back asked for, if any."""
        if self.to_shards is not None:
            return "--to-shards", self.to_shards
        return ("--to-parquet", self.to_parquet) if self.to_parquet is not None else None

    def check(self, inputs: Sequence[str]) -> None:
        """Refuse now, before anything is scored or read, what could not be written or would replace
        something the user did not name as this output (an input, the other output, a full folder)."""
        if self.copy_to and self.symlink_to:
            raise UsageError("choose one of --copy-to and --symlink-to")
        if self.to_shards is not None and self.to_parquet is not None:
            raise UsageError("choose one of --to-shards and --to-parquet")
        if self.samples_per_shard is not None and self.to_shards is None:
            raise UsageError("--samples-per-shard goes with --to-shards")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise UsageError(f"--samples-per-shard must be at least 1, got {self.samples_per_shard}")
        if self.out is not None:
            if format_of(self.out) is not None:
                check_output(self.out)
            else:
                check_list_output(self.out)
            refuse_overwriting_an_input(self.out, inputs)
            refuse_replacing(
                self.out, "scores" if format_of(self.out) is not None else "list", self.overwrite
            )
        if self.rejected is not None:
            self._check_rejected(self.rejected, inputs)
        if self.write_back is not None:
            _check_new_folder(*self.write_back)

    def _check_rejected(self, rejected: str, inputs: Sequence[str]) -> None:
        if rejected != "-" and format_of(rejected) is None:
            raise UsageError(
                f"--rejected {rejected!r}: the dropped rows go to a .csv, .parquet or .jsonl file"
            )
        if rejected == "-" and self.out == "-":
            raise UsageError("--rejected -: the kept paths already go to stdout; name a file for either")
        if rejected != "-" and os.path.isdir(rejected):
            raise UsageError(f"--rejected {rejected!r} is a folder: name the file to write")
        if self.out not in (None, "-") and os.path.abspath(self.out) == os.path.abspath(rejected):
            raise UsageError(
                f"-o and --rejected both name {rejected!r}: the kept and the dropped rows need two files"
            )
        check_output(rejected)
        refuse_overwriting_an_input(rejected, inputs)
        refuse_replacing(rejected, "scores", self.overwrite, option="--rejected")


def _check_new_folder(option: str, folder: Path) -> None:
    """A write-back goes into a new or empty folder whose parent exists (a mistyped path scatters
    nothing): said now, not after scoring."""
    if os.path.lexists(folder) and not (folder.is_dir() and not any(folder.iterdir())):
        raise UsageError(
            f"{option} {shown(str(folder))}: exists and is not an empty folder; name a new or empty folder"
        )
    check_output_folder(folder)


@dataclass
class Kept:
    rows: pd.DataFrame
    scored: Scored
    placed: int = 0
    already: int = 0  # files found already placed (a rerun), not placed again
    failed: list[str] = field(default_factory=list)  # files that could not be copied or symlinked
    unlisted: list[str] = field(default_factory=list)  # names a line-based list cannot hold
    written: WrittenBack | None = None  # what --to-shards / --to-parquet wrote, and what it could not
    written_line: str = ""  # "wrote N samples to K shards in OUTDIR"
    wanted: Wanted = field(default_factory=Wanted)

    @property
    def not_written(self) -> list[str]:
        return self.written.missing if self.written is not None else []

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.unlisted or self.not_written else self.scored.outcome.exit_code

    def lines(self, quiet: bool) -> list[tuple[str, str]]:
        """What filter says on stderr, as (a red label or "", the text shown): what was placed and written
        back and the kept count (not with -q), and every file or sample that could not be (always)."""
        folder = self.wanted.copy_to or self.wanted.symlink_to
        said: list[tuple[str, str]] = []
        if folder is not None and not quiet:
            verb = "symlinked" if self.wanted.symlink_to else "copied"
            there = f", {self.already} already there" if self.already else ""
            said.append(("", f"{verb} {_count(self.placed, 'file')} to {shown(str(folder))}{there}"))
        said += [("not placed:", shown(m)) for m in (self.failed if folder is not None and not quiet else [])]
        said += [("not listed:", f"{shown(p)}: a newline in its name (--print0)") for p in self.unlisted]
        said += [("not placed:", shown(m)) for m in (self.failed if folder is not None and quiet else [])]
        said += [("", self.written_line)] if self.written_line and not quiet else []
        said += [("not written:", shown(m)) for m in self.not_written]
        said += [] if quiet else [("", f"kept {len(self.rows)} of {self.scored.outcome.rows} files")]
        return said


def keep(
    inputs: Sequence[str] | None,
    criteria: select.Criteria,
    options: ScoreOptions,
    make_reporter: MakeReporter,
    wanted: Wanted,
) -> Kept:
    """The rows meeting ``criteria``; their files placed into ``copy_to``/``symlink_to`` (each checked to
    be the very file scored, and an image); the rows (table formats) or their paths (a list file, or - for
    stdout) written to ``out``; the other rows, each with why, to ``rejected``; the kept samples written
    back (``to_shards``/``to_parquet``)."""
    criteria.validate()
    wanted.check(inputs or [])
    scored = _scored(inputs, criteria, options, make_reporter)
    labels = ["emotion"] if criteria.emotions else []
    select.require_columns(scored.frame, criteria.columns(), "input", text=labels)
    if wanted.write_back is not None:
        _require_rows(scored.frame, wanted.write_back[0])
    frame = scored.frame
    if wanted.percentiles:  # over every input row, before any is dropped
        rated = select.percentile_columns(frame, [criteria.by] if criteria.by else [])
        frame = select.with_percentiles(frame, rated)
    kept = Kept(select.select(frame, criteria), scored, wanted=wanted)
    folder = wanted.copy_to or wanted.symlink_to
    if folder is not None:
        _place(kept, folder, wanted.symlink_to is not None)
    if wanted.out:
        _write_kept(kept, wanted.out, wanted.print0)
    if wanted.rejected:
        write_rows(select.rejected(frame, criteria), wanted.rejected, scored.provenance)
    if wanted.write_back is not None:
        _write_back(kept, wanted)
    return kept


def _scored(
    inputs: Sequence[str] | None,
    criteria: select.Criteria,
    options: ScoreOptions,
    make_reporter: MakeReporter,
) -> Scored:
    """The rows to select from. ``--all`` names no task, so it can only take rows already scored: images
    given with it are said in words a curator can act on, not as the planner's "no task given"."""
    try:
        return scored_rows(inputs, options, make_reporter)
    except UsageError as exc:
        if criteria.every and not options.tasks and str(exc).startswith("no task given"):
            raise UsageError(
                "--all keeps the rows of scores files: score the images first "
                "(perceptscore score INPUTS -t TASK -o scores.parquet), then filter scores.parquet --all"
            ) from None
        raise


def _write_kept(kept: Kept, out: str, print0: bool) -> None:
    """The kept rows (a table format) or their paths (a list: a name with a newline is left out, said)."""
    if format_of(out) is not None:
        write_rows(kept.rows, out, kept.scored.provenance)
        return
    paths = kept.rows[PATH].tolist()
    kept.unlisted = [] if print0 else [p for p in paths if "\n" in p or "\r" in p]
    unlisted = set(kept.unlisted)
    listed = [p for p in paths if p not in unlisted]
    write_list(listed, out, "\0" if print0 else "\n")


# What each write-back needs of a row: the columns its readers gave it.
_ROWS_FOR = {
    "--to-shards": ((SHARD, KEY), "rows read from .tar shards"),
    "--to-parquet": ((SHARD, ROW), "rows read from a parquet or arrow dataset"),
}


def _require_rows(frame: pd.DataFrame, option: str) -> None:
    """One line, naming what the input holds, when it has none of the rows ``option`` writes back."""
    needed, what = _ROWS_FOR[option]
    if all(c in frame.columns for c in needed) and frame[needed[-1]].notna().any():
        return
    holds = next((w for o, (c, w) in _ROWS_FOR.items() if o != option and all(x in frame.columns for x in c)),
                 "rows of image files")  # fmt: skip
    columns = ", ".join(map(str, frame.columns))
    raise UsageError(
        f"{option} needs {what} (columns {' and '.join(needed)}); "
        f"the input holds {holds} (columns: {columns})"
    )


def _write_back(kept: Kept, wanted: Wanted) -> None:
    """The kept rows' samples (or dataset rows) written into a new folder with their score columns."""
    from perceptscore import writeback  # only when asked: it reads tar shards and parquet datasets

    scores = select.score_columns(kept.rows)
    if wanted.to_shards is not None:
        per_shard = wanted.samples_per_shard or 10_000
        kept.written = writeback.to_shards(
            kept.rows, wanted.to_shards, score_columns=scores, samples_per_shard=per_shard
        )
        unit, folder = "shard", wanted.to_shards
    else:
        assert wanted.to_parquet is not None
        kept.written = writeback.to_parquet(kept.rows, wanted.to_parquet, score_columns=scores)
        unit, folder = "file", wanted.to_parquet
    done = kept.written
    kept.written_line = (
        f"wrote {_count(done.samples, 'sample')} to {_count(len(done.files), unit)} in {shown(str(folder))}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


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
