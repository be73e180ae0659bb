"""The ``perceptscore`` command line: parse, call the library, print. No logic, no torch at import time."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from perceptscore._cli_options import ScoringArgs, scoring_options
from perceptscore._text import redact, shown
from perceptscore._version import __version__
from perceptscore.errors import PerceptScoreError

app = typer.Typer(
    name="perceptscore",
    help="Score image collections for memorability, quality and emotion with PerceptCLIP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# No markup: paths and messages are shown as they are ("photo[1].jpg", "[Errno 27]"); never wrapped, so a
# path is never broken across lines.
console = Console(highlight=False, soft_wrap=True, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def _show_version(value: bool) -> None:
    if value:
        console.print(f"perceptscore {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Show the version and exit.", callback=_show_version, is_eager=True),
    ] = False,
) -> None:
    """Score image collections for memorability, quality and emotion with PerceptCLIP."""


# ---- the commands that score (their shared options: _cli_options) -----------------------------------
Inputs = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders (recursive), globs, @list.txt, - (paths on stdin), .parquet/.csv/.jsonl "
        "manifests, or scores files written by `score`.",
        show_default=False,
    ),
]
ScoreInputs = Annotated[
    list[str] | None,
    typer.Argument(
        help="Image files, folders (recursive), globs, @list.txt, - (paths on stdin), .parquet/.csv/.jsonl "
        "manifests, .tar shards (shards/{00000..00099}.tar); any as a URL (s3://bucket/prefix/, https://).",
        show_default=False,
    ),
]
InputsOrStdin = Annotated[
    list[str] | None,
    typer.Argument(
        help="As for score; none: read standard input, paths one a line or a scores stream from `score`.",
        show_default=False,
    ),
]
Workers = Annotated[
    int | None, typer.Option(help="Decode worker processes.", show_default="by device and cores")
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Overwrite = Annotated[
    bool,
    typer.Option(
        help="Replace an existing output that perceptscore did not write (or whose task columns this run "
        "would lose). Re-running a command over its own output never needs it."
    ),
]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _reporter(total: int | None, rows_on_stdout: bool = False):  # type: ignore[no-untyped-def]
    from perceptscore.progress import Reporter

    if rows_on_stdout and sys.stdout.isatty() and err_console.is_terminal:
        # CSV rows on the same terminal: a live bar would draw over them. Only the summary, at the end.
        return Reporter(Console(stderr=True, force_terminal=False), total, interval=float("inf"))
    # Off a terminal (cron, pipes) progress is a log line every PERCEPTSCORE_LOG_EVERY seconds.
    return Reporter(err_console, total, interval=float(os.environ.get("PERCEPTSCORE_LOG_EVERY", "30")))


@app.command()
@scoring_options
def score(
    inputs: ScoreInputs = None,
    *,
    task: Annotated[
        list[str], typer.Option("-t", "--task", help="Task(s): memorability, quality, emotion; a,b.")
    ],
    scoring: ScoringArgs,
    out: Annotated[
        str, typer.Option("-o", "--out", help="Output .csv/.parquet/.jsonl, or - for CSV on stdout.")
    ] = "-",
    resume: Annotated[
        bool,
        typer.Option(help="Continue an interrupted run (the default when its inputs and options match)."),
    ] = False,
    restart: Annotated[
        bool, typer.Option(help="Discard an interrupted run's saved rows and start over.")
    ] = False,
    incremental: Annotated[
        str | None,
        typer.Option(
            help="An earlier scores file: reuse its scores where a file's size and mtime are unchanged."
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(help="Scoring processes, each with its own model.", show_default="one per visible GPU"),
    ] = None,
    engine: Annotated[
        str, typer.Option(help="local (this machine) or ray (Ray Data, on a cluster: extra [ray]).")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="The Ray cluster for --engine ray.", show_default="$RAY_ADDRESS, else a local Ray"),
    ] = None,
    report: Annotated[
        str | None, typer.Option(help="Also write an HTML report of the output once it is complete.")
    ] = None,
    retry_errors: Annotated[
        str | None,
        typer.Option(
            help="An earlier scores file (no inputs): keep its scored rows, score its error rows again."
        ),
    ] = None,
    overwrite: Overwrite = False,
    allow_empty: Annotated[
        bool,
        typer.Option(help="Inputs with no image write an empty output (else: exit 2, nothing written)."),
    ] = False,
    max_delete: Annotated[
        str,
        typer.Option(
            help="How many of the output's earlier rows may go because their files are gone: N, N% or all."
        ),
    ] = "50%",
) -> None:
    """Score images into a CSV, parquet or JSONL file (rows in input order, one per file)."""
    from perceptscore.commands.score import score as run
    from perceptscore.replacing import DeleteLimit, Safeguards
    from perceptscore.tasks import parse_tasks

    options = scoring.options(parse_tasks(task))
    guards = Safeguards(overwrite, allow_empty, DeleteLimit.parse(max_delete))
    reporter = functools.partial(_reporter, rows_on_stdout=out == "-")
    outcome = run(
        inputs or [], out, options, reporter, resume, incremental, processes, restart, engine, ray_address,
        report, retry_errors, guards,
    )  # fmt: skip
    err_console.print(_summary(outcome, out, outcome.reused_from, retry_errors))
    if outcome.report:  # after the summary: a report that failed never hides what was scored
        err_console.print(Text.assemble(("error:", "red"), f" {outcome.report}") if outcome.report_failed
                          else outcome.report)  # fmt: skip
    raise typer.Exit(outcome.exit_code)


def _summary(outcome, out: str, incremental: str | None, retry_errors: str | None = None) -> str:  # type: ignore[no-untyped-def]
    from perceptscore.remote import without_secrets

    notes = list(outcome.notes)
    if outcome.resumed:
        notes.append(f"{outcome.resumed} resumed from an interrupted run")
    if outcome.uploaded_earlier:
        notes.append("nothing scored again: uploaded what an earlier run finished, whose upload had failed")
    if outcome.salvaged:
        notes.append(
            f"the inputs changed since an interrupted run: its {outcome.salvaged} rows were reused where "
            "files are unchanged"
        )
    if retry_errors:
        notes.append(f"{outcome.skipped} kept from {shown(without_secrets(retry_errors))}, the rest retried")
    elif incremental:
        notes.append(f"{outcome.skipped} unchanged, reused from {shown(without_secrets(incremental))}")
    elif outcome.skipped:
        notes.append(f"{outcome.skipped} unchanged, reused")
    if outcome.discarded:
        notes.append(f"discarded {outcome.discarded} rows of an interrupted run (--restart)")
    if outcome.gone is not None:
        notes.append(f"{outcome.gone} gone since the last run")
    if outcome.ignored:
        names = ", ".join(map(shown, outcome.ignored[:3])) + (", ..." if len(outcome.ignored) > 3 else "")
        n = len(outcome.ignored)
        what = "file that is not an image" if n == 1 else "files that are not images"
        notes.append(f"ignored {n} {what}: {names}")
    where = "stdout" if out == "-" else shown(without_secrets(out))
    extra = f" ({'; '.join(notes)})" if notes else ""
    return f"scored {_count(outcome.rows, 'file')}, {_count(outcome.errors, 'error')} -> {where}{extra}"


@app.command()
@scoring_options
def rank(
    inputs: InputsOrStdin = None,
    *,
    task: Annotated[str, typer.Option("-t", "--task", help="The task to rank by.")],
    scoring: ScoringArgs,
    top: Annotated[int, typer.Option(help="How many rows to show and write (0: all).")] = 20,
    ascending: Annotated[bool, typer.Option(help="Lowest scores first.")] = False,
    out: Annotated[str | None, typer.Option("-o", "--out", help="Also write the ranked rows here.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Rank images (or a scores file) by one task's score; the top rows as a table, and to a file."""
    from perceptscore.commands.score import write_rows
    from perceptscore.commands.select import ranked
    from perceptscore.tasks import get_task

    spec = get_task(task)
    options = scoring.options([spec.name])
    rows, scored = ranked(inputs, spec.name, options, _reporter, top, ascending, out, overwrite)
    if out:
        write_rows(rows, out, scored.provenance)
    if console.is_terminal:
        _print_ranking(rows, spec)
    elif not out:
        write_rows(rows, "-", scored.provenance)
    raise typer.Exit(scored.outcome.exit_code)


