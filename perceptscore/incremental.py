"""``--incremental OLD``: an earlier scores file whose rows are reused where a file is unchanged (same path,
size and mtime), so only new and changed files are scored."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perceptscore.columns import ERROR, FILE_MTIME, FILE_SIZE, PATH
from perceptscore.errors import UsageError
from perceptscore.formats import is_scores_file, read_scores
from perceptscore.sources import Item
from perceptscore.tasks import Task


class Previous:
    def __init__(self, path: str, tasks: Sequence[Task]) -> None:
        if not (Path(path).is_file() and is_scores_file(path)):
            raise UsageError(f"--incremental {path!r}: not a scores file written by perceptscore score")
        table = read_scores(path)
        self.columns = [c for t in tasks for c in t.columns]
        needed = [PATH, ERROR, FILE_SIZE, FILE_MTIME, *self.columns]
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise UsageError(
                f"--incremental {path!r} lacks column(s) {', '.join(missing)}: it was written for other "
                "tasks or by an older perceptscore; score without --incremental once"
            )
        self.rows = {row[PATH]: row for row in table.select(needed).to_pylist() if row[ERROR] is None}
        self.skipped = 0

    def reusable(self, item: Item) -> dict[str, Any] | None:
        """The old row for ``item`` (its core columns) if its file is unchanged, else None."""
        old = self.rows.get(item.path)
        if old is None or item.error:
            return None
        stat = item.locator.stat()
        if stat is None or stat != (old[FILE_SIZE], old[FILE_MTIME]):
            return None
        self.skipped += 1
        return {PATH: item.path, **{c: old[c] for c in self.columns}, ERROR: None,
                FILE_SIZE: stat[0], FILE_MTIME: stat[1]}  # fmt: skip
