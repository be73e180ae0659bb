"""The test servers fail the way real remote stores fail, as the real clients (fsspec, aiohttp, s3fs) see it.

Each assertion on an exception type records what production code will meet: the remote-I/O layer turns
these into one-line error rows, so a change here (a new fsspec or s3fs wrapping an error differently)
must show up as a failing test, not as a wrongly classified row.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime

import aiohttp
import botocore.exceptions
import fsspec
import pytest
import s3fs
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.http import HTTPStreamFile

from servers import DEFAULT_LAST_MODIFIED, FaultyHTTPServer, MotoS3

# Not a multiple of any block size, so ranges and halves land mid-block.
BODY = bytes(range(256)) * 97 + b"tail"
PATHS = ["/photos/a.jpg", "/gone.jpg", "/secret.jpg", "/stall.jpg", "/drop.jpg", "/flaky.jpg", "/stream.jpg"]


@pytest.fixture(scope="module")
def http_server() -> Iterator[FaultyHTTPServer]:
    with FaultyHTTPServer(dict.fromkeys(PATHS, BODY)) as server:
        yield server


@pytest.fixture
def http(http_server: FaultyHTTPServer) -> Iterator[FaultyHTTPServer]:
    """The module's server, back to normal after each test (behaviours are set per test)."""
    yield http_server
    http_server.reset()


