"""Reading checkpoint files safely and turning them into ready-to-run models.

A release ``.pth`` is a pickle. It is only ever opened with ``torch.load(weights_only=True)``, whose
restricted unpickler builds tensors and plain containers and refuses anything else, so nothing inside
the file can run code.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import torch

from perceptscore.errors import CheckpointError, UsageError, WeightsNotFoundError
from perceptscore.model import PerceptModel
from perceptscore.tasks import Task, get_task

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_release_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a release ``.pth`` as ``{key: tensor}``; refuse anything that is not exactly that."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        # mmap: the 1.2 GB file is paged in as the converter touches it instead of read up front.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path}: refused, not a plain tensor state dict ({reason[:200]})"
        ) from None
    except Exception as exc:  # a damaged file breaks the unpickler in arbitrary ways; all mean "unreadable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: unreadable as a PyTorch file ({first[:200]})") from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"checkpoint {path}: refused, holds {type(obj).__name__}, not a dict of tensors"
        )
    return obj


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 on CUDA, exact fp32 elsewhere. Returns a key of ``PRECISIONS``."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose auto, {', '.join(PRECISIONS)}")
    return precision


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but this torch sees no CUDA device")
    return dev


def resolve_checkpoint(task: Task, given: str | Path | None) -> Path:
    """The weights file to use for ``task``."""
    if given is None:
        raise WeightsNotFoundError(
            f"no weights for task {task.name}: download {task.release.filename} from "
            f"https://huggingface.co/{task.release.repo_id} and pass it with --checkpoint {task.name}=PATH"
        )
    return Path(given)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(
    task: str,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    merge: bool = True,
    heads: int | None = None,
) -> PerceptModel:
    """The task's ``PerceptModel`` in eval mode, on ``device`` in ``precision``.

    ``checkpoint`` is a release ``.pth`` (keys as in ``model.release_key_shapes``). ``merge`` folds the
    LoRA adapters into the attention weights (the same outputs, faster). ``heads`` is only needed for
    non-standard sizes: it cannot be read from the tensors.
    """
    spec = get_task(task)
    checkpoint = resolve_checkpoint(spec, checkpoint)
    dev = resolve_device(device)
    dtype = PRECISIONS[resolve_precision(precision, dev)]
    state_dict = read_release_state_dict(checkpoint)
    model = PerceptModel.from_release(state_dict, base=spec.architecture, heads=heads)
    if model.arch.outputs != spec.outputs:
        got, need = model.arch.outputs, spec.outputs
        raise CheckpointError(f"checkpoint {checkpoint}: has {got} outputs, task {spec.name} needs {need}")
    if merge:
        model.merge()
    return model.to(device=dev, dtype=dtype).eval()
