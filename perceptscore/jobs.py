"""What each CLI command does, as plain functions: the CLI parses arguments and prints, these do the work."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from perceptscore.errors import UsageError
from perceptscore.hub import Weights, file_sha256, resolve
from perceptscore.outputs import output_schema, provenance
from perceptscore.progress import Reporter
from perceptscore.runs import SHARD_ROWS, Interrupted, OutputLock, ShardedRun, StopOnSignal
from perceptscore.sinks import FORMATS, Sink, check_output, write_atomic
from perceptscore.sources import SourceItem, Sources, is_scores_file, read_provenance, read_scores
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

    def weights(self) -> dict[str, Weights]:
        """Each task's weights file, found or downloaded, without loading anything (no torch)."""
        return {t: resolve(get_task(t), self.checkpoints.get(t)) for t in self.tasks}

    def scorer(self, weights: dict[str, Weights] | None = None):  # type: ignore[no-untyped-def]  # -> Scorer
        # Weights first, torch after: a missing file is reported at once, not after seconds of imports.
        weights = weights or self.weights()
        from perceptscore.pipeline import Scorer

        return Scorer(
            self.tasks, weights, self.device, self.precision, self.batch_size, self.workers, self.fast_decode
        )


@dataclass
class Outcome:
    rows: int = 0
    errors: int = 0  # rows of the output that could not be scored
    resumed: int = 0  # rows taken from an interrupted run's shards
    skipped: int = 0  # rows reused from --incremental's file (unchanged files)
    discarded: int = 0  # rows of an interrupted run dropped because --resume was not given
    ignored: int = 0  # files in input folders passed over (no image extension)

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0


def score(
    inputs: Sequence[str],
    out: str,
    options: ScoreOptions,
    make_reporter: MakeReporter,
    resume: bool = False,
    incremental: str | None = None,
    processes: int | None = None,
    part: tuple[int, int] | None = None,
) -> Outcome:
    """Score every input into ``out``. A file output is locked, written in resumable shards and appears
    only when complete; ``resume`` continues an interrupted run; ``incremental`` reuses the scores of an
    earlier scores file for files whose size and mtime did not change. ``-`` streams CSV to stdout.

    ``processes``: score in that many processes, each with its own model (default: one per visible GPU on
    CUDA, else one); each takes every n-th block of rows, the parent assembles. ``part`` (i, n) is such a
    process: it writes its shards into the parent's run and leaves the rest to it."""
    sources = options.sources(inputs)  # bad inputs and outputs fail before seconds of model loading
    check_output(out)
    if out == "-" and (resume or incremental or (processes or 1) > 1):
        raise UsageError("--resume, --incremental and --processes need a file output (-o scores.parquet)")
    tasks = [get_task(t) for t in options.tasks]
    previous = Previous(incremental, tasks) if incremental else None
    weights = options.weights()
    if out == "-":
        scorer = options.scorer(weights)
        return _score_to_stream(scorer, sources, scorer.schema(sources.passthrough), make_reporter)

    fingerprint = {
        "tasks": [t.name for t in tasks],
        "weights": {name: file_sha256(w.path) for name, w in weights.items()},
        "precision": options.precision,
        "fast_decode": options.fast_decode,
        "inputs": list(inputs),
        "recursive": options.recursive,
        "path_column": options.path_column,
        "incremental": incremental,
    }
    schema = output_schema(tasks, sources.passthrough)
    if part is not None:
        return _score_part(sources, out, options, weights, schema, fingerprint, previous, part)
    if (processes or 1) > 1 and "-" in inputs:
        raise UsageError("--processes needs inputs every process can read: not - (stdin)")
    outcome = Outcome()
    counted = _Counted(sources)
    with OutputLock(Path(out)), StopOnSignal() as stop:  # the lock before torch and the models load
        processes = processes or default_processes(options.device)
        run = ShardedRun(Path(out), schema, fingerprint, resume)
        outcome.discarded = run.discarded
        outcome.resumed = run.saved_rows
        with make_reporter(sources.count()) as reporter:
            if outcome.resumed:
                reporter.advance(outcome.resumed, 0)
            if processes > 1:
                _run_parts(inputs, out, options, weights, incremental, processes, run, reporter, stop)
                for _ in counted:  # the parts read the inputs themselves; the total is still needed here
                    pass
                device = f"{processes} processes on {options.device}"
            else:
                scorer = options.scorer(weights)
                device = str(scorer.device)
                pending = run.pending(counted)
                _feed(run, scorer, pending, previous, stop, reporter.advance)
        outcome.skipped = previous.skipped if previous else 0
        about = provenance(tasks, weights, device, _precision_name(options), options.fast_decode)
        about |= {"resumed_rows": outcome.resumed, "incremental": incremental}
        with Sink(out, schema, about) as sink:
            for table in run.tables(counted.count):
                sink.write(table)
                outcome.rows += table.num_rows
                outcome.errors += table.num_rows - table.column("error").null_count
        run.remove()
    outcome.ignored = len(sources.ignored)
    return outcome


