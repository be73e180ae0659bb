"""Datasets as published: parquet and arrow files whose rows hold the image bytes.

What the Hugging Face ``datasets`` library writes is read as it is: ``to_parquet`` files, a
``save_to_disk`` folder (``state.json`` naming its ``.arrow`` files), a hub-layout folder
(``data/train-00000-of-00002.parquet``), globs of such files, and the same over fsspec URLs (``s3://``,
``https://``; ``hf://datasets/...`` when ``huggingface_hub`` is installed). Plain binary columns count too.

One class per kind (``ParquetDataset``, ``ArrowDataset``): each lists its ordered **read tasks** (a parquet
row group, an arrow file) and yields a task's rows in order, a few record batches at a time, so no file is
ever held whole. A row's bytes travel with it (``InMemory``), as tar members' do.

A row is ``<file>::<column>[<row>]`` in the ``path`` column (``row``: its position in that file, from 0),
which ``locate`` opens again (``DatasetRow``). Its ``shard`` (the file) and ``row`` are columns; the other
columns pass through (the image bytes do not; an ``Image`` feature's own ``path`` does, as
``<column>_path``). Its stat for ``--incremental`` is (size of the bytes, a digest of the bytes): a dataset
downloaded or written again scores only the rows whose image changed.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from perceptscore import remote
from perceptscore.errors import DecodeError, UsageError
from perceptscore.locators import DATASET_ROW, InMemory, Locator, Unavailable

SHARD, ROW = "shard", "row"  # ``shard`` as tar rows name theirs: the file the row was read from
ROWS_PER_READ = 64  # rows decoded from a file at once: a row group is the most pyarrow holds
_HUB_SHARD = re.compile(r"-\d{5}-of-\d{5}\.parquet$")  # datasets' and the hub's shard names
_BINARY = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)


def row_uri(file: str, column: str, row: int) -> str:
    """A row's ``path``: what ``parse_row_uri`` (and ``locate``) reads back."""
    return f"{file}::{column}[{row}]"


def parse_row_uri(uri: str) -> tuple[str, str, int] | None:
    """(file, column, row) of a ``row_uri``, or None for anything else."""
    match = DATASET_ROW.match(uri)
    return None if match is None else (match["file"], match["column"], int(match["row"]))


# ---- which column holds the images ----------------------------------------------------------------


def _binary(kind: pa.DataType) -> bool:
    return any(test(kind) for test in _BINARY)


def holds_images(kind: pa.DataType) -> bool:
    """Bytes, or a struct with a ``bytes`` field of bytes (``datasets``' ``Image`` feature)."""
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and _binary(kind.field(index).type)
    return _binary(kind)


def image_features(schema: pa.Schema) -> list[str]:
    """Columns the ``huggingface`` metadata declares as ``Image`` features (what ``datasets`` wrote)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return []  # not datasets' metadata after all: the columns' types decide
    if not isinstance(features, dict):
        return []
    return [
        name
        for name, feature in features.items()
        if isinstance(feature, dict) and feature.get("_type") == "Image" and name in schema.names
    ]


def candidates(schema: pa.Schema) -> list[str]:
    """The image columns: declared ``Image`` features, else ``struct<bytes, ...>`` columns, else bytes."""
    declared = [n for n in image_features(schema) if holds_images(schema.field(n).type)]
    if declared:
        return declared
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and holds_images(f.type)]
    return structs or [f.name for f in schema if _binary(f.type)]


def is_dataset(schema: pa.Schema, image_column: str | None, path_column: str | None) -> bool:
    """Whether a table is scored from its bytes rather than read as a manifest of paths: asked for
    (``--image-column``, or ``--path-column`` naming a column of bytes), declared by ``datasets``'
    metadata, or a table with no ``path`` column and some column of bytes."""
    if image_column:
        return True
    if path_column and path_column in schema.names:
        return holds_images(schema.field(path_column).type)
    return bool(image_features(schema)) or ("path" not in schema.names and bool(candidates(schema)))


@dataclass(frozen=True)
class Asked:
    """The columns the user named: ``--image-column``, and ``--path-column`` (which, naming a column of
    bytes, means it as the image column: ``score ds.parquet --path-column image``)."""

    image_column: str | None = None
    path_column: str | None = None

    def image(self, schema: pa.Schema) -> str | None:
        if self.image_column:
            return self.image_column
        named = self.path_column
        return named if named and named in schema.names and holds_images(schema.field(named).type) else None


def choose_column(schema: pa.Schema, asked: str | None, shown: str) -> str:
    """The image column of a table: ``asked`` if it holds images, else the one candidate; one line
    naming the columns otherwise."""
    if asked:
        if asked not in schema.names:
            found = ", ".join(schema.names) or "none"
            raise UsageError(f"{shown} has no column {asked!r} (columns found: {found})")
        if not holds_images(schema.field(asked).type):
            raise UsageError(
                f"{shown}: column {asked!r} holds {schema.field(asked).type}, not image bytes "
                "(binary, or a struct with a 'bytes' field as datasets' Image feature)"
            )
        return asked
    found = candidates(schema)
    if len(found) == 1:
        return found[0]
    if not found:
        names = ", ".join(schema.names) or "none"
        raise UsageError(
            f"{shown}: no column of image bytes (columns found: {names}); name it with --image-column"
        )
    raise UsageError(
        f"{shown}: several columns of image bytes ({', '.join(found)}); choose one with --image-column"
    )


# ---- opening files, local or remote -----------------------------------------------------------------


def open_table(file: str) -> Any:
    """A seekable binary file: local, ``hf://`` through huggingface_hub, or another fsspec URL."""
    if remote.scheme(file) == "hf":
        return _hub_filesystem().open(file, "rb")
    if remote.is_remote(file):
        fs, path = remote.split(file)
        return fs.open(path, "rb")
    return open(remote.local_path(file), "rb")


