"""Remote inputs under the faults of issue 21: an outage longer than a few quick tries, credentials a
manifest would send to a host of its choosing, remote tables that name this machine's files, shards that
trickle, servers without ranges or lengths, and downloads that never end. Real servers on 127.0.0.1
(tests/servers.py), the real Scorer, sources, shards, prefetch and downloads; nothing is mocked."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import perceptscore
from perceptscore import limits, remote

from servers import HarshHTTPServer

KNOBS = ("TIMEOUT", "TRIES", "DEADLINE", "MIN_RATE")


@pytest.fixture(scope="module")
def scorer(release_checkpoints) -> perceptscore.Scorer:  # type: ignore[no-untyped-def]
    return perceptscore.Scorer(
        "mem", {"mem": release_checkpoints["memorability"][0]}, device="cpu", workers=0
    )


@pytest.fixture
def photos(photo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The test photos; the remote knobs at their defaults, file systems built afresh (they keep the
    timeouts they were made with); this process's limits as they were, after."""
    before = limits.installed()
    for knob in KNOBS:
        monkeypatch.delenv(f"PERCEPTSCORE_REMOTE_{knob}", raising=False)
    from_env()
    yield sorted(photo_dir.iterdir())
    limits.restore(before)


def from_env() -> None:
    """This process's limits as the environment says now (what a run's options read), no storage options."""
    limits.install(limits.Limits.from_env(), storage=remote.Settings())


def knobs(monkeypatch: pytest.MonkeyPatch, **values: float) -> None:
    for name, value in values.items():
        monkeypatch.setenv(f"PERCEPTSCORE_REMOTE_{name.upper()}", str(value))
    from_env()


def tar_of(members: dict[str, bytes]) -> bytes:
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return body.getvalue()


def within(seconds: float, call: Callable[[], Any]) -> tuple[Any, float]:
    """``call()``'s result (or the exception it raised) and how long it took; fails if it is still
    running after ``seconds`` (the code before the fixes hung here for good)."""
    out: list[Any] = []
    started = time.monotonic()

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return out[0], time.monotonic() - started