def _print_ranking(ranked, spec) -> None:  # type: ignore[no-untyped-def]
    from rich.table import Table

    from perceptscore.columns import PATH

    table = Table("#", spec.sort_column, *(["emotion"] if spec.labels else []), PATH)
    for n, row in enumerate(ranked.itertuples(index=False), start=1):
        values = row._asdict()
        label = [str(values[spec.name])] if spec.labels else []
        table.add_row(str(n), f"{values[spec.sort_column]:.4f}", *label, shown(str(values[PATH])))
    console.print(table)


@app.command("filter")
@scoring_options
def filter_(
    inputs: InputsOrStdin = None,
    *,
    scoring: ScoringArgs,
    min_quality: Annotated[
        float | None, typer.Option(help="Keep quality >= X (display score, ~0-1).")
    ] = None,
    max_quality: Annotated[float | None, typer.Option(help="Keep quality <= X.")] = None,
    min_memorability: Annotated[float | None, typer.Option(help="Keep memorability >= X.")] = None,
    max_memorability: Annotated[float | None, typer.Option(help="Keep memorability <= X.")] = None,
    emotion: Annotated[str | None, typer.Option(help="Keep these predicted emotions: a,b.")] = None,
    top_fraction: Annotated[float | None, typer.Option(help="Keep the best F (0-1] by --by.")] = None,
    by: Annotated[str | None, typer.Option(help="Task for --top-fraction.")] = None,
    copy_to: Annotated[Path | None, typer.Option(help="Copy the kept files here (never overwrites).")] = None,
    symlink_to: Annotated[Path | None, typer.Option(help="Symlink the kept files here.")] = None,
    print0: Annotated[
        bool, typer.Option("--print0", help="End each listed path with NUL, not a newline (xargs -0).")
    ] = False,
    out: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--out",
            help="A list of paths (.txt/.lst, or - for stdout), or rows (.csv/.parquet/.jsonl).",
            show_default="paths on stdout",
        ),
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Keep the images that meet thresholds; list, copy or symlink them."""
    from perceptscore.commands.select import keep
    from perceptscore.select import Criteria

    criteria = Criteria(
        minimum={
            k: v for k, v in (("quality", min_quality), ("memorability", min_memorability)) if v is not None
        },
        maximum={
            k: v for k, v in (("quality", max_quality), ("memorability", max_memorability)) if v is not None
        },
        emotions=[e.strip() for e in emotion.split(",") if e.strip()] if emotion else [],
        top_fraction=top_fraction,
        by=by,
    )
    options = scoring.options([t.name for t in criteria.tasks()])
    listing = out if out or copy_to or symlink_to else "-"  # by default, the kept paths on stdout
    kept = keep(inputs, criteria, options, _reporter, copy_to, symlink_to, listing, print0, overwrite)
    if copy_to or symlink_to:
        verb = "symlinked" if symlink_to else "copied"
        err_console.print(f"{verb} {kept.placed} files to {shown(str(copy_to or symlink_to))}")
        for message in kept.failed:
            err_console.print(Text.assemble(("not placed:", "red"), f" {shown(message)}"))
    for path in kept.unlisted:
        err_console.print(
            Text.assemble(("not listed:", "red"), f" {shown(path)}: a newline in its name (--print0)")
        )
    err_console.print(f"kept {len(kept.rows)} of {kept.scored.outcome.rows} files")
    raise typer.Exit(kept.exit_code)


@app.command()
def tasks() -> None:
    """List the perceptual tasks, their output columns and released weights."""
    from rich.table import Column, Table

    from perceptscore.tasks import all_tasks

    # Folded, never cut: the file name is what a user must fetch, whatever the terminal's width.
    table = Table(*(Column(h, overflow="fold") for h in ("task", "aliases", "columns", "released weights")))
    for t in all_tasks().values():
        columns = ", ".join(t.columns[:3]) + (", ..." if len(t.columns) > 3 else "")
        table.add_row(t.name, ", ".join(t.aliases), columns, f"{t.release.repo_id}/{t.release.filename}")
    console.print(table)


weights_app = typer.Typer(help="List, download, convert and check model weights.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
WeightsTask = Annotated[
    str | None, typer.Option("--task", "-t", help="The task, when the file name does not say.")
]


@weights_app.command("list")
def weights_list() -> None:
    """The released weights of each task and the local copy that would be used (no network)."""
    from rich.table import Column, Table

    from perceptscore.commands import weights

    table = Table(*(Column(h, overflow="fold") for h in ("task", "released file", "local copy")))
    for row in weights.weights_status():
        table.add_row(row["task"], row["release"], row["local"])
    console.print(table)


@weights_app.command("card")
def weights_card(task: Annotated[str, typer.Argument(help="The task.", show_default=False)]) -> None:
    """Show a task's model card: what it predicts, training data, score range, preprocessing, licence."""
    from rich.markdown import Markdown

    from perceptscore.tasks import get_task

    console.print(Markdown(get_task(task).card_text()), soft_wrap=False)  # prose: wrapped to the terminal


