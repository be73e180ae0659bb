"""The ``perceptscore`` command line: parse, call the library, print. No logic, no torch at import time."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from perceptscore._cli_options import Command, Group, ScoringArgs, scoring_options
from perceptscore._cli_types import (
    FilterAll,
    FilterBy,
    FilterCopyTo,
    FilterEmotion,
    FilterMaxMemorability,
    FilterMaxQuality,
    FilterMinMemorability,
    FilterMinPercentile,
    FilterMinQuality,
    FilterOut,
    FilterPrint0,
    FilterRejected,
    FilterSamplesPerShard,
    FilterSymlinkTo,
    FilterToParquet,
    FilterTopFraction,
    FilterToShards,
    Percentiles,
    ScoreAllowEmpty,
    ScoreEngine,
    ScoreIncremental,
    ScoreJsonSummary,
    ScoreMaxDelete,
    ScoreOut,
    ScoreProcesses,
    ScoreRayAddress,
    ScoreReport,
    ScoreRestart,
    ScoreResume,
    ScoreRetryErrors,
    ScoreTask,
)
from perceptscore._text import redact, shown
from perceptscore._version import __version__
from perceptscore.errors import PerceptScoreError

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    name="perceptscore",
    help="Score image collections for memorability, quality and emotion with PerceptCLIP.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
    cls=Group,
)
# No markup: paths and messages are shown as they are ("photo[1].jpg", "[Errno 27]"); never wrapped, so a
# path is never broken across lines.
console = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)  # "x:fire:.csv" stays as named
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


def _examples(*lines: str) -> str:
    """A command's examples, at the bottom of its help (``\\b``: Click keeps these lines as written)."""
    return "Examples:\n\b\n" + "\n".join(f"  {line}" for line in lines)


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
        metavar="INPUTS",
    ),
]
ScoreInputs = Annotated[
    list[str] | None,
    typer.Argument(
        help="Image files, folders (recursive), globs, @list.txt, - (paths on stdin), .parquet/.csv/.jsonl "
        "manifests, .tar shards (shards/{00000..00099}.tar); any as a URL (s3://bucket/prefix/, https://).",
        show_default=False,
        metavar="INPUTS",
    ),
]
InputsOrStdin = Annotated[
    list[str] | None,
    typer.Argument(
        help="As for score; none: read standard input, paths one a line or a scores stream from `score`.",
        show_default=False,
        metavar="INPUTS",
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
        "would lose). Re-running a command over its own output never needs it.",
        rich_help_panel="Output",
    ),
]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _reporter(total: int | None, rows_on_stdout: bool = False, quiet: bool = False):  # type: ignore[no-untyped-def]
    from perceptscore.progress import Reporter

    if quiet:
        return Reporter(err_console, total, quiet=True)
    if rows_on_stdout and sys.stdout.isatty() and err_console.is_terminal:
        # CSV rows on the same terminal: a live bar would draw over them. Only the summary, at the end.
        return Reporter(Console(stderr=True, force_terminal=False), total, interval=float("inf"))
    # Off a terminal (cron, pipes) progress is a log line every PERCEPTSCORE_LOG_EVERY seconds.
    return Reporter(err_console, total, interval=float(os.environ.get("PERCEPTSCORE_LOG_EVERY", "30")))


_EXAMPLES_SCORE = _examples(
    "perceptscore score photos/ -t memorability -o scores.csv",
    "perceptscore score photos/ -t quality,emotion -o scores.parquet --incremental scores.parquet",
    "perceptscore score manifest.parquet --path-column file -t quality -o - | head",
    "perceptscore score 'shards/{00000..00099}.tar' -t mem -o s3://bucket/scores.parquet --engine ray",
)


