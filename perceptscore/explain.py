"""Why the model scored an image as it did: a map over the image, per task.

Two methods, both on the model's explicit-attention path (``PerceptModel.recording_attention``):

- ``relevance`` (default): gradient-weighted attention relevance over all layers, Chefer, Gur and Wolf,
  "Generic Attention-model Explainability" (ICCV 2021; the follow-up of "Transformer Interpretability
  Beyond Attention Visualization", CVPR 2021), for self-attention: ``R = I``, then per layer
  ``R += mean_heads(relu(grad(A) * A)) @ R``; the map is the class token's row over the patches. It shows
  what raised the task's output: the raw score (memorability, quality) or the chosen class's logit (emotion).
- ``attention-shift``: the class token's attention to the patches in the last layer, averaged over heads,
  in the fine-tuned model minus the same in the base CLIP tower (the adapters switched off), as the
  paper's attention-shift figure shows. Positive: where fine-tuning moved attention to; negative: from.

Maps are computed per crop of the task's own preprocessing (so on exactly what the score saw) and pasted
back into the resized image at the crop's offset; where crops overlap (quality's 15) they are averaged,
where none reached (outside memorability's centre crop) the map is NaN.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from perceptscore.errors import UsageError
from perceptscore.heatmap import METHODS
from perceptscore.model import PerceptModel
from perceptscore.preprocess import crop_offsets, crops_of, normalize, resize
from perceptscore.tasks import Task, get_task

Objective = Callable[[torch.Tensor], torch.Tensor]  # raw outputs (B, outputs) -> the explained value (B,)


def relevance_maps(
    model: PerceptModel, x: torch.Tensor, objective: Objective, either_way: bool = False
) -> torch.Tensor:
    """CLIP-normalised images (B, 3, S, S) -> relevance of each patch for ``objective`` (B, grid, grid).

    Chefer's rule keeps the positive part of ``grad * attention``: evidence *for* a class. ``either_way``
    keeps its magnitude instead, evidence for and against: for a score, a region that lowered it matters as
    much as one that raised it (the positive part alone would map a low score's reasons away).
    """
    return _relevance(model, x, objective, either_way)[0]


def _relevance(
    model: PerceptModel, x: torch.Tensor, objective: Objective, either_way: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps and the raw outputs of the same forward (no second forward for the score)."""
    x = x.detach().requires_grad_(True)  # frozen weights: the input makes autograd keep the graph
    with torch.enable_grad(), model.recording_attention() as attentions:
        out = model(x)
        grads = torch.autograd.grad(objective(out).sum(), attentions)  # independent samples: per-sample
    tokens = attentions[0].shape[-1]
    r = torch.eye(tokens, dtype=torch.float32, device=x.device).expand(x.shape[0], tokens, tokens)
    for attention, grad in zip(attentions, grads, strict=True):
        weighted = grad.float() * attention.detach().float()
        cam = (weighted.abs() if either_way else weighted.clamp(min=0)).mean(dim=1)
        r = r + cam @ r
    return _grid(r[:, 0, 1:]), out.detach().float()


def attention_shift_maps(model: PerceptModel, x: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised images (B, 3, S, S) -> last-layer class-token attention, fine-tuned minus base
    (B, grid, grid). ``model`` must be unmerged: the base is the model with its adapters off."""
    return _attention_shift(model, x)[0]


@torch.no_grad()
def _attention_shift(model: PerceptModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps and the fine-tuned model's raw outputs (from the same forward)."""
    with model.recording_attention() as tuned:
        out = model(x)
    with model.adapters_off(), model.recording_attention() as base:
        model(x)
    shift = tuned[-1][:, :, 0, 1:].float().mean(dim=1) - base[-1][:, :, 0, 1:].float().mean(dim=1)
    return _grid(shift), out.float()


def _grid(patches: torch.Tensor) -> torch.Tensor:
    side = round(patches.shape[-1] ** 0.5)
    return patches.reshape(patches.shape[0], side, side)


@dataclass
class Explanation:
    """One image's map. ``map`` is (H, W) float32 over ``image``, the upright image as the task resizes it
    (the model's view: e.g. 224 on the short side, or 512x384 for quality), NaN where no crop reached."""

    task: str
    method: str
    target: str  # what the map explains, in words: "raw score", "logit of awe", ...
    score: float  # the task's score as `score` writes it (display score; for emotion the class probability)
    label: str | None  # emotion: the explained class
    map: np.ndarray
    image: Image.Image

    def caption(self) -> str:
        what = f"{self.task} {self.label} {self.score:.3f}" if self.label else f"{self.task} {self.score:.4f}"
        return f"{what} - {self.method} ({self.target})"


def explain_image(
    model: PerceptModel,
    task: Task,
    image: Image.Image,
    method: str = "relevance",
    label: str | None = None,
    batch_size: int = 8,
) -> Explanation:
    """The map of one upright RGB image (``images.decode`` applies EXIF orientation, as scoring does).

    ``label``: for emotion, the class to explain (default: the predicted one). ``model`` in eval mode on its
    device and dtype; for ``attention-shift`` unmerged (``load_model(..., merge=False)``).
    """
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose {' or '.join(METHODS)}")
    if label is not None and not task.labels:
        raise UsageError(f"--class is for a classifier (emotion), not {task.name}")
    if label is not None and label not in (task.labels or ()):
        raise UsageError(f"unknown class {label!r}; known: {', '.join(task.labels or ())}")
    param = next(model.parameters())
    spec, arch = task.preprocess, task.architecture
    resized = np.asarray(resize(image, spec.resize))
    offsets = crop_offsets(resized, spec)
    x = normalize(torch.from_numpy(crops_of(resized, offsets, spec.crop)).to(param.device), arch.mean,
                  arch.std, param.dtype)  # fmt: skip
    chunks = x.split(batch_size)
    index = task.labels.index(label) if task.labels and label else None
    if task.labels and index is None and spec.crops > 1:  # the image's class is the mean over its crops'
        with torch.no_grad():
            index = int(torch.cat([model(chunk).float() for chunk in chunks]).mean(dim=0).argmax())

    def objective(out: torch.Tensor) -> torch.Tensor:
        if not task.labels:
            return out[:, 0]  # the raw score
        if index is None:  # one crop per image: each row's own prediction is the image's
            return out.gather(1, out.detach().argmax(dim=1, keepdim=True))[:, 0]
        return out[:, index]

    if method == "relevance":
        either_way = not task.labels  # a score: what lowered it too; a class: evidence for it (Chefer)
        pairs = [_relevance(model, chunk, objective, either_way) for chunk in chunks]
    else:
        pairs = [_attention_shift(model, chunk) for chunk in chunks]
    grids = torch.cat([grid for grid, _ in pairs])
    raw = torch.cat([out for _, out in pairs]).mean(dim=0)  # the score, from the same forward passes
    values = task.values(raw.cpu().numpy()[None])
    if task.labels:
        label = task.labels[index if index is not None else int(raw.argmax())]
        score, target = float(values[f"{task.name}_{label}"][0]), f"logit of {label}"
    else:
        score, target = float(values[task.name][0]), "raw score"
    if method == "attention-shift":
        target = "last layer's class-token attention, fine-tuned minus base CLIP"
    return Explanation(
        task=task.name, method=method, target=target, score=score, label=label,
        map=paste(grids, offsets, spec.crop, resized.shape[:2]), image=Image.fromarray(resized),
    )  # fmt: skip


def paste(
    grids: torch.Tensor, offsets: list[tuple[int, int]], crop: int, shape: tuple[int, int]
) -> np.ndarray:
    """Per-crop patch maps (n, grid, grid) -> one (H, W) map: each upsampled to the crop's pixels
    (bilinear) and placed at its offset; overlaps averaged, pixels no crop covers NaN."""
    pixels = F.interpolate(grids[:, None].float(), size=(crop, crop), mode="bilinear", align_corners=False)
    pixels = pixels[:, 0].cpu().numpy()
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.int32)
    for (top, left), values in zip(offsets, pixels, strict=True):
        total[top : top + crop, left : left + crop] += values
        count[top : top + crop, left : left + crop] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


class Explainer:
    """The Python face of ``perceptscore explain``: one task's model, loaded once.

    >>> explainer = Explainer("memorability", checkpoint="perceptCLIP_Memorability.pth", device="cpu")
    >>> e = explainer.explain("photo.jpg")  # e.map: (H, W) float32 array over e.image; e.score
    """

    def __init__(
        self,
        task: str,
        checkpoint: str | Path | None = None,
        device: str = "auto",
        precision: str = "auto",
        method: str = "relevance",
        batch_size: int | None = None,
    ) -> None:
        from perceptscore.checkpoints import load_model, resolve_device
        from perceptscore.hub import resolve

        if method not in METHODS:
            raise UsageError(f"unknown method {method!r}; choose {' or '.join(METHODS)}")
        self.task, self.method = get_task(task), method
        self.weights = resolve(self.task, checkpoint)
        dev = resolve_device(device)
        # attention-shift needs the adapters apart from the base; relevance runs faster merged
        self.model = load_model(
            self.task.name, self.weights.path, device=dev, precision=precision, merge=method == "relevance"
        )
        # ~100 MB of attention maps and their gradients per full-size crop on the CPU: keep batches small
        self.batch_size = batch_size or (16 if dev.type == "cuda" else 4)

    def explain(self, image: str | os.PathLike[str] | Image.Image, label: str | None = None) -> Explanation:
        """Explain a file (decoded upright, as scoring decodes it) or an RGB PIL image."""
        from perceptscore.images import decode

        picture = decode(image) if isinstance(image, (str, os.PathLike)) else image.convert("RGB")
        return explain_image(self.model, self.task, picture, self.method, label, self.batch_size)
