"""Containers: one input item whose rows are read out of it where it is decoded (a tar shard, a dataset's
row group). ``Sources`` yields a container as ONE item, so whoever reads its bytes is the process that
decodes them: an engine that ``reads_containers`` (Ray) runs ``rows()`` on its workers and the driver
never holds an image's bytes; for the others ``scoring`` expands it in the scoring process, as before.

Every row of a container carries the container's item index (a run's shards, ``--resume`` and the
output's order count a container as one item: it is the unit of resume, as in img2dataset). A
container's rows come with their own passthrough values (``shard``, ``key``, the dataset's columns);
the item's own (a manifest row's) win over them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, runtime_checkable

import pyarrow as pa

from perceptscore.errors import DecodeError
from perceptscore.items import Item
from perceptscore.locators import Locator, Unavailable

if TYPE_CHECKING:
    from perceptscore.tables import Dataset, ReadTask

Row = tuple[Locator, dict[str, Any]]  # where one row's bytes are, and its passthrough values


@runtime_checkable
class Container(Protocol):
    """A locator whose item is many rows. ``schema``: the run's passthrough columns, so every reader
    types the rows' values alike (Ray blocks of one column must share a type)."""

    schema: pa.Schema

    @property
    def uri(self) -> str: ...

    def rows(self) -> Iterator[Row]:
        """The rows in order; never raises for a bad member (its row carries why)."""
        ...


def is_container(locator: object) -> bool:
    return isinstance(locator, (ShardRows, TableRows))


class _NotOneImage:
    """What a container answers where a single image's locator is asked (``Locator``)."""

    uri: str

    def stat(self) -> tuple[int, int] | None:
        return None  # never reused as one file by --incremental: its rows are read again

    def open(self) -> BinaryIO:
        raise DecodeError("a container of images, not one image")  # a bug if reached: expand it first


@dataclass(frozen=True)
class ShardRows(_NotOneImage):
    """A tar shard (local or remote): a row per image member (``shards.members``)."""

    shard: str
    fields: tuple[tuple[str, str], ...] = ()  # ``shards.columns``' answer, as pairs (hashable)
    schema: pa.Schema = field(default_factory=lambda: pa.schema([]), compare=False)

    @property
    def uri(self) -> str:  # type: ignore[override]
        return self.shard

    def rows(self) -> Iterator[Row]:
        from perceptscore import shards

        return shards.members(self.shard, dict(self.fields))


@dataclass(frozen=True)
class TableRows(_NotOneImage):
    """One read task of a dataset (a parquet row group, an arrow file): a row per table row."""

    dataset: Dataset = field(compare=False)
    task: ReadTask
    schema: pa.Schema = field(default_factory=lambda: pa.schema([]), compare=False)

    @property
    def uri(self) -> str:  # type: ignore[override]
        return self.task.file  # a file's row groups are several items of the same uri, as its rows share it

    def rows(self) -> Iterator[Row]:
        return self.dataset.read(self._here())

    def _here(self) -> ReadTask:
        """The task as this machine reads it: a remote file's local copy exists only where it was made
        (the driver); elsewhere the file is read from its URL."""
        from perceptscore import remote

        local = self.task.local
        if local != self.task.file and not remote.is_remote(local) and not os.path.exists(local):
            return replace(self.task, local=self.task.file)
        return self.task


def expand(item: Item) -> Iterator[Item]:
    """A container item's rows as items of the container's index (the item's own passthrough values win
    over its rows'); any other item as it is."""
    if not is_container(item.locator):
        yield item
        return
    if item.error:  # a manifest row refused before it was read: one row, with the reason
        yield item
        return
    container: Container = item.locator  # type: ignore[assignment]
    for part, (locator, extras) in enumerate(container.rows()):
        reason = locator.reason if isinstance(locator, Unavailable) else None
        yield Item(item.index, locator, {**extras, **item.extras}, error=reason, part=part)


def description(container: Container) -> str:
    """A container as JSON, to cross a pipe to the process that reads it (``--processes`` children): what
    it reads and the run's passthrough schema, never its rows or bytes."""
    from perceptscore.tables import schema_text

    schema = schema_text(container.schema)
    if isinstance(container, ShardRows):
        return json.dumps({"shard": container.shard, "fields": container.fields, "schema": schema})
    assert isinstance(container, TableRows)
    task = container.task
    return json.dumps({"dataset": container.dataset.description(task), "schema": schema,
                       "task": [task.file, task.local, task.part, task.first_row]})  # fmt: skip


def described(text: str) -> Container:
    from perceptscore.tables import Dataset, ReadTask, schema_of_text

    found = json.loads(text)
    schema = schema_of_text(found["schema"])
    if "shard" in found:
        return ShardRows(str(found["shard"]), tuple((str(k), str(v)) for k, v in found["fields"]), schema)
    file, local, part, first = found["task"]
    task = ReadTask(str(file), str(local), int(part), int(first))
    return TableRows(Dataset.described(found["dataset"]), task, schema)