def parse_part(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise UsageError(f"--part takes I/N with 0 <= I < N, got {text!r}")
    return int(i), int(n)


def _interrupted(signum: int, run: ShardedRun) -> Interrupted:
    name = signal.Signals(signum).name
    return Interrupted(
        f"stopped by {name}: {run.saved_rows} rows saved in {run.folder}; "
        "run the same command with --resume to continue",
        signum,
    )


def _precision_name(options: ScoreOptions) -> str:
    if options.precision != "auto":
        return options.precision
    return (
        "fp16"
        if options.device.startswith("cuda") or (options.device == "auto" and _cuda_count())
        else "fp32"
    )


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def default_processes(device: str) -> int:
    """One process per visible GPU when scoring on CUDA (``auto`` or ``cuda`` without an index), else one."""
    return max(1, _cuda_count()) if device in ("auto", "cuda") else 1


def _part_device(device: str, i: int) -> str:
    return f"cuda:{i}" if device in ("auto", "cuda") else device


def _score_part(sources, out, options, weights, schema, fingerprint, previous, part) -> Outcome:  # type: ignore[no-untyped-def]
    """One of several processes: score every n-th block of rows (blocks of SHARD_ROWS) into the run."""
    i, n = part
    if options.device == "cpu":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))  # the processes share the cores
    scorer = options.scorer(weights)
    run = ShardedRun(Path(out), schema, fingerprint, resume=True)
    mine = (item for item in run.pending(sources) if (item.index // SHARD_ROWS) % n == i)
    outcome = Outcome()

    def count(rows: int, errors: int) -> None:
        outcome.rows += rows
        outcome.errors += errors

    with StopOnSignal() as stop:
        _feed(run, scorer, mine, previous, stop, count)
        run.flush()
    return outcome


def _feed(run, scorer, items, previous, stop, progress) -> None:  # type: ignore[no-untyped-def]
    """Score ``items`` (reusing ``previous``'s unchanged rows) into ``run``'s shards; on a stop signal save
    the current shard and raise ``Interrupted``. ``progress(rows, errors)`` after each batch."""
    batches = previous.merge(items, scorer.iter_batches) if previous else scorer.iter_batches(items)
    for indices, rows in batches:
        run.add(indices, rows)
        progress(len(rows), sum(row["error"] is not None for row in rows))
        if stop.signum is not None:
            run.flush()
            raise _interrupted(stop.signum, run)


def _part_command(inputs, out, options, weights, incremental) -> list[str]:  # type: ignore[no-untyped-def]
    """The ``perceptscore score`` command line of one part: the same run, weights already resolved."""
    command = [
        sys.executable,
        "-m",
        "perceptscore",
        "score",
        *inputs,
        "-o",
        out,
        "-t",
        ",".join(options.tasks),
    ]
    command += [arg for t, w in weights.items() for arg in ("--checkpoint", f"{t}={w.path}")]
    command += ["--precision", options.precision]
    command += ["--workers", str(options.workers)] if options.workers is not None else []
    command += ["--batch-size", str(options.batch_size)] if options.batch_size else []
    command += ["--path-column", options.path_column] if options.path_column else []
    command += [] if options.recursive else ["--no-recursive"]
    command += ["--fast-decode"] if options.fast_decode else []
    command += ["--incremental", incremental] if incremental else []
    return command


def _run_parts(inputs, out, options, weights, incremental, n, run, reporter, stop) -> None:  # type: ignore[no-untyped-def]
    """Start n ``perceptscore score --part i/n`` processes, show their progress from the shards they write,
    pass SIGINT/SIGTERM on, and fail with the first broken part's last message."""
    command = _part_command(inputs, out, options, weights, incremental)
    env = {**os.environ, "PERCEPTSCORE_LOG_EVERY": "86400"}  # the parent reports progress
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(n)]
        procs = [
            subprocess.Popen([*command, "--device", _part_device(options.device, i), "--part", f"{i}/{n}"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logs[i], env=env)
            for i in range(n)
        ]  # fmt: skip
        stack.callback(lambda: [p.kill() for p in procs if p.poll() is None])
        shown = run.saved_rows
        while any(p.poll() is None for p in procs):
            if stop.signum is not None:
                for p in procs:
                    p.send_signal(stop.signum)  # each part saves its current shard and stops
                for p in procs:
                    p.wait()
                run.refresh()
                raise _interrupted(stop.signum, run)
            time.sleep(0.5)
            run.refresh()
            reporter.advance(run.saved_rows - shown, 0)
            shown = run.saved_rows
        run.refresh()
        for i, p in enumerate(procs):
            if p.returncode not in (0, 1):
                logs[i].seek(0)
                last = (logs[i].read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
                raise UsageError(f"scoring process {i + 1} of {n} failed (exit code {p.returncode}): {last}")


def _score_to_stream(scorer, sources: Sources, schema: pa.Schema, make_reporter: MakeReporter) -> Outcome:  # type: ignore[no-untyped-def]
    outcome = Outcome()
    with Sink("-", schema, scorer.provenance()) as sink, make_reporter(sources.count()) as reporter:
        for _, rows in scorer.iter_batches(sources):
            sink.write(rows)
            errors = sum(row["error"] is not None for row in rows)
            outcome.rows += len(rows)
            outcome.errors += errors
            reporter.advance(len(rows), errors)
    outcome.ignored = len(sources.ignored)
    return outcome


class _Counted:
    """Iterate the sources once, remembering how many items there were (to check the shards hold them all)."""

    def __init__(self, items: Iterable[SourceItem]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[SourceItem]:
        for item in self.items:
            self.count = item.index + 1
            yield item


class Previous:
    """An earlier scores file for ``--incremental``: its rows by path, reused where a file is unchanged."""

    def __init__(self, path: str, tasks: Sequence[Task]) -> None:
        if not (Path(path).is_file() and is_scores_file(path)):
            raise UsageError(f"--incremental {path!r}: not a scores file written by perceptscore score")
        table = read_scores(path)
        self.columns = [c for t in tasks for c in t.columns]
        needed = ["path", "error", "file_size", "file_mtime_ns", *self.columns]
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise UsageError(
                f"--incremental {path!r} lacks column(s) {', '.join(missing)}: it was written for other "
                "tasks or by an older perceptscore; score without --incremental once"
            )
        self.rows = {row["path"]: row for row in table.select(needed).to_pylist() if row["error"] is None}
        self.skipped = 0

    def reusable(self, item: SourceItem) -> dict[str, Any] | None:
        old = self.rows.get(item.path)
        if old is None or item.error:
            return None
        try:
            st = os.stat(item.path)
        except OSError:
            return None
        if (st.st_size, st.st_mtime_ns) != (old["file_size"], old["file_mtime_ns"]):
            return None
        return {"path": item.path, **{c: old[c] for c in self.columns}, "error": None,
                "file_size": st.st_size, "file_mtime_ns": st.st_mtime_ns} | item.extras  # fmt: skip

    def merge(
        self, items: Iterable[SourceItem], score: Callable
    ) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:  # type: ignore[type-arg]
        """Reused rows and freshly scored batches, interleaved back into input order."""
        reused: deque[tuple[int, dict[str, Any]]] = deque()

        def to_score() -> Iterator[SourceItem]:
            for item in items:
                row = self.reusable(item)
                if row is None:
                    yield item
                else:
                    reused.append((item.index, row))
                    self.skipped += 1

        for indices, rows in score(to_score()):
            while reused and reused[0][0] < indices[0]:
                index, row = reused.popleft()
                yield [index], [row]
            yield indices, rows
        while reused:
            index, row = reused.popleft()
            yield [index], [row]


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
        for _, batch in scorer.iter_batches(sources):
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
        sink.write(table)


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
