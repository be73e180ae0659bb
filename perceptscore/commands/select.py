"""``perceptscore rank`` and ``perceptscore filter``: scored rows (from scores files, stdin, or scoring now)
ranked or selected, and the kept files written as rows, listed, copied or symlinked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from perceptscore import select
from perceptscore.columns import PATH
from perceptscore.commands.score import MakeReporter, Scored, scored_rows, write_list, write_rows
from perceptscore.errors import UsageError
from perceptscore.formats import format_of
from perceptscore.plan import ScoreOptions
from perceptscore.tasks import get_task


def ranked(
    inputs: Sequence[str] | None,
    task: str,
    options: ScoreOptions,
    make_reporter: MakeReporter,
    top: int,
    ascending: bool,
) -> tuple[pd.DataFrame, Scored]:
    """The top rows by one task's score, and the rows they were taken from."""
    spec = get_task(task)
    scored = scored_rows(inputs, options, make_reporter)
    select.require_columns(scored.frame, [spec], "input")
    return select.rank(scored.frame, spec, top, ascending), scored


@dataclass
class Kept:
    rows: pd.DataFrame
    scored: Scored
    placed: int = 0
    failed: list[str] = field(default_factory=list)  # files that could not be copied or symlinked

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else self.scored.outcome.exit_code


def keep(
    inputs: Sequence[str] | None,
    criteria: select.Criteria,
    options: ScoreOptions,
    make_reporter: MakeReporter,
    copy_to: Path | None = None,
    symlink_to: Path | None = None,
    out: str | None = None,
) -> Kept:
    """The rows meeting ``criteria``; their files placed into ``copy_to``/``symlink_to``; the rows (table
    formats) or their paths (any other name) written to ``out``."""
    criteria.validate()
    if copy_to and symlink_to:
        raise UsageError("choose one of --copy-to and --symlink-to")
    scored = scored_rows(inputs, options, make_reporter)
    select.require_columns(scored.frame, criteria.tasks(), "input")
    kept = Kept(select.select(scored.frame, criteria), scored)
    paths = kept.rows[PATH].tolist()
    folder = copy_to or symlink_to
    if folder is not None:
        placed, kept.failed = select.place(paths, folder, symlink=symlink_to is not None)
        kept.placed = len(placed)
    if out and format_of(out) is not None:
        write_rows(kept.rows, out, scored.provenance)
    elif out:
        write_list(paths, out)
    return kept
