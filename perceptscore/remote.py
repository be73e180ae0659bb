"""Bytes that live behind a URL, through fsspec (no HTTP or S3 client of our own).

- ``scheme``/``is_remote``/``local_path``/``normalized``: what a text names. ``file://`` URLs are local
  paths (every local safety check applies to them); ``s3a://`` and ``s3n://`` are ``s3://``, ``gcs://`` is
  ``gs://``.
- ``filesystem``: one fsspec file system per scheme and process, built with bounded timeouts and without
  the backend's own retry loop (s3fs retries 5 times with its own backoff: a dead object would cost
  minutes). Retries are ours, in ``fetch``: a few tries with backoff for transient failures (5xx, 429,
  resets, timeouts), then an error row that says what happened.
- Storage options (``--storage-options JSON``) are held in this process's memory only (never in the
  environment, a plan, provenance or a log), and given to child processes by ``Settings``.

Credentials and endpoints otherwise come from the backends' usual places (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, profiles, instance roles, ``GOOGLE_APPLICATION_CREDENTIALS`` ...).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import email.utils
import hashlib
import json
import os
import posixpath
import random
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from perceptscore._text import redact, remember_secrets
from perceptscore.errors import DecodeError, UsageError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "abfss": "abfs"}
# scheme -> the extra that brings its fsspec backend
EXTRAS = {"s3": "s3", "gs": "gcs", "az": "azure", "abfs": "azure", "adl": "azure"}
_HTTP = ("http", "https")
OBJECT_STORES = tuple(EXTRAS)  # what an output may be written to (HTTP is read-only)
READABLE = (*OBJECT_STORES, *_HTTP)


def scheme(text: str) -> str | None:
    """The URL scheme of ``text`` (lower-cased, aliases resolved), or None for a plain path."""
    match = _SCHEME.match(text)
    if not match:
        return None
    name = match.group(1).lower()
    return _ALIASES.get(name, name)


def is_remote(text: str) -> bool:
    return scheme(text) not in (None, "file")


def local_path(text: str) -> str:
    """A ``file://`` URL as the local path it names; anything else unchanged."""
    if scheme(text) != "file":
        return text
    parsed = urllib.parse.urlsplit(text)
    if parsed.netloc not in ("", "localhost"):
        raise UsageError(f"{text!r}: a file:// URL names a path on this machine (file:///path)")
    return urllib.parse.unquote(parsed.path) or "/"


def normalized(url: str) -> str:
    """One spelling per object, to compare URLs: scheme lower-cased and de-aliased, host lower-cased,
    repeated slashes in the key collapsed, the query dropped for object stores (it carries no identity
    there). HTTP URLs keep their path and query as given (a server may tell them apart)."""
    name = scheme(url)
    if name is None or name == "file":
        return os.path.abspath(local_path(url))
    parsed = urllib.parse.urlsplit(url)
    # user info is a credential over HTTP; in az:// and abfs:// "container@account" is the address
    netloc = parsed.netloc.lower()
    host = netloc if name in ("az", "abfs", "adl") else netloc.rsplit("@", 1)[-1]
    if name in _HTTP:
        return urllib.parse.urlunsplit((name, host, parsed.path or "/", parsed.query, ""))
    path = re.sub(r"/{2,}", "/", parsed.path)
    return f"{name}://{host}{path}"


def without_secrets(url: str) -> str:
    """A URL fit for provenance, run records and messages: no user info, no query (a presigned URL's
    signature is a credential)."""
    text = redact(url)
    if is_remote(text) and "?" in text:
        return text.split("?", 1)[0] + "?***"
    return text


def parent(url: str) -> str:
    """The folder of an object, for resolving a remote manifest's relative paths."""
    head, _, _ = url.partition("?")
    return head.rsplit("/", 1)[0] if "/" in head.split("://", 1)[1] else head


def join(folder: str, relative: str) -> str:
    scheme_part, rest = folder.split("://", 1)
    return f"{scheme_part}://{posixpath.normpath(posixpath.join(rest, relative))}"


# ---- settings ---------------------------------------------------------------------------------------


def timeout() -> float:
    """Seconds one request may take (connect, or between bytes read), and the base of a fetch's deadline."""
    return float(os.environ.get("PERCEPTSCORE_REMOTE_TIMEOUT", "30"))


