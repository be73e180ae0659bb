"""A folder output in an object store (``-o s3://bucket/scores/``, issue 24 item 1; moto's S3 server on
127.0.0.1): each part is uploaded to a hidden staging prefix as soon as it is complete, and the finished run
commits (a journal in the store, server-side copies, the manifest last), so the folder holds its earlier
output or the new one, never a mix; a run killed mid-way has its parts staged and resumes them; a commit cut
short is finished by whoever comes next; ``--incremental`` and ``--retry-errors`` read such a folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pytest

from perceptscore.cli import main
from perceptscore.errors import UsageError
from perceptscore.parts import MANIFEST, RUN
from perceptscore.remote_parts import JOURNAL, RemoteFolder

from servers import MotoS3
from test_cli_score import EXE
from test_remote_outputs import QUICK, bucket, installed_limits, one_line, until  # noqa: F401

MEMBERS = 3


@pytest.fixture
def shards(many_photos: Path, tmp_path: Path) -> Path:
    """Four tar shards of three photos each."""
    folder = tmp_path / "shards"
    folder.mkdir()
    photos = sorted(many_photos.iterdir())
    for number in range(4):
        with tarfile.open(folder / f"{number:05d}.tar", "w") as archive:
            for offset, photo in enumerate(photos[number * MEMBERS : (number + 1) * MEMBERS]):
                archive.add(photo, arcname=f"{number:05d}{offset:04d}.jpg")
    return folder


@pytest.fixture
def checkpoint(release_checkpoints) -> Path:  # type: ignore[no-untyped-def]
    return release_checkpoints["memorability"][0]


def cli(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], checkpoint: Path, *args: str
) -> tuple[int, str, str]:
    """``perceptscore score ARGS -t mem`` through the console script in this process: exit code, stdout,
    stderr."""
    argv = ["perceptscore", "score", *args, "-t", "mem", "--checkpoint", str(checkpoint), "--workers", "0",
            "--device", "cpu", "--batch-size", "2"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capfd.readouterr()
    return int(exit_.value.code or 0), out, err


def store(moto_s3: MotoS3):  # type: ignore[no-untyped-def]
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3.endpoint}, skip_instance_cache=True)


def keys(moto_s3: MotoS3, prefix: str) -> list[str]:
    """Every object under ``prefix`` (hidden ones too), relative to it."""
    found = store(moto_s3).find(prefix, withdirs=False)
    return sorted(k[len(prefix) :] for k in found)


def test_parts_are_staged_then_committed_and_read_back_as_one_table(
    moto_s3: MotoS3, bucket: str, shards: Path, checkpoint: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The store's folder equals the local folder output part for part; nothing staged, locked or left in
    the work folder afterwards; pyarrow reads the folder in the store as one table."""
    local, shard_glob = tmp_path / "local", f"{shards}/*.tar"
    code, _, err = cli(monkeypatch, capfd, checkpoint, shard_glob, "-o", f"{local}/")
    assert code == 0, err
    url = f"s3://{bucket}/nightly/scores/"
    code, _, err = cli(monkeypatch, capfd, checkpoint, shard_glob, "-o", url)
    assert code == 0, err
    names = [f"{n:05d}.parquet" for n in range(4)]
    assert keys(moto_s3, f"{bucket}/nightly/scores/") == sorted([MANIFEST, *names])
    fs = store(moto_s3)
    manifest = json.loads(fs.cat_file(f"{bucket}/nightly/scores/{MANIFEST}"))
    assert [p["file"] for p in manifest["parts"]] == names and manifest["rows"] == 4 * MEMBERS
    for name in names:  # each part holds exactly the local folder output's rows
        with fs.open(f"{bucket}/nightly/scores/{name}", "rb") as f:
            pd.testing.assert_frame_equal(pd.read_parquet(f), pd.read_parquet(local / name))
    table = pads.dataset(f"{bucket}/nightly/scores/", filesystem=fs, format="parquet").to_table()
    assert table.num_rows == 4 * MEMBERS  # the manifest (``_``) skipped, nothing else there
    assert not list((tmp_path / "work").rglob("*.parquet"))  # the local copy went once committed