def _hub_filesystem() -> Any:
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:
        raise UsageError("hf:// needs huggingface_hub: pip install huggingface_hub") from None
    return HfFileSystem()


def _failure(file: str, exc: BaseException) -> str:
    return f"{remote.without_secrets(file)}: unreadable ({' '.join(str(exc).split())[:200]})"


def bytes_version(data: bytes) -> int:
    """A row's ``file_mtime_ns`` for ``--incremental``: a 56-bit digest of its bytes (a row has no mtime
    of its own, and a file written again holds the same rows)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "big")


# ---- the datasets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading, in input order: a parquet row group (``part``), or a whole arrow file."""

    file: str  # as named: the ``shard`` column and the start of each row's ``path``
    local: str  # where it is read (a downloaded copy of a remote file, else ``file``)
    part: int
    first_row: int  # the row's number in ``file`` of the task's first row


class Dataset:
    """What both kinds share: the image column, the passthrough columns, rows made from batches."""

    kind = ""

    def __init__(
        self, files: Sequence[tuple[str, str]], named: str, asked: Asked, reserved: Iterable[str]
    ) -> None:
        self.files, self.named = list(files), named  # (as named, where read)
        if not self.files:
            raise UsageError(f"{remote.without_secrets(named)}: no data files found")
        schemas = [self._schema(file, local) for file, local in self.files]
        self.column = choose_column(
            schemas[0], asked.image(schemas[0]), remote.without_secrets(self.files[0][0])
        )
        for (file, _), schema in zip(self.files, schemas, strict=True):
            if schema.remove_metadata() != schemas[0].remove_metadata():
                raise UsageError(
                    f"{remote.without_secrets(file)}: its columns differ from "
                    f"{remote.without_secrets(self.files[0][0])}'s; score them separately"
                )
        self._set_passthrough(schemas[0], set(reserved))

    def _schema(self, file: str, local: str) -> pa.Schema:
        raise NotImplementedError

    def _set_passthrough(self, schema: pa.Schema, reserved: set[str]) -> None:
        """``shard``, ``row``, then the table's columns in order: the image column's own ``path`` in its
        place (as ``<column>_path``), a name an output column or ours has renamed ``input_<name>``."""

        taken = reserved | {SHARD, ROW}
        fields = [pa.field(SHARD, pa.string()), pa.field(ROW, pa.int64())]
        self._sources: list[tuple[str, str]] = []  # (column read, column written)
        image = schema.field(self.column).type
        self._inner_path: str | None = None
        for f in schema:
            if f.name == self.column:
                if pa.types.is_struct(image) and image.get_field_index("path") >= 0:
                    name = f"{self.column}_path"
                    if name not in schema.names and name not in taken:
                        self._inner_path = name
                        fields.append(pa.field(name, pa.string()))
                continue
            name = _free_name(f.name, taken, schema.names) if f.name in taken else f.name
            taken.add(name)
            self._sources.append((f.name, name))
            fields.append(f.with_name(name))
        self.passthrough = pa.schema(fields)

    @property
    def columns_read(self) -> list[str]:
        return [self.column, *(source for source, _ in self._sources)]

    def description(self, task: ReadTask) -> dict[str, Any]:
        """What another process needs to read ``task`` as here (``described``), as JSON: the columns as
        chosen here, so no file is opened again to choose them, and of the files only the task's (a
        dataset of 100,000 files must not send their list with each row group)."""
        files = [(task.file, task.local)]
        return {"kind": self.kind, "files": files, "named": self.named, "column": self.column,
                "sources": self._sources, "inner_path": self._inner_path,
                "passthrough": schema_text(self.passthrough)}  # fmt: skip

    @staticmethod
    def described(description: dict[str, Any]) -> Dataset:
        kind = {c.kind: c for c in (ParquetDataset, ArrowDataset)}[description["kind"]]
        dataset = object.__new__(kind)
        dataset.files = [(str(a), str(b)) for a, b in description["files"]]
        dataset.named, dataset.column = str(description["named"]), str(description["column"])
        dataset._sources = [(str(a), str(b)) for a, b in description["sources"]]
        dataset._inner_path = description["inner_path"]
        dataset.passthrough = schema_of_text(description["passthrough"])
        return dataset

    def read_tasks(self) -> Iterator[ReadTask]:
        raise NotImplementedError

    def batches(self, task: ReadTask) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def count(self) -> int | None:
        return None

    def __iter__(self) -> Iterator[tuple[Locator, dict[str, Any]]]:
        for task in self.read_tasks():
            yield from self.read(task)

    def read(self, task: ReadTask) -> Iterator[tuple[Locator, dict[str, Any]]]:
        """A read task's rows in order; a file that fails mid-read ends the run in one line."""
        row = task.first_row
        try:
            for batch in self.batches(task):
                yield from self._rows(task.file, batch, row)
                row += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"{_failure(task.file, exc)} after row {row}") from None

    def _rows(self, file: str, batch: pa.RecordBatch, first: int) -> Iterator[tuple[Locator, dict[str, Any]]]:
        images = batch.column(self.column).to_pylist()
        others = batch.select([s for s, _ in self._sources]).to_pylist() if self._sources else None
        for i, value in enumerate(images):
            inner = value.get("path") if isinstance(value, dict) else None
            data = value.get("bytes") if isinstance(value, dict) else value
            extras: dict[str, Any] = {SHARD: file, ROW: first + i}
            if self._inner_path is not None:
                extras[self._inner_path] = inner
            if others is not None:
                extras.update((name, others[i][source]) for source, name in self._sources)
            yield _locator(row_uri(file, self.column, first + i), data, inner), extras


