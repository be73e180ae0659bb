"""Devices as asked for and as found: a CUDA index checked against the GPUs there are (one-line errors, not a
CUDA traceback after the weights loaded), and the Ray Scorer's decode concurrency from the CPUs it is given.
conftest hides any GPU (unless PERCEPTSCORE_TEST_GPU=1): the expectations follow what torch sees."""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from perceptscore.checkpoints import check_cuda_index, resolve_device
from perceptscore.errors import UsageError
from perceptscore.ray import decode_concurrency

EXE = str(Path(sysconfig.get_path("scripts")) / "perceptscore")


@pytest.mark.parametrize(
    ("device", "count", "message"),
    [
        ("cuda:3", 2, "cuda:3: this machine has 2 GPUs (cuda:0 to cuda:1)"),
        ("cuda:2", 2, "cuda:2: this machine has 2 GPUs (cuda:0 to cuda:1)"),
        ("cuda:1", 1, "cuda:1: this machine has 1 GPU (only cuda:0)"),
        ("cuda:0", 0, f"cuda:0: no CUDA device (torch {torch.__version__} sees none); use --device cpu"),
        ("cuda", 0, f"cuda: no CUDA device (torch {torch.__version__} sees none); use --device cpu"),
    ],
)
def test_a_cuda_index_past_the_gpus_there_are_is_refused(device: str, count: int, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        check_cuda_index(torch.device(device), count)
    assert str(caught.value) == message


@pytest.mark.parametrize(("device", "count"), [("cuda:0", 1), ("cuda:1", 2), ("cuda", 1), ("cuda", 8)])
def test_a_cuda_index_among_the_gpus_is_accepted(device: str, count: int) -> None:
    check_cuda_index(torch.device(device), count)


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def missing_device_line() -> str:
    """What ``--device cuda:<count>`` says here: one past the last GPU, or none at all."""
    count = gpus()
    if count == 0:
        return f"cuda:0: no CUDA device (torch {torch.__version__} sees none); use --device cpu"
    which = "only cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
    return f"cuda:{count}: this machine has {count} GPU{'s' * (count != 1)} ({which})"


def test_resolve_device_checks_what_this_torch_sees() -> None:
    assert resolve_device("auto") == torch.device("cuda" if gpus() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError) as caught:
        resolve_device(f"cuda:{gpus()}")
    assert str(caught.value) == missing_device_line()
    with pytest.raises(UsageError, match=r"^unknown device 'gpu'"):
        resolve_device("gpu")


@pytest.mark.parametrize("command", ["score", pytest.param("explain", marks=pytest.mark.slow)])
def test_cli_on_a_cuda_device_that_is_not_there_is_one_line(
    command: str, photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    checkpoint = str(release_checkpoints["memorability"][0])
    photo = str(sorted(photo_dir.glob("*.jpg"))[0])
    out = tmp_path / ("out.parquet" if command == "score" else "maps")
    done = subprocess.run(
        [EXE, command, photo, "-t", "mem", "--checkpoint", checkpoint, "--device", f"cuda:{gpus()}", "-o",
         str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line == f"error: {missing_device_line()}"
    assert not out.exists()


@pytest.mark.parametrize(
    ("cpus", "cuda", "expected"),
    [
        (14, True, 14),  # every reserved core decodes for the GPU
        (8.0, True, 8),
        (1, True, 2),  # Ray Data's default reservation: never fewer than 2 on a GPU
        (0, True, 2),  # num_cpus=0
        (2.5, True, 2),  # fractional reservations round down
        (16, False, 4),  # on CPU the model keeps three quarters
        (3, False, 1),
        (0, False, 1),
    ],
)
def test_ray_scorer_decodes_as_many_at_once_as_it_has_cpus(cpus: float, cuda: bool, expected: int) -> None:
    assert decode_concurrency(cpus, cuda) == expected