@pytest.mark.slow
def test_a_killed_run_has_staged_its_parts_and_the_rerun_commits_in_place_of_the_earlier_output(
    moto_s3: MotoS3, bucket: str, shards: Path, checkpoint: Path, photo_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A first output of two shards; then four shards and a file whose decoder hangs (the tests' decoder
    faults), killed with SIGKILL once parts are staged: the folder still holds the first output whole; the
    rerun (no fault) resumes the staged parts without scoring them again and commits; the store ends with
    the new parts alone, nothing staged."""
    url, prefix = f"s3://{bucket}/scores/", f"{bucket}/scores/"
    two = tmp_path / "two"
    two.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (two / name).write_bytes((shards / name).read_bytes())
    code, _, err = cli(monkeypatch, capfd, checkpoint, f"{two}/*.tar", "-o", url)
    assert code == 0, err
    before = {k: store(moto_s3).cat_file(prefix + k) for k in keys(moto_s3, prefix)}
    hang = tmp_path / "hang-the-decoder.jpg"
    hang.write_bytes((photo_dir / "a_square.jpg").read_bytes())
    args = [EXE, "score", f"{shards}/*.tar", str(hang), "-t", "mem", "--checkpoint", str(checkpoint),
            "--batch-size", "1", "--workers", "0", "--device", "cpu", "-o", url,
            "--max-delete", "100%"]  # fmt: skip
    env = {**os.environ, **moto_s3.env, **QUICK, "PERCEPTSCORE_WORK": str(tmp_path / "work")}
    faults = {
        "PYTHONPATH": str(Path(__file__).parent / "decoder_faults"),
        "PERCEPTSCORE_TEST_DECODER_FAULTS": "1",
    }
    proc = subprocess.Popen(args, env={**env, **faults}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = lambda: [k for k in keys(moto_s3, prefix) if k.startswith(f"{RUN}/0")]  # noqa: E731
    assert until(lambda: len(staged()) >= 3 or proc.poll() is not None, 300), "parts staged as they complete"
    assert proc.poll() is None  # still at the hanging file
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    now = {k: store(moto_s3).cat_file(prefix + k) for k in keys(moto_s3, prefix) if not k.startswith(".")}
    assert now == before  # the earlier output untouched until the commit
    done = subprocess.run([*args, "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["resumed"] == 3 * MEMBERS  # the killed run's parts were not scored again
    expected = [MANIFEST, *(f"{n:05d}.parquet" for n in range(4)), "part-000000000004.parquet"]
    assert keys(moto_s3, prefix) == sorted(expected)
    manifest = json.loads(store(moto_s3).cat_file(prefix + MANIFEST))
    assert manifest["rows"] == 4 * MEMBERS + 1


def test_incremental_and_retry_errors_read_a_folder_in_the_store(
    moto_s3: MotoS3, bucket: str, shards: Path, checkpoint: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The nightly line: ``--incremental URL/ -o URL/`` reuses every unchanged row and replaces the folder;
    ``--retry-errors URL/`` takes its rows from it."""
    url, shard_glob = f"s3://{bucket}/scores/", f"{shards}/*.tar"
    code, _, err = cli(monkeypatch, capfd, checkpoint, shard_glob, "-o", url)
    assert code == 0, err
    (shards / "00004.tar").write_bytes((shards / "00000.tar").read_bytes())  # a new shard tonight
    code, out, err = cli(
        monkeypatch, capfd, checkpoint, shard_glob, "--incremental", url, "-o", url, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["reused"] == 4 * MEMBERS
    manifest = json.loads(store(moto_s3).cat_file(f"{bucket}/scores/{MANIFEST}"))
    assert manifest["rows"] == 5 * MEMBERS and len(manifest["parts"]) == 5
    retried = tmp_path / "retried.parquet"
    code, _, err = cli(monkeypatch, capfd, checkpoint, "--retry-errors", url, "-o", str(retried))
    assert code == 0, err
    assert len(pd.read_parquet(retried)) == 5 * MEMBERS


def test_a_commit_cut_short_is_finished_by_whoever_comes_next(
    moto_s3: MotoS3, bucket: str, tmp_path: Path
) -> None:
    """The journal is in the store: a commit killed after removing the manifest and one old part, before
    any copy, is carried out by the next ``finish_commit`` (the earlier output's other part removed, the
    staged parts copied, the manifest written, the staging prefix gone); a second call finds nothing."""
    fs, prefix = store(moto_s3), f"{bucket}/out/"
    fs.pipe({prefix + "old-a.parquet": b"old a", prefix + "keep.parquet": b"old keep"})
    body = {"perceptscore_parts": 1, "rows": 2, "errors": 0, "parts": [{"file": "keep.parquet"},
            {"file": "sub/new.parquet"}]}  # fmt: skip
    sizes = {"keep.parquet": 8, "sub/new.parquet": 3}
    journal = {"remove": ["old-a.parquet", "old-b.parquet", "keep.parquet"], "manifest": body,
               "move": ["keep.parquet", "sub/new.parquet"], "sizes": sizes}  # fmt: skip
    fs.pipe(
        {
            f"{prefix}{RUN}/keep.parquet": b"new keep",
            f"{prefix}{RUN}/sub/new.parquet": b"new",
            f"{prefix}{RUN}/{JOURNAL}": json.dumps(journal).encode(),
        }
    )  # fmt: skip  (old-b.parquet and the manifest: removed before the kill)
    folder = RemoteFolder(f"s3://{prefix}")
    assert folder.finish_commit()
    assert keys(moto_s3, prefix) == [MANIFEST, "keep.parquet", "sub/new.parquet"]
    assert (
        fs.cat_file(prefix + "keep.parquet") == b"new keep"
        and fs.cat_file(prefix + "sub/new.parquet") == b"new"
    )
    assert json.loads(fs.cat_file(prefix + MANIFEST)) == body
    assert not folder.finish_commit()
    # a part neither staged nor in place at its size (another run without a lock removed it): no manifest
    # that lies; the journal stays and says so
    journal["sizes"]["keep.parquet"] = 9
    fs.pipe({f"{prefix}{RUN}/{JOURNAL}": json.dumps(journal).encode()})
    with pytest.raises(UsageError, match=r"part keep\.parquet is not in place"):
        folder.finish_commit()
    assert MANIFEST not in keys(moto_s3, prefix) and f"{RUN}/{JOURNAL}" in keys(moto_s3, prefix)


def test_a_commit_cut_short_is_finished_before_the_earlier_output_is_guarded(
    moto_s3: MotoS3, bucket: str, shards: Path, checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A commit killed after removing its manifest: the next run finishes it first, so --max-delete still
    guards the earlier output's rows (a run that took the folder for new would replace them all)."""
    url, prefix = f"s3://{bucket}/scores/", f"{bucket}/scores/"
    code, _, err = cli(monkeypatch, capfd, checkpoint, f"{shards}/*.tar", "-o", url)
    assert code == 0, err
    fs = store(moto_s3)
    body = json.loads(fs.cat_file(prefix + MANIFEST))
    names = [p["file"] for p in body["parts"]]
    journal = {"remove": [], "move": names, "manifest": body,
               "sizes": {n: fs.info(prefix + n)["size"] for n in names}}  # fmt: skip
    fs.pipe({f"{prefix}{RUN}/{JOURNAL}": json.dumps(journal).encode()})
    fs.rm(prefix + MANIFEST)  # killed here
    code, _, err = cli(monkeypatch, capfd, checkpoint, str(shards / "00000.tar"), "-o", url)
    assert code == 2 and "--max-delete" in one_line(err)  # 9 of its 12 rows would go
    assert json.loads(fs.cat_file(prefix + MANIFEST)) == body  # the commit finished, nothing replaced
    assert f"{RUN}/{JOURNAL}" not in keys(moto_s3, prefix)  # (this run's part waits, staged, as its rows do)


def test_a_folder_in_a_store_is_refused_where_it_would_mix_or_lose_objects(
    moto_s3: MotoS3, bucket: str, shards: Path, checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    fs, shard_glob = store(moto_s3), f"{shards}/*.tar"
    fs.pipe(
        {
            f"{bucket}/theirs/notes.txt": b"someone else's",
            f"{bucket}/imgs/a.tar": (shards / "00000.tar").read_bytes(),
        }
    )
    for args, says in [
        ((shard_glob, "-o", f"s3://{bucket}/theirs/"), "not perceptscore's ('notes.txt')"),
        ((f"s3://{bucket}/imgs/", "-o", f"s3://{bucket}/imgs/scores/"), "inside the input"),
        ((shard_glob, "-o", f"s3://{bucket}/scores"), "end the URL with / for a folder of parts"),
        ((shard_glob, "-o", f"s3://{bucket}/night*/"), "no wildcard"),  # a delete would match others
    ]:
        code, _, err = cli(monkeypatch, capfd, checkpoint, *args)
        assert code == 2 and says in one_line(err), err
    assert keys(moto_s3, f"{bucket}/theirs/") == ["notes.txt"]  # nothing written beside their file
    assert keys(moto_s3, f"{bucket}/imgs/") == ["a.tar"]
    fs.pipe(
        {f"{bucket}/made/": b"", f"{bucket}/{MANIFEST}": b"{}"}
    )  # a console's "Create folder"; an output at the root
    with pytest.raises(UsageError, match="inside the perceptscore output"):
        RemoteFolder(f"s3://{bucket}/made/").check([])
    fs.rm(f"{bucket}/{MANIFEST}")
    assert RemoteFolder(f"s3://{bucket}/made/").check([]) is False  # the folder marker is no one's file
