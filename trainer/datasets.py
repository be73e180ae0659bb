"""Dataset adapters: a folder as its publishers ship it -> labelled examples split into train/val/test.

Users download the datasets themselves (licences forbid redistribution). Each adapter reads the layout
its dataset is published in and fails with one line saying what it expected and what it found. Where a
dataset has official splits they are used; where it has none, a file goes to train/val/test by a hash of
its path relative to the root (80/10/10): stable across runs, seeds and machines, and independent of how
many files the folder holds. Column layouts beyond LaMem, KonIQ-10k and EmoSet are not verified against
the real downloads here (../shared/reference/perceptclip.md): the messages say what to rename.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from perceptscore.errors import UsageError
from perceptscore.images import IMAGE_EXTENSIONS
from perceptscore.tasks import Task, get_task

SPLITS = ("train", "val", "test")
EMOTIONS = get_task("emotion").labels or ()  # EmoSet's and FI's eight categories (alphabetical)


class LayoutError(UsageError):
    """A dataset folder or manifest that does not look as its adapter expects."""


@dataclass(frozen=True)
class Example:
    path: str
    label: float  # the score, or the class index for classification


@dataclass
class LabelledSet:
    """One dataset, split. ``classes`` names the class indices of a classification set."""

    name: str
    task: str
    splits: dict[str, list[Example]] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None
    source: str = ""  # what was read, for the model card

    def split(self, name: str) -> list[Example]:
        if not self.splits.get(name):
            have = ", ".join(f"{k} ({len(v)})" for k, v in self.splits.items() if v) or "none"
            raise LayoutError(f"dataset {self.name}: no {name!r} split (splits found: {have})")
        return self.splits[name]

    def describe(self) -> str:
        return ", ".join(f"{k} {len(v)}" for k, v in self.splits.items() if v)


def hash_split(key: str, val: float = 0.1, test: float = 0.1) -> str:
    """train/val/test for a dataset without official splits, from a hash of the file's relative path."""
    u = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def _found(root: Path, limit: int = 8) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    except OSError as exc:
        return f"cannot list it ({exc.strerror})"
    if not names:
        return "an empty folder"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _require(root: Path, name: str, expected: str, *candidates: str) -> Path:
    """The first of ``candidates`` under ``root`` that exists, else a LayoutError naming what is there."""
    if not root.is_dir():
        raise LayoutError(f"dataset {name}: {root} is not a folder")
    for candidate in candidates:
        if (root / candidate).exists():
            return root / candidate
    raise LayoutError(f"dataset {name} at {root}: expected {expected}; found {_found(root)}")


def _check_images(name: str, examples: Iterable[Example], where: Path) -> None:
    """A wrong image folder shows at once: the first files must exist (a few missing ones are error rows
    later, not a reason to stop)."""
    first = [e for _, e in zip(range(20), examples, strict=False)]
    if first and not any(os.path.isfile(e.path) for e in first):
        raise LayoutError(
            f"dataset {name}: none of the first {len(first)} images exists (e.g. {first[0].path}); "
            f"expected them under {where}, which holds {_found(where) if where.is_dir() else 'nothing'}"
        )


def _finish(data: LabelledSet, images: Path) -> LabelledSet:
    for examples in data.splits.values():
        _check_images(data.name, examples, images)
    if not any(data.splits.values()):
        raise LayoutError(f"dataset {data.name}: no labelled images found in {data.source}")
    return data


def _by_hash(name: str, task: str, rows: Iterable[tuple[str, str, float]], source: str) -> LabelledSet:
    """(absolute path, key for the hash split, label) -> a set split by ``hash_split``."""
    data = LabelledSet(name, task, {s: [] for s in SPLITS}, source=source)
    for path, key, label in rows:
        data.splits[hash_split(key)].append(Example(path, label))
    return data


# ---- memorability -----------------------------------------------------------------------------------


