"""The Typer annotations of ``score``'s and ``filter``'s own options (their shared scoring options are in
``_cli_options``): declared here, one name each, so each command function in ``cli`` reads as its
signature and its few lines of calls. No logic, no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ScoreTask = Annotated[
    list[str],
    typer.Option(
        "-t",
        "--task",
        help="Task(s): memorability, quality, emotion; a,b.",
        metavar="TASK",
        rich_help_panel="Model",
    ),
]
ScoreOut = Annotated[
    str,
    typer.Option(
        "-o",
        "--out",
        help="Output .csv/.parquet/.jsonl (or s3://...), or - for CSV on stdout.",
        metavar="FILE",
        rich_help_panel="Output",
    ),
]
ScoreResume = Annotated[
    bool,
    typer.Option(
        help="Insist on continuing an interrupted run: refuse if its inputs or options changed. "
        "(Without it, a run with the same inputs and options continues anyway.)",
        rich_help_panel="Output",
    ),
]
ScoreRestart = Annotated[
    bool,
    typer.Option(help="Discard an interrupted run's saved rows and start over.", rich_help_panel="Output"),
]
ScoreIncremental = Annotated[
    str | None,
    typer.Option(
        help="An earlier scores file: reuse its scores where a file's size and mtime are unchanged.",
        metavar="FILE",
        rich_help_panel="Output",
    ),
]
ScoreProcesses = Annotated[
    int | None,
    typer.Option(
        help="Scoring processes, each with its own model.",
        show_default="one per visible GPU",
        metavar="N",
        rich_help_panel="Performance",
    ),
]
ScoreEngine = Annotated[
    str,
    typer.Option(
        help="local (this machine) or ray (Ray Data, on a cluster: pip install 'perceptscore[ray]').",
        metavar="local|ray",
        rich_help_panel="Ray",
    ),
]
ScoreRayAddress = Annotated[
    str | None,
    typer.Option(
        help="The Ray cluster for --engine ray.",
        show_default="$RAY_ADDRESS, else a local Ray",
        metavar="ADDRESS",
        rich_help_panel="Ray",
    ),
]
ScoreReport = Annotated[
    str | None,
    typer.Option(
        help="Also write an HTML report of the output once it is complete.",
        metavar="FILE",
        rich_help_panel="Output",
    ),
]
ScoreRetryErrors = Annotated[
    str | None,
    typer.Option(
        help="An earlier scores file (no inputs): keep its scored rows, score its error rows again.",
        metavar="FILE",
        rich_help_panel="Inputs",
    ),
]
ScoreAllowEmpty = Annotated[
    bool,
    typer.Option(
        help="Inputs with no image write an empty output (else: exit 2, nothing written).",
        rich_help_panel="Output",
    ),
]
ScoreMaxDelete = Annotated[
    str,
    typer.Option(
        help="How many of the output's earlier rows may go because their files are gone: N, N% or all.",
        metavar="N|N%|all",
        rich_help_panel="Output",
    ),
]
ScoreJsonSummary = Annotated[
    bool,
    typer.Option(
        "--json",
        help="The summary as one JSON object on stdout (on stderr when the rows go to stdout).",
        rich_help_panel="Output",
    ),
]
FilterMinQuality = Annotated[
    float | None,
    typer.Option(
        help="Keep quality >= X (display score, ~0-1). Any column: --min-COLUMN X, --max-COLUMN X.",
        metavar="X",
        rich_help_panel="Thresholds",
    ),
]
FilterMaxQuality = Annotated[
    float | None, typer.Option(help="Keep quality <= X.", metavar="X", rich_help_panel="Thresholds")
]
FilterMinMemorability = Annotated[
    float | None, typer.Option(help="Keep memorability >= X.", metavar="X", rich_help_panel="Thresholds")
]
FilterMaxMemorability = Annotated[
    float | None, typer.Option(help="Keep memorability <= X.", metavar="X", rich_help_panel="Thresholds")
]
FilterEmotion = Annotated[
    str | None,
    typer.Option(help="Keep these predicted emotions: a,b.", metavar="NAMES", rich_help_panel="Thresholds"),
]
FilterTopFraction = Annotated[
    float | None,
    typer.Option(help="Keep the best F (0-1] by --by.", metavar="F", rich_help_panel="Thresholds"),
]
FilterBy = Annotated[
    str | None,
    typer.Option(
        help="For --top-fraction and --min-percentile: a numeric column, or a task's score.",
        metavar="COLUMN",
        rich_help_panel="Thresholds",
    ),
]
FilterCopyTo = Annotated[
    Path | None,
    typer.Option(
        help="Copy the kept files here (never overwrites; run again, copies nothing twice).",
        metavar="FOLDER",
        rich_help_panel="Output",
    ),
]
FilterSymlinkTo = Annotated[
    Path | None,
    typer.Option(help="Symlink the kept files here.", metavar="FOLDER", rich_help_panel="Output"),
]
FilterPrint0 = Annotated[
    bool,
    typer.Option(
        "--print0",
        help="End each listed path with NUL, not a newline (xargs -0).",
        rich_help_panel="Output",
    ),
]
FilterOut = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--out",
        help="A list of paths (.txt/.lst, or - for stdout), or rows (.csv/.parquet/.jsonl).",
        show_default="paths on stdout",
        metavar="FILE",
        rich_help_panel="Output",
    ),
]
FilterMinPercentile = Annotated[
    float | None,
    typer.Option(
        help="Keep rows at or above percentile P (0-100) of --by, over every input row.",
        metavar="P",
        rich_help_panel="Thresholds",
    ),
]
FilterAll = Annotated[
    bool,
    typer.Option(
        "--all",
        help="Keep every row, no criteria: with --to-shards/--to-parquet, scores for every sample.",
        rich_help_panel="Thresholds",
    ),
]
FilterRejected = Annotated[
    str | None,
    typer.Option(
        help="Also write the rows not kept (.csv/.parquet/.jsonl), each with a 'rejected' column: why.",
        metavar="FILE",
        rich_help_panel="Output",
    ),
]
Percentiles = Annotated[
    bool,
    typer.Option(
        "--percentiles",
        help="Add <score>_percentile (0-100: share of scored rows at or below; ties share the highest).",
        rich_help_panel="Output",
    ),
]
FilterToShards = Annotated[
    Path | None,
    typer.Option(
        help="Write the kept samples to new tar shards: every file byte for byte, plus their scores.",
        metavar="FOLDER",
        rich_help_panel="Output",
    ),
]
FilterSamplesPerShard = Annotated[
    int | None,
    typer.Option(
        help="Samples in each shard --to-shards writes.",
        show_default="10000",
        metavar="N",
        rich_help_panel="Output",
    ),
]
FilterToParquet = Annotated[
    Path | None,
    typer.Option(
        help="Write the kept rows of a parquet dataset, every column plus the scores, in the hub layout.",
        metavar="FOLDER",
        rich_help_panel="Output",
    ),
]
