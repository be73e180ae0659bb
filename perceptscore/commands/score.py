"""``perceptscore score``, and the scored rows ``rank``, ``filter`` and ``eval`` work on."""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import pandas as pd
import pyarrow as pa

from perceptscore import engines, parts, remote
from perceptscore._text import shown
from perceptscore.columns import ERROR, PATH
from perceptscore.destinations import RemoteOutput
from perceptscore.engines import Engine
from perceptscore.errors import DecodeError, EngineFailed, PerceptScoreError, UsageError
from perceptscore.formats import format_of, is_scores_file, read_csv_scores, read_provenance, read_scores
from perceptscore.incremental import Previous
from perceptscore.inputs import is_glob
from perceptscore.items import Item
from perceptscore.plan import ScoreOptions, ScoringPlan, file_size, make_plan, weight_files
from perceptscore.progress import Reporter, weights_phase
from perceptscore.provenance import provenance
from perceptscore.remote_parts import RemoteFolder
from perceptscore.replacing import (
    Safeguards,
    mark_list,
    refuse_dropping,
    refuse_losing_tasks,
    refuse_replacing,
    rows_gone,
)
from perceptscore.runs import InputsChanged, Interrupted, OutputLock, ShardedRun, StopOnSignal
from perceptscore.safety import refuse_overwriting_an_input
from perceptscore.scoring import Outcome, consume, scored
from perceptscore.sinks import MemorySink, Sink, check_output, create, for_output, write_atomic, writing
from perceptscore.sources import Sources
from perceptscore.tasks import Task

if TYPE_CHECKING:
    from perceptscore.hub import Weights

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
    engine: str = "local",
    ray_address: str | None = None,
    report: str | None = None,
    retry_errors: str | None = None,
    guards: Safeguards | None = None,
) -> Outcome:
    """Score every input into ``out``: a ``ScoreJob`` validated, then run (its fields say what each
    argument means)."""
    job = ScoreJob(
        list(inputs), out, options, make_reporter, resume, incremental, processes, restart, engine,
        ray_address, report, retry_errors, guards or Safeguards(),
    )  # fmt: skip
    job.validate()
    return job.run()


@dataclass
class Checked:
    """What ``ScoreJob.validate`` found, before any model loads: the items to score, the rows to reuse
    (``--incremental``'s or ``--retry-errors``'), each task's weights file, and the earlier scores file the
    run's losses are checked against."""

    sources: Sources
    previous: Previous | None
    weights: dict[str, Weights]
    earlier: Earlier | None


