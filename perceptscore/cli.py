"""The ``perceptscore`` command line: parse, call the library, print. No logic, no torch at import time."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from perceptscore._version import __version__
from perceptscore.errors import PerceptScoreError

app = typer.Typer(
    name="perceptscore",
    help="Score image collections for memorability, quality and emotion with PerceptCLIP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


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


@app.command()
def tasks() -> None:
    """List the perceptual tasks, their output columns and released weights."""
    from rich.table import Table

    from perceptscore.tasks import all_tasks

    table = Table("task", "aliases", "columns", "preprocessing", "released weights")
    for t in all_tasks().values():
        table.add_row(
            t.name,
            ", ".join(t.aliases),
            ", ".join(t.columns[:3]) + (", ..." if len(t.columns) > 3 else ""),
            t.preprocess.describe(),
            f"{t.release.repo_id}/{t.release.filename}",
        )
    console.print(table)


def main() -> None:
    """Console-script entry: user mistakes become one red line and their exit code, never a traceback."""
    try:
        app()
    except PerceptScoreError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
