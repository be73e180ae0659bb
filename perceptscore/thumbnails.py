"""Images as ``data:`` URIs for a self-contained page: small JPEG thumbnails of scored files (upright, as
scored), and one placeholder for a file that cannot be shown (remote, missing, unreadable): a report is
never refused for a picture it cannot draw."""

from __future__ import annotations

import base64
import functools
import io
import os

from PIL import Image

from perceptscore.errors import DecodeError
from perceptscore.images import decode

SIDE = 256  # a thumbnail's longest side, in pixels


def data_uri(image: Image.Image, fmt: str = "JPEG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 80} if fmt == "JPEG" else {}))
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


@functools.cache
def placeholder() -> str:
    """A plain grey PNG (it decodes like any image; the caption says why it stands there)."""
    return data_uri(Image.new("RGB", (SIDE, SIDE * 3 // 4), (214, 214, 214)), "PNG")


def local_path(path: str, root: str) -> str | None:
    """Where a scores file's ``path`` is on this machine (relative to the folder it was scored from), or
    None for a remote URI."""
    if "://" in path:
        return None
    return path if os.path.isabs(path) else os.path.join(root, path)


def open_upright(path: str, root: str) -> tuple[Image.Image | None, str]:
    """The image, upright RGB, drafted down near thumbnail size; or None and why not."""
    local = local_path(path, root)
    if local is None:
        return None, "remote file: not fetched"
    try:
        return decode(local, draft=SIDE), ""
    except DecodeError as exc:
        return None, str(exc)


def thumbnail(image: Image.Image) -> str:
    small = image.copy()
    small.thumbnail((SIDE, SIDE), Image.Resampling.BILINEAR)
    return data_uri(small)