@dataclass
class ScoreJob:
    """One ``score`` command: ``validate`` (every mistake refused before seconds of model loading), ``plan``
    (once the output is locked), ``run``.

    A file output is locked, written in resumable shards and appears only when complete; an interrupted
    run of the same plan is continued (``resume`` says so explicitly, ``restart`` discards it instead);
    ``incremental`` reuses the scores of an earlier scores file for files whose size and mtime did not
    change. ``-`` streams CSV to stdout; an object-store URL (``s3://b/scores.parquet``) is written locally
    and uploaded once complete (``destinations``). ``retry_errors``: an earlier scores file whose rows are
    kept, its error rows scored again (no ``inputs``). ``guards``: what may happen to an existing output
    (``replacing``). ``processes``: score in that many processes, each with its own model (default: one per
    visible GPU on CUDA, else one). ``engine``: "local" (this machine), or "ray" (a Ray cluster at
    ``ray_address``, ``$RAY_ADDRESS``, or a local Ray started for the run). ``report``: an HTML page of the
    output, made once it is complete."""

    inputs: list[str]
    out: str
    options: ScoreOptions
    make_reporter: MakeReporter
    resume: bool = False
    incremental: str | None = None
    processes: int | None = None
    restart: bool = False
    engine: str = "local"
    ray_address: str | None = None
    report: str | None = None
    retry_errors: str | None = None
    guards: Safeguards = field(default_factory=Safeguards)
    notes: list[str] = field(default_factory=list)  # said in the summary, before the run's own
    folder: bool = field(default=False, init=False)  # -o DIR/: a part per read task (``parts``)
    destination: RemoteOutput | None = field(default=None, init=False)  # -o URL: written here, uploaded
    remote_folder: RemoteFolder | None = field(default=None, init=False)  # -o s3://b/DIR/: parts uploaded
    checked: Checked | None = field(default=None, init=False)

    def validate(self) -> Checked:
        """Refuse what cannot work (flags, output, report), then read what the run needs (the inputs, the
        earlier files, the weights files) and probe a remote output: a mistake fails in one line now."""
        _refuse_engine_mistakes(
            self.engine, self.out, self.processes, self.ray_address, self.inputs, self.options.decode
        )
        self.options.install()  # limits and storage options, before any URL is looked at (-o, earlier files)
        self.out = self.out if self.out == "-" else remote.local_path(self.out)  # file:// is a local path
        self.inputs = [_local(text) for text in self.inputs]
        self.folder = self.out != "-" and parts.is_folder_output(self.out)
        if remote.is_remote(self.out) and self.folder:
            self.remote_folder = _remote_folder(self.out, self.inputs)
        self.incremental, self.retry_errors = _earlier_files(
            self.inputs, self.incremental, self.retry_errors, self.notes
        )
        if remote.is_remote(self.out) and not self.folder:
            self.destination = RemoteOutput(self.out)
        elif self.folder and self.remote_folder is None:
            _check_folder_output(self.out, self.inputs)
        _check_outputs(
            self.out, self.destination, self.inputs, self.incremental, self.retry_errors, self.report,
            self.guards,
        )  # fmt: skip
        earlier_file = bool(self.incremental or self.retry_errors)
        _refuse_flag_mistakes(self.out, self.resume, self.restart, earlier_file, self.processes)
        sources, previous, old = _read_inputs(self.options, self.inputs, self.incremental, self.retry_errors)
        weights = self.options.weights()  # a missing weights file is reported before torch loads
        if self.destination is not None:
            self.destination.prepare()  # a bucket that refuses writes fails now, not after the run
        remote_output = self.destination is not None or self.remote_folder is not None
        earlier = _guard_output(self.out, remote_output, self.incremental, old, self.options, self.guards)
        self.checked = Checked(sources, previous, weights, earlier)
        return self.checked

    def plan(self, target: str, device: str | None = None) -> ScoringPlan:
        """The resolved plan writing ``target`` (the locked file); ``device``: as a cluster resolved it."""
        checked = self.checked or self.validate()
        inputs = [self.retry_errors] if self.retry_errors else self.inputs
        return make_plan(
            self.options, inputs, target, self.incremental, checked.weights, device, self.retry_errors
        )

    def run(self) -> Outcome:
        """Score (validating first if that was not done): lock the output, start the engine, plan, write;
        then the report, and the upload of a remote output."""
        checked = self.checked or self.validate()
        with contextlib.ExitStack() as stack:
            target, stop = _locked(stack, self.out, self.destination, self.remote_folder)
            cluster = (
                stack.enter_context(engines.create("ray", address=self.ray_address))
                if self.engine == "ray" else None
            )  # fmt: skip
            plan = self.plan(target, cluster.device(self.options.device) if cluster is not None else None)
            if stop is None:
                return self._to_stream(plan, checked.sources, cluster)
            outcome = self._to_file(plan, checked, stop, cluster)
        if self.destination is not None:
            self.destination.tidy()
        if self.remote_folder is not None:
            self.remote_folder.published()
        outcome.notes[:0] = self.notes
        outcome.reused_from = self.incremental
        return outcome

    def _to_stream(self, plan: ScoringPlan, sources: Sources, cluster: Engine | None) -> Outcome:
        """CSV on standard output, each batch as it is scored."""
        engine, about = _engine(plan, 1, cluster), provenance(plan)
        outcome = _score_into(create("stream"), about, plan, sources, self.make_reporter, engine)
        if outcome.rows == 0 and not self.guards.allow_empty:
            raise UsageError(no_images(plan.inputs, sources.ignored))
        return outcome

    def _to_file(
        self, plan: ScoringPlan, checked: Checked, stop: StopOnSignal, cluster: Engine | None
    ) -> Outcome:
        """Score into the run's shards, then assemble the output (a remote one is uploaded once complete),
        and its report. A remote output whose earlier run finished but failed to upload is uploaded as it
        is when every row's file is as it was scored. Nothing is replaced when the inputs held no image,
        or when more of the output's rows (or of ``earlier``'s) would go than ``guards`` allow: the scored
        rows stay in the run's shards."""
        previous = checked.previous
        if self.destination is not None and not self.restart:
            as_is, previous = _finished_before(self.destination, plan, checked.sources, previous)
            if as_is:  # every row's file is as it was scored: uploaded as it is
                return self._upload_earlier(self.destination, plan)
        engine, outcome = _engine(plan, self.processes, cluster), Outcome()
        started = time.monotonic()  # how long the run took goes into its provenance (the report shows it)
        with _reporting(self.make_reporter, checked.sources) as reporter:
            filled = self._fill_shards(plan, engine, previous, reporter, stop, outcome)
        outcome.skipped = filled.previous.skipped if filled.previous else 0
        outcome.scored = filled.fresh.rows - filled.fresh.errors - outcome.skipped
        if filled.counted.count == 0 and not self.guards.allow_empty:
            raise UsageError(no_images(plan.inputs, checked.sources.ignored))
        outcome.gone = _rows_gone(checked.earlier, filled.run, plan.cwd, self.guards)
        about = provenance(plan, engine.describe(plan)) | {
            "engine": engine.name, "resumed_rows": outcome.resumed, "incremental": plan.incremental,
            "seconds": round(time.monotonic() - started, 3),
        }  # fmt: skip
        if self.remote_folder is not None:  # parts staged as they completed: committed, then kept here
            body = filled.run.listing(about)  # for the report, moved into place as a local folder output's
            self.remote_folder.commit(filled.run.folder, body)
            parts.swap(Path(plan.output), body)
            outcome.rows, outcome.errors = body["rows"], body["errors"]
        elif self.folder:  # the parts are the output: its manifest, last
            outcome.rows, outcome.errors = filled.run.publish(about)
        else:
            sink = self._sink(plan, outcome, filled.run)
            _assemble(
                filled.run, filled.counted.count, sink, plan.schema(checked.sources.passthrough), about,
                outcome,
            )  # fmt: skip
        outcome.ignored = checked.sources.ignored
        if self.destination is None:  # (a remote output's, before its upload: _sink)
            self._completed(filled.run, outcome, plan.output)
        return outcome

    def _sink(self, plan: ScoringPlan, outcome: Outcome, run: ShardedRun) -> Sink:
        """The output's sink: the file, or a remote output's local copy, uploaded once complete (after
        ``_completed``, then the record of this plan's run that a failed upload is tried again from)."""
        if self.destination is None:
            return create("file", path=plan.output)
        completed = functools.partial(self._completed, run, outcome)
        return create(
            "remote", output=self.destination, fingerprint=plan.fingerprint(), before_upload=completed
        )

    def _completed(self, run: ShardedRun, outcome: Outcome, scores: str | Path) -> None:
        """Once the output file is whole: the run's shards go (a failed upload is tried again from the
        file, not from them), then its report is made from it."""
        run.remove()
        self._report(scores, outcome)

    def _upload_earlier(self, destination: RemoteOutput, plan: ScoringPlan) -> Outcome:
        """The file an earlier run of this plan finished, unchanged since: its report, then its upload."""
        outcome = _already_scored(plan.output)
        self._report(plan.output, outcome)
        destination.finished(plan.fingerprint())
        destination.upload()
        return outcome

    def _report(self, scores: str | Path, outcome: Outcome) -> None:
        """The HTML report of the output (``--report``), made once the output is complete."""
        if self.report:
            _write_report(str(scores), self.report, outcome, self.guards.overwrite)

    def _fill_shards(
        self, plan: ScoringPlan, engine: Engine, previous: Previous | None, reporter: Reporter,
        stop: StopOnSignal, outcome: Outcome,
    ) -> _Filled:  # fmt: skip
        """The run's shards, filled: an interrupted run of the same plan continued; one whose inputs
        changed is not continued but salvaged (its rows reused where a file is unchanged, as
        ``--incremental`` does) and started over (``--resume`` insists on continuing: refused)."""
        sources, tasks = self._sources(), plan.task_specs()
        while True:
            names = parts.PartNames(plan.inputs) if self.folder else None
            uploads = self.remote_folder.part_done if self.remote_folder is not None else None
            run = ShardedRun(
                Path(plan.output), plan.schema(sources.passthrough), plan.fingerprint(), self.restart,
                strict=self.resume, parts=names, on_part=uploads,
            )  # fmt: skip
            if run.not_a_run:
                outcome.notes.append(
                    f"removed {run.folder.name}: an unfinished run's folder without run.json"
                )
            if run.salvaged is not None:
                previous = _salvaged(previous, tasks, run.salvaged, outcome)
            outcome.discarded, outcome.resumed = outcome.discarded + run.discarded, run.saved_rows
            counted = _Counted(sources)
            items = previous.tracked(counted) if previous is not None and previous.keep else counted
            fresh = Outcome()  # the rows this attempt scores (or reuses) itself
            try:
                _fill(run, plan, engine, items, sources.passthrough, previous, reporter, stop, fresh)
                return _Filled(run, counted, fresh, previous)
            except InputsChanged:
                if self.resume or "-" in plan.inputs:  # stdin cannot be read a second time
                    raise
                if counted.count == 0 and not self.guards.allow_empty:  # refused: nothing to salvage for
                    raise UsageError(no_images(plan.inputs, sources.ignored)) from None
                run.salvage()  # the rows it holds go on as reusable rows in a fresh run
                previous = _salvaged(previous, tasks, run.salvaged, outcome)

    def _sources(self) -> Sources:
        return (self.checked or self.validate()).sources


