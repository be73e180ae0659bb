"""The Scorer end to end on real photos, against the release's structure and torchvision's transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import perceptscore.batches
import perceptscore.images
from perceptscore.preprocess import random_crop_offsets
from perceptscore.scorer import Scorer
from perceptscore.tasks import get_task

CLIP = get_task("memorability").architecture
TAIL = T.Compose([T.ToTensor(), T.Normalize(CLIP.mean, CLIP.std)])
RELEASE_CENTER = T.Compose([T.Resize(224), T.CenterCrop(224), TAIL])


def release_way(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


@torch.no_grad()
def release_center_outputs(model, paths: list[Path]) -> np.ndarray:  # type: ignore[no-untyped-def]
    return torch.cat([model(RELEASE_CENTER(release_way(p))[None]) for p in paths]).numpy()


@torch.no_grad()
def release_quality_outputs(model, paths: list[Path]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The release's 15 x RandomCrop(224) of Resize((512, 384)), at our seeded crop positions, averaged."""
    raw = []
    for p in paths:
        resized = T.Resize((512, 384))(release_way(p))
        offsets = random_crop_offsets(np.asarray(resized), 15, 224)
        crops = torch.stack([TAIL(TF.crop(resized, t, c, 224, 224)) for t, c in offsets])
        raw.append(model(crops).mean())
    return torch.stack(raw).numpy()


def scorer(release_checkpoints, tasks: list[str], **kwargs) -> Scorer:  # type: ignore[no-untyped-def]
    checkpoints = {t: str(release_checkpoints[t][0]) for t in tasks}
    return Scorer(tasks, checkpoints, device="cpu", precision="fp32", **kwargs)


def test_memorability_matches_the_release_in_input_order(release_checkpoints, photo_dir: Path) -> None:
    paths = sorted(photo_dir.iterdir())
    df = scorer(release_checkpoints, ["memorability"]).score([str(photo_dir)])
    assert df["path"].tolist() == [str(p) for p in paths]
    assert df["error"].isna().all()
    expected = release_center_outputs(release_checkpoints["memorability"][1], paths)[:, 0]
    np.testing.assert_allclose(df["memorability"].to_numpy(), expected, atol=1e-4, rtol=0)
    assert np.ptp(expected) > 1e-3  # the photos really score differently: the comparison is not vacuous


def test_emotion_label_and_probabilities_match_the_release(release_checkpoints, photo_dir: Path) -> None:
    paths = sorted(photo_dir.iterdir())
    df = scorer(release_checkpoints, ["emotion"]).score([str(photo_dir)])
    logits = torch.from_numpy(release_center_outputs(release_checkpoints["emotion"][1], paths))
    probs = torch.softmax(logits.double(), dim=1).numpy()
    labels = get_task("emotion").labels or ()
    columns = [f"emotion_{label}" for label in labels]
    np.testing.assert_allclose(df[columns].to_numpy(), probs, atol=1e-4, rtol=0)
    assert df["emotion"].tolist() == [labels[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(df["emotion_confidence"].to_numpy(), probs.max(axis=1), atol=1e-4, rtol=0)


def test_quality_is_the_mean_of_15_crops_with_the_release_display_mapping(
    release_checkpoints, photo_dir: Path
) -> None:
    paths = sorted(photo_dir.iterdir())
    df = scorer(release_checkpoints, ["quality"]).score([str(photo_dir)])
    raw = release_quality_outputs(release_checkpoints["quality"][1], paths)
    np.testing.assert_allclose(df["quality_raw"].to_numpy(), raw, atol=1e-4, rtol=0)
    np.testing.assert_allclose(df["quality"].to_numpy(), (raw + 6.52) / 9.63, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def baseline(release_checkpoints, photo_dir: Path):  # type: ignore[no-untyped-def]
    return scorer(release_checkpoints, ["memorability", "quality", "emotion"], batch_size=4).score(
        [str(photo_dir)]
    )


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 0), (7, 0), (32, 0), (1, 2), (7, 2), (32, 2)])
def test_scores_do_not_depend_on_batch_size_or_workers(
    release_checkpoints, photo_dir: Path, baseline, batch_size: int, workers: int
) -> None:
    tasks = ["memorability", "quality", "emotion"]
    df = scorer(release_checkpoints, tasks, batch_size=batch_size, workers=workers).score([str(photo_dir)])
    assert df["path"].tolist() == baseline["path"].tolist()
    numeric = [c for c in df.columns if df[c].dtype.kind == "f"]
    assert len(numeric) == 1 + 2 + 9
    np.testing.assert_allclose(df[numeric].to_numpy(), baseline[numeric].to_numpy(), atol=1e-5, rtol=0)
    assert df["emotion"].tolist() == baseline["emotion"].tolist()


def test_three_tasks_decode_each_file_exactly_once(
    release_checkpoints, photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted in the worker processes themselves: each decode appends the path to a log file."""
    log = tmp_path / "decodes.log"
    real_decode = perceptscore.images.decode

    def counting_decode(source, *args):  # type: ignore[no-untyped-def]
        with open(log, "a") as f:
            f.write(f"{source.name}\n")
        return real_decode(source, *args)

    monkeypatch.setattr(perceptscore.batches, "decode", counting_decode)  # workers fork with it
    tasks = ["memorability", "quality", "emotion"]
    df = scorer(release_checkpoints, tasks, batch_size=2, workers=2).score([str(photo_dir)])
    assert df["error"].isna().all() and len(df) == 6
    assert sorted(log.read_text().splitlines()) == sorted(df["path"])


def test_bad_files_become_error_rows_and_good_ones_are_scored(
    release_checkpoints, photo_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "a_good.jpg").write_bytes((photo_dir / "a_square.jpg").read_bytes())
    (tmp_path / "b_corrupt.jpg").write_bytes((photo_dir / "a_square.jpg").read_bytes()[:5000])
    (tmp_path / "c_empty.jpg").write_bytes(b"")
    (tmp_path / "d_text.jpg").write_text("not an image, just text\n")
    (tmp_path / "e_good.png").write_bytes((photo_dir / "b_landscape.png").read_bytes())
    df = scorer(release_checkpoints, ["memorability"], batch_size=2, workers=2).score([str(tmp_path)])
    errors = dict(zip(df["path"].map(lambda p: Path(p).name), df["error"].fillna("-"), strict=True))
    assert errors["a_good.jpg"] == errors["e_good.png"] == "-"
    assert "truncated" in errors["b_corrupt.jpg"]
    assert errors["c_empty.jpg"] == "empty file"
    assert errors["d_text.jpg"] == "not a recognised image format"
    assert df.loc[df["error"].isna(), "memorability"].notna().all()
    assert df.loc[df["error"].notna(), "memorability"].isna().all()
