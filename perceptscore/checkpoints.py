"""Reading checkpoint files safely and turning them into ready-to-run models.

Two formats are read:

- the release's ``.pth``: a pickle, only ever opened with ``torch.load(weights_only=True)``, whose
  restricted unpickler builds tensors and plain containers and refuses anything else;
- our own ``.safetensors`` (``FORMAT``): ``PerceptModel``'s unmerged keys plus JSON metadata (task,
  architecture, preprocessing, labels, source and its sha256). It can be split: the frozen vision tower in a
  content-addressed ``base-<hash>.safetensors`` beside it, shared by every task whose base is the same
  (the three releases all freeze the same CLIP), and only the LoRA adapters and head (11 MB) per task.
  Unmerged base + adapters rather than merged weights: one 1.2 GB base serves all tasks instead of one copy
  each, fp32 keeps CPU scores exact, and merging at load costs milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from perceptscore._safetensors import safetensors_header
from perceptscore.errors import CheckpointError, UsageError
from perceptscore.hub import resolve
from perceptscore.model import PerceptModel
from perceptscore.tasks import Architecture, Task, get_task

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMAT = "perceptscore/1"


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
    if dev.type == "cuda":
        # is_available first: device_count alone can report GPUs a broken driver cannot open
        check_cuda_index(dev, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    return dev


def check_cuda_index(dev: torch.device, count: int) -> None:
    """A CUDA ``dev`` must name one of the ``count`` visible GPUs: a wrong index would otherwise surface as
    a raw CUDA error at the first tensor moved, after the weights were loaded."""
    if count == 0:
        raise UsageError(f"{dev}: no CUDA device (torch {torch.__version__} sees none); use --device cpu")
    if dev.index is not None and dev.index >= count:
        which = "only cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise UsageError(f"{dev}: this machine has {count} GPU{'s' * (count != 1)} ({which})")


# ---- our converted format -------------------------------------------------------------------------


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, dtypes, shapes and bytes), independent of file layout."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def is_task_tensor(key: str) -> bool:
    """What differs between tasks: the LoRA adapters and the head. The rest is the shared frozen base."""
    return ".lora_" in key or key.startswith("head.")


def save_converted(
    model: PerceptModel,
    task: Task,
    path: str | Path,
    source: str,
    source_sha256: str,
    precision: str = "fp32",
    split: bool = False,
) -> Path:
    """Write ``model`` (unmerged) in our format; ``split``: the base goes to a shared file beside ``path``."""
    if model.merged:
        raise ValueError("save_converted needs the unmerged model: its adapters are the task's weights")
    path = Path(path)
    dtype = PRECISIONS[precision]
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "task": task.name,
        "architecture": json.dumps(model.arch.to_dict()),
        "preprocessing": task.preprocess.describe(),
        "labels": json.dumps(list(task.labels or ())),
        "source": source,
        "source_sha256": source_sha256,
        "precision": precision,
    }
    if split:
        base = {k: v for k, v in state.items() if not is_task_tensor(k)}
        state = {k: v for k, v in state.items() if is_task_tensor(k)}
        base_path = path.with_name(f"base-{tensors_sha256(base)[:16]}.safetensors")
        if not base_path.exists():  # content-addressed: an existing file with this name holds these tensors
            _save_atomic(base, base_path, {"format": FORMAT, "part": "base"})
        metadata["base"] = base_path.name
    _save_atomic(state, path, metadata)
    return path


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from perceptscore.sinks import replaced_whole

    with replaced_whole(path, follow=False) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        # safetensors creates its file private (0600); a weights file is meant to be shared like any other
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: not a perceptscore file (metadata format is {metadata.get('format')!r})"
        )
    return metadata


def read_converted(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and all tensors of a converted file, its shared base joined in when it is split."""
    path = Path(path)
    metadata = read_metadata(path)
    tensors = map_safetensors(path)
    if "base" in metadata:
        base_path = path.with_name(metadata["base"])
        if not base_path.is_file():
            raise CheckpointError(
                f"checkpoint {path}: its base {base_path.name} is missing from {path.parent}"
            )
        tensors |= map_safetensors(base_path)
    return metadata, tensors


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of a private memory map of it: nothing is copied or
    read until used, as torch does for a memory-mapped .pth (safetensors' own ``get_tensor`` copies)."""
    header, start = safetensors_header(path)
    size = path.stat().st_size
    data = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage.from_file(str(path), False, size))
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key} has dtype {entry['dtype']}, which is not read here")
        tensors[key] = data[start + begin : start + end].view(dtype).view(entry["shape"])
    return tensors


def model_from_converted(path: str | Path, task: Task) -> tuple[PerceptModel, dict[str, Any]]:
    metadata, tensors = read_converted(path)
    if metadata.get("task") != task.name:
        raise CheckpointError(f"checkpoint {path}: holds task {metadata.get('task')!r}, not {task.name}")
    arch = Architecture.from_dict(json.loads(metadata["architecture"]))
    try:
        return PerceptModel.from_state_dict(tensors, arch), metadata
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None


def load_model(
    task: str,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    merge: bool = True,
    heads: int | None = None,
) -> PerceptModel:
    """The task's ``PerceptModel`` in eval mode, on ``device`` in ``precision``.

    ``checkpoint`` is a release ``.pth`` (keys as in ``model.release_key_shapes``) or one of our
    ``.safetensors`` files; ``None`` resolves the task's weights (``hub.resolve``). ``merge`` folds the
    LoRA adapters into the attention weights (the same outputs, faster). ``heads`` is only needed for
    non-standard sizes: it cannot be read from the tensors.
    """
    spec = get_task(task)
    checkpoint = resolve(spec, checkpoint).path
    dev = resolve_device(device)
    dtype = PRECISIONS[resolve_precision(precision, dev)]
    if checkpoint.suffix.lower() == ".safetensors":
        model, _ = model_from_converted(checkpoint, spec)
    else:
        state_dict = read_release_state_dict(checkpoint)
        model = PerceptModel.from_release(state_dict, base=spec.architecture, heads=heads)
    if model.arch.outputs != spec.outputs:
        got, need = model.arch.outputs, spec.outputs
        raise CheckpointError(f"checkpoint {checkpoint}: has {got} outputs, task {spec.name} needs {need}")
    if merge:
        model.float().merge()  # fold the adapters in fp32 whatever the file's or the target's precision
    return model.to(device=dev, dtype=dtype).eval()