@dataclass
class _Filled:
    """A run's shards once filled: the items counted as they went by, the rows this attempt scored or
    reused itself, and the rows reusable (--incremental's, plus any an interrupted run left)."""

    run: ShardedRun
    counted: _Counted
    fresh: Outcome
    previous: Previous | None


def _salvaged(previous: Previous | None, tasks: Sequence[Task], rows: pa.Table, outcome: Outcome) -> Previous:
    """An interrupted run's rows, reusable where a file is unchanged."""
    previous = previous or Previous(tasks)
    previous.absorb(rows)
    outcome.salvaged += rows.num_rows
    return previous


def _earlier_files(
    inputs: Sequence[str], incremental: str | None, retry_errors: str | None, notes: list[str]
) -> tuple[str | None, str | None]:
    """``--incremental``'s and ``--retry-errors``' files as local paths where they are local; an
    ``--incremental`` file that does not exist yet is the first night of a cron job: nothing to reuse."""
    incremental = _folder_url(remote.local_path(incremental)) if incremental else None
    if incremental and not _exists(incremental):
        notes.append(f"nothing to reuse: {shown(remote.without_secrets(incremental))} does not exist yet")
        incremental = None
    if retry_errors:
        if inputs or incremental:
            raise UsageError("--retry-errors takes its rows from the scores file it names: no inputs, no "
                             "--incremental")  # fmt: skip
        retry_errors = _folder_url(remote.local_path(retry_errors))
    return incremental, retry_errors


