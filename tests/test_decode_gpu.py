"""``--decode gpu`` on the CPU: decode workers only read plain JPEGs, the scoring process decodes each
batch with ``tv_decode`` (libjpeg-turbo here; batched nvJPEG on a GPU, measured by bench/gpu_check.py).

Compared with ``--decode cpu`` on one mixed input (JPEGs, a PNG, a truncated JPEG, a text file named .jpg,
and a tar shard holding some of them): the same paths and error rows; non-JPEG rows bit for bit the same
(their worker decodes them with Pillow, as ever); JPEG rows within ``MEMORABILITY_LIMIT`` (tv_decode's
resize is within one grey level of Pillow's on the CPU: with the tiny test model that moved memorability by
at most 7e-6, against a spread of 0.06 between these photos). Quality's crops are seeded by the file's
bytes under ``--decode gpu`` (tv_decode's docstring), so its JPEG rows are checked against tv_decode's own
crops instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from perceptscore import tv_decode
from perceptscore.batches import Decoded, read_item
from perceptscore.checkpoints import load_model
from perceptscore.cli import app
from perceptscore.errors import UsageError
from perceptscore.hub import Weights
from perceptscore.items import Item
from perceptscore.locators import locate
from perceptscore.plan import ScoreOptions, make_plan
from perceptscore.predict import raw_outputs
from perceptscore.scorer import Scorer
from perceptscore.tasks import get_task

MEMORABILITY_LIMIT = 1e-4  # max |gpu - cpu| on JPEG rows (observed: 6.9e-6)
JPEGS = ("a_square.jpg", "d_portrait.jpg", "e_panorama.jpg")
SHARD = ("a_square.jpg", "b_landscape.png", "g_truncated.jpg")
DECODER_FAULTS = Path(__file__).parent / "decoder_faults"
EXE = [sys.executable, "-m", "perceptscore"]


@pytest.fixture(scope="module")
def mixed(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """photos/: three JPEGs, a PNG, a truncated JPEG (Pillow refuses it; torchvision too, so it goes to
    the isolated decoder), a text file named .jpg; shard.tar: a JPEG, the PNG and the truncated JPEG."""
    root = tmp_path_factory.mktemp("mixed")
    photos = root / "photos"
    photos.mkdir()
    for name in (*JPEGS, "b_landscape.png"):
        (photos / name).write_bytes((photo_dir / name).read_bytes())
    good = (photo_dir / "a_square.jpg").read_bytes()
    (photos / "g_truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "h_text.jpg").write_bytes(b"not an image at all")
    with tarfile.open(root / "shard.tar", "w") as tar:
        for name in SHARD:
            tar.add(photos / name, arcname=name)
    return root


def score(
    root: Path, checkpoint_args: list[str], out: Path, *extra: str, tasks: str = "mem,iqa"
) -> pd.DataFrame:
    result = CliRunner().invoke(
        app,
        ["score", "photos", "shard.tar", "-t", tasks, *checkpoint_args, "--device", "cpu", "--workers", "1",
         "--batch-size", "4", "-o", str(out), "-q", *extra],
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # the finished run's code when some rows are errors
    return pd.read_parquet(out)


@pytest.fixture(scope="module")
def both(mixed: Path, checkpoint_args: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """The same input scored with --decode cpu and --decode gpu (paths as given, relative to ``mixed``)."""
    before = os.getcwd()
    os.chdir(mixed)
    try:
        cpu = score(mixed, checkpoint_args, mixed / "cpu.parquet")
        gpu = score(mixed, checkpoint_args, mixed / "gpu.parquet", "--decode", "gpu")
    finally:
        os.chdir(before)
    return cpu, gpu, mixed / "gpu.parquet"


def errors(rows: pd.DataFrame) -> list[str | None]:
    return [e if isinstance(e, str) else None for e in rows["error"]]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort(), b.argsort().argsort()
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.slow
def test_gpu_decode_gives_the_same_rows_and_errors_as_cpu_decode(both) -> None:
    cpu, gpu, _ = both
    assert gpu["path"].tolist() == cpu["path"].tolist()
    assert errors(gpu) == errors(cpu)
    by_path = dict(zip(gpu["path"], errors(gpu), strict=True))
    assert by_path["photos/g_truncated.jpg"].startswith("unreadable image: image file is truncated")  # type: ignore[union-attr]
    assert by_path["tar://g_truncated.jpg::shard.tar"] == by_path["photos/g_truncated.jpg"]
    assert by_path["photos/h_text.jpg"] == "not a recognised image format"
    assert sum(e is not None for e in by_path.values()) == 3
    jpeg = gpu["path"].str.contains(".jpg", regex=False) & gpu["error"].isna()
    assert jpeg.sum() == 4  # three in the folder, one in the shard
    diff = np.abs(gpu.loc[jpeg, "memorability"] - cpu.loc[jpeg, "memorability"]).to_numpy()
    assert diff.max() <= MEMORABILITY_LIMIT
    ok = gpu["error"].isna()
    assert spearman(gpu.loc[ok, "memorability"].to_numpy(), cpu.loc[ok, "memorability"].to_numpy()) == 1.0
    png = gpu["path"].str.contains(
        ".png", regex=False
    )  # decoded by its worker with Pillow under both settings
    for column in ("memorability", "quality", "quality_raw"):
        assert gpu.loc[png, column].tolist() == cpu.loc[png, column].tolist(), column


@pytest.mark.slow
def test_quality_crops_of_jpegs_are_seeded_by_their_bytes(both, mixed: Path, release_checkpoints) -> None:
    """Each JPEG's quality is the model's mean over the crops tv_decode cuts for its bytes: computed here
    through tv_decode and the model directly, not through the engine."""
    _, gpu, _ = both
    task = get_task("quality")
    model = load_model("quality", release_checkpoints["quality"][0], device="cpu", precision="fp32")
    for name in JPEGS:
        data = (mixed / "photos" / name).read_bytes()
        (prepared,) = tv_decode.decode_batch([data], [task.preprocess])
        raw = raw_outputs(
            model, task, prepared.pixels[task.preprocess], torch.device("cpu"), torch.float32, 4
        )
        row = gpu[gpu["path"] == f"photos/{name}"].iloc[0]
        assert row["quality_raw"] == pytest.approx(float(raw[0, 0]), abs=1e-6), name


@pytest.mark.slow
def test_the_decoder_is_recorded_and_the_api_gives_the_cli_rows(
    both, mixed: Path, release_checkpoints
) -> None:
    _, gpu, out = both
    about = json.loads(pq.read_schema(out).metadata[b"perceptscore"])
    assert about["decode"] == "gpu" and about["fast_decode"] is False
    weights = {t: str(release_checkpoints[t][0]) for t in ("memorability", "quality")}
    scorer = Scorer(["memorability", "quality"], weights, device="cpu", batch_size=4, workers=1, decode="gpu")
    assert scorer.plan.decode == "gpu"
    before = os.getcwd()
    os.chdir(mixed)
    try:
        api = scorer.score(["photos", "shard.tar"])
    finally:
        os.chdir(before)
    assert api["path"].tolist() == gpu["path"].tolist()
    assert errors(api) == errors(gpu)
    np.testing.assert_allclose(api["memorability"], gpu["memorability"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(api["quality"], gpu["quality"], rtol=0, atol=1e-6)


def test_a_worker_reads_a_plain_jpeg_and_decodes_anything_else(mixed: Path) -> None:
    spec = get_task("quality").preprocess
    jpeg = mixed / "photos" / "a_square.jpg"
    got = read_item(Item(0, locate(str(jpeg))), [spec])
    assert got.error is None and got.pixels == {} and got.jpeg is not None
    assert got.jpeg.data == jpeg.read_bytes() and got.jpeg.header == tv_decode.probe(jpeg.read_bytes())
    assert got.jpeg.seed == tv_decode.crop_seed(
        jpeg.read_bytes()
    )  # read here, not hashed by the GPU's process
    png = read_item(Item(1, locate(str(mixed / "photos" / "b_landscape.png"))), [spec])
    assert png.jpeg is None and png.pixels[spec].shape == (spec.crops, 3, spec.crop, spec.crop)
    text: Decoded = read_item(Item(2, locate(str(mixed / "photos" / "h_text.jpg"))), [spec])
    assert text.error == "not a recognised image format" and text.jpeg is None
    # a file over the byte limit is never held whole: its worker decodes it, streaming
    big = read_item(Item(3, locate(str(jpeg))), [spec], max_bytes=100)
    assert big.jpeg is None and spec in big.pixels


def test_the_setting_is_in_the_plan_its_fingerprint_and_refused_where_it_cannot_run(
    release_checkpoints,
) -> None:
    weights = {"memorability": Weights("memorability", release_checkpoints["memorability"][0], "test")}
    cpu = make_plan(ScoreOptions(["memorability"], device="cpu"), weights=weights)
    gpu = make_plan(ScoreOptions(["memorability"], device="cpu", decode="gpu"), weights=weights)
    assert (cpu.decode, gpu.decode) == ("cpu", "gpu")
    assert cpu.fingerprint()["decode"] == "cpu" and gpu.fingerprint()["decode"] == "gpu"
    assert type(gpu).from_json(gpu.to_json()) == gpu  # what a --processes child receives
    with pytest.raises(UsageError, match="--decode tpu: use cpu or gpu"):
        make_plan(ScoreOptions(["memorability"], device="cpu", decode="tpu"), weights=weights)
    with pytest.raises(UsageError, match="--fast-decode is for --decode cpu"):
        make_plan(
            ScoreOptions(["memorability"], device="cpu", decode="gpu", fast_decode=True), weights=weights
        )
    with pytest.raises(UsageError, match="--engine ray decodes on its CPU workers"):  # a cluster's device
        make_plan(ScoreOptions(["memorability"], decode="gpu"), weights=weights, device_elsewhere="cpu")


def test_gpu_decode_with_fast_decode_is_a_usage_error(mixed: Path, checkpoint_args: list[str]) -> None:
    """(The entry point prints a ``UsageError`` as one line, exit code 2: test_cli_score.)"""
    args = ["score", str(mixed / "photos"), "-t", "mem", *checkpoint_args, "--decode", "gpu", "--fast-decode"]
    result = CliRunner().invoke(app, [*args, "-o", str(mixed / "refused.parquet")])
    assert isinstance(result.exception, UsageError) and not (mixed / "refused.parquet").exists()
    assert str(result.exception) == "--fast-decode is for --decode cpu (the device decodes JPEGs in full)"


def _cli(root: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([*EXE, *args], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


@pytest.mark.slow
def test_resume_with_another_decoder_is_refused_and_processes_children_decode_on_their_device(
    many_photos: Path, release_checkpoints, tmp_path: Path
) -> None:
    """A run of --decode gpu killed after its first shards: rerun with --decode cpu it is refused (the
    setting is in the fingerprint), rerun as it was it continues; 2 processes give the same rows."""
    photos = sorted(many_photos.iterdir())[:48]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    out = tmp_path / "out.parquet"
    env = {**os.environ, "PERCEPTSCORE_SHARD_ROWS": "4"}
    args = ["score", f"@{listing}", "-t", "mem", "--checkpoint", str(release_checkpoints["memorability"][0]),
            "--device", "cpu", "--batch-size", "2", "--workers", "1", "-o", str(out)]  # fmt: skip
    proc = _cli(tmp_path, [*args, "--decode", "gpu"], env)
    parts = out.with_name(f".{out.name}.parts")
    deadline = time.monotonic() + 120
    while (
        proc.poll() is None and len(list(parts.glob("shard-*.parquet"))) < 2 and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not out.exists() and len(list(parts.glob("shard-*.parquet"))) >= 2
    done = subprocess.run([*EXE, *args, "--decode", "cpu"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "differs in decode" in done.stderr, done.stderr
    done = subprocess.run([*EXE, *args, "--decode", "gpu"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "resumed from an interrupted run" in done.stderr, done.stderr
    resumed = pd.read_parquet(out)
    assert resumed["path"].tolist() == [str(p) for p in photos]
    two = tmp_path / "two.parquet"
    done = subprocess.run([*EXE, *args[:-1], str(two), "--decode", "gpu", "--processes", "2"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    split = pd.read_parquet(two)
    assert split["path"].tolist() == resumed["path"].tolist() and split["error"].isna().all()
    np.testing.assert_allclose(split["memorability"], resumed["memorability"], rtol=0, atol=1e-6)
    about = json.loads(pq.read_schema(two).metadata[b"perceptscore"])
    assert about["decode"] == "gpu" and about["device"] == "2 processes on cpu"


@pytest.mark.slow
def test_a_jpeg_is_not_decoded_by_its_worker_and_a_crashing_png_still_costs_one_row(
    mixed: Path, release_checkpoints, tmp_path: Path
) -> None:
    """With the test decoder faults (a file named crash-the-decoder kills the process that runs Pillow's
    decode on it): under --decode gpu a JPEG of that name is read by its worker and decoded by
    torchvision in the scoring process, so it scores; a PNG of that name kills its worker, as under
    --decode cpu, and is one error row."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a-crash-the-decoder.jpg").write_bytes((mixed / "photos" / "a_square.jpg").read_bytes())
    (folder / "b-crash-the-decoder.png").write_bytes((mixed / "photos" / "b_landscape.png").read_bytes())
    (folder / "c_fine.jpg").write_bytes((mixed / "photos" / "d_portrait.jpg").read_bytes())
    path = os.pathsep.join([str(DECODER_FAULTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "PERCEPTSCORE_TEST_DECODER_FAULTS": "1"}
    out = tmp_path / "out.parquet"
    args = ["score", str(folder), "-t", "mem", "--checkpoint", str(release_checkpoints["memorability"][0]),
            "--device", "cpu", "--workers", "1", "--decode", "gpu", "-o", str(out)]  # fmt: skip
    done = subprocess.run([*EXE, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    rows = pd.read_parquet(out)
    assert errors(rows) == [
        None,
        "the decoder crashed, or hung for 60 s, in its worker process",
        None,
    ]
    assert rows["memorability"].notna().tolist() == [True, False, True]


def test_device_decode_joins_the_workers_crops_and_its_own_in_row_order(mixed: Path) -> None:
    """A batch as the workers collate it (a JPEG, a PNG they decoded, a truncated JPEG, a row that was an
    error already, a JPEG): decoded here, every row's crops are the ones its own path gives, in order;
    the truncated file's error is the Pillow path's (from the isolated child); torch's threads are put
    back."""
    from perceptscore.batches import DeviceDecode, collate, decode_item

    specs = [get_task("memorability").preprocess, get_task("quality").preprocess]
    photos = mixed / "photos"
    names = ["a_square.jpg", "b_landscape.png", "g_truncated.jpg", "missing.jpg", "d_portrait.jpg"]
    items = [Item(i, locate(str(photos / n))) for i, n in enumerate(names)]
    batch = collate([read_item(i, specs) for i in items])
    assert batch.files is not None and batch.files.rows() == [0, 2, 4]  # what the workers sent as bytes
    threads = torch.get_num_threads()
    decode = DeviceDecode(specs, "cpu")
    try:
        done = decode(batch)
    finally:
        decode.close()
    assert torch.get_num_threads() == threads
    pillow = {n: decode_item(Item(0, locate(str(photos / n))), specs, None) for n in names}
    assert errors(pd.DataFrame({"error": done.errors})) == [None, None, pillow["g_truncated.jpg"].error,
                                                           "no such file", None]  # fmt: skip
    for spec in specs:
        expected = [
            tv_decode.decode_batch([(photos / n).read_bytes()], [spec])[0].pixels[spec]
            if n.endswith(".jpg") else torch.from_numpy(pillow[n].pixels[spec])
            for n in ("a_square.jpg", "b_landscape.png", "d_portrait.jpg")
        ]  # fmt: skip
        assert torch.equal(done.pixels[spec], torch.cat(expected)), spec


def test_files_in_flight_are_bounded_as_files_not_crops() -> None:
    """Under --decode gpu a batch in /dev/shm holds files (a 12 MP JPEG is ~4 MB, 27x memorability's
    crop): the workers' prefetch is bounded by that, so 16 workers cannot fill a 4 GB /dev/shm."""
    from perceptscore.engines.local import FILE_BYTES, batch_bytes, prefetch_for

    mem = [get_task("memorability").preprocess]
    assert batch_bytes(mem, 64) == 64 * 3 * 224 * 224
    assert batch_bytes(mem, 64, encoded=True) == 64 * FILE_BYTES
    assert prefetch_for(batch_bytes(mem, 64), 16, 4 << 30) == 4
    # 16 workers x 256 MB is more than half of 4 GB: the floor, one batch ahead each
    assert prefetch_for(batch_bytes(mem, 64, encoded=True), 16, 4 << 30) == 1


def test_an_interrupted_run_from_before_the_decode_setting_resumes_as_decode_cpu(tmp_path: Path) -> None:
    """A run.json written before ``decode`` joined the fingerprint holds no such key: that run decoded as
    ``--decode cpu`` does, so a cpu run continues it and a gpu run is refused."""
    import pyarrow as pa

    from perceptscore.runs import ShardedRun

    schema = pa.schema([("path", pa.string()), ("error", pa.string()), ("file_size", pa.int64()),
                        ("file_mtime_ns", pa.int64())])  # fmt: skip
    out = tmp_path / "scores.parquet"
    run = ShardedRun(out, schema, {"tasks": ["memorability"], "decode": "cpu"})
    run.add([0, 1], pa.record_batch([["a.jpg", "b.jpg"], [None, None], [1, 2], [3, 4]], schema=schema))
    run.flush(whole=True)
    state = json.loads(run.state.read_text())
    del state["decode"]  # as an earlier version wrote it
    run.state.write_text(json.dumps(state))
    assert ShardedRun(out, schema, {"tasks": ["memorability"], "decode": "cpu"}).saved_rows == 2
    with pytest.raises(UsageError, match="differs in decode"):
        ShardedRun(out, schema, {"tasks": ["memorability"], "decode": "gpu"})
