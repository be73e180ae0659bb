"""An item: one row to produce. Its own module because engines, runs, scoring, the trainer and a dozen
others need the type, not the sources that make items (and the pyarrow and fsspec those import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from perceptscore.locators import Locator


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