@app.command(cls=Command, epilog=_EXAMPLES_SCORE)
@scoring_options
def score(
    inputs: ScoreInputs = None,
    *,
    task: ScoreTask,
    scoring: ScoringArgs,
    out: ScoreOut = "-",
    resume: ScoreResume = False,
    restart: ScoreRestart = False,
    incremental: ScoreIncremental = None,
    processes: ScoreProcesses = None,
    engine: ScoreEngine = "local",
    ray_address: ScoreRayAddress = None,
    report: ScoreReport = None,
    retry_errors: ScoreRetryErrors = None,
    overwrite: Overwrite = False,
    allow_empty: ScoreAllowEmpty = False,
    max_delete: ScoreMaxDelete = "50%",
    json_summary: ScoreJsonSummary = False,
) -> None:
    """Score images into a CSV, parquet or JSONL file (rows in input order, one per file)."""
    from perceptscore import summary
    from perceptscore.commands.score import score as run
    from perceptscore.replacing import DeleteLimit, Safeguards
    from perceptscore.tasks import parse_tasks

    options = scoring.options(parse_tasks(task))
    guards = Safeguards(overwrite, allow_empty, DeleteLimit.parse(max_delete))
    reporter = functools.partial(_reporter, rows_on_stdout=out == "-", quiet=scoring.quiet)
    started = time.monotonic()
    outcome = run(
        inputs or [], out, options, reporter, resume, incremental, processes, restart, engine, ray_address,
        report, retry_errors, guards,
    )  # fmt: skip
    seconds = time.monotonic() - started
    if json_summary:
        about = summary.as_json(outcome, out, seconds, outcome.reused_from, retry_errors)
        (err_console if out == "-" else console).print(json.dumps(about), highlight=False)  # one line
    elif not scoring.quiet:
        err_console.print(summary.line(outcome, out, seconds, outcome.reused_from, retry_errors))
    elif outcome.errors:  # -q: a cron job's mail comes only when something failed (cronic's convention)
        err_console.print(Text.assemble(("error:", "red"), f" {summary.errors_line(outcome, out)}"))
    if outcome.report and (outcome.report_failed or not (scoring.quiet or json_summary)):
        # after the summary: a report that failed never hides what was scored
        err_console.print(Text.assemble(("error:", "red"), f" {outcome.report}") if outcome.report_failed
                          else outcome.report)  # fmt: skip
    raise typer.Exit(outcome.exit_code)


_EXAMPLES_RANK = _examples(
    "perceptscore rank photos/ -t memorability --top 10",
    "perceptscore rank scores.parquet -t quality --ascending --top 0 -o worst-first.csv",
    "perceptscore rank scores.parquet --by emotion_awe --top 20",
)


@app.command(cls=Command, epilog=_EXAMPLES_RANK)
@scoring_options
def rank(
    inputs: InputsOrStdin = None,
    *,
    task: Annotated[
        str | None,
        typer.Option(
            "-t", "--task", help="The task to rank by (its score).", metavar="TASK", rich_help_panel="Model"
        ),
    ] = None,
    by: Annotated[
        str | None,
        typer.Option(
            help="Rank by this numeric column (emotion_awe, quality_raw, ...) or task's score.",
            metavar="COLUMN",
            rich_help_panel="Output",
        ),
    ] = None,
    scoring: ScoringArgs,
    top: Annotated[
        int,
        typer.Option(help="How many rows to show and write (0: all).", metavar="N", rich_help_panel="Output"),
    ] = 20,
    ascending: Annotated[bool, typer.Option(help="Lowest scores first.", rich_help_panel="Output")] = False,
    out: Annotated[
        str | None,
        typer.Option(
            "-o", "--out", help="Also write the ranked rows here.", metavar="FILE", rich_help_panel="Output"
        ),
    ] = None,
    percentiles: Percentiles = False,
    overwrite: Overwrite = False,
) -> None:
    """Rank images (or a scores file) by a task's score (-t) or any numeric column (--by); the top rows
    as a table, and to a file."""
    from perceptscore.commands.score import write_rows
    from perceptscore.commands.select import ranked, ranking

    plan = ranking(task, by, percentiles)
    options = scoring.options(plan.tasks)
    reporter = functools.partial(_reporter, quiet=scoring.quiet)
    rows, scored = ranked(inputs, plan, options, reporter, top, ascending, out, overwrite)
    if out:
        write_rows(rows, out, scored.provenance)
    if console.is_terminal:
        _print_ranking(rows, plan.shown)
    elif not out:
        write_rows(rows, "-", scored.provenance)
    _unscored(scored.outcome)
    raise typer.Exit(scored.outcome.exit_code)


def _unscored(outcome) -> None:  # type: ignore[no-untyped-def]
    """Rows that could not be scored are said on stderr, whatever -q says: an exit code 1 explained."""
    from perceptscore import summary

    if outcome.errors:
        err_console.print(Text.assemble(("error:", "red"), f" {summary.errors_line(outcome, None)}"))