def tries() -> int:
    return max(1, int(os.environ.get("PERCEPTSCORE_REMOTE_TRIES", "4")))


def concurrency() -> int:
    """Remote objects fetched at once: latency, not bandwidth, bounds a single fetch."""
    return max(1, int(os.environ.get("PERCEPTSCORE_REMOTE_CONCURRENCY", "32")))


def max_bytes() -> int:
    """The largest object taken as an image (a remote object or a tar member): a 100 MP TIFF is ~300 MB."""
    return int(os.environ.get("PERCEPTSCORE_MAX_FILE_BYTES", str(512 << 20)))


@dataclass(frozen=True)
class Settings:
    """What a process needs to open URLs as this run does: per-scheme storage options. Passed to child
    processes and Ray workers in memory (pickled with the task, or on a pipe), never in the environment."""

    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> Settings:
        """``--storage-options``: a JSON object given to fsspec for every object store, or one keyed by
        scheme (``{"s3": {...}, "https": {...}}``) for each separately."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--storage-options is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
        keyed = data and all(_ALIASES.get(k, k) in READABLE and isinstance(v, dict) for k, v in data.items())
        if keyed:
            return cls({_ALIASES.get(k, k): v for k, v in data.items()})
        return cls({name: data for name in OBJECT_STORES})

    def for_scheme(self, name: str) -> dict[str, Any]:
        return dict(self.options.get(name, {}))


_settings = Settings()
_filesystems: dict[tuple[int, str], Any] = {}
_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """Set this process's storage options (before any URL is opened)."""
    global _settings
    remember_secrets(settings.options)  # backends echo option values in errors: messages redact them
    with _lock:
        _settings = settings
        _filesystems.clear()


def current() -> Settings:
    return _settings


def filesystem(name: str) -> Any:
    """This process's fsspec file system for scheme ``name``; a missing backend is a usage error that
    names the extra to install."""
    key = (os.getpid(), name)  # an fsspec file system holds an event loop: never shared across a fork
    with _lock:
        if key in _filesystems:
            return _filesystems[key]
        fs = _make(name, _settings.for_scheme(name))
        _filesystems[key] = fs
        return fs


def _make(name: str, options: dict[str, Any]) -> Any:
    import fsspec

    if name not in READABLE:
        known = ", ".join(f"{s}://" for s in READABLE)
        raise UsageError(f"unsupported URL scheme {name}:// (known: {known}, and local paths)")
    seconds = timeout()
    if name in _HTTP:
        import aiohttp

        limit = aiohttp.ClientTimeout(total=None, connect=seconds, sock_connect=seconds, sock_read=seconds)
        options.setdefault("client_kwargs", {}).setdefault("timeout", limit)
    elif name == "s3":
        config = options.setdefault("config_kwargs", {})
        config.setdefault("connect_timeout", seconds)
        config.setdefault("read_timeout", seconds)
        config.setdefault("retries", {"max_attempts": 1})
    try:
        fs = fsspec.filesystem(name, skip_instance_cache=True, **options)
    except ImportError:
        extra = EXTRAS.get(name, "")
        raise UsageError(
            f"{name}:// needs its fsspec backend: pip install 'perceptscore[{extra}]'"
            if extra
            else f"{name}:// needs a backend that is not installed"
        ) from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--storage-options for {name}:// rejected: {exc}") from None
    if name == "s3":
        # s3fs's own loop retries even a refused connection 5 times (12 s a dead object, more with a
        # silent host); ours are in ``with_retries``. Not a constructor argument: an attribute.
        fs.retries = 1
    return fs


def split(url: str) -> tuple[Any, str]:
    """(file system, the path it takes) for ``url``."""
    name = scheme(url)
    assert name is not None and name != "file", url
    fs = filesystem(name)
    if name in _HTTP:
        return fs, url
    return fs, url.split("://", 1)[1]


# ---- errors -----------------------------------------------------------------------------------------


