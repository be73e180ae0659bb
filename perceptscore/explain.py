"""Why the model scored an image as it did: a map over the image, per task.

Two methods, both on the model's explicit-attention path (``PerceptModel.recording_attention``):

- ``relevance`` (default): gradient-weighted attention relevance over all layers, after Chefer, Gur and
  Wolf, "Generic Attention-model Explainability" (ICCV 2021; the follow-up of "Transformer Interpretability
  Beyond Attention Visualization", CVPR 2021), for self-attention: ``R = I``, then per layer
  ``R += mean_heads(cam(grad(A) * A)) @ R``; the map is the class token's row over the patches. For
  emotion's class logit ``cam`` is Chefer's ``clamp(min=0)``: evidence *for* the class. For a score
  (memorability, quality) it is the magnitude ``abs``, a deviation of ours: the map shows what the raw score
  depended on, either way, not what raised it. A regression head's sign is an arbitrary convention (a tower
  trained on the negated target is as good), and the positive part flips with it: on two test towers
  trained alike the exact rule put 9% of the mass in the quadrant the score depends on for one and 99.8% for
  the other, purely by sign.
- ``attention-shift``: the class token's attention to the patches in the last layer, averaged over heads,
  in the fine-tuned model minus the same in the base CLIP tower (the adapters switched off), as the
  paper's attention-shift figure shows. Positive: where fine-tuning moved attention to; negative: from.

Maps are computed per crop of the task's own preprocessing (so on exactly what the score saw) and pasted
back into the resized image at the crop's offset; where crops overlap (quality's 15) they are averaged,
where none reached (outside memorability's centre crop) the map is NaN. That plain average is the raw map
(``--raw``); the picture draws ``display``, the same crops blended with weights that fall towards each
crop's edges, so that no crop's border shows as a step. ``Explainer`` computes in fp32 on
every device unless asked otherwise (most of the backward's gradients are fp16 subnormals) and runs
the crops of several images in one batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from perceptscore.errors import UsageError
from perceptscore.heatmap import METHODS
from perceptscore.model import PerceptModel
from perceptscore.preprocess import crop_offsets, crops_of, normalize, resize
from perceptscore.tasks import Task, get_task

Objective = Callable[[torch.Tensor], torch.Tensor]  # raw outputs (B, outputs) -> the explained value (B,)
# What a score's relevance map shows (the caption says it): the magnitude rule, so regions that lowered the
# score count as much as those that raised it.
SCORE_TARGET = "what the raw score depended on, either way"


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
    # The map to draw: the crops blended smoothly (``blend``), NaN where ``map`` is; None: draw ``map``.
    display: np.ndarray | None = None

    def caption(self) -> str:
        what = f"{self.task} {self.label} {self.score:.3f}" if self.label else f"{self.task} {self.score:.4f}"
        return f"{what} - {self.method} ({self.target})"

    def legend(self) -> str:
        """What the colours mean, in words, for the colour bar's title."""
        if self.method == "attention-shift":
            return "where fine-tuning moved the model's attention, compared with base CLIP"
        if self.label:
            return f"evidence for {self.label}"
        return f"what the {self.task} score depended on, raising or lowering it"


def explain_image(
    model: PerceptModel,
    task: Task,
    image: Image.Image,
    method: str = "relevance",
    label: str | None = None,
    batch_size: int = 8,
) -> Explanation:
    """The map of one upright RGB image (``images.decode`` applies EXIF orientation, as scoring does)."""
    return explain_images(model, task, [image], method, label, batch_size)[0]


