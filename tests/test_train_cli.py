"""`perceptscore train` and `perceptscore eval` through the real executable, on synthetic images whose labels
are a known function of their pixels, with a tiny random CLIP tower on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr

from fake_hub import FakeHub
from synthetic import blur_set, colour_set, tiny_clip
from test_cli_score import EXE
from test_pipeline import release_center_outputs

CPU = ["--device", "cpu"]


def perceptscore(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    blur_set(folder, 400)
    colour_set(folder, 320)
    tiny_clip(folder / "tiny.safetensors")
    return folder


def _quality_args(data: Path, out: Path) -> list[str | Path]:
    return [
        "train", "-t", "quality", "--data", data / "blur.csv", "-o", out, "--init", data / "tiny.safetensors",
        "--epochs", "8", "--batch-size", "16", "--lr", "5e-3", *CPU,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def quality_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "quality"
    done = perceptscore(*_quality_args(data, out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_regression_learns_blur_and_score_reproduces_the_trainers_values(
    quality_run: Path, data: Path
) -> None:
    results = json.loads((quality_run / "export" / "blur.eval.json").read_text())
    assert results["test"]["srcc"] >= 0.9 and results["val"]["srcc"] >= 0.9, results
    assert results["test"]["n"] == 40 and results["test"]["errors"] == 0

    # The exported file through `perceptscore score`: the very values the trainer's evaluation computed.
    predictions = pd.read_csv(quality_run / "export" / "blur.predictions-test.csv")
    checkpoint = quality_run / "export" / "blur.safetensors"
    scores = quality_run / "scores.csv"
    done = perceptscore(
        "score",
        *predictions["path"],
        "-t",
        "quality",
        "--checkpoint",
        f"quality={checkpoint}",
        *CPU,
        "-o",
        scores,
    )
    assert done.returncode == 0, done.stderr
    scored = pd.read_csv(scores)
    assert scored["path"].tolist() == predictions["path"].tolist()
    np.testing.assert_allclose(scored["quality_raw"], predictions["quality_raw"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(scored["quality"], predictions["quality"], rtol=0, atol=1e-6)
    # and the metrics recomputed from those scores, independently, are the trainer's
    assert spearmanr(scored["quality_raw"], predictions["label"]).statistic == pytest.approx(
        results["test"]["srcc"], abs=1e-9
    )
    assert pearsonr(scored["quality_raw"], predictions["label"]).statistic == pytest.approx(
        results["test"]["plcc"], abs=1e-6
    )

    # The calibration maps the labels' span onto the display range 0..1.
    assert (
        np.corrcoef(scored["quality"], predictions["label"] / 4)[0, 1] > 0.85
        and abs(np.median(scored["quality"] - predictions["label"] / 4)) < 0.15
    )

    # `perceptscore eval` on the same split reports the same numbers.
    metrics_file = quality_run / "metrics.json"
    done = perceptscore(
        "eval", data / "blur.csv", "-t", "quality", "--dataset", "manifest", "--split", "test",
        "--checkpoint", checkpoint, *CPU, "-o", metrics_file,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    reported = json.loads(metrics_file.read_text())
    assert reported["srcc"] == pytest.approx(results["test"]["srcc"], abs=1e-9) and reported["n"] == 40
    assert "srcc" in done.stdout and "plcc" in done.stdout

    card = (quality_run / "export" / "blur.md").read_text()
    assert "| loss | pearson | release |" in card and "| epochs | 8 | user |" in card
    assert "| weight_decay | 0.01 | ours |" in card and "1 - PLCC over the batch" in card
    assert f"{results['test']['srcc']:.4f}" in card and "calibration: raw outputs scaled by" in card
    log = pd.read_csv(quality_run / "train" / "log.csv")
    train = json.loads((quality_run / "config.json").read_text())["data"]["blur"]["splits"]["train"]
    assert log["step"].tolist() == list(range(1, 8 * (train // 16) + 1))  # full batches of 16, 8 epochs


@pytest.mark.slow
def test_classification_learns_colours_and_score_gives_the_same_labels(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "emotion"
    done = perceptscore(
        "train", "-t", "emotion", "--data", data / "colour.csv", "-o", out,
        "--init", data / "tiny.safetensors",
        "--epochs", "6", "--batch-size", "16", "--lr", "1e-3", *CPU,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "export" / "colour.eval.json").read_text())
    assert results["test"]["accuracy"] >= 0.9, results
    assert {f"accuracy_{e}" for e in ("amusement", "sadness")} <= results["test"].keys()
    predictions = pd.read_csv(out / "export" / "colour.predictions-test.csv")
    done = perceptscore(
        "score", *predictions["path"], "-t", "emotion",
        "--checkpoint", f"emotion={out / 'export' / 'colour.safetensors'}",
        *CPU, "-o", tmp_path / "s.parquet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    scored = pd.read_parquet(tmp_path / "s.parquet")
    assert scored["emotion"].tolist() == predictions["emotion"].tolist()
    np.testing.assert_allclose(scored["emotion_confidence"], predictions["emotion_confidence"], atol=1e-6)
    # `perceptscore eval` of the test split reports the trainer's accuracy (labels read back as indices)
    done = perceptscore(
        "eval", data / "colour.csv", "-t", "emotion", "--dataset", "manifest", "--split", "test",
        "--checkpoint", out / "export" / "colour.safetensors", *CPU, "-o", tmp_path / "m.json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(results["test"], nan_ok=True)
    truth = pd.read_csv(data / "colour.csv").set_index("path")["label"]
    hits = [truth[Path(p).name] == e for p, e in zip(scored["path"], scored["emotion"], strict=True)]
    assert np.mean(hits) == pytest.approx(results["test"]["accuracy"])


@pytest.mark.slow
def test_two_stage_training_exports_one_checkpoint_per_target(data: Path, tmp_path: Path) -> None:
    # Two datasets sharing a signal (blur) on different label scales: radius in px, and 25 x radius + 1.
    a = blur_set(tmp_path / "a", 160, seed=1, name="a")
    b = blur_set(tmp_path / "b", 160, seed=2, name="b")
    frame = pd.read_csv(b)
    frame.assign(label=frame["label"] * 25 + 1).to_csv(b, index=False)
    out = tmp_path / "run"
    done = perceptscore(
        "train", "-t", "memorability", "--data", a, "--data", b, "-o", out,
        "--init", data / "tiny.safetensors",
        "--epochs", "2", "--stage2-epochs", "1", "--batch-size", "16", "--lr", "3e-3", *CPU,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "export",
        "stage1",
        "stage2-a",
        "stage2-b",
    ]
    sizes = json.loads((out / "config.json").read_text())["data"]
    per_epoch = sum(sizes[name]["splits"]["train"] // 16 for name in ("a", "b"))
    assert len(pd.read_csv(out / "stage1" / "log.csv")) == 2 * per_epoch  # both datasets' batches, each epoch
    heads = load_file(out / "stage1" / "best.safetensors")
    assert {k.split(".")[1] for k in heads if k.startswith("heads.")} == {"a", "b"}  # one head per dataset
    for target in ("a", "b"):
        exported = out / "export" / f"{target}.safetensors"
        assert exported.is_file() and (out / "export" / f"{target}.md").is_file()
        # stage 2 starts from stage 1's tower and this target's head: its first loss is already low
        first2 = pd.read_csv(out / f"stage2-{target}" / "log.csv")["loss"].iloc[0]
        first1 = pd.read_csv(out / "stage1" / "log.csv")["loss"].iloc[:4].max()
        assert first2 < first1
        done = perceptscore(
            "score", tmp_path / target / f"{target}0000.png", "-t", "mem", "--checkpoint", exported, *CPU
        )
        assert done.returncode == 0, done.stderr
    assert len(list((out / "export").glob("base-*.safetensors"))) == 1  # the frozen tower, shared
    assert "two stages (stage 1 on a, b)" in (out / "export" / "b.md").read_text()


def _train_args(data: Path, out: Path) -> list[str | Path]:
    return [
        "train", "-t", "memorability", "--data", data / "blur.csv", "-o", out,
        "--init", data / "tiny.safetensors",
        "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--save-every", "3", *CPU,
    ]  # fmt: skip


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
    data: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole"
    done = perceptscore(*_train_args(data, whole))
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen([EXE, *map(str, _train_args(data, killed))], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log = killed / "train" / "log.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 1 + 8:  # 8 steps done: a checkpoint exists
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "train" / "checkpoint.pt", weights_only=True)
    step = state["step"]
    per_epoch = json.loads((killed / "config.json").read_text())["data"]["blur"]["splits"]["train"] // 16
    assert 6 <= step < 2 * per_epoch and (
        step % 3 == 0 or step == per_epoch
    )  # every 3 steps, each epoch's end

    done = perceptscore(*_train_args(data, killed), "--resume")
    assert done.returncode == 0, done.stderr
    assert f"train: resumed at step {step}" in done.stderr

    # Same steps, same losses: the same data, augmentation, dropout and optimizer state after the checkpoint.
    columns = ["step", "epoch", "lr", "loss", "images", "skipped"]
    a = pd.read_csv(whole / "train" / "log.csv")[columns]
    b = pd.read_csv(killed / "train" / "log.csv")[columns]
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(
        pd.read_csv(whole / "train" / "metrics.csv"), pd.read_csv(killed / "train" / "metrics.csv")
    )
    assert json.loads((whole / "export" / "blur.eval.json").read_text()) == json.loads(
        (killed / "export" / "blur.eval.json").read_text()
    )
    ours, theirs = (torch.load(r / "train" / "checkpoint.pt", weights_only=True) for r in (whole, killed))
    for key in ours["optimizer"]["state"]:
        for name, value in ours["optimizer"]["state"][key].items():
            assert torch.equal(value, theirs["optimizer"]["state"][key][name]), name
    exported = [load_file(r / "export" / "blur.safetensors") for r in (whole, killed)]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def _stats(folder: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_user_mistakes_are_one_line_errors(data: Path, quality_run: Path, tmp_path: Path) -> None:
    done = perceptscore(
        "train",
        "-t",
        "mem",
        "--data",
        f"lamem={tmp_path}",
        "-o",
        tmp_path / "r",
        "--init",
        data / "tiny.safetensors",
    )
    assert (
        done.returncode == 2
        and done.stderr.startswith("error: dataset lamem at")
        and "Traceback" not in done.stderr
    )
    assert "expected images/ and splits/" in done.stderr and "found an empty folder" in done.stderr

    # the module's finished run (not a run of its own: a training run is the slow part): the same command
    # again, and a resume with other settings, are refused and change none of its files
    args = _quality_args(data, quality_run)
    files = _stats(quality_run)
    again = perceptscore(*args)
    assert again.returncode == 2 and "already holds a training run: add --resume" in again.stderr
    changed = perceptscore(*[a if a != "5e-3" else "1e-3" for a in args], "--resume")
    assert (
        changed.returncode == 2 and "differs from the run" in changed.stderr and "settings" in changed.stderr
    )
    assert _stats(quality_run) == files

    done = perceptscore(
        "train", "-t", "quality", "--data", data / "blur.csv", "-o", tmp_path / "o", "--init", "openai"
    )
    assert done.returncode == 3 and "base 'openai' is not downloaded and HF_HUB_OFFLINE is set" in done.stderr
    for init, message in (
        (tmp_path / "nope.safetensors", "nope.safetensors: no such file"),
        ("laion", "unknown base 'laion'"),
    ):
        done = perceptscore(
            "train", "-t", "quality", "--data", data / "blur.csv", "-o", tmp_path / "p", "--init", init
        )
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_init_openai_downloads_the_tower_once(data: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf"),
        "PERCEPTSCORE_CACHE": str(tmp_path / "c"),
    }
    with FakeHub() as hub:
        hub.add(
            "timm/vit_large_patch14_clip_224.openai",
            "open_clip_model.safetensors",
            (data / "tiny.safetensors").read_bytes(),
        )
        env["HF_ENDPOINT"] = hub.endpoint
        for run in ("one", "two"):
            done = perceptscore(
                "train", "-t", "quality", "--data", data / "blur.csv", "-o", tmp_path / run,
                "--max-steps", "1",
                "--batch-size", "4", *CPU, env=env,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        assert [r.method for r in hub.file_requests] == ["HEAD", "GET"]  # the second run used the hub cache
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["init"]["source"] == "timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors"
    assert config["init"]["sha256"] == hub.etag(
        "timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors"
    )


@pytest.mark.slow
def test_eval_scores_a_released_checkpoint_against_labels(
    release_checkpoints, photo_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    paths = sorted(photo_dir.iterdir())
    labels = np.linspace(0.2, 0.9, len(paths))[::-1]
    pd.DataFrame({"path": [str(p) for p in paths], "label": labels}).to_csv(tmp_path / "m.csv", index=False)
    path, reference = release_checkpoints["memorability"]
    done = perceptscore(
        "eval", tmp_path / "m.csv", "-t", "mem", "--checkpoint", path, *CPU, "-o", tmp_path / "m.json"
    )
    assert done.returncode == 0, done.stderr
    expected = release_center_outputs(reference, paths)[:, 0]  # the release's own structure and torchvision
    reported = json.loads((tmp_path / "m.json").read_text())
    assert reported["srcc"] == pytest.approx(spearmanr(expected, labels).statistic, abs=1e-9)
    assert reported["plcc"] == pytest.approx(pearsonr(expected, labels).statistic, abs=1e-5)
    missing = perceptscore("eval", photo_dir, "-t", "mem", "--checkpoint", path, *CPU)
    assert (
        missing.returncode == 2
        and "no label column 'label' in the input (columns found: path" in missing.stderr
    )


@pytest.mark.slow
def test_bf16_on_cpu_trains_and_unreadable_images_are_skipped_not_fatal(data: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(data / "blur.csv").head(48)
    frame["path"] = [str(data / p) for p in frame["path"]]
    broken = tmp_path / "broken.png"
    broken.write_bytes((data / "blur0000.png").read_bytes()[:200])  # truncated
    frame = pd.concat(
        [frame, pd.DataFrame({"path": [str(broken)], "label": [1.0], "split": ["train"]})], ignore_index=True
    )
    frame["split"] = frame["split"].fillna("train")
    frame.loc[frame.index[:8], "split"] = "val"
    frame.to_csv(tmp_path / "m.csv", index=False)
    args = ["train", "-t", "mem", "--data", tmp_path / "m.csv", "--init", data / "tiny.safetensors", *CPU]
    done = perceptscore(
        *args, "-o", tmp_path / "run", "--batch-size", "41", "--epochs", "3", "--precision", "bf16"
    )
    assert done.returncode == 0, done.stderr
    assert f"skipped {broken}: unreadable image" in done.stderr
    log = pd.read_csv(tmp_path / "run" / "train" / "log.csv")
    assert log["skipped"].sum() == 3 and log["images"].sum() == 3 * 40  # 3 epochs of 40 readable images
    assert np.isfinite(log["loss"]).all()
    refused = perceptscore(*args, "-o", tmp_path / "fp16", "--precision", "fp16")
    assert refused.returncode == 2 and "fp16 training needs CUDA" in refused.stderr