@weights_app.command("fetch")
def weights_fetch(
    task: Annotated[
        list[str], typer.Argument(help="memorability, quality, emotion, or all.", show_default=False)
    ],
) -> None:
    """Download a task's released weights (resumable, sha256-checked) and convert them into our cache."""
    from perceptscore.commands.weights import fetch
    from perceptscore.tasks import all_tasks, parse_tasks

    names = list(all_tasks()) if task == ["all"] else parse_tasks(task)
    for name in names:
        report = fetch(name)
        console.print(f"{report['task']}: {report['path']} (from {report['origin']})")


@weights_app.command("convert")
def weights_convert(
    src: Annotated[str, typer.Argument(help="A release .pth (or one of our files).", show_default=False)],
    dst: Annotated[str, typer.Argument(help="The output .safetensors.", show_default=False)],
    task: WeightsTask = None,
    precision: Annotated[str, typer.Option(help="fp32 (exact), fp16 or bf16 (half the size).")] = "fp32",
) -> None:
    """Convert weights to our safetensors format (no pickle, loads faster)."""
    from perceptscore.commands.weights import convert

    report = convert(src, dst, task, precision)
    console.print(f"{report['task']}: wrote {dst} ({report['bytes'] / 1e6:.1f} MB) from {src}")


@weights_app.command("verify")
def weights_verify(
    path: Annotated[
        str, typer.Argument(help="A release .pth or one of our .safetensors.", show_default=False)
    ],
    task: WeightsTask = None,
) -> None:
    """Load a weights file completely, check every key, and print what it holds."""
    from perceptscore.commands.weights import verify

    for key, value in verify(path, task).items():
        console.print(f"{key}: {value}")


