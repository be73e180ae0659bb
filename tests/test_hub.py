"""Weights from the hub through the real huggingface_hub code path, against a local stand-in for the hub.

huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT once, at import; each scenario therefore runs the
real ``perceptscore`` executable with its own environment, as a user's shell or cron job would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from fake_hub import FakeHub
from release_reference import make_release_checkpoint
from test_cli_score import EXE

QUALITY = ("PerceptCLIP/PerceptCLIP_IQA", "perceptCLIP_IQA.pth")
QUALITY_URL = "https://huggingface.co/PerceptCLIP/PerceptCLIP_IQA/resolve/main/perceptCLIP_IQA.pth"
MEDIUM = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 3, "num_attention_heads": 6}


def env_for(tmp_path: Path, hub: FakeHub | None, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "PERCEPTSCORE_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "0" if hub else "1",
        "HF_ENDPOINT": hub.endpoint if hub else "http://127.0.0.1:9",
        **extra,
    }
    env.pop("PERCEPTSCORE_WEIGHTS", None)
    return env


def perceptscore(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def hub_blobs(tmp_path: Path) -> list[Path]:
    blobs = (tmp_path / "hf" / "hub").glob("models--*/blobs/*")
    return sorted(p for p in blobs if not p.name.endswith(".incomplete"))


@pytest.fixture
def hub(release_checkpoints) -> FakeHub:  # type: ignore[no-untyped-def]
    with FakeHub() as server:
        server.add(*QUALITY, release_checkpoints["quality"][0].read_bytes())
        yield server


@pytest.mark.slow
def test_fetch_downloads_verifies_and_converts_then_cache_hits_make_no_request(
    hub: FakeHub, tmp_path: Path, photo_dir: Path
) -> None:
    env = env_for(tmp_path, hub)
    done = perceptscore(env, "weights", "fetch", "quality")
    assert done.returncode == 0, done.stderr
    assert [(r.method, r.range) for r in hub.file_requests] == [("HEAD", None), ("GET", None)]
    (blob,) = hub_blobs(tmp_path)
    assert blob.name == hub.etag("/".join(QUALITY))  # stored under the hub's sha256, which we checked
    cache = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    assert len(cache) == 2 and "quality.safetensors" in cache and cache[0].startswith("base-")

    requests = len(hub.file_requests)
    done = perceptscore(
        env, "score", photo_dir / "a_square.jpg", "-t", "quality", "-o", tmp_path / "a.csv", "--device", "cpu"
    )  # compared in fp32 below
    assert done.returncode == 0, done.stderr
    assert len(hub.file_requests) == requests  # the converted cache answered: no request at all
    meta = (tmp_path / "a.csv.meta.json").read_text()
    assert '"origin": "converted cache"' in meta and blob.name in meta  # the source sha256 is recorded

    for converted in (tmp_path / "cache").glob("*.safetensors"):
        converted.unlink()
    done = perceptscore(
        env, "score", photo_dir / "a_square.jpg", "-t", "quality", "-o", tmp_path / "b.csv", "--device", "cpu"
    )  # compared in fp32 below
    assert done.returncode == 0, done.stderr
    assert len(hub.file_requests) == requests  # the hub cache answered, still without a request
    assert '"origin": "hub cache"' in (tmp_path / "b.csv.meta.json").read_text()
    same = (
        pd.read_csv(tmp_path / "a.csv")["quality"].iloc[0]
        - pd.read_csv(tmp_path / "b.csv")["quality"].iloc[0]
    )
    assert abs(same) < 1e-6  # converted fp32 weights score exactly like the release file


@pytest.mark.slow
def test_score_downloads_on_first_use(hub: FakeHub, tmp_path: Path, photo_dir: Path) -> None:
    done = perceptscore(
        env_for(tmp_path, hub), "score", photo_dir / "c_cat.webp", "-t", "iqa", "-o", tmp_path / "s.csv"
    )
    assert done.returncode == 0, done.stderr
    assert [r.method for r in hub.file_requests] == ["HEAD", "GET"]
    assert '"origin": "downloaded"' in (tmp_path / "s.csv.meta.json").read_text()


@pytest.mark.slow
def test_a_dropped_connection_resumes_where_it_stopped(hub: FakeHub, tmp_path: Path) -> None:
    # huggingface_hub keeps what it received in 10 MB chunks: the file must be larger than the tiny one.
    content = (
        (tmp_path / "medium.pth").read_bytes()
        if make_release_checkpoint(tmp_path / "medium.pth", 1, MEDIUM)
        else b""
    )
    hub.add(*QUALITY, content)
    size = len(content)
    assert size > 20_000_000
    hub.drop_after = size * 3 // 4
    done = perceptscore(env_for(tmp_path, hub), "weights", "fetch", "quality")
    assert done.returncode == 0, done.stderr
    gets = [r.range for r in hub.file_requests if r.method == "GET"]
    assert gets[0] is None and len(gets) == 2
    start = int(gets[1].removeprefix("bytes=").removesuffix("-"))
    assert 10_000_000 <= start <= size * 3 // 4  # only the missing bytes were asked for again
    (blob,) = hub_blobs(tmp_path)
    assert blob.read_bytes() == hub.files["/".join(QUALITY)]


@pytest.mark.slow
def test_a_killed_fetch_leaves_no_partial_file_for_long(hub: FakeHub, tmp_path: Path) -> None:
    """huggingface_hub 2 never reuses a killed process's partial file; a stale one is removed next time."""
    env = env_for(tmp_path, hub)
    hub.throttle = 0.05  # 64 KiB every 50 ms: the file takes seconds, long enough to kill the process
    proc = subprocess.Popen([EXE, "weights", "fetch", "quality"], env=env, stderr=subprocess.DEVNULL)
    blobs = tmp_path / "hf" / "hub" / "models--PerceptCLIP--PerceptCLIP_IQA" / "blobs"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(blobs.glob("*.incomplete")):
        time.sleep(0.02)  # the partial file exists from the first byte (data lands in 10 MB pieces)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (orphan,) = blobs.glob("*.incomplete")
    fresh = blobs / "0000.live.incomplete"  # another process's download in progress: must be left alone
    fresh.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    hub.throttle = 0.0
    done = perceptscore(env, "weights", "fetch", "quality")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in blobs.glob("*.incomplete")) == [fresh.name]
    assert hub_blobs(tmp_path)[0].read_bytes() == hub.files["/".join(QUALITY)]


