"""Draw a map over an image with Pillow and NumPy: colour and opacity, the unseen border, a legend.

The colour's opacity follows the map: where it is at its least the photo shows untinted, and the colour
covers more of it the more the score depended on a region. Relevance (never negative) uses a sequential
table (purple -> yellow) from the map's least to its most; an attention shift (signed) blue where it is
negative, red where positive, zero untinted. Pixels no crop reached are hatched grey: the model never
saw them. Below the photo: the caption, what the colours mean in words, a colour bar drawn as the overlay
draws it (over a checkerboard, so its transparent end reads as such) and, when there is any, the unseen
border's swatch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The kinds of map and whether each is signed (drawn with the diverging table). Here, not in explain.py,
# so the command can check a --method before torch loads.
METHODS = {"relevance": False, "attention-shift": True}

# (position, RGB) anchors; colours in between are interpolated. Close to matplotlib's "plasma" from its
# purple on (its dark blue end would only darken the photo where the map is low; its saturated yellow
# top stays visible over a white or pale region, where inferno's pale yellow vanishes) and "bwr".
SEQUENTIAL = ((0.0, (126, 3, 168)), (0.33, (204, 71, 120)), (0.67, (248, 149, 64)), (1.0, (240, 249, 33)))
# A signed map's two colours: its sign picks one, its magnitude the opacity (a table through white would
# only wash the photo out where the opacity is already low).
DIVERGING = ((0.0, (33, 102, 172)), (0.5, (33, 102, 172)), (0.5, (190, 24, 43)), (1.0, (190, 24, 43)))
ALPHA = 0.85  # the colour's opacity where the map is at its most (a signed map: at either end); 0 at least
GAMMA = 0.75  # opacity = ALPHA * value ** GAMMA
ENDS = {False: ("less", "more"), True: ("moved away", "moved here")}  # the colour bar's words, per kind
UNSEEN = "hatched grey: not seen by the model (outside its crops)"
STRIPE, LIGHT, PERIOD = (112, 112, 112), 214.0, 9  # the hatch: stripe colour, washed-out base, spacing
MIN_WIDTH, PAD = 440, 6  # a narrow photo gets a wider canvas, so the legend's words fit


def colours(values: np.ndarray, table: tuple[tuple[float, tuple[int, int, int]], ...]) -> np.ndarray:
    """Values in [0, 1] (any shape) -> float RGB (..., 3) in [0, 255]."""
    positions = [p for p, _ in table]
    return np.stack(
        [np.interp(np.clip(values, 0, 1), positions, [c[i] for _, c in table]) for i in range(3)], axis=-1
    )


def opacity(values: np.ndarray, signed: bool) -> np.ndarray:
    """Scaled values in [0, 1] -> the colour's opacity: 0 at the least (a signed map: at zero, 0.5)."""
    values = np.clip(values, 0, 1)
    # a gentle curve: the middle of the map is already visible (0.5 -> 0.48 of ALPHA), the least still 0
    return ALPHA * (np.abs(2 * values - 1) if signed else values) ** GAMMA


def tint(photo: np.ndarray, values: np.ndarray, signed: bool) -> np.ndarray:
    """float RGB (H, W, 3) with the colour of scaled ``values`` (H, W) over it at their opacity."""
    alpha = opacity(values, signed)[..., None]
    return photo * (1 - alpha) + colours(values, DIVERGING if signed else SEQUENTIAL) * alpha


def hatched(photo: np.ndarray) -> np.ndarray:
    """float RGB (H, W, 3) -> washed-out grey with diagonal stripes: what the unseen border looks like."""
    height, width = photo.shape[:2]
    grey = photo @ np.array([0.299, 0.587, 0.114])
    base = np.repeat((0.45 * grey + 0.55 * LIGHT)[..., None], 3, axis=-1)
    rows, cols = np.indices((height, width))
    stripes = (rows + cols) % PERIOD < 3
    base[stripes] = STRIPE
    return base


def _scaled(heat: np.ndarray, signed: bool) -> tuple[np.ndarray, float, float]:
    """The map in [0, 1] for the colour table, and the values its ends stand for: the least and the most
    of the map (a signed map: -m and m, m its largest magnitude, so zero is the middle)."""
    finite = heat[np.isfinite(heat)]
    if signed:
        top = float(np.abs(finite).max()) if finite.size else 0.0
        top = top or 1.0
        return (heat / top + 1) / 2, -top, top
    low = float(finite.min()) if finite.size else 0.0
    top = float(finite.max()) if finite.size else 0.0
    if top <= low:  # a flat map: nothing stands out, nothing is tinted
        return np.where(np.isfinite(heat), 0.0, np.nan), low, low
    return (heat - low) / (top - low), low, top


