"""``incremental.Previous`` on its own: which old rows a run may reuse (``reusable``) and, keeping every row
(``--retry-errors``), which old row is each item's (``tracked``), without scoring anything."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perceptscore.columns import ERROR, FILE_MTIME, FILE_SIZE, PATH
from perceptscore.errors import UsageError
from perceptscore.incremental import Previous
from perceptscore.items import Item
from perceptscore.locators import LocalFile
from perceptscore.sinks import FileSink, writing
from perceptscore.tasks import get_task

TASKS = [get_task("memorability")]


def _file(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _row(path: Path | str, score: float | None, error: str | None = None) -> dict[str, Any]:
    """A scores file's row for ``path`` as it is on disk now (its size and mtime)."""
    st = os.stat(path) if Path(path).exists() else None
    return {PATH: str(path), "memorability": score, ERROR: error,
            FILE_SIZE: st.st_size if st else None, FILE_MTIME: st.st_mtime_ns if st else None}  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=_schema())


def _schema() -> pa.Schema:
    return pa.schema([(PATH, pa.string()), ("memorability", pa.float64()), (ERROR, pa.string()),
                      (FILE_SIZE, pa.int64()), (FILE_MTIME, pa.int64())])  # fmt: skip


def _items(paths: list[Path | str]) -> list[Item]:
    return [Item(i, LocalFile(str(p))) for i, p in enumerate(paths)]


def test_an_unchanged_file_reuses_its_row_and_a_changed_or_failed_one_does_not(tmp_path: Path) -> None:
    same, touched, grown, failed = (_file(tmp_path, f"{n}.jpg", b"x" * 10) for n in "abcd")
    old = _table([_row(same, 0.25), _row(touched, 0.5), _row(grown, 0.75), _row(failed, None, "bad")])
    os.utime(touched, ns=(1, 1_000_000_000))  # the same size, another mtime
    grown.write_bytes(b"x" * 11)
    previous = Previous(TASKS)
    previous.absorb(old)
    items = _items([same, touched, grown, failed, tmp_path / "new.jpg"])
    reused = [previous.reusable(item) for item in items]
    assert reused[0] == _row(same, 0.25)  # the core columns, its stat as it is now
    assert reused[1:] == [None, None, None, None]
    assert previous.skipped == 1
    assert previous.reusable(Item(9, LocalFile(str(same)), error="unreadable")) is None  # an item's error


def test_a_later_row_of_the_same_path_wins(tmp_path: Path) -> None:
    photo = _file(tmp_path, "a.jpg", b"jpeg")
    previous = Previous(TASKS)
    previous.absorb(_table([_row(photo, 0.1)]))
    previous.absorb(_table([_row(photo, 0.9)]))  # an interrupted run's rows: newer
    row = previous.reusable(_items([photo])[0])
    assert row is not None and row["memorability"] == 0.9


def test_keeping_matches_a_repeated_path_occurrence_by_occurrence(tmp_path: Path) -> None:
    """--retry-errors: the n-th item of a path gets the n-th old row of that path; an old error row is
    scored again; the file is not looked at (it may be gone); a second pass matches from the start."""
    gone = tmp_path / "gone.jpg"
    old = _table([_row(gone, 0.1), _row("x.jpg", None, "bad"), _row(gone, 0.3), _row(gone, None, "bad")])
    previous = Previous(TASKS, keep=True)
    previous.absorb(old)
    items = _items([gone, "x.jpg", gone, gone])
    for _ in range(2):
        tracked = list(previous.tracked(items))
        assert tracked == items  # every item passes through, in order
        scores = [previous.reusable(item) for item in tracked]
        assert [s and s["memorability"] for s in scores] == [0.1, None, 0.3, None]
    assert previous.skipped == 4


def test_keeping_matches_before_a_resumed_run_skips_items(tmp_path: Path) -> None:
    """The matching happens as items go by, before anything downstream drops some of them: an item
    reached later still gets its own occurrence's row."""
    previous = Previous(TASKS, keep=True)
    previous.absorb(_table([_row("a.jpg", 0.1), _row("a.jpg", 0.2), _row("a.jpg", 0.3)]))
    items = _items(["a.jpg", "a.jpg", "a.jpg"])
    last = [item for item in previous.tracked(items) if item.index == 2]  # the first two already saved
    row = previous.reusable(last[0])
    assert row is not None and row["memorability"] == 0.3


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_read_takes_a_scores_file_and_refuses_others_in_one_line(tmp_path: Path, suffix: str) -> None:
    photo = _file(tmp_path, "a.jpg", b"jpeg")
    scores = tmp_path / f"old{suffix}"
    with writing(FileSink(str(scores)), _schema(), {"version": "test"}) as sink:
        sink.write([_row(photo, 0.5)])
    row = Previous.read(str(scores), TASKS).reusable(_items([photo])[0])
    assert row is not None and row["memorability"] == 0.5
    with pytest.raises(UsageError, match=r"lacks column.*quality.*score without --incremental once"):
        Previous.read(str(scores), [get_task("quality")])
    other = tmp_path / "plain.parquet"
    pq.write_table(_table([_row(photo, 0.5)]), other)  # no provenance: not written by score
    with pytest.raises(UsageError, match=r"--retry-errors .*plain.parquet.*not a scores file"):
        Previous.read(str(other), TASKS, keep=True)