# ---- training and evaluation (the [train] extra) ----------------------------------------------------


def _trainer(use: str = "training"):  # type: ignore[no-untyped-def]
    """The trainer package, or one line saying how to install what it needs (for ``use``: the words of
    the command asking, training or evaluation)."""
    from perceptscore.errors import UsageError

    try:
        import scipy  # noqa: F401 - the metrics need it

        from perceptscore.trainer import run
    except ImportError as exc:
        raise UsageError(
            f"{use} needs the train extra ({exc.name} is missing): pip install 'perceptscore[train]'"
        ) from None
    return run


DataSpec = Annotated[
    list[str],
    typer.Option(
        "--data",
        help="NAME=ROOT of a known dataset (lamem, memcat, koniq, livec, spaq, emoset, fi), or a labelled "
        "manifest (.csv/.parquet/.jsonl: path, label[, split]). Repeat for two-stage training.",
        show_default=False,
    ),
]
LabelColumn = Annotated[str, typer.Option(help="Manifest column holding the labels.")]
SplitId = Annotated[int, typer.Option(help="LaMem's official split (1-5).")]


@app.command()
def train(
    task: Annotated[str, typer.Option("-t", "--task", help="memorability, quality or emotion.")],
    data: DataSpec,
    out: Annotated[Path, typer.Option("-o", "--out", help="The run folder (checkpoints, logs, export/).")],
    init: Annotated[
        str, typer.Option(help="Starting CLIP tower: openai (downloaded) or a weights file.")
    ] = "openai",
    target: Annotated[
        list[str] | None, typer.Option(help="Stage 2 targets (dataset names).", show_default="every dataset")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (stage 1).", show_default="recipe")] = None,
    stage2_epochs: Annotated[
        int | None, typer.Option(help="Epochs of stage 2.", show_default="recipe")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step.", show_default="32")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.", show_default="recipe")] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW weight decay.", show_default="0.01")
    ] = None,
    warmup_fraction: Annotated[
        float | None, typer.Option(help="Warmup share of steps.", show_default="0.05")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of init, order and augmentation.", show_default="0")
    ] = None,
    accumulate: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    precision: Annotated[
        str, typer.Option(help="auto (bf16/fp16 autocast on CUDA, fp32 on CPU), fp32, bf16, fp16.")
    ] = "auto",
    device: Device = "auto",
    workers: Workers = None,
    save_every: Annotated[
        int, typer.Option(help="Checkpoint every N steps (and at each epoch's end).")
    ] = 500,
    max_steps: Annotated[int | None, typer.Option(help="Stop each stage after N steps (trial runs).")] = None,
    split_id: SplitId = 1,
    path_column: Annotated[str, typer.Option(help="Manifest column holding the paths.")] = "path",
    label_column: LabelColumn = "label",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
) -> None:
    """Train a PerceptCLIP model (LoRA + head); export it as a perceptscore checkpoint with a model card."""
    run = _trainer()
    overrides = {
        "epochs": epochs, "stage2_epochs": stage2_epochs, "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "warmup_fraction": warmup_fraction, "seed": seed,
    }  # fmt: skip
    options = run.TrainOptions(
        task, data, out, init, target or [], overrides, accumulate, precision, device, workers, save_every,
        max_steps, split_id, path_column, label_column, resume,
    )  # fmt: skip
    run.train(options, err_console)


