"""What a run says when it ends (plain counts, --json, -q) and how it shows progress (a folder's total
counted beside the run, timestamped log lines): issue 22, items 7 and 9."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from test_nightly import photos
from typer.testing import CliRunner

from perceptscore.cli import app
from perceptscore.plan import ScoreOptions
from perceptscore.progress import Reporter


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    # on the CPU: the lines counted here come from one process; on a GPU host auto would run one per GPU
    pinned = ("--device", "cpu") if "--checkpoint" in args else ()
    result = CliRunner().invoke(app, [str(a) for a in (*args, *pinned)], env={"COLUMNS": "300"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def ckpt(release_checkpoints) -> str:
    return str(release_checkpoints["memorability"][0])


def test_the_summary_counts_scored_errors_reused_and_gone(tmp_path: Path, ckpt: str) -> None:
    folder, out = photos(tmp_path / "p", 4), tmp_path / "s.parquet"
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    first = invoke("score", folder, "-t", "mem", "--checkpoint", ckpt, "-o", out)
    assert first.exit_code == 1
    assert "4 scored, 1 error -> " in first.stderr and " in " in first.stderr, first.stderr
    (folder / "p0.jpg").unlink()
    second = invoke("score", folder, "-t", "mem", "--checkpoint", ckpt, "-o", out, "--incremental", out)
    # the broken file is scored again (an error is never reused); 3 unchanged files are reused
    assert "0 scored, 1 error, 3 reused, 1 gone since the last run -> " in second.stderr, second.stderr


def test_json_is_one_object_on_stdout_with_the_counts(tmp_path: Path, ckpt: str) -> None:
    folder, out = photos(tmp_path / "p", 3), tmp_path / "s.csv"
    first = invoke("score", folder, "-t", "mem", "--checkpoint", ckpt, "-o", out, "--json")
    assert first.exit_code == 0 and first.stderr == "", first.stderr
    (line,) = first.stdout.splitlines()
    about = json.loads(line)
    keys = ("output", "rows", "scored", "errors", "reused", "resumed", "exit_code")
    assert {k: about[k] for k in keys} == {
        "output": str(out), "rows": 3, "scored": 3, "errors": 0, "reused": 0, "resumed": 0, "exit_code": 0
    }  # fmt: skip
    assert about["seconds"] > 0 and about["gone"] is None
    again = json.loads(invoke("score", folder, "-t", "mem", "--checkpoint", ckpt, "-o", out,
                              "--incremental", out, "--json").stdout)  # fmt: skip
    assert (again["scored"], again["reused"], again["gone"], again["rows"]) == (0, 3, 0, 3)
    assert len(pd.read_csv(out)) == 3


def test_json_goes_to_stderr_when_the_rows_go_to_stdout(tmp_path: Path, ckpt: str) -> None:
    folder = photos(tmp_path / "p", 2)
    done = invoke("score", folder, "-t", "mem", "--checkpoint", ckpt, "-o", "-", "--json")
    assert done.exit_code == 0
    rows = pd.read_csv(__import__("io").StringIO(done.stdout))
    assert len(rows) == 2 and "memorability" in rows
    assert json.loads(done.stderr.splitlines()[-1])["rows"] == 2


def test_quiet_prints_nothing_unless_something_failed(tmp_path: Path, ckpt: str) -> None:
    folder, out = photos(tmp_path / "p", 2), tmp_path / "s.csv"
    done = invoke("score", folder, "-t", "mem", "--checkpoint", ckpt, "-o", out, "-q")
    assert (done.exit_code, done.stdout, done.stderr) == (0, "", "")
    assert len(pd.read_csv(out)) == 2
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    failed = invoke("score", folder, "-t", "mem", "--checkpoint", ckpt, "-o", out, "-q")
    assert failed.exit_code == 1
    assert failed.stderr.splitlines() == [
        f"error: 1 file could not be scored (the error column says why) -> {out}"
    ]  # fmt: skip


def test_a_folder_is_counted_while_it_is_walked(tmp_path: Path) -> None:
    folder = photos(tmp_path / "p", 5)
    photos(folder / "sub" / "deeper", 4)
    (folder / "notes.txt").write_text("not an image")
    sources = ScoreOptions(tasks=["memorability"]).sources([str(folder), str(folder / "p1.jpg")])
    assert sources.count() is None  # a folder: not known before it is walked
    counts = list(sources.counting(every=2))
    assert counts == sorted(counts) and counts[-1] == len(list(sources)) == 10
    assert counts == [2, 4, 6, 8, 9, 10]  # every 2nd file found, and at the end of each input
    assert sources.ignored == [str(folder / "notes.txt")]  # the count's walk does not add to it


def test_inputs_that_cannot_be_counted_cheaply_have_no_total(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n")
    assert ScoreOptions(tasks=["memorability"]).sources([f"@{listing}"]).counting() is None


def test_the_reporter_takes_the_total_from_the_count(tmp_path: Path) -> None:
    release = threading.Event()

    def counts():  # type: ignore[no-untyped-def]
        yield 3
        release.wait(30)
        yield 7

    console = Console(file=open(tmp_path / "log", "w"), force_terminal=False)  # noqa: SIM115
    with Reporter(console, None, interval=0) as reporter:
        reporter.count_in_background(counts())
        for _ in range(300):
            if reporter.found == 3:
                break
            threading.Event().wait(0.01)
        reporter.advance(2, 0)
        release.set()
        for _ in range(3000):
            if reporter.total is not None:
                break
            threading.Event().wait(0.01)
        reporter.advance(1, 1)
    console.file.close()
    first, second = (tmp_path / "log").read_text().splitlines()
    assert " scoring: 2/3+ files (counting), " in first
    assert " scoring: 3/7 files (43%), " in second and ", ETA " in second and second.endswith(", 1 errors")


def test_the_loading_label_counts_the_base_files_too(release_checkpoints, tmp_path: Path) -> None:
    import perceptscore
    from perceptscore.checkpoints import read_metadata, save_converted
    from perceptscore.plan import make_plan, weight_files
    from perceptscore.progress import weights_phase
    from perceptscore.tasks import get_task

    files = {}
    for task in ("memorability", "quality"):  # split files: a task file and the base both share
        model = perceptscore.load_model(task, checkpoint=release_checkpoints[task][0], merge=False)
        files[task] = tmp_path / f"{task}.safetensors"
        save_converted(model, get_task(task), files[task], "test", "0" * 64, split=True)
    bases = {tmp_path / read_metadata(p)["base"] for p in files.values()}  # the test towers differ
    plan = make_plan(ScoreOptions(["memorability", "quality"], {t: str(p) for t, p in files.items()}), ["x"])
    assert weight_files(plan) == {str(p) for p in (*files.values(), *bases)}
    total = sum(p.stat().st_size for p in (*files.values(), *bases))
    assert weights_phase([p.stat().st_size for p in (*files.values(), *bases)]) == (
        f"loading weights ({total / 1e6:.1f} MB)"
    )


def test_names_are_printed_as_they_are_not_as_emoji(tmp_path: Path, ckpt: str) -> None:
    folder, out = photos(tmp_path / "p", 1), tmp_path / "x:fire:.csv"
    done = invoke("score", folder, "-t", "mem", "--checkpoint", ckpt, "-o", out, "--json")
    assert json.loads(done.stdout)["output"] == str(out) and out.exists()
    again = invoke("score", folder, "-t", "mem", "--checkpoint", ckpt, "-o", out)
    assert f"-> {out} in " in again.stderr


@pytest.mark.parametrize("command", [["rank", "-t", "mem"], ["filter", "--min-memorability", "-100"]])
def test_quiet_rank_and_filter_still_say_rows_failed(tmp_path: Path, ckpt: str, command: list[str]) -> None:
    folder = photos(tmp_path / "p", 2)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    done = invoke(command[0], folder, *command[1:], "--checkpoint", ckpt, "-q", "-o", tmp_path / "o.csv")
    assert done.exit_code == 1
    assert done.stderr.splitlines() == [
        "error: 1 file could not be scored (their rows' error column says why)"
    ]
