"""``perceptscore explain``: a heatmap PNG per image (and with ``raw`` the map as ``.npy``) in a folder."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perceptscore._version import __version__
from perceptscore.errors import DecodeError, UsageError
from perceptscore.folders import check_output_folder
from perceptscore.heatmap import METHODS
from perceptscore.items import Item
from perceptscore.plan import ScoreOptions
from perceptscore.replacing import PNG_SOFTWARE, refuse_replacing
from perceptscore.sinks import write_atomic
from perceptscore.tasks import get_task

if TYPE_CHECKING:
    from PIL import Image

    from perceptscore.explain import Explainer


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
    checkpoint: str | Sequence[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    recursive: bool = True,
    overwrite: bool = False,
) -> Iterator[Explained]:
    """Explain every image the inputs name (files, folders, globs, lists, manifests: as ``score`` reads
    them) into ``out_dir``: ``<name>.<task>.<method>.png`` (a name used twice gets ``-1``, ``-2``), and
    ``.npy`` beside it with ``raw``. Bad inputs and options fail before the model loads, and so does a name
    that would write over one of the inputs; ``out_dir`` inside a folder given is not walked. A file that
    cannot be decoded is an ``Explained`` with its error, and the run goes on. ``checkpoint``: the
    ``--checkpoint`` values, ``PATH`` or ``TASK=PATH`` as ``score`` reads them."""
    spec = get_task(task)
    weights = checkpoint_of(spec.name, checkpoint)
    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}; choose {' or '.join(METHODS)}")
    if label is not None and label not in (spec.labels or ()):
        known = (
            f"known: {', '.join(spec.labels)}" if spec.labels else f"{spec.name} has no classes (emotion has)"
        )
        raise UsageError(f"--class {label!r}: {known}")
    if batch_size is not None and batch_size < 1:  # 0 would silently mean "the default"
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o {str(out_dir)!r} is a file: name a folder for the heatmaps")
    check_output_folder(out_dir)
    # The whole input list and every output name are settled before anything is written: a run never
    # explains its own outputs, and never writes over one of its inputs.
    sources = ScoreOptions([spec.name], recursive=recursive).sources(inputs, skip_folders=[str(out_dir)])
    planned = plan_outputs(list(sources.rows()), out_dir, f".{spec.name}.{method}")
    refuse_writing_over_inputs(planned, inputs, raw)
    for png in (entry.png for entry in planned if entry.png is not None):  # an earlier run's maps: replaced
        for path in (png, png.with_suffix(".npy")) if raw else (png,):
            refuse_replacing(path, "heatmap", overwrite)
    return _explain_all(planned, spec.name, out_dir, method, label, raw, weights, device, precision,
                        batch_size)  # fmt: skip


def checkpoint_of(task: str, values: str | Sequence[str] | None) -> str | None:
    """The weights file ``--checkpoint`` names for ``task``, read by ``score``'s parser (``PATH``, or
    ``TASK=PATH`` with any of the task's names; a mistyped task is a 'did you mean'). Weights for another
    task are refused: the run would silently load this task's default weights instead."""
    from perceptscore.tasks import parse_checkpoint_options

    given = [values] if isinstance(values, str) else list(values or [])
    parsed = parse_checkpoint_options(given, [task])
    for other, path in parsed.items():
        if other != task:
            raise UsageError(
                f"--checkpoint {other}={path}: this run explains {task}; "
                f"pass {task}'s weights (--checkpoint {task}=PATH or --checkpoint PATH)"
            )
    return parsed.get(task)


@dataclass
class Planned:
    """One input and the heatmap name chosen for it (None for an item that is already an error)."""

    item: Item
    png: Path | None


def plan_outputs(items: Sequence[Item], out_dir: Path, suffix: str) -> list[Planned]:
    """Each item's ``out_dir/<stem><suffix>.png``; a name used twice in the run gets ``-1``, ``-2``."""
    used: set[str] = set()
    planned = []
    for item in items:
        if item.error:
            planned.append(Planned(item, None))
            continue
        stem, n = output_stem(item.path), 0
        while (name := f"{stem}{suffix}{f'-{n}' if n else ''}") in used:
            n += 1
        used.add(name)
        planned.append(Planned(item, out_dir / f"{name}.png"))
    return planned


