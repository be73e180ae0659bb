"""The file formats, one registry entry each: suffix -> how to write it, how to read it back as scores,
and where its provenance goes (inside the file, or a ``<out>.meta.json`` sidecar). Adding a format is one
``Format`` in ``FORMATS``. No torch."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from perceptscore import parts
from perceptscore.columns import ERROR, PATH
from perceptscore.errors import UsageError

PROVENANCE_KEY = "perceptscore"  # parquet metadata key / sidecar file marking a scores file
_PARQUET_ROW_GROUP = 65_536
_ROWS_PER_READ = 16_384


class TableWriter(Protocol):
    def write(self, table: pa.Table) -> None: ...
    def close(self) -> None: ...


Strings = Sequence[str]  # columns read as strings whatever they look like (paths)


@dataclass(frozen=True)
class Format:
    suffix: str
    open_writer: Callable[[BinaryIO, pa.Schema, dict[str, Any]], TableWriter]
    read: Callable[[str], pa.Table]  # a whole scores file, exactly as written
    sidecar: bool  # provenance in <out>.meta.json (True) or in the file's own metadata (False)
    read_schema: Callable[[str, Strings], pa.Schema]  # a manifest's columns, rows unread
    read_batches: Callable[[str, Strings], Iterator[pa.RecordBatch]]  # a manifest, streamed where possible

    def provenance(self, path: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The provenance of a file written by ``perceptscore score``, or None for any other file."""
        where = meta_path(path) if self.sidecar else Path(path)
        try:
            if self.sidecar:
                raw = where.read_bytes() if where.is_file() else None
            else:
                raw = (pq.read_schema(path).metadata or {}).get(PROVENANCE_KEY.encode())
            found = None if raw is None else json.loads(raw)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise UsageError(f"{where}: unreadable provenance ({' '.join(str(exc).split())[:200]})") from None
        if found is not None and not isinstance(found, dict):
            raise UsageError(f"{where}: provenance is not a JSON object")
        return found


# A CSV cell a spreadsheet would run as a formula (OWASP's CSV injection): = + - @ tab CR, after any
# quotes. Written with one more leading quote; our readers take it off again, so round trips are exact.
_FORMULA = r"^'*[=+\-@\t\r]"


def _strings(table: pa.Table, change: Callable[[pa.ChunkedArray], pa.ChunkedArray]) -> pa.Table:
    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            table = table.set_column(i, field, change(table.column(i)))
    return table


def defuse_cell(text: str) -> str:
    """One cell, as ``defuse_formulas`` writes it (for CSV files written without pyarrow)."""
    return "'" + text if re.match(_FORMULA, text) else text


def restore_cell(text: str) -> str:
    """The inverse of ``defuse_cell``."""
    return text[1:] if re.match("^'" + _FORMULA[1:], text) else text


def defused_schema(schema: pa.Schema) -> pa.Schema:
    """A CSV header's column names as cells are written: a passthrough column named ``=HYPERLINK(...)``
    is a formula in the header row as much as in any other."""
    return pa.schema([f.with_name(defuse_cell(f.name)) for f in schema], schema.metadata)


def restore_names(table: pa.Table) -> pa.Table:
    """The inverse of ``defused_schema``, on a table read back."""
    return table.rename_columns([restore_cell(name) for name in table.column_names])


def defuse_formulas(table: pa.Table) -> pa.Table:
    """Every string cell that a spreadsheet would run as a formula, prefixed with a quote."""
    import pyarrow.compute as pc

    def defuse(column: pa.ChunkedArray) -> pa.ChunkedArray:
        quoted = pc.utf8_replace_slice(column, 0, 0, "'")  # string and large_string alike
        return pc.if_else(pc.match_substring_regex(column, _FORMULA), quoted, column)

    return _strings(table, defuse)


def restore_formulas(table: pa.Table) -> pa.Table:
    """The inverse of ``defuse_formulas``."""
    import pyarrow.compute as pc

    def restore(column: pa.ChunkedArray) -> pa.ChunkedArray:
        quoted = pc.match_substring_regex(column, "^'" + _FORMULA[1:])
        return pc.if_else(quoted, pc.utf8_slice_codeunits(column, 1), column)

    return _strings(table, restore)


