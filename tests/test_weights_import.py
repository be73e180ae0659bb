"""Weights without the hub: ``weights import`` into the cache, ``weights path``, and the missing-weights
message in its two wordings (the command line's and Python's)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import perceptscore
from perceptscore import hub, tasks
from perceptscore.checkpoints import read_metadata
from perceptscore.cli import app, main
from perceptscore.commands import weights as weights_commands
from perceptscore.errors import CheckpointError, UsageError, WeightsNotFoundError

from test_cli_score import EXE
from test_pipeline import release_center_outputs

MEMORABILITY_URL = (
    "https://huggingface.co/PerceptCLIP/PerceptCLIP_Memorability/resolve/main/perceptCLIP_Memorability.pth"
)
X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))


def isolated(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment with caches of its own, offline, and no weights folder."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "PERCEPTSCORE_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        **extra,
    }
    env.pop("PERCEPTSCORE_WEIGHTS", None)
    return env


def perceptscore_cli(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own converted cache, for the library called in-process."""
    monkeypatch.setenv("PERCEPTSCORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("PERCEPTSCORE_WEIGHTS", raising=False)
    return tmp_path / "cache"


def copy_as(src: Path, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(src, folder / name))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(task: str, checkpoint: Path | None = None) -> torch.Tensor:
    with torch.no_grad():
        return perceptscore.load_model(task, checkpoint=checkpoint)(X)


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    """The console script in-process: exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["perceptscore", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0), capsys.readouterr().err


@pytest.fixture
def pin(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Pin a release's sha256 in the registry (the shipped registry pins none yet)."""

    def pin_sha(task: str, sha: str) -> None:
        specs = dict(tasks.all_tasks())
        specs[task] = replace(specs[task], release=replace(specs[task].release, sha256=sha))
        monkeypatch.setattr(tasks, "all_tasks", lambda: specs)

    return pin_sha


# ---- import, then score with no flag -------------------------------------------------------------------


@pytest.mark.slow
def test_imported_release_file_scores_with_no_flag_and_no_network(
    release_checkpoints, photo_dir: Path, tmp_path: Path
) -> None:
    src, release_model = release_checkpoints["memorability"]
    brought = copy_as(src, tmp_path / "usb", "perceptCLIP_Memorability.pth")  # the task read from its name
    env = isolated(tmp_path)
    done = perceptscore_cli(env, "weights", "import", brought)
    assert done.returncode == 0, done.stderr
    cached = tmp_path / "cache" / "memorability.safetensors"
    assert done.stdout == f"memorability: imported {brought} -> {cached}\n"
    assert "not checked: the registry pins none for PerceptCLIP/PerceptCLIP_Memorability" in done.stderr

    photos = [photo_dir / "a_square.jpg", photo_dir / "d_portrait.jpg"]
    out = tmp_path / "scores.csv"
    # no weights flag; --device cpu as the comparison with the release's fp32 outputs needs on a GPU host
    done = perceptscore_cli(env, "score", *photos, "-t", "mem", "--device", "cpu", "-o", out)
    assert done.returncode == 0, done.stderr
    scores = pd.read_csv(out)
    expected = release_center_outputs(release_model, photos)[:, 0]  # the release's own forward
    assert scores["memorability"].tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    used = json.loads(Path(f"{out}.meta.json").read_text())["tasks"]["memorability"]
    assert used["checkpoint"] == str(cached) and used["origin"] == "converted cache"
    assert used["source_sha256"] == sha256(brought)
    assert used["source"].startswith("imported perceptCLIP_Memorability.pth (sha256 not checked")
    assert brought.read_bytes() == src.read_bytes()  # the input is never written

    again = perceptscore_cli(env, "weights", "import", brought)
    assert (
        again.returncode == 0
        and again.stdout == f"memorability: {cached} holds this file already, nothing to do\n"
    )


def test_the_task_is_read_from_the_name_the_head_or_our_metadata(
    release_checkpoints, cache: Path, tmp_path: Path
) -> None:
    emotion = copy_as(release_checkpoints["emotion"][0], tmp_path / "in", "model.pth")  # 8 outputs: emotion
    quality = copy_as(release_checkpoints["quality"][0], tmp_path / "in", "koniq-iqa_finetune.pth")  # alias
    for path, task in ((emotion, "emotion"), (quality, "quality")):
        report = weights_commands.import_weights(str(path))
        assert report["task"] == task and report["imported"]
        # the cache's weights score as the file does
        assert torch.allclose(outputs(task), outputs(task, path), atol=1e-5, rtol=0)
        assert hub.resolve(tasks.get_task(task)).path == cache / f"{task}.safetensors"

    one_output = copy_as(release_checkpoints["memorability"][0], tmp_path / "in", "weights.pth")
    with pytest.raises(UsageError, match=r"cannot tell which task weights\.pth is for \(1 output: "
                       r"memorability or quality\): add --task"):  # fmt: skip
        weights_commands.import_weights(str(one_output))
    assert not (cache / "memorability.safetensors").exists()
    # the quality release named for memorability: both have one output, only the name tells
    iqa = copy_as(release_checkpoints["quality"][0], tmp_path / "rel", "perceptCLIP_IQA.pth")
    with pytest.raises(UsageError, match=r"perceptCLIP_IQA\.pth is the quality release, not memorability's"):
        weights_commands.import_weights(str(iqa), "memorability")
    assert not (cache / "memorability.safetensors").exists()

    # one of our own files (from `weights convert`), named anyhow: its metadata says the task
    own = tmp_path / "own" / "run7.safetensors"
    own.parent.mkdir()
    weights_commands.convert(str(one_output), str(own), "memorability", "fp32")
    report = weights_commands.import_weights(str(own))
    assert report["task"] == "memorability" and report["status"] == "unpinned"
    assert (
        read_metadata(cache / "memorability.safetensors")["source"]
        == "imported run7.safetensors (weights.pth)"
    )
    assert torch.allclose(outputs("memorability"), outputs("memorability", one_output), atol=1e-5, rtol=0)


def test_an_exported_split_file_imports_with_its_base(
    release_checkpoints, cache: Path, tmp_path: Path
) -> None:
    """The trainer's export: a task file plus base-<hash>.safetensors beside it."""
    from perceptscore.checkpoints import save_converted

    src = release_checkpoints["quality"][0]
    export = tmp_path / "run" / "koniq.safetensors"
    export.parent.mkdir()
    model = perceptscore.load_model("quality", checkpoint=src, merge=False)
    save_converted(
        model, tasks.get_task("quality"), export, "perceptscore train: koniq", "0" * 64, split=True
    )
    report = weights_commands.import_weights(str(export))
    assert report["imported"] and report["task"] == "quality"
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.safetensors")) == [
        "base",
        "quality.safetensors",
    ]
    assert torch.allclose(outputs("quality"), outputs("quality", src), atol=1e-5, rtol=0)
    (export.parent / read_metadata(export)["base"]).unlink()  # an export without its base: one clear line
    with pytest.raises(CheckpointError, match=r"its base base-\w+\.safetensors is missing"):
        weights_commands.import_weights(str(export), replace=True)


