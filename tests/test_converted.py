"""Our safetensors format: the same scores as the release file, a shared base, and clear refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import perceptscore
from perceptscore import hub
from perceptscore.checkpoints import save_converted
from perceptscore.commands import weights as weights_commands
from perceptscore.errors import CheckpointError
from perceptscore.tasks import get_task

X = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(11))

# fp16 storage moves raw outputs, relative to their largest magnitude, by 7e-5 at full ViT-L/14 size
# (bench/load_time.py) and by 3e-4 to 4e-3 on these tiny random models (small outputs, rounded head weights).
FP16_TOLERANCE = 5e-3


def outputs(task: str, checkpoint: Path, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return perceptscore.load_model(task, checkpoint=checkpoint, **kwargs)(X)


@pytest.mark.parametrize("task", ["memorability", "emotion"])
def test_fp32_conversion_scores_like_the_release_file(release_checkpoints, tmp_path: Path, task: str) -> None:
    src = release_checkpoints[task][0]
    report = weights_commands.convert(str(src), str(tmp_path / "c.safetensors"), task, "fp32")
    assert report["source_sha256"] == hub.file_sha256(src)
    for merge in (False, True):
        expected, got = (
            outputs(task, src, merge=merge),
            outputs(task, tmp_path / "c.safetensors", merge=merge),
        )
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_fp16_conversion_halves_the_file_within_the_documented_tolerance(
    release_checkpoints, tmp_path: Path
) -> None:
    src = release_checkpoints["quality"][0]
    weights_commands.convert(str(src), str(tmp_path / "32.safetensors"), "quality", "fp32")
    weights_commands.convert(str(src), str(tmp_path / "16.safetensors"), "quality", "fp16")
    assert (tmp_path / "16.safetensors").stat().st_size < 0.55 * (tmp_path / "32.safetensors").stat().st_size
    expected = outputs("quality", src)
    deviation = (
        outputs("quality", tmp_path / "16.safetensors") - expected
    ).abs().max() / expected.abs().max()
    assert 0 < deviation < FP16_TOLERANCE


def release_pair_with_one_base(release_checkpoints, tmp_path: Path) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """Two release-layout files for two tasks with the same frozen base, as the three releases have."""
    first = torch.load(release_checkpoints["memorability"][0], weights_only=True)
    second = {k: (v + 0.01 if "lora_" in k or k.startswith("mlp.") else v) for k, v in first.items()}
    paths = (tmp_path / "perceptCLIP_Memorability.pth", tmp_path / "perceptCLIP_IQA.pth")
    torch.save(first, paths[0])
    torch.save(second, paths[1])
    return paths


def test_split_conversion_stores_one_base_for_tasks_that_share_it(
    release_checkpoints, tmp_path: Path
) -> None:
    mem, iqa = release_pair_with_one_base(release_checkpoints, tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    for task, src in (("memorability", mem), ("quality", iqa)):
        model = perceptscore.load_model(task, checkpoint=src, merge=False)
        save_converted(
            model, get_task(task), cache / f"{task}.safetensors", str(src), hub.file_sha256(src), split=True
        )
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and files[0].startswith("base-")
    umask = os.umask(0)
    os.umask(umask)
    assert {(cache / f).stat().st_mode & 0o777 for f in files} == {0o666 & ~umask}  # shareable, not 0600
    base_size = (cache / files[0]).stat().st_size
    assert (cache / "quality.safetensors").stat().st_size < base_size
    assert torch.allclose(
        outputs("quality", cache / "quality.safetensors"), outputs("quality", iqa), atol=1e-5, rtol=0
    )
    # what a Ray model actor asks for: each task's file and the base it loads (a copy each)
    from types import SimpleNamespace

    from perceptscore.plan import base_of, model_bytes

    converted = [cache / "memorability.safetensors", cache / "quality.safetensors"]
    plan = SimpleNamespace(weights=[SimpleNamespace(path=str(f)) for f in converted])
    assert base_of(str(converted[0])) == str(cache / files[0]) and base_of(str(mem)) is None
    assert model_bytes(plan) == sum(f.stat().st_size for f in converted) + 2 * base_size  # type: ignore[arg-type]
    (cache / files[0]).unlink()
    with pytest.raises(CheckpointError, match=f"its base {files[0]} is missing from"):
        perceptscore.load_model("quality", checkpoint=cache / "quality.safetensors")


def test_converted_files_that_do_not_fit_are_refused(release_checkpoints, tmp_path: Path) -> None:
    weights_commands.convert(
        str(release_checkpoints["emotion"][0]), str(tmp_path / "e.safetensors"), "emotion", "fp32"
    )
    with pytest.raises(CheckpointError, match="holds task 'emotion', not memorability"):
        perceptscore.load_model("memorability", checkpoint=tmp_path / "e.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "other.safetensors", metadata={"format": "somebody-else"})
    with pytest.raises(CheckpointError, match="not a perceptscore file"):
        perceptscore.load_model("emotion", checkpoint=tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        perceptscore.load_model("emotion", checkpoint=tmp_path / "broken.safetensors")


def test_resolution_order(release_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = get_task("emotion")
    folder, cache = tmp_path / "weights", tmp_path / "cache"
    folder.mkdir()
    cache.mkdir()
    monkeypatch.setenv("PERCEPTSCORE_WEIGHTS", str(folder))
    monkeypatch.setenv("PERCEPTSCORE_CACHE", str(cache))
    src = release_checkpoints["emotion"][0]
    weights_commands.convert(str(src), str(cache / "emotion.safetensors"), "emotion", "fp32")
    (folder / task.release.filename).write_bytes(src.read_bytes())
    assert hub.resolve(task, src).origin == "--checkpoint"
    assert hub.resolve(task).path == folder / task.release.filename
    (folder / task.release.filename).unlink()
    assert hub.resolve(task) == hub.Weights("emotion", cache / "emotion.safetensors", "converted cache")
    with pytest.raises(CheckpointError, match="no such file"):
        hub.resolve(task, tmp_path / "typo.pth")


@pytest.mark.slow
def test_weights_commands_from_the_shell(release_checkpoints, tmp_path: Path) -> None:
    from test_cli_score import run

    src = release_checkpoints["emotion"][0]
    done = run(
        "weights", "convert", src, tmp_path / "e.safetensors", "--task", "emotion", "--precision", "fp16"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"emotion: wrote {tmp_path / 'e.safetensors'}")
    done = run("weights", "verify", tmp_path / "e.safetensors")
    assert done.returncode == 0, done.stderr
    assert "task: emotion" in done.stdout and "precision: fp16" in done.stdout and "outputs: 8" in done.stdout
    assert f"source_sha256: {hub.file_sha256(src)}" in done.stdout
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "e.safetensors").read_bytes()[:1000])
    done = run("weights", "verify", tmp_path / "cut.safetensors")
    assert (
        done.returncode == 2
        and done.stderr.startswith("error: checkpoint")
        and "Traceback" not in done.stderr
    )
    unnamed = tmp_path / "model.pth"  # one output and no task in its name: memorability or quality?
    unnamed.write_bytes(release_checkpoints["memorability"][0].read_bytes())
    done = run("weights", "convert", unnamed, tmp_path / "x.safetensors")
    assert done.returncode == 2, done.stderr
    said = "cannot tell which task model.pth is for (1 output: memorability or quality): add --task"
    assert said in done.stderr
    done = run("weights", "list")
    assert done.returncode == 0 and "PerceptCLIP/PerceptCLIP_Emotions" in done.stdout
