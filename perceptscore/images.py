"""Decode one file into an upright RGB image, or a one-line reason why not.

The release opens images with ``Image.open(path).convert("RGB")``; so does this, so every mode (RGBA, P,
CMYK, L, I;16, F, ...) gives the release's pixels. On top of that: EXIF orientation is applied (a phone
photo is scored upright, as a person sees it; the release's snippet would score it sideways), animated
files use their first frame, and images over Pillow's decompression-bomb limit are refused.
"""

from __future__ import annotations

import os
import stat
import warnings

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from perceptscore.tasks import Preprocess

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}
    | {".heic", ".heif", ".ppm", ".pgm", ".pbm", ".tga", ".jp2", ".j2k", ".ico", ".dib"}
)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error row, never silently grey pixels


class DecodeError(Exception):
    """A file that cannot be scored; the message becomes the row's ``error``."""


def draft_side(specs: list[Preprocess]) -> int:
    """The smallest side a draft-decoded image may have and still feed every spec without upscaling."""
    return max(max(s.resize if isinstance(s.resize, int) else max(s.resize), s.crop) for s in specs)


def decode(path: str | os.PathLike[str], draft: int | None = None) -> Image.Image:
    """The file's first frame as an upright RGB image. ``draft``: let the JPEG decoder downscale by a
    power of two while both sides stay at least ``draft`` pixels (4-6x faster on large photos; pixels
    differ slightly from a full decode, so it is opt-in).

    Raises ``DecodeError`` with a short reason for anything that is not a readable image.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device named like an image would block or never end
            raise DecodeError("is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
        if st.st_size == 0:
            raise DecodeError("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
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
        raise DecodeError("not a recognised image format") from None
    except FileNotFoundError:
        raise DecodeError("no such file") from None
    except IsADirectoryError:
        raise DecodeError("is a directory") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except OSError as exc:
        raise DecodeError(f"unreadable image: {_one_line(exc)}") from None
    except Exception as exc:  # Pillow's plugins raise many types on hostile input; each is this file's fault
        raise DecodeError(f"undecodable image: {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
