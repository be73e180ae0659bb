"""``perceptscore score``, and the scored rows ``rank``, ``filter`` and ``eval`` work on."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
import pyarrow as pa

from perceptscore import engines
from perceptscore._text import shown
from perceptscore.columns import ERROR, PATH
from perceptscore.engines import Engine
from perceptscore.errors import UsageError
from perceptscore.formats import format_of, is_scores_file, read_csv_scores, read_provenance, read_scores
from perceptscore.incremental import Previous
from perceptscore.plan import ScoreOptions, ScoringPlan, make_plan
from perceptscore.progress import Reporter
from perceptscore.provenance import provenance
from perceptscore.runs import Interrupted, OutputLock, ShardedRun, StopOnSignal
from perceptscore.safety import refuse_overwriting_an_input
from perceptscore.scoring import Outcome, consume, scored
from perceptscore.sinks import Sink, check_output, write_atomic
from perceptscore.sources import Item, Sources

MakeReporter = Callable[[int | None], Reporter]


def score(
    inputs: Sequence[str],
    out: str,
    options: ScoreOptions,
    make_reporter: MakeReporter,
    resume: bool = False,
    incremental: str | None = None,
    processes: int | None = None,
    restart: bool = False,
) -> Outcome:
    """Score every input into ``out``. A file output is locked, written in resumable shards and appears
    only when complete; an interrupted run of the same plan is continued (``resume`` says so explicitly,
    ``restart`` discards it instead); ``incremental`` reuses the scores of an
    earlier scores file for files whose size and mtime did not change. ``-`` streams CSV to stdout.
    ``processes``: score in that many processes, each with its own model (default: one per visible GPU on
    CUDA, else one)."""
    sources = options.sources(inputs)  # bad inputs and outputs fail before seconds of model loading
    check_output(out)
    refuse_overwriting_an_input(out, inputs, allowed=[incremental] if incremental else [])
    if out == "-" and (resume or restart or incremental or (processes or 1) > 1):
        raise UsageError(
            "--resume, --restart, --incremental and --processes need a file output (-o scores.parquet)"
        )
    if resume and restart:
        raise UsageError("choose one of --resume and --restart")
    if (processes or 1) > 1 and "-" in inputs:
        raise UsageError("--processes needs inputs every process can read: not - (stdin)")
    previous = Previous(incremental, options.task_specs()) if incremental else None
    weights = options.weights()  # a missing weights file is reported before torch loads
    if out == "-":
        plan = make_plan(options, inputs, out, incremental, weights)
        return _score_to_stream(plan, sources, make_reporter)
    target = os.path.realpath(out)  # a symlinked output: its target is written and locked, the link kept
    with OutputLock(Path(target)), StopOnSignal() as stop:  # the lock before torch and the models load
        plan = make_plan(options, inputs, target, incremental, weights)
        return _score_to_file(plan, sources, make_reporter, restart, previous, processes, stop)


def _engine(plan: ScoringPlan, processes: int | None) -> Engine:
    processes = processes or default_processes(plan.device)
    return engines.create("process", processes=processes) if processes > 1 else engines.create("local")


def default_processes(device: str) -> int:
    """One process per visible GPU when scoring on "cuda" (no index given), else one."""
    if device != "cuda":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def _score_to_stream(plan: ScoringPlan, sources: Sources, make_reporter: MakeReporter) -> Outcome:
    engine, outcome = _engine(plan, 1), Outcome()
    schema = plan.schema(sources.passthrough)
    with (
        Sink("-", schema, provenance(plan)) as sink,
        make_reporter(sources.count()) as reporter,
        contextlib.closing(scored(engine, plan, sources, sources.passthrough)) as rows,
    ):
        consume(rows, reporter, lambda _, batch: sink.write(batch), outcome)
    outcome.ignored = sources.ignored
    return outcome


def _score_to_file(
    plan: ScoringPlan,
    sources: Sources,
    make_reporter: MakeReporter,
    restart: bool,
    previous: Previous | None,
    processes: int | None,
    stop: StopOnSignal,
) -> Outcome:
    out, engine, outcome = Path(plan.output), _engine(plan, processes), Outcome()
    schema = plan.schema(sources.passthrough)
    run = ShardedRun(out, schema, plan.fingerprint(), restart)
    outcome.discarded, outcome.resumed = run.discarded, run.saved_rows
    counted = _Counted(sources)

    def interrupted() -> Interrupted | None:
        if stop.signum is None:
            return None
        run.flush()
        name = signal.Signals(stop.signum).name
        message = f"stopped by {name}: {run.saved_rows} rows saved in {run.folder}; "
        return Interrupted(message + "run the same command again to continue", stop.signum)

    with (
        make_reporter(sources.count()) as reporter,
        contextlib.closing(scored(engine, plan, run.pending(counted), sources.passthrough, previous)) as rows,
    ):
        if outcome.resumed:
            reporter.advance(outcome.resumed, 0)
        try:
            consume(rows, reporter, run.add, stop=interrupted)
        except UsageError:
            # a signal to the whole process group also ends --processes children: that is the stop
            stopped = interrupted()
            if stopped is None:
                raise
            raise stopped from None
    outcome.skipped = previous.skipped if previous else 0
    about = provenance(plan, engine.describe(plan)) | {
        "resumed_rows": outcome.resumed, "incremental": plan.incremental,
    }  # fmt: skip
    with Sink(plan.output, schema, about) as sink:
        for table in run.tables(counted.count):
            sink.write(table)
            outcome.count(table)
    run.remove()
    outcome.ignored = sources.ignored
    return outcome


class _Counted:
    """Iterate the sources once, remembering how many items there were (to check the shards hold them all)."""

    def __init__(self, items: Sources) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[Item]:
        for item in self.items:
            self.count = item.index + 1
            yield item


# ---- the rows rank, filter and eval work on -----------------------------------------------------------


@dataclass
class Scored:
    """Rows to rank or filter, where they came from, and how many of them failed in this run."""

    frame: pd.DataFrame
    provenance: dict[str, Any]
    outcome: Outcome

    @property
    def root(self) -> str:
        """What relative paths in the rows are relative to: the folder they were scored from."""
        return str(self.provenance.get("cwd") or os.getcwd())


def scored_rows(
    inputs: Sequence[str] | None,
    options: ScoreOptions,
    make_reporter: MakeReporter,
    stdin: TextIO | None = None,
) -> Scored:
    """Rows from earlier scores files (no model is loaded), or from scoring the inputs now. No inputs: read
    standard input, a scores stream (``perceptscore score ... | ``) or paths, one a line."""
    if not inputs:
        stream = stdin if stdin is not None else sys.stdin
        table, paths = _read_stdin(stream)
        if table is not None:
            return Scored(table.to_pandas(), {}, Outcome(rows=table.num_rows))
        inputs, stdin = ["-"], paths
    scores = [f for f in inputs if format_of(f) is not None and is_scores_file(f)]
    if scores:
        if len(scores) != len(inputs):
            raise UsageError("give either scores files or images, not both")
        frame = pd.concat([read_scores(f).to_pandas() for f in scores], ignore_index=True)
        return Scored(frame, read_provenance(scores[0]), Outcome(rows=len(frame)))
    sources = options.sources(inputs, stdin)
    plan = make_plan(options, inputs)
    batches: list[pa.RecordBatch] = []
    outcome = Outcome()
    with (
        make_reporter(sources.count()) as reporter,
        contextlib.closing(scored(_engine(plan, 1), plan, sources, sources.passthrough)) as rows,
    ):
        consume(rows, reporter, lambda _, batch: batches.append(batch), outcome)
    frame = pa.Table.from_batches(batches, schema=plan.schema(sources.passthrough)).to_pandas()
    outcome.ignored = sources.ignored
    return Scored(frame, provenance(plan), outcome)


def _read_stdin(stream: TextIO) -> tuple[pa.Table | None, TextIO]:
    """Standard input as a scores stream (CSV whose header has ``path`` and ``error``), or else as lines
    of paths (returned as a stream that still holds the first line)."""
    if stream.isatty():
        raise UsageError(
            "no inputs: name files, folders or a scores file, or pipe paths or scores into it "
            "(find photos -name '*.jpg' | perceptscore filter ...)"
        )
    first = stream.readline()
    if not first:
        raise UsageError("no inputs: standard input was empty (no paths, no scores)")
    header = next(iter(_csv_rows(first)), [])
    if PATH in header and ERROR in header:
        return read_csv_scores(io.BytesIO((first + stream.read()).encode())), stream
    return None, _Lines(itertools.chain([first], stream))


def _csv_rows(text: str) -> list[list[str]]:
    import csv

    return list(csv.reader(io.StringIO(text)))


class _Lines(io.TextIOBase):
    """Lines already read plus the rest of a stream, read lazily."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines

    def __iter__(self) -> Iterator[str]:
        return self._lines

    def isatty(self) -> bool:
        return False


def write_rows(frame: pd.DataFrame, out: str, about: dict[str, Any]) -> None:
    """A selection as a scores file (.csv/.parquet/.jsonl or - for CSV on stdout)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with Sink(out, table.schema, about) as sink:
        sink.write(table)


def write_list(paths: Sequence[str], out: str, end: str = "\n") -> None:
    """One path per line (or ended by NUL: ``end``), to stdout (``-``; escaped for a person when it is a
    terminal) or written atomically to a list file (see ``safety``)."""
    if out == "-":
        tty = sys.stdout.isatty()
        sys.stdout.write("".join(f"{shown(p) if tty else p}{end}" for p in paths))
        sys.stdout.flush()
    else:
        write_atomic(Path(out), "".join(f"{p}{end}" for p in paths).encode("utf-8", "surrogateescape"))
