"""Cron-grade behaviour with real processes: kills and resumes, locks, incremental runs, hostile inputs."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import perceptscore.batches
from perceptscore.scorer import Scorer

from photos import sample
from test_cli_score import EXE, run

ENV = {**os.environ, "PERCEPTSCORE_SHARD_ROWS": "8"}  # small shards: many points to die between


def command(folder: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    # --device cpu: the reference (conftest) and every run compared with it score the same way on a GPU host
    return [EXE, "score", str(folder), "-t", "mem", "--checkpoint", str(checkpoint), "--batch-size", "4",
            "--workers", "1", "--device", "cpu", "-o", str(out), *extra]  # fmt: skip


def shards(out: Path) -> int:
    return len(list(out.with_name(f".{out.name}.parts").glob("shard-*.parquet")))


def wait_for_shards(proc: subprocess.Popen, out: Path, count: int, limit: float = 120) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + limit
    while proc.poll() is None and shards(out) < count and time.monotonic() < deadline:
        time.sleep(0.005)


FEWER = 120  # 15 shards of 8 rows: room to stop a run at any of the points below, and 180 fewer rows a run


@pytest.fixture(scope="module")
def fewer_photos(many_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first FEWER of ``many_photos`` (hard links, the same files) for the kill-and-resume runs."""
    folder = tmp_path_factory.mktemp("fewer")
    for p in sorted(many_photos.iterdir())[:FEWER]:
        os.link(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def fewer_reference(fewer_photos: Path, reference: pd.DataFrame) -> pd.DataFrame:
    """``reference``'s first FEWER rows under ``fewer_photos``' paths: the same files, scored in the same
    batches of 4 from the first row (FEWER is a multiple of 4), so the same scores."""
    rows = reference.iloc[:FEWER].copy()
    rows["path"] = [str(fewer_photos / Path(p).name) for p in rows["path"]]
    assert rows["path"].tolist() == [str(p) for p in sorted(fewer_photos.iterdir())]
    return rows


def same_as_reference(out: Path, reference: pd.DataFrame) -> None:
    df = pd.read_parquet(out)
    assert df["path"].tolist() == reference["path"].tolist()  # every row once, in input order
    assert not df["path"].duplicated().any()
    np.testing.assert_allclose(df["memorability"], reference["memorability"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(
    fewer_photos: Path, release_checkpoints, fewer_reference, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    args = command(fewer_photos, release_checkpoints["memorability"][0], out, "--resume")
    rng = random.Random(20261129)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_shards(proc, out, shards(out) + rng.randint(1, 8))
        time.sleep(rng.uniform(0, 0.05))  # anywhere: mid-batch, mid-shard-write
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
        assert not out.exists()  # nothing under the output name until the run is complete
    assert kills >= 2
    done = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stderr
    same_as_reference(out, fewer_reference)
    assert (
        not out.with_name(f".{out.name}.parts").exists() and not out.with_name(f".{out.name}.lock").exists()
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_sigterm_and_sigint_stop_cleanly_and_resume(
    fewer_photos: Path, release_checkpoints, fewer_reference, tmp_path: Path, sig: int
) -> None:
    out = tmp_path / "out.parquet"
    args = command(fewer_photos, release_checkpoints["memorability"][0], out)
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_shards(proc, out, 3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert (
        f"stopped by {signal.Signals(sig).name}:" in stderr
        and "run the same command again to continue" in stderr
    )
    assert "Traceback" not in stderr and not out.exists()
    done = subprocess.run([*args, "--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    same_as_reference(out, fewer_reference)


@pytest.mark.slow
def test_resume_refuses_changed_inputs(many_photos: Path, release_checkpoints, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(many_photos.iterdir())[:40]:
        (photos / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out.parquet"
    args = command(photos, release_checkpoints["memorability"][0], out, "--resume")
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_shards(proc, out, 2)
    proc.kill()
    proc.wait()
    (photos / "0000.jpg").rename(photos / "zzzz.jpg")  # every later row moves up one place
    done = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2
    assert "the inputs changed since the interrupted run (rows 0-7 are other files" in done.stderr


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused_and_a_dead_runs_lock_taken_over(
    many_photos: Path, release_checkpoints, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    args = command(many_photos, release_checkpoints["memorability"][0], out)
    first = subprocess.Popen(
        [*args, "--batch-size", "1"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_shards(first, out, 1)
    start = time.monotonic()
    second = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert second.returncode == 2
    assert f"out.parquet is being written by another run (pid {first.pid} on" in second.stderr
    refused = time.monotonic() - start
    start = time.monotonic()
    subprocess.run([EXE, "--version"], env=ENV, capture_output=True)  # the interpreter and imports alone
    baseline = time.monotonic() - start
    # at once: the lock is taken before any model is loaded (relative to the imports: a loaded machine)
    assert refused < baseline + 3, (refused, baseline)
    assert first.poll() is None  # the first run was really still running
    first.kill()
    first.wait()
    lock = out.with_name(f".{out.name}.lock")
    assert str(first.pid) in lock.read_text()  # the dead run's lock file is still there
    third = subprocess.run([*args, "--resume"], env=ENV, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr
    assert len(pd.read_parquet(out)) == 300


@pytest.mark.slow
def test_incremental_scores_only_new_and_changed_files(
    many_photos: Path, release_checkpoints, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(many_photos.iterdir())[:30]:
        (photos / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "scores.parquet"
    checkpoint = release_checkpoints["memorability"][0]
    assert subprocess.run(command(photos, checkpoint, out), env=ENV, capture_output=True).returncode == 0
    before = pd.read_parquet(out).set_index("path")["memorability"]
    (photos / "0003.jpg").write_bytes((many_photos / "0100.jpg").read_bytes())  # changed content
    (photos / "0007.jpg").unlink()  # gone
    (photos / "0500.jpg").write_bytes((many_photos / "0200.jpg").read_bytes())  # new
    done = subprocess.run(
        command(photos, checkpoint, out, "--incremental", str(out)), env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "2 scored, 0 errors, 28 reused" in done.stderr and "28 unchanged, reused from" in done.stderr
    after = pd.read_parquet(out)
    assert after["path"].tolist() == sorted(str(p) for p in photos.iterdir())
    new = after.set_index("path")["memorability"]
    unchanged = [p for p in new.index if Path(p).name not in {"0003.jpg", "0500.jpg"}]
    assert (new[unchanged] == before[unchanged]).all()  # reused exactly, not rescored
    assert new[str(photos / "0003.jpg")] != before[str(photos / "0003.jpg")]


def make_hostile_corpus(folder: Path, good: Path) -> dict[str, str]:
    """Every hostile input the issue lists; returns name -> how its error starts ("" when it is scored)."""
    data = good.read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "trunc_header.jpg").write_bytes(data[:100])
    (folder / "trunc_body.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("just text")
    (folder / "random.png").write_bytes(os.urandom(4096))
    Image.new("1", (14000, 14000)).save(folder / "bomb.png")  # 196 Mpx: over Pillow's refusal limit
    Image.new("RGB", (1, 1), "red").save(folder / "one_pixel.png")
    Image.new("RGB", (10000, 8), "blue").save(folder / "sliver.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 13 % 65535).astype(np.uint16)).save(
        folder / "deep16.png"
    )
    Image.fromarray(np.random.default_rng(0).random((64, 64), dtype=np.float32)).save(folder / "float.tif")
    img = sample("coffee.png").resize((120, 80))
    img.convert("CMYK").save(folder / "cmyk.jpg")
    img.convert("P").save(folder / "palette.png")
    frames = [img.convert("P"), img.rotate(90).convert("P")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    img.convert("RGBA").save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(folder / "rotated.jpg", exif=exif)
    os.symlink(folder / "missing.jpg", folder / "dangling.jpg")
    (folder / "loop").mkdir()
    os.symlink(folder / "loop", folder / "loop" / "again")
    (folder / "folder.jpg").mkdir()
    img.save(folder / "with space é ü.jpg")
    img.save(folder / "UPPER.JPEG")
    img.save(folder / "no_extension", format="PNG")  # crawled collections name files by hash: sniffed
    (folder / "README").write_text("not an image, and no extension either")
    (folder / "notes.txt").write_text("an extension that is not an image's")
    os.mkfifo(folder / "fifo.jpg")  # opening it would block forever
    os.mkfifo(folder / "fifo_no_extension")  # never opened to be sniffed
    unreadable, unknown = "unreadable image", "not a recognised image format"
    errors = {
        "empty.jpg": "empty file", "trunc_header.jpg": unreadable, "trunc_body.jpg": unreadable,
        "text.jpg": unknown, "random.png": unknown, "bomb.png": "refused: decompression bomb",
        "dangling.jpg": "no such file", "fifo.jpg": "not a regular file",
    }  # fmt: skip
    scored = ["one_pixel.png", "sliver.png", "deep16.png", "float.tif", "cmyk.jpg", "palette.png",
              "animated.gif", "rgba.png", "rotated.jpg", "with space é ü.jpg", "UPPER.JPEG",
              "no_extension"]  # fmt: skip
    return errors | dict.fromkeys(scored, "")


@pytest.mark.slow
def test_every_hostile_input_is_a_row_or_a_reported_skip(
    photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    expected = make_hostile_corpus(corpus, photo_dir / "a_square.jpg")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path\n{corpus / 'rgba.png'}\nnot/there.jpg\n{corpus / 'no_extension'}\n")
    out = tmp_path / "out.csv"
    start = time.monotonic()
    done = run(
        "score",
        corpus,
        manifest,
        "-t",
        "mem",
        "--checkpoint",
        release_checkpoints["memorability"][0],
        "-o",
        out,
    )
    assert time.monotonic() - start < 120
    assert done.returncode == 1, done.stderr
    ignored = sorted(str(corpus / name) for name in ("README", "fifo_no_extension", "notes.txt"))
    assert f"ignored 3 files that are not images: {', '.join(ignored)})" in done.stderr
    df = pd.read_csv(out, keep_default_na=False)
    names = [Path(p).name for p in df["path"]]
    assert sorted(names[: len(expected)]) == sorted(expected)  # one row per file of the folder
    for name, error in zip(names[: len(expected)], df["error"], strict=False):
        assert (
            df["error"].tolist()[names.index(name)].startswith(expected[name])
            if expected[name]
            else not error
        )
    tail = df.iloc[len(expected) :]
    assert [Path(p).name for p in tail["path"]] == ["rgba.png", "there.jpg", "no_extension"]
    assert tail["error"].tolist() == ["", "no such file", ""]  # a named file is scored whatever its name


@pytest.mark.slow
def test_a_decoder_that_kills_its_worker_becomes_an_error_row(
    photo_dir: Path, release_checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = perceptscore.batches.decode

    def crashing(f, *args):  # type: ignore[no-untyped-def]
        if f.name.endswith("c_cat.webp"):
            os.kill(os.getpid(), signal.SIGSEGV)  # what a decoder bug in C does to its process
        return real(f, *args)

    monkeypatch.setattr(perceptscore.batches, "decode", crashing)  # forked workers inherit it
    checkpoint = {"memorability": str(release_checkpoints["memorability"][0])}
    df = Scorer(["memorability"], checkpoint, device="cpu", batch_size=2, workers=1).score([str(photo_dir)])
    assert df["path"].tolist() == [str(p) for p in sorted(photo_dir.iterdir())]
    errors = df.set_index(df["path"].map(lambda p: Path(p).name))["error"]
    assert errors["c_cat.webp"].startswith("the decoder crashed, or hung for")
    assert errors.drop("c_cat.webp").isna().all()


@pytest.mark.slow
def test_a_decoder_that_hangs_becomes_an_error_row(
    photo_dir: Path, release_checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = perceptscore.batches.decode

    def hanging(f, *args):  # type: ignore[no-untyped-def]
        if f.name.endswith("d_portrait.jpg"):
            time.sleep(3600)  # a decoder stuck in a loop on a hostile file
        return real(f, *args)

    monkeypatch.setattr(perceptscore.batches, "decode", hanging)
    monkeypatch.setenv("PERCEPTSCORE_DECODE_TIMEOUT", "3")  # read when the engine starts
    checkpoint = {"memorability": str(release_checkpoints["memorability"][0])}
    start = time.monotonic()
    df = Scorer(["memorability"], checkpoint, device="cpu", batch_size=2, workers=1).score([str(photo_dir)])
    assert time.monotonic() - start < 60
    errors = df.set_index(df["path"].map(lambda p: Path(p).name))["error"]
    assert errors["d_portrait.jpg"] == "the decoder crashed, or hung for 3 s, in its worker process"
    assert errors.drop("d_portrait.jpg").isna().all() and len(df) == 6


@pytest.mark.slow
def test_a_full_disk_is_a_clear_error_and_leaves_no_complete_looking_file(
    many_photos: Path, release_checkpoints, tmp_path: Path
) -> None:
    """RLIMIT_FSIZE makes writes past 20 kB fail as a full disk would: the shards fit, the final file not."""

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "out.csv"
    # --workers 0: the limit would also stop the shared-memory files workers pass batches through
    args = [*command(many_photos, release_checkpoints["memorability"][0], out), "--workers", "0"]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: cannot write '{out}': File too large")
    assert not out.exists() and not list(tmp_path.glob(".out.csv.partial*"))
    done = subprocess.run([*args, "--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "300 resumed" in done.stderr and len(pd.read_csv(out)) == 300


@pytest.mark.parametrize("folder", ["/sys", "/proc"])
def test_an_unwritable_output_folder_is_one_line(folder: str, photo_dir: Path, release_checkpoints) -> None:
    """/sys and /proc refuse new files even to root: real unwritable folders without changing users."""
    out = f"{folder}/scores.parquet"
    done = run(
        "score",
        photo_dir / "a_square.jpg",
        "-t",
        "mem",
        "--checkpoint",
        release_checkpoints["memorability"][0],
        "-o",
        out,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: cannot write in {folder}: ") and "Traceback" not in done.stderr


@pytest.mark.slow
def test_several_processes_give_the_single_process_output(
    fewer_photos: Path, release_checkpoints, fewer_reference, tmp_path: Path
) -> None:
    """--processes 2 (one per GPU on CUDA; here on CPU): alternate blocks of rows each, assembled in order."""
    out = tmp_path / "out.parquet"
    args = [
        *command(fewer_photos, release_checkpoints["memorability"][0], out),
        "--device",
        "cpu",
        "--processes",
        "2",
    ]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    same_as_reference(out, fewer_reference)
    assert json.loads(pq.read_schema(out).metadata[b"perceptscore"])["device"] == "2 processes on cpu"


@pytest.mark.slow
def test_sigterm_reaches_every_process_and_the_run_resumes(
    fewer_photos: Path, release_checkpoints, fewer_reference, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    args = [
        *command(fewer_photos, release_checkpoints["memorability"][0], out),
        "--device",
        "cpu",
        "--processes",
        "2",
    ]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_shards(proc, out, 4)
    proc.terminate()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and not out.exists()
    done = subprocess.run([*args, "--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    same_as_reference(out, fewer_reference)


@pytest.mark.slow
def test_with_processes_an_input_that_fails_mid_stream_is_one_line_not_a_hang(
    release_checkpoints, tmp_path: Path
) -> None:
    """The items are dealt to the processes by a thread: an input error after blocks were dealt must end
    the run with its one line (it hung: the children waited for input that never came)."""
    manifest = tmp_path / "manifest.csv"
    rows = [f"missing/{i:08d}/{'x' * 60}.jpg,{i}" for i in range(24_000)]  # past pyarrow's first 1 MB block
    manifest.write_text("path,id\n" + "\n".join(rows) + "\nmissing/extra.jpg,1,2\n")  # one field too many
    out = tmp_path / "out.parquet"
    checkpoint = str(release_checkpoints["memorability"][0])
    args = [EXE, "score", str(manifest), "-t", "mem", "--checkpoint", checkpoint, "--device", "cpu",
            "--processes", "2", "--workers", "0", "-o", str(out)]  # fmt: skip
    quiet = {**ENV, "PERCEPTSCORE_LOG_EVERY": "3600"}  # a loaded machine's progress line: not the point
    done = subprocess.run(args, env=quiet, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: manifest {manifest}: unreadable after row ") and "Traceback" not in line
    assert not out.exists()


@pytest.mark.slow
def test_a_stop_sent_to_the_whole_process_group_stops_cleanly_and_resumes(
    fewer_photos: Path, release_checkpoints, fewer_reference, tmp_path: Path
) -> None:
    """systemd and `kill -TERM -PGID` signal every process of the group, the scoring children too."""
    out = tmp_path / "out.parquet"
    args = [*command(fewer_photos, release_checkpoints["memorability"][0], out), "--device", "cpu",
            "--processes", "2"]  # fmt: skip
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    wait_for_shards(proc, out, 4)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr and not out.exists()
    done = subprocess.run([*args, "--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    same_as_reference(out, fewer_reference)
