"""``perceptscore train``: recipe + datasets -> stages -> exported checkpoints; and ``perceptscore eval``.

One dataset: one stage ("train"), exported. Several datasets of one task: the two-stage design.

- Stage 1 ("stage1") trains one shared LoRA tower with one head per dataset. Each step draws one batch from
  one dataset (all datasets' batches shuffled together, each dataset seen once per epoch), and that
  dataset's head takes the loss. Per-dataset heads let datasets with different label scales and rater
  pools (LaMem vs MemCat; KonIQ MOS 1-5 vs SPAQ 0-100) share what they agree on, the tower's features,
  without forcing one output scale; single-dataset batches keep the Pearson loss a correlation within one
  dataset's labels.
- Stage 2 ("stage2-<target>"), for each target: start from stage 1's best tower and that target's head,
  fine-tune on the target alone (``stage2_epochs``), select on its validation metric, export it. Small
  datasets borrow the large ones' features, then get a model tuned to their own labels.

The run folder holds config.json, one folder per stage and export/. ``--resume`` continues the first stage
that is not done, from its last checkpoint, after checking that the command describes the same run.
"""

from __future__ import annotations

import difflib
import json
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from perceptscore.errors import UsageError
from perceptscore.tasks import Task, get_task
from perceptscore.trainer.datasets import ADAPTERS, LabelledSet, class_index, load_dataset

RECIPE_FIELDS = (
    "loss",
    "lr",
    "batch_size",
    "epochs",
    "stage2_epochs",
    "weight_decay",
    "warmup_fraction",
    "seed",
)


def recipe(task: Task) -> dict[str, Any]:
    """The task's recipe: ``{"release": {...}, "ours": {...}}`` from trainer/recipes.json."""
    text = resources.files("perceptscore.trainer").joinpath("recipes.json").read_text(encoding="utf-8")
    return json.loads(text)[task.name]


@dataclass
class TrainOptions:
    task: str
    data: list[str]
    out: Path
    init: str = "openai"
    targets: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)  # any of RECIPE_FIELDS, from the command line
    accumulate: int = 1
    precision: str = "auto"
    device: str = "auto"
    workers: int | None = None
    save_every: int = 500
    max_steps: int | None = None
    split_id: int = 1
    path_column: str = "path"
    label_column: str = "label"
    resume: bool = False

    def settings(self, task: Task) -> tuple[dict[str, tuple[Any, str]], Any]:
        """Every recipe value with its origin (release / ours / user), and the loop's ``Settings``."""
        from perceptscore.trainer.loop import Settings

        book = recipe(task)
        values: dict[str, tuple[Any, str]] = {}
        for key, value in book["release"].items():
            values[key] = (value, "release")
        for key, value in book["ours"].items():
            values[key] = (value, "ours")
        for key, value in self.overrides.items():
            if value is not None:
                values[key] = (value, "user")
        values["accumulate"] = (self.accumulate, "user" if self.accumulate != 1 else "ours")
        unknown = set(self.overrides) - set(RECIPE_FIELDS)
        if unknown:
            raise UsageError(f"unknown recipe settings: {', '.join(sorted(unknown))}")
        settings = Settings(
            loss=values["loss"][0], lr=float(values["lr"][0]), batch_size=int(values["batch_size"][0]),
            epochs=int(values["epochs"][0]), weight_decay=float(values["weight_decay"][0]),
            warmup_fraction=float(values["warmup_fraction"][0]), seed=int(values["seed"][0]),
            accumulate=self.accumulate, max_steps=self.max_steps,
        )  # fmt: skip
        if (
            settings.batch_size < (2 if settings.loss == "pearson" else 1)
            or settings.epochs < 1
            or self.accumulate < 1
        ):
            raise UsageError(
                "--batch-size must be at least 2 (1 without the Pearson loss), "
                "--epochs and --accumulate at least 1"
            )
        return values, settings


def _datasets(
    options: TrainOptions, task: Task, console: Console
) -> tuple[list[LabelledSet], list[str], list[str]]:
    """The training sets (each with a train and a val split), their names, and the stage 2 targets."""
    sets = [
        load_dataset(s, task, options.split_id, options.path_column, options.label_column)
        for s in options.data
    ]
    if not sets:
        raise UsageError("no training data: give --data NAME=ROOT or --data labels.csv")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise UsageError(
            f"two datasets are both named {max(names, key=names.count)!r}: name them, e.g. --data a=x.csv"
        )
    for data in sets:
        console.print(f"{data.name}: {data.describe()} ({data.source})")
        for split in ("train", "val"):  # both are needed: one to learn from, one to pick the best epoch
            data.split(split)
    targets = options.targets or names
    missing = [t for t in targets if t not in names]
    if missing:
        raise UsageError(f"--target {missing[0]!r} is not one of the datasets ({', '.join(names)})")
    return sets, names, targets


