"""Remote inputs and outputs against real servers on 127.0.0.1: an HTTP server that fails the ways remote
stores fail, and moto's S3 API server. Every remote row scores as the same bytes from a local file does;
every failure is an error row that says what happened; an output never lands on an input, however spelled;
credentials given on the command line are never written anywhere."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import perceptscore

from servers import FaultyHTTPServer, MotoS3
from test_cli_score import EXE

# retries go on until an object's deadline (issue 21): a short one keeps failing rows quick
QUICK = {
    "PERCEPTSCORE_REMOTE_TIMEOUT": "2",
    "PERCEPTSCORE_REMOTE_TRIES": "2",
    "PERCEPTSCORE_REMOTE_DEADLINE": "6",
}


@pytest.fixture(scope="module")
def scorer(release_checkpoints) -> perceptscore.Scorer:  # type: ignore[no-untyped-def]
    return perceptscore.Scorer(
        "mem", {"mem": release_checkpoints["memorability"][0]}, device="cpu", workers=0
    )


@pytest.fixture
def http(http_server: FaultyHTTPServer, photo_dir: Path) -> FaultyHTTPServer:
    for photo in photo_dir.iterdir():
        http_server.files[f"/photos/{photo.name}"] = photo.read_bytes()
    yield http_server
    http_server.reset()


@pytest.fixture
def s3(moto_s3: MotoS3, photo_dir: Path, tmp_path: Path) -> tuple[MotoS3, str, dict[str, str]]:
    """A bucket of its own holding the test photos under photos/ (and a note that is no image), and the
    environment the CLI finds the server through."""
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    moto_s3.make_bucket(bucket)
    for photo in photo_dir.iterdir():
        moto_s3.put(bucket, f"photos/{photo.name}", photo.read_bytes())
    moto_s3.put(bucket, "photos/notes.txt", b"not an image")
    env = {**os.environ, **moto_s3.env, "PERCEPTSCORE_WORK": str(tmp_path / "work"), **QUICK}
    env.pop("AWS_PROFILE", None)
    return moto_s3, bucket, env


def score(env: dict[str, str], *args: str | Path, checkpoint: Path) -> subprocess.CompletedProcess[str]:
    command = [EXE, "score", *map(str, args), "-t", "mem", "--checkpoint", str(checkpoint), "--workers", "0"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_http_rows_score_as_local_bytes_and_failures_say_what_happened(
    scorer: perceptscore.Scorer, http: FaultyHTTPServer, photo_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for name, value in {**QUICK, "PERCEPTSCORE_MAX_FILE_BYTES": str(2 << 20)}.items():
        monkeypatch.setenv(name, value)
    photos = sorted(photo_dir.iterdir())
    http.stall.add("/stalled.jpg")
    http.drop.add("/dropped.jpg")
    http.forbidden.add("/forbidden.jpg")
    http.missing.add("/missing.jpg")
    http.flaky("/photos/a_square.jpg", 2)  # two 503s, then the file: retried
    http.no_length.add(f"/photos/{photos[1].name}")  # no Content-Length: streamed, still whole
    http.files["/endless.jpg"] = os.urandom(3 << 20)
    http.no_length.add("/endless.jpg")  # no length told, and over the limit: never read whole
    for name in ("/stalled.jpg", "/dropped.jpg", "/forbidden.jpg"):
        http.files[name] = photos[0].read_bytes()
    urls = [http.url(f"/photos/{p.name}") for p in photos]
    failing = [
        http.url(n)
        for n in ("/missing.jpg", "/forbidden.jpg", "/stalled.jpg", "/dropped.jpg", "/endless.jpg")
    ]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "\n".join([*urls, *failing, "foo://x/y.jpg", "gs://bucket/y.jpg"]) + "\n")

    got = scorer.score(str(manifest))
    local = scorer.score([str(p) for p in photos])
    n = len(photos)
    assert got["path"].tolist() == [*urls, *failing, "foo://x/y.jpg", "gs://bucket/y.jpg"]
    assert got["error"][:n].isna().all(), got["error"].tolist()
    np.testing.assert_allclose(got["memorability"][:n], local["memorability"], rtol=0, atol=1e-6)
    assert got["file_size"][:n].tolist() == [p.stat().st_size for p in photos]
    errors = got["error"][n:].tolist()
    assert re.fullmatch(r"timed out after \d+ tries", errors[2]), errors  # as many as fit the deadline
    assert re.fullmatch(r"connection dropped mid-transfer after \d+ tries", errors[3]), errors
    assert errors[:2] + errors[4:] == [
        "not found (HTTP 404)",
        "access denied (HTTP 403)",
        f"over the limit of {2 << 20} bytes",
        "unsupported URL scheme foo://",
        "gs:// needs its fsspec backend: pip install 'perceptscore[gcs]'",
    ]


@pytest.mark.slow
def test_s3_prefix_to_s3_output_equals_the_local_run_and_incremental_sees_changes(
    s3: tuple[MotoS3, str, dict[str, str]], photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server, bucket, env = s3
    checkpoint = release_checkpoints["memorability"][0]
    local = tmp_path / "local.parquet"
    assert score(env, photo_dir, "-o", local, checkpoint=checkpoint).returncode == 0
    out = f"s3://{bucket}/out/scores.parquet"
    done = score(env, f"s3://{bucket}/photos/", "-o", out, checkpoint=checkpoint)
    assert done.returncode == 0, done.stderr
    assert "ignored 1 file that is not an image" in done.stderr
    photos = [f"photos/{p.name}" for p in sorted(photo_dir.iterdir())]
    assert server.keys(bucket) == sorted([*photos, "photos/notes.txt", "out/scores.parquet"])  # no probe left
    remote = pq.read_table(io.BytesIO(server.get(bucket, "out/scores.parquet"))).to_pandas()
    expected = pd.read_parquet(local)
    assert remote["path"].tolist() == [f"s3://{bucket}/{key}" for key in photos]
    np.testing.assert_allclose(remote["memorability"], expected["memorability"], rtol=0, atol=1e-6)
    assert remote["file_size"].tolist() == expected["file_size"].tolist()
    assert not any((tmp_path / "work").rglob("*.parquet"))  # the work folder keeps nothing once uploaded

    server.put(bucket, photos[2], (photo_dir / "a_square.jpg").read_bytes())  # one object replaced
    done = score(env, f"s3://{bucket}/photos/", "--incremental", out, "-o", out, checkpoint=checkpoint)
    assert done.returncode == 0, done.stderr
    assert f"{len(photos) - 1} unchanged, reused" in done.stderr
    again = pq.read_table(io.BytesIO(server.get(bucket, "out/scores.parquet"))).to_pandas()
    assert again["memorability"][2] == pytest.approx(expected["memorability"][0], abs=1e-6)

    done = score(
        env, f"s3://{bucket}/photos/*.jpg", "-o", f"s3://{bucket}/out/jpegs.csv", checkpoint=checkpoint
    )
    assert done.returncode == 0, done.stderr
    assert {"out/jpegs.csv", "out/jpegs.csv.meta.json"} <= set(
        server.keys(bucket, "out/")
    )  # data and provenance
    rows = pd.read_csv(io.BytesIO(server.get(bucket, "out/jpegs.csv")))
    assert rows["path"].tolist() == [f"s3://{bucket}/{k}" for k in photos if k.endswith(".jpg")]


@pytest.mark.slow
def test_an_output_never_lands_on_an_input_however_spelled(
    s3: tuple[MotoS3, str, dict[str, str]], photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server, bucket, env = s3
    checkpoint = release_checkpoints["memorability"][0]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{photo_dir / 'a_square.jpg'}\n")
    before = manifest.read_bytes()
    done = score(env, manifest, "-o", f"file://{manifest}", checkpoint=checkpoint)
    assert done.returncode == 2 and "refusing to overwrite an input" in done.stderr, done.stderr
    assert manifest.read_bytes() == before

    server.put(bucket, "in/m.csv", f"path\ns3://{bucket}/photos/a_square.jpg\n".encode())
    done = score(env, f"s3://{bucket}/in/m.csv", "-o", f"S3A://{bucket}//in/m.csv", checkpoint=checkpoint)
    assert done.returncode == 2 and "refusing to overwrite an input" in done.stderr, done.stderr
    assert server.get(bucket, "in/m.csv").startswith(b"path\n")

    done = score(env, manifest, "-o", "https://example.invalid/scores.parquet", checkpoint=checkpoint)
    assert done.returncode == 2 and "outputs go to a local path or an object store" in done.stderr
    done = score(env, manifest, "-o", f"s3://no-such-bucket-{bucket}/s.parquet", checkpoint=checkpoint)
    assert done.returncode == 2 and f"cannot write to s3://no-such-bucket-{bucket}/s.parquet" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line, no traceback


@pytest.mark.slow
def test_storage_options_reach_the_backend_and_are_never_written(
    s3: tuple[MotoS3, str, dict[str, str]], release_checkpoints, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server, bucket, env = s3
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    bare = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    bare.pop("AWS_ENDPOINT_URL")
    options = f'{{"endpoint_url": "{server.endpoint}", "key": "testing", "secret": "{secret}"}}'
    out = f"s3://{bucket}/out/opt.csv"
    done = score(bare, f"s3://{bucket}/photos/a_square.jpg", "-o", out, "--storage-options", options,
                 checkpoint=release_checkpoints["memorability"][0])  # fmt: skip
    assert done.returncode == 0, done.stderr
    written = server.get(bucket, "out/opt.csv") + server.get(bucket, "out/opt.csv.meta.json")
    assert b"a_square.jpg" in written and secret.encode() not in written
    assert secret not in done.stderr + done.stdout
    for path in (tmp_path / "work").rglob("*"):
        assert path.is_dir() or secret.encode() not in path.read_bytes()
    done = score(
        bare,
        f"s3://{bucket}/photos/",
        "-o",
        tmp_path / "x.csv",
        checkpoint=release_checkpoints["memorability"][0],
    )
    assert done.returncode == 2  # without the options, no endpoint and no credentials: a one-line error
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_remote_shards_read_once_and_a_dropped_one_is_an_error_row(
    http: FaultyHTTPServer, photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    photos = sorted(photo_dir.iterdir())
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as archive:
        for n, photo in enumerate(photos):
            archive.add(photo, arcname=f"{n:05d}{photo.suffix}")
    http.files["/shards/00000.tar"] = body.getvalue()
    http.files["/shards/00001.tar"] = body.getvalue()
    http.drop.add("/shards/00001.tar")
    env = {**os.environ, **QUICK}
    out = tmp_path / "s.parquet"
    shards = http.url("/shards/{00000..00001}.tar")
    done = score(
        env, shards, "--processes", "2", "-o", out, checkpoint=release_checkpoints["memorability"][0]
    )
    assert done.returncode == 1, done.stderr
    rows = pd.read_parquet(out)
    good = rows[rows["shard"] == http.url("/shards/00000.tar")]
    assert good["error"].isna().all() and len(good) == len(photos)
    assert http.requests["GET", "/shards/00000.tar"] <= 2  # read once (a range or two), not once a member
    (dropped,) = rows.index[rows["path"] == http.url("/shards/00001.tar")]
    assert rows.loc[dropped, "error"].startswith("unreadable shard: connection dropped")


def test_a_failed_upload_keeps_the_scores_and_the_same_command_uploads_them_without_scoring(
    moto_s3: MotoS3, photo_dir: Path, release_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bucket disappears while the run scores: the upload fails in one line naming where the finished
    file is; once the bucket is back, the same command uploads that file and scores nothing."""
    from rich.console import Console

    from perceptscore.commands.score import score as run
    from perceptscore.errors import UsageError
    from perceptscore.plan import ScoreOptions
    from perceptscore.progress import Reporter

    for name, value in {**moto_s3.env, **QUICK, "PERCEPTSCORE_WORK": str(tmp_path / "work")}.items():
        monkeypatch.setenv(name, value)
    bucket = f"out-{uuid.uuid4().hex[:10]}"
    moto_s3.make_bucket(bucket)
    scored: list[int] = []

    class BucketGoesAway(Reporter):
        def advance(self, files: int, errors: int) -> None:
            scored.append(files)
            if len(scored) == 1:
                client = moto_s3.client()
                client.delete_object(Bucket=bucket, Key=".scores.parquet.lock")  # the run's lock object
                client.delete_bucket(Bucket=bucket)  # empty now: the probe was removed
            super().advance(files, errors)

    def reporter(kind: type[Reporter]):  # type: ignore[no-untyped-def]
        return lambda total: kind(Console(file=io.StringIO()), total)

    options = ScoreOptions(["mem"], {"mem": str(release_checkpoints["memorability"][0])}, device="cpu",
                           workers=0)  # fmt: skip
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in sorted(photo_dir.iterdir())[:5]:
        (photos / photo.name).write_bytes(photo.read_bytes())
    out = f"s3://{bucket}/scores.parquet"
    with pytest.raises(UsageError) as failed:
        run([str(photos)], out, options, reporter(BucketGoesAway))
    assert "the scores are complete in" in str(failed.value) and "without scoring again" in str(failed.value)
    assert sum(scored) == 5

    # the inputs changed meanwhile: the finished file is not uploaded as it is; its rows are reused
    # where a file is unchanged
    (photos / "z_new.jpg").write_bytes((photo_dir / "a_square.jpg").read_bytes())
    moto_s3.make_bucket(bucket)
    scored.clear()
    with pytest.raises(UsageError):
        run([str(photos)], out, options, reporter(BucketGoesAway))  # and its upload fails again
    assert sum(scored) == 6

    moto_s3.make_bucket(bucket)
    scored.clear()
    outcome = run([str(photos)], out, options, reporter(BucketGoesAway))
    assert scored == [] and outcome.rows == 6 and outcome.uploaded_earlier  # uploaded as it was
    table = pq.read_table(io.BytesIO(moto_s3.get(bucket, "scores.parquet")))
    assert table.column("path").to_pylist()[-1].endswith("z_new.jpg") and table.num_rows == 6
    assert not list((tmp_path / "work").rglob("*.parquet"))


