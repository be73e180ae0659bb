"""``explain``'s pictures are readable: quality's crops blend without seams, the colour's opacity follows
the map (the least relevant pixels are the photo itself), the unseen border is hatched, and a legend says
in words what the colours mean; ``explain`` takes ``--checkpoint`` as ``score`` does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from perceptscore.cli import app
from perceptscore.explain import Explainer, blend, paste, window
from perceptscore.heatmap import (
    ALPHA,
    DIVERGING,
    GAMMA,
    SEQUENTIAL,
    STRIPE,
    UNSEEN,
    hatched,
    legend_lines,
    overlay,
)
from perceptscore.preprocess import random_crop_offsets, resize

from photos import sample

SHAPE, CROP = (512, 384), 224  # quality's resize (height, width) and crop


def _quality_layout(name: str = "coffee.png") -> list[tuple[int, int]]:
    """The 15 crops scoring takes from a real photo, as quality resizes it."""
    return random_crop_offsets(np.asarray(resize(sample(name).convert("RGB"), (512, 384))), 15, CROP)


def _constant_crops(values: list[float]) -> torch.Tensor:
    """Per-crop patch maps (n, 16, 16), crop i constant ``values[i]``."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None].expand(len(values), 16, 16)


# ---- blending quality's 15 crops --------------------------------------------------------------------


def test_blending_equal_crops_gives_exactly_their_value_where_paste_has_values() -> None:
    offsets = _quality_layout()
    blended = blend(_constant_crops([0.37] * 15), offsets, CROP, SHAPE)
    averaged = paste(_constant_crops([0.37] * 15), offsets, CROP, SHAPE)
    assert blended.dtype == np.float32 and blended.shape == SHAPE
    assert (np.isnan(blended) == np.isnan(averaged)).all() and np.isnan(blended).any()  # corners unseen
    seen = np.isfinite(blended)
    assert (blended[seen] == np.float32(0.37)).all()  # exactly, however many crops overlap and where


def test_one_crop_blends_to_the_raw_map() -> None:
    grids = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(1))
    one = paste(grids, [(56, 0)], CROP, (336, 224))
    np.testing.assert_allclose(blend(grids, [(56, 0)], CROP, (336, 224)), one, rtol=1e-6)
    assert np.isnan(one[:56]).all() and np.isnan(blend(grids, [(56, 0)], CROP, (336, 224))[:56]).all()


def test_a_crop_enters_the_blend_with_no_step_at_its_border() -> None:
    """Two crops side by side, 0 and 1, overlapping by 124 columns: averaging jumps by 0.5 where the second
    begins; the blend rises from there smoothly (steps of a few thousandths, none of them at the border)."""
    grids, offsets, shape = _constant_crops([0.0, 1.0]), [(0, 0), (0, 100)], (CROP, 324)
    row = blend(grids, offsets, CROP, shape)[112].astype(np.float64)
    averaged = paste(grids, offsets, CROP, shape)[112].astype(np.float64)
    assert averaged[100] - averaged[99] == pytest.approx(0.5)  # the seam a plain average shows
    steps = np.diff(row)
    assert steps[99] < 1e-3  # where the second crop begins
    assert (steps >= -1e-7).all() and steps.max() < 0.03  # it rises, a little at a time
    assert row[0] == 0 and row[-1] == pytest.approx(1.0)  # each crop alone keeps its own value


