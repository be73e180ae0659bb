"""The trainer's parts against independent computations: losses, metrics, schedule, data order,
dataset adapters (fake folders in each dataset's published layout) and the starting tower."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file
from scipy.io import savemat
from scipy.stats import pearsonr

from perceptscore.errors import UsageError
from perceptscore.model import PerceptModel
from perceptscore.tasks import get_task
from perceptscore.trainer import datasets, losses, metrics
from perceptscore.trainer.base import load_base
from perceptscore.trainer.data import TrainBatch, epoch_batches
from perceptscore.trainer.datasets import LayoutError, hash_split, load_dataset
from perceptscore.trainer.loop import Device, Settings, Stage, StageRun, TrainNet, lr_factor

from synthetic import tiny_clip

# ---- losses ------------------------------------------------------------------------------------------------


def test_mse_and_cross_entropy_match_numpy() -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(7, 1)), rng.normal(size=7)
    got = losses.mse(torch.tensor(pred), torch.tensor(target)).item()
    assert got == pytest.approx(np.mean((pred[:, 0] - target) ** 2), rel=1e-6)

    logits, classes = rng.normal(size=(5, 8)), rng.integers(0, 8, size=5)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_softmax[np.arange(5), classes].mean()
    assert losses.cross_entropy(torch.tensor(logits), torch.tensor(classes)).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_pearson_loss_is_one_minus_scipys_correlation_and_ignores_scale() -> None:
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(9, 1)), rng.normal(size=9)
    expected = 1 - pearsonr(pred[:, 0], target).statistic
    got = losses.pearson(torch.tensor(pred), torch.tensor(target)).item()
    assert got == pytest.approx(expected, abs=1e-6)
    scaled = losses.pearson(torch.tensor(pred * 7.5 - 3), torch.tensor(target)).item()
    assert scaled == pytest.approx(got, abs=1e-6)
    assert losses.pearson(
        torch.tensor(target[:, None] * 2 + 1), torch.tensor(target)
    ).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        losses.pearson(torch.zeros(1, 1), torch.zeros(1))


def test_pearson_loss_gradient_points_where_its_definition_does() -> None:
    """Autograd's gradient against central differences of 1 - r computed by numpy alone."""
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=6), rng.normal(size=6)

    def definition(p: np.ndarray) -> float:
        pc, tc = p - p.mean(), target - target.mean()
        return 1 - float((pc * tc).sum() / np.sqrt((pc**2).sum() * (tc**2).sum()))

    h = 1e-6
    numeric = np.array([(definition(pred + h * e) - definition(pred - h * e)) / (2 * h) for e in np.eye(6)])
    x = torch.tensor(pred[:, None], requires_grad=True)
    losses.pearson(x, torch.tensor(target)).backward()
    grad = x.grad[:, 0].numpy()
    cosine = grad @ numeric / (np.linalg.norm(grad) * np.linalg.norm(numeric))
    assert cosine > 0.9999
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-6)
    # and a step against it lowers the loss
    assert definition(pred - 0.01 * grad) < definition(pred)


# ---- metrics -----------------------------------------------------------------------------------------------


def test_regression_metrics_match_rank_and_moment_formulas() -> None:
    rng = np.random.default_rng(3)
    p, t = rng.normal(size=50), rng.normal(size=50)
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 - no ties in continuous data
    m = metrics.regression(p, t)
    assert m["srcc"] == pytest.approx(np.corrcoef(ranks(p), ranks(t))[0, 1], abs=1e-12)
    assert m["plcc"] == pytest.approx(np.corrcoef(p, t)[0, 1], abs=1e-12)
    assert math.isnan(metrics.regression([1.0, 1.0], [0.0, 1.0])["srcc"])  # constant predictions


