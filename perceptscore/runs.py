"""What makes a long ``score`` run safe to kill: an output lock, resumable shards, and clean signal stops.

A run writing ``out.parquet`` keeps its state in ``.out.parquet.parts/``: ``run.json`` (what the run is)
and numbered parquet shards, each covering a contiguous range of input rows. A shard exists under its final
name only once complete (written under a temporary name, then renamed), so after a SIGKILL or power loss
every shard present is whole. ``--resume`` skips the rows those shards hold; the final file is assembled from
the shards in order and renamed into place, then the folder is removed.

A container (a tar shard, a dataset's read task) is one input item of many rows: a shard never ends in the
middle of one (its rows are held until the next item's come), so it is resumed whole or not at all.

A folder output (``-o DIR/``, ``parts``) keeps its run in ``DIR/.perceptscore-run/``, a folder of its own
like any run's, whose shards are the output's parts: one per container (named after it) or per block of
plain items. Finished, they are moved into ``DIR`` (renames: no assembly) by a journaled swap
(``parts.swap``) that first removes the parts an earlier output there listed in its manifest, and the
manifest is written last. Until then ``DIR`` holds its earlier output untouched; in ``DIR`` a run removes
nothing but the files an earlier manifest lists.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from perceptscore import parts as parts_folder
from perceptscore import remote
from perceptscore._text import redacted_command
from perceptscore.columns import ERROR, FILE_MTIME, FILE_SIZE, PATH
from perceptscore.containers import TableRows, is_container
from perceptscore.errors import PerceptScoreError, UsageError
from perceptscore.items import Item
from perceptscore.locators import DATASET_ROW, LocalFile
from perceptscore.prefetch import stop_requested
from perceptscore.sinks import one_line, replaced_whole, write_atomic


def shard_limits() -> tuple[int, float]:
    """Rows and seconds after which a shard is written: the run's limits (``limits.current``)."""
    from perceptscore.limits import current

    return current().shard_rows, current().shard_seconds