def explain_images(
    model: PerceptModel,
    task: Task,
    images: Sequence[Image.Image],
    method: str = "relevance",
    label: str | None = None,
    batch_size: int = 8,
) -> list[Explanation]:
    """The maps of upright RGB images, their crops run ``batch_size`` at a time across images (a batch of
    memorability photos is one forward and one backward; the maps are those of one image at a time: the
    samples of a batch are independent, so each one's gradient is its own).

    ``label``: for emotion, the class to explain (default: each image's predicted one). ``model`` in eval
    mode on its device and dtype; for ``attention-shift`` unmerged (``load_model(..., merge=False)``).
    """
    _check_request(task, method, label)
    if not images:
        return []
    views = [_View.of(image, task) for image in images]
    param = next(model.parameters())
    pixels = np.concatenate([crops_of(v.resized, v.offsets, task.preprocess.crop) for v in views])
    x = normalize(torch.from_numpy(pixels).to(param.device), task.architecture.mean, task.architecture.std,
                  param.dtype)  # fmt: skip
    counts = [len(v.offsets) for v in views]
    targets = _targets(model, task, x, counts, label, batch_size)
    grids, raws = _maps(model, task, method, x, targets, batch_size)
    explanations, start = [], 0
    for view, n in zip(views, counts, strict=True):
        target = int(targets[start]) if targets is not None else None
        explanations.append(_explanation(task, method, view.resized, view.offsets, grids[start : start + n],
                                         raws[start : start + n], target))  # fmt: skip
        start += n
    return explanations


def _check_request(task: Task, method: str, label: str | None) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose {' or '.join(METHODS)}")
    if label is not None and not task.labels:
        raise UsageError(f"--class is for a classifier (emotion), not {task.name}")
    if label is not None and label not in (task.labels or ()):
        raise UsageError(f"unknown class {label!r}; known: {', '.join(task.labels or ())}")


@dataclass(frozen=True)
class _View:
    """An image as the task's preprocessing sees it: resized, and where its crops are."""

    resized: np.ndarray
    offsets: list[tuple[int, int]]

    @classmethod
    def of(cls, image: Image.Image, task: Task) -> _View:
        resized = np.asarray(resize(image, task.preprocess.resize))
        return cls(resized, crop_offsets(resized, task.preprocess))


