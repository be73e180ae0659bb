"""``-o s3://bucket/scores.parquet``: an output in an object store.

The run itself is local: the lock, the resumable shards and the finished file live in a work folder of
their own (``$PERCEPTSCORE_WORK``, else ``~/.cache/perceptscore/outputs``), one sub-folder per output URL
(a digest of its normalised spelling, so two URLs never share a lock and two spellings of one URL always
do). The work folder is private: created 0700, refused when it is a link or another user's (its files are
uploaded with the user's credentials and removed by the run), its files opened without following links.

Two hosts with different work folders are kept apart by a lock object in the store, ``.<name>.lock``
beside the output, created only if absent (S3's ``If-None-Match: *``) and renewed while the run lives; a
lock not renewed for ``PERCEPTSCORE_REMOTE_LOCK_STALE`` seconds (or whose process on this host is gone)
is taken over. Other stores (gs://, az://, and S3-compatible ones that answer conditional writes with 501)
get no such lock: there only the local lock holds.

The finished file is uploaded once, whole: an object store shows an object only when its upload completes,
so nothing half-written ever appears under the name. The CSV/JSONL provenance sidecar goes first, as the
local rule writes it (``sinks.FileSink``); if the data then fails, the earlier sidecar is put back, so data
and provenance never disagree.

Before any scoring, a small probe object is written and removed beside the output: a bucket that does not
exist or refuses writes fails in a second, not after the run. A failed upload keeps the finished file and
says so; the same command uploads it without scoring again when every row's file is unchanged, and
otherwise reuses its rows as ``--incremental`` does (a ``ready.json`` records which run it is).

``RemoteSink`` is this output as a ``sinks.Sink`` (``SINKS["remote"]``): the rows go to the local copy, and
its ``finish`` uploads it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from perceptscore import limits, remote
from perceptscore._text import redacted_command
from perceptscore.columns import FILE_MTIME, FILE_SIZE, PATH
from perceptscore.errors import DecodeError, UsageError
from perceptscore.formats import format_of, meta_path, read_scores
from perceptscore.sinks import FileSink, Rows, process_alive, write_atomic

if TYPE_CHECKING:
    from perceptscore.items import Item

_PRIVATE_FILE = 0o600


def work_root() -> Path:
    """Where remote outputs are written before their upload: the run's ``Limits.work``
    (``PERCEPTSCORE_WORK``), by default under this user's cache."""
    return Path(limits.current().work or Path.home() / ".cache" / "perceptscore" / "outputs")


def lock_stale_seconds() -> float:
    """How long a remote lock may go unrenewed before another run takes it over (a crashed host's)."""
    return limits.current().remote_lock_stale


# ---- the private work folder -------------------------------------------------------------------------


def private_folder(path: Path) -> None:
    """``path`` as a folder only this user can enter: created 0700, or refused when it is a link or not
    owned by this user (someone else could plant a finished file for us to upload, or point the run's
    deletions at other files). One of ours with looser modes is made private."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UsageError(f"cannot create the work folder {path}: {exc.strerror or exc}") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"work folder {path} is a symbolic link: refusing it; set PERCEPTSCORE_WORK to a "
                         "folder of your own")  # fmt: skip
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"work folder {path} is not a folder")
    if st.st_uid != os.getuid():
        raise UsageError(f"work folder {path} belongs to another user (uid {st.st_uid}): refusing it; set "
                         "PERCEPTSCORE_WORK to a folder of your own")  # fmt: skip
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


def _owned_file(path: Path) -> bool:
    """A regular file of this user's (not a link, not planted by someone else)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def _read_private(path: Path) -> bytes | None:
    """A small file of ours, never read through a link; None when absent or not ours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return None
        return f.read(1 << 20)


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, 0600, never writing through a link planted at the name."""
    write_atomic(path, data, mode=_PRIVATE_FILE, follow=False)


