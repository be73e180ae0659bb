"""Where a task's weights come from, and getting them from the Hugging Face hub.

Resolution order, first hit wins:
``--checkpoint`` > ``$PERCEPTSCORE_WEIGHTS`` folder > our converted cache > the hub's cache > a download
(unless ``HF_HUB_OFFLINE``) > ``MissingWeights`` (exit code 3): three lines, what is missing, what fixes it
(for the command line a command, for Python the ``checkpoints=`` argument) and where the file comes from.
``perceptscore weights import`` puts a file brought by hand into our converted cache.

Downloads go through ``huggingface_hub``: its cache under ``HF_HOME``/``HF_HUB_CACHE``, its progress bar,
``HF_ENDPOINT``, and its resume of a dropped connection with a byte range. Since huggingface_hub 2 each
download writes to a process-unique temporary file, so the partial file of a killed process is never reused
and would stay on disk: stale ones (untouched for ``STALE_PARTIAL_S``) are removed before the next download.

Every downloaded file's sha256 is checked against the registry's pin, else against the hash the hub reports
(for LFS files the ETag, which also names the cached blob); a file that fails is deleted from the cache
before the error is raised. Nothing here imports torch: a missing weight file is reported at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from perceptscore._text import redact
from perceptscore.errors import CheckpointError, WeightsNotFoundError
from perceptscore.tasks import Release, Task

WEIGHTS_ENV = "PERCEPTSCORE_WEIGHTS"
CACHE_ENV = "PERCEPTSCORE_CACHE"
_SHA256 = re.compile(r"[0-9a-f]{64}")
STALE_PARTIAL_S = 600  # a live download writes every few seconds; ten idle minutes means its process died


def converted_cache() -> Path:
    """Our cache of converted weights: ``$PERCEPTSCORE_CACHE``, else ``$XDG_CACHE_HOME/perceptscore``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "perceptscore"


def hub_cache() -> Path:
    """huggingface_hub's cache, read from the environment now (the library reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class Weights:
    """A task's weights file and where it was found (for messages and provenance)."""

    task: str
    path: Path
    origin: str


class MissingWeights(WeightsNotFoundError):
    """No weights for a task, worded twice: ``str()`` for Python (it names ``checkpoints=``), ``cli_lines``
    for the command line (it names the command that fixes it). Raised deep in the library, it cannot know
    who asked; the CLI's entry prints ``cli_lines`` when an error has them. Both travel in ``args``, so the
    error survives pickling (process and Ray workers), and ``type(exc)(message)`` still works."""

    def __init__(self, message: str, cli_message: str | None = None) -> None:
        super().__init__(message, cli_message)

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def cli_lines(self) -> list[str] | None:
        cli = self.args[1] if len(self.args) > 1 else None
        return cli.split("\n") if cli else None


def _home_short(path: Path) -> str:
    """``/home/me/.cache/x`` -> ``~/.cache/x``: a message line stays short, and a shell expands it."""
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home) :] if home != "/" and (text + "/").startswith(home + "/") else text


def looked_in() -> str:
    """The folders a task's file is looked for in, for the first line of the message."""
    places = [_home_short(converted_cache())]
    if os.environ.get(WEIGHTS_ENV):
        places.insert(0, _home_short(Path(os.environ[WEIGHTS_ENV])))
    return " and ".join(places)


def missing_weights(task: Task, reason: str, reachable: bool = True) -> MissingWeights:
    """At most three short lines: what is missing, the one thing that fixes it, where the file comes from.
    ``reachable``: whether fetching may work from here (not after a failed download: then only an import)."""
    what = f"no weights for task {task.name} ({reason}) in {looked_in()}"
    source = f"file: {task.release.url} ({task.release.size})"
    if reachable:
        cli_fix = (
            f"fix: perceptscore weights fetch {task.name}   (no network: perceptscore weights import FILE)"
        )
    else:
        cli_fix = (
            "fix: download the file below where the hub is reachable, then perceptscore weights import FILE"
        )
    python_fix = (
        f'fix: download the file below and pass checkpoints={{"{task.name}": "PATH"}} '
        '(load_model: checkpoint="PATH")'
    )
    return MissingWeights("\n".join((what, python_fix, source)), "\n".join((what, cli_fix, source)))


def local_candidates(task: Task) -> list[tuple[Path, str]]:
    """Files that would serve ``task`` without any network, in resolution order."""
    found: list[tuple[Path, str]] = []
    if os.environ.get(WEIGHTS_ENV):
        folder = Path(os.environ[WEIGHTS_ENV])
        found += [
            (folder / f"{task.name}.safetensors", f"${WEIGHTS_ENV}"),
            (folder / task.release.filename, f"${WEIGHTS_ENV}"),
        ]
    found.append((converted_cache() / f"{task.name}.safetensors", "converted cache"))
    hit = hub_cached(task.release)
    if hit is not None:
        found.append((hit, "hub cache"))
    return found


@dataclass(frozen=True)
class Place:
    """One place a task's weights are looked for (``weights path``), in resolution order."""

    origin: str
    where: str  # a file, a folder, or for the download its address
    found: bool
    note: str = ""  # why the place is passed over, or when it is used


