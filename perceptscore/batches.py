"""Decode -> batch: one item's bytes become uint8 crops (per distinct preprocessing), and decoded items
become a ``Batch`` for the model. Each file is decoded once whatever the number of tasks; a file that
cannot be decoded carries its reason instead of pixels. Engines run ``decode_item`` wherever they decode
(worker processes, Ray tasks) and hand the collated ``Batch`` to a ``Predictor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from perceptscore.errors import DecodeError
from perceptscore.images import MAX_PIXELS, decode
from perceptscore.items import Item
from perceptscore.preprocess import prepare
from perceptscore.tasks import Preprocess

if TYPE_CHECKING:  # torch is imported by ``collate``: an isolated decoder process starts without it
    import torch


@dataclass
class Decoded:
    item: Item
    error: str | None
    pixels: dict[Preprocess, np.ndarray]  # per preprocessing: (crops, 3, H, W) uint8
    stat: tuple[int, int] | None = None  # (size, mtime_ns) of the file scored, for incremental runs


def decode_item(
    item: Item, specs: Sequence[Preprocess], draft: int | None, max_pixels: int = MAX_PIXELS
) -> Decoded:
    """Open, decode and prepare one item; never raises for a bad file (its reason is the ``error``)."""
    if item.error:
        return Decoded(item, item.error, {})
    stat = item.locator.stat()
    try:
        with item.locator.open() as f:
            img = decode(f, draft, max_pixels)
        return Decoded(item, None, {spec: prepare(img, spec) for spec in specs}, stat)
    except DecodeError as exc:
        return Decoded(item, str(exc), {}, stat)


@dataclass
class Batch:
    items: list[Item]
    errors: list[str | None]
    pixels: dict[Preprocess, torch.Tensor]  # per preprocessing: the decoded items' crops, stacked
    stats: list[tuple[int, int] | None]

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True) for custom batch types
        self.pixels = {spec: t.pin_memory() for spec, t in self.pixels.items()}
        return self

    @classmethod
    def failed(cls, items: list[Item], reason: str) -> Batch:
        return cls(items, [reason] * len(items), {}, [None] * len(items))


def collate(decoded: list[Decoded]) -> Batch:
    import torch

    ok = [d for d in decoded if d.error is None]
    pixels = (
        {spec: torch.from_numpy(np.concatenate([d.pixels[spec] for d in ok])) for spec in ok[0].pixels}
        if ok
        else {}
    )
    return Batch([d.item for d in decoded], [d.error for d in decoded], pixels, [d.stat for d in decoded])