def _folder_url(url: str) -> str:
    """A URL naming a folder output in a store without its trailing slash (``s3://b/scores``), with it."""
    if not remote.is_remote(url) or remote.is_prefix(url) or format_of(url.split("?", 1)[0]) is not None:
        return url
    try:
        return url + "/" if remote.exists(f"{url}/{parts.MANIFEST}") else url
    except DecodeError:
        return url


def _refuse_flag_mistakes(
    out: str, resume: bool, restart: bool, earlier_file: bool, processes: int | None
) -> None:
    if out == "-" and (resume or restart or earlier_file or (processes or 1) > 1):
        raise UsageError(
            "--resume, --restart, --incremental, --retry-errors and --processes need a file output "
            "(-o scores.parquet)"
        )
    if resume and restart:
        raise UsageError("choose one of --resume and --restart")


def _locked(
    stack: contextlib.ExitStack, out: str, destination: RemoteOutput | None, folder: RemoteFolder | None
) -> tuple[str, StopOnSignal | None]:
    """The file this run writes, locked (before Ray, torch and the models load), and the signal handler
    that stops it cleanly; standard output needs neither. A remote folder output, locked, finishes a
    commit cut short before anything else, and uploads its parts from here on."""
    if out == "-":
        return out, None
    # a symlinked output: its target is written and locked, the link kept
    target = str(destination.local if destination else folder.local if folder else os.path.realpath(out))
    stack.enter_context(OutputLock(Path(target)))
    if destination is not None:
        stack.enter_context(destination.locked())  # other hosts too: a lock object in the store
    if folder is not None:
        stack.enter_context(folder.locked())
        stack.callback(folder.close)
        folder.begin()
    return target, stack.enter_context(StopOnSignal())


def _check_outputs(
    out: str, destination: RemoteOutput | None, inputs: Sequence[str], incremental: str | None,
    retry_errors: str | None, report: str | None, guards: Safeguards,
) -> None:  # fmt: skip
    """The output (and the report) can be written, and is none of the inputs."""
    allowed = [f for f in (incremental, retry_errors) if f]  # rewriting one of these is what was asked
    if parts.is_folder_output(out):
        pass  # checked by _check_folder_output
    elif destination is None:
        check_output(out)
        refuse_overwriting_an_input(out, [*inputs, *allowed], allowed=allowed)
    else:
        refuse_writing_over_a_remote_input(out, inputs, allowed)
    if report:
        _check_report(report, out, inputs, guards.overwrite)