def _as_text(kind: pa.DataType) -> bool:
    """A column a CSV cell can't hold as it is: nested values (structs, lists, maps) and bytes."""
    return (
        pa.types.is_nested(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
    )


def _json_default(value: Any) -> Any:
    """Bytes as base64 text (a passed-through binary column); anything else JSON lacks as its text."""
    if isinstance(value, bytes):
        import base64

        return base64.b64encode(value).decode("ascii")
    return str(value)


def json_cell(value: Any) -> str:
    if isinstance(value, bytes):
        return _json_default(value)  # a cell of bytes is the base64 text, not a quoted JSON string
    return json.dumps(_clean_nested(value), ensure_ascii=False, default=_json_default)


def csv_cells(table: pa.Table) -> pa.Table:
    """Nested columns JSON-encoded and bytes base64-encoded, one cell each: what CSV can hold (a
    dataset's struct and list columns pass through; parquet and JSONL keep them as they are)."""
    for i, field in enumerate(table.schema):
        if _as_text(field.type):
            cells = [None if v is None else json_cell(v) for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.with_type(pa.string()), pa.array(cells, pa.string()))
    return table


def _csv_schema_of(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(pa.string()) if _as_text(f.type) else f for f in schema], schema.metadata)


class _Csv:
    def __init__(self, stream: BinaryIO, schema: pa.Schema, provenance: dict[str, Any]) -> None:
        self._schema = defused_schema(_csv_schema_of(schema))
        self._writer = pacsv.CSVWriter(stream, self._schema)

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(defuse_formulas(csv_cells(table)).rename_columns(self._schema.names))

    def close(self) -> None:
        self._writer.close()


class _Parquet:
    """Few large row groups read far faster than many small ones: tables are gathered up to 64k rows."""

    def __init__(self, stream: BinaryIO, schema: pa.Schema, provenance: dict[str, Any]) -> None:
        metadata = {PROVENANCE_KEY: json.dumps(provenance)}
        self._writer = pq.ParquetWriter(stream, schema.with_metadata(metadata))
        self._pending: list[pa.Table] = []

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        if sum(t.num_rows for t in self._pending) >= _PARQUET_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending))
            self._pending = []

    def close(self) -> None:
        try:
            self._flush()
        finally:
            self._writer.close()  # left open, its destructor would write a footer into a closed stream later


class _Jsonl:
    def __init__(self, stream: BinaryIO, schema: pa.Schema, provenance: dict[str, Any]) -> None:
        self._stream = stream

    def write(self, table: pa.Table) -> None:
        self._stream.write(b"".join(_json_line(row) for row in table.to_pylist()))

    def close(self) -> None:
        pass


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _clean_nested(value: Any) -> Any:
    """``_clean`` inside structs and lists too (JSON has no NaN); a map (pyarrow gives its entries as
    (key, value) tuples) as an object when its keys are text, else as a list of {key, value}: a list of
    mixed pairs would be JSON that pyarrow's own reader refuses."""
    if isinstance(value, dict):
        return {k: _clean_nested(v) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        if all(isinstance(k, str) for k, _ in value):
            return {k: _clean_nested(v) for k, v in value}
        return [{"key": _clean_nested(k), "value": _clean_nested(v)} for k, v in value]
    if isinstance(value, (list, tuple)):
        return [_clean_nested(v) for v in value]
    return _clean(value)


def _json_line(row: dict[str, Any]) -> bytes:
    cleaned = {k: _clean_nested(v) for k, v in row.items()}
    return (json.dumps(cleaned, ensure_ascii=False, default=_json_default) + "\n").encode()


def read_csv_scores(source: str | BinaryIO) -> pa.Table:
    """A CSV scores file or stream, exactly as written: an empty cell is null (an unset ``error``), a quoted
    empty string stays an empty string, and paths are strings whatever they look like."""
    convert = pacsv.ConvertOptions(
        column_types={PATH: pa.string(), ERROR: pa.string()},
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    return restore_names(restore_formulas(pacsv.read_csv(source, convert_options=convert)))


def _read_jsonl(path: str) -> pa.Table:
    import pyarrow.json as pajson

    return pajson.read_json(path)


def _csv_reader(path: str, strings: Strings) -> pacsv.CSVStreamingReader:
    return pacsv.open_csv(
        path, convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(strings, pa.string()))
    )


def _written_by_us(path: str) -> bool:
    """A CSV with a provenance sidecar: its header's formula-like names carry a quote to take off."""
    return meta_path(path).is_file()


def _restored_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_name(restore_cell(f.name)) for f in schema], schema.metadata)


