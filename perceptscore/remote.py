"""Bytes that live behind a URL, through fsspec (no HTTP or S3 client of our own).

- ``scheme``/``is_remote``/``local_path``/``normalized``: what a text names. ``file://`` URLs are local
  paths (every local safety check applies to them); ``s3a://`` and ``s3n://`` are ``s3://``, ``gcs://`` is
  ``gs://``.
- ``filesystem``: one fsspec file system per scheme and process, built with bounded timeouts and without
  the backend's own retry loop (s3fs retries 5 times with its own backoff: a dead object would cost
  minutes). Retries are ours (``with_retries``): transient failures (5xx, 429, resets, refused
  connections, timeouts) are tried again with exponential backoff and full jitter until the object's
  deadline (``PERCEPTSCORE_REMOTE_DEADLINE``), then an error row says what happened.
- The timeouts, tries, deadline, rate and size limits are this process's ``limits.Limits`` (the run's, as
  its plan carries them: a worker never reads its own environment for them).
- Storage options (``--storage-options JSON``) are held in this process's memory only (never in the
  environment, a plan, provenance or a log), installed beside its limits (``limits.install``) and given
  to child processes on a pipe, to Ray tasks in memory (``Settings``). HTTP(S) options
  (an ``Authorization`` header, say) go only to the origins named on the command line (``trust``): a
  manifest cannot send them to a host of its choosing.
- Streams (tar shards, downloaded manifests) are read in chunks by a helper thread, so a stop (SIGINT/
  SIGTERM) or a connection slower than ``PERCEPTSCORE_REMOTE_MIN_RATE`` ends a read however the server
  trickles; HTTP bodies are streamed (a server need not support ranges), a range only resumes one.

Credentials and endpoints otherwise come from the backends' usual places (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, profiles, instance roles, ``GOOGLE_APPLICATION_CREDENTIALS`` ...).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import email.utils
import hashlib
import io
import json
import os
import queue
import random
import re
import shutil
import signal
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from perceptscore import limits
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
    there). HTTP URLs keep their path and query as given (a server may tell them apart). ``az://`` and
    ``abfs://`` are one store (adlfs serves both): ``container``, ``container@account`` and
    ``container@account.dfs.core.windows.net`` name one container when the account is known."""
    name = scheme(url)
    if name is None or name == "file":
        return os.path.abspath(local_path(url))
    parsed = urllib.parse.urlsplit(url)
    # user info is a credential over HTTP; in az:// and abfs:// "container@account" is the address
    netloc = parsed.netloc.lower()
    if name in ("az", "abfs"):
        return f"abfs://{_azure_container(netloc)}{re.sub(r'/{2,}', '/', parsed.path)}"
    host = netloc if name == "adl" else netloc.rsplit("@", 1)[-1]
    if name in _HTTP:
        return urllib.parse.urlunsplit((name, host, parsed.path or "/", parsed.query, ""))
    path = re.sub(r"/{2,}", "/", parsed.path)
    return f"{name}://{host}{path}"