class Transient(Exception):
    """A failure worth another try."""


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)  # aiohttp (a payload error's "code" is no HTTP status)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def classify(exc: BaseException) -> tuple[str, bool]:
    """(one-line reason, worth retrying) for an exception from a backend."""
    for link in _chain(exc):
        status = _status(link)
        if status is not None:
            if status == 404:
                return "not found (HTTP 404)", False
            if status in (401, 403):
                return f"access denied (HTTP {status})", False
            if status in (408, 429) or status >= 500:
                return f"server error (HTTP {status})", True
            return f"HTTP {status}", False
    names = {type(link).__name__ for link in _chain(exc)}
    timeouts = {"ServerTimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "FSTimeoutError"}
    if names & timeouts or any(isinstance(link, TimeoutError) for link in _chain(exc)):
        return "timed out", True
    if names & {"ClientPayloadError", "ServerDisconnectedError", "ContentLengthError", "IncompleteRead",
                "ResponseStreamingError", "ProtocolError"}:  # fmt: skip
        return "connection dropped mid-transfer", True
    if names & {"ClientConnectorError", "EndpointConnectionError", "ConnectionRefusedError",
                "ConnectionResetError", "ClientOSError", "ConnectionClosedError"}:  # fmt: skip
        return "connection failed", True
    if any(isinstance(link, FileNotFoundError) for link in _chain(exc)):
        return "not found", False
    if any(isinstance(link, PermissionError) for link in _chain(exc)):
        return "access denied", False
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    return redact(text), isinstance(exc, OSError)


def with_retries(what: Any, deadline: float | None = None) -> Any:
    """``what()``, tried again after transient failures with exponential backoff (0.5 s, 1 s, 2 s ... with
    jitter), ``tries()`` times at most and never past ``deadline`` (a monotonic time). Raises
    ``DecodeError`` with the reason (and the number of tries) when it gives up."""
    attempts = tries()
    for attempt in range(1, attempts + 1):
        try:
            return what()
        except DecodeError:
            raise
        except UsageError:
            raise
        except Exception as exc:
            reason, transient = classify(exc)
            pause = min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            late = deadline is not None and time.monotonic() + pause >= deadline
            if not transient or attempt == attempts or late:
                after = f" after {attempt} tries" if attempt > 1 else ""
                raise DecodeError(f"{reason}{after}") from None
            time.sleep(pause)
    raise AssertionError("unreachable")


# ---- objects ----------------------------------------------------------------------------------------


def stat_of(info: Mapping[str, Any], size: int | None = None) -> tuple[int, int] | None:
    """(size, version) of an object as its listing or HEAD reports it, for ``--incremental``: the
    version is the modification time in ns where the backend gives one, else a number made from its
    ETag; None when it gives neither (then the object is always scored again)."""
    size = info.get("size") if size is None else size
    if not isinstance(size, int):
        return None
    for key in ("LastModified", "last_modified", "Last-Modified", "updated", "mtime", "modified"):
        ns = _ns(info.get(key))
        if ns is not None:
            return size, ns
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return size, int.from_bytes(hashlib.sha256(str(info[key]).encode()).digest()[:7], "big")
    return None


def _ns(value: Any) -> int | None:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return int(value.timestamp() * 1e9)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * 1e9) if value < 1e11 else int(value)  # seconds, else already ns
    if isinstance(value, str) and value:
        try:
            return _ns(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            pass
        try:
            return _ns(email.utils.parsedate_to_datetime(value))
        except (TypeError, ValueError):
            return None
    return None


def info(url: str) -> dict[str, Any]:
    fs, path = split(url)
    return with_retries(lambda: fs.info(path))


def fetch(
    url: str, limit: int | None = None, deadline: float | None = None
) -> tuple[bytes, tuple[int, int] | None]:
    """An object's bytes and stat, whole. Refused (``DecodeError``) when larger than ``limit`` (whether
    or not the server says its size first), empty, missing, or failing after the retries."""
    limit = max_bytes() if limit is None else limit
    fs, path = split(url)

    def attempt() -> tuple[bytes, tuple[int, int] | None]:
        about = fs.info(path)
        size = about.get("size")
        if isinstance(size, int) and size > limit:
            raise DecodeError(f"{size} bytes, over the limit of {limit}")
        if size == 0:
            raise DecodeError("empty file")
        # Never more than one byte past the limit, whatever the size said (a server may lie, an object
        # may be replaced between the two requests): an HTTP body is streamed and cut there; an object
        # store is asked for that range.
        if scheme(url) in _HTTP:
            # size given: fsspec would otherwise send a second HEAD before the GET
            with fs.open(path, "rb", block_size=0, size=size) as stream:
                data = _read_up_to(stream, limit + 1)
        else:
            data = fs.cat_file(path, start=0, end=limit + 1)
        if len(data) > limit:
            raise DecodeError(f"over the limit of {limit} bytes")
        if not data:
            raise DecodeError("empty file")
        if isinstance(size, int) and len(data) != size:
            raise ConnectionResetError(f"got {len(data)} of {size} bytes")
        return bytes(data), stat_of(about, len(data))

    return with_retries(attempt, deadline)


def _read_up_to(stream: BinaryIO, n: int) -> bytes:
    """``n`` bytes, or fewer at the end: a streamed body's ``read`` returns a chunk at a time."""
    chunks, got = [], 0
    while got < n and (chunk := stream.read(min(n - got, 8 << 20))):
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def open_stream(url: str) -> RetryingStream:
    """A sequential read of a (large) object: a tar shard. Reads carry the file system's timeouts, and a
    read that fails for a transient reason is tried again from where it was (``RetryingStream``)."""
    fs, path = split(url)
    return RetryingStream(
        with_retries(lambda: fs.open(path, "rb", block_size=8 << 20, cache_type="readahead"))
    )


def read_failure(exc: OSError) -> str:
    """The reason a ``RetryingStream`` (or a local read) failed, in one line."""
    return str(exc) if isinstance(exc.__cause__, Exception) else classify(exc)[0]


class RetryingStream:
    """A remote shard's stream that survives a dropped connection: a read that fails for a transient
    reason is tried again from the same offset (a new range request), with backoff, up to
    ``tries()`` times; then it fails as ``OSError`` with the reason, whatever the backend raised
    (aiohttp's payload errors are not ``OSError``)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.position = stream, 0

    def read(self, n: int = -1) -> bytes:
        most = tries()
        for attempt in range(1, most + 1):
            try:
                data = self.stream.read(n)
                self.position += len(data)
                return data
            except Exception as exc:
                reason, transient = classify(exc)
                if not transient or attempt == most:
                    after = f" after {attempt} tries" if attempt > 1 else ""
                    raise OSError(f"{reason}{after}") from exc
                time.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)))
                with contextlib.suppress(Exception):
                    self.stream.seek(self.position)
        raise AssertionError("unreachable")

    def __enter__(self) -> RetryingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stream.close()


def listing(url: str, recursive: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
    """(url, info) of the objects under a prefix, or matching a glob, sorted by URL."""
    name = scheme(url)
    fs, path = split(url)
    if any(ch in path for ch in "*?["):
        found = with_retries(lambda: fs.glob(path, detail=True))
    else:
        depth = None if recursive else 1
        found = with_retries(lambda: fs.find(path, maxdepth=depth, detail=True))
    for key in sorted(found):
        entry = found[key]
        if entry.get("type", "file") != "file":
            continue
        yield (key if name in _HTTP else f"{name}://{key.lstrip('/')}"), entry


def is_prefix(url: str) -> bool:
    """A URL that names a folder of objects (ends with /), not one object."""
    return url.split("?", 1)[0].endswith("/")


def exists(url: str) -> bool:
    fs, path = split(url)
    return bool(with_retries(lambda: fs.exists(path)))


def upload(local: str, url: str) -> None:
    """Put a finished local file at ``url``. Object stores make an object visible only once its upload
    completes, so a reader never sees half of it under its name."""
    fs, path = split(url)
    with_retries(lambda: fs.put_file(local, path))


def download(url: str, local: str) -> None:
    fs, path = split(url)
    with_retries(lambda: fs.get_file(path, local))


def local_copy(url: str) -> str:
    """A remote file (a manifest, a list, ``--incremental``'s or ``--retry-errors``'s scores file)
    downloaded to a temporary folder of its own, removed at exit: read locally, as a seekable file.
    Local paths are returned as they are."""
    if not is_remote(url):
        return local_path(url)
    folder = tempfile.mkdtemp(prefix="perceptscore-input-")
    atexit.register(shutil.rmtree, folder, True)
    local = os.path.join(folder, "input" + os.path.splitext(url.split("?", 1)[0])[1].lower())
    try:
        download(url, local)
    except DecodeError as exc:
        raise UsageError(f"{without_secrets(url)}: {exc}") from None
    if local.endswith((".csv", ".jsonl")):  # a scores file's provenance is its sidecar: it comes along
        with contextlib.suppress(DecodeError):
            download(url.split("?", 1)[0] + ".meta.json", local + ".meta.json")
    return local
