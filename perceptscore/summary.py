"""What a finished ``score`` run says: one line of plain counts for people, one JSON object for scripts.

The counts part the output's rows: ``scored`` (by the model, now), ``errors`` (rows with no score, whenever
they were made), ``reused`` (unchanged files' rows taken from ``--incremental``'s or ``--retry-errors``'
file), ``resumed`` (taken from an interrupted run's saved shards). ``gone`` is not a row of the output: rows
of its earlier version whose files are no longer there.
"""

from __future__ import annotations

from typing import Any

from perceptscore._text import shown
from perceptscore.remote import without_secrets
from perceptscore.scoring import Outcome


def counts(outcome: Outcome) -> dict[str, int]:
    scored = max(outcome.scored, 0)
    reused = outcome.skipped
    resumed = max(outcome.rows - scored - outcome.errors - reused, 0)
    return {"rows": outcome.rows, "scored": scored, "errors": outcome.errors, "reused": reused,
            "resumed": resumed}  # fmt: skip


def notes(outcome: Outcome, incremental: str | None, retry_errors: str | None) -> list[str]:
    """What else happened, in words: where reused rows came from, what was passed over or removed."""
    said = list(outcome.notes)
    if outcome.uploaded_earlier:
        said.append("nothing scored again: uploaded what an earlier run finished, whose upload had failed")
    if outcome.salvaged:
        said.append(
            f"the inputs changed since an interrupted run: its {outcome.salvaged} rows were reused where "
            "files are unchanged"
        )
    if retry_errors:
        said.append(f"{outcome.skipped} kept from {_where(retry_errors)}, the rest retried")
    elif incremental:
        said.append(f"{outcome.skipped} unchanged, reused from {_where(incremental)}")
    if outcome.discarded:
        said.append(f"discarded {outcome.discarded} rows of an interrupted run (--restart)")
    if outcome.ignored:
        names = ", ".join(map(shown, outcome.ignored[:3])) + (", ..." if len(outcome.ignored) > 3 else "")
        n = len(outcome.ignored)
        what = "file that is not an image" if n == 1 else "files that are not images"
        said.append(f"ignored {n} {what}: {names}")
    return said


def line(
    outcome: Outcome,
    out: str,
    seconds: float,
    incremental: str | None = None,
    retry_errors: str | None = None,
) -> str:
    """``19 scored, 7 errors, 10 reused, 2 gone since the last run -> scores.csv in 12.4 s (notes)``."""
    n = counts(outcome)
    parts = [f"{n['scored']} scored", _plural(n["errors"], "error")]
    if n["reused"] or incremental or retry_errors:
        parts.append(f"{n['reused']} reused")
    if outcome.uploaded_earlier:  # the earlier run finished; only its upload had failed
        parts.append(f"{n['resumed']} from the earlier run's finished file")
    elif n["resumed"] or outcome.resumed:
        parts.append(f"{n['resumed']} resumed from an interrupted run")
    if outcome.gone is not None:
        parts.append(f"{outcome.gone} gone since the last run")
    said = notes(outcome, incremental, retry_errors)
    extra = f" ({'; '.join(said)})" if said else ""
    where = "stdout" if out == "-" else _where(out)
    return f"{', '.join(parts)} -> {where} in {_elapsed(seconds)}{extra}"


def errors_line(outcome: Outcome, out: str | None) -> str:
    """What ``-q`` still says: how many rows have no score, and where their reasons are (``out`` None:
    the command's rows are not a file, e.g. rank's table)."""
    said = f"{_plural(outcome.errors, 'file')} could not be scored"
    if out is None:
        return f"{said} (their rows' error column says why)"
    where = "stdout" if out == "-" else _where(out)
    return f"{said} (the error column says why) -> {where}"


def as_json(
    outcome: Outcome, out: str, seconds: float,
    incremental: str | None = None, retry_errors: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The same, as one JSON object: stable keys for scripts."""
    return {
        "output": None if out == "-" else without_secrets(out),
        **counts(outcome),
        "gone": outcome.gone,
        "ignored": len(outcome.ignored),
        "seconds": round(seconds, 3),
        "exit_code": outcome.exit_code,
        "report": outcome.report,
        "report_failed": outcome.report_failed,
        "notes": notes(outcome, incremental, retry_errors),
    }


def _where(url: str) -> str:
    return shown(without_secrets(url))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _elapsed(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
