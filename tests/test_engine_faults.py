"""Engines whose ground goes away: a Ray cluster lost mid-run (exit 4, one line, the rows Ray returned
saved and continued by a rerun), a cluster that wants a token, and ``--processes`` children that end with
a killed driver. Real processes and a real Ray head of this module's own (the session's shared cluster is
never killed)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import _session_processes
from typer.testing import CliRunner

from perceptscore.cli import app

from test_cli_score import EXE
from test_reliability import shards

RAY = str(Path(sysconfig.get_path("scripts")) / "ray")
AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _stat(pid: int) -> list[str] | None:
    """``state ppid pgrp session ...`` of a live process (None when gone or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _children(pid: int) -> list[int]:
    return [child for child in _pids() if (fields := _stat(child)) and int(fields[1]) == pid]


class TokenCluster:
    """A Ray head with token authentication on, as a ``ray.init()`` cluster of Ray 2.60 has it, for this
    module alone: the tests kill its processes. ``address()`` starts it when it is not running."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.token = folder, secrets.token_hex(16)
        self.home = folder / "home"  # no ~/.ray/auth_token of the user's is read, none is written there
        self.home.mkdir()
        self.head: subprocess.Popen[bytes] | None = None
        self.port = 0

    def env(self, token: str | None) -> dict[str, str]:
        """A driver's environment: the cluster's token (or another), or none at all."""
        env = {k: v for k, v in os.environ.items() if k not in AUTH} | {"HOME": str(self.home)}
        return env | ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {})

    def address(self) -> str:
        if self.head is None or self.head.poll() is not None or not self._named("gcs_server"):
            self.stop()
            self._start()
        return f"127.0.0.1:{self.port}"

    def _start(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        log = self.folder / f"ray-{self.port}.log"
        env = self.env(self.token) | {"RAY_USAGE_STATS_ENABLED": "0"}
        with open(log, "wb") as out:
            self.head = subprocess.Popen(
                [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                 "--num-cpus=2", "--include-dashboard=false", "--object-store-memory=200000000",
                 "--disable-usage-stats"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while b"block forever" not in log.read_bytes():
            assert self.head.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

    def _named(self, name: str) -> list[int]:
        if self.head is None:
            return []
        found = []
        for pid in _session_processes(self.head.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    found.append(pid)
        return found

    def kill(self, name: str) -> None:
        (pid,) = self._named(name)
        os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.head is None:
            return
        for pid in _session_processes(self.head.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.head.wait()
        self.head = None


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenCluster]:
    cluster = TokenCluster(tmp_path_factory.mktemp("token-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_a_cluster_that_wants_a_token_says_so_in_one_line(
    token_cluster: TokenCluster, photo_dir: Path, checkpoint_args: list[str], tmp_path: Path
) -> None:
    """No token (Ray would log 20 InvalidAuthToken refusals, then "cannot connect"), a wrong one, and
    token mode with none found (Ray's client would abort the process from C++): exit 2 at once, one line."""
    address = token_cluster.address()
    cases = {
        None: "wants its authentication token: set RAY_AUTH_MODE=token and give the token",
        "0" * 32: "refused this driver's token: give the token `ray get-auth-token` prints on its head",
        "": "RAY_AUTH_MODE=token but no token was found for the Ray cluster",
    }
    for token, message in cases.items():
        env = token_cluster.env(token) | ({"RAY_AUTH_MODE": "token"} if token == "" else {})
        done = subprocess.run(
            [EXE, "score", photo_dir, "-t", "mem", *checkpoint_args[:2], "--engine", "ray", "--ray-address",
             address, "-o", tmp_path / "out.csv"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [f"error: {done.stderr.strip()[7:]}"], done.stderr
        assert message in done.stderr and f"at {address}" in done.stderr
        assert "InvalidAuthToken" not in done.stderr  # not 20 retries of a second each


@pytest.mark.slow
def test_a_cluster_lost_mid_run_exits_4_with_the_rows_it_returned_saved(
    token_cluster: TokenCluster, many_photos: Path, release_checkpoints, tmp_path: Path
) -> None:
    """The head's GCS is killed once rows have come back: Ray would wait 60 s, then end the process from
    C++ with exit code 1 and nothing saved. Here: exit 4 within seconds, one ``error:`` line saying how
    many rows were saved, and the same command (here on the local engine) continues after them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in sorted(many_photos.iterdir())[:48]:
        shutil.copy(photo, folder / photo.name)
    out = tmp_path / "out.parquet"
    checkpoint = str(release_checkpoints["memorability"][0])
    args = [folder, "-t", "mem", "--checkpoint", checkpoint, "--batch-size", "4", "--device", "cpu",
            "-o", out]  # fmt: skip
    env = token_cluster.env(token_cluster.token) | {
        "PERCEPTSCORE_SHARD_ROWS": "8",  # a shard every two batches: some rows are held, not yet saved
        "PERCEPTSCORE_RAY_WINDOW_ROWS": "24",  # the second window needs new actors: a dead GCS stalls it
        "PERCEPTSCORE_RAY_LOST_S": "3",
    }
    address = token_cluster.address()
    driver = subprocess.Popen(
        [EXE, "score", *map(str, args), "--engine", "ray", "--ray-address", address],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while driver.poll() is None and shards(out) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert driver.poll() is None and shards(out) >= 2, "no rows came back in 180 s"
        token_cluster.kill("gcs_server")
        _, stderr = driver.communicate(timeout=55)  # Ray alone: 60 s, then exit 1 with nothing saved
    finally:
        driver.kill()
        driver.wait()
    assert driver.returncode == 4, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [stderr.strip().splitlines()[-1]], stderr
    parts = out.with_name(f".{out.name}.parts")
    saved = sum(pq.read_metadata(p).num_rows for p in parts.glob("shard-*.parquet"))
    assert errors[0] == (
        f"error: the Ray cluster at {address} was lost mid-run: its GCS has not answered for 3 s; {saved} "
        f"rows saved in {parts}; run the same command again to continue"
    )
    assert 16 <= saved < 48 and not out.exists()
    done = CliRunner().invoke(app, ["score", *map(str, args)], env={"PERCEPTSCORE_SHARD_ROWS": "8"})
    assert done.exit_code == 0, done.output
    table = pq.read_table(out)
    assert table["path"].to_pylist() == [str(p) for p in sorted(folder.iterdir())]
    assert table["error"].null_count == 48
    assert json.loads(table.schema.metadata[b"perceptscore"])["resumed_rows"] == saved


@pytest.mark.slow
def test_processes_children_end_within_seconds_of_a_killed_driver(
    http_server, photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Each child holds a block of objects whose server stalls (it would wait out its deadline, then score
    them): SIGKILL of the driver ends every child and its decode workers within a few seconds."""
    photo = (photo_dir / "a_square.jpg").read_bytes()
    paths = [f"/lifeline/{n}.jpg" for n in range(8)]
    for path in paths:
        http_server.files[path] = photo
        http_server.stall.add(path)
    manifest = tmp_path / "urls.csv"
    manifest.write_text("path\n" + "".join(f"{http_server.url(p)}\n" for p in paths))
    checkpoint = str(release_checkpoints["memorability"][0])
    driver = subprocess.Popen(
        [EXE, "score", manifest, "-t", "mem", "--checkpoint", checkpoint, "--batch-size", "1",
         "--workers", "1", "--processes", "2", "--device", "cpu", "-o", tmp_path / "out.parquet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        # blocks of 4 rows: child 1 asks for objects 0-3, child 2 for 4-7
        while http_server.requests.total(paths[0]) == 0 or http_server.requests.total(paths[4]) == 0:
            assert driver.poll() is None and time.monotonic() < deadline, "the children never asked"
            time.sleep(0.05)
        children = _children(driver.pid)
        assert len(children) == 2
        driver.kill()
        driver.wait()
        killed = time.monotonic()
        left = children
        while left and time.monotonic() - killed < 5:
            time.sleep(0.05)
            # each child leads a session: its decode workers are in it
            left = [pid for pid in _pids() if (fields := _stat(pid)) and int(fields[3]) in children]
        assert not left, f"still running 5 s after the driver was killed: {left}"
    finally:
        http_server.reset()
        for path in paths:
            http_server.files.pop(path, None)
        with contextlib.suppress(ProcessLookupError):
            driver.kill()
