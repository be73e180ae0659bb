"""Containers (a tar shard, a dataset's row group) are one item of many rows: a run's shards hold whole
containers only, so a run stopped anywhere resumes each container whole or not at all; a container
without rows leaves its item out of every shard, and the run still completes."""

from __future__ import annotations

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

    return [EXE, "score", *map(str, inputs), "-t", "mem", "--checkpoint", str(checkpoint), "--batch-size",
            "4", "--workers", "1", "-o", str(out), *extra]  # fmt: skip


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