@pytest.mark.slow
def test_a_corrupt_download_is_refused_and_not_cached(hub: FakeHub, tmp_path: Path) -> None:
    env = env_for(tmp_path, hub)
    hub.etags["/".join(QUALITY)] = "ab" * 32  # the hub advertises a hash the bytes do not have
    done = perceptscore(env, "weights", "fetch", "quality")
    assert done.returncode == 2
    assert "error: downloaded perceptCLIP_IQA.pth is corrupt (sha256" in done.stderr
    assert "Traceback" not in done.stderr
    assert hub_blobs(tmp_path) == [] and not list((tmp_path / "cache").glob("*.safetensors"))
    del hub.etags["/".join(QUALITY)]
    assert perceptscore(env, "weights", "fetch", "quality").returncode == 0  # a good copy is taken next time


def test_offline_with_nothing_cached_exits_3_at_once(tmp_path: Path, photo_dir: Path) -> None:
    start = time.monotonic()
    done = perceptscore(env_for(tmp_path, None), "score", photo_dir / "a_square.jpg", "-t", "quality")
    elapsed = time.monotonic() - start
    assert done.returncode == 3
    assert done.stderr.startswith(
        "error: no weights for task quality (HF_HUB_OFFLINE is set and nothing is cached)"
    )
    assert done.stderr.splitlines()[1:] == [
        "fix: perceptscore weights fetch quality   (no network: perceptscore weights import FILE)",
        f"file: {QUALITY_URL} (1.23 GB)",
    ]
    assert elapsed < 3.0  # ~0.5 s here: nothing heavy is imported before the weights are resolved


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (401, {}, "the hub refused PerceptCLIP/PerceptCLIP_IQA (401: a private or gated repository"),
        (
            403,
            {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted."},
            "PerceptCLIP/PerceptCLIP_IQA is gated: accept its conditions on its hub page",
        ),
        (
            404,
            {"X-Error-Code": "EntryNotFound"},
            "perceptCLIP_IQA.pth is not in PerceptCLIP/PerceptCLIP_IQA at revision main (404)",
        ),
    ],
)
def test_each_hub_refusal_says_what_it_is_and_what_to_do(
    hub: FakeHub, tmp_path: Path, status: int, headers: dict[str, str], expected: str
) -> None:
    hub.refuse["/".join(QUALITY)] = (status, headers)
    done = perceptscore(env_for(tmp_path, hub), "weights", "fetch", "quality")
    assert done.returncode == 3, done.stderr
    line, fix, source = done.stderr.strip().splitlines()  # three lines: no retry log, no traceback
    assert line.startswith("error: no weights for task quality (download failed: " + expected), line
    assert fix == (
        "fix: download the file below where the hub is reachable, then perceptscore weights import FILE"
    )
    assert source == f"file: {QUALITY_URL} (1.23 GB)"


@pytest.mark.slow
def test_an_unresolvable_hub_fails_fast_with_one_line(tmp_path: Path) -> None:
    """No network and HF_HUB_OFFLINE unset: a name that does not resolve is not retried (it took 24 s and
    ten lines of retry log)."""
    env = env_for(tmp_path, None, HF_HUB_OFFLINE="0", HF_ENDPOINT="https://hub.perceptscore.invalid")
    start = time.monotonic()  # the same command offline: its imports, with no look-up (the baseline)
    assert perceptscore({**env, "HF_HUB_OFFLINE": "1"}, "weights", "fetch", "quality").returncode == 3
    offline = time.monotonic() - start
    start = time.monotonic()
    done = perceptscore(env, "weights", "fetch", "quality")
    elapsed = time.monotonic() - start
    assert done.returncode == 3
    line, fix, _ = done.stderr.strip().splitlines()  # what failed, then the way round it: an import
    assert "(download failed: cannot resolve hub.perceptscore.invalid: no network or no DNS here" in line
    assert fix.endswith("then perceptscore weights import FILE")
    assert elapsed - offline < 8  # the look-up is bounded at 5 s; retrying it took 24 s
