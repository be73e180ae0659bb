"""``--incremental OLD``: an earlier scores file whose rows are reused where a file is unchanged (same path,
size and mtime), so only new and changed files are scored."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from perceptscore import remote
from perceptscore.columns import ERROR, FILE_MTIME, FILE_SIZE, PATH
from perceptscore.containers import is_container
from perceptscore.errors import UsageError
from perceptscore.formats import is_scores_file, read_scores
from perceptscore.items import Item
from perceptscore.locators import DATASET_ROW, TAR_SCHEME, TarMember
from perceptscore.tasks import Task


class Previous:
    """Rows to reuse, by path: from ``--incremental``'s file (``read``), and from an interrupted run whose
    inputs changed (``absorb``: its rows are as good as any where the file is unchanged)."""

    def __init__(self, tasks: Sequence[Task], keep: bool = False) -> None:
        self.columns = [c for t in tasks for c in t.columns]
        self.rows: dict[str, dict[str, Any]] = {}
        self.skipped = 0
        self.keep = keep  # --retry-errors: every scored row is kept as it is, its file not looked at
        self.occurrences: dict[str, list[dict[str, Any] | None]] = {}  # keeping: each path's rows, in order
        self._kept: dict[int, dict[str, Any]] = {}  # keeping: item index -> its row of OLD (``tracked``)
        self._containers: set[int] = set()  # keeping: the items that are containers (a shard read again)
        self._member_seen: dict[str, int] = {}  # keeping: their rows matched so far, by path
        self._covered: set[str] | None = None  # the containers some row here came from (``covers``)

    @classmethod
    def read(cls, path: str, tasks: Sequence[Task], keep: bool = False, named: str | None = None) -> Previous:
        """``path``: a local scores file (a copy of ``named``, when that is a URL)."""
        option = "--retry-errors" if keep else "--incremental"
        shown_as = remote.without_secrets(named or path)
        if not is_scores_file(path):
            raise UsageError(f"{option} {shown_as!r}: not a scores file written by perceptscore score")
        previous = cls(tasks, keep)
        table = read_scores(path)
        missing = [c for c in previous._needed if c not in table.column_names]
        if missing:
            raise UsageError(
                f"{option} {shown_as!r} lacks column(s) {', '.join(missing)}: it was written for other "
                f"tasks or by an older perceptscore; score without {option} once"
            )
        previous.absorb(table)
        return previous

    @property
    def _needed(self) -> list[str]:
        return [PATH, ERROR, FILE_SIZE, FILE_MTIME, *self.columns]

    def absorb(self, table: pa.Table) -> None:
        """Take ``table``'s scored rows (later ones win: they are newer). Keeping (``--retry-errors``),
        every row is taken in order, so a path that appears twice (a tar member name repeated in its
        shard) is matched occurrence by occurrence, never to another occurrence's score."""
        self._covered = None  # recounted when next asked
        for row in table.select(self._needed).to_pylist():
            if self.keep:
                self.occurrences.setdefault(row[PATH], []).append(row if row[ERROR] is None else None)
            elif row[ERROR] is None:
                self.rows[row[PATH]] = row

    def tracked(self, items: Iterable[Item]) -> Iterator[Item]:
        """Keeping: match every item, in input order, to its path's next row of OLD, before anything
        filters the items (a resumed run skips the rows its shards hold): a path's n-th item gets the
        n-th row, so repeated paths never trade scores."""
        seen: dict[str, int] = {}  # per pass: a run started over matches from the start again
        self._kept.clear()
        self._containers.clear()
        self._member_seen.clear()
        for item in items:
            if is_container(item.locator):  # its rows are matched as they are read (``reusable``)
                self._containers.add(item.index)
                yield item
                continue
            rows = self.occurrences.get(item.path, [])
            n = seen[item.path] = seen.get(item.path, -1) + 1
            if n < len(rows) and rows[n] is not None:
                self._kept[item.index] = rows[n]
            yield item

    def covers(self, container: str) -> bool:
        """Whether rows of the container at ``container`` (a shard's URL, a dataset file) are here: then
        its rows are read where this run can match them (their bytes' size and stat), not whole."""
        if self._covered is None:
            paths = self.occurrences if self.keep else self.rows
            self._covered = {c for c in map(container_of, paths) if c is not None}
        return container in self._covered

    def _member(self, item: Item) -> dict[str, Any] | None:
        """A row of a container read again (a failed shard's member): OLD's row of the same path, the n-th
        for the n-th (the rows scored before the shard broke off are kept, not scored twice)."""
        rows = self.occurrences.get(item.path, [])
        n = self._member_seen[item.path] = self._member_seen.get(item.path, -1) + 1
        return rows[n] if n < len(rows) else None

    def reusable(self, item: Item) -> dict[str, Any] | None:
        """The old row for ``item`` (its core columns) if its file is unchanged, else None."""
        if self.keep:
            old = (
                self._kept.pop(item.index, None) if item.index not in self._containers else self._member(item)
            )
            if old is None or item.error:
                return None
            self.skipped += 1
            return {PATH: item.path, **{c: old[c] for c in self.columns}, ERROR: None,
                    FILE_SIZE: old[FILE_SIZE], FILE_MTIME: old[FILE_MTIME]}  # fmt: skip
        old = self.rows.get(item.path)
        if old is None or item.error:
            return None
        stat = item.locator.stat()
        if stat is None or stat != (old[FILE_SIZE], old[FILE_MTIME]):
            return None
        self.skipped += 1
        return {PATH: item.path, **{c: old[c] for c in self.columns}, ERROR: None,
                FILE_SIZE: stat[0], FILE_MTIME: stat[1]}  # fmt: skip


def container_of(path: str) -> str | None:
    """The container a row's path names: a tar member's shard, a dataset row's file; else None."""
    if path.startswith(TAR_SCHEME) and "::" in path:
        return TarMember(path).parts()[1]
    found = DATASET_ROW.match(path) if "::" in path else None
    return found.group("file") if found else None
