"""``perceptscore explain``: a heatmap PNG per image (and with ``raw`` the map as ``.npy``) in a folder."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from perceptscore.errors import DecodeError, UsageError
from perceptscore.heatmap import METHODS
from perceptscore.plan import ScoreOptions
from perceptscore.sinks import write_atomic
from perceptscore.sources import Sources
from perceptscore.tasks import get_task


@dataclass
class Explained:
    """One input's outcome: the files written and the caption, or why it could not be explained."""

    path: str
    png: Path | None = None
    npy: Path | None = None
    caption: str = ""
    error: str | None = None


def explain(
    inputs: Sequence[str],
    task: str,
    out_dir: Path,
    method: str = "relevance",
    label: str | None = None,
    raw: bool = False,
    checkpoint: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    recursive: bool = True,
) -> Iterator[Explained]:
    """Explain every image the inputs name (files, folders, globs, lists, manifests: as ``score`` reads
    them) into ``out_dir``: ``<name>.<task>.<method>.png`` (a name used twice gets ``-1``, ``-2``), and
    ``.npy`` beside it with ``raw``. Bad inputs and options fail before the model loads; a file that cannot
    be decoded is an ``Explained`` with its error, and the run goes on."""
    spec = get_task(task)
    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}; choose {' or '.join(METHODS)}")
    if label is not None and label not in (spec.labels or ()):
        known = (
            f"known: {', '.join(spec.labels)}" if spec.labels else f"{spec.name} has no classes (emotion has)"
        )
        raise UsageError(f"--class {label!r}: {known}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o {str(out_dir)!r} is a file: name a folder for the heatmaps")
    if not out_dir.parent.is_dir():
        raise UsageError(f"output folder {str(out_dir.parent)!r} does not exist")
    sources = ScoreOptions([spec.name], recursive=recursive).sources(inputs)
    return _explain_all(sources, spec.name, out_dir, method, label, raw, checkpoint, device, precision,
                        batch_size)  # fmt: skip


def _explain_all(
    sources: Sources,
    task: str,
    out_dir: Path,
    method: str,
    label: str | None,
    raw: bool,
    checkpoint: str | None,
    device: str,
    precision: str,
    batch_size: int | None,
) -> Iterator[Explained]:
    """The work, once the inputs and options are known to be good (a generator: files appear one by one)."""
    from perceptscore.explain import Explainer
    from perceptscore.heatmap import overlay
    from perceptscore.images import decode

    explainer = Explainer(task, checkpoint, device, precision, method, batch_size)
    out_dir.mkdir(exist_ok=True)
    used: set[str] = set()
    for item in sources:
        if item.error:
            yield Explained(item.path, error=item.error)
            continue
        try:
            with item.locator.open() as f:
                picture = decode(f)
        except DecodeError as exc:
            yield Explained(item.path, error=str(exc))
            continue
        result = explainer.explain(picture, label)
        png = _free_name(out_dir, Path(item.path).stem, f".{task}.{method}", used, item.path)
        image = overlay(picture, result.map, signed=METHODS[method], caption=result.caption())
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        write_atomic(png, buffer.getvalue())
        npy = None
        if raw:
            import numpy as np

            npy = png.with_suffix(".npy")
            buffer = io.BytesIO()
            np.save(buffer, result.map, allow_pickle=False)
            write_atomic(npy, buffer.getvalue())
        yield Explained(item.path, png, npy, result.caption())


def _free_name(folder: Path, stem: str, suffix: str, used: set[str], source: str) -> Path:
    """``folder/<stem><suffix>.png`` unless this run wrote it already or it is the image itself."""
    for n in range(len(used) + 2):
        name = f"{stem}{suffix}{f'-{n}' if n else ''}"
        path = folder / f"{name}.png"
        if name in used or (path.exists() and os.path.exists(source) and os.path.samefile(path, source)):
            continue
        used.add(name)
        return path
    raise AssertionError("unreachable: one of len(used) + 2 names is free")