def _print_ranking(ranked, columns: list[str]) -> None:  # type: ignore[no-untyped-def]
    from rich.table import Table

    from perceptscore.columns import PATH

    table = Table("#", *columns, PATH)
    for n, row in enumerate(ranked[[*columns, PATH]].itertuples(index=False, name=None), start=1):
        *values, path = row
        cells = [f"{v:.4f}" if isinstance(v, float) else shown(str(v)) for v in values]
        table.add_row(str(n), *cells, shown(str(path)))
    console.print(table)


_EXAMPLES_FILTER = _examples(
    "perceptscore filter scores.parquet --min-quality 0.7 --copy-to keep/",
    "perceptscore filter scores.parquet --min-emotion-awe 0.3 --max-quality-raw 0 -o awe.txt",
    "find photos -name '*.jpg' | perceptscore filter --min-quality 0.7 --print0 | xargs -0 ls -l",
)


# --min-COLUMN/--max-COLUMN for any task's column: no signature can declare them, so Typer hands unknown
# options to the command among its arguments, where it parses them (any other is still an error)
@app.command(
    "filter",
    cls=Command,
    epilog=_EXAMPLES_FILTER,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@scoring_options
def filter_(
    ctx: typer.Context,
    inputs: InputsOrStdin = None,
    *,
    scoring: ScoringArgs,
    min_quality: FilterMinQuality = None,
    max_quality: FilterMaxQuality = None,
    min_memorability: FilterMinMemorability = None,
    max_memorability: FilterMaxMemorability = None,
    emotion: FilterEmotion = None,
    top_fraction: FilterTopFraction = None,
    by: FilterBy = None,
    min_percentile: FilterMinPercentile = None,
    keep_all: FilterAll = False,
    copy_to: FilterCopyTo = None,
    symlink_to: FilterSymlinkTo = None,
    print0: FilterPrint0 = False,
    out: FilterOut = None,
    rejected: FilterRejected = None,
    percentiles: Percentiles = False,
    to_shards: FilterToShards = None,
    samples_per_shard: FilterSamplesPerShard = None,
    to_parquet: FilterToParquet = None,
    overwrite: Overwrite = False,
) -> None:
    """Keep the images that meet thresholds; list, copy or symlink them.

    Any numeric output column is a threshold: --min-COLUMN X and --max-COLUMN X (inclusive), e.g.
    --min-emotion-awe 0.3 or --max-quality_raw 0 (- or _ alike; a task's name means its score).
    """
    from perceptscore.commands.select import Wanted, column_options, keep
    from perceptscore.select import Criteria

    # Options no signature declares (--min-emotion-awe 0.3) reach us among the inputs: see below.
    known = [o for p in ctx.command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    paths, minimum, maximum = column_options([*(inputs or []), *ctx.args], known)
    named = {"quality": (min_quality, max_quality), "memorability": (min_memorability, max_memorability)}
    criteria = Criteria(
        minimum={**{k: low for k, (low, _) in named.items() if low is not None}, **minimum},
        maximum={**{k: high for k, (_, high) in named.items() if high is not None}, **maximum},
        emotions=[e.strip() for e in emotion.split(",") if e.strip()] if emotion else [],
        top_fraction=top_fraction,
        by=by,
        min_percentile=min_percentile,
        every=keep_all,
    )
    options = scoring.options([t.name for t in criteria.tasks()])
    # by default, the kept paths on stdout
    listing = out if out or copy_to or symlink_to or to_shards or to_parquet else "-"
    reporter = functools.partial(_reporter, quiet=scoring.quiet)
    wanted = Wanted(listing, print0, copy_to, symlink_to, rejected, to_shards, to_parquet, samples_per_shard,
                    percentiles, overwrite)  # fmt: skip
    kept = keep(paths or None, criteria, options, reporter, wanted)
    for label, text in kept.lines(scoring.quiet):
        err_console.print(Text.assemble((label, "red"), f" {text}") if label else text)
    _unscored(kept.scored.outcome)
    raise typer.Exit(kept.exit_code)


_EXAMPLES_TASKS = _examples(
    "perceptscore tasks",
)


@app.command(cls=Command, epilog=_EXAMPLES_TASKS)
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


weights_app = typer.Typer(
    help="List, download, import, convert and check model weights.",
    no_args_is_help=True,
    context_settings=HELP_OPTIONS,
    cls=Group,
)
app.add_typer(weights_app, name="weights")
WeightsTask = Annotated[
    str | None, typer.Option("--task", "-t", help="The task, when the file name does not say.")
]


_EXAMPLES_WEIGHTS_LIST = _examples(
    "perceptscore weights list",
)


@weights_app.command("list", cls=Command, epilog=_EXAMPLES_WEIGHTS_LIST)
def weights_list() -> None:
    """The released weights of each task and the local copy that would be used (no network)."""
    from rich.table import Column, Table

    from perceptscore.commands import weights

    table = Table(*(Column(h, overflow="fold") for h in ("task", "released file", "local copy")))
    for row in weights.weights_status():
        table.add_row(row["task"], row["release"], row["local"])
    console.print(table)


_EXAMPLES_WEIGHTS_CARD = _examples(
    "perceptscore weights card quality",
)


@weights_app.command("card", cls=Command, epilog=_EXAMPLES_WEIGHTS_CARD)
def weights_card(task: Annotated[str, typer.Argument(help="The task.", show_default=False)]) -> None:
    """Show a task's model card: what it predicts, training data, score range, preprocessing, licence."""
    from rich.markdown import Markdown

    from perceptscore.tasks import get_task

    console.print(Markdown(get_task(task).card_text()), soft_wrap=False)  # prose: wrapped to the terminal


_EXAMPLES_WEIGHTS_FETCH = _examples(
    "perceptscore weights fetch all",
)


@weights_app.command("fetch", cls=Command, epilog=_EXAMPLES_WEIGHTS_FETCH)
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


_EXAMPLES_WEIGHTS_IMPORT = _examples(
    "perceptscore weights import perceptCLIP_Memorability.pth",
)


@weights_app.command("import", cls=Command, epilog=_EXAMPLES_WEIGHTS_IMPORT)
def weights_import(
    file: Annotated[
        str,
        typer.Argument(
            help="A release .pth brought by hand, or one of our .safetensors.", show_default=False
        ),
    ],
    task: WeightsTask = None,
    replace: Annotated[
        bool, typer.Option(help="Put the file in place of other weights the cache holds for the task.")
    ] = False,
) -> None:
    """Put a weights file into the cache without the hub (sha256 checked where the release's is known):
    then score needs neither --checkpoint nor a network."""
    from perceptscore.commands.weights import import_notes, import_weights

    report = import_weights(file, task, replace)
    if report["imported"]:
        console.print(f"{report['task']}: imported {shown(file)} -> {shown(report['path'])}")
    else:
        console.print(f"{report['task']}: {shown(report['path'])} holds this file already, nothing to do")
    notes, warnings = import_notes(report)
    for note in notes:
        err_console.print(shown(note))
    for warning in warnings:
        err_console.print(Text.assemble(("warning:", "yellow"), f" {shown(warning)}"))


_EXAMPLES_WEIGHTS_PATH = _examples(
    "perceptscore weights path",
)


@weights_app.command("path", cls=Command, epilog=_EXAMPLES_WEIGHTS_PATH)
def weights_path(
    task: Annotated[
        list[str] | None, typer.Argument(help="Tasks (default: all).", show_default=False)
    ] = None,
) -> None:
    """Where each task's weights file is looked for, in order, and which one scoring takes (no network)."""
    from perceptscore.commands.weights import weights_paths
    from perceptscore.tasks import all_tasks, parse_tasks

    names = parse_tasks(task) if task else list(all_tasks())
    console.print("after --checkpoint TASK=PATH (checkpoints= in Python), the first found is taken:")
    for row in weights_paths(names):
        used = row["used"]
        console.print(f"{row['task']}: " + (f"takes {shown(used.where)}" if used else "no file here"))
        for i, place in enumerate(row["places"], 1):
            where = f" {shown(place.where)}" if place.where else ""
            state = "found" if place.found else place.note or "missing"
            console.print(f"  {i}. {place.origin}:{where} [{state}]")


_EXAMPLES_WEIGHTS_CONVERT = _examples(
    "perceptscore weights convert perceptCLIP_IQA.pth iqa.safetensors --precision fp16",
)


@weights_app.command("convert", cls=Command, epilog=_EXAMPLES_WEIGHTS_CONVERT)
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


_EXAMPLES_WEIGHTS_VERIFY = _examples(
    "perceptscore weights verify perceptCLIP_IQA.pth",
)


@weights_app.command("verify", cls=Command, epilog=_EXAMPLES_WEIGHTS_VERIFY)
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


_EXAMPLES_TRAIN = _examples(
    "perceptscore train -t memorability --data lamem=~/data/lamem -o runs/mem",
    "perceptscore train -t quality --data koniq=~/data/koniq --data spaq=~/data/spaq -o runs/iqa",
)


@app.command(cls=Command, epilog=_EXAMPLES_TRAIN)
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


_EXAMPLES_EVAL = _examples(
    "perceptscore eval ~/data/lamem -t memorability --dataset lamem --split test",
    "perceptscore eval labelled.csv -t quality --checkpoint runs/iqa/export/quality.safetensors",
)


@app.command("eval", cls=Command, epilog=_EXAMPLES_EVAL)
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
    reporter = functools.partial(_reporter, quiet=scoring.quiet)
    metrics, exit_code = run.evaluate(labelled, spec, options, reporter, out)
    table = Table("metric", "value")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    raise typer.Exit(exit_code)


# ---- seeing the scores: heatmaps and the HTML report ------------------------------------------------
Checkpoint = Annotated[
    list[str] | None,
    typer.Option(
        "--checkpoint",
        help="The task's weights: PATH, or TASK=PATH as score takes it.",
        show_default="resolved",
        metavar="[TASK=]PATH",
    ),
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


_EXAMPLES_EXPLAIN = _examples(
    "perceptscore explain photo.jpg -t quality -o maps/",
    "perceptscore explain photos/ -t emotion --class awe -o maps/ --raw",
)


@app.command(cls=Command, epilog=_EXAMPLES_EXPLAIN)
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


_EXAMPLES_REPORT = _examples(
    "perceptscore report scores.parquet                     # writes scores.html beside it",
    "perceptscore report scores.parquet -o report.html --explain --top 12",
)


@app.command(cls=Command, epilog=_EXAMPLES_REPORT)
def report(
    scores: Annotated[
        list[str],
        typer.Argument(help="Scores files written by `score` (.csv/.parquet/.jsonl).", show_default=False),
    ],
    out: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--out",
            help="The .html file to write.",
            show_default="beside the first scores file, as .html",
        ),
    ] = None,
    top: Annotated[
        int,
        typer.Option(
            help="Images shown at each end of every task's ranking (all of them, ranked, when there are no "
            "more than twice as many)."
        ),
    ] = 24,
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
    """Write one self-contained HTML page: statistics, histograms, top and bottom images, classes, errors,
    provenance."""
    from perceptscore.commands.report import report as run
    from perceptscore.tasks import all_tasks, parse_checkpoint_options

    checkpoints = parse_checkpoint_options(checkpoint or [], list(all_tasks()))
    written = run(scores, out, top, explain, checkpoints, device, precision, overwrite)
    err_console.print(
        f"report of {_count(written.data.rows, 'row')} ({_count(written.data.errors, 'error')}) -> "
        f"{shown(written.out)} ({written.size / 1e6:.1f} MB)"
    )


def main() -> None:
    """Console-script entry: user mistakes become one red line and their exit code, never a traceback."""
    try:
        app()
    except PerceptScoreError as exc:
        # An error may word itself for the command line over a few lines (MissingWeights: the command that
        # fixes it); each line is escaped on its own, so no text inside a message can fake a line.
        first, *more = getattr(exc, "cli_lines", None) or [str(exc)]
        err_console.print(Text.assemble(("error:", "red"), f" {shown(redact(first))}"))
        for line in more:
            err_console.print(shown(redact(line)))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print(Text("interrupted", style="red"))
        sys.exit(130)
    except Exception as exc:
        from perceptscore.sinks import StdoutClosed, end_quietly_after_closed_stdout

        if not isinstance(exc, StdoutClosed):
            raise  # a bug: its traceback
        sys.exit(end_quietly_after_closed_stdout())  # `score | head`: ends quietly, as a SIGPIPE would
