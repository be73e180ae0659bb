"""Where rows go: one ``Sink`` interface (open, write, finish or abort) and a registry of its kinds by name,
``SINKS``: a scores file (any format of ``formats.FORMATS``), CSV on standard output, a table in memory, or
an object in a store (``destinations.RemoteSink``: a local file uploaded once complete).

A file output is written under a temporary name in the same folder and renamed into place only when
complete, so a file under the output name is always whole. Provenance goes where the format keeps it
(parquet metadata, or ``<out>.meta.json`` beside CSV/JSONL, written first so data never lacks it). Files
written whole (a list, a record, a shard) use ``replaced_whole`` / ``write_atomic``, the package's one
temp-file-and-rename.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import json
import os
import select
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import pyarrow as pa

from perceptscore.errors import UsageError
from perceptscore.folders import check_output_folder
from perceptscore.formats import FORMATS, Format, TableWriter, format_of, meta_path


def output_format(out: str) -> Format:
    if out == "-":
        return FORMATS[".csv"]
    fmt = format_of(out)
    if fmt is None:
        names = ", ".join(FORMATS)
        raise UsageError(f"output {out!r}: unknown format; use a name ending in {names}, or - for stdout")
    return fmt


def check_output(out: str) -> None:
    """Fail now, not after the run, on an output that cannot be written."""
    output_format(out)
    if out != "-" and os.path.isdir(out):
        raise UsageError(f"-o {out!r} is a folder: name the file to write")
    if out != "-":
        check_output_folder(out)


def remove_orphaned_partials(path: Path) -> None:
    """Remove what a killed writer of ``path`` (or of its sidecar) left: ``.<name>.partial-<pid>`` files
    whose process is gone. A live process's partial file is left alone."""
    names = (f".{path.name}.partial-", f".{path.name}.meta.json.partial-")  # ours: see Sink, write_atomic
    for partial in path.parent.glob(f".{glob.escape(path.name)}*.partial-*"):
        prefix, pid = next(
            ((n, partial.name[len(n) :]) for n in names if partial.name.startswith(n)), ("", "")
        )
        if not prefix or not pid.isdigit() or process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            partial.unlink()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


@contextlib.contextmanager
def replaced_whole(
    path: Path, durable: bool = False, follow: bool = True, tmp: Path | None = None
) -> Iterator[Path]:
    """A temporary name beside ``path`` for a writer to fill (bytes, a parquet table, safetensors), renamed
    over ``path`` when the block ends and removed if it fails: ``path`` holds the new content whole or
    keeps what it held. The package's temp-file-and-rename for a file written whole (``Sink``, which
    streams rows into its file, renames its own). ``durable``: the file is synced before
    the rename and the folder after, so a power loss keeps it too. ``follow``: a symlink at ``path`` stays
    one and its target is replaced (else the link itself is replaced). ``tmp``: a name of the caller's
    (one its own clean-up knows), else ``.<name>.partial-<pid>`` (``remove_orphaned_partials``')."""
    path = Path(os.path.realpath(path)) if follow else Path(path)
    tmp = tmp or path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        sync_folder(path.parent)


def write_atomic(
    path: Path, data: bytes, durable: bool = False, mode: int = 0o666, follow: bool = True
) -> None:
    """``path`` holds ``data`` whole, or keeps what it held (``replaced_whole``); the temporary file is
    created new with ``mode`` (before the umask), never opened through something planted at its name."""
    with replaced_whole(path, durable, follow) as tmp, os.fdopen(create_new(tmp, mode), "wb") as f:
        f.write(data)


def sync_folder(folder: Path) -> None:
    """A rename is durable once its folder is synced (a power loss keeps the new name)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def create_new(path: Path, mode: int = 0o666) -> int:
    """A new file at ``path`` for writing, never opened through something planted there: in a folder
    others can write in, a link at a temporary name would otherwise send this write into its target."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(path, flags, mode)
    except FileExistsError:  # our own leftover (same pid), or something planted: removed, never followed
        path.unlink()
        return os.open(path, flags, mode)


