"""Outputs in an object store (moto's S3 server on 127.0.0.1), run through the console script in-process:
data and provenance never disagree after a failed upload, and a failure is one line; a lock object keeps
two hosts off one output; the work folder is trusted only when it is the user's own; a finished file whose
upload failed is uploaded only if every row's file is unchanged, else reused row by row."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from perceptscore import limits
from perceptscore.cli import main

from servers import MotoS3

QUICK = {"PERCEPTSCORE_REMOTE_TIMEOUT": "2", "PERCEPTSCORE_REMOTE_TRIES": "1"}
PHOTOS = ("a_square.jpg", "b_landscape.png", "c_cat.webp")


@pytest.fixture(autouse=True)
def installed_limits() -> None:
    """This process's limits put back after each test (a test installs the knobs it sets: ``from_env``)."""
    before = limits.installed()
    yield
    limits.restore(before)


def from_env() -> None:
    """This process's limits as the environment says now (what a run's options read)."""
    limits.install(limits.Limits.from_env())


@pytest.fixture
def bucket(moto_s3: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A bucket of this test's own, the environment that finds it, and a work folder of the test's."""
    for name, value in {**moto_s3.env, **QUICK, "PERCEPTSCORE_WORK": str(tmp_path / "work")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    from_env()
    name = f"o-{uuid.uuid4().hex[:10]}"
    moto_s3.make_bucket(name)
    return name


@pytest.fixture
def checkpoint(release_checkpoints) -> Path:  # type: ignore[no-untyped-def]
    return release_checkpoints["memorability"][0]


@pytest.fixture
def photos(photo_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        (folder / name).write_bytes((photo_dir / name).read_bytes())
    return folder


def cli(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], checkpoint: Path, *args: str
) -> tuple[int, str]:
    """``perceptscore score ARGS -t mem`` through the console script in this process: exit code, stderr
    (the file descriptor's, so whatever a library prints there is seen too)."""
    argv = ["perceptscore", "score", *args, "-t", "mem", "--checkpoint", str(checkpoint), "--workers", "0",
            "--device", "cpu"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0), capfd.readouterr().err


def failing_puts(monkeypatch: pytest.MonkeyPatch, missing: str) -> Callable[[str | None], None]:
    """Make the store refuse uploads of keys ending in a given suffix, for real: s3fs sends them to a
    bucket that does not exist (moto answers 404). Returns the switch (None: every upload goes through)."""
    import s3fs

    real = s3fs.S3FileSystem._put_file
    failing: list[str | None] = [None]

    async def put_file(self, lpath, rpath, *args, **kwargs):  # type: ignore[no-untyped-def]
        if failing[0] is not None and rpath.endswith(failing[0]):
            rpath = f"{missing}/{rpath.split('/', 1)[1]}"
        return await real(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", put_file)
    return lambda suffix: failing.__setitem__(0, suffix)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line and
             not line.startswith("  warnings.warn")]  # fmt: skip
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def until(condition: Callable[[], bool], limit: float = 30) -> bool:
    """Whether ``condition`` came true within ``limit`` seconds (polled: a loaded machine is slow)."""
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_failed_upload_never_leaves_data_and_provenance_disagreeing(
    moto_s3: MotoS3, bucket: str, photos: Path, checkpoint: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = f"s3://{bucket}/out/scores.csv"
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
    assert code == 0, err
    data, meta = moto_s3.get(bucket, "out/scores.csv"), moto_s3.get(bucket, "out/scores.csv.meta.json")

    fail = failing_puts(monkeypatch, f"missing-{bucket}")
    os.utime(photos / PHOTOS[0], ns=(1_000_000_000, 1_000_000_000))  # new rows: its mtime column changes
    fail(".meta.json")  # the provenance cannot be uploaded: the data must not be either
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
    assert code == 2 and "could not be uploaded" in one_line(err)
    assert moto_s3.get(bucket, "out/scores.csv") == data
    assert moto_s3.get(bucket, "out/scores.csv.meta.json") == meta

    # the work folder and what it keeps are private
    (folder,) = (tmp_path / "work").iterdir()
    assert mode(tmp_path / "work") == mode(folder) == 0o700
    assert {p.name: mode(p) for p in folder.iterdir()} == {
        "scores.csv": 0o600, "scores.csv.meta.json": 0o600, "ready.json": 0o600,
    }  # fmt: skip

    fail("scores.csv")  # now the data fails after its provenance went up: the earlier provenance is back
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
    assert code == 2 and "could not be uploaded" in one_line(err)
    assert moto_s3.get(bucket, "out/scores.csv") == data
    assert moto_s3.get(bucket, "out/scores.csv.meta.json") == meta

    fail(None)
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
    assert code == 0, err
    rows = pd.read_csv(io.BytesIO(moto_s3.get(bucket, "out/scores.csv")))
    assert rows["file_mtime_ns"][0] == 1_000_000_000
    assert moto_s3.get(bucket, "out/scores.csv.meta.json") != meta
    assert moto_s3.keys(bucket) == ["out/scores.csv", "out/scores.csv.meta.json"]  # no lock, no probe left


def test_another_hosts_lock_refuses_the_run_a_stale_one_is_taken_over(
    moto_s3: MotoS3, bucket: str, photos: Path, checkpoint: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = f"s3://{bucket}/scores.parquet"
    record = {"pid": 4242, "host": "other-host", "started": "2030-01-01 00:00:00", "command": "perceptscore"}
    moto_s3.put(bucket, ".scores.parquet.lock", json.dumps(record).encode())
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
    line = one_line(err)
    assert code == 2 and "being written by another run (pid 4242 on other-host" in line, err
    assert moto_s3.keys(bucket) == [".scores.parquet.lock"]  # nothing written beside it

    monkeypatch.setenv("PERCEPTSCORE_REMOTE_LOCK_STALE", "1")  # not renewed for a second: a dead host's
    time.sleep(2.1)  # the store's clock counts whole seconds
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
    assert code == 0, err
    assert moto_s3.keys(bucket) == ["scores.parquet"]  # taken over, and removed at the end
    assert pq.read_table(io.BytesIO(moto_s3.get(bucket, "scores.parquet"))).num_rows == len(PHOTOS)


def test_the_remote_lock_is_exclusive_renewed_and_knows_when_it_was_taken_over(
    moto_s3: MotoS3, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from perceptscore.destinations import RemoteLock
    from perceptscore.errors import UsageError

    url = f"s3://{bucket}/s.parquet"
    monkeypatch.setenv("PERCEPTSCORE_REMOTE_LOCK_STALE", "2")  # renewed every half second
    from_env()
    with RemoteLock(url, url) as first:
        with pytest.raises(UsageError, match="being written by another run"), RemoteLock(url, url):
            pass  # a second host (another work folder, so no local lock): refused
        etag = first.etag
        assert until(lambda: first.etag != etag) and not first.lost  # renewed
        # someone takes it over (as a host that found it stale would): the holder learns it
        moto_s3.put(bucket, ".s.parquet.lock", b'{"host": "thief"}')
        assert until(lambda: first.lost)
    assert moto_s3.get(bucket, ".s.parquet.lock") == b'{"host": "thief"}'  # not removed: not ours
    moto_s3.client().delete_object(Bucket=bucket, Key=".s.parquet.lock")

    # a lock whose process on this host is gone is taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setenv("PERCEPTSCORE_REMOTE_LOCK_STALE", "600")
    from_env()
    record = {
        "pid": dead.pid,
        "host": socket.gethostname(),
        "pid_namespace": os.stat("/proc/self/ns/pid").st_ino,
    }
    # (a pid in another namespace, as in another container with this host name, is never judged dead)
    moto_s3.put(bucket, ".s.parquet.lock", json.dumps({**record, "pid_namespace": 1}).encode())
    with pytest.raises(UsageError, match="being written by another run"), RemoteLock(url, url):
        pass
    moto_s3.put(bucket, ".s.parquet.lock", json.dumps(record).encode())
    with RemoteLock(url, url) as taken:
        assert json.loads(moto_s3.get(bucket, ".s.parquet.lock"))["pid"] == os.getpid() and not taken.lost
    assert ".s.parquet.lock" not in moto_s3.keys(bucket)


def test_a_work_folder_that_is_a_link_or_someone_elses_is_refused(
    moto_s3: MotoS3, bucket: str, photos: Path, checkpoint: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from perceptscore.destinations import RemoteOutput

    out = f"s3://{bucket}/scores.parquet"
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("scores.parquet", "ready.json", "scores.parquet.meta.json"):
        (victim / name).write_text("the victim's own file")
    folder = RemoteOutput(out).folder
    folder.parent.mkdir(mode=0o700)
    folder.symlink_to(victim)  # planted: the run would delete (or upload) what is there
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
    assert code == 2 and "is a symbolic link" in one_line(err)
    assert sorted(p.read_text() for p in victim.iterdir()) == ["the victim's own file"] * 3
    assert moto_s3.keys(bucket) == []

    folder.unlink()
    folder.mkdir()
    if os.getuid() == 0:
        os.chown(folder, 65534, 65534)  # another user's (made so by root)
    else:
        monkeypatch.setenv("PERCEPTSCORE_WORK", "/")  # root's
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
    assert code == 2 and "belongs to another user" in one_line(err)
    assert moto_s3.keys(bucket) == []


def test_after_a_failed_upload_changed_files_are_scored_and_the_rest_reused(
    moto_s3: MotoS3, bucket: str, photos: Path, checkpoint: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = f"s3://{bucket}/scores.parquet"
    fail = failing_puts(monkeypatch, f"missing-{bucket}")

    def failed_run() -> pd.DataFrame:
        """The run's upload fails: what it finished stays in the work folder."""
        fail("scores.parquet")
        code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
        assert code == 2 and "could not be uploaded" in one_line(err)
        fail(None)
        return pq.read_table(next((tmp_path / "work").rglob("scores.parquet"))).to_pandas()

    def uploaded() -> pd.DataFrame:
        return pq.read_table(io.BytesIO(moto_s3.get(bucket, "scores.parquet"))).to_pandas()

    finished = failed_run()
    (photos / PHOTOS[1]).write_bytes((photos / PHOTOS[0]).read_bytes())  # edited in place: same path
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
    assert code == 0 and "1 scored, 0 errors, 2 reused" in err, err  # only the edited file is scored
    rows = uploaded()
    assert rows["memorability"][1] == pytest.approx(rows["memorability"][0], abs=1e-6)  # its fresh score
    assert rows["file_size"][1] == (photos / PHOTOS[1]).stat().st_size
    assert rows["memorability"].tolist()[::2] == finished["memorability"].tolist()[::2]  # reused as they were

    finished = failed_run()
    (photos / "d_new.jpg").write_bytes((photos / PHOTOS[2]).read_bytes())  # one new file
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
    assert code == 0 and "1 scored, 0 errors, 3 reused" in err, err  # the finished copy is not thrown away
    rows = uploaded()
    assert rows["path"].map(lambda p: Path(p).name).tolist() == [*PHOTOS, "d_new.jpg"]
    assert rows["memorability"].tolist()[:3] == finished["memorability"].tolist()
    assert rows["memorability"][3] == pytest.approx(rows["memorability"][2], abs=1e-6)
    assert not list((tmp_path / "work").rglob("*.parquet"))


def test_a_store_that_never_answers_fails_in_seconds_not_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that takes the connection and the request, then says nothing (the backend's read timeout
    does not catch it): the probe and the upload each end in a one-line error within seconds."""
    import threading

    from perceptscore import remote
    from perceptscore.destinations import RemoteOutput
    from perceptscore.errors import UsageError

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(silent.accept()[0]) for _ in range(16)], daemon=True).start()
    env = {**MotoS3().env, **QUICK, "PERCEPTSCORE_REMOTE_TIMEOUT": "1", "PERCEPTSCORE_REMOTE_DEADLINE": "3",
           "PERCEPTSCORE_WORK": str(tmp_path)}  # fmt: skip
    for name, value in {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}"}.items():
        monkeypatch.setenv(name, value)
    remote.configure(remote.Settings())
    from_env()  # a file system for this endpoint, with these timeouts
    errors: list[str] = []

    def attempts() -> None:
        output = RemoteOutput("s3://silent-bucket/scores.parquet")
        for step in (output.prepare, output.upload):
            output.folder.mkdir(parents=True, exist_ok=True)
            output.local.write_bytes(b"finished scores")
            try:
                step()
            except UsageError as exc:
                errors.append(str(exc))

    worker = threading.Thread(target=attempts, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(timeout=60)
    try:
        assert not worker.is_alive(), "a silent store held the run"
        assert time.monotonic() - started < 60
        assert errors[0] == "cannot write to s3://silent-bucket/scores.parquet: timed out"
        assert "could not be uploaded to s3://silent-bucket/scores.parquet (timed out)" in errors[1]
    finally:
        silent.close()
        for connection in held:
            connection.close()
        remote.configure(remote.Settings())


def test_an_object_store_output_is_guarded_as_a_local_one(
    moto_s3: MotoS3, bucket: str, photos: Path, checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    moto_s3.put(bucket, "mydata.csv", b"name,value\na,1\n")  # the user's object, not ours
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", f"s3://{bucket}/mydata.csv")
    assert code == 2 and f"s3://{bucket}/mydata.csv exists and was not written by perceptscore" in one_line(
        err
    )
    assert moto_s3.get(bucket, "mydata.csv") == b"name,value\na,1\n"

    out = f"s3://{bucket}/scores.parquet"
    assert cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)[0] == 0
    before = moto_s3.get(bucket, "scores.parquet")
    for name in PHOTOS[:2]:  # most files gone: refused, nothing uploaded
        (photos / name).unlink()
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out)
    assert code == 2 and f"would drop 2 of the 3 rows of {out}" in one_line(err)
    assert moto_s3.get(bucket, "scores.parquet") == before
    code, err = cli(monkeypatch, capfd, checkpoint, str(photos), "-o", out, "--max-delete", "all")
    assert code == 0 and "2 gone since the last run" in err, err
    assert len(pq.read_table(io.BytesIO(moto_s3.get(bucket, "scores.parquet")))) == 1
