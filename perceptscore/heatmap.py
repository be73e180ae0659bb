"""Draw a map over an image with Pillow and NumPy: a colour table, the blend, a colour bar, a caption.

Relevance (never negative) uses a sequential table (dark -> yellow), an attention shift (signed) a
diverging one (blue -> white -> red, white at zero). Pixels no crop reached are dimmed, not coloured: the
model never saw them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The kinds of map and whether each is signed (drawn with the diverging table). Here, not in explain.py,
# so the command can check a --method before torch loads.
METHODS = {"relevance": False, "attention-shift": True}

# (position, RGB) anchors; colours in between are interpolated. Close to matplotlib's "inferno" and "bwr".
SEQUENTIAL = ((0.0, (0, 0, 4)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)), (0.75, (249, 142, 9)),
              (1.0, (252, 255, 164)))  # fmt: skip
DIVERGING = ((0.0, (33, 102, 172)), (0.5, (247, 247, 247)), (1.0, (178, 24, 43)))
ALPHA = 0.55  # how much of the colour covers the photo
DIMMED = 0.35  # brightness kept where the model never looked
BAR, CAPTION = 84, 26  # pixels: colour bar strip on the right, caption line below


def colours(values: np.ndarray, table: tuple[tuple[float, tuple[int, int, int]], ...]) -> np.ndarray:
    """Values in [0, 1] (any shape) -> float RGB (..., 3) in [0, 255]."""
    positions = [p for p, _ in table]
    return np.stack(
        [np.interp(np.clip(values, 0, 1), positions, [c[i] for _, c in table]) for i in range(3)], axis=-1
    )


def _scaled(heat: np.ndarray, signed: bool) -> tuple[np.ndarray, float, float]:
    """The map in [0, 1] for the colour table, and the values its ends stand for."""
    finite = heat[np.isfinite(heat)]
    if signed:
        top = float(np.abs(finite).max()) if finite.size else 0.0
        top = top or 1.0
        return (heat / top + 1) / 2, -top, top
    low = 0.0
    top = float(finite.max()) if finite.size else 0.0
    top = top if top > low else 1.0
    return (heat - low) / (top - low), low, top


def _resized(heat: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The map and where it is defined, at ``size`` (width, height)."""
    seen = np.isfinite(heat)
    values = Image.fromarray(np.where(seen, heat, 0).astype(np.float32), mode="F")
    mask = Image.fromarray(seen.astype(np.uint8) * 255)
    return (
        np.asarray(values.resize(size, Image.Resampling.BILINEAR)),
        np.asarray(mask.resize(size, Image.Resampling.NEAREST)) > 127,
    )


def overlay(
    image: Image.Image, heat: np.ndarray, signed: bool = False, caption: str = "", max_side: int = 768
) -> Image.Image:
    """``image`` (upright RGB, any size) with ``heat`` (H', W') spread over it, scaled to at most
    ``max_side``; a colour bar on the right and ``caption`` below (both left out when ``max_side`` is
    small: a thumbnail)."""
    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    photo = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    scaled, low, high = _scaled(heat, signed)
    values, seen = _resized(scaled, size)
    tinted = photo * (1 - ALPHA) + colours(values, DIVERGING if signed else SEQUENTIAL) * ALPHA
    blended = np.where(seen[..., None], tinted, photo * DIMMED)
    picture = Image.fromarray(blended.round().astype(np.uint8))
    if max_side < 300:
        return picture
    return _framed(picture, signed, low, high, caption)


def _framed(picture: Image.Image, signed: bool, low: float, high: float, caption: str) -> Image.Image:
    width, height = picture.size
    canvas = Image.new("RGB", (width + BAR, height + CAPTION), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    ramp = np.linspace(1, 0, height)[:, None].repeat(14, axis=1)  # high values at the top
    bar = colours(ramp, DIVERGING if signed else SEQUENTIAL).round().astype(np.uint8)
    canvas.paste(Image.fromarray(bar), (width + 6, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    draw.text((width + 22, 0), f"{high:.2g}", fill=(0, 0, 0), font=font)
    draw.text((width + 22, height - 14), f"{low:.2g}", fill=(0, 0, 0), font=font)
    if signed:
        draw.text((width + 22, height // 2 - 7), "0", fill=(0, 0, 0), font=font)
    draw.text((4, height + 5), caption, fill=(0, 0, 0), font=ImageFont.load_default(size=14))
    return canvas
