"""The Ray engine and ``perceptscore.ray.Scorer`` on a real local Ray cluster (conftest's ``ray_address``):
the same rows as the local engine, decoder faults as error rows, a killed driver resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perceptscore.formats import read_provenance
from perceptscore.scorer import Scorer as LocalScorer

from test_cli_score import EXE, run
from test_reliability import ENV, command, make_hostile_corpus, same_as_reference, shards

TASKS = ["memorability", "quality", "emotion"]


def score_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith(("memorability", "quality", "emotion")) and c != "emotion"]


def test_ray_engine_gives_the_local_engines_rows(
    ray_address: str, photo_dir: Path, checkpoint_args: list[str], tmp_path: Path
) -> None:
    """Real photos and every hostile input, three tasks at once: same paths, order, errors; values to 1e-6."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    expected = make_hostile_corpus(corpus, photo_dir / "a_square.jpg")
    args = ["score", photo_dir, corpus, "-t", ",".join(TASKS), *checkpoint_args, "--device", "cpu"]
    local = run(*args, "-o", tmp_path / "local.csv")
    ray = run(*args, "--engine", "ray", "--ray-address", ray_address, "-o", tmp_path / "ray.csv")
    assert ray.returncode == local.returncode == 1, ray.stderr  # the hostile files are error rows
    assert "Traceback" not in ray.stderr
    a = pd.read_csv(tmp_path / "local.csv", keep_default_na=False)
    b = pd.read_csv(tmp_path / "ray.csv", keep_default_na=False)
    assert len(a) == 6 + len(expected) and (a["error"] != "").sum() == 8
    for column in ("path", "error", "emotion", "file_size", "file_mtime_ns"):
        assert b[column].tolist() == a[column].tolist(), column
    ok = a["error"] == ""
    for column in score_columns(a):
        ours, theirs = b.loc[ok, column].astype(float), a.loc[ok, column].astype(float)
        np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    about = read_provenance(str(tmp_path / "ray.csv"))
    assert about["engine"] == "ray" and about["device"] == "ray (1 nodes, 2 CPUs, 0 GPUs); models on cpu"


