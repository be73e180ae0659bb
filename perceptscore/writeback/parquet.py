"""``to_parquet``: the kept rows of parquet / arrow datasets, with every column they had, plus the scores.

A parquet file is read one row group at a time, and only the row groups that hold kept rows; an arrow file
(``save_to_disk``'s stream format) one record batch at a time. The rows are taken as arrow values, never
decoded or converted, so image bytes (and every other column) are written as they were read. Within a
source file the rows keep the file's order; files come in the order the rows first name them.

The output is the hub layout, ``data/train-00000-of-0000N.parquet`` of at most ``rows_per_file`` rows:
written under temporary names, renamed once N is known. The first file's schema metadata is kept, its
``huggingface`` features extended with the score columns' (so ``datasets`` loads the ``Image`` feature
as it was), and a ``perceptscore`` key lists the score columns: a later write-back of this output replaces
them, while a column of the user's own under a score column's name is refused, never written over.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from perceptscore import tables
from perceptscore.errors import UsageError
from perceptscore.sinks import create_new
from perceptscore.writeback._common import (
    Missing,
    Stat,
    WrittenBack,
    check_columns,
    column_values,
    expected_stat,
    prepare_folder,
    same_stat,
    shown,
)

OURS = b"perceptscore"  # schema metadata key: the columns a write-back added
SPLIT = "train"
_DTYPES = {
    **{getattr(pa, n)(): n for n in ("float16", "float32", "float64", "bool_", "string", "large_string")},
    **{getattr(pa, f"{s}int{b}")(): f"{s}int{b}" for s in ("", "u") for b in (8, 16, 32, 64)},
    pa.null(): "null",
}


class ColumnClash(UsageError):
    """A score column would replace a column of the user's own: the whole write-back stops, in one line."""


@dataclass
class _Row:
    uri: str
    column: str  # the image column the row was scored from
    position: int  # its row in the scores table, for its score values
    stat: Stat | None  # (size, digest) of its image bytes when scored


def to_parquet(
    rows: pd.DataFrame, out_dir: Path, *, score_columns: Sequence[str], rows_per_file: int = 100_000
) -> WrittenBack:
    """The kept dataset rows with all their columns and the score columns, into ``out_dir/data/``."""
    if rows_per_file < 1:
        raise UsageError(f"rows per file must be at least 1 (got {rows_per_file})")
    columns = check_columns(rows, score_columns)
    scores = _score_table(rows, columns)
    out = prepare_folder(out_dir)
    result, missing = WrittenBack(), Missing()
    plan = _plan(rows, missing)
    writer = _PartsWriter(out / "data", rows_per_file, scores.schema)
    try:
        for file, wanted in plan.items():
            _copy_file(file, wanted, scores, writer, missing)
        result.files = writer.finish()
    finally:
        writer.abort()  # removes the temporary parts after a failure; nothing once finished
    result.samples, result.missing = writer.rows, missing.lines()
    return result


