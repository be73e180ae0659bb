"""Synthetic labelled image sets whose label is a known function of the pixels, and a tiny CLIP tower.

Regression: fine random texture blurred by a Gaussian of radius ``label`` (0-4 px), at a random brightness
that carries no information: the model has to learn sharpness, not brightness. Classification: the same
kind of texture tinted one of 8 colours, one colour per emotion label, at a random brightness.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from PIL import Image, ImageFilter
from safetensors.torch import save_file

EMOTIONS = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
COLOURS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0.5, 0], [0.5, 0, 1]]
)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=(size, size))


def blur_set(folder: Path, n: int, seed: int = 0, size: int = 232, name: str = "blur") -> Path:
    """``n`` PNGs and ``<name>.csv`` (path, label): label = blur radius in pixels (0-4)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        radius = float(rng.uniform(0.0, 4.0))
        grey = (_texture(rng, size) * 255 * rng.uniform(0.6, 1.0)).astype(np.uint8)
        img = Image.fromarray(grey).convert("RGB").filter(ImageFilter.GaussianBlur(radius))
        img.save(folder / f"{name}{i:04d}.png")
        rows.append({"path": f"{name}{i:04d}.png", "label": radius})
    manifest = folder / f"{name}.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def colour_set(folder: Path, n: int, seed: int = 0, size: int = 232) -> Path:
    """``n`` PNGs and ``colour.csv`` (path, label): label = the emotion name standing for the tint."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = i % len(EMOTIONS)
        tex = 0.5 + 0.5 * _texture(rng, size)[..., None]
        pixels = np.clip(tex * COLOURS[k] * rng.uniform(0.5, 1.0), 0, 1)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"colour{i:04d}.png")
        rows.append({"path": f"colour{i:04d}.png", "label": EMOTIONS[k]})
    manifest = folder / "colour.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def tiny_clip(path: Path, seed: int = 0, width: int = 64, layers: int = 2) -> Path:
    """A random open_clip vision tower saved with open_clip's key names (``visual.*``), as ``--init``."""
    torch.manual_seed(seed)
    tower = VisionTransformer(
        image_size=224, patch_size=14, width=width, layers=layers, heads=max(1, width // 64),
        mlp_ratio=4.0, output_dim=48, act_layer=QuickGELU,
    )  # fmt: skip
    save_file({f"visual.{k}": t.contiguous() for k, t in tower.state_dict().items()}, path)
    return path