def test_a_decoder_that_crashes_or_hangs_on_ray_is_one_error_row(
    ray_address: str, photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    shutil.copytree(photo_dir, folder)
    shutil.copy(photo_dir / "a_square.jpg", folder / "b_crash-the-decoder.jpg")
    shutil.copy(photo_dir / "a_square.jpg", folder / "d_hang-the-decoder.jpg")
    out = tmp_path / "out.csv"
    start = time.monotonic()
    done = subprocess.run(
        [EXE, "score", folder, "-t", "mem", "--checkpoint", f"mem={release_checkpoints['memorability'][0]}",
         "--device", "cpu", "--engine", "ray", "--ray-address", ray_address, "-o", out],
        env={**os.environ, "PERCEPTSCORE_DECODE_TIMEOUT": "3"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - start < 120
    df = pd.read_csv(out, keep_default_na=False)
    errors = dict(zip(df["path"].map(lambda p: Path(p).name), df["error"], strict=True))
    assert len(errors) == 8
    crashed = "the decoder crashed, or hung for 3 s, in its worker process"
    assert errors.pop("b_crash-the-decoder.jpg") == errors.pop("d_hang-the-decoder.jpg") == crashed
    assert set(errors.values()) == {""}


def test_sigterm_then_sigkill_of_the_driver_then_resume(
    ray_address: str, many_photos: Path, release_checkpoints, reference: pd.DataFrame, tmp_path: Path
) -> None:
    """SIGTERM stops after the current batch (ray.init's own handler would exit at once); SIGKILL once more
    than half the rows are saved; the resume gives the local engine's output and scores less than half of
    the files again."""
    out = tmp_path / "out.parquet"
    args = command(many_photos, release_checkpoints["memorability"][0], out, "--engine", "ray",
                   "--ray-address", ray_address)  # fmt: skip
    env = {**ENV, "PERCEPTSCORE_RAY_WINDOW_ROWS": "100"}  # three Ray Data runs, killed in one of them

    def started(at_least: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while proc.poll() is None and shards(out) < at_least and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert shards(out) >= at_least, "no progress in 240 s"
        return proc

    proc = started(3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped by SIGTERM:" in stderr and "Traceback" not in stderr
    proc = started(21)  # shards of up to 8 rows: past half of the 300 once SIGTERM's short one counts
    proc.kill()
    proc.communicate()
    assert not out.exists()
    done = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    same_as_reference(out, reference)
    resumed = read_provenance(str(out))["resumed_rows"]
    assert resumed > len(reference) / 2


def test_the_scorer_in_a_users_ray_pipeline(
    ray_address: str, photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    import perceptscore.ray

    checkpoints = {t: str(release_checkpoints[t][0]) for t in ("memorability", "emotion")}
    paths = [str(p) for p in sorted(photo_dir.iterdir())] + [str(tmp_path / "missing.jpg"), __file__]
    rows = [{"image": p, "n": i, "error": "theirs"} for i, p in enumerate(paths)]
    ray.init(address=ray_address, log_to_driver=False)
    try:
        ds = ray.data.from_items(rows).map_batches(
            perceptscore.ray.Scorer,
            fn_constructor_kwargs={"tasks": ["memorability", "emotion"], "checkpoints": checkpoints,
                                   "device": "cpu", "path_column": "image"},
            compute=ActorPoolStrategy(size=1), batch_size=3, batch_format="pyarrow",
        )  # fmt: skip
        got = ds.to_pandas().sort_values("n")  # Ray Data need not keep the order
    finally:
        ray.shutdown()
    want = LocalScorer(["memorability", "emotion"], checkpoints, device="cpu").score([*paths[:6], __file__])
    assert got["image"].tolist() == paths and got["n"].tolist() == list(range(len(paths)))
    assert got["input_error"].tolist() == ["theirs"] * len(paths)  # the input's own column, renamed
    assert got["error"][:6].isna().all()
    assert got["error"].tolist()[6:] == ["no such file", want["error"].iloc[6]]
    assert want["error"].iloc[6] == "not a recognised image format"
    for column in ["memorability", "emotion_confidence", *[c for c in want if c.startswith("emotion_")]]:
        np.testing.assert_allclose(
            got[column].to_numpy(float)[:6], want[column][:6].to_numpy(float), atol=1e-6
        )
    assert got["emotion"].tolist()[:6] == want["emotion"].tolist()[:6]


def test_the_scorer_keeps_its_input_batch_format(photo_dir: Path, release_checkpoints) -> None:
    """Without Ray: pandas in, pandas out; numpy dict in, numpy dict out; the rows match the local API."""
    import perceptscore.ray

    checkpoint = {"memorability": str(release_checkpoints["memorability"][0])}
    scorer = perceptscore.ray.Scorer("mem", checkpoint, device="cpu", decode_processes=1)
    paths = [str(photo_dir / "a_square.jpg"), "", str(photo_dir / "c_cat.webp")]
    want = LocalScorer(["memorability"], checkpoint, device="cpu").score([paths[0], paths[2]])
    frame = scorer(pd.DataFrame({"path": paths, "n": [1, 2, 3]}, index=[10, 11, 12]))
    assert isinstance(frame, pd.DataFrame) and list(frame.index) == [10, 11, 12]
    assert frame["error"].fillna("").tolist() == ["", "no path", ""] and frame["n"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(frame["memorability"].to_numpy()[[0, 2]], want["memorability"], atol=1e-6)
    numpy_batch = scorer({"path": np.array(paths, dtype=object), "n": np.array([1, 2, 3])})
    assert isinstance(numpy_batch["memorability"], np.ndarray)
    np.testing.assert_allclose(numpy_batch["memorability"][[0, 2]], want["memorability"], atol=1e-6)
    table = scorer(pa.table({"path": paths}))
    assert table.column_names == ["path", "memorability", "error"]
    with pytest.raises(Exception, match=r"no column 'path' in the batch \(it has: image\)"):
        scorer(pa.table({"image": paths}))
    with pytest.raises(Exception, match="the batch has both 'error' and 'input_error'"):
        scorer(pd.DataFrame({"path": paths, "error": [1, 2, 3], "input_error": [4, 5, 6]}))


def test_engine_usage_errors_are_one_line(
    checkpoint_args: list[str], photo_dir: Path, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    cases = {
        ("--engine", "ray", "--processes", "2"): "--processes is for the local engine",
        ("--ray-address", closed): "--ray-address needs --engine ray",
        ("--engine", "spark"): "unknown engine 'spark': use local or ray",
        ("--engine", "ray", "--ray-address", closed): f"cannot reach the Ray cluster at {closed}",
        ("--engine", "ray", "-o", "-"): "--engine ray needs a file output",
    }
    for extra, message in cases.items():
        start = time.monotonic()
        done = run("score", photo_dir, "-t", "mem", *checkpoint_args, "-o", tmp_path / "o.csv", *extra)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and time.monotonic() - start < 30


def test_weights_that_differ_on_a_node_stop_the_run_with_one_line(
    ray_address: str, photo_dir: Path, release_checkpoints
) -> None:
    """The actor's constructor refuses weights whose sha256 is not the driver's: the run ends with that
    one sentence (read back out of Ray's ActorDiedError), not Ray's traceback, and not a retry loop."""
    from perceptscore.engines.ray import RayEngine
    from perceptscore.errors import UsageError
    from perceptscore.plan import ScoreOptions, make_plan

    options = ScoreOptions(["memorability"], {"memorability": str(release_checkpoints["memorability"][0])})
    plan = make_plan(options, [str(photo_dir)])
    theirs = replace(plan.weights[0], sha256="0" * 64)  # what a driver with another file would plan
    plan = replace(plan, weights=(theirs,))
    start = time.monotonic()
    with RayEngine(ray_address) as engine, pytest.raises(UsageError) as raised:
        list(engine.run(plan, options.sources([str(photo_dir)])))
    assert str(raised.value) == (
        f"node {os.uname().nodename}: {plan.weights[0].path} is not the memorability weights the driver "
        "planned with (sha256 000000000000...): give every node the same file"
    )
    assert time.monotonic() - start < 120


def test_a_cluster_that_never_answers_or_never_starts_the_models_is_one_line(
    ray_address: str, checkpoint_args: list[str], photo_dir: Path, tmp_path: Path
) -> None:
    """Something that accepts connections but is no Ray head (ray.init would retry for ever), and model
    actors the cluster does not start in time (Ray Data would wait for ever): exit 2, saying which."""
    with socket.socket() as silent:
        silent.bind(("0.0.0.0", 0))
        silent.listen(8)  # accepts (the kernel does), never answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        done = subprocess.run(
            [EXE, "score", photo_dir, "-t", "mem", *checkpoint_args, "--engine", "ray", "--ray-address",
             address, "-o", tmp_path / "a.csv"],
            env={**os.environ, "PERCEPTSCORE_RAY_CONNECT_TIMEOUT": "5"}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
    assert done.returncode == 2 and f"error: no Ray cluster answered at {address} within 5 s" in done.stderr
    assert time.monotonic() - start < 60 and "Traceback" not in done.stderr
    done = subprocess.run(
        [
            EXE,
            "score",
            photo_dir,
            "-t",
            "mem",
            *checkpoint_args,
            "--engine",
            "ray",
            "--ray-address",
            ray_address,
            "-o",
            tmp_path / "b.csv",
        ],
        env={**os.environ, "PERCEPTSCORE_RAY_ACTOR_WAIT": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip  (an actor imports torch and loads its weights: more than a second)
    assert done.returncode == 2, done.stderr
    message = "error: no model actor could start within 1 s: the Ray cluster has no node with one CPU"
    assert message in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "b.csv").exists()


def test_ray_engine_scores_urls_and_tar_members_as_the_local_engine(
    ray_address: str, http_server, photo_dir: Path, checkpoint_args: list[str], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Remote objects are fetched in the decode tasks; a tar shard and a dataset's row groups are read by
    the workers. A missing object is an error row on Ray as locally; rows keep their columns."""
    import tarfile

    photos = sorted(photo_dir.iterdir())
    for photo in photos:
        http_server.files[f"/ray/{photo.name}"] = photo.read_bytes()
    http_server.missing.add("/ray/missing.jpg")
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        for n, photo in enumerate(photos):
            archive.add(photo, arcname=f"{n:05d}{photo.suffix}")
    manifest = tmp_path / "urls.csv"
    urls = [http_server.url(f"/ray/{p.name}") for p in photos] + [http_server.url("/ray/missing.jpg")]
    manifest.write_text("path\n" + "\n".join(urls) + "\n")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # ``datasets``' Image feature
    rows = [{"bytes": p.read_bytes(), "path": p.name} for p in photos] + [{"bytes": None, "path": "x.jpg"}]
    pq.write_table(pa.table({"image": pa.array(rows, image)}), tmp_path / "ds.parquet", row_group_size=3)
    try:
        args = ["score", manifest, shard, tmp_path / "ds.parquet", "-t", "memorability", *checkpoint_args[:2],
                "--device", "cpu"]  # fmt: skip
        local = run(*args, "-o", tmp_path / "local.csv")
        ray = run(*args, "--engine", "ray", "--ray-address", ray_address, "-o", tmp_path / "ray.csv")
    finally:
        http_server.reset()
    assert ray.returncode == local.returncode == 1, ray.stderr
    a = pd.read_csv(tmp_path / "local.csv", keep_default_na=False)
    b = pd.read_csv(tmp_path / "ray.csv", keep_default_na=False)
    assert len(a) == 3 * len(photos) + 2
    for column in ("path", "error", "file_size", "file_mtime_ns", "shard", "key", "row", "image_path"):
        assert b[column].tolist() == a[column].tolist(), column
    assert a["error"].tolist() == (
        [""] * len(photos)
        + ["not found (HTTP 404)"]
        + [""] * 2 * len(photos)
        + ["no image bytes in this row (it names 'x.jpg' only)"]
    )
    ok = a["error"] == ""
    np.testing.assert_allclose(
        b.loc[ok, "memorability"].astype(float), a.loc[ok, "memorability"].astype(float), atol=1e-6, rtol=0
    )


def test_the_driver_reads_no_image_bytes_of_shards_or_datasets(ray_address: str, tmp_path: Path) -> None:
    """bench/ray_driver.py, small: tar shards and a parquet dataset scored on Ray, the driver's bytes read
    counted (/proc/self/io) with its containers read by the workers, and with the driver reading them as
    before (the baseline, which shows the count sees image bytes). Same rows and scores either way."""
    done = subprocess.run(
        [sys.executable, "bench/ray_driver.py", "--address", ray_address, "--shards", "2", "--per-shard", "8",
         "--json"],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    before, now = result["driver reads (before)"], result["workers read (now)"]
    assert result["same_rows"] and now["rows"] == before["rows"] == 32 and now["errors"] == 0
    assert result["max_difference"] <= 1e-6
    assert before["read"] > 0.9 * result["image_bytes"]  # the driver read every image once
    assert now["read"] < 0.2 * result["image_bytes"]  # Ray's own traffic only


def test_the_driver_refuses_rows_lost_repeated_or_out_of_order() -> None:
    """``_Order``, the driver's check of what Ray returns: a plain item's row once, a container's rows
    numbered from 0 to the one marked last; a container may have none (an empty shard)."""
    from perceptscore.containers import ShardRows
    from perceptscore.engines.ray import _Order
    from perceptscore.items import Item
    from perceptscore.locators import LocalFile

    window = [
        Item(0, LocalFile("a")),
        Item(1, ShardRows("s1")),
        Item(2, ShardRows("s2")),
        Item(3, LocalFile("b")),
    ]

    def check(rows: list[tuple[int, int, bool]]) -> None:
        order = _Order(window)
        order.check(*map(list, zip(*rows, strict=True))) if rows else None
        order.finish()

    check([(0, 0, True), (1, 0, False), (1, 1, True), (2, 0, True), (3, 0, True)])
    check([(0, 0, True), (1, 0, True), (3, 0, True)])  # container 2 without rows
    for wrong in (
        [(0, 0, True), (1, 0, False), (1, 2, True), (3, 0, True)],  # a row of container 1 lost
        [(0, 0, True), (1, 0, False), (1, 0, False), (1, 1, True), (3, 0, True)],  # one twice
        [(0, 0, True), (1, 0, False), (3, 0, True)],  # container 1 cut short
        [(0, 0, True), (1, 0, False), (1, 1, False)],  # cut short at the end
        [(0, 0, True), (2, 0, True), (1, 0, True), (3, 0, True)],  # out of order
        [(0, 0, True), (1, 0, True)],  # plain item 3 never came
    ):
        with pytest.raises(RuntimeError):
            check(wrong)


def test_retry_errors_on_ray_keeps_a_repaired_shards_rows_in_order(
    ray_address: str, photo_dir: Path, checkpoint_args: list[str], tmp_path: Path
) -> None:
    """--retry-errors reads a repaired shard again on the driver (its intact rows are kept, not scored
    twice): kept and new rows of the shard go in member order, as the local engine puts them."""
    import tarfile

    photos = sorted(photo_dir.iterdir())
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        for n, photo in enumerate(photos):
            archive.add(photo, arcname=f"{n:05d}{photo.suffix}")
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) * 2 // 3])  # cut short: the first members scored, then an error
    base = ["score", "-t", "memorability", *checkpoint_args[:2], "--device", "cpu"]
    first = run(*base, shard, "-o", tmp_path / "first.parquet")
    assert first.returncode == 1, first.stderr
    shard.write_bytes(whole)
    local = run(*base, "--retry-errors", tmp_path / "first.parquet", "-o", tmp_path / "local.parquet")
    ray = run(*base, "--retry-errors", tmp_path / "first.parquet", "-o", tmp_path / "ray.parquet",
              "--engine", "ray", "--ray-address", ray_address)  # fmt: skip
    assert local.returncode == ray.returncode == 0, ray.stderr
    a, b = pd.read_parquet(tmp_path / "local.parquet"), pd.read_parquet(tmp_path / "ray.parquet")
    assert a["path"].tolist() == [f"tar://{n:05d}{p.suffix}::{shard}" for n, p in enumerate(photos)]
    assert b["path"].tolist() == a["path"].tolist()
