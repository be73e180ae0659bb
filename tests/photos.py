"""Real photographs for tests, made from the sample images scikit-image ships inside its wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from PIL import Image


def sample(name: str) -> Image.Image:
    """One of scikit-image's bundled samples (astronaut.png, coffee.png, rocket.jpg, ...) as RGB."""
    with resources.files("skimage.data").joinpath(name).open("rb") as f:
        return Image.open(f).convert("RGB")


def varied_photos() -> dict[str, Image.Image]:
    """Photos of many sizes and aspect ratios, including odd sizes that exercise crop rounding."""
    astronaut, coffee, rocket = sample("astronaut.png"), sample("coffee.png"), sample("rocket.jpg")
    return {
        "square": astronaut,  # 512x512
        "landscape": coffee,  # 600x400
        "portrait": rocket,  # 427x640
        "panorama": coffee.resize((2400, 300), Image.Resampling.LANCZOS),
        "tall_strip": rocket.resize((150, 900), Image.Resampling.LANCZOS),
        "tiny": astronaut.resize((9, 7), Image.Resampling.LANCZOS),
        "odd_227x225": coffee.crop((10, 20, 237, 245)),
        "odd_301x333": astronaut.crop((3, 5, 304, 338)),
        "exact_224": coffee.crop((0, 0, 224, 224)),
        "large_12mp": coffee.resize((4000, 3000), Image.Resampling.BICUBIC),
    }


def write_photo_set(folder: Path) -> Path:
    """Files whose sorted order is known: a_square.jpg, b_landscape.png, c_cat.webp, d_portrait.jpg,
    e_panorama.jpg, f_12mp.jpg."""
    coffee = sample("coffee.png")
    sample("astronaut.png").save(folder / "a_square.jpg", quality=90)
    coffee.save(folder / "b_landscape.png")
    sample("chelsea.png").save(folder / "c_cat.webp", quality=85)
    sample("rocket.jpg").save(folder / "d_portrait.jpg", quality=90)
    coffee.resize((2400, 300), Image.Resampling.LANCZOS).save(folder / "e_panorama.jpg", quality=90)
    coffee.resize((4000, 3000), Image.Resampling.BICUBIC).save(folder / "f_12mp.jpg", quality=90)
    return folder
