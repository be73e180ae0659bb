"""PerceptModel against the release's own structure (transformers + peft), built independently in tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import perceptscore
from perceptscore.model import PerceptModel, release_key_shapes
from perceptscore.tasks import Architecture, get_task

from release_reference import FULL_SIZE, make_release_checkpoint

TASK_FOR_OUTPUTS = {1: "memorability", 8: "emotion"}


@pytest.mark.parametrize("outputs", [1, 8])
@pytest.mark.parametrize("merge", [False, True])
def test_release_checkpoint_reproduces_release_forward(
    release_checkpoints, outputs: int, merge: bool
) -> None:
    path, reference = release_checkpoints[TASK_FOR_OUTPUTS[outputs]]
    model = perceptscore.load_model(TASK_FOR_OUTPUTS[outputs], checkpoint=path, heads=2, merge=merge)
    assert model.merged is merge
    x = torch.randn(5, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert got.shape == (5, outputs)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_every_release_key_is_accounted_for(release_checkpoints) -> None:
    path, _ = release_checkpoints["memorability"]
    saved = torch.load(path, weights_only=True)
    model = perceptscore.load_model("memorability", checkpoint=path, heads=2, merge=False)
    assert release_key_shapes(model.arch) == {k: tuple(v.shape) for k, v in saved.items()}
    # 22 tensors per layer + 7 embedding/norm + 1 projection + 6 head; nothing else, nothing left over.
    assert len(saved) == 22 * 2 + 14
    # Every number of the release lands in the model exactly once: same total element count.
    assert sum(v.numel() for v in model.state_dict().values()) == sum(v.numel() for v in saved.values())


def test_dropping_one_adapter_is_detected_by_the_tolerance(release_checkpoints) -> None:
    """The 1e-5 comparison above can fail: losing one layer's q adapter moves outputs far beyond it."""
    path, reference = release_checkpoints["memorability"]
    sd = torch.load(path, weights_only=True)
    key = "model.base_model.model.encoder.layers.0.self_attn.q_proj.lora_B.default.weight"
    sd[key] = torch.zeros_like(sd[key])
    model = PerceptModel.from_release(sd, heads=2).eval()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() > 1e-4


def test_merge_folds_adapters_and_drops_their_keys(release_checkpoints) -> None:
    path, _ = release_checkpoints["emotion"]
    model = perceptscore.load_model("emotion", checkpoint=path, heads=2, merge=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
        model.merge().merge()  # idempotent
        after = model(x)
    assert not any("lora" in k for k in model.state_dict())
    assert torch.allclose(before, after, atol=1e-5, rtol=0)


def test_half_precision_stays_close_to_fp32(release_checkpoints) -> None:
    path, _ = release_checkpoints["emotion"]
    exact = perceptscore.load_model("emotion", checkpoint=path, heads=2)
    half = perceptscore.load_model("emotion", checkpoint=path, heads=2, precision="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        diff = (half(x.bfloat16()).float() - exact(x)).abs().max()
    assert 0 < diff < 0.05


def full_size_arch(outputs: int) -> Architecture:
    return get_task(TASK_FOR_OUTPUTS[outputs]).architecture


@pytest.mark.parametrize(("outputs", "trainable"), [(1, 2_884_609), (8, 2_886_408)])
def test_trainable_parameters_at_full_size(outputs: int, trainable: int) -> None:
    with torch.device("meta"):  # shapes only: ViT-L/14 without allocating 1.2 GB
        model = PerceptModel(full_size_arch(outputs)).train()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora == 2_359_296
    assert len(release_key_shapes(model.arch)) == 542


@pytest.mark.slow
@pytest.mark.parametrize("outputs", [8])
def test_full_size_release_checkpoint(tmp_path: Path, outputs: int) -> None:
    """ViT-L/14 at full size (a 1.2 GB checkpoint). Run with: pytest -m slow. One head size: the 8-output
    head (emotion) has every key the 1-output one has, and the tower is the same; the 1-output head's
    conversion is compared at tiny size (test_release_checkpoint_reproduces_release_forward) and its
    full-size shapes on the meta device (test_trainable_parameters_at_full_size): a second 1.2 GB build
    here converted no other key."""
    path = tmp_path / "full.pth"
    reference = make_release_checkpoint(path, outputs, size=FULL_SIZE, seed=3)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
        del reference
        model = perceptscore.load_model(TASK_FOR_OUTPUTS[outputs], checkpoint=path, merge=False)
        assert model.arch == full_size_arch(outputs)
        unmerged = model(x)
        merged = model.merge()(x)
    assert torch.allclose(unmerged, expected, atol=1e-5, rtol=0), (unmerged - expected).abs().max()
    assert torch.allclose(merged, expected, atol=1e-5, rtol=0), (merged - expected).abs().max()


@pytest.mark.parametrize("merge", [False, True])
def test_recorded_attention_is_the_release_attention_and_changes_no_output(
    release_checkpoints, merge: bool
) -> None:
    """explain's attention maps: the same probabilities transformers computes for the release's structure
    (output_attentions), while the outputs stay those of the fused path."""
    path, reference = release_checkpoints["memorability"]
    model = perceptscore.load_model("memorability", checkpoint=path, merge=merge)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        fused = model(x)
        with model.recording_attention() as maps:
            recorded = model(x)
        reference.model.config._attn_implementation = "eager"  # transformers returns probabilities only so
        try:
            expected = reference.model(pixel_values=x, output_attentions=True)
        finally:
            reference.model.config._attn_implementation = "sdpa"
    assert torch.allclose(recorded, fused, atol=1e-5, rtol=0)
    assert len(maps) == len(expected.attentions) == 2
    for got, want in zip(maps, expected.attentions, strict=True):
        assert got.shape == (3, 2, 257, 257)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    with torch.no_grad():
        model(x)
    assert len(maps) == 2  # nothing recorded once the block is left


def test_forward_is_features_then_head(release_checkpoints) -> None:
    model = perceptscore.load_model("emotion", checkpoint=release_checkpoints["emotion"][0])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 768)
        assert torch.equal(model.forward_head(features), model(x))