@app.command("eval")
@scoring_options
def eval_(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="A manifest or scores file with a label column, or with --dataset the dataset's folder.",
            show_default=False,
        ),
    ],
    task: Annotated[str, typer.Option("-t", "--task", help="memorability, quality or emotion.")],
    scoring: ScoringArgs,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Read INPUT as this dataset (lamem, koniq, ...; manifest: a labelled manifest's split)."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="With --dataset: train, val or test.")] = "test",
    split_id: SplitId = 1,
    label_column: LabelColumn = "label",
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Also write the metrics as JSON.")] = None,
) -> None:
    """Score a labelled set with any checkpoint (the released ones too) and report SRCC/PLCC or accuracy."""
    from rich.table import Table

    from perceptscore.tasks import get_task

    run = _trainer("evaluation")
    spec = get_task(task)
    labelled = run.labelled_inputs(
        inputs, spec, dataset, split, split_id, scoring.path_column or "path", label_column
    )
    options = scoring.replace(path_column=labelled.path_column).options([spec.name])
    metrics, exit_code = run.evaluate(labelled, spec, options, _reporter, out)
    table = Table("metric", "value")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    raise typer.Exit(exit_code)


# ---- seeing the scores: heatmaps and the HTML report ------------------------------------------------
Checkpoint = Annotated[
    str | None, typer.Option("--checkpoint", help="The task's weights file.", show_default="resolved")
]
# Maps default to fp32: most of the backward's gradients are fp16 subnormals. Lower only when asked.
MapPrecision = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto or fp32 (fp32 on every device: maps are built from tiny gradients, most of them fp16 "
        "subnormals); bf16 or fp16 run faster with coarser maps.",
    ),
]