def _csv_schema(path: str, strings: Strings) -> pa.Schema:
    schema = _csv_reader(path, strings).schema
    return _restored_schema(schema) if _written_by_us(path) else schema


def _csv_batches(path: str, strings: Strings) -> Iterator[pa.RecordBatch]:
    reader = _csv_reader(path, strings)
    if not _written_by_us(path):
        return reader
    schema = _restored_schema(reader.schema)
    return (pa.RecordBatch.from_arrays(batch.columns, schema=schema) for batch in reader)


def _parquet_batches(path: str, strings: Strings) -> Iterator[pa.RecordBatch]:
    return pq.ParquetFile(path).iter_batches(batch_size=_ROWS_PER_READ)


def _jsonl_batches(path: str, strings: Strings) -> Iterator[pa.RecordBatch]:
    return iter(_read_jsonl(path).to_batches(max_chunksize=_ROWS_PER_READ))  # pyarrow has no JSONL stream


FORMATS: dict[str, Format] = {
    ".csv": Format(".csv", _Csv, read_csv_scores, True, _csv_schema, _csv_batches),
    ".parquet": Format(
        ".parquet", _Parquet, pq.read_table, False, lambda p, s: pq.read_schema(p), _parquet_batches
    ),
    ".jsonl": Format(".jsonl", _Jsonl, _read_jsonl, True, lambda p, s: _read_jsonl(p).schema, _jsonl_batches),
}


class _PartsFolder(Format):
    """A folder output's parts read as one scores table (``parts``); its provenance is in its manifest.
    Not a format anything is written in through a writer: ``runs`` writes its parts."""

    def provenance(self, path: str | os.PathLike[str]) -> dict[str, Any] | None:
        return parts.provenance(path)


def _not_written(f: BinaryIO, schema: pa.Schema, about: dict[str, Any]) -> TableWriter:
    raise UsageError("a folder of parts is written by score -o DIR/, not as one file")


PARTS = _PartsFolder("/", _not_written, parts.read, False, parts.read_schema, parts.read_batches)


def format_of(path: str | os.PathLike[str]) -> Format | None:
    """The format a file name's suffix asks for; a folder output (``parts``) as one table; else None."""
    if parts.is_scores_folder(path):
        return PARTS
    return FORMATS.get(Path(path).suffix.lower())


def meta_path(path: str | os.PathLike[str]) -> Path:
    """The provenance sidecar of a CSV/JSONL output: ``<out>.meta.json``, beside the real file when the
    output is a symlink (that is where it was written)."""
    real = os.path.realpath(path) if os.path.islink(path) else os.fspath(path)
    return Path(f"{real}.meta.json")


def is_scores_file(path: str | os.PathLike[str]) -> bool:
    """Written by ``perceptscore score``: a table format whose provenance is there, or a folder of parts
    with its manifest."""
    fmt = format_of(path)
    if fmt is PARTS:
        return fmt.provenance(path) is not None
    return fmt is not None and Path(path).is_file() and fmt.provenance(path) is not None


def read_scores(path: str) -> pa.Table:
    """A whole scores file (for rank/filter, which need every row anyway)."""
    fmt = format_of(path)
    assert fmt is not None, path
    try:
        return fmt.read(path)
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{path}: unreadable ({' '.join(str(exc).split())[:200]})") from None


def read_provenance(path: str) -> dict[str, Any]:
    fmt = format_of(path)
    assert fmt is not None, path
    return fmt.provenance(path) or {}


def read_columns(path: str, wanted: Callable[[pa.Schema], Sequence[str]]) -> pa.Table:
    """Only some columns of a scores file (``wanted`` picks them from its schema): a report of a million
    rows reads the path, error and score columns, not every probability and passthrough column."""
    fmt = format_of(path)
    assert fmt is not None, path
    try:
        if fmt is PARTS:
            return parts.read(path, columns=list(wanted(parts.read_schema(path))))
        if fmt.suffix == ".parquet":
            return pq.read_table(path, columns=list(wanted(pq.read_schema(path))))
        if fmt.suffix == ".csv":
            columns = list(wanted(_csv_reader(path, (PATH, ERROR)).schema))
            convert = pacsv.ConvertOptions(
                include_columns=columns,
                column_types={PATH: pa.string(), ERROR: pa.string()},
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            )
            return restore_names(restore_formulas(pacsv.read_csv(path, convert_options=convert)))
        table = fmt.read(path)
        return table.select(list(wanted(table.schema)))
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{path}: unreadable ({' '.join(str(exc).split())[:200]})") from None
