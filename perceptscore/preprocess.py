"""Image -> model input, reproducing the release's torchvision transforms on PIL images exactly.

The release composes ``Resize`` (bilinear, on PIL: Pillow's antialiased resampling), ``CenterCrop`` or
``RandomCrop``, ``ToTensor`` and CLIP ``Normalize``. Here the geometric part runs on Pillow and NumPy and
yields small uint8 crops (cheap to pass between decode workers and to pin for the GPU); the float part,
``normalize``, runs on whole batches on the model's device with the same float32 arithmetic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from perceptscore.tasks import Preprocess

if TYPE_CHECKING:  # torch only where a batch meets the model: decoding processes start without it
    import torch

# The release card calls random.seed(3407) (which never reached torchvision's crops); it seeds ours.
CROP_SEED = 3407


def resized_size(width: int, height: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """Output (width, height) of torchvision's ``Resize(size)``, same float arithmetic and truncation."""
    if not isinstance(size, int):
        return size[1], size[0]  # torchvision takes (height, width)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    new = resized_size(img.width, img.height, size)
    if new == img.size:  # torchvision returns the image untouched in this case
        return img
    return img.resize(new, Image.Resampling.BILINEAR)


def center_crop_offset(width: int, height: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop``: Python's ``round``, i.e. half to even (0.5 -> 0)."""
    return round((height - crop) / 2.0), round((width - crop) / 2.0)


def random_crop_offsets(pixels: np.ndarray, crops: int, crop: int) -> list[tuple[int, int]]:
    """``crops`` (top, left) positions drawn like ``RandomCrop`` from a generator seeded by the pixels.

    The seed is a hash of the resized image, so a file gets the same crops, hence the same score, in any
    batch, worker, order or run, and under any file name.
    """
    height, width = pixels.shape[:2]
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=8).digest()
    rng = np.random.default_rng([CROP_SEED, int.from_bytes(digest, "little")])
    tops = rng.integers(0, height - crop + 1, size=crops)
    lefts = rng.integers(0, width - crop + 1, size=crops)
    return [(int(t), int(c)) for t, c in zip(tops, lefts, strict=True)]


def prepare(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """An RGB PIL image -> uint8 array (crops, 3, crop, crop), ready for ``normalize``."""
    if img.mode != "RGB":
        raise ValueError(f"prepare() needs an RGB image, got mode {img.mode}")
    pixels = np.asarray(resize(img, spec.resize))
    return crops_of(pixels, crop_offsets(pixels, spec), spec.crop)


def crop_offsets(pixels: np.ndarray, spec: Preprocess) -> list[tuple[int, int]]:
    """The (top, left) of each crop ``spec`` takes from the resized image ``pixels`` (H, W, 3): the centre
    crop, or the random crops seeded by the pixels. ``explain`` pastes each crop's map back at these."""
    height, width = pixels.shape[:2]
    c = spec.crop
    if height < c or width < c:
        raise ValueError(f"resized image {width}x{height} is smaller than the {c}px crop")
    if spec.crops == 1:
        return [center_crop_offset(width, height, c)]
    return random_crop_offsets(pixels, spec.crops, c)


def crops_of(pixels: np.ndarray, offsets: Sequence[tuple[int, int]], crop: int) -> np.ndarray:
    """uint8 (crops, 3, crop, crop) cut from ``pixels`` (H, W, 3) at ``offsets``."""
    return np.stack([pixels[t : t + crop, left : left + crop].transpose(2, 0, 1) for t, left in offsets])


def normalize(
    batch: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """uint8 (..., 3, H, W) tensor -> CLIP-normalised float, computed in float32 like ``ToTensor`` +
    ``Normalize``, then cast to ``dtype`` (the model's)."""
    import torch

    x = batch.to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    x = x.sub(m).div(s)
    return x if dtype is None else x.to(dtype)