def _score_table(rows: pd.DataFrame, columns: list[str]) -> pa.Table:
    try:
        scores = rows[columns].copy()
        scores.attrs = {}  # a scores frame carries its Arrow schema there: nothing for pandas metadata
        return pa.Table.from_pandas(scores, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise UsageError(
            f"score columns can't be written to parquet ({' '.join(str(exc).split())[:200]})"
        ) from None


def _plan(rows: pd.DataFrame, missing: Missing) -> dict[str, dict[int, _Row]]:
    """file -> row number -> kept row, files in first-appearance order; a row that is no dataset row is a
    missing line, a row named twice is written once."""
    plan: dict[str, dict[int, _Row]] = {}
    sizes, versions = column_values(rows, "file_size"), column_values(rows, "file_mtime_ns")
    for i, uri in enumerate(rows["path"].tolist()):
        parsed = tables.parse_row_uri(uri) if isinstance(uri, str) else None
        if parsed is None:
            missing.add(i, str(uri), "not a dataset row (its row can't be written to parquet)")
            continue
        file, column, number = parsed
        plan.setdefault(file, {}).setdefault(
            number, _Row(uri, column, i, expected_stat(sizes[i], versions[i]))
        )
    return plan


def _copy_file(
    file: str, wanted: dict[int, _Row], scores: pa.Table, writer: _PartsWriter, missing: Missing
) -> None:
    """The wanted rows of one file, read a row group (or record batch) at a time; whatever is not found or
    can't be read is a missing line per row."""
    broken = ""
    try:
        with tables.open_table(file) as f:
            schema, chunks = _source(file, f, sorted(wanted))
            broken = writer.refusal(schema, file)
            if not broken:
                for first, chunk in chunks:
                    _take(first, chunk, wanted, scores, writer, missing)
                    if not wanted:
                        break
    except FileNotFoundError:
        broken = "unreadable file (no such file)"
    except (pa.ArrowException, OSError, ValueError) as exc:
        broken = f"unreadable file ({' '.join(str(exc).split())[:200]})"
    except ColumnClash:
        raise
    except UsageError as exc:  # this file's, not the run's: hf:// without huggingface_hub, a bad file:// URL
        broken = str(exc)
    for number, row in wanted.items():
        missing.add(row.position, row.uri, broken or f"no row {number} in {shown(file)}")


def _source(file: str, f: Any, numbers: list[int]) -> tuple[pa.Schema, Iterator[tuple[int, pa.Table]]]:
    """The file's schema, and (first row number, table) of each row group holding a wanted row (parquet)
    or of each record batch (arrow)."""
    if not file.split("?", 1)[0].lower().endswith(".arrow"):
        parquet = pq.ParquetFile(f)
        return parquet.schema_arrow, _row_groups(parquet, numbers)
    reader = tables.arrow_reader(f)
    return reader.schema, _batches(tables.arrow_batches(reader))


def _row_groups(parquet: pq.ParquetFile, numbers: list[int]) -> Iterator[tuple[int, pa.Table]]:
    first = 0
    for part in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(part).num_rows
        at = bisect.bisect_left(numbers, first)
        if at < len(numbers) and numbers[at] < first + size:  # some wanted row is in this group
            yield first, parquet.read_row_group(part)
        first += size


def _batches(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[int, pa.Table]]:
    first = 0
    for batch in batches:
        yield first, pa.Table.from_batches([batch])
        first += batch.num_rows


def _take(
    first: int,
    chunk: pa.Table,
    wanted: dict[int, _Row],
    scores: pa.Table,
    writer: _PartsWriter,
    missing: Missing,
) -> None:
    """The wanted rows of one chunk, written with their scores; they leave ``wanted`` either way."""
    offsets, positions = [], []
    for number in sorted(n for n in wanted if first <= n < first + chunk.num_rows):
        row = wanted.pop(number)
        problem = _changed(chunk, number - first, row)
        if problem:
            missing.add(row.position, row.uri, problem)
            continue
        offsets.append(number - first)
        positions.append(row.position)
    if offsets:
        writer.write(chunk.take(offsets), scores.take(positions))


def _changed(chunk: pa.Table, offset: int, row: _Row) -> str:
    """Why the row's image is no longer the one scored ("" if it is, or if the table has no record)."""
    if row.column not in chunk.column_names:
        return f"the file changed since it was scored (no column {row.column!r})"
    if row.stat is None:
        return ""
    value = chunk.column(row.column)[offset].as_py()
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, bytes) or not same_stat(row.stat, len(data), tables.bytes_version(data)):
        return "the file changed since it was scored (this row's image differs)"
    return ""


