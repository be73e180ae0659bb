"""The PerceptCLIP network's configuration (sizes, LoRA, head, normalisation), as data: the registry
(``weights/registry.json``) and our checkpoint files carry it; ``model.PerceptModel`` is built from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """The PerceptCLIP network: CLIP ViT vision tower + q/k/v LoRA + MLP head."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    embed_dim: int = 768  # output of the frozen visual projection, input of the head
    head_dims: tuple[int, ...] = (512, 256)
    outputs: int = 1
    lora_rank: int = 16
    lora_alpha: float = 8.0
    lora_dropout: float = 0.1
    head_dropout: float = 0.5
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Architecture:
        tuples = {"head_dims", "mean", "std"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}