def test_command_lines_in_lock_files_hide_storage_options_and_signed_queries() -> None:
    from perceptscore._text import redacted_command

    argv = ["perceptscore", "score", "https://u:pw@h/a.jpg?X-Amz-Signature=abc", "--storage-options",
            '{"secret": "s"}', "--storage-options={\"key\": \"k\"}", "-o", "out.parquet"]  # fmt: skip
    shown = "perceptscore score https://***@h/a.jpg?*** --storage-options *** --storage-options=***"
    assert redacted_command(argv) == shown + " -o out.parquet"


@pytest.mark.slow
def test_a_stop_does_not_wait_for_a_stalled_object(
    http: FaultyHTTPServer, photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    """SIGINT while objects stall: the run stops within seconds, rows scored so far saved, not after the
    stalled objects' deadlines (minutes with the default timeouts)."""
    import signal
    import time

    photos = sorted(photo_dir.iterdir())[:4]
    for n in range(4):
        http.stall.add(f"/stalled{n}.jpg")
        http.files[f"/stalled{n}.jpg"] = photos[0].read_bytes()
    urls = [http.url(f"/photos/{p.name}") for p in photos] + [http.url(f"/stalled{n}.jpg") for n in range(4)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "\n".join(urls) + "\n")
    out = tmp_path / "out.parquet"
    env = {**os.environ, "PERCEPTSCORE_SHARD_ROWS": "2"}  # the default timeouts: a stall costs minutes
    checkpoint = str(release_checkpoints["memorability"][0])
    # --device cpu: one process's shards of 2 rows (on a GPU host auto runs a process per GPU)
    command = [EXE, "score", str(manifest), "-t", "mem", "--checkpoint", checkpoint, "--workers", "0",
               "--batch-size", "2", "--device", "cpu", "-o", str(out)]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parts = out.with_name(f".{out.name}.parts")
    deadline = time.monotonic() + 120
    while (
        len(list(parts.glob("shard-*.parquet"))) < 2 and time.monotonic() < deadline and proc.poll() is None
    ):
        time.sleep(0.05)
    time.sleep(1)  # waiting on the stalled objects now
    proc.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - stopped < 15, "the stop waited for the stalled fetches"
    assert proc.returncode == 130 and "stopped by SIGINT: 4 rows saved" in stderr, stderr
    assert not out.exists()