def search_order(task: Task) -> list[Place]:
    """Every place ``resolve`` looks for ``task``'s weights after ``--checkpoint``, in order, and whether a
    file is there now (no network)."""
    places: list[Place] = []
    if os.environ.get(WEIGHTS_ENV):
        folder = Path(os.environ[WEIGHTS_ENV])
        for name in (f"{task.name}.safetensors", task.release.filename):
            places.append(Place(f"${WEIGHTS_ENV}", str(folder / name), (folder / name).is_file()))
    else:
        places.append(Place(f"${WEIGHTS_ENV}", "", False, "not set"))
    cached = converted_cache() / f"{task.name}.safetensors"
    places.append(Place("converted cache", str(cached), cached.is_file()))
    hit = hub_cached(task.release)
    repo = hub_cache() / f"models--{task.release.repo_id.replace('/', '--')}"
    places.append(Place("hub cache", str(hit or repo), hit is not None))
    when = "off: HF_HUB_OFFLINE is set" if offline() else "when none of the above is there"
    places.append(Place("download", task.release.url, False, when))
    return places


def resolve(task: Task, given: str | Path | None = None, download: bool = True) -> Weights:
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path}: no such file")
        return Weights(task.name, path, "--checkpoint")
    for path, origin in local_candidates(task):
        if path.is_file():
            return Weights(task.name, path, origin)
    if not download:
        raise missing_weights(task, "not downloaded yet")
    if offline():
        raise missing_weights(task, "HF_HUB_OFFLINE is set and nothing is cached")
    return Weights(task.name, fetch_release(task), "downloaded")


def fetch_release(task: Task) -> Path:
    """Download the task's release file into the hub cache and verify it."""
    try:
        return download(task.release)
    except DownloadError as exc:
        raise missing_weights(task, f"download failed: {exc}", reachable=False) from None


class DownloadError(Exception):
    """The hub could not be reached or refused the file; the message is the reason, one line."""


def download(release: Release) -> Path:
    """Download one hub file into the hub cache (resuming a dropped connection) and verify its sha256."""
    import huggingface_hub

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    _check_resolves(endpoint)  # an unresolvable host is not transient: no retries, no retry log
    _remove_stale_partials(release)
    # Its retry warnings would print HF_ENDPOINT as given, credentials and all: our one line says enough.
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        path = Path(
            huggingface_hub.hf_hub_download(
                release.repo_id,
                release.filename,
                revision=release.revision,
                cache_dir=hub_cache(),
                endpoint=os.environ.get("HF_ENDPOINT") or None,
            )
        )
    # The network stack's exceptions differ across huggingface_hub versions; here all mean "failed".
    except Exception as exc:
        raise DownloadError(redact(_why(exc, release))) from None
    finally:
        hub_log.setLevel(level)
    verify_download(release, path)
    return path


def _check_resolves(endpoint: str, timeout: float = 5.0) -> None:
    """Fail at once, with one line, when the endpoint's host name cannot be resolved (no network). Not
    through a proxy: there the proxy resolves it."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return
    outcome: list[BaseException | None] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=look_up, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    if not outcome or outcome[0] is not None:
        # Short: it becomes part of the first line of a message whose next line says what to do.
        raise DownloadError(f"cannot resolve {host}: no network or no DNS here, or HF_ENDPOINT is wrong")


def _why(exc: Exception, release: Release) -> str:
    """One sentence per way the hub refuses a file, with what to do about it."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(exc, "response", None), "status_code", None)
    repo = release.repo_id
    if isinstance(exc, GatedRepoError):
        return (
            f"{repo} is gated: accept its conditions on its hub page while logged in, then log in here "
            "(`hf auth login`, or set HF_TOKEN)"
        )
    if status == 401 or isinstance(exc, RepositoryNotFoundError):
        return (
            f"the hub refused {repo} (401: a private or gated repository, or a missing or invalid token): "
            "log in with `hf auth login` or set HF_TOKEN to a token that can read it"
        )
    if status == 403:
        return f"the hub forbids this token to read {repo} (403): use a token with read access (HF_TOKEN)"
    if status == 404 or isinstance(exc, (EntryNotFoundError, RevisionNotFoundError)):
        return (
            f"{release.filename} is not in {repo} at revision {release.revision} (404): check HF_ENDPOINT "
            "(a mirror may lack it) or download the file by hand"
        )
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def hub_cached(release: Release) -> Path | None:
    """The hub cache's copy of a release file, if there is one (no network)."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(
        release.repo_id, release.filename, cache_dir=hub_cache(), revision=release.revision
    )
    return Path(hit) if isinstance(hit, str) else None  # otherwise None or a "known missing" marker


def _remove_stale_partials(release: Release) -> None:
    blobs = hub_cache() / f"models--{release.repo_id.replace('/', '--')}" / "blobs"
    now = time.time()
    for partial in blobs.glob("*.incomplete"):
        try:
            if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                partial.unlink()
        except OSError:
            pass  # gone already, or not ours to remove


def verify_download(release: Release, path: Path) -> str:
    """Check a downloaded file against the registry's pin or the hub's hash; delete it if it fails."""
    blob = Path(os.path.realpath(path))
    expected = release.sha256 or (blob.name if _SHA256.fullmatch(blob.name) else None)
    actual = file_sha256(blob)
    if expected is not None and actual != expected:
        blob.unlink(missing_ok=True)
        if path.is_symlink():
            path.unlink()
        raise CheckpointError(
            f"downloaded {release.filename} is corrupt (sha256 {actual[:12]}..., the hub says "
            f"{expected[:12]}...); it was removed from the cache: run again to download it anew"
        )
    return actual


# ---- sha256 of large files, remembered -------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered in our cache by (real path, size, mtime): 1.2 GB takes about a second."""
    real = os.path.realpath(path)
    st = os.stat(real)
    memo_path = converted_cache() / "sha256.json"
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    memo[key] = digest.hexdigest()
    try:
        from perceptscore.sinks import write_atomic

        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo_path, json.dumps(memo).encode())
    except OSError:
        pass  # a read-only cache only costs recomputing next time
    return memo[key]
