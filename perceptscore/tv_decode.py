"""Decode and prepare a batch of JPEG files with torchvision's ``decode_jpeg`` and torch ops, on CPU or GPU.

The same uint8 crops as ``batches.decode_item`` (per preprocessing: (crops, 3, crop, crop), channels last
in memory), made from file bytes by ``decode_jpeg`` (libjpeg-turbo on CPU; ``device="cuda"`` decodes the
whole list in one batched nvJPEG call) and torchvision's tensor ``resize``, so a scoring process with a GPU
can decode its own batches instead of a pool of CPU workers.

How it compares with the Pillow path (``images.decode`` + ``prepare``; see tests/test_tv_decode.py):
- Decoded pixels on CPU: identical (both are libjpeg-turbo with the same settings), greyscale (replicated
  to RGB) and CMYK JPEGs included. EXIF orientation: read by Pillow's own ``getexif`` from the header and
  applied here with flips and transposes on the tensor, identical to ``ImageOps.exif_transpose``. (On CPU
  ``decode_jpeg(apply_exif_orientation=True)`` gives the same pixels; it is not used because torchvision
  implements it on CPU only.)
- Geometry: the same resized size (``preprocess.resized_size``), centre-crop offsets, crop size and count.
- Resize: torchvision's antialiased bilinear. On CPU its uint8 kernel matches Pillow's to at most 1 grey
  level; on CUDA it runs in float32 and is rounded back (max 1 level, ~0.1-0.2 levels on average).
- Quality's random crops: drawn as ``preprocess.random_crop_offsets`` draws them (same generator, same
  calls, same CROP_SEED) but seeded by a hash of the file's bytes, not of the resized pixels: those differ
  between CPU and nvJPEG/float resize by a level here and there, so a pixel seed would move every crop
  between devices, and hashing the resized image would need it copied back from the GPU. Positions are
  therefore not the Pillow path's: quality scores differ by the spread of a 15-crop mean (stated in tests).

Anything that is not a plain JPEG within ``max_pixels`` (PNG, WebP, MPO, ...), or that ``decode_jpeg``
refuses (truncated, corrupt), goes through the Pillow path for that item (or the caller's ``fallback``):
its pixels, or its error, exactly as ``decode_item`` would give them. Nothing here raises for a bad file.
Unlike Pillow, torchvision's libjpeg-turbo prints its warnings ("Corrupt JPEG data: ...") on stderr, for
files both decode anyway.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image

from perceptscore.errors import DecodeError
from perceptscore.images import MAX_PIXELS, decode
from perceptscore.preprocess import CROP_SEED, center_crop_offset, prepare, resized_size
from perceptscore.tasks import Preprocess

if TYPE_CHECKING:
    import torch

__all__ = ["Header", "Prepared", "crop_seed", "decode_batch", "probe", "stack"]

TORCHVISION, PILLOW = "torchvision", "pillow"
# A file's bytes: ``bytes``, or a 1-D uint8 CPU tensor (e.g. a slice of one shared-memory tensor that carries
# a whole batch's files from the decode workers: no pickling of each file, and no copy for decode_jpeg).
FileBytes = Union[bytes, "torch.Tensor"]
_ORIENTATION = 0x0112  # EXIF Orientation
# A progressive JPEG with more scans than this goes to the Pillow path (in a decode worker, under its time
# limit): libjpeg's own progressive scripts use 10 scans, encoders seldom pass 20, and a file with
# thousands is made to make a decoder's time grow with their count, which the scoring process must not risk.
MAX_SCANS = 100
# What the scoring process decodes itself, where no decode time limit and no worker's crash isolation
# holds: a JPEG past these goes to the Pillow path in its decode worker (its pixels or error are the same).
MAX_SEQUENTIAL_SCANS = 8  # a baseline JPEG has one scan per component (4 at most), plus a thumbnail's
DEVICE_MAX_PIXELS = 50_000_000  # one image decoded whole here: 150 MB of RGB
MAX_ASPECT = 20  # a thin image's resize to the shorter side's target would be many times its own size
BATCH_PIXELS = 200_000_000  # decoded at a time (a chunk of the batch): 600 MB of RGB, on CPU or GPU
_SOS = b"\xff\xda"  # start of scan: in entropy-coded data 0xFF is always followed by 0x00 or a restart


@dataclass
class Prepared:
    """One file's crops (per preprocessing, uint8 (crops, 3, crop, crop) on the batch's device) or the
    reason it has none; ``decoder`` says which path made it (``torchvision`` or ``pillow``)."""

    error: str | None
    pixels: dict[Preprocess, torch.Tensor]
    decoder: str


@dataclass(frozen=True)
class Header:
    """What ``probe`` reads of a JPEG: its stored size (before orientation), EXIF orientation, mode."""

    width: int
    height: int
    orientation: int
    mode: str


def crop_seed(data: FileBytes) -> int:
    """The random crops' seed for a file: a hash of its bytes. Cheap to compute where the bytes are read
    (a decode worker), so the process that owns the GPU need not hash ~0.2 MB per image itself."""
    return int.from_bytes(hashlib.blake2b(_buffer(data), digest_size=8).digest(), "little")


def decode_batch(
    data: Sequence[FileBytes],
    specs: Sequence[Preprocess],
    device: str | torch.device = "cpu",
    max_pixels: int = MAX_PIXELS,
    seeds: Sequence[int | None] | None = None,
    fallback: Callable[[int], Prepared] | None = None,
    headers: Sequence[Header | None] | None = None,
) -> list[Prepared]:
    """Each file's bytes -> its crops for every spec, on ``device``, in input order. ``seeds``: each file's
    ``crop_seed``, when already computed (only random-crop specs use them). ``fallback(i)``: the outcome
    of the ``i``-th file where torchvision does not decode it (default: the Pillow path, here); an engine
    can pass one that decodes in an ``IsolatedDecoder`` child, so a hostile file cannot take the scoring
    process down. ``headers``: each file's ``probe``, when a decode worker read it already (then Pillow
    reads nothing here)."""
    import torch

    device = torch.device(device)
    headers = list(headers) if headers is not None else [probe(d, max_pixels) for d in data]
    done: dict[int, Prepared] = {}
    for chunk in _chunks([i for i, h in enumerate(headers) if h is not None], headers):
        images = _decode_jpegs([data[i] for i in chunk], [headers[i] for i in chunk], device)  # type: ignore[misc]
        for i, img in zip(chunk, images, strict=True):  # full-size pixels go chunk by chunk
            if img is not None:
                seed = seeds[i] if seeds is not None else None
                got = _prepared(img, headers[i], data[i], specs, seed)  # type: ignore[arg-type]
                if got is not None:
                    done[i] = got
        del images
    out = []
    for i, raw in enumerate(data):
        got = done.get(i)
        if got is None:  # not a JPEG torchvision decoded: the fallback's, else the Pillow path's
            got = fallback(i) if fallback else _pillow(raw, specs, device, max_pixels)
        out.append(got)
    return out


def _chunks(indices: list[int], headers: Sequence[Header | None]) -> Iterator[list[int]]:
    """The JPEGs in runs of at most ``BATCH_PIXELS`` declared pixels (one file at least): a batch of large
    photos is never held whole at full size."""
    chunk: list[int] = []
    pixels = 0
    for i in indices:
        size = headers[i].width * headers[i].height  # type: ignore[union-attr]
        if chunk and pixels + size > BATCH_PIXELS:
            yield chunk
            chunk, pixels = [], 0
        chunk.append(i)
        pixels += size
    if chunk:
        yield chunk


def _prepared(
    img: torch.Tensor, header: Header, raw: FileBytes, specs: Sequence[Preprocess], seed: int | None
) -> Prepared | None:
    """The file's crops; its error where a spec's crop exceeds its resize (as ever); nothing where the
    device runs out of memory (then the fallback takes it, as a file torchvision refused)."""
    upright = _upright(img, header.orientation)
    try:
        return Prepared(None, {s: _prepare(upright, s, raw, seed) for s in specs}, TORCHVISION)
    except ValueError as exc:
        return Prepared(str(exc), {}, TORCHVISION)
    except RuntimeError:  # torch.OutOfMemoryError and the CPU allocator's failure are RuntimeErrors
        return None


def stack(prepared: Sequence[Prepared], specs: Sequence[Preprocess]) -> dict[Preprocess, torch.Tensor]:
    """The crops of the files without an error, concatenated per spec in order: ``Batch.pixels``."""
    import torch

    ok = [p for p in prepared if p.error is None]
    if not ok:
        return {}
    return {
        s: torch.cat([p.pixels[s] for p in ok]).contiguous(memory_format=torch.channels_last) for s in specs
    }


def probe(data: FileBytes, max_pixels: int = MAX_PIXELS) -> Header | None:
    """Size, EXIF orientation and mode of a plain JPEG from its header (Pillow decodes nothing here), or
    None for anything the Pillow path should take: other formats (MPO included: Pillow reads it frame by
    frame), files over ``max_pixels`` (the Pillow path words the refusal), files Pillow cannot open,
    progressive JPEGs of more than ``MAX_SCANS`` scans, baseline ones of more than ``MAX_SEQUENTIAL_SCANS``,
    images over ``DEVICE_MAX_PIXELS`` or thinner than 1:``MAX_ASPECT`` (the scoring process decodes what
    this passes, outside the decode time limit and the workers' crash isolation)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(_buffer(data))) as img:
                pixels = img.width * img.height
                if img.format != "JPEG" or pixels > min(max_pixels, DEVICE_MAX_PIXELS) or pixels == 0:
                    return None
                if max(img.size) > MAX_ASPECT * min(img.size):
                    return None
                scans = MAX_SCANS if img.info.get("progressive") else MAX_SEQUENTIAL_SCANS
                if bytes(_buffer(data)).count(_SOS) > scans:  # a decode's time grows with the scans
                    return None
                # getexif is what exif_transpose reads (it also takes an XMP tiff:Orientation); the value
                # taken as Pillow's lookup takes it (by equality: a string "6" is no orientation there)
                orientation = img.getexif().get(_ORIENTATION, 1)
                upright = next((o for o in range(2, 9) if orientation == o), 1)
                return Header(img.width, img.height, upright, img.mode)
    except Exception:  # any failure to read the header: the Pillow path gives the reason
        return None


def _decode_jpegs(
    data: list[FileBytes], headers: list[Header], device: torch.device
) -> list[torch.Tensor | None]:
    """``decode_jpeg`` in RGB mode; None where it fails, or where its pixels would not be Pillow's."""
    import torch

    tensors = [
        d if isinstance(d, torch.Tensor) else torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data
    ]
    out: list[torch.Tensor | None] = [None] * len(data)
    on_gpu = [i for i, h in enumerate(headers) if device.type == "cuda" and h.mode in ("RGB", "L")]
    if on_gpu:
        for i, img in zip(on_gpu, _nvjpeg([tensors[i] for i in on_gpu], device), strict=True):
            out[i] = img
    # CPU, and on a GPU host the modes nvJPEG is not trusted with (CMYK: libjpeg-turbo matches Pillow)
    gpu = set(on_gpu)
    for i in (i for i in range(len(data)) if i not in gpu):
        img = _one_jpeg(tensors[i], torch.device("cpu"))
        out[i] = None if img is None else img.to(device)
    for i, (img, h) in enumerate(zip(out, headers, strict=True)):
        if img is not None and tuple(img.shape) != (3, h.height, h.width):
            out[i] = None  # not what the header promised: let Pillow decide
    return out


def _nvjpeg(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """One batched nvJPEG call; when it fails (it returns nothing for the batch if one file is bad), each
    file alone, so one corrupt file costs the batch one retry, not its pixels."""
    try:
        return list(_decode_call(tensors, device))
    except RuntimeError:
        return [_one_jpeg(t, device) for t in tensors]


def _one_jpeg(tensor: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode_call([tensor], device)[0]
    except RuntimeError:  # torchvision's one error type for a file it cannot decode
        return None


def _decode_call(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # deprecated since 0.29 in favour of TorchCodec; still the call we want
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def _upright(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) turned as ``ImageOps.exif_transpose`` turns it for an EXIF ``orientation`` (1-8; any
    other value, like Pillow, leaves it as it is)."""
    h, w = -2, -1
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return img.flip(w)
    if orientation == 3:  # ROTATE_180
        return img.flip(h, w)
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return img.flip(h)
    if orientation == 5:  # TRANSPOSE
        return img.transpose(h, w)
    if orientation == 6:  # ROTATE_270 (Pillow's angles are counter-clockwise)
        return img.rot90(-1, (h, w))
    if orientation == 7:  # TRANSVERSE
        return img.transpose(h, w).flip(h, w)
    if orientation == 8:  # ROTATE_90
        return img.rot90(1, (h, w))
    return img


def _prepare(img: torch.Tensor, spec: Preprocess, data: FileBytes, seed: int | None) -> torch.Tensor:
    """Upright (3, H, W) uint8 -> (crops, 3, crop, crop) uint8, channels last, as ``preprocess.prepare``."""
    import torch

    resized = _resize(img, spec.resize)
    height, width = resized.shape[-2:]
    c = spec.crop
    if height < c or width < c:  # cannot happen with the registry's specs (resize >= crop); as prepare()
        raise ValueError(f"resized image {width}x{height} is smaller than the {c}px crop")
    if spec.crops == 1:
        offsets = [center_crop_offset(width, height, c)]
    else:
        offsets = _random_offsets(crop_seed(data) if seed is None else seed, height, width, spec.crops, c)
    # Cut in (H, W, 3): the layout decode_item's crops have in memory, and torchvision's uint8 resize
    # already returns; stacking (3, H, W) views of it into a plain tensor was a 100x slower transposing copy.
    hwc = resized.permute(1, 2, 0).contiguous()  # a no-op after a resize; one copy when there was none
    return torch.stack([hwc[t : t + c, left : left + c] for t, left in offsets]).permute(0, 3, 1, 2)


def _resize(img: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """torchvision ``Resize(size)`` (bilinear, antialiased) on a uint8 tensor: uint8 kernel on CPU, float32
    rounded back on CUDA. The same size as the Pillow path; untouched when the size does not change."""
    from torchvision.transforms.v2 import functional as F

    width, height = img.shape[-1], img.shape[-2]
    new_w, new_h = resized_size(width, height, size)
    if (new_w, new_h) == (width, height):
        return img
    return F.resize(img, [new_h, new_w], interpolation=F.InterpolationMode.BILINEAR, antialias=True)


def _buffer(data: FileBytes) -> bytes | memoryview:
    """The bytes as a buffer Pillow and hashlib read (a tensor's own memory, not a copy)."""
    return data if isinstance(data, bytes) else memoryview(data.contiguous().numpy())


def _random_offsets(seed: int, height: int, width: int, crops: int, crop: int) -> list[tuple[int, int]]:
    """``preprocess.random_crop_offsets``'s draws, from a generator seeded by the file, not its pixels."""
    rng = np.random.default_rng([CROP_SEED, seed])
    tops = rng.integers(0, height - crop + 1, size=crops)
    lefts = rng.integers(0, width - crop + 1, size=crops)
    return [(int(t), int(c)) for t, c in zip(tops, lefts, strict=True)]


def _pillow(data: FileBytes, specs: Sequence[Preprocess], device: torch.device, max_pixels: int) -> Prepared:
    """The Pillow path (``images.decode`` + ``preprocess.prepare``, no draft) for one file's bytes."""
    import torch

    try:
        img = decode(io.BytesIO(_buffer(data)), None, max_pixels)
    except DecodeError as exc:
        return Prepared(str(exc), {}, PILLOW)
    try:
        pixels = {s: torch.from_numpy(prepare(img, s)).to(device) for s in specs}
    except ValueError as exc:
        return Prepared(str(exc), {}, PILLOW)
    return Prepared(None, pixels, PILLOW)
