"""An item: one row to produce. Its own module because engines, runs, scoring, the trainer and a dozen
others need the type, not the sources that make items (and the pyarrow and fsspec those import)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from perceptscore.locators import Locator, from_wire, to_wire


@dataclass(frozen=True)
class Item:
    """One row to produce: where its bytes are, the manifest columns to pass through, or why it can't be."""

    index: int
    locator: Locator
    extras: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    part: int = 0  # a container's row: its place among the container's rows (they share ``index``)

    @property
    def order(self) -> tuple[int, int]:
        """Where the row goes in the output."""
        return self.index, self.part

    @property
    def path(self) -> str:
        """The ``path`` column's value."""
        return self.locator.uri


# An engine that reads containers (``containers``) says which item each row is, and gives a container's
# rows their own passthrough values, in these two columns besides the core ones.
ITEM, EXTRAS = "_item", "_extras"


# Items on their way to another process (a --processes child, a Ray task): the ONE wire schema. Bytes a
# locator already holds (a tar member read by the parent) travel with it; passthrough values never do.
WIRE_SCHEMA = pa.schema(
    [("row_index", pa.int64()), ("path", pa.string()), ("error", pa.string()), ("data", pa.large_binary()),
     ("known_size", pa.int64()), ("known_version", pa.int64()), ("container", pa.string())]
)  # fmt: skip
# ``container``: a container item's description (``containers.description``: what to read, as JSON), so
# the process it goes to reads its rows itself; null for any other item.


def to_wire_batch(items: Sequence[Item]) -> pa.RecordBatch:
    from perceptscore.containers import description, is_container

    wires = [to_wire(i.locator) for i in items]
    described = [description(i.locator) if is_container(i.locator) else None for i in items]  # type: ignore[arg-type]
    columns = [[i.index for i in items], [w[0] for w in wires], [i.error for i in items],
               *([w[k] for w in wires] for k in (1, 2, 3)), described]  # fmt: skip
    return pa.record_batch(columns, schema=WIRE_SCHEMA)


def from_wire_batch(batch: pa.RecordBatch | pa.Table) -> Iterator[Item]:
    from perceptscore.containers import described

    columns = (batch.column(name).to_pylist() for name in WIRE_SCHEMA.names)
    for index, uri, error, data, size, version, container in zip(*columns, strict=True):
        locator = described(container) if container is not None else from_wire(uri, data, size, version)
        yield Item(index, locator, {}, error)
