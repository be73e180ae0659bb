"""What makes a long ``score`` run safe to kill: an output lock, resumable shards, and clean signal stops.

A run writing ``out.parquet`` keeps its state in ``.out.parquet.parts/``: ``run.json`` (what the run is)
and numbered parquet shards, each covering a contiguous range of input rows. A shard exists under its final
name only once complete (written under a temporary name, then renamed), so after a SIGKILL or power loss
every shard present is whole. ``--resume`` skips the rows those shards hold; the final file is assembled from
the shards in order and renamed into place, then the folder is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from perceptscore.columns import PATH
from perceptscore.errors import PerceptScoreError, UsageError
from perceptscore.sources import Item


def shard_limits() -> tuple[int, float]:
    """Rows and seconds after which a shard is written, read when a run starts (not frozen at import)."""
    rows = int(os.environ.get("PERCEPTSCORE_SHARD_ROWS", "4096"))
    return rows, float(os.environ.get("PERCEPTSCORE_SHARD_SECONDS", "60"))


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
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write in {self.path.parent}: {exc.strerror or exc}") from None
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN or EACCES, by platform: held by a live process
            holder = self._read()
            os.close(self._fd)
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                if holder
                else "?"
            )
            raise UsageError(
                f"{self.path.name.removeprefix('.').removesuffix('.lock')} is being written by another run "
                f"({who}: {holder.get('command', '')}); wait for it or choose another output"
            ) from None
        self.previous = self._read() or None  # a dead run's record: its lock died with it
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode(), 0)
        return self

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

    def __enter__(self) -> StopOnSignal:
        with contextlib.suppress(ValueError):  # not the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ---- shards -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    first: int
    last: int
    first_path: str
    path: Path


class ShardedRun:
    """The resumable state of one run. ``fingerprint`` says what the run is; resuming a run with another
    fingerprint (other tasks, weights, precision or inputs) is refused."""

    def __init__(self, out: Path, schema: pa.Schema, fingerprint: dict[str, Any], resume: bool) -> None:
        self.out, self.schema, self.fingerprint = out, schema, fingerprint
        self.folder = out.with_name(f".{out.name}.parts")
        self.discarded = 0
        self.shards: list[Shard] = []
        if self.folder.exists() and resume:
            self._adopt()
        elif self.folder.exists():
            self.discarded = sum(s.last - s.first + 1 for s in self._scan())
            shutil.rmtree(self.folder)
        if not self.folder.exists():
            try:
                self.folder.mkdir()
                _write_json(self.folder / "run.json", fingerprint)
            except OSError as exc:
                raise UsageError(f"cannot write in {self.folder.parent}: {exc.strerror or exc}") from None
        self.shard_rows, self.shard_seconds = shard_limits()
        self._batches: list[pa.RecordBatch] = []
        self._indices: list[int] = []
        self._opened = time.monotonic()

    @property
    def saved_rows(self) -> int:
        """Rows held by complete shards (at the start: what --resume took over)."""
        return sum(s.last - s.first + 1 for s in self.shards)

    def refresh(self) -> None:
        """Re-read the shards on disk (other processes of the run write them too)."""
        self.shards = self._scan()

    def _scan(self) -> list[Shard]:
        shards = []
        for path in sorted(self.folder.glob("shard-*.parquet")):
            meta = pq.read_schema(path).metadata or {}
            info = json.loads(meta.get(b"shard", b"{}"))
            if "first" in info:
                shards.append(Shard(info["first"], info["last"], info["first_path"], path))
        return shards

    def _adopt(self) -> None:
        try:
            previous = json.loads((self.folder / "run.json").read_text())
        except (OSError, ValueError):
            previous = {}
        changed = [k for k in self.fingerprint if previous.get(k) != self.fingerprint[k]]
        if changed:
            raise UsageError(
                f"--resume: the interrupted run in {self.folder} differs in {', '.join(changed)}; "
                "run without --resume to start over"
            )
        self.shards = self._scan()

    def pending(self, items: Iterable[Item]) -> Iterator[Item]:
        """The items no shard holds yet; checks that each shard's first row is still the same file."""
        starts = {s.first: s for s in self.shards}
        done = sorted((s.first, s.last) for s in self.shards)
        position = 0
        for item in items:
            shard = starts.get(item.index)
            if shard is not None and shard.first_path != item.path:
                raise UsageError(
                    f"--resume: the inputs changed since the interrupted run (row {item.index} was "
                    f"{shard.first_path!r}, now {item.path!r}); run without --resume to start over"
                )
            while position < len(done) and done[position][1] < item.index:
                position += 1
            if position < len(done) and done[position][0] <= item.index <= done[position][1]:
                continue
            yield item

    def add(self, indices: list[int], batch: pa.RecordBatch) -> None:
        """Rows in input order; they start a new shard wherever they do not follow the previous row."""
        start = 0
        for n, index in enumerate(indices):
            if n > start and index != indices[n - 1] + 1:
                self._append(indices[start:n], batch.slice(start, n - start))
                start = n
        self._append(indices[start:], batch.slice(start))
        if len(self._indices) >= self.shard_rows or time.monotonic() - self._opened >= self.shard_seconds:
            self.flush()

    def _append(self, indices: list[int], batch: pa.RecordBatch) -> None:
        if self._indices and indices and indices[0] != self._indices[-1] + 1:
            self.flush()
        self._indices += indices
        self._batches.append(batch)

    def flush(self) -> None:
        """Write the rows held so far as one complete shard (temporary name, fsync, rename)."""
        if not self._indices:
            self._opened = time.monotonic()
            return
        first, last = self._indices[0], self._indices[-1]
        table = pa.Table.from_batches(self._batches).cast(self.schema)
        info = {"first": first, "last": last, "first_path": table.column(PATH)[0].as_py()}
        table = table.replace_schema_metadata({"shard": json.dumps(info)})
        final = self.folder / f"shard-{first:012d}-{last:012d}.parquet"
        tmp = self.folder / f".{final.name}.partial"
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            reason = " ".join((exc.strerror or str(exc)).split())  # one line, whoever raised it
            raise UsageError(f"cannot write {self.out.name}'s shards in {self.folder}: {reason}") from None
        self.shards.append(Shard(first, last, info["first_path"], final))
        self._batches, self._indices = [], []
        self._opened = time.monotonic()

    def tables(self, total: int) -> Iterator[pa.Table]:
        """Every shard in input order, after checking together they hold rows 0..total-1 exactly once."""
        self.flush()
        shards = sorted(self.shards, key=lambda s: s.first)
        expected = 0
        for shard in shards:
            if shard.first != expected:
                raise RuntimeError(
                    f"shards do not line up at row {expected} in {self.folder}"
                )  # a bug, not input
            expected = shard.last + 1
        if expected != total:
            raise RuntimeError(f"shards hold {expected} rows, the inputs {total}, in {self.folder}")
        for shard in shards:
            yield pq.read_table(shard.path).replace_schema_metadata(None)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