SIGPIPE_EXIT = 141  # what a shell reports for a writer ended by SIGPIPE (128 + 13): `set -o pipefail` sees it


class StdoutClosed(Exception):
    """The reader of stdout went away (`score | head -1`): the end of a pipeline, not a user's mistake.
    Not an ``OSError``: Click would turn a broken pipe into exit code 1, which here means error rows."""


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on such a write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # POLLERR and POLLHUP are reported whatever is asked
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no stdout
        return False


def end_quietly_after_closed_stdout() -> int:
    """Point stdout at /dev/null so the interpreter's last flush of what is still buffered cannot print
    "Exception ignored ... BrokenPipeError"; the exit code of the SIGPIPE convention."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return SIGPIPE_EXIT


def _stdout_closed(exc: OSError) -> bool:
    return isinstance(exc, BrokenPipeError) or stdout_reader_gone()


def one_line(exc: OSError) -> str:
    return " ".join((exc.strerror or str(exc)).split())  # one line, whoever raised it


Rows = pa.RecordBatch | pa.Table | list[dict[str, Any]]  # what a sink takes: Arrow rows, or dicts


class Sink(Protocol):
    """Where a run's rows go, in the shape of Ray Data's datasinks: ``open`` with the rows' schema and
    provenance, ``write`` each batch in order, then ``finish`` (the output is complete: published) or
    ``abort`` (nothing that looks complete is left: a file output keeps what it held before). ``writing``
    runs the four in order."""

    name: str  # as ``SINKS`` knows it

    def open(self, schema: pa.Schema, provenance: dict[str, Any]) -> None: ...

    def write(self, rows: Rows) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


SINKS = {
    "file": "perceptscore.sinks:FileSink",
    "stream": "perceptscore.sinks:StreamSink",
    "memory": "perceptscore.sinks:MemorySink",
    "remote": "perceptscore.destinations:RemoteSink",
}
"""Every kind of output by name, imported when first used (as ``engines.ENGINES``): a new kind of output is
one class with the four methods of ``Sink`` and one line here."""


def create(name: str, **options: Any) -> Sink:
    """The sink called ``name`` (``SINKS``), made with ``options`` (``FileSink(path=...)``)."""
    if name not in SINKS:
        raise UsageError(f"unknown output kind {name!r}: use {', '.join(SINKS)}")
    module, _, cls = SINKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(**options)  # type: ignore[no-any-return]


def for_output(out: str) -> Sink:
    """The sink for ``-o OUT``: CSV on standard output for ``-``, else a file of the suffix's format."""
    return create("stream") if out == "-" else create("file", path=out)


@contextlib.contextmanager
def writing(sink: Sink, schema: pa.Schema, provenance: dict[str, Any]) -> Iterator[Sink]:
    """``sink`` opened for the block, finished when it ends and aborted if it fails (a stop signal, a
    failed batch, an engine's error): a file output appears only whole."""
    sink.open(schema, provenance)
    try:
        yield sink
    except BaseException:
        sink.abort()
        raise
    sink.finish()


def _as_table(rows: Rows, schema: pa.Schema) -> pa.Table:
    """Rows as a table of exactly the schema's columns and types (a batch may carry more columns)."""
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    return table.select(schema.names).cast(schema)