@pytest.fixture
def httpfs() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("http", skip_instance_cache=True)


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    """One raw request (urllib: no retries, no caching): status, headers and body, for errors too."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


# -- FaultyHTTPServer, normal files ------------------------------------------------------------------


def test_http_normal_whole_range_and_info(http: FaultyHTTPServer, httpfs: fsspec.AbstractFileSystem) -> None:
    url = http.url("/photos/a.jpg")
    assert httpfs.cat_file(url) == BODY
    with httpfs.open(url, block_size=1024) as f:  # a small block size: the read must be a ranged GET
        f.seek(3000)
        assert f.read(500) == BODY[3000:3500]
    info = httpfs.info(url)
    assert info["size"] == len(BODY)
    assert info["type"] == "file"
    assert info["ETag"] == http.etag("/photos/a.jpg")
    assert parsedate_to_datetime(info["Last-Modified"]).timestamp() == DEFAULT_LAST_MODIFIED
    assert http.requests["HEAD", "/photos/a.jpg"] >= 1
    assert http.requests["GET", "/photos/a.jpg"] >= 2


def test_http_range_headers(http: FaultyHTTPServer) -> None:
    url = http.url("/photos/a.jpg")
    size = len(BODY)
    status, headers, body = _get(url, {"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, BODY[10:20], f"bytes 10-19/{size}")
    assert headers["Content-Length"] == "10"
    status, headers, body = _get(url, {"Range": "bytes=100-"})
    assert (status, body, headers["Content-Range"]) == (206, BODY[100:], f"bytes 100-{size - 1}/{size}")
    status, _, body = _get(url, {"Range": "bytes=-4"})
    assert (status, body) == (206, b"tail")
    status, headers, _ = _get(url, {"Range": f"bytes={size}-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{size}")
    status, headers, body = _get(url, method="HEAD")
    assert (status, body, headers["Content-Length"], headers["Accept-Ranges"]) == (
        200,
        b"",
        str(size),
        "bytes",
    )
    assert headers["Last-Modified"] == "Tue, 02 Jan 2024 03:04:05 GMT"  # RFC 7231 IMF-fixdate


def test_http_last_modified_per_file(http: FaultyHTTPServer, httpfs: fsspec.AbstractFileSystem) -> None:
    http.last_modified["/photos/a.jpg"] = 1_700_000_000.0
    try:
        info = httpfs.info(http.url("/photos/a.jpg"))
    finally:
        del http.last_modified["/photos/a.jpg"]
    assert parsedate_to_datetime(info["Last-Modified"]).timestamp() == 1_700_000_000.0


# -- FaultyHTTPServer, failures --------------------------------------------------------------------


def test_http_missing_is_file_not_found(http: FaultyHTTPServer, httpfs: fsspec.AbstractFileSystem) -> None:
    http.missing.add("/gone.jpg")
    with pytest.raises(FileNotFoundError):
        httpfs.cat_file(http.url("/gone.jpg"))
    with pytest.raises(FileNotFoundError):
        httpfs.cat_file(http.url("/never-existed.jpg"))


def test_http_forbidden(http: FaultyHTTPServer, httpfs: fsspec.AbstractFileSystem) -> None:
    http.forbidden.add("/secret.jpg")
    # A GET (cat_file) surfaces aiohttp's own error, with the status on it.
    with pytest.raises(aiohttp.ClientResponseError) as caught:
        httpfs.cat_file(http.url("/secret.jpg"))
    assert caught.value.status == 403
    # info/open/size go through fsspec's _info, which swallows every error into FileNotFoundError and
    # keeps the real one only as __cause__: a classifier must look there to tell 403 from 404.
    with pytest.raises(FileNotFoundError) as caught_info:
        httpfs.info(http.url("/secret.jpg"))
    assert isinstance(caught_info.value.__cause__, aiohttp.ClientResponseError)
    assert caught_info.value.__cause__.status == 403


def test_http_stall_times_out(http: FaultyHTTPServer) -> None:
    http.stall.add("/stall.jpg")
    fs = fsspec.filesystem(
        "http", skip_instance_cache=True, client_kwargs={"timeout": aiohttp.ClientTimeout(total=1)}
    )
    started = time.monotonic()
    # aiohttp raises a bare TimeoutError; fsspec's sync() re-raises it as FSTimeoutError (a TimeoutError).
    with pytest.raises(FSTimeoutError) as caught:
        fs.cat_file(http.url("/stall.jpg"))
    assert time.monotonic() - started < 3
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value.__cause__, TimeoutError)
    # Through info (HEAD, then a GET fallback: two timeouts) it is a FileNotFoundError again.
    started = time.monotonic()
    with pytest.raises(FileNotFoundError) as caught_info:
        fs.info(http.url("/stall.jpg"))
    assert time.monotonic() - started < 4
    assert isinstance(caught_info.value.__cause__, TimeoutError)


def test_http_drop_mid_body(http: FaultyHTTPServer, httpfs: fsspec.AbstractFileSystem) -> None:
    http.drop.add("/drop.jpg")
    with pytest.raises(aiohttp.ClientPayloadError, match="Not enough data"):
        httpfs.cat_file(http.url("/drop.jpg"))
    assert httpfs.info(http.url("/drop.jpg"))["size"] == len(BODY)  # HEAD is unaffected
    with pytest.raises(aiohttp.ClientPayloadError), httpfs.open(http.url("/drop.jpg")) as f:
        f.read()  # a ranged GET, dropped half-way too


def test_http_flaky_then_normal(http: FaultyHTTPServer, httpfs: fsspec.AbstractFileSystem) -> None:
    http.flaky("/flaky.jpg", 2)
    assert [_get(http.url("/flaky.jpg"))[0] for _ in range(3)] == [503, 503, 200]
    assert http.requests["GET", "/flaky.jpg"] == 3
    # Through fsspec: no retries of its own, each 503 is an aiohttp.ClientResponseError.
    http.flaky("/flaky.jpg", 2)
    for _ in range(2):
        with pytest.raises(aiohttp.ClientResponseError) as caught:
            httpfs.cat_file(http.url("/flaky.jpg"))
        assert caught.value.status == 503
    assert httpfs.cat_file(http.url("/flaky.jpg")) == BODY
    # GETs and HEADs share the count: a HEAD uses up the one 503.
    http.flaky("/flaky.jpg", 1)
    assert _get(http.url("/flaky.jpg"), method="HEAD")[0] == 503
    assert _get(http.url("/flaky.jpg"))[0] == 200


def test_http_no_length(http: FaultyHTTPServer, httpfs: fsspec.AbstractFileSystem) -> None:
    http.no_length.add("/stream.jpg")
    status, headers, body = _get(http.url("/stream.jpg"), {"Range": "bytes=0-9"})
    assert (status, body) == (200, BODY)  # the range is ignored
    assert "Content-Length" not in headers
    assert "Accept-Ranges" not in headers
    assert "Content-Length" not in _get(http.url("/stream.jpg"), method="HEAD")[1]
    # fsspec has no size, so open() gives a streaming file that reads to the end of the connection.
    assert httpfs.info(http.url("/stream.jpg"))["size"] is None
    with httpfs.open(http.url("/stream.jpg")) as f:
        assert isinstance(f, HTTPStreamFile)
        assert f.read() == BODY
    assert httpfs.cat_file(http.url("/stream.jpg")) == BODY


def test_http_slow_stall_answers(http: FaultyHTTPServer) -> None:
    http.stall.add("/stall.jpg")
    http.stall_s = 0.3  # the fixture's reset() puts it back
    started = time.monotonic()
    assert _get(http.url("/stall.jpg"))[2] == BODY
    assert time.monotonic() - started >= 0.3


def test_http_latency(http: FaultyHTTPServer) -> None:
    http.latency_s = 0.3
    started = time.monotonic()
    assert _get(http.url("/photos/a.jpg"))[0] == 200
    assert time.monotonic() - started >= 0.3


def test_http_stop_does_not_wait_for_stalled_requests() -> None:
    with FaultyHTTPServer({"/x": b"x"}) as server:
        server.stall.add("/x")
        client = threading.Thread(target=_get_quietly, args=(server.url("/x"),), daemon=True)
        client.start()
        while server.requests["GET", "/x"] == 0:
            time.sleep(0.01)
        started = time.monotonic()
    assert time.monotonic() - started < 2
    client.join(timeout=5)
    assert not client.is_alive()


def _get_quietly(url: str) -> None:
    # The server closes the stalled connection without an answer: an error here is the expected outcome.
    with contextlib.suppress(OSError):
        _get(url)


# -- MotoS3 through s3fs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture(scope="module")
def bucket(moto: MotoS3) -> str:
    # moto's buckets are per process, not per server: a unique name cannot meet another module's.
    name = f"perceptscore-servers-{uuid.uuid4().hex[:8]}"
    moto.make_bucket(name)
    moto.put(name, "photos/a.jpg", b"A" * 100)
    moto.put(name, "photos/2024/b.png", b"B" * 50)
    moto.put(name, "elsewhere/c.txt", b"c")
    return name


@pytest.fixture
def aws_env(moto: MotoS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto.env.items():
        monkeypatch.setenv(name, value)
    return moto.env


def test_s3_env_endpoint_list_read_write(moto: MotoS3, bucket: str, aws_env: dict[str, str]) -> None:
    # No endpoint given: botocore reads AWS_ENDPOINT_URL (the bucket exists only in moto).
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fs.endpoint_url is None
    found = fs.find(f"{bucket}/photos", detail=True)
    assert sorted(found) == [f"{bucket}/photos/2024/b.png", f"{bucket}/photos/a.jpg"]
    entry = found[f"{bucket}/photos/a.jpg"]
    assert {"name", "size", "type", "Key", "Size", "LastModified", "ETag", "StorageClass"} <= set(entry)
    assert (entry["size"], entry["type"]) == (100, "file")
    assert entry["LastModified"].tzinfo is not None  # a timezone-aware datetime, not a string
    assert fs.cat_file(f"{bucket}/photos/a.jpg") == b"A" * 100
    fs.pipe(f"{bucket}/out/scores.csv", b"path,score\n")
    assert moto.get(bucket, "out/scores.csv") == b"path,score\n"
    assert moto.keys(bucket, "out/") == ["out/scores.csv"]
    assert fs.find(f"{bucket}/no-such-prefix/") == []


def test_s3_missing_key_and_bucket(bucket: str, aws_env: dict[str, str]) -> None:
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    with pytest.raises(FileNotFoundError) as caught:
        fs.cat_file(f"{bucket}/photos/none.jpg")
    assert caught.value.__cause__ is None
    # A missing bucket is a FileNotFoundError as well; only __cause__ (botocore's NoSuchBucket) tells.
    for call in (
        lambda: fs.cat_file("perceptscore-no-such-bucket/x.jpg"),
        lambda: fs.find("perceptscore-no-such-bucket/photos"),
        lambda: fs.pipe("perceptscore-no-such-bucket/out.csv", b"x"),
    ):
        with pytest.raises(FileNotFoundError, match="bucket does not exist") as caught:
            call()
        assert type(caught.value.__cause__).__name__ == "NoSuchBucket"
        assert isinstance(caught.value.__cause__, botocore.exceptions.ClientError)


def _fast_failing_s3() -> s3fs.S3FileSystem:
    fs = s3fs.S3FileSystem(
        skip_instance_cache=True,
        config_kwargs={"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}},
    )
    # s3fs has no `retries` argument: S3FileSystem(retries=1) passes it on to aiobotocore's session, which
    # fails at the first call with a TypeError. The attribute is what s3fs's own retry loop reads (default 5,
    # and it retries even non-retryable errors such as a refused connection: 5 x botocore's own retries).
    fs.retries = 1
    return fs


def test_s3_closed_port_fails_fast(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    fs = _fast_failing_s3()
    started = time.monotonic()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        fs.cat_file("bucket/key.jpg")
    assert time.monotonic() - started < 5


def test_s3_silent_server_times_out(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Listening but never accepting: the kernel completes the handshake (or, with the queue full, drops the
    # SYN), so botocore sees a read or a connect timeout, a store that hangs rather than one that is down.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        fs = _fast_failing_s3()
        started = time.monotonic()
        with pytest.raises((botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
            fs.cat_file("bucket/key.jpg")
        assert time.monotonic() - started < 5
