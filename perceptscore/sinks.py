"""Output writers: CSV, parquet, JSONL files and CSV on stdout.

A file output is written under a temporary name in the same folder and renamed into place only when
complete, so a file under the output name is always whole. Provenance (version, checkpoints and their
sha256, device, precision, preprocessing) goes into the parquet key-value metadata, or into
``<out>.meta.json`` beside a CSV/JSONL file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from perceptscore.errors import UsageError
from perceptscore.sources import PROVENANCE_KEY, meta_path

FORMATS = (".csv", ".parquet", ".jsonl")
_PARQUET_ROW_GROUP = 65_536


def output_format(out: str) -> str:
    if out == "-":
        return ".csv"
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(
            f"output {out!r}: unknown format; use a .csv, .parquet or .jsonl name, or - for stdout"
        )
    return suffix


def check_output(out: str) -> None:
    """Fail now, not after the run, on an output that cannot be written."""
    output_format(out)
    if out != "-" and not Path(out).parent.is_dir():
        raise UsageError(f"output folder {str(Path(out).parent)!r} does not exist")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Sink:
    """Write row batches (lists of dicts) with a fixed schema; ``close()`` publishes, ``abort()`` discards."""

    def __init__(self, out: str, schema: pa.Schema, provenance: dict[str, Any]) -> None:
        check_output(out)
        self.out, self.format = out, output_format(out)
        self.schema, self.provenance = schema, provenance
        self._pending: list[pa.Table] = []
        self._stream: BinaryIO | None = None
        self._writer: pq.ParquetWriter | pacsv.CSVWriter | None = None
        if out == "-":
            self.path = self.tmp = None
            self._open(sys.stdout.buffer)
        else:
            self.path = Path(out)
            self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
            try:
                self._open(open(self.tmp, "wb"))  # noqa: SIM115 - closed in close()/abort()
            except OSError as exc:
                raise UsageError(f"cannot write {out!r}: {exc.strerror or exc}") from None

    def _open(self, stream: BinaryIO) -> None:
        self._stream = stream
        if self.format == ".parquet":
            metadata = {PROVENANCE_KEY: json.dumps(self.provenance)}
            self._writer = pq.ParquetWriter(stream, self.schema.with_metadata(metadata))
        elif self.format == ".csv":
            self._writer = pacsv.CSVWriter(stream, self.schema)

    def write(self, rows: list[dict[str, Any]] | pa.Table) -> None:
        """Append rows: dicts (converted with the schema) or a table with the schema's columns."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=self.schema)
        try:
            self._write(table.select(self.schema.names).cast(self.schema))
        except OSError as exc:  # disk full, quota, file too large, output folder gone
            self.abort()
            reason = " ".join((exc.strerror or str(exc)).split())  # one line, whoever raised it
            raise UsageError(f"cannot write {self.out!r}: {reason}") from None

    def _write(self, table: pa.Table) -> None:
        if self.format == ".jsonl":
            assert self._stream is not None
            self._stream.write(b"".join(_json_line(row) for row in table.to_pylist()))
        elif self.format == ".parquet":
            self._pending.append(table)  # few large row groups read far faster than many small ones
            if sum(t.num_rows for t in self._pending) >= _PARQUET_ROW_GROUP:
                self._flush()
        else:
            assert isinstance(self._writer, pacsv.CSVWriter)
            self._writer.write_table(table)
            if self.path is None:
                sys.stdout.buffer.flush()  # a pipe reader sees rows as they are scored

    def _flush(self) -> None:
        if self._pending:
            assert isinstance(self._writer, pq.ParquetWriter)
            self._writer.write_table(pa.concat_tables(self._pending))
            self._pending = []

    def close(self) -> None:
        """Finish the file and move it under its name (the sidecar first, so data never lacks it)."""
        try:
            self._close()
        except OSError as exc:
            self.abort()
            reason = " ".join((exc.strerror or str(exc)).split())  # one line, whoever raised it
            raise UsageError(f"cannot write {self.out!r}: {reason}") from None

    def _close(self) -> None:
        if self.format == ".parquet":
            self._flush()
        if self._writer is not None:
            self._writer.close()
        if self.path is None:
            sys.stdout.buffer.flush()
            return
        assert self._stream is not None and self.tmp is not None
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        if self.format != ".parquet":
            write_atomic(meta_path(self.path), json.dumps(self.provenance, indent=2).encode())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file: nothing under the output name unless the run completed."""
        if self._writer is not None:
            # Close it now: left open, its destructor would write a footer into the closed stream later.
            with contextlib.suppress(Exception):  # fails again on a full disk; the file goes anyway
                self._writer.close()
            self._writer = None
        if self._stream is not None and self.path is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._stream.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _json_line(row: dict[str, Any]) -> bytes:
    cleaned = {k: _clean(v) for k, v in row.items()}
    return (json.dumps(cleaned, ensure_ascii=False, default=str) + "\n").encode()