def _remote_folder(out: str, inputs: Sequence[str]) -> RemoteFolder:
    """``-o s3://b/DIR/``, checked (before anything is written there) and probed; a commit an earlier run
    left cut short is finished now, so the earlier output is read as it was meant to be."""
    folder = RemoteFolder(out)
    pending = folder.check(list(inputs))
    folder.prepare()
    if pending:
        folder.settle()
    return folder


def _check_folder_output(out: str, inputs: Sequence[str]) -> None:
    """``-o DIR/``: a folder that is new, empty, an unfinished run's, or an earlier output of ours (then
    replaced as a scores file is: ``_guard_output``); never a link, never inside an input folder (or
    where an input's pattern would find it), never inside another perceptscore output. (One in an object
    store: ``RemoteFolder.check``.)"""
    if os.path.islink(out.rstrip("/" + os.sep)) or (os.path.exists(out) and not os.path.isdir(out)):
        raise UsageError(f"-o {out}: not a folder (a file or a link)")
    target = os.path.abspath(out)
    for text in inputs:
        if _finds(text, target):
            raise UsageError(f"-o {out}: inside the input {text!r}; write the parts somewhere else")
    for parent in Path(target).parents:
        if (parent / parts.MANIFEST).is_file() or (parent / parts.RUN).is_dir():
            raise UsageError(f"-o {out}: inside the perceptscore output {parent}; choose a folder outside it")
    if not os.path.isdir(out) or parts.is_scores_folder(out):
        return
    others = [n for n in os.listdir(out) if not n.startswith(".")]
    if others:
        raise UsageError(
            f"-o {out}: holds files that are not perceptscore's ({others[0]!r}); name a new or empty folder"
        )


def _finds(text: str, target: str) -> bool:
    """Whether the input ``text`` would find the folder ``target`` or anything in it: a folder input it is
    in, a pattern that matches it or a folder above it."""
    import fnmatch

    named = text.removeprefix("@")
    if named == "-" or "://" in named:
        return False
    if os.path.isdir(named):
        root = os.path.abspath(named).rstrip(os.sep) + os.sep
        return (target + os.sep).startswith(root)
    if not is_glob(named):
        return False
    pattern = os.path.abspath(named)
    return any(fnmatch.fnmatch(str(p), pattern) for p in (Path(target), *Path(target).parents))


def _read_inputs(
    options: ScoreOptions, inputs: Sequence[str], incremental: str | None, retry_errors: str | None
) -> tuple[Sources, Previous | None, str | None]:
    """What to score, the rows to reuse (--retry-errors' or --incremental's), and the local copy of the
    file they came from (URLs are read with the storage options set: ``sources`` sets them)."""
    if retry_errors:
        old = remote.local_copy(retry_errors)
        previous = Previous.read(old, options.task_specs(), keep=True, named=retry_errors)
        return options.sources([old], retry_errors=True), previous, old
    old = remote.local_copy(incremental) if incremental else None
    sources = options.sources(inputs)
    return sources, Previous.read(old, options.task_specs(), named=incremental) if old else None, old


def _refuse_engine_mistakes(
    engine: str, out: str, processes: int | None, ray_address: str | None, inputs: Sequence[str],
    decode: str = "cpu",
) -> None:  # fmt: skip
    if engine not in ("local", "ray"):
        raise UsageError(f"unknown engine {engine!r}: use local or ray")
    if engine == "ray" and decode == "gpu":  # (before a cluster is started or joined)
        raise UsageError("--decode gpu runs on the local engine; --engine ray decodes on its CPU workers")
    if engine == "ray" and processes:
        raise UsageError("--processes is for the local engine: on Ray, the cluster's GPUs or nodes decide")
    if ray_address and engine != "ray":
        raise UsageError("--ray-address needs --engine ray")
    if engine == "ray" and out == "-":  # Ray prints its cluster's messages on standard output
        raise UsageError("--engine ray needs a file output (-o scores.parquet), not standard output")
    if (processes or 1) > 1 and "-" in inputs:
        raise UsageError("--processes needs inputs every process can read: not - (stdin)")