def _config(task: Task, sets: list[LabelledSet], targets: list[str], base: Any, settings: Any,
            values: dict[str, Any], precision: str) -> dict[str, Any]:  # fmt: skip
    """What the run is: a resume with another config is refused (``_check_config``)."""
    return {
        "task": task.name,
        "data": {
            s.name: {"source": s.source, "splits": {k: len(v) for k, v in s.splits.items()}} for s in sets
        },
        "targets": targets,
        "init": {"source": base.source, "sha256": base.sha256},
        "settings": asdict(settings),
        "stage2_epochs": int(values["stage2_epochs"][0]),
        "precision": precision,
    }


def _record(values: dict[str, Any], device: str, precision: str, names: list[str]) -> dict[str, Any]:
    """What the model card says about how the run was made."""
    return {
        "recipe": values,
        "command": shlex.join(["perceptscore", *sys.argv[1:]]) if sys.argv else "perceptscore train",
        "device": device,
        "precision": precision,
        "stages": "one stage" if len(names) == 1 else f"two stages (stage 1 on {', '.join(names)})",
    }


def train(options: TrainOptions, console: Console) -> dict[str, Any]:
    """Run (or resume) a training run; returns the exported checkpoints and their final metrics."""
    from safetensors.torch import load_file

    from perceptscore.checkpoints import resolve_device
    from perceptscore.engines.local import isolating_worker_deaths
    from perceptscore.plan import default_workers
    from perceptscore.runs import OutputLock
    from perceptscore.trainer.base import load_base
    from perceptscore.trainer.loop import Device, Stage, StageRun, build_net

    task = get_task(options.task)
    values, settings = options.settings(task)
    sets, names, targets = _datasets(options, task, console)
    device = resolve_device(options.device)
    precision = _precision(options.precision, device)
    dev = Device(
        device, precision,
        default_workers(device.type) if options.workers is None else options.workers,
        64 if device.type == "cuda" else 16,
    )  # fmt: skip
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    # the evaluation's decode workers isolate a crashing file only if torch's SIGCHLD handler never goes in
    with OutputLock(out), isolating_worker_deaths():
        base = load_base(options.init, replace(task.architecture, outputs=task.outputs))
        config = _config(task, sets, targets, base, settings, values, precision)
        _check_config(out / "config.json", config, options)
        arch = base.arch
        record = _record(values, str(device), precision, names)
        console.print(f"base: {base.source}; device {device}, {precision}; {dev.workers} decode workers")

        def run_stage(stage: Stage) -> Any:
            folder = out / stage.name
            net = build_net(base, arch, [s.name for s in stage.sets], stage.settings.seed).to(device)
            if not (folder / "done.json").is_file():
                runner = StageRun(stage, net, task, folder, dev, console, options.save_every)
                runner.run(resume=options.resume)
            net.load_state_dict(load_file(folder / "best.safetensors"), strict=False)
            return net

        exports: dict[str, Any] = {}
        if len(sets) == 1:
            net = run_stage(Stage("train", 1, sets, settings))
            exports[sets[0].name] = _export(net, sets[0], task, out, base, dev, record, console)
        else:
            first = run_stage(Stage("stage1", 1, sets, settings)).trainable()  # its best epoch
            stage2 = replace(settings, epochs=int(values["stage2_epochs"][0]))
            for n, target in enumerate(targets, start=2):
                data = sets[names.index(target)]
                start = {
                    k: v.detach().clone()
                    for k, v in first.items()
                    if ".lora_" in k or k.startswith(f"heads.{target}.")
                }
                net = run_stage(Stage(f"stage2-{target}", n, [data], stage2, start))
                exports[target] = _export(net, data, task, out, base, dev, record, console)
    return exports


def _export(
    net, data: LabelledSet, task: Task, out: Path, base, dev, record, console: Console
) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from perceptscore.trainer.export import export

    results = export(net, data.name, task, data, out / "export", base, dev, record)
    shown = "; ".join(
        f"{split}: "
        + ", ".join(
            f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and not k.startswith("accuracy_")
        )
        for split, m in results.items()
    )
    console.print(f"exported {out / 'export' / (data.name + '.safetensors')} ({shown})")
    return {"path": str(out / "export" / f"{data.name}.safetensors"), "metrics": results}


def _precision(precision: str, device: Any) -> str:
    import torch

    if precision == "auto":
        cuda = device.type == "cuda"
        return auto_precision(cuda, torch.cuda.get_device_capability(device) if cuda else None)
    if precision not in {"fp32", "bf16", "fp16"}:
        raise UsageError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("fp16 training needs CUDA; on CPU use fp32 or bf16")
    return precision


