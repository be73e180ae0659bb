"""The process engine: several scoring processes, each a local engine with its own model (one per GPU).

This process reads the items once and deals them out in blocks, block k to child k mod n, as Arrow
record batches on each child's stdin; each child (``python -m perceptscore.engines.process``) receives the
plan as JSON on its first line, scores what it is given in order and writes Arrow record batches to its
stdout; this process takes block k's rows back from child k mod n, so the output is in input order. A
thread per child drains its results, so a child never waits on this process's reading order.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import IO, Any

import pyarrow as pa

from perceptscore.columns import core_schema
from perceptscore.errors import UsageError
from perceptscore.locators import locate
from perceptscore.plan import ScoringPlan
from perceptscore.sources import Item

ITEM_SCHEMA = pa.schema([("index", pa.int64()), ("uri", pa.string()), ("error", pa.string())])
_DONE = object()


class ProcessEngine:
    def __init__(self, processes: int, block_rows: int = 4096) -> None:
        self.processes, self.block_rows = processes, block_rows

    def describe(self, plan: ScoringPlan) -> str:
        return f"{self.processes} processes on {plan.device}"

    def child_plans(self, plan: ScoringPlan) -> list[ScoringPlan]:
        """One GPU each when the plan says "cuda" (every visible GPU); else the same device, sharing the
        cores between the processes."""
        n = self.processes
        if plan.device == "cuda":
            return [plan.on_device(f"cuda:{i}") for i in range(n)]
        threads = max(1, (os.cpu_count() or 1) // n) if plan.device == "cpu" else 0
        return [plan.on_device(plan.device, threads) for _ in range(n)]

    def run(self, plan: ScoringPlan, items: Iterable[Item]) -> Iterator[pa.RecordBatch]:
        with contextlib.ExitStack() as stack:
            children = [
                stack.enter_context(_Child(p, i, self.processes))
                for i, p in enumerate(self.child_plans(plan))
            ]
            blocks: queue.Queue[Any] = queue.Queue()
            feeder = threading.Thread(
                target=_deal, args=(items, children, self.block_rows, blocks), daemon=True
            )
            feeder.start()
            schema = core_schema(plan.task_specs())
            while (block := blocks.get()) is not _DONE:
                if isinstance(block, BaseException):
                    raise block
                child, rows = block
                yield children[child].take(rows, schema)


def _deal(items: Iterable[Item], children: list[_Child], block_rows: int, blocks: queue.Queue[Any]) -> None:
    """The feeder thread: block k of the items to child k mod n; each block announced on ``blocks``."""
    try:
        stream = iter(items)
        k = 0
        while block := list(islice(stream, block_rows)):
            child = k % len(children)
            blocks.put((child, len(block)))
            children[child].send(block)
            k += 1
        for child in children:
            child.finish()
        blocks.put(_DONE)
    except BrokenPipeError:
        blocks.put(_DONE)  # a child died: its reader reports why
    except BaseException as exc:  # an input that fails mid-stream: raised in the main thread
        blocks.put(exc)


class _Child:
    def __init__(self, plan: ScoringPlan, number: int, of: int) -> None:
        self.number, self.of = number, of
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perceptscore.engines.process"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
        )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(plan.to_json().encode() + b"\n")
        self._writer = pa.ipc.new_stream(self.proc.stdin, ITEM_SCHEMA)
        self._results: queue.Queue[Any] = queue.Queue()
        self._pending: list[pa.RecordBatch] = []
        self._reader = threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def send(self, items: list[Item]) -> None:
        self._writer.write_batch(
            pa.record_batch(
                [[i.index for i in items], [i.path for i in items], [i.error for i in items]],
                schema=ITEM_SCHEMA,
            )
        )
        assert self.proc.stdin is not None
        self.proc.stdin.flush()

    def finish(self) -> None:
        self._writer.close()
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def _drain(self, stdout: IO[bytes]) -> None:
        try:
            with pa.ipc.open_stream(stdout) as reader:
                for batch in reader:
                    self._results.put(batch)
        except (pa.ArrowInvalid, OSError):
            pass  # the child died mid-stream: take() reports it
        self._results.put(_DONE)

    def take(self, rows: int, schema: pa.Schema) -> pa.RecordBatch:
        """The next ``rows`` result rows of this child, as one batch."""
        have = sum(b.num_rows for b in self._pending)
        while have < rows:
            batch = self._results.get()
            if batch is _DONE:
                raise self._failure()
            self._pending.append(batch)
            have += batch.num_rows
        table = pa.Table.from_batches(self._pending, schema=schema)
        taken, rest = table.slice(0, rows), table.slice(rows)
        self._pending = rest.to_batches() if rest.num_rows else []
        return taken.combine_chunks().to_batches()[0]

    def _failure(self) -> UsageError:
        code = self.proc.wait()
        self.log.seek(0)
        last = (self.log.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return UsageError(f"scoring process {self.number + 1} of {self.of} failed (exit code {code}): {last}")

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=5)
        self.log.close()


def _child_main() -> int:
    """A child: the plan's first line, then item batches on stdin; result batches on stdout."""
    from perceptscore.engines.local import LocalEngine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop, and stops its children
    stdin = sys.stdin.buffer
    plan = ScoringPlan.from_json(stdin.readline().decode())

    def items() -> Iterator[Item]:
        with pa.ipc.open_stream(stdin) as reader:
            for batch in reader:
                for index, uri, error in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                    yield Item(index, locate(uri), {}, error)

    writer = pa.ipc.new_stream(sys.stdout.buffer, core_schema(plan.task_specs()))
    for batch in LocalEngine().run(plan, items()):
        writer.write_batch(batch)
        sys.stdout.buffer.flush()
    writer.close()
    return 0


if __name__ == "__main__":
    from perceptscore.errors import PerceptScoreError

    try:
        sys.exit(_child_main())
    except PerceptScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