@pytest.mark.slow
def test_an_outage_shorter_than_the_deadline_costs_no_rows(
    scorer: perceptscore.Scorer, photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host refuses connections for 4 s (a restart), then serves: every row is scored. Four quick
    tries used to give up within 3.5 s."""
    knobs(monkeypatch, timeout=2, deadline=15)
    held = socket.socket()
    held.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = held.getsockname()[1]
    server = HarshHTTPServer({f"/p/{p.name}": p.read_bytes() for p in photos[:3]}, port=port)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "".join(f"http://127.0.0.1:{port}/p/{p.name}\n" for p in photos[:3]))

    def come_up() -> None:
        held.close()
        server.__enter__()

    timer = threading.Timer(4.0, come_up)
    started = time.monotonic()
    timer.start()
    try:
        got = scorer.score(str(manifest))
    finally:
        timer.join()
        server.__exit__(None, None, None)
    assert got["error"].isna().all(), got["error"].tolist()
    assert time.monotonic() - started >= 4.0


def test_storage_options_go_only_to_origins_named_on_the_command_line(
    scorer: perceptscore.Scorer, photos: list[Path]
) -> None:
    """A manifest on a named host sends its rows to another host, absolutely or by climbing out with
    ../..: the other host never sees the Authorization header; the climbing row is an error row."""
    jpeg = photos[0].read_bytes()
    secret = "Bearer s3cr3t-token"
    with HarshHTTPServer() as named, HarshHTTPServer() as other:
        named.files.update({"/m/a.jpg": jpeg, "/b.jpg": jpeg})
        other.files["/c.jpg"] = jpeg
        rows = ["a.jpg", "../b.jpg", other.url("/c.jpg"), f"../../127.0.0.1:{other.port}/c.jpg"]
        named.files["/m/m.csv"] = ("path\n" + "\n".join(rows) + "\n").encode()
        got = scorer.score(
            named.url("/m/m.csv"), storage_options={"http": {"headers": {"Authorization": secret}}}
        )
        expected = [named.url("/m/a.jpg"), named.url("/b.jpg"), other.url("/c.jpg"), rows[3]]
    assert got["path"].tolist() == expected
    assert got["error"][:3].isna().all(), got["error"].tolist()
    assert got["error"][3] == "climbs out of the manifest's host or bucket (../ past its root)"
    assert named.seen and all(headers.get("Authorization") == secret for _, headers in named.seen)
    assert other.seen and not any("Authorization" in headers for _, headers in other.seen)


def test_a_remote_manifest_or_list_cannot_name_this_machines_files(
    scorer: perceptscore.Scorer, photos: list[Path], tmp_path: Path
) -> None:
    """Rows of a remote manifest or @list naming local files (absolute, file://, ~, a local shard or one
    of its members) are error rows: nothing local is read or stat'ed. Relative rows are the host's."""
    private = tmp_path / "private.jpg"
    private.write_bytes(photos[0].read_bytes())
    shard = tmp_path / "private.tar"
    shard.write_bytes(tar_of({"private.jpg": private.read_bytes()}))
    rows = [str(private), f"file://{private}", "~/private.jpg", str(shard), f"tar://private.jpg::{shard}"]
    listed = "\n".join([*rows, "ok.jpg"]) + "\n"
    with HarshHTTPServer() as server:
        server.files.update({"/t/ok.jpg": photos[1].read_bytes(), "/t/list.txt": listed.encode()})
        server.files["/t/m.csv"] = ("path\n" + listed).encode()
        for table in (server.url("/t/m.csv"), "@" + server.url("/t/list.txt")):
            got = scorer.score(table)
            assert got["path"].tolist() == [*rows, server.url("/t/ok.jpg")]
            refused = "not a URL: a remote manifest or list names URLs, or paths relative to itself"
            assert got["error"].tolist()[:5] == [refused] * 5, table
            assert got["file_size"][:5].isna().all() and got["memorability"][:5].isna().all()
            assert got["error"].isna().tolist() == [False] * 5 + [True]


@pytest.mark.slow
def test_a_trickling_shard_is_given_up_and_a_sigterm_ends_its_read(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard sent at 400 bytes/s: slower than PERCEPTSCORE_REMOTE_MIN_RATE, it is an error row by its
    deadline instead of holding the run for good; with the default knobs, SIGTERM ends the read at once."""
    from perceptscore import shards
    from perceptscore.runs import StopOnSignal

    shard = tar_of({f"{n:05d}.jpg": p.read_bytes() for n, p in enumerate(photos[:2])})
    with HarshHTTPServer({"/s.tar": shard}) as server:
        server.trickle["/s.tar"] = 400.0
        knobs(monkeypatch, timeout=1, min_rate=4000, deadline=3)
        rows, took = within(30, lambda: list(shards.members(server.url("/s.tar"), ())))
        assert not isinstance(rows, BaseException), rows
        assert rows[-1][0].reason.startswith("unreadable shard: too slow"), rows[-1][0]
        assert took < 30

        for knob in KNOBS:
            monkeypatch.delenv(f"PERCEPTSCORE_REMOTE_{knob}", raising=False)
        from_env()
        with StopOnSignal():
            timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
            started = time.monotonic()
            timer.start()
            try:
                with pytest.raises(remote.Stopped):
                    list(shards.members(server.url("/s.tar"), ()))
            finally:
                timer.cancel()
                timer.join()
            assert time.monotonic() - started < 10


def test_remote_inputs_are_downloaded_capped_and_never_left_behind(
    photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote manifest with no length and over PERCEPTSCORE_MAX_INPUT_BYTES, one that trickles, and one
    whose download is cut by SIGTERM: a one-line error (or the signal's exit) and no file left behind."""
    from perceptscore.errors import UsageError
    from perceptscore.sources import Sources

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    table = b"path\n" + b"x.jpg\n" * 400_000  # 2.4 MB
    with HarshHTTPServer({"/big.csv": table, "/slow.csv": table}) as server:
        server.no_length.add("/big.csv")
        server.trickle["/slow.csv"] = 20_000.0
        monkeypatch.setenv("PERCEPTSCORE_MAX_INPUT_BYTES", str(1 << 20))
        knobs(monkeypatch, timeout=1, min_rate=100_000, deadline=2)
        with pytest.raises(UsageError, match=r"big.csv: over the limit of 1048576 bytes"):
            Sources([server.url("/big.csv")])
        failed, _ = within(30, lambda: Sources([server.url("/slow.csv")]))
        assert isinstance(failed, UsageError) and "too slow" in str(failed), failed
        assert not list(temp.iterdir())

        env = {**os.environ, "TMPDIR": str(temp)}  # the default knobs: minutes before it is too slow
        for knob in KNOBS:
            env.pop(f"PERCEPTSCORE_REMOTE_{knob}", None)
        code = f"from perceptscore import remote; remote.local_copy({server.url('/slow.csv')!r})"
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size for p in temp.rglob("*") if p.is_file()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM, proc.stderr.read() if proc.stderr else ""
    assert not list(temp.iterdir())


def test_prefetch_holds_no_more_than_its_bound_when_servers_send_no_length(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixteen 4 MiB objects sent without a length, a 4 MiB PERCEPTSCORE_PREFETCH_BYTES and a slow
    consumer: the memory held stays near the bound (plus the object waited for, the one handed on, and
    the buffers of the connections open), where all sixteen used to be fetched at once (64 MiB)."""
    from perceptscore.items import Item
    from perceptscore.locators import RemoteFile
    from perceptscore.prefetch import prefetched

    size, count, bound = 4 << 20, 16, 4 << 20
    monkeypatch.setenv("PERCEPTSCORE_PREFETCH_BYTES", str(bound))
    from_env()
    with HarshHTTPServer({f"/o{n}.bin": os.urandom(size) for n in range(count)}) as server:
        server.no_length.update(server.files)
        items = [Item(n, RemoteFile(server.url(f"/o{n}.bin"))) for n in range(count)]
        assert len(next(prefetched(items[:1])).locator.data) == size  # code paths imported, warm
        sizes = []
        tracemalloc.start()
        try:
            for item in prefetched(items):
                sizes.append(len(item.locator.data))
                time.sleep(0.1)  # a slow consumer: the fetches run ahead as far as they may
                del item
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert sizes == [size] * count
    assert peak < bound + 2 * size + (8 << 20), f"{peak / 2**20:.1f} MiB"


def test_a_large_shard_streams_from_a_server_without_ranges_and_resumes_with_one(
    photos: list[Path],
) -> None:
    """A 9 MiB+ shard from a server that ignores Range (python3 -m http.server) is read in one GET; one
    whose first GET drops half-way is resumed with a range from where it broke off."""
    from perceptscore import shards

    images = {f"{n + 1:05d}.jpg": p.read_bytes() for n, p in enumerate(photos[:3])}
    shard = tar_of({"00000.bin": os.urandom(9 << 20), **images})
    with HarshHTTPServer({"/plain.tar": shard, "/dropping.tar": shard}) as server:
        server.no_ranges.add("/plain.tar")
        server.drop_once.add("/dropping.tar")
        for path in ("/plain.tar", "/dropping.tar"):
            rows = list(shards.members(server.url(path), ()))
            assert [getattr(locator, "reason", None) for locator, _ in rows] == [None] * 3, rows
            assert [locator.data for locator, _ in rows] == list(images.values())
        assert server.requests["GET", "/plain.tar"] == 1
        assert server.requests["GET", "/dropping.tar"] == 2
        ranges = [h.get("Range") for p, h in server.seen if p == "/dropping.tar" and h.get("Range")]
        (resumed,) = set(ranges)  # the GET (and the HEAD before it) from where the first GET broke off
        assert resumed.startswith("bytes=") and 0 < int(resumed[6:-1]) < len(shard), ranges


def test_az_and_abfs_name_one_container(monkeypatch: pytest.MonkeyPatch) -> None:
    """adlfs serves az://, abfs:// and abfss:// alike: one spelling, so an output is never taken for
    another object than the input it is (and one lock guards it)."""
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "acct")
    remote.configure(remote.Settings())
    same = [
        "az://c/x/s.parquet",
        "abfs://c/x//s.parquet",
        "abfss://c@acct.dfs.core.windows.net/x/s.parquet",
        "AZ://c@ACCT.blob.core.windows.net/x/s.parquet",
    ]
    assert {remote.normalized(u) for u in same} == {"abfs://c@acct/x/s.parquet"}
    assert remote.normalized("az://c@other/x/s.parquet") == "abfs://c@other/x/s.parquet"


def test_a_stop_while_a_host_refuses_is_a_stop_never_a_rows_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM during a retry pause must end the run (rows saved, resumable), not become the shard's or the
    object's error row: a saved error row would make the next night skip the shard for good."""
    from perceptscore import shards
    from perceptscore.locators import RemoteFile

    knobs(monkeypatch, timeout=1, deadline=30)
    with socket.socket() as s:  # a port nothing listens on: connections are refused, and retried
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote.stop_requested.set()
    try:
        with pytest.raises(remote.Stopped):
            list(shards.members(f"http://127.0.0.1:{port}/00000.tar", {}))
        with pytest.raises(remote.Stopped):
            RemoteFile(f"http://127.0.0.1:{port}/a.jpg").fetch()
    finally:
        remote.stop_requested.clear()
