"""The release's own model structure, rebuilt as its ``modeling.py`` does (transformers + peft).

This is the independent reference every conversion test compares against: a checkpoint saved from it
has the release's exact key layout, and its forward is the release's forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

FULL_SIZE = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}
# 128 wide, 2 heads: the loader's default heads (width // 64) fits it, so no override is needed.
TINY = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2}


class ReleaseMLP(nn.Module):
    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(768, 512)
        self.fc2 = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, outputs)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.relu(self.fc1(x)))
        x = self.dropout(self.relu(self.fc2(x)))
        return self.fc3(x)


class ReleaseModel(nn.Module):
    """clip_lora_model: peft-wrapped CLIP vision transformer -> visual_projection -> MLP."""

    def __init__(self, outputs: int, size: dict[str, int], lora_b_std: float = 0.05) -> None:
        super().__init__()
        config = CLIPVisionConfig(
            **size, image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"
        )
        clip = CLIPVisionModelWithProjection(config)
        lora = LoraConfig(
            r=16, lora_alpha=8, target_modules=["k_proj", "v_proj", "q_proj"], lora_dropout=0.1, bias="none"
        )
        self.model = get_peft_model(clip.vision_model, lora)
        self.proj = clip.visual_projection
        self.mlp = ReleaseMLP(outputs)
        # A trained checkpoint has non-zero B; with peft's zero init the adapters would test nothing.
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, lora_b_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.model(pixel_values=x).pooler_output
        return self.mlp(self.proj(pooled))


def make_release_checkpoint(
    path: Path, outputs: int, size: dict[str, int] = TINY, seed: int = 0
) -> ReleaseModel:
    """Build a random release-structure model, save its state dict like the release, return it (eval)."""
    torch.manual_seed(seed)
    model = ReleaseModel(outputs, size).eval()
    torch.save(model.state_dict(), path)
    return model
