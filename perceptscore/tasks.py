"""The task registry: what each perceptual task outputs, how its images are prepared, how scores read.

The facts live in ``weights/registry.json`` (shipped as ``perceptscore.weights``); this module only turns
them into typed objects. Importing it is cheap (no torch), so the CLI can use it for ``--help`` and
argument checks.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from perceptscore.architecture import Architecture
from perceptscore.errors import UsageError


@dataclass(frozen=True)
class Preprocess:
    """How one image becomes model input, reproducing the release's torchvision pipeline.

    ``resize`` an int: the short side goes to that size (torchvision ``Resize(int)``); a pair: exactly
    (height, width) (``Resize((h, w))``). Then ``crops`` crops of ``crop`` pixels: one centre crop when
    ``crops == 1``, else that many random crops whose outputs are averaged.
    """

    resize: int | tuple[int, int]
    crop: int = 224
    crops: int = 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        resize = d["resize"]
        return cls(
            resize=tuple(resize) if isinstance(resize, list) else resize, crop=d["crop"], crops=d["crops"]
        )

    def describe(self) -> str:
        if isinstance(self.resize, int):
            size = f"Resize({self.resize}, bilinear)"
        else:
            size = f"Resize(({self.resize[0]}, {self.resize[1]}), bilinear)"
        crop = (
            f"CenterCrop({self.crop})" if self.crops == 1 else f"{self.crops} x RandomCrop({self.crop}), mean"
        )
        return f"{size} + {crop} + ToTensor + Normalize(CLIP)"


@dataclass(frozen=True)
class Release:
    """Where the authors publish a task's weights (a Hugging Face model repo)."""

    repo_id: str
    filename: str
    revision: str = "main"
    sha256: str | None = None  # pinned hash when known; downloads are always checked against the hub's
    size: str = ""
    license: str | None = None

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{self.filename}"


@dataclass(frozen=True)
class Task:
    name: str
    aliases: tuple[str, ...]
    outputs: int
    architecture: Architecture
    preprocess: Preprocess
    release: Release
    labels: tuple[str, ...] | None = None
    display: tuple[float, float] | None = None  # raw -> (raw - low) / (high - low)
    card: str = ""  # model card, relative to the weights package

    def card_text(self) -> str:
        return resources.files("perceptscore.weights").joinpath(self.card).read_text(encoding="utf-8")

    @property
    def columns(self) -> tuple[str, ...]:
        """The output columns this task adds to a row, in order."""
        if self.labels:
            return (self.name, f"{self.name}_confidence", *(f"{self.name}_{label}" for label in self.labels))
        if self.display:
            return (self.name, f"{self.name}_raw")
        return (self.name,)

    @property
    def sort_column(self) -> str:
        """The number rank/filter use: the display score, or for a classifier its confidence."""
        return f"{self.name}_confidence" if self.labels else self.name

    def display_score(self, raw: float) -> float:
        if self.display is None:
            return raw
        low, high = self.display
        return (raw - low) / (high - low)

    def values(self, raw: Any) -> dict[str, list[Any]]:
        """Raw head outputs (n, outputs) as a numpy array -> this task's output columns, one list each.

        Regression: the raw value (and, where the release has one, its display mapping). Classification:
        softmax probabilities per label, the argmax label and its probability.
        """
        import numpy as np

        raw = np.asarray(raw, dtype=np.float64)
        if self.labels:
            shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
            probs = shifted / shifted.sum(axis=1, keepdims=True)
            best = probs.argmax(axis=1)
            columns: dict[str, list[Any]] = {
                self.name: [self.labels[i] for i in best],
                f"{self.name}_confidence": probs.max(axis=1).tolist(),
            }
            for j, label in enumerate(self.labels):
                columns[f"{self.name}_{label}"] = probs[:, j].tolist()
            return columns
        scores = raw[:, 0]
        if self.display:
            return {
                self.name: [self.display_score(s) for s in scores.tolist()],
                f"{self.name}_raw": scores.tolist(),
            }
        return {self.name: scores.tolist()}

    def raw_from(self, frame: Any) -> Any:
        """The inverse of ``values``: raw outputs (n, outputs) from a frame of this task's columns (NaN rows
        where a row has no score). A classifier's are its log-probabilities: the logits up to a constant,
        which changes neither the argmax nor the softmax."""
        import numpy as np

        if self.labels:
            probs = frame[[f"{self.name}_{label}" for label in self.labels]].to_numpy(dtype=np.float64)
            with np.errstate(divide="ignore"):
                return np.log(probs)
        column = f"{self.name}_raw" if f"{self.name}_raw" in frame.columns else self.name
        return frame[[column]].to_numpy(dtype=np.float64)