def output_stem(path: str) -> str:
    """The name a heatmap is named after: a local file's stem; for a URL, the last part of its path only
    (never its query, a presigned signature, nor its user info); for a tar member, the member's; for a
    dataset's row, ``<file stem>_<row>``."""
    import posixpath
    import urllib.parse

    from perceptscore.locators import TAR_SCHEME
    from perceptscore.remote import scheme

    if path.startswith(TAR_SCHEME) and "::" in path:
        return output_stem(path[len(TAR_SCHEME) :].rpartition("::")[0])
    if "::" in path:
        from perceptscore.tables import parse_row_uri

        row = parse_row_uri(path)
        if row is not None:  # a dataset's row: its file's stem and its row, so rows of one file differ
            return f"{output_stem(row[0])}_{row[2]}"
    if scheme(path) is None:
        return Path(path).stem
    name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
    return Path(name).stem or "image"  # "https://host/" names no file


def refuse_writing_over_inputs(planned: Sequence[Planned], inputs: Sequence[str], raw: bool) -> None:
    """One line and exit 2, before the model loads, when a name chosen would replace one of this run's
    inputs (an image walked, listed or named; a list or manifest): e.g. ``-o`` is the photo folder and a
    photo there has a heatmap's name, or an earlier run's heatmaps there are now inputs. Refused rather
    than renamed: names stay predictable, and a rerun into the photo folder does not pile up ``-1`` maps."""
    from perceptscore.safety import input_files

    def identity(path: str | Path) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # absent (not written yet), remote, or not a local path at all
            return None
        return st.st_dev, st.st_ino

    outputs = {}
    for p in planned:
        for path in (p.png, p.png.with_suffix(".npy") if raw else None) if p.png else ():
            if path is not None and (key := identity(path)) is not None:
                outputs[key] = path
    if not outputs:
        return
    named = [p.item.path for p in planned] + list(input_files(inputs))
    for path in named:
        if (key := identity(path)) in outputs:
            raise UsageError(
                f"-o {str(outputs[key].parent)!r}: {outputs[key].name!r} would overwrite the input {path!r}; "
                "refusing to write over an input: choose an output folder that holds no inputs"
            )


def _explain_all(
    planned: Sequence[Planned],
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
    """The work, once the inputs, options and names are known to be good (a generator: files appear one by
    one)."""
    from perceptscore.explain import Explainer
    from perceptscore.images import decode

    explainer = Explainer(task, checkpoint, device, precision, method, batch_size)
    out_dir.mkdir(exist_ok=True)
    group: list[tuple[Planned, Image.Image | str]] = []  # decoded pictures, or why not, in input order
    for entry in planned:
        if entry.item.error or entry.png is None:
            group.append((entry, entry.item.error or "no output name"))
        else:
            try:
                with entry.item.locator.open() as f:
                    group.append((entry, decode(f)))
            except DecodeError as exc:
                group.append((entry, str(exc)))
        # a batch is several images' crops (one forward and backward for memorability's 4 or 16 photos)
        if sum(not isinstance(p, str) for _, p in group) >= explainer.images_per_batch:
            yield from _write(group, explainer, method, label, raw)
            group = []
    yield from _write(group, explainer, method, label, raw)


def _signed(description: str) -> Any:
    """The PNG text chunks: ``Software`` tells a later run this heatmap is perceptscore's to replace;
    ``Description`` says in words what the picture shows (for screen readers and image catalogues)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", f"{PNG_SOFTWARE} {__version__}")
    info.add_itxt("Description", description)  # international text: a class or path may not be Latin-1
    return info


def _write(
    group: Sequence[tuple[Planned, Image.Image | str]], explainer: Explainer, method: str,
    label: str | None, raw: bool,
) -> Iterator[Explained]:  # fmt: skip
    """Explain a group's pictures in one call, then write each heatmap (and ``.npy``) in input order."""
    import numpy as np

    from perceptscore.heatmap import legend_lines, overlay

    pictures = [p for _, p in group if not isinstance(p, str)]
    results = iter(explainer.explain_many(pictures, label))
    for entry, picture in group:
        if isinstance(picture, str):
            yield Explained(entry.item.path, error=picture)
            continue
        png = entry.png
        assert png is not None  # planned for every item that decoded
        result = next(results)
        shown = result.display if result.display is not None else result.map
        image = overlay(picture, shown, METHODS[method], result.caption(), legend=result.legend())
        unseen = not np.isfinite(shown).all()
        buffer = io.BytesIO()
        words = "; ".join([result.caption(), *legend_lines(METHODS[method], result.legend(), unseen)])
        image.save(buffer, format="PNG", pnginfo=_signed(words))
        write_atomic(png, buffer.getvalue())
        npy = None
        if raw:
            npy = png.with_suffix(".npy")
            buffer = io.BytesIO()
            np.save(buffer, result.map, allow_pickle=False)
            write_atomic(npy, buffer.getvalue())
        yield Explained(entry.item.path, png, npy, result.caption())