def _maps(
    model: PerceptModel, task: Task, method: str, x: torch.Tensor, targets: torch.Tensor | None,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Every crop's patch grid and raw outputs (from the same forward passes), ``batch_size`` at a time."""
    pairs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        if method == "relevance":
            either_way = not task.labels  # a score: what it depended on either way; a class: evidence for it
            pairs.append(_relevance(model, chunk, _objective(task, targets, start), either_way))
        else:
            pairs.append(_attention_shift(model, chunk))
    return torch.cat([grid for grid, _ in pairs]), torch.cat([out for _, out in pairs])


def _objective(task: Task, targets: torch.Tensor | None, start: int) -> Objective:
    """What a batch of crops starting at crop ``start`` explains: the raw score, or a class's logit."""

    def objective(out: torch.Tensor) -> torch.Tensor:
        if not task.labels:
            return out[:, 0]  # the raw score
        if targets is None:  # one crop per image: each row's own prediction is its image's
            return out.gather(1, out.detach().argmax(dim=1, keepdim=True))[:, 0]
        return out.gather(1, targets[start : start + len(out), None])[:, 0]

    return objective


def _explanation(
    task: Task, method: str, resized: np.ndarray, offsets: list[tuple[int, int]], grids: torch.Tensor,
    raws: torch.Tensor, target: int | None,
) -> Explanation:  # fmt: skip
    """One image's explanation from its crops' maps and raw outputs (``target``: the class explained,
    None for the prediction)."""
    raw = raws.mean(dim=0)
    values = task.values(raw.cpu().numpy()[None])
    chosen: str | None = None
    if task.labels:
        chosen = task.labels[target if target is not None else int(raw.argmax())]
        score, what = float(values[f"{task.name}_{chosen}"][0]), f"logit of {chosen}"
    else:
        score, what = float(values[task.name][0]), SCORE_TARGET
    if method == "attention-shift":
        what = "last layer's class-token attention, fine-tuned minus base CLIP"
    crop, shape = task.preprocess.crop, resized.shape[:2]
    return Explanation(
        task=task.name, method=method, target=what, score=score, label=chosen,
        map=paste(grids, offsets, crop, shape), image=Image.fromarray(resized),
        display=blend(grids, offsets, crop, shape),
    )  # fmt: skip


def _targets(
    model: PerceptModel, task: Task, x: torch.Tensor, counts: list[int], label: str | None, batch_size: int
) -> torch.Tensor | None:
    """A classifier's class to explain, per crop: ``label``, else the image's prediction, the mean over its
    crops' outputs (None when every image is one crop: each row's own argmax is it, no extra forward)."""
    if not task.labels:
        return None
    per_crop = torch.tensor(counts, device=x.device)
    if label is not None:
        return torch.full((len(x),), task.labels.index(label), dtype=torch.long, device=x.device)
    if max(counts) == 1:
        return None
    with torch.no_grad():
        out = torch.cat([model(chunk).float() for chunk in x.split(batch_size)])
    owner = torch.repeat_interleave(torch.arange(len(counts), device=x.device), per_crop)
    means = torch.zeros(len(counts), out.shape[1], device=x.device).index_add_(0, owner, out)
    return means.argmax(dim=1).repeat_interleave(per_crop)


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


def window(crop: int) -> np.ndarray:
    """(crop, crop) blending weights: a Hann window per axis (sine squared, at pixel centres), 1 at the
    centre, falling to ~5e-5 at the edges: a crop enters a blend with almost no weight (quadratically: no
    kink either), yet never 0, so a pixel one crop alone covers keeps that crop's value."""
    bump = np.sin(np.pi * (np.arange(crop) + 0.5) / crop) ** 2
    return np.outer(bump, bump)


def blend(
    grids: torch.Tensor, offsets: list[tuple[int, int]], crop: int, shape: tuple[int, int]
) -> np.ndarray:
    """Like ``paste``, but each crop weighted by ``window``: where another crop begins, it enters with a
    weight near 0 and grows towards its centre, so the blend has no step at any crop's border (averaging
    shows each border as one). Equal crops blend to exactly their value; pixels no crop covers are NaN."""
    pixels = F.interpolate(grids[:, None].float(), size=(crop, crop), mode="bilinear", align_corners=False)
    pixels = pixels[:, 0].cpu().numpy().astype(np.float64)
    weights = window(crop)
    total = np.zeros(shape, dtype=np.float64)
    weight = np.zeros(shape, dtype=np.float64)
    for (top, left), values in zip(offsets, pixels, strict=True):
        total[top : top + crop, left : left + crop] += values * weights
        weight[top : top + crop, left : left + crop] += weights
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan).astype(np.float32)


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
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        self.task, self.method = get_task(task), method
        self.weights = resolve(self.task, checkpoint)
        dev = resolve_device(device)
        # fp32 on every device unless asked: the map is built from the backward's gradients, and most of
        # them are small enough to be fp16 subnormals (few significant bits left)
        self.precision = "fp32" if precision == "auto" else precision
        # attention-shift needs the adapters apart from the base; relevance runs faster merged
        self.model = load_model(
            self.task.name,
            self.weights.path,
            device=dev,
            precision=self.precision,
            merge=method == "relevance",
        )
        # ~100 MB of attention maps and their gradients per full-size crop on the CPU: keep batches small
        self.batch_size = batch_size if batch_size is not None else (16 if dev.type == "cuda" else 4)

    @property
    def images_per_batch(self) -> int:
        """How many images fill a batch of crops (at least one: quality's 15 crops are a batch alone)."""
        return max(1, self.batch_size // self.task.preprocess.crops)

    def explain(self, image: str | os.PathLike[str] | Image.Image, label: str | None = None) -> Explanation:
        """Explain a file or a PIL image; both are turned upright by their EXIF orientation, as scoring
        decodes a file (an image already upright, as ``images.decode`` returns it, is left as it is)."""
        return self.explain_many([image], label)[0]

    def explain_many(
        self, images: Sequence[str | os.PathLike[str] | Image.Image], label: str | None = None
    ) -> list[Explanation]:
        """Explain several images in batches of ``batch_size`` crops; the same maps as one at a time."""
        from perceptscore.images import decode

        pictures = [
            decode(i) if isinstance(i, (str, os.PathLike)) else ImageOps.exif_transpose(i).convert("RGB")
            for i in images
        ]
        return explain_images(self.model, self.task, pictures, self.method, label, self.batch_size)
