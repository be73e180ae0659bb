"""``-o s3://bucket/scores.parquet``: an output in an object store.

The run itself is local: the lock, the resumable shards and the finished file live in a work folder of
their own (``$PERCEPTSCORE_WORK``, else ``~/.cache/perceptscore/outputs``), one sub-folder per output URL
(a digest of its normalised spelling, so two URLs never share a lock and two spellings of one URL always
do). The finished file is uploaded once, whole: an object store shows an object only when its upload
completes, so nothing half-written ever appears under the name. The data goes first, then the CSV/JSONL
provenance sidecar.

Before any scoring, a small probe object is written and removed beside the output: a bucket that does not
exist or refuses writes fails in a second, not after the run. A failed upload keeps the finished file and
says so; the same command uploads it without scoring again (a ``ready.json`` records which run it is).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from perceptscore import remote
from perceptscore.columns import PATH
from perceptscore.errors import DecodeError, UsageError
from perceptscore.formats import format_of, meta_path, read_columns
from perceptscore.runs import paths_digest


def work_root() -> Path:
    default = Path.home() / ".cache" / "perceptscore" / "outputs"
    return Path(os.environ.get("PERCEPTSCORE_WORK", default))


class RemoteOutput:
    def __init__(self, url: str) -> None:
        name = remote.scheme(url)
        shown_as = remote.without_secrets(url)
        if name not in remote.OBJECT_STORES:
            stores = ", ".join(f"{s}://" for s in remote.OBJECT_STORES)
            raise UsageError(f"-o {shown_as}: outputs go to a local path or an object store ({stores})")
        remote.filesystem(name)  # the backend is installed (else: the extra to install)
        basename = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        if format_of(basename) is None or basename.startswith("."):
            raise UsageError(f"-o {shown_as}: name the object to write, ending in .csv, .parquet or .jsonl")
        self.url, self.shown = url, shown_as
        digest = hashlib.sha256(remote.normalized(url).encode()).hexdigest()[:20]
        self.folder = work_root() / digest
        self.local = self.folder / basename
        self._ready = self.folder / "ready.json"

    def prepare(self) -> None:
        """The work folder, and proof the destination takes writes (before anything is scored)."""
        head, _, _ = self.url.partition("?")
        probe = f"{head.rsplit('/', 1)[0]}/.{head.rsplit('/', 1)[1]}.probe-{uuid.uuid4().hex[:12]}"
        fs, path = remote.split(probe)
        try:
            remote.with_retries(lambda: fs.pipe_file(path, b"perceptscore write probe\n"))
        except DecodeError as exc:
            raise UsageError(f"cannot write to {self.shown}: {exc}") from None
        with contextlib.suppress(Exception):  # a store may allow writes but not deletes: harmless
            fs.rm_file(path)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the work folder {self.folder}: {exc.strerror or exc}") from None

    def ready_for(self, fingerprint: dict[str, Any], paths: Callable[[], Iterable[str]]) -> bool:
        """A finished file of this very run is waiting to be uploaded (an earlier upload failed): the same
        fingerprint, and the same rows (``paths``: the inputs' paths now, listed only when the rest
        matches). Anything else discards it: stale scores are never uploaded."""
        try:
            recorded = json.loads(self._ready.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded is None or recorded.get("fingerprint") != fingerprint or not self.local.is_file():
            self.discard()
            return False
        if recorded.get("paths_sha256") != paths_digest(paths()):
            self.discard()
            return False
        return True

    def finished(self, fingerprint: dict[str, Any]) -> None:
        """Record which run the finished local file is (before its upload is tried)."""
        paths = read_columns(str(self.local), lambda _: [PATH]).column(PATH).to_pylist()
        record = {"fingerprint": fingerprint, "paths_sha256": paths_digest(paths)}
        self._ready.write_text(json.dumps(record, sort_keys=True))

    def discard(self) -> None:
        for stale in (self.local, meta_path(self.local), self._ready):
            stale.unlink(missing_ok=True)

    def upload(self) -> None:
        """Data, then sidecar; then the local copies go. A failure keeps them, to upload next time."""
        sidecar = meta_path(self.local)
        try:
            remote.upload(str(self.local), self.url)
            if sidecar.is_file():
                remote.upload(str(sidecar), self.url.split("?", 1)[0] + ".meta.json")
        except (DecodeError, OSError) as exc:
            reason = str(exc) if isinstance(exc, DecodeError) else (exc.strerror or str(exc))
            raise UsageError(
                f"the scores are complete in {self.local} but could not be uploaded to {self.shown} "
                f"({reason}); run the same command again to upload them without scoring again"
            ) from None
        for done in (self.local, sidecar, self._ready):
            done.unlink(missing_ok=True)

    def tidy(self) -> None:
        """Once the lock is given up: the work folder goes if nothing is left in it."""
        with contextlib.suppress(OSError):
            self.folder.rmdir()
