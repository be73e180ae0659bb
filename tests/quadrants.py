"""A tiny PerceptModel trained on images whose label depends on one quadrant only (explain's tests).

Each image is fine random texture; each quadrant has its own random brightness, and the label is the
brightness of one chosen quadrant. A model that predicts it must look there, so a faithful map must put its
mass there. 112 px (8x8 patches of 14) keeps a training run at a few seconds on two CPU cores.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from perceptscore.architecture import Architecture
from perceptscore.model import PerceptModel

SIZE = 112
ARCH = Architecture(
    image_size=SIZE, width=64, layers=2, heads=1, embed_dim=32, head_dims=(32, 16), outputs=1, lora_rank=4,
    lora_dropout=0.0, head_dropout=0.0,
)  # fmt: skip
QUADRANTS = {"top-left": (0, 0), "top-right": (0, 1), "bottom-left": (1, 0), "bottom-right": (1, 1)}


def quadrant_images(n: int, quadrant: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalised images (n, 3, SIZE, SIZE) and their labels: the brightness of ``quadrant``."""
    half = SIZE // 2
    texture = torch.rand(n, 1, SIZE, SIZE, generator=generator)
    brightness = 0.2 + 0.8 * torch.rand(n, 2, 2, generator=generator)
    scale = brightness.repeat_interleave(half, dim=1).repeat_interleave(half, dim=2)[:, None]
    images = (texture * scale).expand(n, 3, SIZE, SIZE)
    row, col = QUADRANTS[quadrant]
    return (images - 0.45) / 0.27, brightness[:, row, col]


def blank_patches(images: torch.Tensor, most: float, generator: torch.Generator) -> torch.Tensor:
    """Each image with a random share (up to ``most``) of its 14 px patches set to 0, the mean colour."""
    n, grid = images.shape[0], SIZE // 14
    share = most * torch.rand(n, 1, 1, generator=generator)
    keep = (torch.rand(n, grid, grid, generator=generator) >= share).to(images.dtype)
    return images * keep.repeat_interleave(14, dim=1).repeat_interleave(14, dim=2)[:, None]


def train_quadrant_model(quadrant: str, seed: int, steps: int = 300, classes: bool = False) -> PerceptModel:
    """Every weight trained (a tiny random tower learns fast from scratch), MSE, AdamW; eval mode.
    ``classes``: a 2-class tower instead (dark or bright quadrant, split at the median brightness 0.6),
    cross-entropy on its two logits: the path emotion's class logit takes.

    Random patches are blanked during training (as ROAR, Hooker et al. 2019, retrains): a deletion test
    then measures what the blanked patches carried, not how the model reacts to grey squares it never saw.
    """
    torch.manual_seed(seed)
    model = PerceptModel(dataclasses.replace(ARCH, outputs=2) if classes else ARCH)
    with torch.no_grad():  # distinct positions from the start: a tower of 2 layers then learns where to look
        model.visual.positional_embedding.mul_(8)  # in 300 steps on every seed tried, instead of sometimes
    for param in model.parameters():
        param.requires_grad = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = quadrant_images(32, quadrant, generator)
        x = blank_patches(x, 0.4, generator)
        out = model(x)
        loss = F.cross_entropy(out, (y > 0.6).long()) if classes else (out[:, 0] - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