def lamem(root: Path, split_id: int = 1) -> LabelledSet:
    """LaMem (Khosla et al. 2015): ``images/``, ``splits/{train,val,test}_{1..5}.txt`` with lines
    ``<image name> <memorability score> [...]``. ``split_id`` picks one of the five official splits."""
    splits = _require(root, "lamem", "images/ and splits/ (train_1.txt ... test_5.txt)", "splits")
    images = _require(root, "lamem", "an images/ folder beside splits/", "images")
    data = LabelledSet("lamem", "memorability", source=f"{root} (official split {split_id})")
    for split in SPLITS:
        file = splits / f"{split}_{split_id}.txt"
        if not file.is_file():
            raise LayoutError(f"dataset lamem: expected {file}; {splits} holds {_found(splits)}")
        examples = []
        for n, line in enumerate(file.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                examples.append(Example(str(images / fields[0]), float(fields[1])))
            except (IndexError, ValueError):
                raise LayoutError(
                    f"dataset lamem: {file} line {n} is {line.strip()!r}; expected '<image name> <score>'"
                ) from None
        data.splits[split] = examples
    return _finish(data, images)


def memcat(root: Path) -> LabelledSet:
    """MemCat (Goetschalckx & Wagemans 2019): a CSV anywhere under the root with columns ``image_file``
    and ``memorability_w_fa_correction``; images found by name anywhere under the root. No official split."""
    columns = {"image_file", "memorability_w_fa_correction"}
    if not root.is_dir():
        raise LayoutError(f"dataset memcat: {root} is not a folder")
    for csv in sorted(root.rglob("*.csv")):
        frame = pd.read_csv(csv)
        if columns <= set(frame.columns):
            break
    else:
        raise LayoutError(
            f"dataset memcat at {root}: expected a CSV with columns {', '.join(sorted(columns))} "
            f"(MemCat's memcat_image_data.csv); found {_found(root)}"
        )
    index = {p.name: p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS}
    rows = [
        (str(index.get(name, root / "images" / name)), name, float(score))
        for name, score in zip(frame["image_file"], frame["memorability_w_fa_correction"], strict=True)
    ]
    return _finish(_by_hash("memcat", "memorability", rows, str(csv)), root)


# ---- quality -----------------------------------------------------------------------------------------


def koniq(root: Path) -> LabelledSet:
    """KonIQ-10k (Hosu et al. 2020): ``1024x768/`` images and ``koniq10k_scores_and_distributions.csv``
    (``image_name``, ``MOS``). With ``koniq10k_distributions_sets.csv`` (a ``set`` column: training /
    validation / test) its official split is used, else the hash split."""
    images = _require(root, "koniq", "a 1024x768/ image folder", "1024x768", "512x384", "images")
    scores = _require(
        root,
        "koniq",
        "koniq10k_scores_and_distributions.csv or koniq10k_distributions_sets.csv",
        "koniq10k_distributions_sets.csv",
        "koniq10k_scores_and_distributions.csv",
    )
    frame = _read_columns(scores, "koniq", ["image_name", "MOS"])
    data = LabelledSet("koniq", "quality", {s: [] for s in SPLITS}, source=str(scores))
    names = {"training": "train", "train": "train", "validation": "val", "val": "val", "test": "test"}
    sets = frame["set"] if "set" in frame.columns else [None] * len(frame)
    for name, mos, subset in zip(frame["image_name"], frame["MOS"], sets, strict=True):
        split = names.get(str(subset).strip().lower()) if subset is not None else hash_split(str(name))
        if split is None:
            raise LayoutError(
                f"dataset koniq: {scores}: unknown set {subset!r} (expected training/validation/test)"
            )
        data.splits[split].append(Example(str(images / name), float(mos)))
    return _finish(data, images)


def livec(root: Path) -> LabelledSet:
    """LIVE In the Wild Challenge (Ghadiyaram & Bovik 2016): ``Data/AllImages_release.mat``,
    ``Data/AllMOS_release.mat`` and ``Images/``. The first 7 entries are the study's practice images and are
    left out, as is customary (1,162 images remain). Hash split."""
    from scipy.io import loadmat

    folder = _require(root, "livec", "Data/AllImages_release.mat and Data/AllMOS_release.mat", "Data")
    images = _require(root, "livec", "an Images/ folder", "Images")
    try:
        names = loadmat(folder / "AllImages_release.mat")["AllImages_release"]
        mos = loadmat(folder / "AllMOS_release.mat")["AllMOS_release"]
    except (OSError, KeyError, ValueError) as exc:
        raise LayoutError(
            f"dataset livec: cannot read {folder}'s .mat files ({exc}); found {_found(folder)}"
        ) from None
    flat_names = [str(n.flat[0]) if hasattr(n, "flat") else str(n) for n in names.ravel()]
    flat_mos = [float(m) for m in mos.ravel()]
    if len(flat_names) != len(flat_mos):
        raise LayoutError(f"dataset livec: {len(flat_names)} image names but {len(flat_mos)} scores")
    rows = [(str(images / n), n, s) for n, s in zip(flat_names, flat_mos, strict=True)][7:]
    return _finish(_by_hash("livec", "quality", rows, str(folder)), images)


def spaq(root: Path) -> LabelledSet:
    """SPAQ (Fang et al. 2020): ``TestImage/`` and ``Annotations/MOS and Image attribute scores.xlsx``
    (``Image name``, ``MOS``), or the same table saved as .csv. Hash split."""
    images = _require(root, "spaq", "a TestImage/ folder", "TestImage")
    table = _require(
        root,
        "spaq",
        "Annotations/MOS and Image attribute scores.xlsx (or .csv)",
        "Annotations/MOS and Image attribute scores.csv",
        "Annotations/MOS and Image attribute scores.xlsx",
    )
    frame = _read_columns(table, "spaq", ["Image name", "MOS"])
    rows = [
        (str(images / n), str(n), float(m)) for n, m in zip(frame["Image name"], frame["MOS"], strict=True)
    ]
    return _finish(_by_hash("spaq", "quality", rows, str(table)), images)


# ---- emotion ---------------------------------------------------------------------------------------------


def emoset(root: Path) -> LabelledSet:
    """EmoSet-118K (Yang et al. 2023): ``train.json``, ``val.json``, ``test.json`` at the root, each a list
    of ``[emotion, image path, annotation path]`` with paths relative to the root (the official splits)."""
    _require(root, "emoset", "train.json, val.json and test.json (the official splits)", "train.json")
    data = LabelledSet("emoset", "emotion", classes=EMOTIONS, source=str(root))
    for split in SPLITS:
        file = root / f"{split}.json"
        if not file.is_file():
            raise LayoutError(f"dataset emoset: expected {file}; found {_found(root)}")
        entries = json.loads(file.read_text())
        examples = []
        for entry in entries:
            emotion, image = (
                (entry[0], entry[1])
                if isinstance(entry, list)
                else (entry.get("emotion"), entry.get("image"))
            )
            examples.append(Example(str(root / image), float(class_index(emotion, "emoset", file))))
        data.splits[split] = examples
    return _finish(data, root)


def fi(root: Path) -> LabelledSet:
    """FI (You et al. 2016): one folder per emotion (amusement, anger, awe, contentment, disgust,
    excitement, fear, sadness; any case) holding its images. Hash split."""
    if not root.is_dir():
        raise LayoutError(f"dataset fi: {root} is not a folder")
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    missing = [e for e in EMOTIONS if e not in folders]
    if missing:
        raise LayoutError(
            f"dataset fi at {root}: expected one folder per emotion ({', '.join(EMOTIONS)}); "
            f"missing {', '.join(missing)}; found {_found(root)}"
        )
    rows = [
        (str(p), f"{emotion}/{p.name}", float(i))
        for i, emotion in enumerate(EMOTIONS)
        for p in sorted(folders[emotion].iterdir())
        if p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    data = _by_hash("fi", "emotion", rows, str(root))
    data.classes = EMOTIONS
    return _finish(data, root)


# ---- any labelled manifest -------------------------------------------------------------------------------


def manifest(
    path: Path, task: Task, path_column: str = "path", label_column: str = "label", name: str | None = None
) -> LabelledSet:
    """A CSV/parquet/JSONL with a path column and a label column (a score; for emotion a label name or a
    class index), and optionally a ``split`` column (train/val/test); rows without one use the hash split.
    Relative paths resolve against the manifest's folder."""
    frame = _read_columns(path, "manifest", [path_column, label_column])
    base = path.parent
    splits = frame["split"].astype(str).str.strip().str.lower() if "split" in frame.columns else None
    data = LabelledSet(name or path.stem, task.name, {s: [] for s in SPLITS}, source=str(path))
    if task.labels:
        data.classes = task.labels
    for n, (p, label) in enumerate(zip(frame[path_column], frame[label_column], strict=True)):
        full = str(p) if os.path.isabs(str(p)) else str(base / str(p))
        split = splits.iloc[n] if splits is not None else hash_split(str(p))
        if split not in SPLITS:
            raise LayoutError(f"manifest {path}: row {n} has split {split!r}; use train, val or test")
        value = class_index(label, "manifest", path) if task.labels else _number(label, path, n)
        data.splits[split].append(Example(full, float(value)))
    return _finish(data, base)


def _number(value: object, path: Path, row: int) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if number != number:
        raise LayoutError(f"manifest {path}: row {row} has label {value!r}, not a number")
    return number


def class_index(label: object, name: str, where: Path) -> int:
    if isinstance(label, (int, float)) or hasattr(label, "dtype"):  # a number, from any table reader
        label = int(label) if float(label).is_integer() else label  # type: ignore[arg-type]
    text = str(label).strip().lower()
    if text in EMOTIONS:
        return EMOTIONS.index(text)
    if text.isdigit() and int(text) < len(EMOTIONS):
        return int(text)
    raise LayoutError(
        f"dataset {name}: {where}: label {label!r} is not one of {', '.join(EMOTIONS)} "
        f"(or 0-{len(EMOTIONS) - 1})"
    )


def _read_columns(path: Path, name: str, columns: list[str]) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True)
        elif suffix == ".xlsx":
            frame = pd.read_excel(path)
        else:
            frame = pd.read_csv(path)
    except ImportError:
        raise LayoutError(
            f"dataset {name}: reading {path} needs openpyxl (pip install openpyxl), or save it as .csv"
        ) from None
    except (OSError, ValueError) as exc:
        raise LayoutError(
            f"dataset {name}: cannot read {path} ({' '.join(str(exc).split())[:200]})"
        ) from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise LayoutError(
            f"dataset {name}: {path} has no column {', '.join(map(repr, missing))} (columns found: {found})"
        )
    return frame


ADAPTERS: dict[str, tuple[str, Callable[..., LabelledSet]]] = {
    "lamem": ("memorability", lamem),
    "memcat": ("memorability", memcat),
    "koniq": ("quality", koniq),
    "livec": ("quality", livec),
    "spaq": ("quality", spaq),
    "emoset": ("emotion", emoset),
    "fi": ("emotion", fi),
}


def load_dataset(
    spec: str, task: Task, split_id: int = 1, path_column: str = "path", label_column: str = "label"
) -> LabelledSet:
    """``NAME=ROOT`` for a known dataset (e.g. ``lamem=/data/lamem``), or a manifest file path
    (``[NAME=]labels.csv``) whose labels fit ``task``."""
    name, sep, location = spec.partition("=")
    if not sep:
        name, location = "", spec
    path = Path(location).expanduser().absolute()  # examples carry absolute paths: valid from any folder
    key = name.strip().lower()
    if key in ADAPTERS:
        adapter_task, adapter = ADAPTERS[key]
        if adapter_task != task.name:
            raise UsageError(f"dataset {key} holds {adapter_task} labels, not {task.name}")
        return adapter(path, split_id) if key == "lamem" else adapter(path)
    if path.is_file():
        return manifest(path, task, path_column, label_column, name=key or None)
    known = ", ".join(ADAPTERS)
    raise UsageError(
        f"--data {spec!r}: write NAME=ROOT with NAME one of {known}, or give a labelled manifest file "
        f"(.csv/.parquet/.jsonl with columns {path_column}, {label_column})"
    )