def test_classification_metrics_count_per_class() -> None:
    m = metrics.classification([0, 1, 1, 2, 0], [0, 1, 2, 2, 1], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert (m["accuracy_a"], m["accuracy_b"], m["accuracy_c"]) == (1.0, 0.5, 0.5)
    assert metrics.primary(m) == ("accuracy", m["accuracy"])


# ---- schedule and data order -------------------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_then_decays_by_cosine() -> None:
    total = 100
    assert [lr_factor(s, total, 0.05) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_factor(5, total, 0.05) == pytest.approx(1.0)
    assert lr_factor(5 + 95 // 2, total, 0.05) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert lr_factor(99, total, 0.05) < 0.001


def test_epoch_batches_cover_each_dataset_once_and_depend_only_on_the_seed() -> None:
    batches = epoch_batches([37, 10, 3], batch_size=8, seed=5, stage=1, epoch=0)
    assert batches == epoch_batches([37, 10, 3], batch_size=8, seed=5, stage=1, epoch=0)
    assert batches != epoch_batches([37, 10, 3], batch_size=8, seed=5, stage=1, epoch=1)
    assert all(len({d for d, _ in b}) == 1 for b in batches)  # one dataset per batch
    per_set = {d: sorted(i for b in batches for dd, i in b if dd == d) for d in range(3)}
    assert len(per_set[0]) == 32 and len(set(per_set[0])) == 32  # full batches; the partial one dropped
    assert len(per_set[1]) == 8 and per_set[2] == [0, 1, 2]  # a set smaller than a batch: one batch
    assert len(batches) == 4 + 1 + 1


def test_hash_split_is_stable_and_near_80_10_10() -> None:
    splits = [hash_split(f"img{i}.jpg") for i in range(5000)]
    assert splits == [hash_split(f"img{i}.jpg") for i in range(5000)]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["val"] - 0.1) < 0.02


# ---- dataset adapters --------------------------------------------------------------------------------------


def _images(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / name)


def test_lamem_reads_its_official_split_files(tmp_path: Path) -> None:
    _images(tmp_path / "images", [f"{i:08d}.jpg" for i in range(6)])
    (tmp_path / "splits").mkdir()
    for split, ids in {"train": [0, 1, 2], "val": [3], "test": [4, 5]}.items():
        (tmp_path / "splits" / f"{split}_2.txt").write_text("".join(f"{i:08d}.jpg 0.{i}5 0.1\n" for i in ids))
    data = load_dataset(f"lamem={tmp_path}", get_task("memorability"), split_id=2)
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [3, 1, 2]
    assert data.splits["test"][1] == datasets.Example(str(tmp_path / "images" / "00000005.jpg"), 0.55)
    with pytest.raises(
        LayoutError, match=r"expected .*train_1.txt; .* holds test_2.txt, train_2.txt, val_2.txt"
    ):
        load_dataset(f"lamem={tmp_path}", get_task("memorability"), split_id=1)


def test_koniq_uses_its_set_column_or_the_hash_split(tmp_path: Path) -> None:
    names = [f"{i}.jpg" for i in range(5)]
    _images(tmp_path / "1024x768", names)
    sets = ["training", "training", "validation", "test", "test"]
    pd.DataFrame({"image_name": names, "MOS": [1.5, 2, 3, 4, 4.5], "set": sets}).to_csv(
        tmp_path / "koniq10k_distributions_sets.csv", index=False
    )
    data = load_dataset(f"koniq={tmp_path}", get_task("quality"))
    assert [e.label for e in data.splits["test"]] == [4.0, 4.5] and len(data.splits["train"]) == 2

    (tmp_path / "koniq10k_distributions_sets.csv").unlink()
    pd.DataFrame({"image_name": names, "MOS_zscore": [0.0] * 5}).to_csv(
        tmp_path / "koniq10k_scores_and_distributions.csv", index=False
    )
    with pytest.raises(LayoutError, match=r"no column 'MOS' \(columns found: image_name, MOS_zscore\)"):
        load_dataset(f"koniq={tmp_path}", get_task("quality"))


def test_emoset_reads_its_json_splits(tmp_path: Path) -> None:
    entries = {
        "train": [["awe", "image/awe/awe_00000.jpg", "annotation/awe/awe_00000.json"]],
        "val": [["fear", "image/fear/fear_00001.jpg", "annotation/fear/fear_00001.json"]],
        "test": [["sadness", "image/sadness/sadness_00002.jpg", "annotation/sadness/sadness_00002.json"]],
    }
    for split, rows in entries.items():
        (tmp_path / f"{split}.json").write_text(json.dumps(rows))
        _images(tmp_path, [rows[0][1]])
    data = load_dataset(f"emoset={tmp_path}", get_task("emotion"))
    assert data.splits["train"][0].label == 2 and data.splits["test"][0].label == 7  # awe, sadness
    with pytest.raises(UsageError, match="dataset emoset holds emotion labels, not quality"):
        load_dataset(f"emoset={tmp_path}", get_task("quality"))


def test_memcat_livec_spaq_and_fi_layouts(tmp_path: Path) -> None:
    memcat = tmp_path / "memcat"
    _images(memcat / "images" / "animal" / "bird", ["a.jpg", "b.jpg"])
    (memcat / "data").mkdir()
    pd.DataFrame({"image_file": ["a.jpg", "b.jpg"], "memorability_w_fa_correction": [0.7, 0.8]}).to_csv(
        memcat / "data" / "memcat_image_data.csv", index=False
    )
    data = load_dataset(f"memcat={memcat}", get_task("memorability"))
    found = {Path(e.path).name: e.label for split in data.splits.values() for e in split}
    assert found == {"a.jpg": 0.7, "b.jpg": 0.8}

    livec = tmp_path / "livec"
    names = [f"t{i}.bmp" for i in range(7)] + ["x.bmp", "y.bmp"]
    _images(livec / "Images", names)
    (livec / "Data").mkdir()
    savemat(
        livec / "Data" / "AllImages_release.mat",
        {"AllImages_release": np.array(names, dtype=object)[:, None]},
    )
    savemat(
        livec / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.arange(9, dtype=float)[None, :] * 10}
    )
    data = load_dataset(f"livec={livec}", get_task("quality"))
    found = {Path(e.path).name: e.label for split in data.splits.values() for e in split}
    assert found == {"x.bmp": 70.0, "y.bmp": 80.0}  # the 7 practice images are left out

    spaq = tmp_path / "spaq"
    _images(spaq / "TestImage", ["00001.jpg"])
    (spaq / "Annotations").mkdir()
    pd.DataFrame({"Image name": ["00001.jpg"], "MOS": [42.0]}).to_csv(
        spaq / "Annotations" / "MOS and Image attribute scores.csv", index=False
    )
    data = load_dataset(f"spaq={spaq}", get_task("quality"))
    assert [e.label for split in data.splits.values() for e in split] == [42.0]

    fi = tmp_path / "fi"
    for emotion in datasets.EMOTIONS:
        _images(fi / emotion.capitalize(), [f"{emotion}_1.jpg"])
    data = load_dataset(f"fi={fi}", get_task("emotion"))
    labels = sorted(int(e.label) for split in data.splits.values() for e in split)
    assert labels == list(range(8))
    (fi / "Fear").rename(fi / "scared")
    with pytest.raises(LayoutError, match=r"missing fear; found .*scared/"):
        load_dataset(f"fi={fi}", get_task("emotion"))


def test_wrong_layouts_say_what_was_expected_and_found(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(LayoutError, match=r"expected images/ and splits/ .*; found photos/, readme.txt"):
        load_dataset(f"lamem={tmp_path}", get_task("memorability"))
    with pytest.raises(LayoutError, match=r"expected train\.json, val\.json and test\.json"):
        load_dataset(f"emoset={tmp_path}", get_task("emotion"))
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": ["nowhere/a.jpg"], "score": [1.0]}).to_csv(manifest, index=False)
    with pytest.raises(LayoutError, match=r"no column 'label' \(columns found: path, score\)"):
        load_dataset(str(manifest), get_task("quality"))
    pd.DataFrame({"path": ["nowhere/a.jpg"], "label": [1.0]}).to_csv(manifest, index=False)
    with pytest.raises(LayoutError, match="none of the first 1 images exists"):
        load_dataset(str(manifest), get_task("quality"))
    with pytest.raises(UsageError, match="write NAME=ROOT with NAME one of lamem"):
        load_dataset(f"imagenet={tmp_path}", get_task("quality"))


def test_manifest_labels_and_split_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    pd.DataFrame(
        {
            "path": ["a.png", "b.png", "c.png"],
            "label": ["awe", "7", "fear"],
            "split": ["train", "val", "test"],
        }
    ).to_parquet(tmp_path / "m.parquet")
    monkeypatch.chdir(tmp_path)
    data = load_dataset("mine=m.parquet", get_task("emotion"))
    assert data.name == "mine" and data.splits["train"][0].path == str(tmp_path / "a.png")
    assert [(s, e.label) for s, v in data.splits.items() for e in v] == [
        ("train", 2),
        ("val", 7),
        ("test", 6),
    ]
    pd.DataFrame({"path": ["a.png"], "label": ["joy"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(LayoutError, match="label 'joy' is not one of amusement"):
        load_dataset(str(tmp_path / "bad.csv"), get_task("emotion"))


# ---- the starting tower ------------------------------------------------------------------------------------


def test_init_from_open_clip_release_and_our_files_gives_the_same_tower(
    tmp_path: Path, release_checkpoints
) -> None:  # type: ignore[no-untyped-def]
    template = get_task("memorability").architecture
    path, _ = release_checkpoints["memorability"]
    from perceptscore.checkpoints import read_release_state_dict, save_converted

    model = PerceptModel.from_release(read_release_state_dict(path))
    from_release = load_base(str(path), template)
    assert from_release.arch.width == 128 and from_release.arch.layers == 2 and from_release.arch.heads == 2
    assert not any(".lora_" in k or k.startswith("head.") for k in from_release.tensors)
    ours = tmp_path / "ours.safetensors"
    save_converted(model, get_task("memorability"), ours, "test", "0" * 64, split=True)
    from_ours = load_base(str(ours), template)
    assert from_ours.tensors.keys() == from_release.tensors.keys()
    assert all(torch.equal(from_ours.tensors[k], from_release.tensors[k]) for k in from_ours.tensors)

    clip = load_base(str(tiny_clip(tmp_path / "clip.safetensors")), template)
    assert (clip.arch.width, clip.arch.layers, clip.arch.embed_dim, clip.arch.head_dims) == (
        64,
        2,
        48,
        (512, 256),
    )
    assert (
        clip.sha256 == __import__("hashlib").sha256((tmp_path / "clip.safetensors").read_bytes()).hexdigest()
    )


# ---- gradient accumulation ---------------------------------------------------------------------------------


def _runner(accumulate: int, tmp_path: Path, precision: str = "fp32") -> StageRun:
    arch = replace(
        get_task("memorability").architecture, width=64, layers=1, heads=1, embed_dim=48, head_dims=(16, 8),
        lora_dropout=0.0, head_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    net = TrainNet(arch, ["set"])
    settings = Settings("mse", 1e-3, 8, 1, 0.01, 0.0, 0, accumulate=accumulate)
    stage = Stage(
        "s",
        1,
        [datasets.LabelledSet("set", "memorability", {"train": [datasets.Example("x", 0.0)]})],
        settings,
    )
    dev = Device(torch.device("cpu"), precision, 0, 8)
    return StageRun(stage, net, get_task("memorability"), tmp_path, dev, Console(quiet=True))


def _one_step(accumulate: int, batches: list[TrainBatch], tmp_path: Path) -> dict[str, torch.Tensor]:
    runner = _runner(accumulate, tmp_path)
    runner.train_step(iter(batches), total=10)
    return {k: v.detach().clone() for k, v in runner.net.trainable().items()}


def test_accumulating_two_half_batches_is_one_full_batch(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, generator=gen)
    labels = torch.rand(8, generator=gen)
    whole = _one_step(1, [TrainBatch(0, pixels, labels, [])], tmp_path)
    halves = [TrainBatch(0, pixels[:4], labels[:4], []), TrainBatch(0, pixels[4:], labels[4:], [])]
    accumulated = _one_step(2, halves, tmp_path)
    first_half_only = _one_step(1, halves[:1], tmp_path)
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=0, atol=1e-6)
    assert any(not torch.allclose(first_half_only[k], whole[k], rtol=0, atol=1e-6) for k in whole)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_step_whose_micro_batches_were_all_unreadable_skips_the_optimizer(
    tmp_path: Path, precision: str
) -> None:
    """fp16 trains with an enabled GradScaler (torch.amp's CPU one here, the same code as CUDA's): its
    ``step`` asserts when no backward ran, which ended the run when every image of a step was unreadable.
    The step is skipped whole: nothing changes, the optimizer holds no state, the loss is NaN; the next
    step with images trains."""
    runner = _runner(2, tmp_path, precision)
    assert runner.scaler.is_enabled() == (precision == "fp16")
    before = {k: v.detach().clone() for k, v in runner.net.trainable().items()}
    empty = TrainBatch(0, torch.zeros(0, 3, 224, 224, dtype=torch.uint8), torch.zeros(0), ["a.jpg: broken"])
    loss, seen, skipped = runner.train_step(iter([empty, empty]), total=10)
    assert math.isnan(loss) and seen == 0 and skipped == ["a.jpg: broken"] * 2
    assert not runner.optimizer.state
    for key, value in runner.net.trainable().items():
        assert torch.equal(value, before[key]), key
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8, generator=gen)
    loss, seen, _ = runner.train_step(
        iter([empty, TrainBatch(0, pixels, torch.rand(4, generator=gen), [])]), 10
    )
    assert math.isfinite(loss) and seen == 4
    assert any(not torch.equal(v, before[k]) for k, v in runner.net.trainable().items())


def test_auto_training_precision_is_bf16_only_where_the_gpu_computes_it_natively() -> None:
    from perceptscore.trainer.run import auto_precision

    assert auto_precision(False, None) == "fp32"
    assert auto_precision(True, (7, 0)) == "fp16"  # V100: bf16 only emulated
    assert auto_precision(True, (7, 5)) == "fp16"  # T4
    assert auto_precision(True, (8, 0)) == "bf16"  # A100
    assert auto_precision(True, (8, 6)) == "bf16"  # RTX 30xx, A10
    assert auto_precision(True, (9, 0)) == "bf16"  # H100, H200


def test_a_tower_built_from_open_clip_weights_computes_what_open_clip_computes(tmp_path: Path) -> None:
    """Untrained adapters (B = 0) change nothing: the training network's features are open_clip's own."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    from perceptscore.trainer.loop import build_net

    path = tiny_clip(tmp_path / "clip.safetensors", seed=3, width=128)
    reference = VisionTransformer(
        image_size=224, patch_size=14, width=128, layers=2, heads=2, mlp_ratio=4.0, output_dim=48,
        act_layer=QuickGELU,
    ).eval()  # fmt: skip
    reference.load_state_dict({k.removeprefix("visual."): v for k, v in load_file(path).items()})
    base = load_base(str(path), get_task("quality").architecture)
    net = build_net(base, base.arch, ["a"], seed=0).eval()
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net.visual(x), reference(x), rtol=0, atol=1e-5)
        assert net(x, "a").shape == (3, 1)


@pytest.mark.slow
def test_evaluation_isolates_a_decoder_that_kills_its_worker(
    release_checkpoints, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's evaluation runs on the scoring engine: a file that crashes its decoder is one error row
    (NaN outputs), not the end of a training run; the other rows are what scoring gives."""
    import os
    import signal

    import perceptscore.batches
    from perceptscore.checkpoints import load_model
    from perceptscore.trainer.data import predict
    from perceptscore.trainer.datasets import Example

    real = perceptscore.batches.decode

    def crashing(f, *args):  # type: ignore[no-untyped-def]
        if f.name.endswith("c_cat.webp"):
            os.kill(os.getpid(), signal.SIGSEGV)  # what a decoder bug in C does to its process
        return real(f, *args)

    task = get_task("memorability")
    model = load_model("memorability", release_checkpoints["memorability"][0])
    examples = [Example(str(p), 0.0) for p in sorted(photo_dir.iterdir())]
    clean, _ = predict(model, task, examples, torch.device("cpu"), torch.float32, 2, workers=1)
    monkeypatch.setattr(perceptscore.batches, "decode", crashing)  # forked workers inherit it
    raw, errors = predict(model, task, examples, torch.device("cpu"), torch.float32, 2, workers=1)
    crashed = [i for i, e in enumerate(examples) if e.path.endswith("c_cat.webp")]
    assert [i for i, e in enumerate(errors) if e is not None] == crashed
    assert errors[crashed[0]].startswith("the decoder crashed, or hung for")
    assert np.isnan(raw[crashed]).all()
    ok = [i for i in range(len(examples)) if i not in crashed]
    np.testing.assert_allclose(raw[ok], clean[ok], atol=1e-6, rtol=0)  # batched otherwise: GEMM rounding