def _guard_output(
    out: str, remote_output: bool, incremental: str | None, old: str | None, options: ScoreOptions,
    guards: Safeguards,
) -> Earlier | None:  # fmt: skip
    """Refuse to replace an output that is not perceptscore's scores, or whose tasks this run would lose
    (unless asked); then the rows this run replaces (or, writing a new file, those of --incremental's it
    goes on from), to check at the end how many of them are gone."""
    replaced = _replaced(out, remote_output, incremental, old)
    if replaced is not None:
        refuse_replacing(replaced.path, "scores", guards.overwrite, named=replaced.named)
        tasks = [t.name for t in options.task_specs()]
        refuse_losing_tasks(replaced.path, tasks, guards.overwrite, named=replaced.named)
    return replaced or (Earlier(old, incremental) if old and incremental else None)


def _exists(path: str) -> bool:
    """A local path, an object, or a folder output in a store (its manifest: a folder holding only an
    unfinished run's staged parts is no output yet)."""
    if not remote.is_remote(path):
        return os.path.exists(path)
    return remote.exists(path.rstrip("/") + "/" + parts.MANIFEST if remote.is_prefix(path) else path)


@dataclass(frozen=True)
class Earlier:
    """An earlier scores file a run is checked against: ``path`` to read (a local copy of an object in a
    store), ``named`` as the user gave it."""

    path: str
    named: str


def _replaced(out: str, remote_output: bool, incremental: str | None, copy: str | None) -> Earlier | None:
    """The output as it exists before this run, readable here; None for a new file or stdout."""
    if out == "-":
        return None
    if not remote_output:  # (a folder output's new, empty or unfinished folder replaces no scores)
        is_folder = os.path.isdir(out) and not parts.is_scores_folder(out)
        return Earlier(out, out) if os.path.exists(out) and not is_folder else None
    same = remote.normalized(incremental or "").rstrip("/") == remote.normalized(out).rstrip("/")
    if incremental and copy and same:
        return Earlier(copy, out)  # --incremental brought it already
    try:
        return Earlier(remote.local_copy(out), out) if _exists(out) else None
    except DecodeError as exc:  # the store answered the probe, not this read: one line, as any failure
        raise UsageError(f"cannot read -o {remote.without_secrets(out)}: {exc}") from None


def _local(text: str) -> str:
    """An input with ``file://`` URLs as the local paths they name (``@file://...`` too)."""
    if text.startswith("@"):
        return "@" + remote.local_path(text[1:])
    return remote.local_path(text)


def refuse_writing_over_a_remote_input(out: str, inputs: Sequence[str], allowed: Sequence[str]) -> None:
    """A remote output that is one of the inputs (the same object, however spelled) is refused."""
    target = remote.normalized(out)
    if any(remote.is_remote(a) and remote.normalized(a) == target for a in allowed):
        return
    for text in inputs:
        named = text.removeprefix("@")
        if remote.is_remote(named) and remote.normalized(named) == target:
            raise UsageError(
                f"output {remote.without_secrets(out)!r} is the input {remote.without_secrets(named)!r}: "
                "refusing to overwrite an input; choose another output"
            )


def _finished_before(
    destination: RemoteOutput, plan: ScoringPlan, sources: Sources, previous: Previous | None
) -> tuple[bool, Previous | None]:
    """The file an earlier run of this plan finished, whose upload failed: (True, _) when every row's file
    is as it was scored (upload it as it is); else its rows go on as reusable rows (where a file is
    unchanged, as --incremental's), in the ``Previous`` returned."""
    finished = destination.finished_rows(plan.fingerprint()) if "-" not in plan.inputs else None
    if finished is None:
        return False, previous
    if destination.unchanged(finished, sources):
        return True, previous
    if not (previous and previous.keep):  # (--retry-errors scores its own file's rows again as before)
        previous = previous or Previous(plan.task_specs())
        previous.absorb(finished)
        destination.discard()  # held in memory now; on disk it would pass for the output it replaces
    return False, previous


def _already_scored(path: str) -> Outcome:
    outcome = Outcome(uploaded_earlier=True)
    outcome.count(read_scores(path))
    return outcome


def _write_report(out: str, report: str, outcome: Outcome, overwrite: bool) -> None:
    """The page of a complete scores file. Its failure (a folder gone, a full disk) is kept in the outcome,
    not raised: the scoring summary is still printed, then the report's error, and the run exits 2."""
    from perceptscore.commands.report import report as write_report
    from perceptscore.errors import PerceptScoreError

    try:
        written = write_report([out], report, overwrite=overwrite)
    except (PerceptScoreError, OSError) as exc:
        reason = " ".join((exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).split())
        outcome.report, outcome.report_failed = f"report {shown(report)} not written: {reason}", True
        return
    outcome.report = f"report -> {shown(report)} ({written.size / 1e6:.1f} MB)"


