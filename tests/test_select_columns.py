"""rank and filter by any numeric output column (issue 22, item 11): `rank --by COLUMN`, `filter
--min-COLUMN/--max-COLUMN X` and `--top-fraction F --by COLUMN`, for every task in the registry (a new task
needs no CLI edit), from a scores file (no model) or from images (the needed task is scored); a mistyped
column or option is one line. In-process through the console script and Typer's runner."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from test_cli_words import _main  # the console script in-process: exit code, stderr
from typer.testing import CliRunner

import perceptscore.cli
from perceptscore import tasks
from perceptscore.cli import app

LABELS = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]


def _cli(*args: str | Path):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


@pytest.fixture
def scores(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """A scores file of 8 rows (one an error row) with every task's columns, values from a fixed seed."""
    rng = np.random.default_rng(7)
    n = 8
    probs = rng.dirichlet(np.ones(8), size=n)
    frame = pd.DataFrame(
        {
            "path": [str(tmp_path / f"img{i}.jpg") for i in range(n)],
            "memorability": rng.uniform(0.4, 0.9, n),
            "quality": rng.uniform(0.2, 0.8, n),
            "quality_raw": rng.uniform(-4, 2, n),
            "emotion": [LABELS[j] for j in probs.argmax(axis=1)],
            "emotion_confidence": probs.max(axis=1),
            **{f"emotion_{label}": probs[:, j] for j, label in enumerate(LABELS)},
            "error": [None] * (n - 1) + ["broken"],
        }
    )
    frame.loc[n - 1, "emotion_awe"] = 1.0  # an error row takes no part, whatever its cells say
    path = tmp_path / "scores.csv"
    frame.to_csv(path, index=False)
    Path(f"{path}.meta.json").write_text("{}")  # marks it a scores file
    return path, frame.iloc[: n - 1]


def _csv_paths(text: str) -> list[str]:
    return pd.read_csv(io.StringIO(text))["path"].tolist()


def test_rank_by_any_column(scores: tuple[Path, pd.DataFrame]) -> None:
    path, scored = scores
    for by in ("emotion_awe", "emotion-awe", "EMOTION_AWE"):
        done = _cli("rank", path, "--by", by, "--top", "0")
        assert done.exit_code == 0, done.output
        assert _csv_paths(done.stdout) == scored.sort_values("emotion_awe", ascending=False)["path"].tolist()
    done = _cli("rank", path, "--by", "quality_raw", "--top", "3", "--ascending")
    assert _csv_paths(done.stdout) == scored.nsmallest(3, "quality_raw")["path"].tolist()
    # -t still ranks by the task's score (a classifier: its confidence); with --by, by the column
    done = _cli("rank", path, "-t", "emotion", "--top", "0")
    assert (
        _csv_paths(done.stdout) == scored.sort_values("emotion_confidence", ascending=False)["path"].tolist()
    )
    done = _cli("rank", path, "-t", "quality", "--by", "memorability", "--top", "2")
    assert _csv_paths(done.stdout) == scored.nlargest(2, "memorability")["path"].tolist()
    done = _cli("rank", path, "--by", "mem", "--top", "1")  # a task's alias: its score
    assert _csv_paths(done.stdout) == scored.nlargest(1, "memorability")["path"].tolist()


