"""Bad checkpoint files: one clear line naming the problem, and nothing inside them ever executed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import perceptscore
from perceptscore.errors import CheckpointError, UsageError, WeightsNotFoundError

LORA_B_1 = "model.base_model.model.encoder.layers.1.self_attn.v_proj.lora_B.default.weight"


def tampered(release_checkpoints, tmp_path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    sd = torch.load(release_checkpoints["memorability"][0], weights_only=True)
    change(sd)
    path = tmp_path / "tampered.pth"
    torch.save(sd, path)
    return path


def load_error(path: Path, task: str = "memorability") -> str:
    with pytest.raises(CheckpointError) as info:
        perceptscore.load_model(task, checkpoint=path, heads=2)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_key_is_named(release_checkpoints, tmp_path: Path) -> None:
    message = load_error(tampered(release_checkpoints, tmp_path, lambda sd: sd.pop(LORA_B_1)))
    assert "1 missing: " + LORA_B_1 in message


def test_extra_key_is_named(release_checkpoints, tmp_path: Path) -> None:
    path = tampered(release_checkpoints, tmp_path, lambda sd: sd.update({"mlp.fc4.weight": torch.ones(2)}))
    assert "1 unexpected: mlp.fc4.weight" in load_error(path)


def test_misshaped_key_is_named_with_both_shapes(release_checkpoints, tmp_path: Path) -> None:
    path = tampered(
        release_checkpoints, tmp_path, lambda sd: sd.update({"mlp.fc2.weight": torch.ones(256, 500)})
    )
    assert "1 mis-shaped: mlp.fc2.weight (256, 500) expected (256, 512)" in load_error(path)


def test_many_problems_are_counted_not_dumped(release_checkpoints, tmp_path: Path) -> None:
    def drop_layer_1(sd: dict) -> None:
        for key in [k for k in sd if ".layers.1." in k]:
            del sd[key]

    path = tampered(release_checkpoints, tmp_path, drop_layer_1)
    # With layer 1 gone the checkpoint reads as a valid 1-layer model: nothing is missing. The loader
    # must not guess; here the shapes of a 1-layer model are all right, so it loads, as a 1-layer model.
    model = perceptscore.load_model("memorability", checkpoint=path, heads=2)
    assert model.arch.layers == 1
    sd = torch.load(path, weights_only=True)
    for key in [k for k in sd if "layers.0.self_attn" in k]:
        del sd[key]
    torch.save(sd, path)
    message = load_error(path)
    assert "14 missing: " in message and "(+10 more)" in message


def test_wrong_number_of_outputs_for_the_task(release_checkpoints) -> None:
    message = load_error(release_checkpoints["emotion"][0], task="memorability")
    assert "has 8 outputs, task memorability needs 1" in message


class Payload:
    """Unpickling this creates a file: proof that code in a checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_pickled_object_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"mlp.fc1.weight": torch.ones(1), "payload": Payload(marker)}, path)
    message = load_error(path)
    assert "refused, not a plain tensor state dict" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ([torch.ones(2)], "holds list, not a dict of tensors"),
        ({"a": 1}, "not a dict of tensors"),
    ],
)
def test_non_state_dict_content_is_refused(tmp_path: Path, content: object, expected: str) -> None:
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    assert expected in load_error(path)


def test_garbage_and_absent_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    assert "unreadable as a PyTorch file" in load_error(garbage)
    assert "no such file" in load_error(tmp_path / "absent.pth")


def test_no_checkpoint_names_where_to_get_one() -> None:
    """From Python the way out is an argument (``checkpoints=``), not a command line flag."""
    with pytest.raises(WeightsNotFoundError) as raised:
        perceptscore.load_model("quality")
    _, fix, source = str(raised.value).splitlines()
    assert fix == (
        'fix: download the file below and pass checkpoints={"quality": "PATH"} '
        '(load_model: checkpoint="PATH")'
    )
    assert source == (
        "file: https://huggingface.co/PerceptCLIP/PerceptCLIP_IQA/resolve/main/perceptCLIP_IQA.pth (1.23 GB)"
    )


def test_bad_device_and_precision_are_usage_errors(release_checkpoints) -> None:
    path = release_checkpoints["memorability"][0]
    with pytest.raises(UsageError, match="unknown precision 'fp8'"):
        perceptscore.load_model("memorability", checkpoint=path, precision="fp8")
    with pytest.raises(UsageError, match="unknown device"):
        perceptscore.load_model("memorability", checkpoint=path, device="tpu:0")
