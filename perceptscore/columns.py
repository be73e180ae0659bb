"""The columns of a scores file, declared once: ``path``, each task's columns, ``error``, ``file_size``,
``file_mtime_ns``, then the manifests' passthrough columns. Rows travel as Arrow record batches from the
model to the sink; this module builds them. No torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from perceptscore._text import redact
from perceptscore.tasks import Task

PATH, ERROR, FILE_SIZE, FILE_MTIME = "path", "error", "file_size", "file_mtime_ns"
_FILE_FIELDS = [
    pa.field(ERROR, pa.string()),
    pa.field(FILE_SIZE, pa.int64()),
    pa.field(FILE_MTIME, pa.int64()),
]


def task_fields(task: Task) -> list[pa.Field]:
    """A task's typed columns: the label of a classifier is a string, every number a float64."""
    return [
        pa.field(c, pa.string() if c == task.name and task.labels else pa.float64()) for c in task.columns
    ]


def core_schema(tasks: Sequence[Task]) -> pa.Schema:
    """What an engine produces: the path, the tasks' columns, the error and the file's size and mtime."""
    return pa.schema(
        [pa.field(PATH, pa.string()), *(f for t in tasks for f in task_fields(t)), *_FILE_FIELDS]
    )


def output_schema(tasks: Sequence[Task], passthrough: pa.Schema | None = None) -> pa.Schema:
    """The columns of a scores file for these tasks, typed, then the manifests' passthrough columns."""
    return pa.schema([*core_schema(tasks), *(passthrough or [])])


def output_columns(tasks: Sequence[Task]) -> list[str]:
    """The names of ``core_schema``: a manifest column of one of these names passes through renamed."""
    return core_schema(tasks).names


def scored_batch(
    tasks: Sequence[Task],
    uris: Sequence[str],
    errors: Sequence[str | None],
    stats: Sequence[tuple[int, int] | None],
    values: Mapping[str, Sequence[Any]],
) -> pa.RecordBatch:
    """One batch of ``core_schema`` rows. ``values`` holds each task column's values for the rows without
    an error, in order; error rows get nulls there."""
    ok = np.array([e is None for e in errors], dtype=bool)
    position = np.cumsum(ok) - 1
    schema = core_schema(tasks)
    arrays: list[pa.Array] = [pa.array(list(uris), pa.string())]
    for field in schema:
        if field.name in (PATH, ERROR, FILE_SIZE, FILE_MTIME):
            continue
        column = values.get(field.name, [])
        arrays.append(pa.array([column[position[i]] if ok[i] else None for i in range(len(ok))], field.type))
    # the one way into an error cell: a backend's message may echo a credential (redact says which)
    arrays.append(pa.array([e if e is None else redact(e) for e in errors], pa.string()))
    arrays.append(pa.array([s[0] if s else None for s in stats], pa.int64()))
    arrays.append(pa.array([s[1] if s else None for s in stats], pa.int64()))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def with_passthrough(
    batch: pa.RecordBatch, extras: Sequence[Mapping[str, Any]], passthrough: pa.Schema
) -> pa.RecordBatch:
    """A core batch with the manifests' columns of its rows appended (null where a row has none)."""
    if not len(passthrough):
        return batch
    arrays = [*batch.columns, *(pa.array([e.get(f.name) for e in extras], f.type) for f in passthrough)]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema([*batch.schema, *passthrough]))


def error_count(batch: pa.RecordBatch | pa.Table) -> int:
    return batch.num_rows - batch.column(ERROR).null_count
