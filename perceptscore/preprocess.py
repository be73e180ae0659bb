"""Image -> model input, reproducing the release's torchvision transforms on PIL images exactly.

The release composes ``Resize`` (bilinear, on PIL: Pillow's antialiased resampling), ``CenterCrop`` or
``RandomCrop``, ``ToTensor`` and CLIP ``Normalize``. Here the geometric part runs on Pillow and NumPy and
yields small uint8 crops (cheap to pass between decode workers and to pin for the GPU); the float part,
``normalize``, runs on whole batches on the model's device with the same float32 arithmetic.
``Normalizer`` is the scoring path's form of ``normalize``: the same operations, bit for bit, done in place
in buffers it keeps, one model chunk at a time.
"""

from __future__ import annotations

import hashlib
import threading
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


class Normalizer:
    """``normalize`` for the scoring path: the same float32 operations in the same order, so the same bits,
    done in place in buffers kept from call to call (per thread, per device).

    ``normalize`` makes four full-size float32 temporaries a batch; on CPU most of their cost is the kernel
    handing fresh pages out again, and the (3, 1, 1) constants' short inner loops on channels-last crops
    (0.5-1.0 ms a row at batch 8, bench/RESULTS.md), against ~0.06 ms a row here. Folding the
    normalisation into the patch embedding's weights would save most of those ~0.06 ms too, but changes
    the arithmetic (scores would no longer equal earlier runs' bit for bit on CPU fp32) and needs its own
    argument for fp16/bf16; this keeps the reference's numbers in every precision.

    The tensor returned is a view of a buffer that the next call in the same thread overwrites: use it
    (e.g. run the model on it) before normalising the next chunk. On CUDA the next call's writes are queued
    on the same stream after the model's reads, so that holds without a synchronisation.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._local = threading.local()  # a Predictor shared by threads must not share a buffer

    def __call__(self, batch: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """uint8 (n, 3, H, W) on any device -> normalised (n, 3, H, W) in ``dtype`` (float32 if None)."""
        import torch

        with torch.no_grad():  # pixels are data, never part of a graph
            x = self._buffer("float32", batch, torch.float32)
            x.copy_(batch)  # uint8 -> float32, exact
            m, s = self._constants(batch)
            x.div_(255).sub_(m).div_(s)  # normalize's order: ToTensor's /255, then Normalize's (x - m) / s
            if dtype is None or dtype == torch.float32:
                return x
            return self._buffer("cast", batch, dtype).copy_(x)  # the same rounding as x.to(dtype)

    def _buffer(self, role: str, batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A (len(batch), 3, H, W) view of this thread's ``role`` buffer, grown (never shrunk) as needed.

        Laid out in memory as ``batch`` is, as ``normalize``'s ``batch.to(float32)`` keeps it: decoded
        crops are (H, W, 3) in memory (channels last), and the model must get the layout it got before,
        since a convolution's kernel, hence its rounding, can depend on it."""
        key = (role, batch.device, dtype, tuple(batch.shape[1:]), batch.stride()[1:])
        buffers: dict = self._local.__dict__.setdefault("buffers", {})
        held = buffers.get(key)
        if held is None or held.shape[0] < batch.shape[0]:
            import torch

            # a normal tensor even when made under inference_mode (raw_outputs): an inference tensor
            # could not be written in place by a later call outside it
            with torch.inference_mode(False):
                buffers[key] = held = torch.empty_like(batch, dtype=dtype)  # batch's layout
        return held[: batch.shape[0]]

    def _constants(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as float32 tensors shaped and laid out as one crop of ``batch`` (3, H, W), made
        once per layout and device. Channels last, a (3, 1, 1) constant would make every pass's inner
        loop 3 elements long (~5x slower); spelled out per pixel, the passes run over whole crops, and each
        element still meets the same float value, so the bits do not change."""
        key = (batch.device, tuple(batch.shape[1:]), batch.stride()[1:])
        consts: dict = self._local.__dict__.setdefault("constants", {})
        if key not in consts:
            import torch

            with torch.inference_mode(False):  # usable outside inference_mode too (see _buffer)
                consts[key] = tuple(
                    torch.empty_like(batch[0], dtype=torch.float32).copy_(
                        torch.as_tensor(v, dtype=torch.float32, device=batch.device).view(3, 1, 1)
                    )
                    for v in (self.mean, self.std)
                )
        return consts[key]
