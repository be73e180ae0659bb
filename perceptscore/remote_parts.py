"""``-o s3://bucket/scores/``: a folder output (``parts``) in an object store.

The run is local, as any remote output's (``destinations``): its parts are written in the private work
folder (``<work>/<digest of the URL>/out/.perceptscore-run/``) and resumed from there. Each part is uploaded
as soon as it is complete, to the output's own hidden staging prefix (``scores/.perceptscore-run/``, which
pandas, pyarrow and DuckDB skip), by a few threads beside the scoring; the folder itself keeps an earlier
output untouched meanwhile. Finished, the run commits: a journal (``.perceptscore-run/_commit.json``) is put
in the store first, saying what the commit does; then the manifest goes (the folder is not complete from
here), the earlier output's parts that this one does not replace are removed, the staged parts are copied
to their names (server-side copies: no bytes through this host), the new manifest is written last and the
staging prefix removed. A commit cut short (SIGKILL, a lost connection) is finished by the next run of any
host that finds the journal, before it does anything else.

The lock object other hosts see (S3's conditional writes, as ``destinations.RemoteLock``) is
``scores/.perceptscore.lock``, inside the folder the user named.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from perceptscore import parts, remote
from perceptscore.destinations import (
    RemoteLock,
    make_work_folder,
    object_store,
    put_file,
    request_seconds,
    work_folder,
    write_probe,
)
from perceptscore.errors import DecodeError, UsageError

STAGING = parts.RUN  # the hidden prefix in the output folder where parts wait for the commit
JOURNAL = "_commit.json"  # in STAGING: the commit under way
LOCK = ".perceptscore.lock"
_UPLOADERS = 4
_COPY_BATCH = 256  # copies per call (run concurrently by the file system)
_MAGIC = "?*[]{}"  # what fsspec's listings and deletes would expand as a pattern


class RemoteFolder:
    """A folder output in an object store: the local folder the run writes (``local``), the lock other
    hosts see (``locked``), the parts' uploads as they complete (``part_done``), and the commit."""

    def __init__(self, url: str) -> None:
        name, shown = object_store(url)
        if any(c in url for c in _MAGIC):  # a listing or a delete would take it for a pattern
            raise UsageError(f"-o {shown}: a folder output's URL takes no query and no wildcard ({_MAGIC})")
        self.url, self.shown, self.store = url.rstrip("/") + "/", shown, name
        self.work = work_folder(self.url)
        self.local = self.work / "out"  # the run's folder output, as ``-o DIR/`` would be
        self._uploads: dict[str, Future[None]] = {}  # part name -> its latest upload
        self._pool: ThreadPoolExecutor | None = None
        self._guard = threading.Lock()
        self._lock: RemoteLock | None = None

    # ---- before the run ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Proof the store takes writes here (a probe object put and removed), and the private work
        folder, before anything is scored."""
        probe = f"{self.url}.perceptscore-probe-{uuid.uuid4().hex[:12]}"
        fs, path = write_probe(probe, self.shown)
        try:  # a folder output replaces parts and removes its staging: it needs deletes
            remote.with_retries(lambda: fs.rm_file(path, timeout=request_seconds()))
            gone = not remote.exists(probe)
        except DecodeError:
            gone = False
        if not gone:
            raise UsageError(f"cannot remove objects in {self.shown}: a folder output needs deletes (its "
                             "earlier parts, its staging)")  # fmt: skip
        make_work_folder(self.work)

    def check(self, inputs: list[str]) -> bool:
        """The folder is new, empty, an earlier output of ours (replaced, guarded as a file is) or one
        whose commit was cut short (True: it is to be finished, ``settle``); never inside an input prefix
        or another perceptscore output. Before anything is written there."""
        from perceptscore.shards import expand_braces

        target = remote.normalized(self.url)
        for text in inputs:
            named = text.removeprefix("@")
            if text.startswith("@") or not remote.is_remote(named):
                continue
            if any(_covers(remote.normalized(one), target) for one in expand_braces(named)):
                raise UsageError(f"-o {self.shown}: inside the input {remote.without_secrets(named)!r}; "
                                 "write the parts somewhere else")  # fmt: skip
        with self._store_errors("cannot read"):
            head = self.url.rstrip("/")
            while head.count("/") > 2:  # scheme://bucket/a/b/: each folder above, the bucket's root too
                head = head.rsplit("/", 1)[0]
                if self._is_output(f"{head}/"):
                    where = remote.without_secrets(head)
                    raise UsageError(f"-o {self.shown}: inside the perceptscore output {where}/; choose a "
                                     "folder outside it")  # fmt: skip
            if remote.exists(self._journal_url):
                return True
            if remote.exists(self._manifest_url):
                return False
            for name, info in self._list(self.url):
                marker = (not name or name.endswith("/")) and not info.get("size")  # "Create folder"
                if not name.startswith(".") and not marker:
                    raise UsageError(f"-o {self.shown}: holds objects that are not perceptscore's "
                                     f"({name!r}); name a new or empty folder")  # fmt: skip
        return False

    def settle(self) -> None:
        """A commit cut short, finished under the lock before the earlier output is read (its rows are
        what ``--incremental`` reuses and ``--max-delete`` guards)."""
        with self.locked():
            self.finish_commit()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while the run scores and commits (S3: the store whose conditional writes this uses)."""
        if self.store != "s3":
            yield
            return
        with RemoteLock(self.url, self.shown, at=f"{self.url}{LOCK}") as self._lock:
            yield
        self._lock = None

    def begin(self) -> None:
        """Under the lock, before scoring: a commit cut short is finished; whatever an earlier run staged
        goes (every part of this run is uploaded by this run, so none can be another run's)."""
        self.finish_commit()
        with self._store_errors("cannot clear the staging prefix of"):
            self._remove_staging()
        self._pool = ThreadPoolExecutor(_UPLOADERS, thread_name_prefix="part-upload")

    # ---- during the run ----------------------------------------------------------------------------

    def part_done(self, path: Path, name: str) -> None:
        """A part complete in the local run (``ShardedRun``): its upload to the staging prefix starts now.
        A part written again (a salvaged run's name) waits for its earlier upload: the last one wins."""
        if self._pool is None:
            return
        with self._guard:
            earlier = self._uploads.get(name)
            self._uploads[name] = self._pool.submit(_upload_after, earlier, path, self._staged(name))

    # ---- the commit --------------------------------------------------------------------------------

    def commit(self, run_folder: Path, body: dict[str, Any]) -> None:
        """The finished run made the folder's content: every listed part staged (what an upload missed is
        uploaded now), the journal put, then ``finish_commit``. A failure says the parts are kept locally and
        the same command finishes the upload without scoring again."""
        if self._lock is not None and self._lock.lost:
            raise UsageError(
                f"the scores are complete in {run_folder} but not uploaded: another run took over the lock "
                f"of {self.shown}"
            )
        try:
            names = [str(p["file"]) for p in body["parts"]]
            self._stage_all(run_folder, names)
            sizes = {n: (run_folder / n).stat().st_size for n in names}
            journal = {"remove": self._listed(), "move": names, "sizes": sizes, "manifest": body}
            self._put(self._journal_url, json.dumps(journal).encode())
            self.finish_commit()
        except (DecodeError, OSError) as exc:
            reason = str(exc) if isinstance(exc, DecodeError) else (exc.strerror or str(exc))
            raise UsageError(
                f"the scores are complete in {run_folder} but could not be uploaded to {self.shown} "
                f"({reason}); run the same command again to upload them without scoring again"
            ) from None

    def finish_commit(self) -> bool:
        """Carry out the journal's commit (each step may have run already: all of them are safe to repeat);
        False where there is none. The manifest is written only once every part is in place at its size
        and every earlier part it does not list is gone: else the journal stays, and this says why."""
        with self._store_errors("cannot read"):
            journal = self._journal()
        if journal is None:
            return False
        moving, removing, sizes, body = journal
        fs, _ = remote.split(self.url)
        with self._store_errors("cannot commit to"):
            self._remove([self._manifest_url])  # from here on the folder is not complete
            if remote.exists(self._manifest_url):
                raise DecodeError("the earlier manifest could not be removed")
            self._remove([self.url + n for n in removing])
            prefix = f"{self.url}{STAGING}/"
            staged = {name for name, _ in self._list(prefix)}
            copying = [n for n in moving if n in staged]  # a part copied already (its staged one gone)
            for start in range(0, len(copying), _COPY_BATCH):  # server-side copies, a batch at a time
                names = copying[start : start + _COPY_BATCH]
                sources = [remote.split(self._staged(n))[1] for n in names]
                targets = [remote.split(self.url + n)[1] for n in names]
                seconds = request_seconds() * (1 + len(names) // 32)
                remote.with_retries(lambda s=sources, t=targets, w=seconds: fs.copy(s, t, timeout=w))
            self._check_in_place(moving, removing, sizes)
            self._put(self._manifest_url, json.dumps(body, indent=1).encode() + b"\n")
            self._remove_staging()
        return True

    def _journal(self) -> tuple[list[str], list[str], dict[str, int], dict[str, Any]] | None:
        """(parts to move, earlier parts to remove, the new parts' sizes, the manifest) of the commit
        under way; None when there is none."""
        try:
            raw = self._read(self._journal_url)
        except DecodeError as exc:
            if str(exc).startswith("not found"):
                return None
            raise
        try:
            journal = json.loads(raw)
            moving = [str(n) for n in journal["move"]]
            removing = [str(n) for n in journal["remove"] if n not in set(moving)]
            sizes = {str(k): int(v) for k, v in journal["sizes"].items()}
            body = journal["manifest"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{self._journal_url}: unreadable; remove {self.url}{STAGING}/ to start "
                             "over") from None  # fmt: skip
        if not all(_part_name(n) for n in [*moving, *removing]):
            raise UsageError(f"{self._journal_url}: names a part outside the folder; remove it to start over")
        return moving, removing, sizes, body

    def _check_in_place(self, moving: list[str], removing: list[str], sizes: dict[str, int]) -> None:
        """Every new part at its name with its size, every earlier part not listed gone (a store that
        lost a staged part to another run, or refused a delete, leaves the journal to say so)."""
        found = dict(self._list(self.url))
        for name in moving:
            size = found.get(name, {}).get("size")
            if size is None or int(size) != sizes.get(name, -1):
                raise DecodeError(
                    f"part {name} is not in place (another run without a lock?); remove "
                    f"{self.url}{STAGING}/ and run again"
                )
        left = [n for n in removing if n in found]
        if left:
            raise DecodeError(f"the earlier part {left[0]} could not be removed")

    def published(self) -> None:
        """After the commit: the local copy of the run goes (the store holds the output)."""
        shutil.rmtree(self.local, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.work.rmdir()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ---- helpers -----------------------------------------------------------------------------------

    @property
    def _manifest_url(self) -> str:
        return self.url + parts.MANIFEST

    @property
    def _journal_url(self) -> str:
        return f"{self.url}{STAGING}/{JOURNAL}"

    def _staged(self, name: str) -> str:
        return f"{self.url}{STAGING}/{name}"

    def _stage_all(self, run_folder: Path, names: list[str]) -> None:
        """Every part of the listing staged: those no upload was started for (a resumed run's, written by
        the run that was killed) started now, all waited for, a failed one tried once more here."""
        for name in names:
            if name not in self._uploads:
                self.part_done(run_folder / name, name)
        for name in names:
            with self._guard:
                upload = self._uploads.get(name)
            try:
                if upload is not None:
                    upload.result()
                    continue
            except (DecodeError, OSError):
                pass  # tried again below, with its own retries
            put_file(run_folder / name, self._staged(name))
        with self._guard:
            others = list(self._uploads.values())
        for upload in others:  # an abandoned attempt's part too: none may land after the commit's cleanup
            with contextlib.suppress(Exception):
                upload.result()

    def _listed(self) -> list[str]:
        """The parts the folder's manifest lists now (none: a new folder)."""
        try:
            found = json.loads(self._read(self._manifest_url))
            return [str(p["file"]) for p in found["parts"] if _part_name(str(p["file"]))]
        except DecodeError as exc:
            if str(exc).startswith("not found"):
                return []
            raise
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{self._manifest_url}: unreadable; it is not replaced") from None

    def _remove_staging(self) -> None:
        prefix = f"{self.url}{STAGING}/"
        staged = [prefix + name for name, _ in self._list(prefix)]
        journal = [u for u in staged if u.endswith(f"/{JOURNAL}")]
        self._remove([u for u in staged if u not in journal])
        self._remove(journal)  # last: while it is there, the commit can be finished

    def _remove(self, urls: list[str]) -> None:
        """Remove these objects (absent ones are no error). Names hold no pattern character (the URL and
        every part name are checked), so nothing else is matched."""
        if not urls:
            return
        fs, _ = remote.split(self.url)
        paths = [remote.split(u)[1] for u in urls]
        try:
            remote.with_retries(lambda: fs.rm(paths))
        except DecodeError as exc:
            if not str(exc).startswith("not found"):
                raise

    def _list(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """(name below ``prefix``, info) of every object under it: a plain listing, never a pattern."""
        fs, path = remote.split(prefix)
        found = remote.with_retries(lambda: fs.find(path, detail=True, withdirs=False))
        start = path.rstrip("/") + "/"
        return sorted((k[len(start) :], v) for k, v in found.items() if k.startswith(start))

    def _is_output(self, folder: str) -> bool:
        """Whether ``folder`` is a perceptscore folder output (or one being committed, or run into)."""
        return any(remote.exists(folder + name) for name in (parts.MANIFEST, f"{STAGING}/{JOURNAL}", LOCK))

    @contextlib.contextmanager
    def _store_errors(self, what: str) -> Iterator[None]:
        """A store's failure as one line: ``what`` the folder, and why."""
        try:
            yield
        except DecodeError as exc:
            raise UsageError(f"{what} {self.shown}: {exc}") from None

    def _read(self, url: str) -> bytes:
        fs, path = remote.split(url)
        return bytes(remote.with_retries(lambda: fs.cat_file(path, timeout=request_seconds())))

    def _put(self, url: str, body: bytes) -> None:
        fs, path = remote.split(url)
        remote.with_retries(lambda: fs.pipe_file(path, body, timeout=request_seconds()))


def _part_name(name: str) -> bool:
    """A part's name from a manifest or journal: inside the folder, and no pattern to a listing or delete."""
    return parts.inside(name) and not any(c in name for c in _MAGIC)


def _upload_after(earlier: Future[None] | None, path: Path, url: str) -> None:
    if earlier is not None:
        with contextlib.suppress(Exception):
            earlier.result()
    put_file(path, url)


def _covers(named: str, target: str) -> bool:
    """Whether an input (a prefix, or a glob over keys) would find ``target``'s objects."""
    import fnmatch

    if any(c in named for c in "*?["):
        return any(fnmatch.fnmatch(target + leaf, named) for leaf in ("x.parquet", "x/x.parquet", ""))
    return (target.rstrip("/") + "/").startswith(named.rstrip("/") + "/")


def download_folder(url: str, local: str) -> None:
    """A folder output in a store copied to the new local folder ``local``: its manifest (checked as
    ``parts.manifest`` checks one: every part a ``.parquet`` name inside the folder), then its parts, then
    the manifest once more: a commit between the two reads (parts of one name replaced) is read again.
    ``DecodeError`` when it is not one (no manifest) or a download fails."""
    url = url.rstrip("/") + "/"
    os.makedirs(local)
    where = os.path.join(local, parts.MANIFEST)
    for _ in range(3):
        first = _fetch_manifest(url, where)
        try:
            names = [str(p["file"]) for p in parts.manifest(local)["parts"]]
        except UsageError as exc:
            raise DecodeError(str(exc)) from None
        targets = [os.path.join(local, *name.split("/")) for name in names]  # checked: inside ``local``
        for target in targets:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        with ThreadPoolExecutor(_UPLOADERS, thread_name_prefix="part-download") as pool:
            list(pool.map(remote.download, [url + n for n in names], targets))  # (raises the first failure)
        if _fetch_manifest(url, where) == first:
            return
    raise DecodeError("its manifest keeps changing (runs committing to it): try again later")


def _fetch_manifest(url: str, where: str) -> bytes:
    try:
        remote.download(url + parts.MANIFEST, where, limit=1 << 30)
    except DecodeError as exc:
        if str(exc).startswith("not found"):
            raise DecodeError(f"not a perceptscore folder output (no {parts.MANIFEST})") from None
        raise
    with open(where, "rb") as f:
        return f.read()
