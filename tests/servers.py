"""Real servers on 127.0.0.1 that fail the way remote stores fail, for tests of remote inputs and outputs.

``FaultyHTTPServer`` serves a dict of files over HTTP/1.1 (what fsspec's ``http`` file system reads through
aiohttp) and can make any path missing, forbidden, stalled, dropped mid-body, briefly unavailable (503) or
served without a length. ``MotoS3`` runs moto's S3 in server mode, so s3fs and boto3 talk to it through
real sockets exactly as they would to AWS or MinIO.

No fixtures here: the conftest wraps these classes. Nothing is mocked on the client side.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import threading
import urllib.request
from collections import Counter
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import TracebackType

# 2024-01-02 03:04:05 UTC: a fixed Last-Modified, so listings and caches keyed on it are reproducible.
DEFAULT_LAST_MODIFIED = 1704164645.0

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RequestCounter:
    """Requests per (method, path), counted by the server's handler threads and read by tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, method: str, path: str) -> None:
        with self._lock:
            self._counts[method, path] += 1

    def __getitem__(self, key: tuple[str, str]) -> int:
        with self._lock:
            return self._counts[key]

    def total(self, path: str | None = None) -> int:
        """All requests, or all requests for one path (any method)."""
        with self._lock:
            return sum(n for (_, p), n in self._counts.items() if path is None or p == path)

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()