def schema_text(schema: pa.Schema) -> str:
    """An Arrow schema as text for a JSON description (every type, nested ones too, kept exactly)."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_of_text(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _locator(uri: str, data: bytes | None, inner: str | None) -> Locator:
    if data is None:
        named = f" (it names {inner!r} only)" if inner else ""
        return Unavailable(uri, f"no image bytes in this row{named}")
    return InMemory(uri, data, (len(data), bytes_version(data)))


class ParquetDataset(Dataset):
    """Parquet files: a read task per row group."""

    kind = "parquet"

    def _schema(self, file: str, local: str) -> pa.Schema:
        try:
            with open_table(local) as f:
                return pq.read_schema(f)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise UsageError(_failure(file, exc)) from None

    def read_tasks(self) -> Iterator[ReadTask]:
        for file, local in self.files:
            try:
                with open_table(local) as f:
                    metadata = pq.ParquetFile(f).metadata
            except (pa.ArrowException, OSError) as exc:
                raise UsageError(_failure(file, exc)) from None
            first = 0
            for part in range(metadata.num_row_groups):
                yield ReadTask(file, local, part, first)
                first += metadata.row_group(part).num_rows

    def batches(self, task: ReadTask) -> Iterator[pa.RecordBatch]:
        with open_table(task.local) as f:
            parquet = pq.ParquetFile(f)
            yield from parquet.iter_batches(ROWS_PER_READ, [task.part], self.columns_read)

    def count(self) -> int | None:
        total = 0
        for _, local in self.files:
            if remote.is_remote(local):
                return None  # a request per file for a progress bar's total: not worth it
            total += pq.ParquetFile(local).metadata.num_rows
        return total


class ArrowDataset(Dataset):
    """Arrow IPC files (``save_to_disk`` writes the stream format): a read task per file."""

    kind = "arrow"

    def _schema(self, file: str, local: str) -> pa.Schema:
        try:
            with open_table(local) as f:
                return arrow_reader(f).schema
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise UsageError(_failure(file, exc)) from None

    def read_tasks(self) -> Iterator[ReadTask]:
        for file, local in self.files:
            yield ReadTask(file, local, 0, 0)

    def count(self) -> int | None:
        """Rows of local files, memory-mapped (only the batches' headers are touched)."""
        total = 0
        for _, local in self.files:
            if remote.is_remote(local):
                return None
            with pa.memory_map(remote.local_path(local)) as f:
                total += sum(batch.num_rows for batch in arrow_batches(arrow_reader(f)))
        return total

    def batches(self, task: ReadTask) -> Iterator[pa.RecordBatch]:
        with open_table(task.local) as f:
            for batch in arrow_batches(arrow_reader(f)):
                # a batch of a few thousand rows is cut into reads of ROWS_PER_READ rows
                for start in range(0, batch.num_rows, ROWS_PER_READ):
                    yield batch.slice(start, ROWS_PER_READ).select(self.columns_read)


def arrow_reader(f: Any) -> Any:
    """A reader of either IPC format: the stream (``datasets``) or the file (with a footer)."""
    try:
        return pa.ipc.open_stream(f)
    except pa.ArrowInvalid:
        f.seek(0)
        return pa.ipc.open_file(f)


def arrow_batches(reader: Any) -> Iterator[pa.RecordBatch]:
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


# ---- what an input names ---------------------------------------------------------------------------


def is_table_file(path: str) -> bool:
    return path.split("?", 1)[0].lower().endswith((".parquet", ".arrow"))


def folder_files(folder: str) -> tuple[type[Dataset], list[str]] | None:
    """A local folder written by ``datasets``: ``save_to_disk``'s (its ``state.json`` lists the arrow
    files in order) or the hub layout (``data/**/<split>-NNNNN-of-NNNNN.parquet``, every split, in name
    order). None for any other folder (walked for images as ever)."""
    state = os.path.join(folder, "state.json")
    if os.path.isfile(state) and os.path.isfile(os.path.join(folder, "dataset_info.json")):
        try:
            with open(state, encoding="utf-8") as f:
                names = [entry["filename"] for entry in json.load(f)["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(
                f"{folder}: unreadable state.json ({' '.join(str(exc).split())[:200]})"
            ) from None
        return ArrowDataset, [os.path.join(folder, os.path.basename(str(n))) for n in names]
    data = os.path.join(folder, "data")
    found = sorted(glob.glob(os.path.join(glob.escape(data), "**", "*.parquet"), recursive=True))
    if found and all(_HUB_SHARD.search(p) for p in found):
        return ParquetDataset, found
    return None


def open_files(
    files: Sequence[tuple[str, str]], named: str, asked: Asked, reserved: Iterable[str]
) -> Dataset:
    """The dataset of these (as named, where read) files: parquet or arrow by the first one's suffix."""
    kind = (
        ArrowDataset if files and files[0][0].split("?", 1)[0].lower().endswith(".arrow") else ParquetDataset
    )
    return kind(files, named, asked, reserved)


def hub_dataset(url: str, asked: Asked, reserved: Iterable[str]) -> Dataset:
    """``hf://datasets/OWNER/NAME[@REV][/FILE.parquet]``: the file, or the repository's ``data/``
    parquet files (every split, in name order), read through huggingface_hub's file system."""
    fs = _hub_filesystem()
    if is_table_file(url):
        files = [url]
    else:
        try:
            found = fs.glob(url.rstrip("/") + "/data/**/*.parquet")
        except (OSError, ValueError) as exc:
            raise UsageError(_failure(url, exc)) from None
        files = sorted(f"hf://{path}" for path in found)
    return open_files([(f, f) for f in files], url, asked, reserved)


def row_bytes(uri: str) -> bytes:
    """The image bytes of one row named by ``row_uri`` (``DatasetRow.open``): its file read up to it."""
    parsed = parse_row_uri(uri)
    assert parsed is not None, uri
    file, column, row = parsed
    try:
        batches = _row_batches(file, column, row)
        for batch, first in batches:
            if first <= row < first + batch.num_rows:
                value = batch.column(column)[row - first].as_py()
                data = value.get("bytes") if isinstance(value, dict) else value
                if data is None:
                    raise DecodeError("no image bytes in this row")
                return data
    except UsageError as exc:
        raise DecodeError(str(exc)) from None
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise DecodeError(_failure(file, exc)) from None
    raise DecodeError(f"no row {row} in {remote.without_secrets(file)}")


def _row_batches(file: str, column: str, row: int) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Batches of ``column`` with their first row's number: in a parquet file only the row group that
    holds ``row`` is read."""
    with open_table(file) as f:
        if file.split("?", 1)[0].lower().endswith(".parquet"):
            parquet = pq.ParquetFile(f)
            first = 0
            for part in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(part).num_rows
                if row < first + rows:
                    yield parquet.read_row_group(part, [column]).combine_chunks().to_batches()[0], first
                    return
                first += rows
            return
        first = 0
        for batch in arrow_batches(arrow_reader(f)):
            yield batch, first
            first += batch.num_rows


def _free_name(name: str, taken: set[str], names: list[str]) -> str:
    """``input_<name>`` for a column whose name is ours, or ``input_<name>_2``, ``_3`` ... when the table
    has that column too: no column is ever dropped for a clash."""
    from perceptscore.shards import input_name

    free, n = input_name(name), 2
    while free in taken or free in names:
        free, n = f"{input_name(name)}_{n}", n + 1
    return free
