"""Engines run a ``ScoringPlan`` over items: ``run(plan, items)`` yields Arrow record batches of the core
columns (``columns.core_schema``) in input order, one row per item, error rows included. Counting,
progress, incremental reuse, passthrough columns, shards and sinks are the caller's (``scoring``), the
same whatever the engine.

- ``local``: DataLoader decode workers in this process's machine, with crash and hang isolation;
- ``process``: several scoring processes (one per GPU), each a local engine, fed and merged here;
- ``ray``: Ray Data tasks decode and a pool of model actors scores, across a cluster (extra ``[ray]``).

A new engine is one module here and one line in ``ENGINES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from perceptscore.errors import UsageError

if TYPE_CHECKING:
    from perceptscore.items import Item
    from perceptscore.plan import ScoringPlan


class Engine(Protocol):
    name: str  # as provenance records it

    def run(self, plan: ScoringPlan, items: Iterable[Item]) -> Iterator[pa.RecordBatch]: ...

    def describe(self, plan: ScoringPlan) -> str:
        """Where it ran, for provenance."""
        ...


ENGINES = {
    "local": "perceptscore.engines.local:LocalEngine",
    "process": "perceptscore.engines.process:ProcessEngine",
    "ray": "perceptscore.engines.ray:RayEngine",
}
EXTRAS = {"ray": "ray"}  # the engines that need an optional extra, and the module that tells it is there


def create(name: str, **options: Any) -> Engine:
    """The engine called ``name``, imported only now (an engine may need an optional extra)."""
    module, _, cls = ENGINES[name].partition(":")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != EXTRAS.get(name):
            raise
        raise UsageError(f"--engine {name} needs {exc.name}: pip install 'perceptscore[{name}]'") from None
    return getattr(loaded, cls)(**options)  # type: ignore[no-any-return]