def _azure_container(netloc: str) -> str:
    """``container@account`` of an az:// or abfs:// address: the account from the host name, else from the
    storage options or ``AZURE_STORAGE_ACCOUNT_NAME`` (adlfs's own order), else the container alone."""
    container, _, account = netloc.partition("@")
    account = account.split(".", 1)[0]  # account.dfs.core.windows.net, account.blob.core.windows.net
    if not account:
        options = {**current().for_scheme("az"), **current().for_scheme("abfs")}
        account = str(options.get("account_name") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME", "")).lower()
    return f"{container}@{account}" if account else container


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


def join(folder: str, relative: str) -> str | None:
    """``relative`` (a manifest's row) resolved against the URL ``folder``; None when it climbs out of the
    folder's origin (its host, or its bucket): ``../`` past the root is refused, never clamped or allowed
    to rename the host."""
    scheme_part, rest = folder.split("://", 1)
    host, _, base = rest.partition("/")
    relative, mark, query = relative.partition("?")
    parts: list[str] = [p for p in base.split("/") if p]
    for part in relative.split("/"):
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return f"{scheme_part}://{host}/{'/'.join(parts)}{mark}{query}"


def origin(url: str) -> str | None:
    """``scheme://host:port`` of an HTTP(S) URL (the port spelled out), None for anything else or a URL
    whose port is not a number."""
    name = scheme(url)
    if name not in _HTTP:
        return None
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port or (443 if name == "https" else 80)
    except ValueError:
        return None
    return f"{name}://{(parsed.hostname or '').lower()}:{port}"


# ---- settings ---------------------------------------------------------------------------------------
# The knobs are this process's ``Limits`` (``limits.current()``: installed from the plan, never read from a
# worker's own environment); these read them where a call chain is too long to pass them.


def timeout() -> float:
    """Seconds one request may take (connect, or between bytes read), and the base of a fetch's deadline."""
    return limits.current().remote_timeout


def tries() -> int:
    """Tries that each time out which the default deadline leaves room for (a refused connection or a 503
    is tried again for as long as the deadline allows, not this many times)."""
    return limits.current().remote_tries


def deadline_seconds() -> float:
    """How long one object (or one stretch of failures of a stream) may take, all tries and pauses
    together: long enough to ride out a short outage (135 s by default)."""
    return limits.current().deadline_seconds


def min_rate() -> float:
    """Bytes a second a stream must keep up, measured over ``timeout()`` seconds: a server that trickles a
    byte now and then never times out, and would hold a shard (and a stop) for good."""
    return limits.current().remote_min_rate


def max_input_bytes() -> int:
    """The largest remote manifest, list or scores file downloaded (they are read from a local copy)."""
    return limits.current().max_input_bytes


def concurrency() -> int:
    """Remote objects fetched at once: latency, not bandwidth, bounds a single fetch."""
    return limits.current().remote_concurrency


def max_bytes() -> int:
    """The largest object taken as an image (a remote object or a tar member): a 100 MP TIFF is ~300 MB."""
    return limits.current().max_file_bytes


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

    def trusts(self, url: str) -> bool:
        """Whether ``url``'s HTTP origin was named on the command line (its requests carry the options)."""
        return origin(url) in self.options.get(_TRUSTED, ())

    def trusting(self, url: str) -> Settings:
        found = origin(url)
        if found is None or self.trusts(url):
            return self
        return Settings({**self.options, _TRUSTED: sorted({*self.options.get(_TRUSTED, ()), found})})


# The HTTP origins whose requests carry the HTTP storage options, kept among the options (a list, so it
# travels to child processes and Ray workers with them): the origins of the URLs named on the command line.
_TRUSTED = "@trusted_origins"


_NO_OPTIONS = Settings()
_filesystems: dict[tuple[int, str, bool], Any] = {}  # a cache, built under ``_made_under``
_made_under: limits.Installed | None = None
_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """Set this process's storage options (before any URL is opened); its limits stay as installed."""
    # backends echo option values in errors: messages redact them (the trusted origins are no secret)
    remember_secrets({k: v for k, v in settings.options.items() if k != _TRUSTED})
    with _lock:
        limits.install(storage=settings)


def current() -> Settings:
    """This process's storage options (``limits.install``)."""
    return limits.installed().storage or _NO_OPTIONS


def trust(url: str) -> None:
    """``url`` was named on the command line (an input, a list, ``--incremental``, ``--retry-errors``):
    requests to its HTTP origin carry the HTTP storage options. Nothing else ever gets them."""
    with _lock:
        trusting = current().trusting(url)
        if trusting is not current():
            limits.install(storage=trusting)


def filesystem(name: str, with_options: bool = True) -> Any:
    """This process's fsspec file system for scheme ``name``; a missing backend is a usage error that
    names the extra to install. ``with_options=False``: one without the storage options (for HTTP hosts
    nobody named)."""
    # an fsspec file system holds an event loop: never shared across a fork
    global _made_under
    key = (os.getpid(), name, with_options)
    with _lock:
        if _made_under is not limits.installed():  # other options or timeouts installed since
            _filesystems.clear()
            _made_under = limits.installed()
        if key in _filesystems:
            return _filesystems[key]
        fs = _make(name, current().for_scheme(name) if with_options else {})
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
    if name in _HTTP:
        return filesystem(name, current().trusts(url)), url
    return filesystem(name), url.split("://", 1)[1]


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


class Stopped(UsageError):
    """A stop was asked (SIGINT/SIGTERM) while waiting on a remote object or stream: the run ends now,
    with the rows scored so far saved, instead of waiting out a deadline. Nothing is recorded for it."""


# Set by ``runs.StopOnSignal`` on the first SIGINT/SIGTERM: waits and reads on remote objects end at once.
stop_requested = threading.Event()
_MAX_PAUSE = 8.0


def pause(seconds: float) -> None:
    """Sleep between tries; a stop asked meanwhile ends the run instead."""
    if stop_requested.wait(max(0.0, seconds)):
        raise Stopped("stopped while waiting for a remote object")


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter (0.5 s, 1 s, 2 s ... up to 8 s, times a random fraction):
    many fetches failing together do not come back together."""
    return random.uniform(0.0, min(_MAX_PAUSE, 0.5 * 2 ** (attempt - 1)))


def latest_start(deadline: float, start: float) -> float:
    """The last moment a try may start: one request's timeout before the deadline (a try that hangs is
    cut off by that timeout, so it ends by the deadline), or half-way for a deadline shorter than that."""
    return deadline - min(timeout(), (deadline - start) / 2)


def with_retries(what: Any, deadline: float | None = None) -> Any:
    """``what()``, tried again after transient failures (refused, reset, 5xx, 429, timeouts) with
    ``backoff`` until ``deadline`` (a monotonic time; ``deadline_seconds()`` from now by default): no try
    starts that could not end before it. Raises ``DecodeError`` with the reason (and the number of tries)
    when it gives up."""
    start = time.monotonic()
    deadline = start + deadline_seconds() if deadline is None else deadline
    attempt = 0
    while True:
        attempt += 1
        try:
            return what()
        except (DecodeError, UsageError):
            raise
        except Exception as exc:
            reason, transient = classify(exc)
            left = latest_start(deadline, start) - time.monotonic()
            if not transient or left <= 0:
                raise DecodeError(f"{reason}{_after(attempt)}") from None
            pause(min(backoff(attempt), left))


def _after(attempt: int) -> str:
    return f" after {attempt} tries" if attempt > 1 else ""


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


Reserve = Callable[[int], None]  # "hold this many bytes for the object": may wait for room (``prefetch``)
_CHUNK = 1 << 20  # what one read of a stream asks for: a stop or a slow server is noticed between reads
# what an open HTTP connection holds of a body, read or not: aiohttp's buffer and the chunk being read
_IN_FLIGHT = 2 * _CHUNK


def fetch(
    url: str, limit: int | None = None, deadline: float | None = None, reserve: Reserve | None = None
) -> tuple[bytes, tuple[int, int] | None]:
    """An object's bytes and stat, whole. Refused (``DecodeError``) when larger than ``limit`` (whether
    or not the server says its size first), empty, missing, or failing by ``deadline``. ``reserve`` is
    told the bytes the object will hold before they are read: its size when known, else as they come."""
    limit = max_bytes() if limit is None else limit
    deadline = time.monotonic() + deadline_seconds() if deadline is None else deadline
    fs, path = split(url)

    def attempt() -> tuple[bytes, tuple[int, int] | None]:
        if scheme(url) in _HTTP:
            return _fetch_http(fs, path, limit, deadline, reserve)
        about = fs.info(path)
        size = _checked_size(about.get("size"), limit)
        if reserve is not None and size is not None:
            reserve(size)
        # Never more than one byte past the limit, whatever the size said (an object may be replaced
        # between the two requests): the store is asked for that range.
        data = fs.cat_file(path, start=0, end=limit + 1)
        return _whole(data, size, limit), stat_of(about, len(data))

    return with_retries(attempt, deadline)


def _fetch_http(
    fs: Any, url: str, limit: int, deadline: float, reserve: Reserve | None
) -> tuple[bytes, tuple[int, int] | None]:
    """One GET, streamed: its headers give the size (when sent) and the version; the body is cut one byte
    past the limit, whatever the size said (a server may lie, or send none)."""
    if reserve is not None:  # an open connection buffers part of the body whether it is read or not
        reserve(_IN_FLIGHT)
    try:
        stream = fs.open(url, "rb", **_STREAMED)
    except FileNotFoundError:
        raise DecodeError("not found (HTTP 404)") from None
    with stream:
        headers = getattr(getattr(stream, "r", None), "headers", None) or {}
        length = headers.get("Content-Length")
        size = _checked_size(int(length) if length and length.isdigit() else None, limit)
        if reserve is not None and size is not None:
            reserve(size)
        data = _read_up_to(stream, limit + 1, deadline, reserve if size is None else None)
    return _whole(data, size, limit), stat_of(headers, len(data))


# fsspec asks for an HTTP object's size (a HEAD, and a GET when that has none) before opening it, unless
# told one; a streamed body needs none (its GET's own headers say it).
_STREAMED: dict[str, Any] = {"block_size": 0, "size": -1}


def _checked_size(size: Any, limit: int) -> int | None:
    if not isinstance(size, int):
        return None
    if size > limit:
        raise DecodeError(f"{size} bytes, over the limit of {limit}")
    if size == 0:
        raise DecodeError("empty file")
    return size


def _whole(data: bytes, size: int | None, limit: int) -> bytes:
    """``data``, checked: under the limit, not empty, as long as its size said."""
    if len(data) > limit:
        raise DecodeError(f"over the limit of {limit} bytes")
    if not data:
        raise DecodeError("empty file")
    if size is not None and len(data) != size:
        raise ConnectionResetError(f"got {len(data)} of {size} bytes")
    return data


def _read_up_to(stream: BinaryIO, n: int, deadline: float, reserve: Reserve | None) -> bytes:
    """``n`` bytes, or fewer at the end, as one copy: chunks go into a ``BytesIO`` whose buffer becomes
    the result without another copy. A body still coming at ``deadline`` (a server that trickles) is a
    timeout; bytes of unknown total are reserved a chunk ahead."""
    buffer, got = io.BytesIO(), 0
    while got < n:
        if stop_requested.is_set():
            raise Stopped("stopped while waiting for a remote object")
        if time.monotonic() > deadline:
            raise TimeoutError(f"still sending after {got} bytes at the deadline")
        if reserve is not None:
            reserve(min(n, got + _CHUNK))
        chunk = stream.read(min(n - got, _CHUNK))
        if not chunk:
            break
        buffer.write(chunk)
        got += len(chunk)
    return buffer.getvalue()


def open_stream(url: str) -> RemoteStream:
    """A sequential read of a (large) object: a tar shard, a downloaded manifest (``RemoteStream``);
    ``DecodeError`` when it cannot be opened by its deadline."""
    return RemoteStream(url)


def read_failure(exc: OSError) -> str:
    """The reason a ``RemoteStream`` (or a local read) failed, in one line."""
    return str(exc) if isinstance(exc.__cause__, Exception) else classify(exc)[0]


class TooSlow(OSError):
    """A stream that kept under ``min_rate()`` for a whole ``timeout()`` of reading: tried again (another
    connection may be faster), then an error."""


class _ReadThread:
    """One daemon thread doing a stream's blocking reads, so the reading thread waits in slices (a stop, a
    trickle) and never holds up the interpreter's exit on a read that will not return."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        threading.Thread(target=self._work, daemon=True, name="perceptscore-stream").start()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            call, future = job
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

    def submit(self, call: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self.jobs.put((call, future))
        return future

    def close(self) -> None:
        self.jobs.put(None)


_SLICE = 0.25  # seconds between looks at a stop and at the stream's rate while a read is pending


class RemoteStream:
    """A remote object read front to back. HTTP bodies are streamed in one GET (a server without range
    support serves any size); a read that fails for a transient reason, or a connection slower than
    ``min_rate()`` over ``timeout()`` seconds of waiting, is resumed where it broke off (a range request;
    a server that ignores the range sends it all, and the bytes had are skipped), with ``backoff``, until
    ``deadline_seconds()`` after the first of a run of failures; then ``OSError`` with the reason. A stop
    (``stop_requested``) ends a read within a quarter of a second (``Stopped``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._fs, self._path = split(url)
        self._http = scheme(url) in _HTTP
        self._taken = 0  # bytes taken from the object: where a resumed read starts
        self._buffer, self._at = b"", 0  # read ahead of what was asked, and how much of it is given out
        self._backend: Any = None
        self._reader: _ReadThread | None = None
        self._window = (0.0, 0)  # seconds spent waiting on reads, bytes they brought
        self._discard = 0  # bytes had already that a resumed body sends again (its range was ignored)
        # a run of failures: (tries, when it began, its deadline); ends with a window read at a good rate
        self._trouble: tuple[int, float, float] | None = None
        self._backend = with_retries(lambda: self._opened(0))

    def _opened(self, start: int) -> Any:
        try:
            return self._connected(start)
        except FileNotFoundError:
            if self._http:  # fsspec's streamed GET says no more than this
                raise DecodeError("not found (HTTP 404)") from None
            raise

    def _connected(self, start: int) -> Any:
        if not self._http:
            stream = self._fs.open(self._path, "rb", block_size=8 << 20, cache_type="readahead")
            stream.seek(start)
            return stream
        if not start:
            return self._fs.open(self._path, "rb", **_STREAMED)
        # the file system's own headers (an Authorization) stay: a request's headers replace them
        headers = {**self._fs.kwargs.get("headers", {}), "Range": f"bytes={start}-"}
        stream = self._fs.open(self._path, "rb", headers=headers, **_STREAMED)
        if getattr(getattr(stream, "r", None), "status", 206) != 206:
            self._discard = start  # the range was ignored: the body starts at 0 again
        return stream

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        if self._at >= len(self._buffer):
            self._buffer, self._at = self._fetch(max(n, _CHUNK)), 0
        data = self._buffer[self._at : self._at + n]
        self._at += len(data)
        return data

    def _fetch(self, want: int) -> bytes:
        while True:
            try:
                if self._backend is None:
                    self._backend = self._opened(self._taken)
                data = self._timed(lambda: self._backend.read(want))
                if self._discard:
                    if not data:
                        raise ConnectionResetError("the object ended before the point to resume from")
                    data, self._discard = data[self._discard :], max(0, self._discard - len(data))
                    if not data:
                        continue
                self._taken += len(data)
                return data
            except (Stopped, DecodeError, UsageError):
                raise
            except Exception as exc:
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """Drop the connection, and pause before the next (or raise ``OSError`` when it is no use: the
        failure is final, or the run of failures is past its deadline)."""
        reason, transient = classify(exc)
        tries, start, deadline = self._trouble or (0, time.monotonic(), time.monotonic() + deadline_seconds())
        self._trouble = (tries + 1, start, deadline)
        self._drop()
        left = latest_start(deadline, start) - time.monotonic()
        if not transient or left <= 0:
            raise OSError(f"{reason}{_after(tries + 1)}") from exc
        pause(min(backoff(tries + 1), left))

    def _timed(self, read: Callable[[], bytes]) -> bytes:
        """``read()`` on the read thread, waited for in slices: a stop or a trickle ends the wait."""
        self._reader = self._reader or _ReadThread()
        future = self._reader.submit(read)
        while True:
            if stop_requested.is_set():
                raise Stopped("stopped while reading a remote stream")
            began = time.monotonic()
            try:
                data = future.result(timeout=_SLICE)
            except FutureTimeout:
                self._count(time.monotonic() - began, 0)
                continue
            self._count(time.monotonic() - began, len(data))
            return data

    def _count(self, waited: float, got: int) -> None:
        """Only time spent waiting for the server counts (not the time the caller spends between reads
        scoring what it read): under ``min_rate()`` for ``timeout()`` seconds of it is too slow."""
        seconds, total = self._window[0] + waited, self._window[1] + got
        span = timeout()
        if seconds < span:
            self._window = (seconds, total)
            return
        self._window = (0.0, 0)
        if total >= min_rate() * span:
            self._trouble = None  # a good stretch: the next failure starts a run of its own
        else:
            raise TooSlow(f"too slow: {total} bytes in {seconds:.0f} s (under {min_rate():.0f} bytes/s)")

    def _drop(self) -> None:
        """Let go of the connection (and its read thread, which may be stuck in a read)."""
        backend, reader, self._backend, self._reader = self._backend, self._reader, None, None
        self._window = (0.0, 0)
        if reader is not None:
            reader.close()
        if backend is not None:
            with contextlib.suppress(Exception):
                backend.close()

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def download(url: str, local: str, limit: int | None = None) -> None:
    """``url`` streamed to the file ``local``: at most ``limit`` bytes (``max_input_bytes()``), resumed
    and given up like any stream (``RemoteStream``). ``DecodeError`` with the reason when it fails."""
    limit = max_input_bytes() if limit is None else limit
    try:
        with open_stream(url) as stream, open(local, "wb") as out:
            got = 0
            while chunk := stream.read(_CHUNK):
                got += len(chunk)
                if got > limit:
                    raise DecodeError(f"over the limit of {limit} bytes (PERCEPTSCORE_MAX_INPUT_BYTES)")
                out.write(chunk)
    except OSError as exc:
        raise DecodeError(read_failure(exc)) from None


class _Terminated(BaseException):
    """SIGTERM or SIGHUP during a download: unwinds it so its partial file is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated(signum)


def _catch_termination() -> dict[int, Any]:
    """Route SIGTERM/SIGHUP to ``_Terminated`` (main thread only; an ignored signal stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    caught = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            caught[sig] = signal.signal(sig, _raise_terminated)
    return caught


def _restore(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def local_copy(url: str) -> str:
    """A remote file (a manifest, a list, ``--incremental``'s or ``--retry-errors``'s scores file or
    folder output, ``s3://b/scores/``) downloaded to a temporary folder of its own, removed at exit, on
    failure and on SIGTERM/SIGHUP (then the signal does what it would have done: end the process, by
    default): read locally, as a seekable file. Its HTTP origin is trusted with the storage options (it was
    named on the command line). Local paths are returned as they are."""
    if not is_remote(url):
        return local_path(url)
    trust(url)
    folder = tempfile.mkdtemp(prefix="perceptscore-input-")
    atexit.register(shutil.rmtree, folder, True)
    local = os.path.join(folder, "input" + os.path.splitext(url.split("?", 1)[0])[1].lower())
    handlers = _catch_termination()
    try:
        if is_prefix(url):  # a folder output of ours (``s3://b/scores/``): its manifest and parts
            from perceptscore.remote_parts import download_folder

            local = os.path.join(folder, "scores")
            download_folder(url, local)
        else:
            download(url, local)
        if local.endswith((".csv", ".jsonl")):  # a scores file's provenance is its sidecar: it comes along
            with contextlib.suppress(DecodeError):
                download(url.split("?", 1)[0] + ".meta.json", local + ".meta.json")
    except BaseException as exc:
        shutil.rmtree(folder, True)
        _restore(handlers)
        if isinstance(exc, _Terminated):
            signal.raise_signal(exc.signum)  # what it did before: ends the process, by default
            raise Stopped(f"stopped while downloading {without_secrets(url)}") from None
        if isinstance(exc, DecodeError):
            raise UsageError(f"{without_secrets(url)}: {exc}") from None
        raise
    _restore(handlers)
    return local