def test_the_rank_table_shows_the_column_ranked_by(
    scores: tuple[Path, pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, scored = scores
    terminal = io.StringIO()
    monkeypatch.setattr(
        perceptscore.cli, "console", Console(file=terminal, force_terminal=True, width=300, color_system=None)
    )
    assert _cli("rank", path, "--by", "emotion-anger", "--top", "2").exit_code == 0
    lines = terminal.getvalue().splitlines()
    header = next(line for line in lines if "#" in line)
    assert [cell.strip() for cell in header.strip("┃ ").split("┃")] == [
        "#", "emotion_anger", "emotion_confidence", "emotion", "path"
    ]  # fmt: skip
    best = scored.nlargest(2, "emotion_anger")
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in lines if line.startswith("│")]
    assert rows == [
        [str(n), f"{r.emotion_anger:.4f}", f"{r.emotion_confidence:.4f}", r.emotion, r.path]
        for n, r in enumerate(best.itertuples(), start=1)
    ]


def test_filter_by_any_column(scores: tuple[Path, pd.DataFrame]) -> None:
    path, scored = scores
    low, high = float(scored["emotion_awe"].median()), float(scored["quality_raw"].max() - 0.5)
    expected = scored[(scored["emotion_awe"] >= low) & (scored["quality_raw"] <= high)]["path"].tolist()
    assert 0 < len(expected) < len(scored)
    for args in (
        ["--min-emotion-awe", str(low), "--max-quality-raw", str(high)],
        [f"--min-emotion_awe={low}", f"--max-quality_raw={high}"],
    ):
        done = _cli("filter", path, *args)
        assert done.exit_code == 0, done.output
        assert done.stdout.splitlines() == expected
    # a negative bound, and a task's name for its score (emotion: the confidence) beside the named options
    conf = float(scored["emotion_confidence"].median())
    done = _cli("filter", "--max-quality-raw", "-1", path, "--min-emotion", str(conf), "--min-quality", "0.3")
    keep = (scored["quality_raw"] <= -1) & (scored["emotion_confidence"] >= conf) & (scored["quality"] >= 0.3)
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines() == scored[keep]["path"].tolist()


def test_top_fraction_by_any_column(scores: tuple[Path, pd.DataFrame]) -> None:
    path, scored = scores
    done = _cli("filter", path, "--top-fraction", "0.5", "--by", "emotion-fear")
    best = set(scored.nlargest(4, "emotion_fear")["path"])  # 7 scored rows: half, rounded up
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines() == [p for p in scored["path"] if p in best]  # input order kept


@pytest.fixture
def new_task() -> Iterator[None]:
    """A task added to the registry as a new entry of weights/registry.json would add it: no code."""
    registry = tasks.registry()
    entry = copy.deepcopy(registry["tasks"]["quality"])
    entry["aliases"] = ["aes"]
    registry["tasks"]["aesthetics"] = entry
    tasks.all_tasks.cache_clear()
    try:
        yield
    finally:
        del registry["tasks"]["aesthetics"]
        tasks.all_tasks.cache_clear()


def test_a_new_task_needs_no_cli_edit(tmp_path: Path, new_task: None) -> None:
    frame = pd.DataFrame(
        {"path": ["a.jpg", "b.jpg", "c.jpg"], "aesthetics": [0.2, 0.9, 0.5],
         "aesthetics_raw": [-3.0, 4.0, 1.0], "error": [None, None, None]}
    )  # fmt: skip
    path = tmp_path / "new.csv"
    frame.to_csv(path, index=False)
    Path(f"{path}.meta.json").write_text("{}")
    done = _cli("rank", path, "--by", "aesthetics-raw", "--top", "0")
    assert done.exit_code == 0, done.output
    assert _csv_paths(done.stdout) == ["b.jpg", "c.jpg", "a.jpg"]
    done = _cli("filter", path, "--min-aes", "0.4", "--max-aesthetics_raw", "2")
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines() == ["c.jpg"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["filter", "S", "--min-emotion-aw", "0.5"],
         "unknown column 'emotion-aw' (--min-emotion-aw): did you mean 'emotion_awe'? (COLUMNS)"),
        (["rank", "S", "--by", "qualty_raw"],
         "unknown column 'qualty_raw' (--by): did you mean 'quality_raw'? (COLUMNS)"),
        (["filter", "S", "--max-beauty", "1"], "unknown column 'beauty' (--max-beauty); COLUMNS"),
        (["filter", "S", "--frobnicate"], "no such option: --frobnicate"),
        (["filter", "S", "--copyto", "D"], "no such option: --copyto (did you mean --copy-to?)"),
        (["filter", "S", "--min-emotion-awe", "high"], "--min-emotion-awe needs a number, got 'high'"),
        (["filter", "S", "--min-emotion-awe=nan"], "--min-emotion-awe needs a number, got 'nan'"),
        (["filter", "S", "--min-emotion-awe"], "--min-emotion-awe needs a number"),
        (["filter", "S", "--min-iqa", "0.5", "--min-quality", "0.4"],
         "--min-quality and --min-iqa both bound quality"),
        (["rank", "S"], "rank needs -t TASK or --by COLUMN (e.g. --by emotion_awe)"),
        (["rank", "S", "--by", "emotion"], None),  # a classifier's name: its confidence, not its label
    ],
)  # fmt: skip
def test_a_mistyped_column_or_option_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], scores, args, message
) -> None:
    columns = ", ".join(
        ["memorability", "quality", "quality_raw", "emotion_confidence", *(f"emotion_{x}" for x in LABELS)]
    )
    known = f"columns: {columns}; or a task name for its score: memorability, quality, emotion"
    code, err = _main(monkeypatch, capsys, *[str(scores[0]) if a == "S" else a for a in args])
    if message is None:
        assert (code, err) == (0, "")
    else:
        assert (code, err) == (2, f"error: {message.replace('COLUMNS', known)}\n")


def test_a_column_of_text_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "odd.csv"
    pd.DataFrame({"path": ["a.jpg"], "memorability": ["high"], "error": [None]}).to_csv(path, index=False)
    Path(f"{path}.meta.json").write_text("{}")
    code, err = _main(monkeypatch, capsys, "filter", str(path), "--min-mem", "0.5")
    assert (code, err) == (2, "error: input's column(s) memorability hold text, not numbers\n")


def test_filter_images_scores_the_task_of_the_column(
    tmp_path: Path, photo_dir: Path, release_checkpoints
) -> None:
    checkpoint = f"emotion={release_checkpoints['emotion'][0]}"
    common = ["--checkpoint", checkpoint, "--device", "cpu", "--workers", "0"]
    scored = tmp_path / "all.csv"
    assert _cli("score", photo_dir, "-t", "emotion", *common, "-o", scored).exit_code == 0
    everything = pd.read_csv(scored)
    low = float(everything["emotion_sadness"].median())
    kept = tmp_path / "kept.csv"
    done = _cli("filter", photo_dir, "--min-emotion-sadness", str(low), *common, "-o", kept)
    assert done.exit_code == 0, done.output
    rows = pd.read_csv(kept)
    assert "emotion_sadness" in rows and "memorability" not in rows and "quality" not in rows
    assert rows["path"].tolist() == everything.loc[everything["emotion_sadness"] >= low, "path"].tolist()


def test_a_scores_file_named_with_a_dash_is_an_input_after_double_dash(
    scores: tuple[Path, pd.DataFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, frame = scores
    dashed = tmp_path / "-s.csv"
    dashed.write_bytes(path.read_bytes())
    Path(f"{dashed}.meta.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    done = _cli("filter", "--min-memorability", "0.6", "-o", "kept.txt", "--", "-s.csv")
    assert done.exit_code == 0, (done.output, done.exception)
    kept = frame[frame["memorability"] >= 0.6]["path"].tolist()
    assert (tmp_path / "kept.txt").read_text().splitlines() == kept