def test_other_weights_in_the_cache_are_replaced_only_when_asked(
    release_checkpoints, cache: Path, tmp_path: Path
) -> None:
    first = copy_as(release_checkpoints["memorability"][0], tmp_path, "mem-a.pth")
    second = copy_as(release_checkpoints["quality"][0], tmp_path, "mem-b.pth")  # also one output
    weights_commands.import_weights(str(first))
    held = (cache / "memorability.safetensors").read_bytes()
    with pytest.raises(
        UsageError, match=r"the cache already holds memorability weights \(imported mem-a\.pth, "
    ):
        weights_commands.import_weights(str(second))
    assert (cache / "memorability.safetensors").read_bytes() == held
    assert weights_commands.import_weights(str(second), replace=True)["imported"]
    assert torch.allclose(outputs("memorability"), outputs("memorability", second), atol=1e-5, rtol=0)


# ---- the release's sha256 --------------------------------------------------------------------------------


def test_a_file_named_as_the_release_with_another_sha256_is_refused_in_one_line(
    release_checkpoints, cache: Path, tmp_path: Path, pin, monkeypatch, capsys
) -> None:
    src = release_checkpoints["quality"][0]
    pin("quality", "ab" * 32)
    damaged = copy_as(src, tmp_path, "perceptCLIP_IQA.pth")
    code, err = run_main(monkeypatch, capsys, "weights", "import", str(damaged))
    assert code == 2
    assert err == (
        f"error: perceptCLIP_IQA.pth is not the released PerceptCLIP/PerceptCLIP_IQA/perceptCLIP_IQA.pth: "
        f"sha256 {sha256(src)[:12]}..., the release's abababababab... (a damaged copy?); download it again, "
        "or rename it to import it as your own checkpoint\n"
    )
    assert not list(cache.glob("*.safetensors"))  # nothing imported

    # the same bytes under another name: a checkpoint of the user's, imported with a warning
    own = copy_as(src, tmp_path, "my-iqa.pth")
    code, err = run_main(monkeypatch, capsys, "weights", "import", str(own))
    assert code == 0, err
    assert err == (
        "warning: not the released perceptCLIP_IQA.pth (sha256 differs): imported as your own checkpoint; "
        "scores record its sha256\n"
    )
    metadata = read_metadata(cache / "quality.safetensors")
    assert metadata["source"] == "imported my-iqa.pth (not the release: its sha256 differs)"
    assert metadata["source_sha256"] == sha256(src)


def test_the_release_itself_is_recorded_as_fetch_records_it(
    release_checkpoints, cache: Path, tmp_path: Path, pin, monkeypatch, capsys
) -> None:
    src = release_checkpoints["emotion"][0]
    pin("emotion", sha256(src))
    brought = copy_as(src, tmp_path, "perceptCLIP_Emotions.pth")
    code, err = run_main(monkeypatch, capsys, "weights", "import", str(brought))
    assert code == 0 and err == (
        f"sha256 {sha256(src)[:12]}... is the release's "
        "(PerceptCLIP/PerceptCLIP_Emotions/perceptCLIP_Emotions.pth)\n"
    )
    metadata = read_metadata(cache / "emotion.safetensors")
    assert metadata["source"] == "PerceptCLIP/PerceptCLIP_Emotions/perceptCLIP_Emotions.pth@main"
    assert metadata["source_sha256"] == sha256(src)