def _resized(heat: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The map and where it is defined, at ``size`` (width, height). The values are resized weighted by
    where they are defined, so the unseen border's NaN never leaks into the values beside it as zeros."""
    seen = np.isfinite(heat)
    values = Image.fromarray(np.where(seen, heat, 0).astype(np.float32), mode="F")
    weight = Image.fromarray(seen.astype(np.float32), mode="F")
    mask = Image.fromarray(seen.astype(np.uint8) * 255)
    total = np.asarray(values.resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    share = np.asarray(weight.resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.where(share > 1e-6, total / share, 0.0)
    return spread, np.asarray(mask.resize(size, Image.Resampling.NEAREST)) > 127


def overlay(
    image: Image.Image,
    heat: np.ndarray,
    signed: bool = False,
    caption: str = "",
    max_side: int = 768,
    legend: str = "",
) -> Image.Image:
    """``image`` (upright RGB, any size) with ``heat`` (H', W') spread over it, scaled to at most
    ``max_side``; below it ``caption`` and the legend (``legend``: what the colours mean, in words), both
    left out when ``max_side`` is small: a thumbnail."""
    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    photo = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    scaled, low, high = _scaled(heat, signed)
    values, seen = _resized(scaled, size)
    blended = np.where(seen[..., None], tint(photo, values, signed), hatched(photo))
    picture = Image.fromarray(blended.round().astype(np.uint8))
    if max_side < 300:
        return picture
    return _framed(picture, signed, (low, high), caption, legend, unseen=not seen.all())


def legend_lines(signed: bool, legend: str, unseen: bool) -> list[str]:
    """The legend in words, as drawn below the picture (and stored in the PNG's description)."""
    less, more = ENDS[signed]
    title = legend or ("the attention shift" if signed else "how much the score depended on each region")
    untinted = "unchanged" if signed else "the least"
    lines = [f"colour: {title}", f"colour bar: {less} -> {more} (untinted: {untinted})"]
    return lines + ([UNSEEN] if unseen else [])


def _wrapped(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, broken at spaces."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _framed(
    picture: Image.Image, signed: bool, ends: tuple[float, float], caption: str, legend: str, unseen: bool
) -> Image.Image:
    """The picture on a white canvas, with the caption and the legend below it."""
    width, height = picture.size
    canvas_width = max(width, MIN_WIDTH)
    big, small = ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    text = [(line, big) for line in _wrapped(caption, big, canvas_width - 2 * PAD)] if caption else []
    title = legend_lines(signed, legend, unseen)[0]
    text += [(line, small) for line in _wrapped(title, small, canvas_width - 2 * PAD)]
    rows = height + PAD + 17 * len(text)
    canvas = Image.new("RGB", (canvas_width, rows + 40 + (20 if unseen else 0)), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (line, font) in enumerate(text):
        draw.text((PAD, height + PAD + 17 * i), line, fill=(0, 0, 0), font=font)
    _colour_bar(canvas, draw, (PAD, rows + 4), signed, ends, small)
    if unseen:
        swatch = hatched(np.full((14, 30, 3), 160.0)).round().astype(np.uint8)
        canvas.paste(Image.fromarray(swatch), (PAD, rows + 40))
        draw.text((PAD + 38, rows + 40), UNSEEN, fill=(0, 0, 0), font=small)
    return canvas


def _colour_bar(
    canvas: Image.Image, draw: ImageDraw.ImageDraw, at: tuple[int, int], signed: bool,
    ends: tuple[float, float], font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:  # fmt: skip
    """A horizontal colour bar at ``at``, its words at its ends and the values they stand for below."""
    less, more = ENDS[signed]
    left, top = at
    start = left + int(draw.textlength(less, font=font)) + 8
    length = max(120, min(300, canvas.width - start - int(draw.textlength(more, font=font)) - 2 * PAD))
    ramp = np.linspace(0, 1, length)[None, :].repeat(14, axis=0)
    squares = (np.indices(ramp.shape) // 7).sum(axis=0) % 2
    board = np.repeat(np.where(squares == 0, 255.0, 200.0)[..., None], 3, axis=-1)
    bar = tint(board, ramp, signed).round().astype(np.uint8)
    canvas.paste(Image.fromarray(bar), (start, top))
    draw.rectangle((start - 1, top - 1, start + length, top + 14), outline=(120, 120, 120))
    draw.text((left, top), less, fill=(0, 0, 0), font=font)
    draw.text((start + length + 8, top), more, fill=(0, 0, 0), font=font)
    grey, tiny = (110, 110, 110), ImageFont.load_default(size=10)
    draw.text((start, top + 17), f"{ends[0]:.2g}", fill=grey, font=tiny)
    high = f"{ends[1]:.2g}"
    draw.text((start + length - draw.textlength(high, font=tiny), top + 17), high, fill=grey, font=tiny)
    if signed:
        draw.text((start + length // 2 - 3, top + 17), "0", fill=grey, font=tiny)