def test_blended_quality_crops_show_no_step_at_any_crop_border() -> None:
    """Quality's real layout, each crop a different constant: across every crop border that lies inside
    another crop (20 pixels or more from that one's edges), averaging steps by up to half the values'
    spread; the blend by no more than its gentle slope anywhere (a few hundredths)."""
    offsets = _quality_layout()
    values = np.random.default_rng(0).uniform(0, 1, 15).tolist()
    inside = np.zeros(SHAPE)  # how deep inside some crop a pixel is: its largest window weight
    for top, left in offsets:
        region = inside[top : top + CROP, left : left + CROP]
        np.maximum(region, window(CROP), out=region)

    def border_steps(heat: np.ndarray) -> np.ndarray:
        """|step| between the two pixels either side of each crop border, where both lie deep inside
        some crop (the border of the seen area, where crops meet at their edges, is not a seam)."""
        heat, steps = heat.astype(np.float64), []
        for top, left in offsets:
            span_r, span_c = np.arange(top, top + CROP), np.arange(left, left + CROP)
            for before, after in ((top - 1, top), (top + CROP - 1, top + CROP)):  # horizontal borders
                if before >= 0 and after < SHAPE[0]:
                    steps.append((heat[before, span_c], heat[after, span_c],
                                  inside[before, span_c], inside[after, span_c]))  # fmt: skip
            for before, after in ((left - 1, left), (left + CROP - 1, left + CROP)):  # vertical borders
                if before >= 0 and after < SHAPE[1]:
                    steps.append((heat[span_r, before], heat[span_r, after],
                                  inside[span_r, before], inside[span_r, after]))  # fmt: skip
        return np.concatenate([np.abs(a - b)[np.minimum(wa, wb) > 0.02] for a, b, wa, wb in steps])

    averaged = border_steps(paste(_constant_crops(values), offsets, CROP, SHAPE))
    blended = border_steps(blend(_constant_crops(values), offsets, CROP, SHAPE))
    assert averaged.size == blended.size > 1000
    assert averaged.max() > 0.3  # the measure sees seams when they are there (0.46 when written)
    assert blended.max() < 0.04, blended.max()  # 0.03 when written: the blend's own gentle slope


# ---- opacity, the unseen border, the legend ---------------------------------------------------------


def _photo(width: int = 200, height: int = 150) -> Image.Image:
    return sample("astronaut.png").convert("RGB").resize((width, height))


def test_where_the_map_is_least_the_photo_shows_untinted_and_the_colour_grows_with_the_map() -> None:
    image = _photo()
    heat = np.tile(np.linspace(0.2, 1.0, 100, dtype=np.float32), (150, 2))  # left half: the least, 0.2
    heat[:, :100] = 0.2
    picture = np.asarray(overlay(image, heat, caption="x"), dtype=np.float64)
    photo = np.asarray(image, dtype=np.float64)
    np.testing.assert_array_equal(picture[:150, :99], photo[:, :99])  # the photo's own pixels, untinted
    # a grey photo: each pixel is the table's colour at the map's place in its range, over the grey at an
    # opacity of ALPHA * place ** GAMMA (written out here from the anchors), so it grows with the map
    grey = Image.new("RGB", (200, 150), (128, 128, 128))
    tinted = np.asarray(overlay(grey, heat, max_side=256), dtype=np.float64)[0]
    place = (heat[0].astype(np.float64) - 0.2) / 0.8
    anchors = np.array([p for p, _ in SEQUENTIAL])
    colour = np.stack([np.interp(place, anchors, [c[i] for _, c in SEQUENTIAL]) for i in range(3)], axis=-1)
    alpha = (ALPHA * place**GAMMA)[:, None]
    np.testing.assert_allclose(tinted, np.round(128 * (1 - alpha) + colour * alpha), atol=1)
    distance = np.abs(tinted - 128).sum(axis=1)
    assert (distance[:100] == 0).all() and 0 < distance[120] < distance[150] < distance[-1]


def test_a_signed_map_leaves_zero_untinted_and_colours_each_sign() -> None:
    grey = Image.new("RGB", (90, 30), (128, 128, 128))
    heat = np.tile(np.array([-1.0, 0.0, 1.0], dtype=np.float32).repeat(30), (30, 1))
    picture = np.asarray(overlay(grey, heat, signed=True, max_side=256), dtype=np.float64)[15]
    np.testing.assert_array_equal(picture[40:50], 128)  # zero: untouched
    away, here = np.array(DIVERGING[0][1]), np.array(DIVERGING[-1][1])
    np.testing.assert_allclose(picture[5], np.round(128 * (1 - ALPHA) + away * ALPHA), atol=1)
    np.testing.assert_allclose(picture[85], np.round(128 * (1 - ALPHA) + here * ALPHA), atol=1)


