"""The frozen CLIP vision tower training starts from.

``--init openai`` (the default) downloads OpenAI's ViT-L/14 as open_clip publishes it on the hub
(``bases.openai`` in weights/registry.json): the backbone every released PerceptCLIP model froze. A path
works too: an open_clip checkpoint (``visual.*`` keys, text tower ignored), a release ``.pth`` or one of our
``.safetensors`` files; of the last two only the frozen tower is kept, their adapters and head are not.
Sizes are read from the tensors, so a tiny tower trains as readily as ViT-L/14.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from perceptscore._safetensors import safetensors_header
from perceptscore.checkpoints import FORMAT, map_safetensors, read_converted, read_release_state_dict
from perceptscore.errors import CheckpointError, WeightsNotFoundError
from perceptscore.hub import DownloadError, download, file_sha256, hub_cached, offline
from perceptscore.model import (
    RELEASE_PREFIX,
    convert_release_state_dict,
    infer_release_architecture,
)
from perceptscore.tasks import Architecture, base_release

_BLOCK = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.")


@dataclass(frozen=True)
class Base:
    """The frozen tower's tensors (``PerceptModel`` key names, ``visual.*``) and where they came from."""

    arch: Architecture
    tensors: dict[str, torch.Tensor]
    source: str
    sha256: str


def load_base(init: str, template: Architecture) -> Base:
    """``init``: a registry base name (``openai``) or a weights file; ``template`` fills what the tensors
    do not say (head sizes, LoRA settings, normalisation)."""
    path = Path(init).expanduser()
    if path.is_file():
        return _from_file(path, template, str(path))
    if path.suffix or "/" in init:  # meant as a file
        raise CheckpointError(f"--init {init}: no such file")
    release = base_release(init)
    hit = hub_cached(release)
    if hit is None:
        if offline():
            raise WeightsNotFoundError(
                f"base {init!r} is not downloaded and HF_HUB_OFFLINE is set: download {release.filename} "
                f"({release.size}) from https://huggingface.co/{release.repo_id} and pass --init PATH"
            )
        try:
            hit = download(release)
        except DownloadError as exc:
            raise WeightsNotFoundError(
                f"base {init!r}: download of {release.repo_id}/{release.filename} failed ({exc}); "
                f"download it yourself and pass --init PATH"
            ) from None
    return _from_file(hit, template, f"{release.repo_id}/{release.filename}")


def _from_file(path: Path, template: Architecture, source: str) -> Base:
    sha = file_sha256(path)
    if path.suffix.lower() == ".safetensors":
        header, _ = safetensors_header(path)
        if header.get("__metadata__", {}).get("format") == FORMAT:
            metadata, tensors = read_converted(path)
            arch = Architecture.from_dict(json.loads(metadata["architecture"]))
            return Base(_keep_template(arch, template), _visual(tensors), source, sha)
        state = map_safetensors(path)
    else:
        state = read_release_state_dict(path)
        if any(k.startswith(RELEASE_PREFIX) for k in state):
            arch = infer_release_architecture(state, template)
            converted = convert_release_state_dict(state, arch)
            return Base(_keep_template(arch, template), _visual(converted), source, sha)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # checkpoints saved from DDP
    visual = _visual(state)
    if "visual.conv1.weight" not in visual:
        raise CheckpointError(
            f"--init {path}: not a CLIP checkpoint (no visual.conv1.weight; expected open_clip keys "
            "visual.*, "
            "a PerceptCLIP release .pth or a perceptscore .safetensors)"
        )
    return Base(_open_clip_architecture(visual, template), visual, source, sha)


def _visual(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The frozen tower's tensors only: not the adapters, head or text tower."""
    return {k: v for k, v in tensors.items() if k.startswith("visual.") and ".lora_" not in k}


def _keep_template(arch: Architecture, template: Architecture) -> Architecture:
    return replace(template, **{k: getattr(arch, k) for k in _TOWER_FIELDS})


_TOWER_FIELDS = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "embed_dim")


def _open_clip_architecture(visual: dict[str, torch.Tensor], template: Architecture) -> Architecture:
    width, _, patch, _ = visual["visual.conv1.weight"].shape
    tokens = visual["visual.positional_embedding"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in visual if (m := _BLOCK.match(k)))
    mlp = visual["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    heads = template.heads if width == template.width else max(1, width // 64)
    return replace(
        template,
        image_size=round((tokens - 1) ** 0.5) * patch,
        patch_size=patch,
        width=width,
        layers=layers,
        heads=heads,
        mlp_ratio=mlp / width,
        embed_dim=visual["visual.proj"].shape[1],
    )