# ---- weights path ----------------------------------------------------------------------------------------


def test_weights_path_lists_the_search_order_and_what_is_found(release_checkpoints, tmp_path: Path) -> None:
    folder, cache = tmp_path / "weights", tmp_path / "cache"
    env = {
        "PERCEPTSCORE_WEIGHTS": str(folder),
        "PERCEPTSCORE_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf"),
    }
    copy_as(release_checkpoints["quality"][0], folder, "perceptCLIP_IQA.pth")
    result = CliRunner().invoke(app, ["weights", "import", str(folder / "perceptCLIP_IQA.pth")], env=env)
    assert result.exit_code == 0, result.output
    assert (
        f"warning: scoring takes {folder / 'perceptCLIP_IQA.pth'} first ($PERCEPTSCORE_WEIGHTS): unset it or "
        "remove it" in result.output
    )
    result = CliRunner().invoke(app, ["weights", "path", "quality", "mem"], env={**env, "COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    hub_models = tmp_path / "hf" / "hub" / "models--PerceptCLIP--PerceptCLIP"
    assert result.output.splitlines() == [
        "after --checkpoint TASK=PATH (checkpoints= in Python), the first found is taken:",
        f"quality: takes {folder / 'perceptCLIP_IQA.pth'}",
        f"  1. $PERCEPTSCORE_WEIGHTS: {folder / 'quality.safetensors'} [missing]",
        f"  2. $PERCEPTSCORE_WEIGHTS: {folder / 'perceptCLIP_IQA.pth'} [found]",
        f"  3. converted cache: {cache / 'quality.safetensors'} [found]",
        f"  4. hub cache: {hub_models}_IQA [missing]",
        "  5. download: https://huggingface.co/PerceptCLIP/PerceptCLIP_IQA/resolve/main/perceptCLIP_IQA.pth "
        "[off: HF_HUB_OFFLINE is set]",
        "memorability: no file here",
        f"  1. $PERCEPTSCORE_WEIGHTS: {folder / 'memorability.safetensors'} [missing]",
        f"  2. $PERCEPTSCORE_WEIGHTS: {folder / 'perceptCLIP_Memorability.pth'} [missing]",
        f"  3. converted cache: {cache / 'memorability.safetensors'} [missing]",
        f"  4. hub cache: {hub_models}_Memorability [missing]",
        f"  5. download: {MEMORABILITY_URL} [off: HF_HUB_OFFLINE is set]",
    ]
    online = {**env, "HF_HUB_OFFLINE": "0", "PERCEPTSCORE_WEIGHTS": None}
    lines = CliRunner().invoke(app, ["weights", "path", "emotion"], env=online).output.splitlines()
    assert lines[1:3] == ["emotion: no file here", "  1. $PERCEPTSCORE_WEIGHTS: [not set]"]
    assert lines[-1].endswith("/perceptCLIP_Emotions.pth [when none of the above is there]")


# ---- the missing-weights message -------------------------------------------------------------------------


def test_the_command_line_says_what_is_missing_the_fix_and_the_file_in_three_lines(
    tmp_path: Path, photo_dir: Path
) -> None:
    done = perceptscore_cli(isolated(tmp_path), "score", photo_dir / "a_square.jpg", "-t", "memorability")
    assert done.returncode == 3
    assert done.stderr.splitlines() == [
        "error: no weights for task memorability (HF_HUB_OFFLINE is set and nothing is cached) in "
        f"{tmp_path / 'cache'}",
        "fix: perceptscore weights fetch memorability   (no network: perceptscore weights import FILE)",
        f"file: {MEMORABILITY_URL} (1.23 GB)",
    ]


def test_python_is_told_about_checkpoints_not_commands(cache: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as raised:
        perceptscore.Scorer(tasks=["memorability"], device="cpu")
    assert str(raised.value).splitlines() == [
        f"no weights for task memorability (HF_HUB_OFFLINE is set and nothing is cached) in {cache}",
        'fix: download the file below and pass checkpoints={"memorability": "PATH"} '
        '(load_model: checkpoint="PATH")',
        f"file: {MEMORABILITY_URL} (1.23 GB)",
    ]
    assert "perceptscore weights" not in str(raised.value) and "--checkpoint" not in str(raised.value)
    # both wordings survive a trip to a worker process and back
    back = pickle.loads(pickle.dumps(raised.value))
    assert str(back) == str(raised.value) and back.cli_lines == raised.value.cli_lines
    assert back.cli_lines[1].startswith("fix: perceptscore weights fetch memorability")
    assert str(type(back)("node n1: no weights")) == "node n1: no weights"  # as the Ray engine re-raises it