def _make_private(path: Path) -> None:
    """A file the run wrote (the finished scores, their sidecar) made 0600, never through a link."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, _PRIVATE_FILE)
        finally:
            os.close(fd)


# ---- transfers ---------------------------------------------------------------------------------------


def request_seconds() -> float:
    """The most one small request (a probe, the lock, a sidecar) may take. fsspec's ``timeout`` bounds
    the whole call: a store that takes the request and never answers is not caught by the backend's own
    read timeout, and would hold the run forever."""
    return 2 * remote.timeout()


def put_file(local: Path, url: str) -> None:
    """Upload ``local`` to ``url``, each try bounded in time (``request_seconds``, plus a second a MB:
    an upload slower than 1 MB/s is given up)."""
    fs, path = remote.split(url)
    seconds = request_seconds() + local.stat().st_size / (1 << 20)
    remote.with_retries(lambda: fs.put_file(str(local), path, timeout=seconds))


class Unsupported(DecodeError):
    """The store does not do conditional writes (an S3-compatible one answering 501 Not Implemented)."""


def _conditional_put(url: str, body: bytes, **condition: str) -> str | None:
    """Write ``body`` at ``url`` if ``condition`` holds (``IfNoneMatch="*"``, ``IfMatch=etag``): the new
    ETag, or None when it did not hold (another run's lock is there, or took ours over)."""
    fs, path = remote.split(url)

    def attempt() -> dict[str, Any] | None:
        try:
            return fs.pipe_file(path, body, timeout=request_seconds(), **condition)
        except Exception as exc:
            reason = remote.classify(exc)[0]
            if reason in ("HTTP 412", "HTTP 409"):  # 409: a concurrent conditional write
                return None
            if reason.endswith("(HTTP 501)"):  # not retried: it will not start to work
                raise Unsupported(f"{reason}: conditional writes not supported") from None
            raise

    written = remote.with_retries(attempt)
    return None if written is None else str(written.get("ETag", ""))


# ---- the lock other hosts see ------------------------------------------------------------------------


class RemoteLock:
    """``.<name>.lock`` beside an S3 output (or the object ``at``: a folder output's is inside it): created
    only if absent, renewed every quarter of the stale time by a thread (conditionally on its own ETag, so a
    run whose lock was taken over learns it), removed at the end if still ours. ``lost`` is set when another
    run took it over."""

    def __init__(self, url: str, shown: str, at: str | None = None) -> None:
        head = url.split("?", 1)[0]
        folder, name = head.rsplit("/", 1)
        self.url, self.shown = at or f"{folder}/.{name}.lock", shown
        self.etag: str | None = None
        self.lost = False
        # A conditional write whose answer was lost is tried again and then refused (412) although it was
        # done: the token in the record tells our own lock from another run's.
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> RemoteLock:
        record = {
            "pid": os.getpid(), "host": socket.gethostname(), "pid_namespace": _pid_namespace(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": redacted_command(sys.argv),
            "token": self.token,
        }  # fmt: skip
        try:
            self.etag = self._acquire(_body(record))
        except Unsupported:
            return self  # as on gs:// and az://: only the local lock holds
        except DecodeError as exc:
            raise UsageError(f"cannot lock {self.shown}: {exc}") from None
        self._beat = threading.Thread(target=self._renew, args=(record,), daemon=True, name="remote-lock")
        self._beat.start()
        return self

    def _acquire(self, record: bytes) -> str:
        for _ in range(3):  # a lock removed or taken over between our looks: look again
            etag = _conditional_put(self.url, record, IfNoneMatch="*")
            if etag is not None:
                return etag
            holder = self._holder()
            if holder is None:
                continue
            about, info = holder
            if about.get("token") == self.token:  # ours: written by a try whose answer was lost
                return str(info.get("ETag"))
            if not _stale(about, info):
                raise UsageError(self._held_by(about))
            etag = _conditional_put(self.url, record, IfMatch=str(info.get("ETag")))
            if etag is not None:
                return etag
        raise UsageError(f"cannot lock {self.shown}: its lock keeps changing hands")

    def _holder(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The lock object's record and its info (ETag, LastModified); None when it is gone."""
        fs, path = remote.split(self.url)
        try:
            info = remote.with_retries(lambda: fs.info(path, timeout=request_seconds()))
            body = remote.with_retries(
                lambda: fs.cat_file(path, start=0, end=1 << 16, timeout=request_seconds())
            )
        except DecodeError as exc:
            if str(exc).startswith("not found"):
                return None
            raise
        try:
            about = json.loads(body)
        except ValueError:
            about = {}
        return (about if isinstance(about, dict) else {}), info

    def _held_by(self, holder: dict[str, Any]) -> str:
        who = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
        return (
            f"{self.shown} is being written by another run ({who}: {holder.get('command', '')}); wait for "
            f"it or choose another output (a lock not renewed for {lock_stale_seconds():g} s is taken over)"
        )

    def _renew(self, record: dict[str, Any]) -> None:
        while not self._stop.wait(lock_stale_seconds() / 4):
            try:
                etag = _conditional_put(self.url, _body(record), IfMatch=str(self.etag))
            except (DecodeError, UsageError):
                continue  # a missed renewal is not yet a lost lock: the next one may get through
            if etag is None:
                holder = self._ours()
                if holder is None:
                    self.lost = True
                    return
                etag = holder
            self.etag = etag

    def _ours(self) -> str | None:
        """The lock object's ETag when it still holds our record (a renewal's answer was lost), else None."""
        try:
            holder = self._holder()
        except (DecodeError, UsageError):
            return str(self.etag)  # cannot tell now: not yet a lost lock
        if holder is None or holder[0].get("token") != self.token:
            return None
        return str(holder[1].get("ETag"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None:  # a renewal under way (a store that is down) is not waited out
            self._beat.join(timeout=request_seconds())
        if self.lost or self.etag is None:
            return
        fs, path = remote.split(self.url)
        seconds = request_seconds()
        with contextlib.suppress(Exception):  # left behind, it goes stale and is taken over
            if remote.with_retries(lambda: fs.info(path, timeout=seconds)).get("ETag") == self.etag:
                remote.with_retries(lambda: fs.rm_file(path, timeout=seconds))


def _pid_namespace() -> int | None:
    """This process's pid namespace (Linux): a pid means the same process only inside one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _body(record: dict[str, Any]) -> bytes:
    """The lock object's content; the renewal time in it makes each renewal a new ETag."""
    return json.dumps({**record, "renewed": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()


def _stale(holder: dict[str, Any], info: dict[str, Any]) -> bool:
    """A lock nobody renews: its process on this host is gone, or it was not renewed for the stale time
    (by the store's clock, as far as this host's clock agrees with it)."""
    pid = holder.get("pid")
    here = holder.get("host") == socket.gethostname() and holder.get("pid_namespace") == _pid_namespace()
    if here and isinstance(pid, int) and not process_alive(pid):  # (containers share host names, not pids)
        return True
    modified = info.get("LastModified")
    if not isinstance(modified, dt.datetime):
        return False
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=dt.timezone.utc)
    age = (dt.datetime.now(dt.timezone.utc) - modified).total_seconds()
    return age > lock_stale_seconds()


# ---- the output --------------------------------------------------------------------------------------


def object_store(url: str) -> tuple[str, str]:
    """An output URL's store (``s3``, ...) and its spelling for messages; refused unless an object store
    whose backend is installed (else: the extra to install)."""
    name, shown = remote.scheme(url), remote.without_secrets(url)
    if name not in remote.OBJECT_STORES:
        stores = ", ".join(f"{s}://" for s in remote.OBJECT_STORES)
        raise UsageError(f"-o {shown}: outputs go to a local path or an object store ({stores})")
    remote.filesystem(name)
    return name, shown


def work_folder(url: str) -> Path:
    """An output URL's own folder in the work folder: a digest of its normalised spelling, so two URLs
    never share one and two spellings of one URL always do."""
    return work_root() / hashlib.sha256(remote.normalized(url).encode()).hexdigest()[:20]


def make_work_folder(folder: Path) -> None:
    """``folder`` and the work folder it is in, made private (``private_folder``)."""
    try:
        folder.parent.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"cannot create the work folder {folder.parent}: {reason}") from None
    private_folder(folder.parent)
    private_folder(folder)


def write_probe(url: str, shown: str) -> tuple[Any, str]:
    """A small object put at ``url``: a store that does not exist or refuses writes fails in a second,
    not after the run. Returns (file system, path) to remove it."""
    fs, path = remote.split(url)
    try:
        body = b"perceptscore write probe\n"
        remote.with_retries(lambda: fs.pipe_file(path, body, timeout=request_seconds()))
    except DecodeError as exc:
        raise UsageError(f"cannot write to {shown}: {exc}") from None
    return fs, path


class RemoteOutput:
    """An object-store output of one run: its private local copy (``local``), the lock other hosts see
    (``locked``), the upload once complete (``finished``, ``upload``) and what an earlier run whose upload
    failed left (``finished_rows``). Made before the plan; its rows are written through ``RemoteSink``."""

    def __init__(self, url: str) -> None:
        name, shown_as = object_store(url)
        basename = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        if format_of(basename) is None or basename.startswith("."):
            raise UsageError(
                f"-o {shown_as}: name the object to write, ending in .csv, .parquet or .jsonl, or end the "
                "URL with / for a folder of parts"
            )
        self.url, self.shown, self.store = url, shown_as, name
        self.folder = work_folder(url)
        self.local = self.folder / basename
        self._ready = self.folder / "ready.json"
        self._lock: RemoteLock | None = None

    def prepare(self) -> None:
        """Proof the destination takes writes, and the private work folder (before anything is scored)."""
        head, _, _ = self.url.partition("?")
        probe = f"{head.rsplit('/', 1)[0]}/.{head.rsplit('/', 1)[1]}.probe-{uuid.uuid4().hex[:12]}"
        fs, path = write_probe(probe, self.shown)
        with contextlib.suppress(Exception):  # a store may allow writes but not deletes: harmless
            fs.rm_file(path, timeout=request_seconds())
        make_work_folder(self.folder)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while the run scores and uploads: other hosts writing this output are refused (S3 only:
        the one store here whose conditional writes this uses)."""
        if self.store != "s3":
            yield
            return
        with RemoteLock(self.url, self.shown) as self._lock:
            yield
        self._lock = None

    def finished_rows(self, fingerprint: dict[str, Any]) -> pa.Table | None:
        """The rows of a finished file of this plan waiting to be uploaded (an earlier upload failed), if
        it and its record are ours; anything else is discarded."""
        try:
            recorded = json.loads(_read_private(self._ready) or b"null")
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict) or recorded.get("fingerprint") != fingerprint:
            self.discard()
            return None
        sidecar = format_of(self.local.name).sidecar  # type: ignore[union-attr]  # checked in __init__
        if not _owned_file(self.local) or (sidecar and not _owned_file(meta_path(self.local))):
            self.discard()
            return None
        try:
            return read_scores(str(self.local))
        except Exception:  # unreadable: as good as absent
            self.discard()
            return None

    @staticmethod
    def unchanged(rows: pa.Table, items: Iterable[Item]) -> bool:
        """Every row is the item's at its position, and that item's file is as it was scored (a fresh
        stat, as ``--incremental`` compares; an item without one is never taken as unchanged)."""
        paths = rows.column(PATH).to_pylist()
        sizes = rows.column(FILE_SIZE).to_pylist()
        mtimes = rows.column(FILE_MTIME).to_pylist()
        count = 0
        for item in items:
            if count >= len(paths) or item.path != paths[count]:
                return False
            now = item.locator.stat()
            if now is None or now != (sizes[count], mtimes[count]):
                return False
            count += 1
        return count == len(paths)

    def finished(self, fingerprint: dict[str, Any]) -> None:
        """Record which run the finished local file is (before its upload is tried); its files private."""
        for path in (self.local, meta_path(self.local)):
            _make_private(path)
        _write_private(self._ready, json.dumps({"fingerprint": fingerprint}, sort_keys=True).encode())

    def discard(self) -> None:
        for stale in (self.local, meta_path(self.local), self._ready):
            stale.unlink(missing_ok=True)

    def upload(self) -> None:
        """Sidecar, then data (the local rule's order); a failed data upload puts the earlier sidecar
        back. Then the local copies go. A failure keeps them, to upload next time."""
        if self._lock is not None and self._lock.lost:
            raise UsageError(
                f"the scores are complete in {self.local} but not uploaded: another run took over the lock "
                f"of {self.shown} (not renewed for {lock_stale_seconds():g} s)"
            )
        sidecar = meta_path(self.local)
        sidecar_url = self.url.split("?", 1)[0] + ".meta.json"
        try:
            if sidecar.is_file():
                earlier = self._earlier_sidecar(sidecar_url)
                put_file(sidecar, sidecar_url)
                self._put_data_or_restore(sidecar_url, earlier)
            else:
                put_file(self.local, self.url)
        except (DecodeError, OSError) as exc:
            reason = str(exc) if isinstance(exc, DecodeError) else (exc.strerror or str(exc))
            raise UsageError(
                f"the scores are complete in {self.local} but could not be uploaded to {self.shown} "
                f"({reason}); run the same command again to upload them without scoring again"
            ) from None
        for done in (self.local, sidecar, self._ready):
            done.unlink(missing_ok=True)

    @staticmethod
    def _earlier_sidecar(url: str) -> bytes | None:
        """The provenance now beside the output (None: there is none), to put back if the data fails."""
        fs, path = remote.split(url)
        try:
            return bytes(remote.with_retries(lambda: fs.cat_file(path, timeout=request_seconds())))
        except DecodeError as exc:
            if str(exc).startswith("not found"):
                return None
            raise

    def _put_data_or_restore(self, sidecar_url: str, earlier: bytes | None) -> None:
        try:
            put_file(self.local, self.url)
        except (DecodeError, OSError) as exc:
            fs, path = remote.split(sidecar_url)
            seconds = request_seconds()
            restore = (
                (lambda: fs.rm_file(path, timeout=seconds))
                if earlier is None
                else (lambda: fs.pipe_file(path, earlier, timeout=seconds))
            )
            try:
                remote.with_retries(restore)
            except DecodeError:
                raise DecodeError(f"{exc}; the provenance beside it is this run's, its data the earlier "
                                  "run's") from None  # fmt: skip
            raise

    def tidy(self) -> None:
        """Once the lock is given up: the work folder goes if nothing is left in it."""
        with contextlib.suppress(OSError):
            self.folder.rmdir()


class RemoteSink:
    """An object-store output as a ``Sink`` (``SINKS["remote"]``): rows go to its local copy (a
    ``FileSink`` in the private work folder), which ``finish`` completes, records as ``fingerprint``'s run
    and uploads whole; a failed upload keeps it for the same command to upload without scoring again.
    ``abort`` drops the partial local file; the store is not touched before the upload.

    ``output``: the run's ``RemoteOutput`` (prepared, and locked while the run holds it: a lock taken over
    meanwhile refuses the upload), or a URL, checked and probed now as a file sink checks its file when
    made. ``before_upload``: called with the complete local copy before it is uploaded (``score`` then
    removes its shards and makes its ``--report`` from it)."""

    name = "remote"

    def __init__(
        self,
        output: RemoteOutput | str,
        fingerprint: dict[str, Any],
        before_upload: Callable[[Path], None] | None = None,
    ) -> None:
        if isinstance(output, str):
            output = RemoteOutput(output)
            output.prepare()
        self.output, self.fingerprint, self.before_upload = output, fingerprint, before_upload
        self._file = FileSink(str(output.local))

    def open(self, schema: pa.Schema, provenance: dict[str, Any]) -> None:
        self._file.open(schema, provenance)

    def write(self, rows: Rows) -> None:
        self._file.write(rows)

    def finish(self) -> None:
        """The local copy complete, then (in this order, as ``score`` always did) ``before_upload``, the
        record of which run it is, the upload."""
        self._file.finish()
        if self.before_upload is not None:
            self.before_upload(self.output.local)
        self.output.finished(self.fingerprint)
        self.output.upload()

    def abort(self) -> None:
        # Not ``discard()``: a file an earlier run of this plan finished (kept by --retry-errors) is still
        # the next run's to upload; only what this sink wrote goes.
        self._file.abort()