@app.command()
def explain(
    inputs: Inputs,
    task: Annotated[str, typer.Option("-t", "--task", help="memorability, quality or emotion.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="The folder for the heatmaps (created).")],
    method: Annotated[
        str,
        typer.Option(
            help="relevance (for a score: what it depended on, either way; for emotion: evidence for the "
            "class) or attention-shift (vs. base CLIP)."
        ),
    ] = "relevance",
    label: Annotated[
        str | None, typer.Option("--class", help="Emotion: the class to explain.", show_default="predicted")
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Also save each map as .npy (float32, NaN unseen).")
    ] = False,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    precision: MapPrecision = "auto",
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Crops per forward and backward pass, across images (at least 1).",
            show_default="16 on CUDA, 4 on CPU",
        ),
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Show where each image's score came from: a heatmap PNG per image (and .npy with --raw)."""
    from perceptscore.commands.explain import explain as run

    errors = 0
    maps = run(
        inputs, task, out, method, label, raw, checkpoint, device, precision, batch_size, overwrite=overwrite
    )
    for done in maps:
        if done.error:
            errors += 1
            err_console.print(Text.assemble(("failed:", "red"), f" {shown(done.path)}: {shown(done.error)}"))
        else:
            err_console.print(f"{shown(done.path)} -> {shown(str(done.png))} ({done.caption})")
    raise typer.Exit(1 if errors else 0)


@app.command()
def report(
    scores: Annotated[
        list[str],
        typer.Argument(help="Scores files written by `score` (.csv/.parquet/.jsonl).", show_default=False),
    ],
    out: Annotated[str, typer.Option("-o", "--out", help="The .html file to write.")],
    top: Annotated[int, typer.Option(help="Images shown at each end of every task's ranking.")] = 24,
    explain: Annotated[
        bool, typer.Option("--explain", help="A heatmap beside each image shown (runs the model on those).")
    ] = False,
    checkpoint: Annotated[
        list[str] | None,
        typer.Option(
            "--checkpoint", help="With --explain: TASK=PATH.", show_default="the weights that scored"
        ),
    ] = None,
    device: Device = "auto",
    precision: MapPrecision = "auto",
    overwrite: Overwrite = False,
) -> None:
    """Write one self-contained HTML page: histograms, top and bottom images, classes, errors, provenance."""
    from perceptscore.commands.report import report as run
    from perceptscore.tasks import all_tasks, parse_checkpoint_options

    checkpoints = parse_checkpoint_options(checkpoint or [], list(all_tasks()))
    written = run(scores, out, top, explain, checkpoints, device, precision, overwrite)
    err_console.print(
        f"report of {_count(written.data.rows, 'row')} ({_count(written.data.errors, 'error')}) -> "
        f"{shown(out)} ({written.size / 1e6:.1f} MB)"
    )


def main() -> None:
    """Console-script entry: user mistakes become one red line and their exit code, never a traceback."""
    try:
        app()
    except PerceptScoreError as exc:
        err_console.print(Text.assemble(("error:", "red"), f" {shown(redact(str(exc)))}"))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print(Text("interrupted", style="red"))
        sys.exit(130)
    except Exception as exc:
        from perceptscore.sinks import StdoutClosed, end_quietly_after_closed_stdout

        if not isinstance(exc, StdoutClosed):
            raise  # a bug: its traceback
        sys.exit(end_quietly_after_closed_stdout())  # `score | head`: ends quietly, as a SIGPIPE would
