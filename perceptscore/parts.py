"""A folder output (``-o DIR/``): one parquet part per input container (``00000.parquet`` for the tar
shard ``00000.tar``, a dataset file's own relative name, ``data/train-00000-of-00002.parquet``), and the
rows of plain inputs (files, URLs, manifest rows) in parts of ``part-<first item>.parquet``. Each part is
complete under its name (written under a hidden temporary name, then renamed), so a million-shard run
needs no final assembly and resumes part by part. ``_perceptscore.json``, written last, says the folder
is complete: the provenance, the parts in input order, and their row and error counts. pandas, pyarrow
and DuckDB read the folder as one table (they skip names that start with ``_`` or ``.``: the manifest,
the run's state and temporary files); our readers (rank, filter, report, ``--incremental``,
``--retry-errors``) read its parts in the manifest's order, which is input order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from perceptscore.errors import UsageError

MANIFEST = "_perceptscore.json"  # written last: the folder is complete
STATE = "_perceptscore_run.json"  # what an unfinished run is (``runs.ShardedRun``'s run.json)
_SUFFIXES = (".tar", ".parquet", ".arrow")


def is_folder_output(out: str) -> bool:
    """``-o DIR/``, or ``-o DIR`` naming an existing folder: one part per read task."""
    return out.endswith(("/", os.sep)) or os.path.isdir(out)


def is_scores_folder(path: str | os.PathLike[str]) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's manifest, checked: every part a relative name inside the folder (a forged manifest
    cannot make a reader open a file elsewhere)."""
    where = Path(folder) / MANIFEST
    try:
        found = json.loads(where.read_text())
        names = [str(p["file"]) for p in found["parts"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{where}: unreadable ({' '.join(str(exc).split())[:200]})") from None
    for name in names:
        if not _inside(name):
            raise UsageError(f"{where}: part {name!r} is not a file inside the folder")
    return found


def part_files(folder: str | os.PathLike[str]) -> list[Path]:
    return [Path(folder) / str(p["file"]) for p in manifest(folder)["parts"]]


def provenance(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    about = manifest(folder).get("provenance")
    return about if isinstance(about, dict) else None


def read(folder: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Every part, in input order, as one table (``columns``: only these)."""
    tables = [pq.read_table(p, columns=columns).replace_schema_metadata(None) for p in part_files(folder)]
    if not tables:
        return read_schema(folder, ()).empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def read_schema(folder: str, strings: Sequence[str] = ()) -> pa.Schema:
    about = manifest(folder)
    files = part_files(folder)
    if files:
        return pq.read_schema(files[0]).remove_metadata()
    return pa.schema([pa.field(n, pa.string()) for n in about.get("columns", [])])


def read_batches(folder: str, strings: Sequence[str] = ()) -> Iterator[pa.RecordBatch]:
    for part in part_files(folder):
        yield from pq.ParquetFile(part).iter_batches(65_536)


def _inside(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


class PartNames:
    """Each container's part name, from its path below the input that named it (a tar shard's suffix
    becomes .parquet); a name taken already gets the item's number. The same inputs give the same names
    on every run, so a resumed run finds its parts."""

    def __init__(self, inputs: Sequence[str]) -> None:
        self.roots = [input_root(text) for text in inputs]
        self.taken: dict[str, int] = {}

    def name(self, index: int, uri: str) -> str:
        relative = _relative(uri, self.roots)
        stem = relative[: -len(suffix)] if (suffix := _suffix(relative)) else relative
        name = f"{stem}.parquet"
        owner = self.taken.setdefault(name, index)
        return name if owner == index else f"{stem}-{index:012d}.parquet"

    @staticmethod
    def plain(first: int) -> str:
        return f"part-{first:012d}.parquet"


def input_root(text: str) -> str:
    """The folder (or URL prefix) an input names, to take part names below it: a folder, a prefix, a
    glob's or a brace pattern's folder before its first wildcard (``shards/**/*.tar``: ``shards/``);
    "" for anything else."""
    text = text.removeprefix("@")
    magic = min((i for i in (text.find(c) for c in "*?[{") if i >= 0), default=-1)
    if magic >= 0:
        text = text[:magic].rpartition("/")[0] or "."
        if "://" not in text:
            return os.path.abspath(text).rstrip(os.sep) + os.sep
    if "://" in text:
        return text.rstrip("/") + "/" if not _suffix(text) else ""
    return os.path.abspath(text).rstrip(os.sep) + os.sep if os.path.isdir(text) else ""


def _relative(uri: str, roots: Sequence[str]) -> str:
    where = uri.split("?", 1)[0]
    if "://" not in where:
        where = os.path.abspath(where)
    for root in roots:
        if root and where.startswith(root):
            name = where[len(root) :].replace(os.sep, "/")
            if _inside(name):
                return _safe(name)
    return _safe(where.replace(os.sep, "/").rstrip("/").rpartition("/")[2] or "part")


def _safe(name: str) -> str:
    """A part name made of the path's parts, with characters no file system objects to."""
    return "/".join(re.sub(r"[^\w.=+-]", "_", p) or "_" for p in name.split("/") if p not in ("", "."))


def _suffix(name: str) -> str:
    return next((s for s in _SUFFIXES if name.lower().endswith(s)), "")


def write_manifest(
    folder: Path, about: dict[str, Any], parts: list[dict[str, Any]], schema: pa.Schema
) -> None:
    """The manifest, last and atomically: from now on the folder is a complete scores output."""
    from perceptscore.sinks import write_atomic

    body = {
        "perceptscore_parts": 1,
        "provenance": about,
        "rows": sum(int(p["rows"]) for p in parts),
        "errors": sum(int(p["errors"]) for p in parts),
        "columns": schema.names,
        "parts": parts,
    }
    write_atomic(folder / MANIFEST, json.dumps(body, indent=1).encode() + b"\n", durable=True)
