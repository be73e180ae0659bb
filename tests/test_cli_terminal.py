"""What a person at a terminal sees (a real pty), and what cron's mail gets (plain log lines)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import time
from pathlib import Path

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


def test_terminal_gets_a_progress_bar_and_a_ranking_table(photo_dir: Path, release_checkpoints) -> None:
    screen = run_in_pty("rank", photo_dir, "-t", "memorability", "--top", "2",
                        "--checkpoint", release_checkpoints["memorability"][0])  # fmt: skip
    assert "files/s" in screen  # the live progress line
    assert "┃ # ┃ memorability ┃ path" in screen  # the Rich table header
    table_rows = [line for line in screen.splitlines() if line.startswith("│ ") and str(photo_dir) in line]
    assert len(table_rows) == 2


def test_off_a_terminal_progress_is_plain_log_lines(
    photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    os.environ["PERCEPTSCORE_LOG_EVERY"] = "0"
    try:
        done = run("score", photo_dir, "-t", "mem", "--checkpoint", release_checkpoints["memorability"][0],
                   "--batch-size", "2", "-o", tmp_path / "s.csv")  # fmt: skip
    finally:
        del os.environ["PERCEPTSCORE_LOG_EVERY"]
    lines = done.stderr.splitlines()
    assert [line.split(" files,")[0] for line in lines if line.startswith("scoring:")] == [
        "scoring: 2", "scoring: 4", "scoring: 6"
    ]  # fmt: skip
    assert "\x1b[" not in done.stderr  # no terminal control codes in a log
