"""Images as ``data:`` URIs for a self-contained page: small JPEG thumbnails of scored files (upright, as
scored), and one placeholder for a file that cannot be shown (remote, missing, unreadable, or not the file
that was scored): a report is never refused for a picture it cannot draw."""

from __future__ import annotations

import base64
import functools
import io
import os
from typing import BinaryIO

from PIL import Image

from perceptscore.errors import DecodeError
from perceptscore.images import decode
from perceptscore.locators import LocalFile

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
    None for a remote URI or a dataset's row (``ds.parquet::image[3]``: bytes inside a file, as a tar
    member's)."""
    if "://" in path:
        return None
    if "::" in path:
        from perceptscore.tables import parse_row_uri

        if parse_row_uri(path) is not None:
            return None
    return path if os.path.isabs(path) else os.path.join(root, path)


def open_as_scored(path: str, root: str, recorded: tuple[int, int] | None) -> tuple[BinaryIO | None, str]:
    """The scored file, open, when it is still the very file scored: its (size, mtime_ns) as ``recorded``
    in the scores file, as ``filter --copy-to`` checks. Else None and why not. A forged or stale scores file
    cannot make a report embed, or run the model on, any other file of this machine. The open file is
    checked (``fstat``), not the name: the file read is the file checked."""
    local = local_path(path, root)
    if local is None:
        return None, "remote file: not fetched"
    try:
        f = LocalFile(local).open()
    except DecodeError as exc:
        return None, str(exc)
    st = os.fstat(f.fileno())
    why = ""
    if recorded is None:
        why = "no file size and mtime recorded, so it cannot be checked; score it again"
    elif (st.st_size, st.st_mtime_ns) != recorded:
        why = "changed since it was scored"
    if why:
        f.close()
        return None, why
    return f, ""


def open_upright(
    path: str, root: str, recorded: tuple[int, int] | None, draft: int | None = SIDE
) -> tuple[Image.Image | None, str]:
    """The image, upright RGB (drafted down near ``draft`` pixels), when it is the file scored
    (``open_as_scored``); or None and why not."""
    f, why = open_as_scored(path, root, recorded)
    if f is None:
        return None, why
    try:
        with f:
            return decode(f, draft=draft), ""
    except DecodeError as exc:
        return None, str(exc)


def thumbnail(image: Image.Image) -> str:
    small = image.copy()
    small.thumbnail((SIDE, SIDE), Image.Resampling.BILINEAR)
    return data_uri(small)