class _PartsWriter:
    """Rows into ``train-NNNNN`` parts of at most ``per_file`` rows under temporary names; ``finish``
    names them ``train-NNNNN-of-NNNNN.parquet`` once their number is known."""

    def __init__(self, folder: Path, per_file: int, scores: pa.Schema) -> None:
        self._folder, self._per_file, self._scores = folder, per_file, scores
        self._schema: pa.Schema | None = None  # the output's, set by the first file's
        self._source: pa.Schema | None = None  # the first file's, metadata aside
        self._writer: pq.ParquetWriter | None = None
        self._sink: Any = None  # the part's file: ParquetWriter leaves a file object it was given open
        self._temps: list[Path] = []
        self._in_file = 0
        self.rows = 0

    def refusal(self, schema: pa.Schema, file: str) -> str:
        """Why this file's rows can't go with the rows written so far ("" if they can); the first file
        sets the output's schema (a column of the user's that a score column would replace: one line)."""
        if self._source is None:
            self._schema = output_schema(schema, self._scores, file)
            self._source = schema.remove_metadata()
        if schema.remove_metadata() != self._source:
            return "its columns differ from the first file's; write it back separately"
        return ""

    def write(self, chunk: pa.Table, scores: pa.Table) -> None:
        assert self._schema is not None
        names = [n for n in chunk.column_names if n not in scores.column_names]
        arrays = [chunk.column(n) for n in names] + list(scores.columns)
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._open()
            assert self._writer is not None
            n = min(table.num_rows - offset, self._per_file - self._in_file)
            self._writer.write_table(table.slice(offset, n))
            offset, self._in_file, self.rows = offset + n, self._in_file + n, self.rows + n
            if self._in_file == self._per_file:
                self._close_part()

    def _open(self) -> None:
        self._folder.mkdir(exist_ok=True)
        tmp = self._folder / f".{SPLIT}-{len(self._temps):05d}.parquet.partial-{os.getpid()}"
        self._temps.append(tmp)
        self._sink = os.fdopen(create_new(tmp), "wb")
        self._writer = pq.ParquetWriter(self._sink, self._schema)
        self._in_file = 0

    def _close_part(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            if self._sink is not None:
                self._sink.close()
            self._writer = self._sink = None

    def finish(self) -> list[str]:
        self._close_part()
        total = len(self._temps)
        files = []
        for i, tmp in enumerate(self._temps):
            final = self._folder / f"{SPLIT}-{i:05d}-of-{total:05d}.parquet"
            os.replace(tmp, final)
            files.append(str(final))
        self._temps = []
        return files

    def abort(self) -> None:
        self._close_part()
        for tmp in self._temps:
            tmp.unlink(missing_ok=True)
        self._temps = []


def output_schema(source: pa.Schema, scores: pa.Schema, file: str) -> pa.Schema:
    """The source's columns (less earlier score columns a write-back added), then the score columns; the
    source's metadata with its ``huggingface`` features extended and ``perceptscore`` listing ours."""
    metadata = dict(source.metadata or {})
    ours = _ours(metadata)
    theirs = [n for n in scores.names if n in source.names and n not in ours]
    if theirs:
        raise ColumnClash(
            f"{shown(file)} has a column {theirs[0]!r} of its own, which a score column would replace; "
            "rename it in the dataset first"
        )
    fields = [f for f in source if f.name not in scores.names] + list(scores)
    metadata[OURS] = json.dumps({"columns": list(dict.fromkeys([*ours, *scores.names]))}).encode()
    features = _features(metadata)
    if features is not None:
        for f in scores:
            features[f.name] = _feature(f)
        info = json.loads(metadata[b"huggingface"])
        info["info"]["features"] = features
        metadata[b"huggingface"] = json.dumps(info).encode()
    return pa.schema(fields, metadata=metadata)


def _ours(metadata: dict[bytes, bytes]) -> list[str]:
    try:
        columns = json.loads(metadata.get(OURS, b"{}")).get("columns", [])
    except (ValueError, AttributeError):
        return []
    return [c for c in columns if isinstance(c, str)] if isinstance(columns, list) else []


def _features(metadata: dict[bytes, bytes]) -> dict[str, Any] | None:
    """``datasets``' features of the source (None when it has none, or they are not what datasets wrote)."""
    try:
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
    except (KeyError, ValueError, TypeError):
        return None
    return features if isinstance(features, dict) else None


def _feature(field: pa.Field) -> dict[str, Any]:
    """A score column as a ``datasets`` feature: a ``Value`` of its arrow type."""
    if field.type in _DTYPES:
        return {"dtype": _DTYPES[field.type].rstrip("_"), "_type": "Value"}
    try:  # anything rarer: datasets' own mapping, when it is installed
        import datasets

        return datasets.Features.from_arrow_schema(pa.schema([field])).to_dict()[field.name]
    except ImportError:
        return {"dtype": str(field.type), "_type": "Value"}
