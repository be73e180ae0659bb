"""What a person at a terminal sees (a real pty), and what cron's mail gets (plain log lines)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import time
from pathlib import Path

import pytest

from test_cli_score import EXE, run

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours and cursor moves: keep what a person reads


def run_in_pty(*args: str | Path) -> str:
    """Run with stdout and stderr on a pseudo-terminal, as in an interactive shell; return the screen text."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    proc = subprocess.Popen(
        [EXE, *map(str, args)], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    return ANSI.sub("", b"".join(chunks).decode(errors="replace"))


@pytest.mark.slow
def test_terminal_gets_a_progress_bar_and_a_ranking_table(photo_dir: Path, release_checkpoints) -> None:
    screen = run_in_pty("rank", photo_dir, "-t", "memorability", "--top", "2",
                        "--checkpoint", release_checkpoints["memorability"][0])  # fmt: skip
    assert "files/s" in screen  # the live progress line
    assert "┃ # ┃ memorability ┃ path" in screen  # the Rich table header
    table_rows = [line for line in screen.splitlines() if line.startswith("│ ") and str(photo_dir) in line]
    assert len(table_rows) == 2


@pytest.mark.slow
def test_off_a_terminal_progress_is_plain_log_lines(
    photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    os.environ["PERCEPTSCORE_LOG_EVERY"] = "0"
    try:
        # --device cpu: one process's batches of 2 (on a GPU host auto runs a process per GPU)
        done = run("score", photo_dir, "-t", "mem", "--checkpoint", release_checkpoints["memorability"][0],
                   "--batch-size", "2", "--device", "cpu", "-o", tmp_path / "s.csv")  # fmt: skip
    finally:
        del os.environ["PERCEPTSCORE_LOG_EVERY"]
    logged = [LOG_LINE.match(line) for line in done.stderr.splitlines()]
    assert [int(m["done"]) for m in logged if m] == [2, 4, 6], done.stderr
    assert "\x1b[" not in done.stderr  # no terminal control codes in a log


# 2026-12-06T13:06:36+00:00 scoring: 2/6 files (33%), 1.52 files/s, ETA 3s, 0 errors
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d scoring: (?P<done>\d+)(?P<total>/\d+\+?)? files"
    r"(?: \(counting\))?(?: \((?P<percent>\d+)%\))?, (?P<rate>[\d.]+) files/s(?:, ETA (?P<eta>\w+))?, "
    r"(?P<errors>\d+) errors$"
)


@pytest.mark.slow
def test_log_lines_carry_the_total_percent_and_eta_when_the_total_is_known(
    photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    files = sorted(photo_dir.iterdir())  # named one by one: the total is known before the first row
    os.environ["PERCEPTSCORE_LOG_EVERY"] = "0"
    try:
        done = run("score", *files, "-t", "mem", "--checkpoint", release_checkpoints["memorability"][0],
                   "--batch-size", "2", "--device", "cpu", "-o", tmp_path / "s.csv")  # fmt: skip
    finally:
        del os.environ["PERCEPTSCORE_LOG_EVERY"]
    logged = [m for m in map(LOG_LINE.match, done.stderr.splitlines()) if m]
    assert [(m["done"], m["total"], m["percent"]) for m in logged] == [
        ("2", "/6", "33"), ("4", "/6", "67"), ("6", "/6", "100")
    ], done.stderr  # fmt: skip
    assert all(m["eta"] for m in logged)
    assert logged[-1]["eta"] == "0s"


@pytest.mark.slow
def test_a_folder_gets_a_bar_with_its_total_on_a_terminal(
    photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    ckpt = release_checkpoints["memorability"][0]
    screen = run_in_pty("score", photo_dir, "-t", "mem", "--checkpoint", ckpt, "--batch-size", "2",
                        "-o", tmp_path / "s.csv")  # fmt: skip
    # the folder is counted while it is scored; the bar's last state has the total
    assert "6/6 files" in screen, screen
    assert "6 scored, 0 errors -> " in screen