def _check_report(report: str, out: str, inputs: Sequence[str], overwrite: bool) -> None:
    from perceptscore.commands.report import check_report_output

    if out == "-":
        raise UsageError("--report needs a file output (-o scores.parquet): it is made from that file")
    check_report_output(report, [*inputs, out], overwrite)


def _engine(plan: ScoringPlan, processes: int | None, cluster: Engine | None = None) -> Engine:
    if cluster is not None:
        return cluster
    processes = processes or default_processes(plan.device)
    return engines.create("process", processes=processes) if processes > 1 else engines.create("local")


def default_processes(device: str) -> int:
    """One process per visible GPU when scoring on "cuda" (no index given), else one."""
    if device != "cuda":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


@contextlib.contextmanager
def _reporting(make_reporter: MakeReporter, sources: Sources) -> Iterator[Reporter]:
    """The run's progress display; a folder's files are counted beside the run, for the bar's total."""
    with make_reporter(sources.count()) as reporter:
        reporter.count_in_background(sources.counting())
        yield reporter


def _loading(plan: ScoringPlan, reporter: Reporter) -> Callable[[], None]:
    """What the display says while the model loads (only when one does: a quiet night loads none)."""

    def starting() -> None:
        reporter.phase(weights_phase([file_size(path) for path in weight_files(plan)]))

    return starting


def no_images(inputs: Sequence[str], ignored: Sequence[str]) -> str:
    """The one line for inputs that resolved to no images (an empty or unmounted folder, a glob matching
    nothing, an empty manifest): a cron job must not replace its scores with nothing."""
    named = ", ".join(shown(remote.without_secrets(i)) for i in inputs[:3]) + (
        ", ..." if len(inputs) > 3 else ""
    )
    skipped = f" ({len(ignored)} files that are not images)" if ignored else ""
    return f"no images found in {named}{skipped}: nothing written (--allow-empty writes an empty output)"


def _score_into(
    sink: Sink, about: dict[str, Any], plan: ScoringPlan, sources: Sources, make_reporter: MakeReporter,
    engine: Engine,
) -> Outcome:  # fmt: skip
    """Every item's row, in input order, into ``sink`` (finished, or aborted on any failure), counted; no
    shards: standard output, or rows in memory."""
    outcome = Outcome()
    with (
        writing(sink, plan.schema(sources.passthrough), about),
        _reporting(make_reporter, sources) as reporter,
        contextlib.closing(
            scored(engine, plan, sources, sources.passthrough, None, _loading(plan, reporter))
        ) as rows,
    ):
        consume(rows, reporter, lambda _, batch: sink.write(batch), outcome)
    outcome.ignored, outcome.scored = sources.ignored, outcome.rows - outcome.errors
    return outcome


def _assemble(
    run: ShardedRun, rows: int, sink: Sink, schema: pa.Schema, about: dict[str, Any], outcome: Outcome
) -> None:
    """The output from the run's shards, in order, published whole (the shards go once it is: the
    caller's ``_completed``)."""
    with writing(sink, schema, about):
        for table in run.tables(rows):
            sink.write(table)
            outcome.count(table)


def _fill(
    run: ShardedRun,
    plan: ScoringPlan,
    engine: Engine,
    items: Iterable[Item],
    passthrough: pa.Schema,
    previous: Previous | None,
    reporter: Reporter,
    stop: StopOnSignal,
    fresh: Outcome | None = None,
) -> None:
    """Score what ``run`` does not hold yet into its shards, counting them into ``fresh``; a stop signal
    saves the current shard."""

    def interrupted() -> Interrupted | None:
        if stop.signum is None:
            return None
        run.flush()
        name = signal.Signals(stop.signum).name
        message = f"stopped by {name}: {run.saved_rows} rows saved in {run.folder}; "
        return Interrupted(message + "run the same command again to continue", stop.signum)

    if run.saved_rows:
        reporter.advance(run.saved_rows, 0)
    starting = _loading(plan, reporter)
    with contextlib.closing(
        scored(engine, plan, run.pending(items), passthrough, previous, starting)
    ) as rows:
        try:
            consume(rows, reporter, run.add, fresh, stop=interrupted)
        except EngineFailed as exc:
            run.flush()  # the rows the engine returned before it failed: the rerun continues after them
            saved = f"{run.saved_rows} rows saved in {run.folder}; run the same command again to continue"
            raise EngineFailed(f"{exc}; {saved}") from None
        except UsageError as exc:
            # a signal to the whole process group also ends --processes children: that is the stop
            stopped = interrupted() if not isinstance(exc, InputsChanged) else None
            if stopped is None:
                raise
            raise stopped from None


