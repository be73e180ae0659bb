"""The one way from items to rows: items -> an engine -> core rows, matched back to their items (manifest
columns appended), ``--incremental``'s reused rows interleaved, in input order; then counted and handed on
(to a sink, the shards of a run, or a table) by ``consume``. Every command and engine goes through here.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import pyarrow as pa

from perceptscore.columns import core_schema, error_count, with_passthrough
from perceptscore.engines import Engine
from perceptscore.incremental import Previous
from perceptscore.items import Item
from perceptscore.plan import ScoringPlan
from perceptscore.progress import Reporter

Rows = tuple[list[int], pa.RecordBatch]  # the input indices of a batch's rows, and the rows


@dataclass
class Outcome:
    rows: int = 0
    errors: int = 0  # rows of the output that could not be scored
    scored: int = 0  # rows scored by the model in this run, without error
    resumed: int = 0  # rows taken from an interrupted run's shards
    skipped: int = 0  # rows reused from --incremental's file (unchanged files)
    discarded: int = 0  # rows of an interrupted run discarded by --restart
    salvaged: int = 0  # rows of an interrupted run whose inputs changed, reused where files are unchanged
    ignored: list[str] = field(default_factory=list)  # files in input folders passed over (not images)
    report: str | None = None  # --report: one line on the page written, or on why it could not be
    report_failed: bool = False
    uploaded_earlier: bool = False  # -o URL: the file an earlier run finished was uploaded, nothing scored
    reused_from: str | None = None  # --incremental's file, when there was one to reuse
    gone: int | None = None  # rows of the output's earlier version whose files are no longer inputs
    notes: list[str] = field(default_factory=list)  # what else a person should know about the run

    @property
    def exit_code(self) -> int:
        if self.report_failed:  # the scores are written; the page asked for is not: a usage-level failure
            return 2
        return 1 if self.errors else 0

    def count(self, rows: pa.RecordBatch | pa.Table) -> None:
        self.rows += rows.num_rows
        self.errors += error_count(rows)


def scored(
    engine: Engine,
    plan: ScoringPlan,
    items: Iterable[Item],
    passthrough: pa.Schema,
    previous: Previous | None = None,
    starting: Callable[[], None] | None = None,
) -> Iterator[Rows]:
    """Every item's row, in input order: scored by ``engine``, or reused from ``previous``. Closing this
    generator closes the engine's run (its worker processes end then, not at interpreter exit).
    ``starting`` is called when the engine is about to start (a model about to load), if it does."""
    fed: deque[Item] = deque()  # sent to the engine, row not back yet
    reused: deque[tuple[Item, dict[str, Any]]] = deque()
    schema = core_schema(plan.task_specs())

    def to_engine() -> Iterator[Item]:
        for item in items:
            row = previous.reusable(item) if previous else None
            if row is None:
                fed.append(item)
                yield item
            else:
                reused.append((item, row))

    def reused_before(index: int | None) -> Iterator[Rows]:
        while reused and (index is None or reused[0][0].index < index):
            taken = []
            while reused and (index is None or reused[0][0].index < index) and len(taken) < _REUSED_ROWS:
                taken.append(reused.popleft())
            batch = pa.RecordBatch.from_pylist([row for _, row in taken], schema=schema)
            yield _matched([item for item, _ in taken], batch, passthrough)

    feed = to_engine()
    first = next(feed, None)  # every item reused (a quiet night): the engine never starts, no model loads
    if first is not None and starting is not None:
        starting()
    batches = engine.run(plan, chain([first], feed)) if first is not None else _no_batches()
    with contextlib.closing(batches):  # type: ignore[type-var]
        for batch in batches:
            mine = [fed.popleft() for _ in range(batch.num_rows)]
            start = 0
            for position, item in enumerate(mine):  # reused rows between this batch's rows go between them
                if reused and reused[0][0].index < item.index:
                    if position > start:
                        part = batch.slice(start, position - start)
                        yield _matched(mine[start:position], part, passthrough)
                    start = position
                    yield from reused_before(item.index)
            yield _matched(mine[start:], batch.slice(start), passthrough)
    yield from reused_before(None)


def _no_batches() -> Iterator[pa.RecordBatch]:
    yield from ()


_REUSED_ROWS = 1024  # reused rows go on in batches of at most this many (one shard need not hold them all)


def _matched(items: list[Item], batch: pa.RecordBatch, passthrough: pa.Schema) -> Rows:
    return [i.index for i in items], with_passthrough(batch, [i.extras for i in items], passthrough)


def consume(
    rows: Iterable[Rows],
    reporter: Reporter,
    handle: Callable[[list[int], pa.RecordBatch], None],
    outcome: Outcome | None = None,
    stop: Callable[[], BaseException | None] | None = None,
) -> None:
    """Hand each batch to ``handle``, show progress, count it into ``outcome``; after each batch, ``stop()``
    may return an exception to end the run with (a signal asked for it; the batch is already handled)."""
    for indices, batch in rows:
        handle(indices, batch)
        reporter.advance(batch.num_rows, error_count(batch))
        if outcome is not None:
            outcome.count(batch)
        if stop is not None and (exc := stop()) is not None:
            raise exc
