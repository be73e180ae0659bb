"""Our preprocessing against torchvision's transforms, the release's own pipeline, on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from perceptscore.preprocess import normalize, prepare, random_crop_offsets
from perceptscore.tasks import get_task

from photos import varied_photos

PHOTOS = varied_photos()
CLIP = get_task("memorability").architecture


def ours(img: Image.Image, task: str) -> torch.Tensor:
    return normalize(torch.from_numpy(prepare(img, get_task(task).preprocess)), CLIP.mean, CLIP.std)


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("task", ["memorability", "emotion"])
def test_center_crop_matches_torchvision(name: str, task: str) -> None:
    release = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(CLIP.mean, CLIP.std)])
    expected = release(PHOTOS[name])
    got = ours(PHOTOS[name], task)
    assert got.shape == (1, 3, 224, 224)
    assert (got[0] - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_quality_crops_match_torchvision_at_our_positions(name: str) -> None:
    resized = T.Resize((512, 384))(PHOTOS[name])
    assert resized.size == (384, 512)  # torchvision's (height, width) = (512, 384)
    offsets = random_crop_offsets(np.asarray(resized), 15, 224)
    tail = T.Compose([T.ToTensor(), T.Normalize(CLIP.mean, CLIP.std)])
    expected = torch.stack([tail(TF.crop(resized, top, left, 224, 224)) for top, left in offsets])
    got = ours(PHOTOS[name], "quality")
    assert got.shape == (15, 3, 224, 224)
    assert (got - expected).abs().max() <= 1e-6


def test_quality_crops_depend_on_the_image_only() -> None:
    spec = get_task("quality").preprocess
    a = prepare(PHOTOS["landscape"], spec)
    assert np.array_equal(a, prepare(PHOTOS["landscape"].copy(), spec))  # same pixels, same crops
    b = prepare(PHOTOS["portrait"], spec)
    offsets_a = random_crop_offsets(np.asarray(T.Resize((512, 384))(PHOTOS["landscape"])), 15, 224)
    offsets_b = random_crop_offsets(np.asarray(T.Resize((512, 384))(PHOTOS["portrait"])), 15, 224)
    assert offsets_a != offsets_b and not np.array_equal(a, b)
    assert len(set(offsets_a)) > 10  # fifteen draws, spread over the image
    assert all(0 <= t <= 512 - 224 and 0 <= c <= 384 - 224 for t, c in offsets_a)


def test_prepare_refuses_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        prepare(PHOTOS["square"].convert("L"), get_task("memorability").preprocess)
