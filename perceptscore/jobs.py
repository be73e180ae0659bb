"""What each CLI command does, as plain functions: the CLI parses arguments and prints, these do the work."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from perceptscore.errors import UsageError
from perceptscore.progress import Reporter
from perceptscore.sinks import FORMATS, Sink, check_output, write_atomic
from perceptscore.sources import Sources, is_scores_file, read_provenance, read_scores
from perceptscore.tasks import Task, get_task, output_columns

MakeReporter = Callable[[int | None], Reporter]


@dataclass
class ScoreOptions:
    """Everything that decides how images are scored (the shared options of score, rank and filter)."""

    tasks: Sequence[str]
    checkpoints: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    fast_decode: bool = False
    recursive: bool = True
    path_column: str | None = None

    def sources(self, inputs: Sequence[str]) -> Sources:
        columns = output_columns([get_task(t) for t in self.tasks])
        return Sources(inputs, self.recursive, self.path_column, reserved=columns)

    def scorer(self):  # type: ignore[no-untyped-def]  # -> Scorer; imported lazily: it pulls in torch
        from perceptscore.hub import resolve

        # Weights first, torch after: a missing file is reported at once, not after seconds of imports.
        weights = {t: resolve(get_task(t), self.checkpoints.get(t)) for t in self.tasks}
        from perceptscore.pipeline import Scorer

        return Scorer(
            self.tasks, weights, self.device, self.precision, self.batch_size, self.workers, self.fast_decode
        )


@dataclass
class Outcome:
    rows: int = 0
    errors: int = 0  # rows of this run that could not be scored

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0


def score(inputs: Sequence[str], out: str, options: ScoreOptions, make_reporter: MakeReporter) -> Outcome:
    """Score every input into ``out`` (file or ``-``), streaming; the file appears only when complete."""
    sources = options.sources(inputs)  # bad inputs and outputs fail before seconds of model loading
    check_output(out)
    scorer = options.scorer()
    outcome = Outcome()
    with (
        Sink(out, scorer.schema(sources.passthrough), scorer.provenance()) as sink,
        make_reporter(sources.count()) as reporter,
    ):
        for rows in scorer.iter_batches(sources):
            sink.write(rows)
            errors = sum(row["error"] is not None for row in rows)
            outcome.rows += len(rows)
            outcome.errors += errors
            reporter.advance(len(rows), errors)
    return outcome


@dataclass
class Scored:
    """Rows to rank or filter, where they came from, and how many of them failed in this run."""

    frame: pd.DataFrame
    provenance: dict[str, Any]
    outcome: Outcome


def scored_rows(
    inputs: Sequence[str], tasks: Sequence[Task], options: ScoreOptions, make_reporter: MakeReporter
) -> Scored:
    """Rows from earlier scores files (no model is loaded), or from scoring the inputs now."""
    files = [i for i in inputs if Path(i).is_file() and Path(i).suffix.lower() in FORMATS]
    scores = [f for f in files if is_scores_file(f)]
    if scores:
        if len(scores) != len(inputs):
            raise UsageError("give either scores files or images, not both")
        frame = pd.concat([read_scores(f).to_pandas() for f in scores], ignore_index=True)
        return Scored(frame, read_provenance(scores[0]), Outcome(rows=len(frame)))
    options.tasks = [t.name for t in tasks]
    sources = options.sources(inputs)
    scorer = options.scorer()
    rows: list[dict[str, Any]] = []
    outcome = Outcome()
    with make_reporter(sources.count()) as reporter:
        for batch in scorer.iter_batches(sources):
            rows += batch
            errors = sum(row["error"] is not None for row in batch)
            outcome.rows += len(batch)
            outcome.errors += errors
            reporter.advance(len(batch), errors)
    frame = pa.Table.from_pylist(rows, schema=scorer.schema(sources.passthrough)).to_pandas()
    return Scored(frame, scorer.provenance(), outcome)


def write_rows(frame: pd.DataFrame, out: str, provenance: dict[str, Any]) -> None:
    """A selection as a scores file (.csv/.parquet/.jsonl or - for CSV on stdout)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with Sink(out, table.schema, provenance) as sink:
        sink.write(table.to_pylist())


