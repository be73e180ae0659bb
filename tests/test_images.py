"""Decoding real files: modes, orientation, animation, and every failure as a reason, never an exception."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptscore.images import DecodeError, decode, draft_side
from perceptscore.tasks import get_task

from photos import sample


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "L", "LA", "I;16", "I", "F", "1"])
def test_every_mode_gives_the_release_pixels(tmp_path: Path, mode: str) -> None:
    """Whatever the mode, the pixels are those of the release's ``Image.open(p).convert("RGB")``."""
    img = sample("coffee.png").resize((120, 80))
    converted = img.convert(mode) if mode not in ("I;16", "I", "F") else img.convert("L").convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".tif" if mode in ("I;16", "I", "F") else ".png"
    path = tmp_path / f"x{suffix}"
    converted.save(path)
    got = decode(path)
    assert got.mode == "RGB" and got.size == (120, 80)
    assert np.array_equal(np.asarray(got), np.asarray(Image.open(path).convert("RGB")))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = sample("rocket.jpg").resize((60, 90))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert decode(tmp_path / "rotated.jpg").size == (90, 60)


def test_animated_gif_uses_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), color) for color in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    pixel = decode(tmp_path / "anim.gif").getpixel((5, 5))
    assert pixel[0] > 200 and pixel[2] < 50


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("L", (4000, 4000)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # Pillow refuses above twice this
    with pytest.raises(DecodeError, match="refused: decompression bomb"):
        decode(tmp_path / "bomb.png")


def test_tiny_and_sliver_images_decode(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), "white").save(tmp_path / "one.png")
    Image.new("RGB", (10000, 8), "white").save(tmp_path / "sliver.png")
    assert decode(tmp_path / "one.png").size == (1, 1)
    assert decode(tmp_path / "sliver.png").size == (10000, 8)


def reason(path: Path) -> str:
    with pytest.raises(DecodeError) as info:
        decode(path)
    return str(info.value)


def test_failures_are_short_reasons(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    sample("astronaut.png").save(good, quality=90)
    data = good.read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "header_only.jpg").write_bytes(data[:200])
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "folder.jpg").mkdir()
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    assert reason(tmp_path / "empty.jpg") == "empty file"
    assert reason(tmp_path / "half.jpg").startswith("unreadable image: image file is truncated")
    assert reason(tmp_path / "header_only.jpg").startswith("unreadable image:")
    assert reason(tmp_path / "text.jpg") == "not a recognised image format"
    assert reason(tmp_path / "random.png") == "not a recognised image format"
    assert reason(tmp_path / "folder.jpg") == "is a directory"
    assert reason(tmp_path / "dangling.jpg") == "no such file"


def test_fast_decode_keeps_enough_pixels_for_every_task(tmp_path: Path) -> None:
    specs = [get_task(t).preprocess for t in ("memorability", "quality")]
    assert draft_side(specs) == 512
    sample("coffee.png").resize((4000, 3000)).save(tmp_path / "big.jpg", quality=90)
    img = decode(tmp_path / "big.jpg", draft=draft_side(specs))
    assert min(img.size) >= 512 and img.size[0] < 4000  # downscaled by the decoder, never below need
