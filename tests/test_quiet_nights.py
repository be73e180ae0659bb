"""A night with nothing new loads no model; `score | head` ends quietly; CSV on a terminal has no live bar."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from test_cli_terminal import run_in_pty
from typer.testing import CliRunner

from perceptscore.cli import app

from test_cli_score import EXE

LOADING = "loading weights for"  # predict.Predictor.from_plan's debug line, once per model loaded


def _photos(folder: Path, n: int, photo_dir: Path) -> Path:
    folder.mkdir()
    for i, source in enumerate(sorted(photo_dir.glob("*.jpg"))[:1] * n):
        shutil.copy(source, folder / f"{i:03d}.jpg")
    return folder


def _loads(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(LOADING)]


def test_a_night_with_nothing_new_loads_no_model(
    tmp_path: Path, photo_dir: Path, release_checkpoints, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _photos(tmp_path / "photos", 3, photo_dir)
    out = tmp_path / "scores.parquet"
    ckpt = str(release_checkpoints["memorability"][0])
    # --device cpu: the load is logged in this process (on a GPU host auto runs a child per GPU)
    args = ["score", str(folder), "-t", "mem", "--checkpoint", ckpt, "--workers", "0", "--device", "cpu",
            "--incremental", str(out), "-o", str(out)]  # fmt: skip
    caplog.set_level(logging.DEBUG, logger="perceptscore.predict")
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert len(_loads(caplog)) == 1  # the probe sees a load when there is one
    caplog.clear()

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "3 unchanged, reused" in again.output
    assert _loads(caplog) == []

    (folder / "new.jpg").write_bytes((folder / "000.jpg").read_bytes())  # one new file: one load again
    third = CliRunner().invoke(app, args)
    assert third.exit_code == 0, third.output
    assert len(_loads(caplog)) == 1


@pytest.mark.slow
def test_score_into_head_ends_quietly(tmp_path: Path, photo_dir: Path, release_checkpoints) -> None:
    """`perceptscore score DIR | head -1`: the reader goes after one line; the writer ends by the SIGPIPE
    convention (141) with nothing on stderr: no "error: Broken pipe", no traceback, no "Exception ignored"."""
    folder = _photos(tmp_path / "photos", 8, photo_dir)
    proc = subprocess.Popen(
        [EXE, "score", str(folder), "-t", "mem", "--checkpoint", str(release_checkpoints["memorability"][0]),
         "--batch-size", "1", "--workers", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b'"path",')
    proc.stdout.close()  # as head does: every later write of the 8 rows meets a closed pipe
    stderr = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert stderr == ""
    assert code in (141, -signal.SIGPIPE)


@pytest.mark.slow
def test_csv_on_a_terminal_gets_no_live_progress_bar(photo_dir: Path, release_checkpoints) -> None:
    """stdout and stderr on one terminal: the CSV rows are not drawn over by a bar (the summary comes)."""
    ckpt = release_checkpoints["memorability"][0]
    screen = run_in_pty("score", photo_dir, "-t", "mem", "--checkpoint", ckpt, "--batch-size", "2")
    assert "files/s" not in screen  # the live bar's rate: no bar
    lines = screen.replace("\r\n", "\n").splitlines()
    assert lines[0].startswith('"path","memorability"')
    assert sum(line.startswith(f'"{photo_dir}') for line in lines) == 6  # every row whole, on its own line
    assert "6 scored, 0 errors" in screen
