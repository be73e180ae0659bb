"""Decode one file's bytes into an upright RGB image, or a one-line reason why not.

The release opens images with ``Image.open(path).convert("RGB")``; so does this, so every mode (RGBA, P,
CMYK, L, I;16, F, ...) gives the release's pixels. On top of that: EXIF orientation is applied (a phone
photo is scored upright, as a person sees it; the release's snippet would score it sideways), animated
files use their first frame, and images over Pillow's decompression-bomb limit are refused.

Nothing here changes Pillow's global settings at import. HEIC/HEIF support (the ``[heif]`` extra) is
registered with Pillow on the first decode; AVIF is Pillow's own (11+).
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import warnings
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from perceptscore.errors import DecodeError
from perceptscore.locators import LocalFile
from perceptscore.tasks import Preprocess

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "DecodeError", "decode", "draft_side", "looks_like_image"]

# Pillow's own limit (89.5 MP, ~0.25 GB decoded; Pillow only warns below twice that). Larger images are
# refused unless --max-pixels raises the limit: with up to 16 decode workers, each may hold one.
MAX_PIXELS = 89_478_485

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}
    | {".heic", ".heif", ".ppm", ".pgm", ".pbm", ".tga", ".jp2", ".j2k", ".ico", ".dib"}
)

# ISO base media brands (bytes 8-12 after "ftyp") of HEIF and AVIF still images.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000
    b"\xff\x4f\xff\x51",  # JPEG 2000 codestream
)
_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}  # the DIB header sizes that follow "BM" at byte 14


def looks_like_image(head: bytes) -> bool:
    """Whether a file's first 32 bytes are an image format's signature (for files named without an
    extension, as crawled and content-addressed collections name them)."""
    if head.startswith(_MAGIC):
        return True
    if head[:2] == b"BM" and len(head) >= 18:
        return int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS | _AVIF_BRANDS


def _is_heif(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


@functools.cache
def _heif_registered() -> bool:
    """Register pillow-heif's opener with Pillow once, on first use; False when the extra is missing."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def draft_side(specs: list[Preprocess]) -> int:
    """The smallest side a draft-decoded image may have and still feed every spec without upscaling."""
    return max(max(s.resize if isinstance(s.resize, int) else max(s.resize), s.crop) for s in specs)


def decode(
    source: BinaryIO | str | os.PathLike[str], draft: int | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """The first frame of an image file (a binary file object, or a local path) as an upright RGB image.
    ``draft``: let the JPEG decoder downscale by a power of two while both sides stay at least ``draft``
    pixels (4-6x faster on large photos; pixels differ slightly from a full decode, so it is opt-in).

    Raises ``DecodeError`` with a short reason for anything that is not a readable image, or that has more
    than ``max_pixels`` pixels.
    """
    if isinstance(source, (str, os.PathLike)):
        with LocalFile(os.fspath(source)).open() as f:
            return decode(f, draft, max_pixels)
    _heif_registered()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size  # from the header: nothing is decoded yet
                if width * height > max_pixels:
                    raise DecodeError(
                        f"refused: decompression bomb ({width}x{height} = {width * height:,} pixels, over "
                        f"the {max_pixels:,} pixel limit; --max-pixels raises it)"
                    )
                if draft is not None and img.format == "JPEG":
                    img.draft("RGB", (draft, draft))
                img.load()
                upright = ImageOps.exif_transpose(img)
                return upright.convert("RGB")
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"refused: decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise DecodeError(_unidentified(source)) from None
    except OSError as exc:
        raise DecodeError(f"unreadable image: {_one_line(exc)}") from None
    except Exception as exc:  # Pillow's plugins raise many types on hostile input; each is this file's fault
        raise DecodeError(f"undecodable image: {type(exc).__name__}: {_one_line(exc)}") from None


def is_image(path: str) -> bool:
    """Whether Pillow recognises the file as an image (its header only: nothing is decoded). A FIFO or
    device is never opened: reading it could block forever."""
    _heif_registered()
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                return True
    except Exception:  # anything Pillow cannot identify, or cannot open
        return False


def _unidentified(source: BinaryIO) -> str:
    head = b""
    with contextlib.suppress(OSError, ValueError):
        source.seek(0)
        head = source.read(16)
    if _is_heif(head) and not _heif_registered():
        return "HEIC/HEIF image: install perceptscore[heif] to read it"
    return "not a recognised image format"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