class FileSink:
    """A scores file (.csv/.parquet/.jsonl: ``formats``), written under a temporary name in its folder
    (``.<name>.partial-<pid>``) and renamed into place by ``finish``; its provenance in the format's place,
    a sidecar written first so the data never lacks it. The output is checked when the sink is made, before
    any row is scored; a write that fails (full disk, folder gone) aborts and is one ``UsageError`` line."""

    name = "file"

    def __init__(self, path: str) -> None:
        check_output(path)
        if path == "-":
            raise UsageError("standard output is the stream sink, not a file")
        self.out, self.format = path, output_format(path)
        self.path = Path(os.path.realpath(path))  # a symlinked output: its target is written, the link kept
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._stream: BinaryIO | None = None
        self._writer: TableWriter | None = None

    def open(self, schema: pa.Schema, provenance: dict[str, Any]) -> None:
        self.schema, self.provenance = schema, provenance
        remove_orphaned_partials(self.path)
        try:
            self._stream = os.fdopen(create_new(self.tmp), "wb")  # closed by finish()/abort()
        except OSError as exc:
            raise UsageError(f"cannot write {self.out!r}: {exc.strerror or exc}") from None
        self._writer = self.format.open_writer(self._stream, schema, provenance)

    def write(self, rows: Rows) -> None:
        assert self._writer is not None, "write() before open()"
        try:
            self._writer.write(_as_table(rows, self.schema))
        except OSError as exc:  # disk full, quota, file too large, output folder gone
            self.abort()
            raise UsageError(f"cannot write {self.out!r}: {one_line(exc)}") from None

    def finish(self) -> None:
        """Finish the file and move it under its name (the sidecar first, so data never lacks it)."""
        try:
            self._finish()
        except OSError as exc:
            self.abort()
            raise UsageError(f"cannot write {self.out!r}: {one_line(exc)}") from None

    def _finish(self) -> None:
        writer, self._writer, stream = self._writer, None, self._stream
        assert writer is not None and stream is not None, "finish() before open()"
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        if self.format.sidecar:
            write_atomic(meta_path(self.path), json.dumps(self.provenance, indent=2).encode())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file: nothing under the output name unless the run completed."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # fails again on a full disk; the file goes anyway
                writer.close()
        if self._stream is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._stream.close()
        self.tmp.unlink(missing_ok=True)


class StreamSink:
    """CSV on standard output (``-o -``), each batch flushed as it is written so a pipe's reader sees rows
    as they are scored. The reader going away (``score | head -1``) is ``StdoutClosed``, not an error."""

    name = "stream"

    def __init__(self) -> None:
        self.format = FORMATS[".csv"]
        self._writer: TableWriter | None = None

    def open(self, schema: pa.Schema, provenance: dict[str, Any]) -> None:
        self.schema = schema
        self._writer = self.format.open_writer(sys.stdout.buffer, schema, provenance)

    def write(self, rows: Rows) -> None:
        writer = self._writer
        assert writer is not None, "write() before open()"
        table = _as_table(rows, self.schema)
        self._guarded(lambda: (writer.write(table), sys.stdout.buffer.flush()))

    def finish(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            self._guarded(lambda: (writer.close(), sys.stdout.buffer.flush()))

    def abort(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # the pipe may be gone: nothing more to say to it
                writer.close()

    def _guarded(self, step: Callable[[], object]) -> None:
        try:
            step()
        except OSError as exc:
            self.abort()
            if _stdout_closed(exc):
                raise StdoutClosed from None
            raise UsageError(f"cannot write '-': {one_line(exc)}") from None


class MemorySink:
    """Rows kept as one Arrow table (``table``, once finished; its provenance in ``provenance``): the
    Python API's and ``rank``/``filter``'s rows, scored by the same loop as a file's."""

    name = "memory"

    def __init__(self) -> None:
        self.table: pa.Table | None = None
        self._batches: list[pa.Table] | None = None

    def open(self, schema: pa.Schema, provenance: dict[str, Any]) -> None:
        self.schema, self.provenance = schema, provenance
        self.table, self._batches = None, []

    def write(self, rows: Rows) -> None:
        assert self._batches is not None, "write() before open()"
        self._batches.append(_as_table(rows, self.schema))

    def finish(self) -> None:
        assert self._batches is not None, "finish() before open()"
        self.table = pa.concat_tables(self._batches) if self._batches else self.schema.empty_table()
        self._batches = None

    def abort(self) -> None:
        self.table, self._batches = None, None
