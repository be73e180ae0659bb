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
from perceptscore.containers import expand, is_container
from perceptscore.engines import Engine
from perceptscore.incremental import Previous
from perceptscore.items import EXTRAS, ITEM, Item
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
    """Every item's rows, in input order: scored by ``engine``, or reused from ``previous``. Closing this
    generator closes the engine's run (its worker processes end then, not at interpreter exit).
    ``starting`` is called when the engine is about to start (a model about to load), if it does.

    A container item (a tar shard, a dataset's read task: ``containers``) gives any number of rows, each
    with the container's index. An engine that ``reads_containers`` gets it whole and says which item
    each row is (``ITEM``, with the row's own values in ``EXTRAS``); for any other engine it is expanded
    here into an item per row, and rows come back one per item fed, as for every other item."""
    whole = bool(getattr(engine, "reads_containers", False))
    match = _Matcher(passthrough, core_schema(plan.task_specs()))

    def to_engine() -> Iterator[Item]:
        for item in items:
            # a container some of whose rows ``previous`` holds is read here: its rows are matched
            mine = whole and not (previous and is_container(item.locator) and previous.covers(item.path))
            for one in [item] if mine else expand(item):
                row = previous.reusable(one) if previous else None  # a dataset's row: by its bytes
                if row is not None:
                    match.reused.append((one, row))
                    continue
                match.fed.append(one)
                yield one

    feed = to_engine()
    first = next(feed, None)  # every item reused (a quiet night): the engine never starts, no model loads
    if first is not None and starting is not None:
        starting()
    batches = engine.run(plan, chain([first], feed)) if first is not None else _no_batches()
    with contextlib.closing(batches):  # type: ignore[type-var]
        for batch in batches:
            yield from match.by_item(batch) if ITEM in batch.schema.names else match.one_each(batch)
    yield from match.finish()


class _Matcher:
    """Rows from an engine matched back to the items fed to it, reused rows put between them by index."""

    def __init__(self, passthrough: pa.Schema, schema: pa.Schema) -> None:
        self.passthrough, self.schema = passthrough, schema
        self.fed: deque[Item] = deque()  # sent to the engine, rows not (all) back yet
        self.reused: deque[tuple[Item, dict[str, Any]]] = deque()

    def one_each(self, batch: pa.RecordBatch) -> Iterator[Rows]:
        """A row per item fed, in order (containers before them have ended: their rows were given)."""
        while self.fed and is_container(self.fed[0].locator):
            self.fed.popleft()
        mine = [self.fed.popleft() for _ in range(batch.num_rows)]
        start = 0
        for position, item in enumerate(mine):  # reused rows between this batch's rows go between them
            if self.reused and self.reused[0][0].order < item.order:
                if position > start:
                    part = batch.slice(start, position - start)
                    yield _matched(mine[start:position], part, self.passthrough)
                start = position
                yield from self.reused_before(item.order)
        yield _matched(mine[start:], batch.slice(start), self.passthrough)

    def by_item(self, batch: pa.RecordBatch) -> Iterator[Rows]:
        """Rows that name their item (``ITEM``): a container's rows share its index, and a container may
        have none; every other item has exactly one."""
        owners = batch.column(ITEM).to_pylist()
        own = batch.column(EXTRAS).to_pylist() if EXTRAS in batch.schema.names else [None] * len(owners)
        core = batch.select(self.schema.names)
        start, extras = 0, []
        for position, index in enumerate(owners):
            item = self._owner(index)
            # a row of a container read here (matched to ``previous``) has its own place among its rows
            order = (index, 0) if is_container(item.locator) else item.order
            if self.reused and self.reused[0][0].order < order:
                if position > start:
                    yield _rows(owners[start:position], core.slice(start, position - start), extras,
                                self.passthrough)  # fmt: skip
                start, extras = position, []
                yield from self.reused_before(order)
            if is_container(item.locator):
                extras.append({**(own[position] or {}), **item.extras})
            else:
                extras.append(item.extras)
                self.fed.popleft()  # one row each: done
        if start < len(owners):
            yield _rows(owners[start:], core.slice(start), extras, self.passthrough)

    def _owner(self, index: int) -> Item:
        """The fed item a row of ``index`` belongs to; containers before it are done (maybe rowless)."""
        while self.fed and self.fed[0].index < index and is_container(self.fed[0].locator):
            self.fed.popleft()
        if not self.fed or self.fed[0].index != index:
            expected = self.fed[0].index if self.fed else None
            raise RuntimeError(f"the engine returned a row of item {index}, expected {expected}")
        return self.fed[0]

    def finish(self) -> Iterator[Rows]:
        while self.fed and is_container(self.fed[0].locator):  # rowless containers at the end
            self.fed.popleft()
        if self.fed:
            raise RuntimeError(f"the engine returned no row for item {self.fed[0].index}")
        yield from self.reused_before(None)

    def reused_before(self, order: tuple[int, int] | None) -> Iterator[Rows]:
        """The reused rows that go before ``order`` (all of them: None)."""
        reused = self.reused
        while reused and (order is None or reused[0][0].order < order):
            taken = []
            while reused and (order is None or reused[0][0].order < order) and len(taken) < _REUSED_ROWS:
                taken.append(reused.popleft())
            batch = pa.RecordBatch.from_pylist([row for _, row in taken], schema=self.schema)
            yield _matched([item for item, _ in taken], batch, self.passthrough)


def _no_batches() -> Iterator[pa.RecordBatch]:
    yield from ()


_REUSED_ROWS = 1024  # reused rows go on in batches of at most this many (one shard need not hold them all)


def _matched(items: list[Item], batch: pa.RecordBatch, passthrough: pa.Schema) -> Rows:
    return [i.index for i in items], with_passthrough(batch, [i.extras for i in items], passthrough)


def _rows(
    indices: list[int], batch: pa.RecordBatch, extras: list[dict[str, Any]], passthrough: pa.Schema
) -> Rows:
    return indices, with_passthrough(batch, extras, passthrough)


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