def _task_from_dict(name: str, d: dict[str, Any], archs: dict[str, Any]) -> Task:
    display = d.get("display")
    arch = Architecture.from_dict({**archs[d["architecture"]], "outputs": d["outputs"]})
    return Task(
        name=name,
        aliases=tuple(d.get("aliases", ())),
        outputs=d["outputs"],
        architecture=arch,
        preprocess=Preprocess.from_dict(d["preprocess"]),
        release=Release(**d["release"]),
        labels=tuple(d["labels"]) if d.get("labels") else None,
        display=(display["low"], display["high"]) if display else None,
        card=d.get("card", ""),
    )


@cache
def registry() -> dict[str, Any]:
    """The raw registry document shipped in ``perceptscore.weights``."""
    text = resources.files("perceptscore.weights").joinpath("registry.json").read_text(encoding="utf-8")
    return json.loads(text)


@cache
def all_tasks() -> dict[str, Task]:
    reg = registry()
    return {name: _task_from_dict(name, d, reg["architectures"]) for name, d in reg["tasks"].items()}


def base_release(name: str) -> Release:
    """A CLIP backbone the trainer can start from, by its registry name (e.g. ``openai``)."""
    bases = registry().get("bases", {})
    if name not in bases:
        raise UsageError(f"unknown base {name!r}; known: {', '.join(bases)}, or a path to a weights file")
    return Release(**bases[name])


def get_task(name: str) -> Task:
    """Look a task up by name or alias, case-insensitively."""
    key = name.strip().lower()
    for task in all_tasks().values():
        if key == task.name or key in task.aliases:
            return task
    raise unknown_task(name)


def _spellings() -> dict[str, str]:
    """Every accepted spelling (names and aliases) -> its task's name."""
    return {alias: t.name for t in all_tasks().values() for alias in (t.name, *t.aliases)}


def suggest_task(name: str) -> str | None:
    """The task a mistyped name most likely meant: one it begins (``memo``), else the closest spelling
    by difflib (``memorabilty``); None when nothing is close (``beauty``)."""
    key, spellings = name.strip().lower(), _spellings()
    # A prefix first: difflib alone finds "emo" closer to "mem" than to "emotion".
    begun = {task for spelling, task in spellings.items() if key and spelling.startswith(key)}
    if len(begun) == 1:
        return begun.pop()
    close = difflib.get_close_matches(key, spellings, n=1)
    return spellings[close[0]] if close else None


def unknown_task(name: str) -> UsageError:
    """The one-line error for a task name that is none: with the likely one when there is one."""
    hint = suggest_task(name)
    if hint:
        return UsageError(f"unknown task {name!r}: did you mean {hint!r}? (known: {', '.join(all_tasks())})")
    known = ", ".join(
        f"{t.name} ({', '.join(t.aliases)})" if t.aliases else t.name for t in all_tasks().values()
    )
    return UsageError(f"unknown task {name!r}; known tasks: {known}")


def parse_tasks(values: list[str]) -> list[str]:
    """``-t a,b -t c`` -> canonical names, in order, once each."""
    names = [get_task(v).name for value in values for v in value.split(",") if v.strip()]
    if not names:
        raise UsageError("no task given: use -t memorability, quality or emotion (several: -t mem,quality)")
    return list(dict.fromkeys(names))


def parse_checkpoint_options(values: list[str], tasks: list[str]) -> dict[str, str]:
    """``--checkpoint TASK=PATH`` (repeatable), or a bare ``PATH`` when exactly one task is asked."""
    names = _spellings()
    result: dict[str, str] = {}
    for value in values:
        key, sep, path = value.partition("=")
        if sep and key.strip().lower() in names:
            result[names[key.strip().lower()]] = path
        elif sep and _means_a_task(key, value):
            raise unknown_task(key.strip())
        elif len(tasks) == 1:
            result[get_task(tasks[0]).name] = value
        else:
            raise UsageError(
                f"--checkpoint {value!r}: with several tasks write TASK=PATH, e.g. quality=iqa.pth"
            )
    return result


def _means_a_task(key: str, value: str) -> bool:
    """Whether ``KEY=PATH`` names a task by KEY (a mistyped one, as it is no task's): KEY is a bare word,
    and the whole value is no file (a file may well be named ``run=3.pth``)."""
    return re.fullmatch(r"[\w-]+", key.strip()) is not None and not os.path.exists(value)
