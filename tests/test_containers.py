"""Containers (a tar shard, a dataset's row group) are one item of many rows: a run's shards hold whole
containers only, so a run stopped anywhere resumes each container whole or not at all; a container
without rows leaves its item out of every shard, and the run still completes."""

from __future__ import annotations

import io
import signal
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perceptscore.columns import output_schema
from perceptscore.containers import ShardRows
from perceptscore.items import Item
from perceptscore.locators import LocalFile
from perceptscore.runs import ShardedRun
from perceptscore.tasks import get_task

from test_reliability import ENV, wait_for_shards

MEMBERS = 12  # more than a run's shard holds (ENV: 8 rows): a container's rows are held until it ends


@pytest.fixture(scope="module")
def tar_shards(many_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("tars")
    photos = sorted(many_photos.iterdir())[: 6 * MEMBERS]
    out = []
    for number in range(6):
        shard = folder / f"{number:05d}.tar"
        with tarfile.open(shard, "w") as archive:
            for offset, photo in enumerate(photos[number * MEMBERS : (number + 1) * MEMBERS]):
                archive.add(photo, arcname=f"{number:05d}{offset:04d}.jpg")
        out.append(shard)
    return out


def command(inputs: list[Path], checkpoint: Path, out: Path, *extra: str) -> list[str]:
    from test_cli_score import EXE

    # --device cpu: a resumed run's rows are compared to 1e-6 with an uninterrupted one's (fp32 CPU sums)
    return [EXE, "score", *map(str, inputs), "-t", "mem", "--checkpoint", str(checkpoint), "--batch-size",
            "4", "--workers", "1", "--device", "cpu", "-o", str(out), *extra]  # fmt: skip


def run_shards(out: Path) -> list[Path]:
    return sorted(out.with_name(f".{out.name}.parts").glob("shard-*.parquet"))


@pytest.mark.slow
def test_a_stopped_run_of_tar_shards_resumes_each_shard_whole(
    tar_shards: list[Path], release_checkpoints, tmp_path: Path
) -> None:
    checkpoint = release_checkpoints["memorability"][0]
    whole = subprocess.run(command(tar_shards, checkpoint, tmp_path / "whole.parquet"), env=ENV,
                           capture_output=True, text=True)  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out.parquet"
    args = command(tar_shards, checkpoint, out)
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_shards(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    saved = run_shards(out)
    assert saved and not out.exists()
    held: dict[str, int] = {}
    for part in saved:  # every tar shard's rows in one run shard, all of them
        for shard, rows in pd.read_parquet(part).groupby("shard").size().items():
            assert shard not in held, f"{shard} split between run shards"
            held[shard] = rows
    assert set(held.values()) == {MEMBERS}
    done = subprocess.run([*args, "--resume", "--json"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = pd.read_parquet(tmp_path / "whole.parquet"), pd.read_parquet(out)
    assert len(a) == 6 * MEMBERS and b["path"].tolist() == a["path"].tolist()
    # batches fall otherwise in a resumed run: float32 sums in another order
    np.testing.assert_allclose(b["memorability"], a["memorability"], atol=1e-6, rtol=0)
    assert b[["shard", "key"]].equals(a[["shard", "key"]])


def test_a_container_without_rows_is_in_no_shard_and_the_run_still_completes(tmp_path: Path) -> None:
    schema, out = output_schema([get_task("memorability")]), tmp_path / "s.parquet"
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    items = [
        Item(0, LocalFile(str(tmp_path / "a.jpg"))),
        Item(1, ShardRows(str(empty))),
        Item(2, LocalFile(str(tmp_path / "b.jpg"))),
    ]
    assert list(ShardRows(str(empty)).rows()) == []

    def row(path: str) -> dict[str, object]:
        return {"path": path, "memorability": 0.5, "error": None, "file_size": 1, "file_mtime_ns": 1}

    run = ShardedRun(out, schema, {"run": 1})
    fed = list(run.pending(items))
    assert [i.index for i in fed] == [0, 1, 2]
    run.add([0, 2], pa.RecordBatch.from_pylist([row(items[0].path), row(items[2].path)], schema=schema))
    tables = list(run.tables(3))  # item 1 is in no shard, and that is no gap to refuse
    assert [t.column("path").to_pylist() for t in tables] == [[items[0].path], [items[2].path]]
    again = ShardedRun(out, schema, {"run": 1})
    assert [i.index for i in again.pending(items)] == [1]  # read again on resume: it gives no rows again
    assert again.saved_rows == 2


def test_a_containers_rows_stay_held_until_it_ends(tmp_path: Path) -> None:
    """A flush in the middle of a container (a stop, the shard's row limit) writes what precedes it; a
    run resumed then reads the container again whole."""
    schema, out = output_schema([get_task("memorability")]), tmp_path / "s.parquet"
    shard = tmp_path / "00000.tar"
    items = [Item(0, LocalFile(str(tmp_path / "a.jpg"))), Item(1, ShardRows(str(shard)))]

    def rows(*paths: str) -> pa.RecordBatch:
        return pa.RecordBatch.from_pylist(
            [
                {"path": p, "memorability": 0.5, "error": None, "file_size": 1, "file_mtime_ns": 1}
                for p in paths
            ],
            schema=schema,
        )

    run = ShardedRun(out, schema, {"run": 1})
    list(run.pending(items))
    run.add([0, 1, 1], rows("a.jpg", "tar://x.jpg::s", "tar://y.jpg::s"))
    run.flush()  # as a stop does: the container may have more rows to come
    assert [pq.read_table(p).column("path").to_pylist() for p in run_shards(out)] == [["a.jpg"]]
    again = ShardedRun(out, schema, {"run": 1})
    assert [i.index for i in again.pending(items)] == [1]
    again.add([1, 1, 1], rows("tar://x.jpg::s", "tar://y.jpg::s", "tar://z.jpg::s"))
    assert [t.num_rows for t in again.tables(2)] == [1, 3]


def noise_shard_and_dataset(folder: Path, count: int) -> tuple[list[Path], int]:
    """A tar shard and a parquet dataset (``datasets``' Image layout) of the same noise JPEGs (~60 KB each:
    their bytes dwarf everything else a run reads); and the images' bytes in all."""
    import io

    from PIL import Image

    rng = np.random.default_rng(1)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    shard = folder / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        for n, data in enumerate(images):
            member = tarfile.TarInfo(f"{n:05d}.jpg")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = pa.table({"image": pa.array([{"bytes": d, "path": None} for d in images], image)})
    pq.write_table(rows, folder / "ds.parquet", row_group_size=max(1, count // 3))
    return [shard, folder / "ds.parquet"], 2 * sum(map(len, images))


def read_bytes() -> int:
    """Bytes read by this process's threads alive now (every read syscall; Arrow's reader threads among
    them). Not /proc/self/io: that adds the counts of children reaped meanwhile, decode workers too."""
    import os

    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/io") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
        except OSError:
            continue  # a thread that ended meanwhile
    return total


def test_the_scoring_process_reads_no_image_bytes_its_workers_do(release_checkpoints, tmp_path: Path) -> None:
    """Shards and datasets are read by the decode workers: the bytes this process's thread reads (the one
    that reads anything here) stay far below the images' size; with no workers (the same run, decoded
    here) they pass it, which shows the count sees them. The rows are the same either way."""
    from perceptscore.scorer import Scorer

    inputs, image_bytes = noise_shard_and_dataset(tmp_path, 24)
    checkpoint = {"memorability": str(release_checkpoints["memorability"][0])}
    frames, counted = [], []
    for workers in (0, 1):  # the first run also imports what a run needs (read from disk too)
        scorer = Scorer(["memorability"], checkpoint, device="cpu", batch_size=4, workers=workers)
        before = read_bytes()
        frames.append(scorer.score([str(p) for p in inputs]))
        counted.append(read_bytes() - before)
    here, in_workers = counted
    assert here > image_bytes and in_workers < 0.2 * image_bytes, (in_workers, here, image_bytes)
    b, a = frames
    assert len(a) == 48 and a["error"].isna().all()
    assert a["path"].tolist() == b["path"].tolist() and a["row"].equals(b["row"])
    np.testing.assert_array_equal(a["memorability"], b["memorability"])  # batched alike: the same bits


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_a_member_that_kills_or_hangs_its_worker_is_one_error_row(
    fault: str, release_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a shard read by a worker: the worker dies (SIGSEGV, as a decoder bug in C does) or hangs
    past the time limit on one member; that member is an error row, every other row is scored, in order."""
    import os
    import time

    import perceptscore.batches
    from perceptscore.scorer import Scorer

    inputs, _ = noise_shard_and_dataset(tmp_path, 10)
    shard = inputs[0]
    real = perceptscore.batches.decode
    with tarfile.open(shard) as archive:
        culprit = archive.extractfile("00006.jpg").read()  # type: ignore[union-attr]

    def faulty(f, *args):  # type: ignore[no-untyped-def]
        if f.getvalue() == culprit:
            if fault == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(3600)
        return real(f, *args)

    checkpoint = {"memorability": str(release_checkpoints["memorability"][0])}
    clean = Scorer(["memorability"], checkpoint, device="cpu", batch_size=3, workers=1).score([str(shard)])
    monkeypatch.setattr(perceptscore.batches, "decode", faulty)  # forked workers inherit it
    monkeypatch.setenv("PERCEPTSCORE_DECODE_TIMEOUT", "3")  # read when the scorer is made
    start = time.monotonic()
    df = Scorer(["memorability"], checkpoint, device="cpu", batch_size=3, workers=1).score([str(shard)])
    assert time.monotonic() - start < 120
    assert df["path"].tolist() == clean["path"].tolist() and len(df) == 10
    assert df["error"][6] == "the decoder crashed, or hung for 3 s, in its worker process"
    assert df["error"].drop(6).isna().all()
    ok = df["error"].isna()
    np.testing.assert_allclose(df.loc[ok, "memorability"], clean.loc[ok, "memorability"], atol=1e-6, rtol=0)


def test_a_shard_rewritten_between_a_stop_and_its_resume_is_refused(tmp_path: Path) -> None:
    """A run's shard holds a tar shard's rows; the shard is then written again (other members): resuming
    would keep rows of members that are gone and skip the new ones, so the run says its inputs changed."""
    from perceptscore.runs import InputsChanged

    schema, out = output_schema([get_task("memorability")]), tmp_path / "s.parquet"
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        for name in ("x0.jpg", "x1.jpg"):
            member = tarfile.TarInfo(name)
            member.size = 1
            archive.addfile(member, io.BytesIO(b"x"))
    items = [Item(0, ShardRows(str(shard)))]
    run = ShardedRun(out, schema, {"run": 1})
    list(run.pending(items))
    one = {"memorability": 0.5, "error": None, "file_size": 1, "file_mtime_ns": 1}
    rows = [{"path": f"tar://x{n}.jpg::{shard}", **one} for n in range(2)]
    run.add([0, 0], pa.RecordBatch.from_pylist(rows, schema=schema))
    run.flush(whole=True)
    assert [i.index for i in ShardedRun(out, schema, {"run": 1}).pending(items)] == []  # unchanged: done
    with tarfile.open(shard, "w") as archive:  # written again: other members, another size
        for name in ("y0.jpg", "y1.jpg", "y2.jpg"):
            member = tarfile.TarInfo(name)
            member.size = 1
            archive.addfile(member, io.BytesIO(b"y"))
    with pytest.raises(InputsChanged, match="other files than were scored"):
        list(ShardedRun(out, schema, {"run": 1}).pending(items))


def test_a_shards_rows_are_bit_identical_to_the_same_images_scored_loose(
    release_checkpoints, many_photos: Path, tmp_path: Path
) -> None:
    """A container's end takes no place in a batch: its rows are batched as loose files in the same order
    are, so on CPU fp32 the scores are the same bits (a batch of other rows can differ by an ulp: float
    sums run in another order), read here or by one worker, shards of 10 rows in batches of 4."""
    from perceptscore.scorer import Scorer

    photos = sorted(many_photos.iterdir())[:30]
    shards = []
    for number in range(3):
        shard = tmp_path / f"{number:05d}.tar"
        with tarfile.open(shard, "w") as archive:
            for offset, photo in enumerate(photos[number * 10 : (number + 1) * 10]):
                archive.add(photo, arcname=f"{number:05d}{offset:04d}.jpg")
        shards.append(str(shard))
    checkpoint = {"memorability": str(release_checkpoints["memorability"][0])}

    def scores(inputs: list[str], workers: int) -> np.ndarray:
        scorer = Scorer(
            ["memorability"], checkpoint, device="cpu", precision="fp32", batch_size=4, workers=workers
        )
        return scorer.score(inputs)["memorability"].to_numpy()

    loose = scores([str(p) for p in photos], 0)
    for workers in (0, 1):
        assert np.abs(scores(shards, workers) - loose).max() == 0.0, workers


@pytest.mark.slow
def test_processes_children_read_the_containers_this_process_reads_no_image_bytes(
    release_checkpoints, tmp_path: Path
) -> None:
    """``--processes 2``: a shard and a dataset's row groups go to the children as descriptions, read
    there; this process's threads read far less than the images' size, and the rows (with their own
    columns) are those of one local process, bit for bit (every container a whole number of batches)."""
    from perceptscore.engines.process import ProcessEngine
    from perceptscore.scorer import Scorer

    inputs, image_bytes = noise_shard_and_dataset(tmp_path, 24)
    checkpoint = {"memorability": str(release_checkpoints["memorability"][0])}
    scorer = Scorer(["memorability"], checkpoint, device="cpu", batch_size=4, workers=0)
    alone = scorer.score([str(p) for p in inputs])
    scorer.engine = ProcessEngine(2)  # type: ignore[assignment]
    before = read_bytes()
    shared = scorer.score([str(p) for p in inputs])
    assert read_bytes() - before < 0.2 * image_bytes
    assert len(shared) == 48 and shared["error"].isna().all()
    pd.testing.assert_frame_equal(shared, alone)


def test_processes_share_the_decode_workers_and_take_a_gpu_each(release_checkpoints) -> None:
    """Each child gets its share of the decode workers (not all of them each), and GPU k; more
    processes than GPUs is one line, not a CUDA error in a child."""
    from dataclasses import replace

    from perceptscore.engines.process import ProcessEngine
    from perceptscore.errors import UsageError
    from perceptscore.scorer import Scorer

    checkpoint = {"memorability": str(release_checkpoints["memorability"][0])}
    plan = Scorer(["memorability"], checkpoint, device="cpu", workers=6).plan
    assert [p.workers for p in ProcessEngine(2).child_plans(plan)] == [3, 3]
    assert [p.workers for p in ProcessEngine(4).child_plans(replace(plan, workers=0))] == [0] * 4
    on_gpus = ProcessEngine(2).child_plans(replace(plan, device="cuda"), gpus=2)
    assert [(p.device, p.workers) for p in on_gpus] == [("cuda:0", 3), ("cuda:1", 3)]
    with pytest.raises(UsageError, match="--processes 3: this machine has 2 GPUs"):
        ProcessEngine(3).child_plans(replace(plan, device="cuda"), gpus=2)


@pytest.mark.remote
def test_remote_objects_are_fetched_by_the_worker_that_decodes_them(
    release_checkpoints, http_server, tmp_path: Path
) -> None:
    """URLs: each chunk's objects are fetched in its decode worker: the server sees every GET come from a
    socket of a worker process, none from this one; with no workers, all from this one. Rows alike."""
    import os

    from PIL import Image

    from perceptscore.scorer import Scorer

    rng = np.random.default_rng(3)
    urls = []
    for n in range(12):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        http_server.files[f"/noise/{n:02d}.jpg"] = buffer.getvalue()
        urls.append(http_server.url(f"/noise/{n:02d}.jpg"))
    checkpoint = {"memorability": str(release_checkpoints["memorability"][0])}
    frames, askers = [], []
    try:
        for workers in (0, 1):
            scorer = Scorer(["memorability"], checkpoint, device="cpu", batch_size=4, workers=workers)
            http_server.fetched_by.clear()
            http_server.who_asks = True
            frames.append(scorer.score(urls))
            askers.append(list(http_server.fetched_by))
    finally:
        http_server.who_asks = False
    here, elsewhere = askers
    assert len(here) == len(urls) and set(here) == {os.getpid()}
    assert len(elsewhere) == len(urls) and os.getpid() not in elsewhere and -1 not in elsewhere
    assert frames[0]["error"].isna().all() and frames[0]["path"].tolist() == urls
    pd.testing.assert_frame_equal(frames[0], frames[1])


def test_the_batches_in_flight_fit_in_half_the_free_shared_memory() -> None:
    """Quality's 15 crops at 64 images are 144 MB a batch: 14 workers x 4 ahead would want 8 GB of
    /dev/shm; the workers decode fewer ahead (never under 1) so the batches in flight fit in half of it."""
    from perceptscore.engines.local import PREFETCH, batch_bytes, prefetch_for
    from perceptscore.tasks import get_task

    quality = [get_task("quality").preprocess]
    per_batch = batch_bytes(quality, 64)
    assert per_batch == 64 * 15 * 3 * 224 * 224
    assert prefetch_for(per_batch, 14, 4 << 30) == 1  # 2 GB / (14 x 144 MB) < 2: one each
    assert prefetch_for(per_batch, 14, 64 << 30) == PREFETCH  # room for all of them
    assert prefetch_for(per_batch, 2, 2 << 30) == 3  # 1 GB / (2 x 144 MB)
    assert prefetch_for(per_batch, 0, 1) == PREFETCH and prefetch_for(per_batch, 4, None) == PREFETCH
