"""What the CLI says: a mistyped task gets its likely name, a half-given option says what it lacks, eval
speaks of evaluation, a missing output folder reads the same everywhere, and nothing a user must read or
fetch is cut at the terminal's width. All through the console script in this process; no model runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from perceptscore.cli import app, main
from perceptscore.tasks import all_tasks

KNOWN = "(known: memorability, quality, emotion)"


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The console script in-process (``main``: how a usage error becomes one line): exit code, stderr."""
    monkeypatch.setattr(sys, "argv", ["perceptscore", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0), capsys.readouterr().err


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """A photo and a scores file (as `score` writes them) to point commands at."""
    photo = tmp_path / "a.jpg"
    Image.new("RGB", (32, 32), "red").save(photo)
    scores = tmp_path / "scores.csv"
    pd.DataFrame(
        {
            "path": [str(photo)],
            "memorability": [0.5],
            "quality": [0.4],
            "quality_raw": [40.0],
            "error": [None],
        }
    ).to_csv(scores, index=False)
    return {"PHOTO": str(photo), "SCORES": str(scores), "MISSING": str(tmp_path / "nope")}


def _args(args: list[str], files: dict[str, str]) -> list[str]:
    for key, value in files.items():
        args = [a.replace(key, value) for a in args]
    return args


@pytest.mark.parametrize(
    ("args", "typo", "meant"),
    [
        (["score", "PHOTO", "-t", "memorabilty"], "memorabilty", "memorability"),
        (["score", "PHOTO", "-t", "mem", "--checkpoint", "memorabilty=x.pth"], "memorabilty", "memorability"),
        (
            ["score", "PHOTO", "-t", "mem,iqa", "--checkpoint", "memorabilty=x.pth"],
            "memorabilty",
            "memorability",
        ),
        (["rank", "SCORES", "-t", "qualty"], "qualty", "quality"),
        (["weights", "card", "emotoins"], "emotoins", "emotion"),
        (["weights", "card", "emo"], "emo", "emotion"),  # a prefix: difflib alone would say "mem"
    ],
)
def test_a_mistyped_task_gets_its_likely_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], files, args, typo, meant
) -> None:
    code, err = _main(monkeypatch, capsys, *_args(args, files))
    assert (code, err) == (2, f"error: unknown task {typo!r}: did you mean {meant!r}? {KNOWN}\n")


def test_a_task_like_nothing_known_lists_the_tasks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], files
) -> None:
    code, err = _main(
        monkeypatch, capsys, "score", files["PHOTO"], "-t", "mem,iqa", "--checkpoint", "beauty=x"
    )
    assert code == 2
    assert (
        err
        == "error: unknown task 'beauty'; known tasks: memorability (mem), quality (iqa), emotion (emotions)"
        "\n"
    )


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--top-fraction", "0.1"], "--top-fraction needs --by TASK"),
        (["--by", "quality"], "--by needs --top-fraction F"),
    ],
)
def test_half_a_top_fraction_says_what_it_lacks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], files, given, message
) -> None:
    code, err = _main(monkeypatch, capsys, "filter", files["SCORES"], *given)
    assert (code, err) == (2, f"error: {message}\n")


def test_eval_speaks_of_evaluation(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], files
) -> None:
    code, err = _main(monkeypatch, capsys, "eval", files["PHOTO"], "-t", "mem", "--dataset", "lamme")
    known = "lamem, memcat, koniq, livec, spaq, emoset, fi, manifest"
    assert (code, err) == (2, f"error: unknown --dataset 'lamme': did you mean 'lamem'? (known: {known})\n")
    # Without the train extra (scipy missing: an import that fails as it does where it is not installed).
    monkeypatch.setitem(sys.modules, "scipy", None)
    code, err = _main(monkeypatch, capsys, "eval", files["SCORES"], "-t", "mem")
    assert code == 2 and err.startswith("error: evaluation needs the train extra (scipy is missing)")


@pytest.mark.parametrize(
    "args",
    [
        ["score", "PHOTO", "-t", "mem", "-o", "MISSING/out.csv"],
        ["rank", "SCORES", "-t", "mem", "-o", "MISSING/out.parquet"],
        ["filter", "SCORES", "--min-quality", "0", "-o", "MISSING/out.jsonl"],
        ["filter", "SCORES", "--min-quality", "0", "-o", "MISSING/kept.txt"],
        ["report", "SCORES", "-o", "MISSING/report.html"],
        ["explain", "PHOTO", "-t", "mem", "-o", "MISSING/maps"],
        ["weights", "convert", "PHOTO", "MISSING/mem.safetensors", "-t", "mem"],
        ["eval", "SCORES", "-t", "mem", "-o", "MISSING/metrics.json"],
    ],
    ids=lambda a: " ".join(a[:2]) + (" list" if a[-1].endswith(".txt") else ""),
)
def test_an_output_into_a_missing_folder_reads_the_same_everywhere(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], files, args
) -> None:
    """Refused before any work (no weights exist here: a command that went on would fail otherwise)."""
    code, err = _main(monkeypatch, capsys, *_args(args, files))
    assert (code, err) == (2, f"error: output folder {files['MISSING']!r} does not exist\n")


def _column(output: str, index: int) -> list[str]:
    """One column of a Rich table, each row's cell with the line breaks Rich folded in removed."""
    cells: list[str] = []
    for line in output.splitlines():
        if not line.startswith("│"):
            continue
        parts = [p.strip() for p in line.strip("│").split("│")]
        if parts[0]:  # a row's first line names its task; the next ones continue its cells
            cells.append(parts[index])
        else:
            cells[-1] += parts[index]
    return cells


@pytest.mark.parametrize(("command", "index"), [(["tasks"], 3), (["weights", "list"], 1)])
def test_tables_never_cut_the_file_to_fetch(command: list[str], index: int) -> None:
    result = CliRunner().invoke(app, command, env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert max(map(len, result.output.splitlines())) <= 60
    fetch = [f"{t.release.repo_id}/{t.release.filename}" for t in all_tasks().values()]
    cells = _column(result.output, index)
    assert len(cells) == len(fetch) and all(f in cell for f, cell in zip(fetch, cells, strict=True)), cells


@pytest.mark.parametrize("task", list(all_tasks()))
def test_a_model_card_wraps_to_the_terminal(task: str) -> None:
    narrow = CliRunner().invoke(app, ["weights", "card", task], env={"COLUMNS": "60"})
    wide = CliRunner().invoke(app, ["weights", "card", task], env={"COLUMNS": "300"})
    assert narrow.exit_code == wide.exit_code == 0
    assert max(map(len, narrow.output.splitlines())) <= 60
    assert narrow.output.split() == wide.output.split()  # every word, in order: nothing cut
