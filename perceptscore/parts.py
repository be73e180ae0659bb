"""A folder output (``-o DIR/``): one parquet part per input container (``00000.parquet`` for the tar
shard ``00000.tar``, a dataset file's own relative name, ``data/train-00000-of-00002.parquet``), and the
rows of plain inputs (files, URLs, manifest rows) in parts of ``part-<first item>.parquet``. Each part is
complete under its name in the run's own folder, ``DIR/.perceptscore-run/`` (written under a temporary
name, then renamed), so a million-shard run resumes part by part; finished, the parts are moved into
``DIR`` (renames, no assembly) by a journaled swap, and ``_perceptscore.json``, written last, says the
folder is complete: the provenance, the parts in input order, and their row and error counts. pandas,
pyarrow and DuckDB read the folder as one table (they skip names that start with ``_`` or ``.``: the
manifest, the run's folder); our readers (rank, filter, report, ``--incremental``, ``--retry-errors``)
read its parts in the manifest's order, which is input order.
"""

from __future__ import annotations

import hashlib
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
RUN = ".perceptscore-run"  # the run's own folder in DIR (``runs.ShardedRun``): its parts until the swap
SWAP = "swap.json"  # in RUN: the swap under way (``swap``), finished by whoever finds it
_SUFFIXES = (".tar", ".parquet", ".arrow")
_PLAIN = re.compile(r"part-\d{12}")  # a block of plain rows' part; no container's part is named so


def is_folder_output(out: str) -> bool:
    """``-o DIR/``, or ``-o DIR`` naming an existing folder not named like a scores file (``-o out.csv``
    over a folder is a mistake to refuse, not a folder to fill): one part per read task."""
    named_like_a_file = Path(out).suffix.lower() in (".csv", ".parquet", ".jsonl")
    return out.endswith(("/", os.sep)) or (os.path.isdir(out) and not named_like_a_file)


def is_scores_folder(path: str | os.PathLike[str]) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's manifest, checked: every part a distinct relative ``.parquet`` name inside the folder
    (a forged manifest cannot make a reader open a file elsewhere: ``part_files`` checks the files)."""
    where = Path(folder) / MANIFEST
    try:
        found = json.loads(where.read_text())
        names = [str(p["file"]) for p in found["parts"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{where}: unreadable ({' '.join(str(exc).split())[:200]})") from None
    for name in names:
        if not inside(name) or not name.endswith(".parquet"):
            raise UsageError(f"{where}: part {name!r} is not a .parquet file inside the folder")
    if len(set(names)) != len(names):
        raise UsageError(f"{where}: a part is listed twice")
    return found


def part_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The parts, each a regular file (not a link) whose real path is inside the folder."""
    root = os.path.realpath(folder)
    files = []
    for part in (Path(folder) / str(p["file"]) for p in manifest(folder)["parts"]):
        real = os.path.realpath(part)
        if os.path.islink(part) or not part.is_file() or not real.startswith(root + os.sep):
            raise UsageError(f"{folder}: part {part.name} is missing, a link, or outside the folder")
        files.append(part)
    return files


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


def inside(name: str) -> bool:
    parts = name.split("/")
    return (
        bool(name)
        and not PurePosixPath(name).is_absolute()
        and "\\" not in name
        and all(p not in ("", ".", "..") for p in parts)
    )


class PartNames:
    """Each container's part name, from its path below the input that named it (a tar shard's suffix
    becomes .parquet); a name taken already gets the item's number. The same inputs give the same names
    on every run, so a resumed run finds its parts."""

    def __init__(self, inputs: Sequence[str]) -> None:
        self.roots = [input_root(text) for text in inputs]
        self.taken: dict[str, int] = {}  # every name given (case-folded: a case-blind disk), to whom

    def name(self, index: int, uri: str) -> str:
        relative = _relative(uri, self.roots)
        stem = relative[: -len(suffix)] if (suffix := _suffix(relative)) else relative
        if _PLAIN.fullmatch(stem):
            stem = f"x{stem}"  # never a plain block's name
        for candidate in (stem, f"{stem}-{index:012d}", *(f"{stem}-{index:012d}-{k}" for k in range(2, 99))):
            owner = self.taken.setdefault(f"{candidate}.parquet".casefold(), index)
            if owner == index:
                return f"{candidate}.parquet"
        raise RuntimeError(f"no free part name for {stem}")  # 99 parts of one name and number: a bug

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
        head = text[:magic]
        text = head.rpartition("/")[0] or ("/" if head.startswith("/") else ".")
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
            if inside(name):
                return _safe(name)
    return _safe(where.replace(os.sep, "/").rstrip("/").rpartition("/")[2] or "part")


def _safe(name: str) -> str:
    """A part name made of the path's parts: characters no file system objects to replaced; a part that
    readers would skip (``_`` or ``.`` first) or too long for a file name (with the temporary name's
    additions) made visible and short."""
    out = []
    for part in name.split("/"):
        if part in ("", ".", ".."):
            continue
        part = re.sub(r"[^\w.=+-]", "_", part)
        if part.startswith(("_", ".")):
            part = f"x{part}"
        if len(part.encode()) > 180:
            digest = hashlib.sha256(part.encode()).hexdigest()[:16]
            part = f"{part[:120]}-{digest}"
        out.append(part)
    return "/".join(out) or "part"


def _suffix(name: str) -> str:
    return next((s for s in _SUFFIXES if name.lower().endswith(s)), "")


def manifest_body(about: dict[str, Any], parts: list[dict[str, Any]], schema: pa.Schema) -> dict[str, Any]:
    return {
        "perceptscore_parts": 1,
        "provenance": about,
        "rows": sum(int(p["rows"]) for p in parts),
        "errors": sum(int(p["errors"]) for p in parts),
        "columns": schema.names,
        "parts": parts,
    }


def swap(folder: Path, body: dict[str, Any]) -> None:
    """Publish a finished run: its parts (in ``folder/RUN``) moved into ``folder`` in place of an earlier
    output's, the manifest ``body`` written last. Journaled: the plan is written first (``SWAP``), so a
    swap cut short (SIGKILL, power) is finished by the next run that finds it (``finish_swap``), and the
    folder is never left holding two outputs' parts under one manifest."""
    from perceptscore.sinks import write_atomic

    old = [str(p["file"]) for p in manifest(folder)["parts"]] if is_scores_folder(folder) else []
    journal = {"remove": old, "move": [str(p["file"]) for p in body["parts"]], "manifest": body}
    write_atomic(folder / RUN / SWAP, json.dumps(journal).encode(), durable=True)
    finish_swap(folder)


def finish_swap(folder: Path) -> bool:
    """Carry out a swap whose journal is in ``folder/RUN`` (idempotent: each step may have run already);
    False where there is none."""
    import shutil

    from perceptscore.sinks import sync_folder, write_atomic

    run = folder / RUN
    try:
        journal = json.loads((run / SWAP).read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        raise UsageError(f"{run / SWAP}: unreadable ({exc}); remove {run} to start over") from None
    (folder / MANIFEST).unlink(missing_ok=True)  # from here on the folder is not complete
    moving = set(journal["move"])
    for name in journal["remove"]:  # the earlier output's parts: only files it listed, never a link's target
        target = folder / name
        if inside(name) and name not in moving and target.is_file() and not target.is_symlink():
            target.unlink()
    for name in journal["move"]:
        source, target = run / name, folder / name
        if inside(name) and source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    sync_folder(folder)
    body = json.dumps(journal["manifest"], indent=1).encode() + b"\n"
    write_atomic(folder / MANIFEST, body, durable=True)
    shutil.rmtree(run, ignore_errors=True)
    return True