def test_the_unseen_border_is_hatched_grey_and_named_in_the_legend() -> None:
    grey = Image.new("RGB", (300, 200), (40, 120, 200))
    heat = np.full((200, 300), 0.5, dtype=np.float32)
    heat[:, :90] = np.nan
    heat[:, 200:] = 1.0
    picture = np.asarray(overlay(grey, heat, caption="seen and unseen"), dtype=np.float64)
    unseen = picture[:200, :88]
    stripes = (unseen == STRIPE).all(axis=-1)
    assert 0.2 < stripes.mean() < 0.5  # stripes, and between them ...
    assert (unseen[~stripes] == unseen[~stripes][0]).all() and unseen[~stripes][0, 0] > 150  # ... light grey
    np.testing.assert_array_equal(stripes[1:, :-1], stripes[:-1, 1:])  # diagonal: the same one row down
    assert (picture[:200, 92:198] == (40, 120, 200)).all()  # the least: the photo itself
    np.testing.assert_allclose(unseen, hatched(np.asarray(grey, dtype=np.float64))[:, :88].round())
    assert UNSEEN in legend_lines(False, "", unseen=True)
    assert UNSEEN not in legend_lines(False, "", unseen=False)
    seen_only = overlay(grey, np.nan_to_num(heat, nan=0.5), caption="seen and unseen")
    assert seen_only.height < picture.shape[0]  # without an unseen border, no swatch row in the legend
    legend = picture[200:]
    assert (legend == STRIPE).all(axis=-1).sum() > 50  # the swatch, below the photo


def test_the_colour_bar_runs_from_the_photo_untinted_to_the_most() -> None:
    """The bar is drawn over a checkerboard as the overlay draws over a photo: it holds the checkerboard's
    own white at its 'less' end and the top colour at ALPHA over white at its 'more' end."""
    picture = np.asarray(overlay(_photo(), np.random.default_rng(0).random((16, 16)).astype(np.float32)))
    legend = picture[150:].reshape(-1, 3).astype(np.float64)
    most = np.round(255 * (1 - ALPHA) + np.array(SEQUENTIAL[-1][1]) * ALPHA)
    assert (np.abs(legend - most).max(axis=1) <= 1).sum() >= 14  # at least the bar's last column
    assert (legend == [200, 200, 200]).all(axis=1).sum() >= 7  # the checkerboard's grey, untinted


def test_a_small_photo_gets_a_canvas_its_legend_fits_and_a_thumbnail_has_none() -> None:
    small = overlay(_photo(60, 40), np.ones((40, 60), dtype=np.float32), caption="a caption " * 12)
    assert small.width >= 400 and small.height > 40 + 5 * 14  # the caption wraps onto several lines
    thumb = overlay(_photo(), np.ones((150, 200), dtype=np.float32), max_side=256)
    assert thumb.size == (200, 150)


# ---- the command: --checkpoint as score takes it; the raw map unchanged; the words in the PNG ----------


def _explain(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["explain", *args, "--device", "cpu"], env={"COLUMNS": "300"})


def test_explain_takes_task_equals_path_and_writes_the_raw_average_and_the_legend_words(
    release_checkpoints, tmp_path: Path
) -> None:
    photo = tmp_path / "cup.jpg"
    sample("coffee.png").resize((320, 240)).save(photo)
    ckpt = release_checkpoints["quality"][0]
    for i, form in enumerate((f"quality={ckpt}", f"iqa={ckpt}", str(ckpt))):  # alias and bare PATH too
        done = _explain(
            str(photo), "-t", "quality", "--checkpoint", form, "--raw", "-o", str(tmp_path / f"o{i}")
        )
        assert done.exit_code == 0, done.output
    raw = np.load(tmp_path / "o0/cup.quality.relevance.npy")
    for i in (1, 2):
        assert np.array_equal(np.load(tmp_path / f"o{i}/cup.quality.relevance.npy"), raw, equal_nan=True)
    explained = Explainer("quality", ckpt, device="cpu").explain(photo)
    assert np.array_equal(raw, explained.map, equal_nan=True)  # --raw: the plain average, as before
    assert explained.display is not None and (np.isnan(explained.display) == np.isnan(raw)).all()
    assert not np.allclose(explained.display, raw, equal_nan=True)  # the picture draws the smooth blend
    with Image.open(tmp_path / "o0/cup.quality.relevance.png") as png:
        words = png.info["Description"]
    assert "colour: what the quality score depended on, raising or lowering it" in words
    assert "colour bar: less -> more" in words and words.startswith("quality ")
    assert (UNSEEN in words) == bool(np.isnan(raw).any())
