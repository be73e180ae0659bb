"""``scoring.scored`` and ``consume`` on their own: the one loop from items to rows, with the local engine
and a tiny model, and with an engine of the test's own where what is observed is the engine's side of
the contract (what it was fed, when its run was closed)."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from rich.console import Console

from perceptscore import engines
from perceptscore.columns import ERROR, FILE_MTIME, FILE_SIZE, PATH, core_schema
from perceptscore.incremental import Previous
from perceptscore.items import Item
from perceptscore.locators import LocalFile
from perceptscore.plan import ScoreOptions, ScoringPlan, make_plan
from perceptscore.progress import Reporter
from perceptscore.scoring import Outcome, consume, scored

REUSED = 12.5  # no model gives this score: a reused row is recognisable


@pytest.fixture(scope="module")
def plan(release_checkpoints, photo_dir: Path) -> ScoringPlan:
    checkpoint = str(release_checkpoints["memorability"][0])
    # batches of one: a row's score does not depend on the rows batched with it (float32 rounding)
    options = ScoreOptions(["memorability"], {"memorability": checkpoint}, device="cpu", precision="fp32",
                           batch_size=1, workers=0)  # fmt: skip
    return make_plan(options, [str(photo_dir)])


@pytest.fixture(scope="module")
def photos(photo_dir: Path) -> list[str]:
    found = sorted(str(p) for p in photo_dir.iterdir() if p.suffix.lower() in {".jpg", ".png", ".webp"})
    assert len(found) >= 5
    return found


def _items(paths: list[str]) -> list[Item]:
    return [Item(i, LocalFile(p), {"n": i}) for i, p in enumerate(paths)]


def _old_row(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {
        PATH: path,
        "memorability": REUSED,
        ERROR: None,
        FILE_SIZE: st.st_size,
        FILE_MTIME: st.st_mtime_ns,
    }


def _all(rows: Iterable[tuple[list[int], pa.RecordBatch]]) -> tuple[list[int], pa.Table]:
    indices, batches = [], []
    for got, batch in rows:
        assert len(got) == batch.num_rows
        indices += got
        batches.append(pa.Table.from_batches([batch]))
    return indices, pa.concat_tables(batches)


PASSTHROUGH = pa.schema([("n", pa.int64())])


def test_rows_come_in_input_order_with_reused_rows_between_scored_ones(
    plan: ScoringPlan, photos: list[str]
) -> None:
    """Rows 0, 2 and the last are reused (their files unchanged): every row comes back once, in input
    order, the reused ones as they were, the others as the same engine scores them with nothing to reuse."""
    items = _items(photos)
    reuse = {0, 2, len(items) - 1}
    previous = Previous(plan.task_specs())
    previous.absorb(pa.Table.from_pylist([_old_row(photos[i]) for i in sorted(reuse)]))
    with contextlib.closing(scored(engines.create("local"), plan, items, PASSTHROUGH, previous)) as rows:
        indices, table = _all(rows)
    with contextlib.closing(scored(engines.create("local"), plan, items, PASSTHROUGH)) as rows:
        _, fresh = _all(rows)
    assert indices == list(range(len(items)))
    assert table.column(PATH).to_pylist() == photos
    assert table.column("n").to_pylist() == list(range(len(items)))  # each item's own passthrough values
    scores, expected = table.column("memorability").to_pylist(), fresh.column("memorability").to_pylist()
    assert [s for i, s in enumerate(scores) if i in reuse] == [REUSED] * len(reuse)
    assert [s for i, s in enumerate(scores) if i not in reuse] == [
        s for i, s in enumerate(expected) if i not in reuse
    ]
    assert REUSED not in expected and previous.skipped == len(reuse)


class _Recorded:
    """An engine of the test's own: a row per item (its score: the file's size in KB), three a batch,
    recording what it was fed and whether its run was closed."""

    name = "recorded"

    def __init__(self) -> None:
        self.fed: list[int] = []
        self.closed = False
        self.started = 0

    def run(self, plan: ScoringPlan, items: Iterable[Item]) -> Iterator[pa.RecordBatch]:
        self.started += 1
        schema, batch = core_schema(plan.task_specs()), []
        try:
            for item in items:
                self.fed.append(item.index)
                size = os.path.getsize(item.path)
                batch.append({PATH: item.path, "memorability": size / 1000, ERROR: None, FILE_SIZE: size})
                if len(batch) == 3:
                    yield pa.RecordBatch.from_pylist(batch, schema=schema)
                    batch = []
            if batch:
                yield pa.RecordBatch.from_pylist(batch, schema=schema)
        finally:
            self.closed = True

    def describe(self, plan: ScoringPlan) -> str:
        return "the test"


def test_closing_the_rows_closes_the_engines_run(plan: ScoringPlan, photos: list[str]) -> None:
    engine = _Recorded()
    rows = scored(engine, plan, _items(photos), PASSTHROUGH)
    indices, batch = next(rows)
    assert indices == [0, 1, 2] and not engine.closed
    assert batch.column("memorability").to_pylist() == [os.path.getsize(p) / 1000 for p in photos[:3]]
    rows.close()
    assert engine.closed  # its workers would end now, not at interpreter exit


def test_with_every_row_reused_the_engine_never_starts(plan: ScoringPlan, photos: list[str]) -> None:
    engine, starting = _Recorded(), []
    previous = Previous(plan.task_specs())
    previous.absorb(pa.Table.from_pylist([_old_row(p) for p in photos]))
    rows = scored(engine, plan, _items(photos), PASSTHROUGH, previous, lambda: starting.append(1))
    indices, table = _all(rows)
    assert indices == list(range(len(photos))) and table.column("memorability").to_pylist() == [REUSED] * len(
        photos
    )
    assert engine.started == 0 and engine.fed == [] and starting == []  # no model loads on a quiet night


def test_consume_hands_on_counts_and_stops_after_the_batch_a_signal_came_in(
    plan: ScoringPlan, photos: list[str]
) -> None:
    items = _items(photos)
    handled: list[list[int]] = []
    outcome = Outcome()
    reporter = Reporter(Console(file=io.StringIO()), len(items))
    asked = iter([None, KeyboardInterrupt()])  # a signal arrives during the second batch
    with (
        contextlib.closing(scored(_Recorded(), plan, items, PASSTHROUGH)) as rows,
        pytest.raises(KeyboardInterrupt),
    ):
        consume(rows, reporter, lambda i, batch: handled.append(i), outcome, stop=lambda: next(asked))
    assert handled == [[0, 1, 2], list(range(3, min(6, len(items))))]  # the second batch handled, then stop
    assert outcome.rows == sum(map(len, handled)) and outcome.errors == 0


def test_consume_counts_error_rows(plan: ScoringPlan, photos: list[str]) -> None:
    schema = core_schema(plan.task_specs())
    batch = pa.RecordBatch.from_pylist(
        [{PATH: "a.jpg", "memorability": 0.5, ERROR: None}, {PATH: "b.jpg", ERROR: "empty file"}],
        schema=schema,
    )
    outcome, handled = Outcome(), []
    consume(iter([([0, 1], batch)]), Reporter(Console(file=io.StringIO()), 2), lambda i, b: handled.append(i),
            outcome)  # fmt: skip
    assert handled == [[0, 1]] and (outcome.rows, outcome.errors, outcome.exit_code) == (2, 1, 1)