def socket_owner(port: int) -> int:
    """The pid holding the local TCP socket of ``port`` (a client's, seen by the server while it asks):
    its inode from /proc/net/tcp, then the process whose fd table holds it; -1 if none is found."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return int(pid)
    return -1


class FaultyHTTPServer:
    """A threaded HTTP/1.1 file server whose per-path failures tests switch on and off while it runs.

    Behaviours, checked in this order on every request (paths are matched without the query string):

    - ``latency_s``: every response, on every path, waits this long first (benchmarks; 0 by default).
    - ``stall``: the handler sends nothing (GET and HEAD) until the server stops, then closes the
      connection unanswered; with ``stall_s`` set, it answers (as below) after that many seconds instead:
      a slow server rather than a hung one.
    - ``flaky(path, n)``: the next n requests for the path answer 503. GETs and HEADs are counted
      together, as one overloaded backend would count them: an ``info`` (HEAD) uses up one of the n.
    - ``missing`` -> 404, ``forbidden`` -> 403 (also any path not in ``files`` -> 404).
    - ``drop``: a GET sends the status and the Content-Length of the whole body (or range), half of that
      body, then shuts the socket down; HEAD answers normally, as a server that dies mid-transfer would.
    - ``no_length``: 200 with neither Content-Length (the body ends when the connection closes; HEAD has
      none either) nor range support (Range is ignored, no Accept-Ranges), like a streaming proxy.
    - otherwise normal: GET/HEAD with Content-Length, Last-Modified, ETag (quoted sha1 of the body) and
      Accept-Ranges: bytes; ``Range: bytes=a-b``, ``bytes=a-`` and ``bytes=-n`` answer 206 with
      Content-Range, an unsatisfiable range 416.

    ``files``, the sets and ``last_modified`` (path -> POSIX timestamp) are plain mutable attributes:
    reading a dict or set from the handler threads while the test thread changes it is safe in CPython.
    """

    def __init__(
        self,
        files: dict[str, bytes] | None = None,
        *,
        latency_s: float = 0.0,
        stall_s: float | None = None,
        last_modified: float = DEFAULT_LAST_MODIFIED,
    ) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.latency_s = latency_s
        self.stall_s = stall_s
        self._initial = (latency_s, stall_s)  # what reset() restores
        self.default_last_modified = last_modified
        self.last_modified: dict[str, float] = {}
        self.missing: set[str] = set()
        self.forbidden: set[str] = set()
        self.stall: set[str] = set()
        self.drop: set[str] = set()
        self.no_length: set[str] = set()
        self.requests = RequestCounter()
        self.fetched_by: list[int] = []  # the pid whose socket asked, per GET (only while ``who_asks``)
        self.who_asks = False
        self._flaky: dict[str, int] = {}
        self._flaky_lock = threading.Lock()
        # Set on exit: stalled handlers and latency sleeps wake at once, so stopping never waits on them.
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- configuration -------------------------------------------------------------------------------

    def flaky(self, path: str, n: int) -> None:
        """The next ``n`` requests (GET and HEAD together) for ``path`` answer 503, then it is normal."""
        with self._flaky_lock:
            self._flaky[path] = n

    def _take_flaky(self, path: str) -> bool:
        with self._flaky_lock:
            left = self._flaky.get(path, 0)
            if left <= 0:
                return False
            self._flaky[path] = left - 1
            return True

    def reset(self) -> None:
        """Every path back to normal, latency_s and stall_s as constructed, counters to zero.

        Files and their timestamps stay.
        """
        for behaviour in (self.missing, self.forbidden, self.stall, self.drop, self.no_length):
            behaviour.clear()
        with self._flaky_lock:
            self._flaky.clear()
        self.latency_s, self.stall_s = self._initial
        self.requests.clear()
        self.fetched_by.clear()
        self.who_asks = False

    # -- addresses -----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FaultyHTTPServer is not running (use it as a context manager)")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.endpoint}/{path.lstrip('/')}"

    def etag(self, path: str) -> str:
        return f'"{hashlib.sha1(self.files[path]).hexdigest()}"'

    # -- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> FaultyHTTPServer:
        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # Handler threads may be stalled on purpose: they must never keep the interpreter alive.
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="FaultyHTTPServer", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


def _handler_for(server: FaultyHTTPServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 so clients keep connections alive as with real servers (aiohttp pools them); every
        # response below therefore either carries a length or closes the connection.
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # no line per request in test output
            pass

        def do_GET(self) -> None:
            self._respond(head=False)

        def do_HEAD(self) -> None:
            self._respond(head=True)

        def _respond(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            server.requests.add(self.command, path)
            if server.who_asks and not head:
                server.fetched_by.append(socket_owner(self.client_address[1]))
            # The client may give up (time out, close) mid-response: that is what some tests do on purpose.
            with contextlib.suppress(ConnectionError):
                self._serve(path, head)

        def _serve(self, path: str, head: bool) -> None:
            if server.latency_s and server._stopping.wait(server.latency_s):
                self.close_connection = True
                return
            if path in server.stall and server._stopping.wait(server.stall_s):
                # Stopping while stalled, nothing sent: the client sees the connection close unanswered.
                self.close_connection = True
                return
            if server._take_flaky(path):
                self._status_only(503, {"Retry-After": "1"})
                return
            if path in server.missing or path not in server.files:
                self._status_only(404)
                return
            if path in server.forbidden:
                self._status_only(403)
                return
            data = server.files[path]
            if path in server.no_length:
                self._no_length(path, data, head)
                return
            status, start, end, extra = 200, 0, len(data), {}
            requested = None if head else self.headers.get("Range")
            parsed = _parse_range(requested, len(data)) if requested else None
            if parsed == _UNSATISFIABLE:
                self._status_only(416, {"Content-Range": f"bytes */{len(data)}"})
                return
            if parsed is not None:
                # 206 even for a range covering the whole file, as real servers answer any satisfiable range.
                start, end = parsed
                status = 206
                extra = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
            body = data[start:end]
            self.send_response(status)
            self._file_headers(path)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            if head:
                return
            if path in server.drop:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                # Abrupt: the client has been promised len(body) bytes and sees the stream end early.
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body)

        def _file_headers(self, path: str) -> None:
            stamp = server.last_modified.get(path, server.default_last_modified)
            self.send_header("Last-Modified", formatdate(stamp, usegmt=True))
            self.send_header("ETag", server.etag(path))

        def _no_length(self, path: str, data: bytes, head: bool) -> None:
            self.send_response(200)
            self._file_headers(path)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if not head:
                self.wfile.write(data)

        def _status_only(self, status: int, headers: dict[str, str] | None = None) -> None:
            body = f"{status} {self.responses.get(status, ('',))[0]}\n".encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


_UNSATISFIABLE = (-1, -1)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> (start, stop), stop exclusive.

    None for a header this server ignores (several ranges, other units: fsspec never sends them, and
    RFC 9110 lets a server answer those with the whole file); ``_UNSATISFIABLE`` for a range past the end.
    """
    match = _RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # suffix: the last n bytes
        n = int(last)
        return (max(size - n, 0), size) if n > 0 and size > 0 else _UNSATISFIABLE
    start = int(first)
    stop = size if last == "" else min(int(last) + 1, size)
    if start >= size or stop <= start:
        return _UNSATISFIABLE
    return start, stop


# -- S3 ------------------------------------------------------------------------------------------------


