"""The task registry read from the shipped weights/registry.json."""

from __future__ import annotations

import pytest

from perceptscore.errors import UsageError
from perceptscore.tasks import Preprocess, all_tasks, get_task


def test_three_tasks_with_aliases() -> None:
    assert list(all_tasks()) == ["memorability", "quality", "emotion"]
    assert get_task("MEM") is get_task("memorability")
    assert get_task("iqa") is get_task("quality")
    assert get_task("emotions") is get_task("emotion")
    with pytest.raises(UsageError, match="unknown task 'beauty'; known tasks: memorability \\(mem\\)"):
        get_task("beauty")


def test_columns_follow_the_design() -> None:
    assert get_task("memorability").columns == ("memorability",)
    assert get_task("quality").columns == ("quality", "quality_raw")
    emotion = get_task("emotion").columns
    assert emotion[:2] == ("emotion", "emotion_confidence") and len(emotion) == 10
    assert emotion[2:] == tuple(f"emotion_{label}" for label in get_task("emotion").labels or ())


def test_quality_display_mapping_is_the_release_one() -> None:
    quality = get_task("quality")
    for raw in (-6.52, 3.11, 0.0, -1.234):
        assert quality.display_score(raw) == pytest.approx((raw + 6.52) / 9.63, abs=1e-12)
    assert get_task("memorability").display_score(0.73) == 0.73


def test_preprocessing_is_the_release_one() -> None:
    assert get_task("memorability").preprocess == Preprocess(resize=224, crop=224, crops=1)
    assert get_task("emotion").preprocess == Preprocess(resize=224, crop=224, crops=1)
    assert get_task("quality").preprocess == Preprocess(resize=(512, 384), crop=224, crops=15)


def test_architecture_is_vit_l14_quickgelu_with_the_release_lora() -> None:
    arch = get_task("emotion").architecture
    assert (arch.width, arch.layers, arch.heads, arch.patch_size, arch.image_size) == (1024, 24, 16, 14, 224)
    assert (arch.lora_rank, arch.lora_alpha, arch.lora_dropout, arch.outputs) == (16, 8, 0.1, 8)
