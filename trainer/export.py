"""Export a trained head and tower to our checkpoint format, evaluate the exported file, write its card.

The exported ``<dataset>.safetensors`` is a normal perceptscore checkpoint (task, architecture,
preprocessing, labels in its metadata; the frozen tower in a shared ``base-<hash>.safetensors`` beside it)
that ``perceptscore score --checkpoint TASK=...`` loads like a converted release. Its final metrics are
computed by loading that file exactly as ``score`` does, so the card's numbers are the scorer's numbers.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from perceptscore._version import __version__
from perceptscore.checkpoints import load_model, save_converted
from perceptscore.columns import ERROR, PATH
from perceptscore.formats import defuse_cell
from perceptscore.model import PerceptModel
from perceptscore.tasks import Task
from perceptscore.trainer.base import Base
from perceptscore.trainer.data import predict
from perceptscore.trainer.datasets import LabelledSet
from perceptscore.trainer.loop import Device, TrainNet, evaluate_raw


def calibrate(
    model: PerceptModel, task: Task, raw: np.ndarray, labels: np.ndarray, span: tuple[float, float]
) -> str:
    """For a task with a display mapping: fold ``a * raw + b`` into fc3 so that the display score maps the
    labels' range ``span`` onto 0..1 (least squares on ``raw`` vs ``labels``). A Pearson-trained output has
    no scale of its own; SRCC and PLCC do not change. Returns a sentence for the card."""
    if task.display is None:
        return ""
    low, high = task.display
    ok = ~np.isnan(raw)
    x, y = raw[ok], labels[ok]
    target = low + (high - low) * (y - span[0]) / (span[1] - span[0])
    if len(x) < 2 or np.var(x) == 0:
        return "not calibrated (too few validation scores)"
    a = float(np.cov(x, target, bias=True)[0, 1] / np.var(x))
    if a <= 0:
        return "not calibrated (validation scores do not correlate positively with the labels)"
    b = float(target.mean() - a * x.mean())
    with torch.no_grad():
        model.head.fc3.weight.mul_(a)
        model.head.fc3.bias.mul_(a).add_(b)
    return (
        f"raw outputs scaled by {a:.6g} and shifted by {b:.6g} (folded into fc3) so that the display score "
        f"maps labels {span[0]:g}..{span[1]:g} onto 0..1"
    )


def export(
    net: TrainNet,
    head: str,
    task: Task,
    data: LabelledSet,
    folder: Path,
    base: Base,
    dev: Device,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Write ``folder/<dataset>.safetensors`` (+ shared base), ``.md`` card, ``.eval.json`` and
    ``.predictions-<split>.csv``; returns the final metrics per split."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in net.percept_state(head).items()}
    model = PerceptModel.from_state_dict(state, net.arch).to(dev.device).eval()
    note = ""
    if task.display is not None:
        val = data.split("val")
        raw, _ = predict(model, task, val, dev.device, torch.float32, dev.eval_batch_size, dev.workers)
        train_labels = np.array([e.label for e in data.split("train")])
        span = (float(train_labels.min()), float(train_labels.max()))
        note = calibrate(model, task, raw[:, 0], np.array([e.label for e in val]), span)
    path = folder / f"{data.name}.safetensors"
    save_converted(
        model, task, path, source=f"perceptscore train: {data.name}", source_sha256=base.sha256, split=True
    )

    scorer_model = load_model(task.name, path, device=dev.device, precision="fp32")
    results: dict[str, Any] = {}
    for split in ("val", "test"):
        examples = data.splits.get(split) or []
        if not examples:
            continue
        raw, errors = predict(
            scorer_model, task, examples, dev.device, torch.float32, dev.eval_batch_size, dev.workers
        )
        labels = [e.label for e in examples]
        results[split] = evaluate_raw(task, raw, labels)
        _write_predictions(
            folder / f"{data.name}.predictions-{split}.csv", task, examples, labels, raw, errors
        )
    (folder / f"{data.name}.eval.json").write_text(json.dumps(results, indent=2))
    (folder / f"{data.name}.md").write_text(model_card(task, data, base, record, results, note, path))
    return results


def _write_predictions(path: Path, task: Task, examples, labels, raw: np.ndarray, errors) -> None:  # type: ignore[no-untyped-def]
    ok = [i for i, e in enumerate(errors) if e is None]
    columns = {c: [None] * len(examples) for c in task.columns}
    for c, values in task.values(raw[ok]).items() if ok else ():
        for i, v in zip(ok, values, strict=True):
            columns[c][i] = v
    frame = pd.DataFrame({PATH: [e.path for e in examples], "label": labels, **columns, ERROR: errors})
    for column in (PATH, ERROR):  # a cell a spreadsheet would run as a formula, defused
        frame[column] = [defuse_cell(v) if isinstance(v, str) else v for v in frame[column]]
    frame.to_csv(path, index=False)


def model_card(
    task: Task,
    data: LabelledSet,
    base: Base,
    record: dict[str, Any],
    results: dict[str, Any],
    note: str,
    path: Path,
) -> str:
    recipe = record["recipe"]
    lines = [
        f"# {data.name} {task.name} (trained with perceptscore {__version__})",
        "",
        f"A PerceptCLIP-style {task.name} model: CLIP ViT tower (frozen) + LoRA on q/k/v + MLP head, "
        "trained by "
        f"`perceptscore train` on {data.name} ({data.source}); {record['stages']}.",
        "",
        f"Use: `perceptscore score IMAGES -t {task.name} --checkpoint {task.name}={path.name}` "
        f"(keep {path.name}'s base-*.safetensors beside it).",
        "",
        "## Metrics (of this file, loaded as `perceptscore score` loads it; inference preprocessing)",
        "",
        "| split | images | " + " | ".join(k for k in _metric_keys(results)) + " |",
        "|---|---|" + "---|" * len(_metric_keys(results)),
    ]
    for split, m in results.items():
        values = " | ".join(_fmt(m.get(k)) for k in _metric_keys(results))
        lines.append(f"| {split} | {m.get('n')} ({m.get('errors', 0)} unreadable) | {values} |")
    lines += [
        "",
        f"Splits: {data.describe()}.",
        "",
        "## Recipe",
        "",
        "| setting | value | from |",
        "|---|---|---|",
    ]
    for key, (value, origin) in recipe.items():
        lines.append(f"| {key} | {value} | {origin} |")
    lines += [
        "",
        "`release` = stated on the released PerceptCLIP model cards (../shared/reference/perceptclip.md); "
        "`ours` = not published by the authors, chosen by perceptscore; `user` = set on the command line.",
        "",
        "## Provenance",
        "",
        f"- base: {base.source} (sha256 {base.sha256})",
        f"- command: `{record['command']}`",
        f"- device: {record['device']}, precision {record['precision']}",
        f"- finished: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
    ]
    if note:
        lines.append(f"- calibration: {note}")
    if task.labels:
        lines.append(
            f"- label order: {', '.join(task.labels)} "
            "(ASSUMED to match the release: EmoSet's alphabetical order)"
        )
    return "\n".join(lines) + "\n"


def _metric_keys(results: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for m in results.values():
        keys += [k for k in m if k not in {"n", "errors"} and k not in keys]
    return keys


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
