"""rank and filter with no inputs read standard input (the design card's own command): paths one a line,
or a scores stream from `perceptscore score ... -o -`. Real pipelines of processes."""

from __future__ import annotations

import io
import os
import pty
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from test_cli_score import EXE


def pipeline(first: list[str], second: list[str]) -> tuple[subprocess.CompletedProcess[str], str]:
    """``first | second``: the second's result, and the first's stderr."""
    producer = subprocess.Popen(first, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert producer.stdout is not None
    consumer = subprocess.run(second, stdin=producer.stdout, capture_output=True, text=True, timeout=300)
    producer.stdout.close()
    _, producer_err = producer.communicate(timeout=300)
    return consumer, producer_err


@pytest.mark.slow
def test_find_piped_into_filter(photo_dir: Path, release_checkpoints, tmp_path: Path) -> None:
    # both runs on the CPU: a row at the median threshold must score the same bits in each (fp16 on a GPU
    # could round it across the line, as batches differ)
    checkpoint = ["--checkpoint", str(release_checkpoints["quality"][0]), "--device", "cpu"]
    reference = tmp_path / "all.csv"
    jpegs = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    done = subprocess.run([EXE, "score", *jpegs, "-t", "quality", *checkpoint, "-o", str(reference)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    scores = pd.read_csv(reference)
    threshold = float(scores["quality"].median())
    done, _ = pipeline(
        ["find", str(photo_dir), "-name", "*.jpg"],
        [EXE, "filter", "--min-quality", str(threshold), *checkpoint],
    )
    assert done.returncode == 0, done.stderr
    expected = set(scores.loc[scores["quality"] >= threshold, "path"])
    assert set(done.stdout.splitlines()) == expected and 0 < len(expected) < len(jpegs)
    assert f"kept {len(expected)} of {len(jpegs)} files" in done.stderr


@pytest.mark.slow
def test_a_scores_stream_piped_into_filter_and_rank(photo_dir: Path, release_checkpoints) -> None:
    score = [
        EXE,
        "score",
        str(photo_dir),
        "-t",
        "quality",
        "--checkpoint",
        str(release_checkpoints["quality"][0]),
    ]
    done, err = pipeline(score, [EXE, "filter", "--min-quality", "-1000"])  # no model: the stream has scores
    assert done.returncode == 0, done.stderr + err
    assert done.stdout.splitlines() == sorted(str(p) for p in photo_dir.iterdir())
    done, err = pipeline(score, [EXE, "rank", "-t", "quality", "--top", "3", "--ascending"])
    assert done.returncode == 0, done.stderr + err
    ranked = pd.read_csv(io.StringIO(done.stdout))
    assert len(ranked) == 3 and ranked["quality"].is_monotonic_increasing


@pytest.mark.slow
def test_a_stream_with_error_rows_keeps_its_scored_rows(
    photo_dir: Path, release_checkpoints, tmp_path
) -> None:
    """An empty ``error`` cell is a scored row: read as "" it made every good row look failed."""
    (tmp_path / "a.jpg").write_bytes((photo_dir / "a_square.jpg").read_bytes())
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    score = [
        EXE,
        "score",
        str(tmp_path),
        "-t",
        "quality",
        "--checkpoint",
        str(release_checkpoints["quality"][0]),
    ]
    done, err = pipeline(score, [EXE, "filter", "--min-quality", "-1000"])
    assert done.returncode == 0, done.stderr + err
    assert done.stdout.splitlines() == [str(tmp_path / "a.jpg")]
    assert "kept 1 of 2 files" in done.stderr


def test_an_empty_stdin_is_one_line_before_any_model_loads(release_checkpoints) -> None:
    done = subprocess.run([EXE, "filter", "--min-quality", "0.7"], input="", capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == "error: no inputs: standard input was empty (no paths, no scores)"


def test_on_a_terminal_with_no_inputs_one_line_says_what_to_give(release_checkpoints) -> None:
    master, slave = pty.openpty()
    done = subprocess.run([EXE, "filter", "--min-quality", "0.7"], stdin=slave, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    os.close(slave)
    os.close(master)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: no inputs: name files, folders or a scores file, or pipe paths or scores")
