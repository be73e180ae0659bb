"""bench/gpu_check.py, the script a lent GPU runs, dry-run on the CPU so it cannot rot between devices: every
step prints its result, none fails, and it uses the installed package (run from outside the repository)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import perceptscore

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
# what each step's result line says (beyond "done in" and "FAILED")
RESULTS = {
    "device": r"\d+ GPU\(s\) visible, \d+ cores usable; checking on cpu",
    "setup": r"\d+ JPEGs of 1100x800 \(\d+ KiB each\) in ",
    "precision": r"cpu (fp32|fp16|bf16): max \|diff\| [\d.]+ \(limit [\d.]+\), Spearman min [\d.]+ .* PASS",
    "model-only": r"(fp16|bf16) batch \d+: [\d,]+ images/s = [\d.]+ TFLOP/s",
    "decode-only": r"(exact|--fast-decode): [\d,]+ images/s on \d+ workers",
    "cli-defaults": r"8 rows, 0 errors on cpu fp32: .* PASS",
    "cli-three-tasks": r"2 rows, 0 errors on cpu fp32: .* PASS",
    "cli-fast-decode": r"8 rows, 0 errors on cpu fp32: .* PASS",
    "cli-decode-gpu": r"8 rows, 0 errors on cpu fp32: .* PASS",
    "cli-three-tasks-decode-gpu": r"2 rows, 0 errors on cpu fp32: .* PASS",
    "cli-processes-2": r"skipped: [01] GPU\(s\) visible|8 rows, 0 errors on 2 processes on cpu fp32: .* PASS",
    "cli-explain": r"4 heatmaps for 4 images .* PASS",
    "device-index": r"--device cuda:(\d+): exit 2, 1 stderr line\(s\): error: cuda:\1: .* PASS",
    "trainer": r"fp16 on cpu, GradScaler on: a step of unreadable micro-batches skipped, .* PASS",
}


@pytest.mark.slow
def test_the_dry_run_prints_every_steps_result_and_passes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    lines = [re.match(r"\[([\w-]+)\] (.*)", line) for line in out.splitlines() if line.startswith("[")]
    by_step: dict[str, list[str]] = {}
    for match in lines:
        assert match is not None
        by_step.setdefault(match[1], []).append(match[2])
    assert list(by_step) == [*RESULTS, "summary"]  # every step, in order, then the count
    for step, pattern in RESULTS.items():
        results = [t for t in by_step[step] if not t.startswith("done in ")]
        assert results and all(not t.startswith("FAILED") for t in results), (step, results)
        assert any(re.search(pattern, t) for t in results), (step, pattern, results)
    assert len([t for t in by_step["precision"] if t.endswith("PASS")]) == 3
    assert len([t for t in by_step["model-only"] if "images/s" in t]) == 6  # 2 precisions x 3 batches
    decode = [t.split(":")[0] for t in by_step["decode-only"] if "images/s" in t]
    assert decode == ["exact", "--fast-decode", "--decode gpu"]
    assert re.search(r"scoring process [\d.]+ CPU ms per image\)$", by_step["decode-only"][2])
    # the same images and model decoded by tv_decode on the CPU: within a grey level of Pillow's pixels
    moved = [t for t in by_step["cli-decode-gpu"] if "against cli-defaults" in t]
    assert len(moved) == 1 and float(re.search(r"max \|diff\| ([\d.e+-]+),", moved[0])[1]) < 1e-3  # type: ignore[index]
    assert by_step["summary"][0].startswith(f"{len(RESULTS)} steps, 0 failed;")
    # the installed package, not a path the script put first
    assert (
        by_step["device"][0]
        == f"perceptscore {perceptscore.__version__} from {Path(perceptscore.__file__).parent}"
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host where torch sees no GPU")
def test_a_failing_step_prints_one_line_and_the_next_runs(tmp_path: Path) -> None:
    """Steps that cannot run (here: no GPU, and not a dry run) each say why in one line; the next still
    runs, the summary counts them, the exit code is 1."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "trainer"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    failed = [line for line in lines if " FAILED " in line]
    assert (
        failed[0]
        == "[device] FAILED RuntimeError: no CUDA device visible to torch (use --dry-run to check on the CPU)"
    )
    assert len(failed) == 2 and failed[1].startswith("[trainer] FAILED ")
    assert lines[-1].startswith("[summary] 2 steps, 2 failed: device, trainer;")
    assert "Traceback" not in done.stdout + done.stderr