def write_list(paths: Sequence[str], out: str) -> None:
    """One path per line, written atomically (any suffix but .csv/.parquet/.jsonl)."""
    write_atomic(Path(out), "".join(f"{p}\n" for p in paths).encode())


# ---- perceptscore weights ... ------------------------------------------------------------------------


def task_of_file(path: str | Path, task: str | None) -> Task:
    """The task a weights file serves: as given, from our metadata, or from the release's file name."""
    if task:
        return get_task(task)
    from perceptscore.tasks import all_tasks

    if Path(path).suffix.lower() == ".safetensors":
        from perceptscore.checkpoints import read_metadata

        return get_task(read_metadata(path)["task"])
    for spec in all_tasks().values():
        if Path(path).name == spec.release.filename:
            return spec
    raise UsageError(f"cannot tell which task {Path(path).name} is for: add --task")


def convert(
    src: str, dst: str, task: str | None, precision: str, source: str | None = None
) -> dict[str, Any]:
    """Release .pth (or one of ours) -> our standalone safetensors file; returns a report."""
    from perceptscore.checkpoints import load_model, save_converted
    from perceptscore.hub import file_sha256

    if Path(dst).suffix.lower() != ".safetensors":
        raise UsageError(f"convert writes safetensors: name the output *.safetensors, not {dst!r}")
    spec = task_of_file(src, task)
    model = load_model(spec.name, src, merge=False)
    sha = file_sha256(src)
    save_converted(model, spec, dst, source=source or Path(src).name, source_sha256=sha, precision=precision)
    return {
        "task": spec.name,
        "source": src,
        "source_sha256": sha,
        "output": dst,
        "bytes": Path(dst).stat().st_size,
    }


def fetch(task: str) -> dict[str, Any]:
    """Download (or find in the hub cache) a task's release file and convert it into our cache, split: the
    frozen base goes to a shared base-<hash>.safetensors, the task keeps its 11 MB of adapters and head."""
    from perceptscore.checkpoints import load_model, save_converted
    from perceptscore.hub import converted_cache, file_sha256, resolve

    spec = get_task(task)
    cached = converted_cache() / f"{spec.name}.safetensors"
    release = resolve(spec, download=True) if not cached.is_file() else None
    if release is not None and release.path.suffix.lower() == ".safetensors":
        cached, release = release.path, None  # already ours (from $PERCEPTSCORE_WEIGHTS)
    if release is not None:
        model = load_model(spec.name, release.path, merge=False)
        source = f"{spec.release.repo_id}/{spec.release.filename}@{spec.release.revision}"
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_converted(
            model, spec, cached, source=source, source_sha256=file_sha256(release.path), split=True
        )
    return {
        "task": spec.name,
        "path": str(cached),
        "origin": release.origin if release else "converted cache",
    }


def verify(path: str, task: str | None) -> dict[str, Any]:
    """Load a weights file completely (every key checked) and report what it is."""
    from perceptscore.checkpoints import load_model, read_metadata
    from perceptscore.hub import file_sha256

    spec = task_of_file(path, task)
    model = load_model(spec.name, path, merge=False)
    report = {"task": spec.name, "path": path, "sha256": file_sha256(path), "outputs": model.arch.outputs}
    report["architecture"] = (
        f"ViT width {model.arch.width}, {model.arch.layers} layers, LoRA r={model.arch.lora_rank}"
    )
    if Path(path).suffix.lower() == ".safetensors":
        metadata = read_metadata(path)
        report |= {k: metadata[k] for k in ("source", "source_sha256", "precision")}
    return report


def weights_status() -> list[dict[str, str]]:
    """Per task: the released file and where a local copy would be taken from now (no network)."""
    from perceptscore.hub import local_candidates
    from perceptscore.tasks import all_tasks

    rows = []
    for spec in all_tasks().values():
        found = next(((p, o) for p, o in local_candidates(spec) if p.is_file()), None)
        rows.append(
            {
                "task": spec.name,
                "release": f"{spec.release.repo_id}/{spec.release.filename} ({spec.release.size})",
                "local": f"{found[0]} ({found[1]})" if found else "not downloaded",
            }
        )
    return rows