class MotoS3:
    """moto's S3 in server mode on 127.0.0.1 (a free port), with credentials that only it accepts.

    moto keeps its state per process, not per server: every MotoS3 (and any ``mock_aws``) in one
    pytest process sees the same buckets. Use distinct bucket names per test module, or ``reset()``
    when nothing else in the process relies on the buckets.
    """

    ACCESS_KEY = "perceptscore-test-key"
    SECRET_KEY = "perceptscore-test-secret"
    REGION = "us-east-1"

    def __init__(self) -> None:
        self._server: Any = None
        self.endpoint = ""

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients that find S3 on their own (s3fs, the CLI in a subprocess).

        The config and credentials files point at nothing so a developer's ~/.aws cannot leak into a test
        (an AWS_PROFILE in the environment must be removed by the caller).
        """
        return {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": self.REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_CONFIG_FILE": "/nonexistent/perceptscore-tests/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/perceptscore-tests/aws-credentials",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def __enter__(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        # moto serves through werkzeug, which logs a line per request to stderr unless its logger already
        # has a level: keep test output clean (warnings and errors still show).
        werkzeug_log = logging.getLogger("werkzeug")
        if werkzeug_log.level == logging.NOTSET:
            werkzeug_log.setLevel(logging.WARNING)
        # port=0: werkzeug binds a free port and moto reports it, so parallel runs never collide.
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.stop()
            # ThreadedMotoServer.stop() shuts the loop down but leaves the listening socket open.
            inner = getattr(self._server, "_server", None)
            if inner is not None:
                inner.server_close()
            self._server = None

    def reset(self) -> None:
        """Empty every moto backend in this process (all buckets of every MotoS3)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def client(self) -> Any:
        """A boto3 S3 client for this server, independent of the environment (explicit everything)."""
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.REGION,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
        )

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, bucket: str, key: str) -> bytes:
        response = self.client().get_object(Bucket=bucket, Key=key)
        with contextlib.closing(response["Body"]) as body:
            return bytes(body.read())

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


# -- harsher HTTP (appended for test_remote_faults) ----------------------------------------------------


class HarshHTTPServer(FaultyHTTPServer):
    """``FaultyHTTPServer`` plus what public servers do to long reads:

    - ``port``: listen on this port (a test holds it refusing first, then lets the server come up there).
    - ``seen``: every request's (path, headers), to tell which host was sent which credentials.
    - ``trickle`` (path -> bytes a second): 200 with the whole length, then the body a few bytes at a time.
    - ``no_ranges``: Content-Length but Range ignored and no Accept-Ranges, like ``python3 -m http.server``.
    - ``drop_once``: the first GET of the path is dropped half-way (as ``drop``), the later ones served.
    """

    def __init__(self, files: dict[str, bytes] | None = None, *, port: int = 0, **kwargs: Any) -> None:
        super().__init__(files, **kwargs)
        self.fixed_port = port
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.trickle: dict[str, float] = {}
        self.no_ranges: set[str] = set()
        self.drop_once: set[str] = set()

    def __enter__(self) -> HarshHTTPServer:
        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.fixed_port), _harsh_handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="HarshHTTPServer", daemon=True
        )
        self._thread.start()
        return self


def _harsh_handler_for(server: HarshHTTPServer) -> type[BaseHTTPRequestHandler]:
    base: Any = _handler_for(server)

    class Handler(base):  # type: ignore[misc, valid-type]
        def _respond(self, head: bool) -> None:
            server.seen.append((self.path.split("?", 1)[0], dict(self.headers)))
            super()._respond(head)

        def _serve(self, path: str, head: bool) -> None:
            data = server.files.get(path)
            if data is None or not (path in server.trickle or path in server.no_ranges):
                if not head and path in server.drop_once:
                    server.drop_once.discard(path)
                    server.drop.add(path)
                    try:
                        super()._serve(path, head)
                    finally:
                        server.drop.discard(path)
                    return
                super()._serve(path, head)
                return
            self.send_response(200)
            self._file_headers(path)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if head:
                return
            rate = server.trickle.get(path)
            if rate is None:
                self.wfile.write(data)
                return
            step = max(1, int(rate / 20))
            for at in range(0, len(data), step):  # ends when the client goes away (or the server stops)
                self.wfile.write(data[at : at + step])
                self.wfile.flush()
                if server._stopping.wait(0.05):
                    return

    return Handler