def _rows_gone(earlier: Earlier | None, run: ShardedRun, cwd: str, guards: Safeguards) -> int | None:
    """How many of ``earlier``'s rows this run drops (their files gone); refused past ``--max-delete``.
    None without an earlier file, or with an unreadable one that ``--overwrite`` replaces."""
    if earlier is None or not is_scores_file(earlier.path):
        return None
    try:
        gone, total = rows_gone(earlier.path, run.found_paths(), cwd)
    except PerceptScoreError:
        if not guards.overwrite:
            raise
        return None
    refuse_dropping(earlier.named, gone, total, guards.max_delete)
    return gone


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
    roots: list[str] | None = None  # per row: the folder it was scored from (several scores files)

    def root(self, row: int) -> str:
        """What a row's relative path is relative to: the folder it was scored from."""
        if self.roots is not None:
            return self.roots[row]
        return str(self.provenance.get("cwd") or os.getcwd())


def frame_of(table: pa.Table) -> pd.DataFrame:
    """A table as pandas, integers kept exact where some are null (float64 would round an mtime in ns);
    its Arrow schema kept in ``attrs``, so ``write_rows`` gives a dataset's map columns back as maps."""
    frame = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    frame.attrs["arrow_schema"] = table.schema
    return frame


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
            return Scored(frame_of(table), {}, Outcome(rows=table.num_rows))
        inputs, stdin = ["-"], paths
    scores = [f for f in inputs if format_of(f) is not None and is_scores_file(f)]
    if scores:
        if len(scores) != len(inputs):
            raise UsageError("give either scores files or images, not both")
        frames = [frame_of(read_scores(f)) for f in scores]
        about = [read_provenance(f) for f in scores]
        roots = [
            str(a.get("cwd") or os.getcwd())
            for a, f in zip(about, frames, strict=True)
            for _ in range(len(f))
        ]
        frame = pd.concat(frames, ignore_index=True)
        return Scored(frame, about[0], Outcome(rows=len(frame)), roots)
    sources = options.sources(inputs, stdin)
    plan = make_plan(options, inputs)
    rows, about = MemorySink(), provenance(plan)
    outcome = _score_into(rows, about, plan, sources, make_reporter, _engine(plan, 1))
    assert rows.table is not None  # finished
    return Scored(frame_of(rows.table), about, outcome)


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
    table = _arrow_of(frame)
    with writing(for_output(out), table.schema, about) as sink:
        sink.write(table)


def _arrow_of(frame: pd.DataFrame) -> pa.Table:
    """The rows as Arrow again: with the schema they were read with where it is known (pandas alone cannot
    rebuild a map column), else as pandas infers; a column it cannot rebuild becomes JSON text."""
    schema = frame.attrs.get("arrow_schema")
    frame = frame.copy(deep=False)
    frame.attrs = {}  # pyarrow would try to keep them as metadata, and a schema is no JSON
    if schema is not None and set(frame.columns) <= set(schema.names):
        with contextlib.suppress(pa.ArrowException):
            fields = pa.schema([schema.field(c) for c in frame.columns])
            return pa.Table.from_pandas(frame, schema=fields, preserve_index=False)
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except pa.ArrowException:
        from perceptscore.formats import json_cell

        fixed = frame.copy()
        for column in [c for c in fixed.columns if fixed[c].dtype == "object"]:
            try:
                pa.array(fixed[column])
            except pa.ArrowException:
                fixed[column] = [None if v is None else json_cell(v) for v in fixed[column]]
        return pa.Table.from_pandas(fixed, preserve_index=False)


def write_list(paths: Sequence[str], out: str, end: str = "\n") -> None:
    """One path per line (or ended by NUL: ``end``), to stdout (``-``; escaped for a person when it is a
    terminal) or written atomically to a list file (see ``safety``)."""
    if out == "-":
        tty = sys.stdout.isatty()
        sys.stdout.write("".join(f"{shown(p) if tty else p}{end}" for p in paths))
        sys.stdout.flush()
    else:
        try:
            write_atomic(Path(out), "".join(f"{p}{end}" for p in paths).encode("utf-8", "surrogateescape"))
        except OSError as exc:  # a link into a folder that is gone, a full disk
            raise UsageError(f"cannot write {shown(out)}: {exc.strerror or exc}") from None
        mark_list(Path(out))  # so the same command may replace it tomorrow (``replacing``)