class Interrupted(PerceptScoreError):
    """SIGINT/SIGTERM: the run stopped cleanly and can be resumed. Exit code 128 + signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


# ---- the lock ---------------------------------------------------------------------------------------


class OutputLock:
    """An exclusive POSIX lock (``lockf``) on ``.<out>.lock``. The kernel drops it when its process dies,
    however it dies, so a lock file left by a dead run is simply taken over; the file's content (pid, host,
    start, command) names the holder in the message a second run gets. Not ``flock``: a flock is shared
    with forked children, and decode workers outliving a killed run would keep holding it."""

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(f".{out.name}.lock")
        self.previous: dict[str, Any] | None = None

    def __enter__(self) -> OutputLock:
        for attempt in range(100):
            if attempt == 99:
                raise UsageError(f"cannot lock {self.path}: it keeps being removed and created")
            self._fd = self._open()
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EAGAIN or EACCES, by platform: held by a live process
                holder = self._read()
                os.close(self._fd)
                raise UsageError(self._held_by(holder)) from None
            if self._still_ours():
                break
            # The file was removed (its run ended) between our open and our lock: this lock guards
            # nothing, since the next run locks a new file under the name. Try again on that one.
            os.close(self._fd)
        self.previous = self._read() or None  # a dead run's record: its lock died with it
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": redacted_command(sys.argv),
        }
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(record).encode(), 0)
        except OSError as exc:  # a full disk or quota: the run could not save anything either
            self.__exit__()
            raise UsageError(f"cannot write in {self.path.parent}: {one_line(exc)}") from None
        return self

    def _open(self) -> int:
        """The lock file, never through a link and never someone else's: in a folder others can write
        in, a planted ``.<out>.lock`` symlink would otherwise make this run truncate and chmod its target."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(f"{self.path} is a symbolic link, not a lock file: remove it") from None
            raise UsageError(f"cannot write in {self.path.parent}: {exc.strerror or exc}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"owned by uid {st.st_uid}"
            raise UsageError(f"{self.path} is {what}, not this user's lock file: remove it") from None
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o600)  # the record names a command line (left 0644 by an older version)
        return fd

    def _still_ours(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _held_by(self, holder: dict[str, Any]) -> str:
        who = (
            f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            if holder
            else "?"
        )
        name = self.path.name.removeprefix(".").removesuffix(".lock")
        return (
            f"{name} is being written by another run ({who}: {holder.get('command', '')}); wait for it "
            "or choose another output"
        )

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(os.pread(self._fd, 4096, 0) or b"{}")
        except ValueError:
            return {}

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # releases the lock


# ---- signals ----------------------------------------------------------------------------------------


class StopOnSignal:
    """Turn SIGINT/SIGTERM into a request the scoring loop honours between batches (a second one is
    immediate). Outside the main thread (e.g. under a server) it changes nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        stop_requested.set()  # a wait for a remote object ends now, not at its deadline

    def __enter__(self) -> StopOnSignal:
        stop_requested.clear()
        with contextlib.suppress(ValueError):  # not the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_requested.clear()
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ---- shards -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    first: int
    last: int
    first_path: str
    paths_sha256: str  # of the shard's items' keys, one a line: what a resumed run checks its inputs against
    path: Path
    rows: int = -1  # rows it holds (-1: not recorded, one per item, as before containers)

    @property
    def row_count(self) -> int:
        return self.rows if self.rows >= 0 else self.last - self.first + 1


def row_key(path: str, known: tuple[int, int] | None) -> bytes:
    """What a shard's digest holds of a row: its path; for a dataset's row, whose path is a position in a
    file (``ds.parquet::image[3]``), also its bytes' size and digest: a dataset downloaded again under the
    same file names must not take the scores of the rows it replaced."""
    key = path.encode("utf-8", "surrogateescape")
    if known is not None and is_dataset_row(path):
        key += f"\t{known[0]}\t{known[1]}".encode()
    return key + b"\n"


def item_key(item: Item) -> bytes:
    """What a shard's digest holds of an item (``row_key``). A container's is its place and what says its
    rows are the same: a local shard's or dataset file's size and mtime; a dataset read task's first row;
    a downloaded copy's size only (each run downloads it again, at a new mtime). A remote shard's is its
    URL alone: a request per shard to resume would cost more than it guards."""
    if not is_container(item.locator):
        return row_key(item.path, item.locator.stat() if is_dataset_row(item.path) else None)  # in memory
    if isinstance(item.locator, TableRows):
        task = item.locator.task
        where, local, copy = f"{task.file}::{task.part}@{task.first_row}", task.local, task.local != task.file
    else:
        where, local, copy = item.path, item.path, False
    known = _stat(local)
    if known is not None and copy:
        known = (known[0], 0)
    return (
        where.encode("utf-8", "surrogateescape")
        + (f"\t{known[0]}\t{known[1]}".encode() if known else b"")
        + b"\n"
    )


def _stat(path: str) -> tuple[int, int] | None:
    if remote.is_remote(path):
        return None  # a request per item to resume would cost more than it guards
    try:
        return LocalFile(remote.local_path(path)).stat()
    except UsageError:  # a file:// URL naming another host
        return None


def is_dataset_row(path: str) -> bool:
    return "::" in path and DATASET_ROW.match(path) is not None


class InputsChanged(UsageError):
    """A shard's rows are other files than the inputs now give (see ``ShardedRun.pending``)."""


# What may differ between an interrupted run and a new one whose rows can still be reused file by file
# (by path, size and mtime): what is scored, not how.
_INPUT_KEYS = {
    "inputs",
    "input_files",
    "recursive",
    "path_column",
    "image_column",
    "follow_links",
    "incremental",
    "max_pixels",
    "tar_fields",
}
# Fingerprint keys added since runs were first resumable, with the value a run from before had: an
# interrupted run of an earlier version is continued when it ran as the default does now.
_ADDED = {"decode": "cpu"}


class ShardedRun:
    """The resumable state of one run. ``fingerprint`` says what the run is. An interrupted run of the same
    fingerprint is continued (its complete shards are never thrown away unasked); one of another
    fingerprint is refused, unless ``restart`` discards it."""

    def __init__(
        self,
        out: Path,
        schema: pa.Schema,
        fingerprint: dict[str, Any],
        restart: bool = False,
        strict: bool = False,
        parts: parts_folder.PartNames | None = None,
        on_part: Callable[[Path, str], None] | None = None,
    ) -> None:
        self.out, self.schema, self.fingerprint, self.strict = out, schema, fingerprint, strict
        self.parts = parts  # a folder output: the shards are its parts, named by ``parts``
        self.on_part = on_part  # told of each part complete (file, name): a remote folder uploads it
        self.folder = out / parts_folder.RUN if parts else out.with_name(f".{out.name}.parts")
        self.state = self.folder / "run.json"
        self._names: dict[int, str] = {}  # a folder output: each container item's part name
        self._uris: dict[int, str] = {}  # ... and the file it reads (row groups of one file: one part)
        self.discarded = 0
        self.salvaged: pa.Table | None = None  # an interrupted run's rows, its inputs having changed
        self.shards: list[Shard] = []
        self.shard_rows, self.shard_seconds = shard_limits()
        self._batches: list[pa.RecordBatch] = []
        self._indices: list[int] = []
        self._keys: dict[int, bytes] = {}  # items handed on by ``pending``, not in a shard yet: their keys
        self._containers: set[int] = set()  # which of them are containers (their rows may come in parts)
        self._opened = time.monotonic()
        self.not_a_run = False  # a folder under the run's name that held no run (cleaned up)
        self._replace_folder = False  # the folder holds a salvaged run, to remove before the first shard
        if parts and os.path.lexists(self.folder):
            _check_ours(self.folder)
            parts_folder.finish_swap(out)  # a finished run's swap cut short: carried out first
        if os.path.lexists(self.folder):
            _check_ours(self.folder)
            if restart:
                self.discarded = sum(s.row_count for s in self._scan())
                self._clear()
            else:
                self._adopt()
        # The folder and run.json appear with the first shard, not before: a run stopped before it saved a
        # row (weights refused, a full disk, no inputs) leaves nothing that could hold up the next one.

    @property
    def saved_rows(self) -> int:
        """Rows held by complete shards (at the start: what was continued)."""
        return sum(s.row_count for s in self.shards)

    def _clear(self) -> None:
        """Remove the run: its folder (its own, hidden, even for a folder output)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _files(self) -> list[Path]:
        if not self.parts:
            return sorted(self.folder.glob("shard-*.parquet"))
        return sorted(p for p in self.folder.rglob("*.parquet") if not p.name.startswith("."))

    def _scan(self) -> list[Shard]:
        shards = []
        for path in self._files():
            try:
                meta = pq.read_schema(path).metadata or {}
                info = json.loads(meta.get(b"shard", b"{}"))
            except (pa.ArrowException, OSError, ValueError):
                continue  # not one of ours (shards appear under their name only when complete)
            if "first" in info:
                shard = Shard(
                    info["first"], info["last"], info["first_path"], info.get("paths_sha256", ""), path,
                    int(info.get("rows", -1)),
                )  # fmt: skip
                shards.append(shard)
        return shards

    def _adopt(self) -> None:
        try:
            previous = json.loads(self.state.read_text())
            if not isinstance(previous, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            # Not a run: run.json is written (atomically) before any shard, so a folder without a readable
            # one was never more than begun (a full disk, a power loss). Its shards, if any, cannot be
            # told apart from another run's: nothing in it is reused.
            self.not_a_run = True
            self._clear()
            return
        shards = self._scan()
        if not shards:  # a run that saved no row holds nothing to continue: it never blocks a new one
            self._clear()
            return
        changed = [k for k in self.fingerprint if previous.get(k, _ADDED.get(k)) != self.fingerprint[k]]
        if changed and not self.strict and set(changed) <= _INPUT_KEYS:
            # its rows go on as reusable rows; the folder itself is replaced only when this run saves its
            # first row, so a run that stops before that (no images, a refusal) leaves it as it was
            self.shards = shards
            self.salvage(keep_folder=True)
            return
        if changed:
            rows = sum(s.row_count for s in shards)
            raise UsageError(
                f"an interrupted run of {self.out.name} that differs in {', '.join(changed)} holds {rows} "
                f"rows in {self.folder}: run with the same inputs and options to continue it, or --restart "
                "to discard it"
            )
        self.shards = shards
        for partial in self.folder.rglob(".*.partial"):  # a shard a killed run was writing
            partial.unlink(missing_ok=True)  # (this run holds the lock: no one else writes here)

    def _create(self) -> None:
        """The run's folder (this user's only) and its ``run.json``, whole or not at all (written, synced,
        renamed, and the folder synced), before the first shard."""
        if self._replace_folder:  # an earlier run's, salvaged: its rows are held here now
            self._clear()
            self._replace_folder = False
        if os.path.isdir(self.folder) and self.state.is_file():
            return
        if self.parts:  # the user's folder, made if new; the run's own in it
            self.out.mkdir(parents=True, exist_ok=True)
        self.folder.mkdir(mode=0o700)
        run = json.dumps(self.fingerprint, indent=2, sort_keys=True).encode()
        write_atomic(self.state, run, durable=True)

    def pending(self, items: Iterable[Item]) -> Iterator[Item]:
        """The items no shard holds yet. Every row a shard holds is checked against the inputs (a digest
        of its paths): a resumed run never mixes rows of changed inputs into its output."""
        shards = sorted(self.shards, key=lambda s: s.first)
        position, seen, last = 0, hashlib.sha256(), -1
        for item in items:
            last = item.index
            if self.parts and is_container(item.locator):  # named in order, held or not: the same names
                self._names[item.index] = self.parts.name(item.index, item.path)
                self._uris[item.index] = item.path
            while position < len(shards) and shards[position].last < item.index:
                position += 1
            if position < len(shards) and shards[position].first <= item.index:
                shard = shards[position]
                if item.index == shard.first:
                    seen = hashlib.sha256()
                seen.update(item_key(item))
                if item.index == shard.last and seen.hexdigest() != shard.paths_sha256:
                    raise self._changed(f"rows {shard.first}-{shard.last} are other files than were scored")
                continue
            self._keys[item.index] = item_key(item)
            if is_container(item.locator):
                self._containers.add(item.index)
            yield item
        if shards and shards[-1].last > last:
            raise self._changed(f"they end at row {last}; row {shards[-1].last} was scored")

    def _changed(self, what: str) -> InputsChanged:
        return InputsChanged(
            f"the inputs changed since the interrupted run ({what}); run with --restart to start over, or "
            "without --resume to reuse its rows where files are unchanged"
        )

    def salvage(self, keep_folder: bool = False) -> None:
        """Keep every row the shards hold in ``salvaged`` (with what was salvaged before) and remove them:
        the run starts over, reusing those rows where a file is unchanged. ``keep_folder``: the folder is
        removed when the first new shard is written, not now."""
        self.flush()
        tables = [pq.read_table(s.path).replace_schema_metadata(None) for s in self.shards]
        if self.salvaged is not None:
            tables.insert(0, self.salvaged)
        self.salvaged = pa.concat_tables(tables) if tables else self.schema.empty_table()
        self.shards = []
        self._replace_folder = keep_folder
        if not keep_folder:
            self._clear()

    def add(self, indices: list[int], batch: pa.RecordBatch) -> None:
        """Rows in input order (a container's rows share its index); they start a new shard wherever an
        item is skipped (held by an earlier shard, or a container without rows)."""
        start = 0
        for n, index in enumerate(indices):
            if n > start and (
                index not in (indices[n - 1], indices[n - 1] + 1) or self._parts_differ(index, indices[n - 1])
            ):
                self._append(indices[start:n], batch.slice(start, n - start))
                start = n
        self._append(indices[start:], batch.slice(start))
        if self.parts and self._indices and self._indices[-1] in self._names:
            return  # a container's part ends with its file only (``_append``)
        if len(self._indices) >= self.shard_rows or time.monotonic() - self._opened >= self.shard_seconds:
            self.flush()

    def _append(self, indices: list[int], batch: pa.RecordBatch) -> None:
        if self._indices and indices and indices[0] not in (self._indices[-1], self._indices[-1] + 1):
            self.flush(whole=True)  # the held rows' last item is complete: a later one has begun
        elif self._indices and indices and self._parts_differ(indices[0], self._indices[-1]):
            self.flush(whole=True)  # a folder output: a part per container file, or plain items only
        self._indices += indices
        self._batches.append(batch)

    def _parts_differ(self, index: int, before: int) -> bool:
        """A folder output: whether an item's rows go to another part than the item ``before``'s (a part
        is one container file's, a dataset file's row groups sharing one, or plain items only)."""
        return self.parts is not None and self._uris.get(index) != self._uris.get(before)

    def flush(self, whole: bool = False) -> None:
        """Write the rows held so far as one complete shard (temporary name, fsync, rename). The last item's
        rows stay held unless ``whole`` (the run is over, or a later item has begun): a container's rows
        may not all be here yet, and a shard holds whole items only."""
        held = len(self._indices)
        if not whole and held and self._indices[-1] in self._containers:
            held = bisect.bisect_left(self._indices, self._indices[-1])  # indices never decrease
        if not held:
            self._opened = time.monotonic()
            return
        table = pa.Table.from_batches(self._batches, schema=self._batches[0].schema)
        indices, rest = self._indices[:held], self._indices[held:]
        self._write(indices, table.slice(0, held))
        self._indices = rest
        self._batches = table.slice(held).to_batches() if rest else []
        self._opened = time.monotonic()

    def _write(self, indices: list[int], table: pa.Table) -> None:
        first, last = indices[0], indices[-1]
        try:
            self._create()
        except OSError as exc:
            shutil.rmtree(self.folder, ignore_errors=True)  # never a folder without a run.json
            raise UsageError(f"cannot write in {self.folder.parent}: {one_line(exc)}") from None
        table = table.cast(self.schema)
        paths = table.column(PATH).to_pylist()
        firsts: dict[int, int] = {}  # each item's first row, in order
        for n, index in enumerate(indices):
            firsts.setdefault(index, n)
        keys = [self._key(index, table, row) for index, row in firsts.items()]
        info = {
            "first": first,
            "last": last,
            "first_path": paths[0],
            "paths_sha256": hashlib.sha256(b"".join(keys)).hexdigest(),
            "rows": table.num_rows,
        }
        table = table.replace_schema_metadata({"shard": json.dumps(info)})
        final = self.folder / self._name(first, last)
        if any(s.path == final for s in self.shards):  # two parts of one name: a bug, never a loss
            raise RuntimeError(f"part {final} written twice (items {first}-{last})")
        final.parent.mkdir(parents=True, exist_ok=True)
        try:  # the clean-up of a killed run knows this temporary name (.shard-*.partial)
            with replaced_whole(
                final, durable=True, follow=False, tmp=final.with_name(f".{final.name}.partial")
            ) as tmp:
                pq.write_table(table, tmp)
        except OSError as exc:
            if not self.shards:  # a run folder holding no row is no use to anyone: not left behind
                self._clear()
            raise UsageError(
                f"cannot write {self.out.name}'s shards in {self.folder}: {one_line(exc)}"
            ) from None
        self.shards.append(Shard(first, last, paths[0], info["paths_sha256"], final, table.num_rows))
        if self.on_part is not None:
            self.on_part(final, final.relative_to(self.folder).as_posix())

    def _name(self, first: int, last: int) -> str:
        if not self.parts:
            return f"shard-{first:012d}-{last:012d}.parquet"
        return self._names.get(first) or self.parts.plain(first)

    def publish(self, about: dict[str, Any]) -> tuple[int, int]:
        """A folder output, finished: its parts moved into the output folder in place of an earlier
        output's, the manifest (``listing``) written last (``parts.swap``); the run's folder goes. Returns
        (rows, errors)."""
        body = self.listing(about)
        parts_folder.swap(self.out, body)
        return body["rows"], body["errors"]

    def listing(self, about: dict[str, Any]) -> dict[str, Any]:
        """A folder output's manifest: its parts in input order, the rows and errors of each."""
        import pyarrow.compute as pc

        self.flush(whole=True)
        self._create()  # a run of no rows still makes its folder, with a manifest of no parts
        listed = []
        for shard in sorted(self.shards, key=lambda s: s.first):
            errors = pq.read_table(shard.path, columns=[ERROR]).column(ERROR)
            listed.append({
                "file": shard.path.relative_to(self.folder).as_posix(), "rows": shard.row_count,
                "errors": int(pc.sum(pc.is_valid(errors)).as_py() or 0), "first_item": shard.first,
                "last_item": shard.last,
            })  # fmt: skip
        return parts_folder.manifest_body(about, listed, self.schema)

    def _key(self, index: int, table: pa.Table, row: int) -> bytes:
        """The item's key as ``pending`` recorded it; for rows added without it, the row's own."""
        self._containers.discard(index)
        key = self._keys.pop(index, None)
        if key is not None:
            return key
        path, size, mtime = (table.column(c)[row].as_py() for c in (PATH, FILE_SIZE, FILE_MTIME))
        return row_key(path, (size, mtime) if size is not None and mtime is not None else None)

    def tables(self, total: int) -> Iterator[pa.Table]:
        """Every shard in input order, after checking they hold items of 0..total-1 at most once each (an
        item in none is a container without rows: ``scoring`` checks every other item has its row)."""
        self.flush(whole=True)
        shards = sorted(self.shards, key=lambda s: s.first)
        expected = 0
        for shard in shards:
            if shard.first < expected:
                raise RuntimeError(
                    f"shards overlap at item {shard.first} in {self.folder}"
                )  # a bug, not input
            expected = shard.last + 1
        if expected > total:
            raise RuntimeError(
                f"shards hold items up to {expected - 1}, the inputs {total}, in {self.folder}"
            )
        for shard in shards:
            yield pq.read_table(shard.path).replace_schema_metadata(None)

    def found_paths(self) -> list[str]:
        """The paths of the rows whose file was found (a stat recorded), from every shard: what an earlier
        output's rows are looked for in."""
        import pyarrow.compute as pc

        self.flush(whole=True)
        found: list[str] = []
        for shard in self.shards:
            table = pq.read_table(shard.path, columns=[PATH, FILE_SIZE])
            found += table.filter(pc.is_valid(table.column(FILE_SIZE))).column(PATH).to_pylist()
        return found

    def remove(self) -> None:
        """The run's folder, once its output is whole."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _check_ours(folder: Path) -> None:
    """A run folder is a real folder of this user's: never a link (``rmtree`` and shard writes would go
    where it points) and never another user's (whose shards this run would publish as its own)."""
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{folder} is not a folder (a link or a file): remove it to run")
    if st.st_uid != os.geteuid():
        raise UsageError(f"{folder} belongs to uid {st.st_uid}, not to this user: remove it to run")