def auto_precision(cuda: bool, capability: tuple[int, int] | None) -> str:
    """What ``--precision auto`` trains in: bf16 only where the GPU computes it natively (compute
    capability 8.0 and up: A100, H100, RTX 30xx on). ``torch.cuda.is_bf16_supported()`` also says yes on a
    T4 or V100, where bf16 is emulated and slower than fp32; fp16 with a grad scaler runs there natively.
    Exact fp32 on the CPU."""
    if not cuda:
        return "fp32"
    return "bf16" if capability is not None and capability >= (8, 0) else "fp16"


def _check_config(path: Path, config: dict[str, Any], options: TrainOptions) -> None:
    if path.is_file():
        old = json.loads(path.read_text())
        if not options.resume:
            raise UsageError(
                f"{path.parent} already holds a training run: add --resume to continue it, "
                "or choose another -o"
            )
        changed = [k for k in config if old.get(k) != config[k]]
        if changed:
            raise UsageError(
                f"--resume: this command differs from the run in {path.parent} in {', '.join(changed)}; "
                "run it with the same options, or choose another -o"
            )
        return
    from perceptscore.sinks import write_atomic

    write_atomic(path, json.dumps(config, indent=2).encode(), follow=False)


# ---- perceptscore eval ------------------------------------------------------------------------------------


@dataclass
class Labelled:
    """What ``eval`` scores: inputs with a label column (a dataset's split is written to a temporary
    manifest, removed by ``evaluate``)."""

    inputs: list[str]
    path_column: str
    label_column: str
    tmp: tempfile.TemporaryDirectory[str] | None = None


def labelled_inputs(
    inputs: list[str],
    task: Task,
    dataset: str | None,
    split: str,
    split_id: int,
    path_column: str,
    label_column: str,
) -> Labelled:
    """The inputs as given (a manifest, or a scores file, with a label column), or a dataset's split."""
    if dataset is None:
        return Labelled(inputs, path_column, label_column)
    if len(inputs) != 1:
        raise UsageError("with --dataset give one input: the dataset's folder (or manifest)")
    _check_dataset_name(dataset)
    # "manifest": a labelled manifest read as the trainer reads it: its split column (or hash split) applies
    spec = inputs[0] if dataset == "manifest" else f"{dataset}={inputs[0]}"
    data = load_dataset(spec, task, split_id, path_column, label_column)
    examples = data.split(split)
    import pandas as pd

    tmp = tempfile.TemporaryDirectory(prefix="perceptscore-eval-")
    manifest = Path(tmp.name) / f"{data.name}-{split}.parquet"
    pd.DataFrame({"path": [e.path for e in examples], "label": [e.label for e in examples]}).to_parquet(
        manifest
    )
    return Labelled([str(manifest)], "path", "label", tmp)


def _check_dataset_name(dataset: str) -> None:
    """An unknown ``--dataset`` in eval's words (load_dataset's own speak of training's ``--data``)."""
    known = [*ADAPTERS, "manifest"]
    if dataset.strip().lower() in known:
        return
    close = difflib.get_close_matches(dataset.strip().lower(), known, n=1)
    hint = f": did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"unknown --dataset {dataset!r}{hint} (known: {', '.join(known)})")


def evaluate(
    labelled: Labelled, task: Task, options: Any, make_reporter: Any, out: Path | None = None
) -> tuple[dict[str, float], int]:
    """Score ``labelled`` as ``perceptscore score`` does and measure it against its labels; the metrics
    (also written to ``out`` as JSON) and the exit code (1 when some rows could not be scored)."""
    from perceptscore.commands.score import scored_rows
    from perceptscore.folders import check_output_folder
    from perceptscore.sinks import write_atomic

    try:
        if out:
            check_output_folder(out)  # before scoring the whole set, not after
        scored = scored_rows(labelled.inputs, options, make_reporter)
        metrics = frame_metrics(scored.frame, task, labelled.label_column)
    finally:
        if labelled.tmp is not None:
            labelled.tmp.cleanup()
    if out:
        write_atomic(out, (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics, scored.outcome.exit_code


def frame_metrics(frame: Any, task: Task, label_column: str) -> dict[str, float]:
    """Metrics of a scores frame (the columns ``score`` writes) against its label column."""
    from perceptscore.trainer.loop import evaluate_raw

    if label_column not in frame.columns:
        found = ", ".join(map(str, frame.columns))
        raise UsageError(
            f"no label column {label_column!r} in the input (columns found: {found}); "
            "choose one with --label-column"
        )
    raw = task.raw_from(frame)
    if task.labels:
        labels = [float(class_index(v, "input", Path(label_column))) for v in frame[label_column]]
    else:
        labels = frame[label_column].astype(float).tolist()
    return evaluate_raw(task, raw, labels)
