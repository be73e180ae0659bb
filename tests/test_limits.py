"""One configuration (issue 23, item 5): the run's ``Limits`` are read from the environment once, on the
main process; they travel in the plan to every process, are recorded in provenance, and the ones that
change rows are in the fingerprint a ``--resume`` compares."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from perceptscore import limits, remote
from perceptscore.errors import UsageError
from perceptscore.formats import read_provenance
from perceptscore.limits import Limits
from perceptscore.plan import ScoreOptions, ScoringPlan, make_plan

from servers import FaultyHTTPServer
from test_cli_score import EXE

MAX = "PERCEPTSCORE_MAX_FILE_BYTES"


@pytest.fixture
def checkpoint(release_checkpoints) -> str:  # type: ignore[no-untyped-def]
    return str(release_checkpoints["memorability"][0])


@pytest.fixture
def env() -> dict[str, str]:
    """This environment without any limit set (the tests set the ones they mean)."""
    knobs = {limits.variable(f.name) for f in dataclasses.fields(Limits)}
    return {k: v for k, v in os.environ.items() if k not in knobs}


@pytest.fixture
def http(http_server: FaultyHTTPServer) -> FaultyHTTPServer:
    yield http_server
    http_server.reset()


@pytest.fixture
def keep_installed() -> None:
    """What this process has installed, put back after a test that installs (other tests read it)."""
    before = limits.installed()
    yield
    limits.restore(before)


def score(env: dict[str, str], checkpoint: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [EXE, "score", *map(str, args), "-t", "mem", "--checkpoint", checkpoint, "--device", "cpu"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


# ---- the object itself -----------------------------------------------------------------------------


def test_the_environment_is_read_with_its_names_and_defaults() -> None:
    assert Limits.from_env({}) == Limits()
    assert Limits().deadline_seconds == 30 * 4 + 15  # the derived deadline, as before
    got = Limits.from_env(
        {MAX: "1000", "PERCEPTSCORE_DECODE_TIMEOUT": "0", "PERCEPTSCORE_REMOTE_TIMEOUT": "2.5",
         "PERCEPTSCORE_REMOTE_TRIES": "3", "PERCEPTSCORE_SHARD_ROWS": " 8 ", "PERCEPTSCORE_WORK": "/w",
         "PERCEPTSCORE_RAY_WINDOW_ROWS": "", "OTHER_MAX_FILE_BYTES": "x"}
    )  # fmt: skip
    assert (got.max_file_bytes, got.decode_timeout, got.remote_timeout, got.remote_tries) == (1000, 0, 2.5, 3)
    assert (got.shard_rows, got.work, got.ray_window_rows) == (8, "/w", Limits().ray_window_rows)
    assert got.deadline_seconds == 2.5 * 3 + 15
    assert Limits.from_env({"PERCEPTSCORE_REMOTE_DEADLINE": "7"}).deadline_seconds == 7
    assert Limits.from_dict(json.loads(json.dumps(got.to_dict()))) == got


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (MAX, "12MB", "PERCEPTSCORE_MAX_FILE_BYTES='12MB' is not a whole number"),
        ("PERCEPTSCORE_DECODE_TIMEOUT", "-1", "PERCEPTSCORE_DECODE_TIMEOUT='-1': must be at least 0"),
        ("PERCEPTSCORE_REMOTE_TIMEOUT", "0", "PERCEPTSCORE_REMOTE_TIMEOUT='0': must be more than 0"),
        ("PERCEPTSCORE_REMOTE_MIN_RATE", "nan", "PERCEPTSCORE_REMOTE_MIN_RATE='nan' is not a number"),
        ("PERCEPTSCORE_REMOTE_TRIES", "0", "PERCEPTSCORE_REMOTE_TRIES='0': must be at least 1"),
    ],
)
def test_a_malformed_value_names_its_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(UsageError) as raised:
        Limits.from_env({variable: value})
    assert str(raised.value).startswith(message)


def test_a_malformed_value_is_a_one_line_usage_error_of_the_cli(
    env: dict[str, str], checkpoint: str, photo_dir: Path, tmp_path: Path
) -> None:
    done = score(
        {**env, "PERCEPTSCORE_DECODE_TIMEOUT": "1m"}, checkpoint, photo_dir, "-o", tmp_path / "o.csv"
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: PERCEPTSCORE_DECODE_TIMEOUT='1m' is not a number of seconds"
    assert not list(tmp_path.iterdir())


def test_the_plan_carries_the_limits_and_never_the_storage_options(
    release_checkpoints, monkeypatch: pytest.MonkeyPatch, keep_installed: None
) -> None:
    """The options read the environment once; the plan's JSON (what a --processes child gets) holds the
    limits, its fingerprint the ones that change rows; the storage options stay in this process."""
    monkeypatch.setenv(MAX, "4096")
    monkeypatch.setenv("PERCEPTSCORE_PREFETCH_BYTES", "65536")
    secret = "tok-limits-0001"
    storage = remote.Settings.parse(json.dumps({"s3": {"secret": secret}}))
    options = ScoreOptions(["mem"], {"mem": str(release_checkpoints["memorability"][0])}, "cpu",
                           storage=storage)  # fmt: skip
    monkeypatch.setenv(MAX, "1")  # read once: a later change is not this run's
    plan = make_plan(options)
    assert plan.limits == Limits(max_file_bytes=4096, prefetch_bytes=65536)
    text = plan.to_json()
    assert ScoringPlan.from_json(text) == plan
    assert secret not in text and secret not in json.dumps(plan.fingerprint())
    assert plan.fingerprint()["max_file_bytes"] == 4096 and plan.fingerprint()["decode_timeout"] == 60
    assert "prefetch_bytes" not in plan.fingerprint()  # memory, not rows
    options.install()
    assert limits.current() == plan.limits and remote.max_bytes() == 4096
    assert remote.current().for_scheme("s3") == {"secret": secret}


# ---- across processes, in the outputs ----------------------------------------------------------------

# The CLI, with its --processes children started in an environment that says otherwise about the limit:
# what a child applies can only have come with the plan.
CHILDREN_ELSEWHERE = """
import functools, os, subprocess, sys, types
from perceptscore.cli import main
from perceptscore.engines import process
told = {**os.environ, "PERCEPTSCORE_MAX_FILE_BYTES": str(1 << 30)}
children = types.ModuleType("subprocess")
children.__dict__.update(vars(subprocess))
children.Popen = functools.partial(subprocess.Popen, env=told)
process.subprocess = children
sys.argv = ["perceptscore", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_processes_children_apply_the_parents_limit_whatever_their_environment(
    env: dict[str, str], checkpoint: str, http: FaultyHTTPServer, many_photos: Path, tmp_path: Path
) -> None:
    """Eight URLs, dealt in blocks of four to two children (batch size 1); rows 1 and 6 are a JPEG with
    padding past the parent's PERCEPTSCORE_MAX_FILE_BYTES (it decodes whole otherwise). The children fetch
    the objects themselves under the plan's limit: those rows are errors saying so, the others score.
    The parquet's provenance records the limit."""
    jpeg = next(iter(sorted(many_photos.iterdir()))).read_bytes()
    limit = len(jpeg) + 100
    urls = []
    for n in range(8):
        http.files[f"/limits/{n}.jpg"] = jpeg + b"\0" * 4000 if n in (1, 6) else jpeg
        urls.append(http.url(f"/limits/{n}.jpg"))
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    out = tmp_path / "out.parquet"
    command = [sys.executable, "-c", CHILDREN_ELSEWHERE, "score", f"@{listing}", "-t", "mem", "--checkpoint",
               checkpoint, "--device", "cpu", "--processes", "2", "--batch-size", "1", "--workers", "0",
               "-o", str(out)]  # fmt: skip
    done = subprocess.run(command, env={**env, MAX: str(limit)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # some rows are errors
    rows = pq.read_table(out).to_pydict()
    assert rows["path"] == urls
    over = f"{len(jpeg) + 4000} bytes, over the limit of {limit}"
    assert rows["error"] == [None, over, None, None, None, None, over, None]
    assert [v is not None for v in rows["memorability"]] == [True, False, True, True, True, True, False, True]
    assert read_provenance(str(out))["limits"] == Limits(max_file_bytes=limit).to_dict()


@pytest.mark.slow
def test_provenance_records_the_limits_in_a_csv_sidecar(
    env: dict[str, str], checkpoint: str, photo_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores.csv"
    told = {
        "PERCEPTSCORE_DECODE_TIMEOUT": "45",
        "PERCEPTSCORE_REMOTE_TRIES": "3",
        "PERCEPTSCORE_SHARD_ROWS": "5",
    }
    done = score({**env, **told}, checkpoint, photo_dir / "a_square.jpg", "-o", out, "--workers", "0")
    assert done.returncode == 0, done.stderr
    recorded = json.loads(out.with_name("scores.csv.meta.json").read_text())["limits"]
    assert recorded == Limits.from_env(told).to_dict()
    assert (recorded["decode_timeout"], recorded["remote_tries"], recorded["shard_rows"]) == (45, 3, 5)


def _run_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.parts")


@pytest.mark.slow
def test_a_resume_with_another_max_file_bytes_is_refused_as_a_changed_run(
    env: dict[str, str], checkpoint: str, http: FaultyHTTPServer, many_photos: Path, tmp_path: Path
) -> None:
    """A run of four photos and a URL that never answers saves its first shard and is killed while it
    waits; continuing it under another PERCEPTSCORE_MAX_FILE_BYTES is refused, naming only that; under the
    same limits it is continued."""
    photos = sorted(many_photos.iterdir())[:4]
    http.files["/limits/late.jpg"] = photos[0].read_bytes()
    http.stall.add("/limits/late.jpg")
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join([*map(str, photos), http.url("/limits/late.jpg")]) + "\n")
    out = tmp_path / "out.parquet"
    args = [f"@{listing}", "-o", out, "--batch-size", "1", "--workers", "0", "--resume"]
    first = {**env, "PERCEPTSCORE_SHARD_ROWS": "1"}
    command = [EXE, "score", *map(str, args), "-t", "mem", "--checkpoint", checkpoint, "--device", "cpu"]
    proc = subprocess.Popen(command, env=first, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not list(_run_folder(out).glob("shard-*.parquet")):
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(_run_folder(out).glob("shard-*.parquet")), "the run ended before saving a shard"

    refused = score({**first, MAX: "1000000"}, checkpoint, *args)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(
        f"error: an interrupted run of {out.name} that differs in max_file_bytes "
    )
    assert not out.exists()

    http.stall.discard("/limits/late.jpg")
    done = score(first, checkpoint, *args)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stderr
    assert pq.read_table(out).column("path").to_pylist() == [*map(str, photos), http.url("/limits/late.jpg")]


def test_the_isolated_decoder_reads_under_the_limits_it_was_given(photo_dir: Path, tmp_path: Path) -> None:
    """The child that decodes for a Ray task opens a tar member itself: under the run's limit (sent with
    its settings), not its environment's default."""
    import tarfile

    from perceptscore.images import MAX_PIXELS
    from perceptscore.isolated_decode import IsolatedDecoder
    from perceptscore.locators import member_uri
    from perceptscore.tasks import get_task

    jpeg = photo_dir / "a_square.jpg"
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as archive:
        archive.add(jpeg, "a.jpg")
    specs, uri, small = [get_task("mem").preprocess], member_uri("a.jpg", str(shard)), jpeg.stat().st_size - 1
    with IsolatedDecoder(specs, None, MAX_PIXELS, 30.0, Limits(max_file_bytes=small)) as limited:
        refused = limited.decode(uri)
    assert refused.error == f"{small + 1} bytes, over the limit of {small} per member"
    with IsolatedDecoder(specs, None, MAX_PIXELS, 30.0) as unlimited:  # the default: 512 MiB
        assert unlimited.decode(uri).error is None
