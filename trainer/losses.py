"""The three training losses of the release (../shared/reference/perceptclip.md, "Training").

Memorability: mean squared error against the score. Emotion: cross-entropy over the 8 logits. Quality: a
"Pearson correlation induced loss", whose formula the paper gives only as an image; ours is the common form

    L = 1 - PLCC(pred, target) over the batch,   PLCC = sum(p' t') / (||p'|| ||t'|| + eps),  x' = x - mean(x)

It ignores the scale and offset of the outputs (only ranking and linearity matter; the export then maps the
raw scale onto the labels, see ``calibrate``) and needs at least 2 images per batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

EPS = 1e-8


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float().squeeze(-1), target.float())


def pearson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = pred.float().squeeze(-1)
    t = target.float()
    if p.numel() < 2:
        raise ValueError("the Pearson loss needs at least 2 images per batch")
    p, t = p - p.mean(), t - t.mean()
    return 1 - (p * t).sum() / (p.norm() * t.norm() + EPS)


def cross_entropy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(pred.float(), target.long())


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": mse,
    "pearson": pearson,
    "ce": cross_entropy,
}
