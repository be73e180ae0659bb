"""The process engine: several scoring processes, each a local engine with its own model (one per GPU).

This process reads the items once and deals them out in blocks, block k to child k mod n, as Arrow
record batches on each child's stdin; a container (a tar shard, a dataset's row group) is a block of its
own and travels as its description, so the child reads its rows itself and no image's bytes pass through
this process. Each child (``python -m perceptscore.engines.process``) receives the plan as JSON on its
first line (its limits too: a child applies the run's, never its own environment's) and the storage
options on the second, installs both (``limits.install``), scores what it is given in order and writes
its rows to its stdout, each naming its item (``ITEM``; a container's rows with their own values,
``EXTRAS``), one framed Arrow stream per batch (a container's values have their own types). This process
takes block k's rows back from child k mod n (its rows up to the block's last item: the block has ended
when a later item's row, or the child's end, comes), so the output is in input order, and hands each
batch on as it arrives. A thread per child drains its results, so a child never waits on this process's
reading order. With GPUs, child k scores on GPU k and sets it as its current device; the decode workers
are shared out between the children. The children ignore SIGINT and
SIGTERM (a terminal's Ctrl-C or a service manager's stop reaches the whole group): this process decides
when to stop, and ends them.

A child ends itself, with its decode workers, within a second of this process's death however it died
(SIGKILL, OOM killer): it holds the read end of a pipe whose only write end is this process's, and reads
its EOF; on Linux the kernel also signals it (PR_SET_PDEATHSIG). Else it would finish all it was dealt.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import IO, Any

import numpy as np
import pyarrow as pa

from perceptscore import limits, remote
from perceptscore.containers import is_container
from perceptscore.errors import UsageError
from perceptscore.items import ITEM, WIRE_SCHEMA, Item, from_wire_batch, to_wire_batch
from perceptscore.plan import ScoringPlan

_DONE = object()


class ProcessEngine:
    """``processes`` children; blocks of ``block_batches`` batches each (small: a stop, the progress and a
    shard's time limit act within a few batches, as in one process)."""

    name = "process"
    reads_containers = True  # each child reads the containers dealt to it (``containers.description``)

    def __init__(self, processes: int, block_batches: int = 4) -> None:
        self.processes, self.block_batches = processes, block_batches

    def describe(self, plan: ScoringPlan) -> str:
        return f"{self.processes} processes on {plan.device}"

    def child_plans(self, plan: ScoringPlan, gpus: int | None = None) -> list[ScoringPlan]:
        """One GPU each when the plan says "cuda" (as many processes as GPUs at most: ``gpus``, counted
        here if not given); else the same device, sharing the cores between the processes. The decode
        workers are shared out too (a child of N starting them all would put N x the cores' worth of
        decoders on the machine)."""
        n = self.processes
        workers = max(1, plan.workers // n) if plan.workers else 0
        if plan.device == "cuda":
            count = _gpu_count() if gpus is None else gpus
            if n > count:
                raise UsageError(f"--processes {n}: this machine has {count} GPU{'s' * (count != 1)}")
            return [replace(plan.on_device(f"cuda:{i}"), workers=workers) for i in range(n)]
        threads = max(1, (os.cpu_count() or 1) // n) if plan.device == "cpu" else 0
        return [replace(plan.on_device(plan.device, threads), workers=workers) for _ in range(n)]

    def run(self, plan: ScoringPlan, items: Iterable[Item]) -> Iterator[pa.RecordBatch]:
        dealer: _Dealer | None = None
        try:
            with contextlib.ExitStack() as stack:
                children = [
                    stack.enter_context(_Child(p, i, self.processes))
                    for i, p in enumerate(self.child_plans(plan))
                ]
                dealer = _Dealer(items, children, plan.batch_size * self.block_batches)
                stack.callback(dealer.stop)
                while (block := dealer.next_block()) is not None:
                    child, last = block
                    while (batch := children[child].take(last, dealer)) is not None:
                        yield batch
        finally:
            # The children are gone (a write to one fails now): the dealer ends. It must end before this
            # process does: a thread still inside pyarrow's writer when the interpreter finalizes aborts
            # the process (PyGILState_Release), turning a clean stop into exit code 134.
            if dealer is not None:
                dealer.join(10.0)


class _Dealer:
    """The feeder thread: block k of the items to child k mod n, announced in order once sent. However it
    ends (all sent, an input that fails mid-stream, a child gone), every child's input is closed, so each
    finishes what it holds instead of waiting for more."""

    def __init__(self, items: Iterable[Item], children: list[_Child], block_rows: int) -> None:
        self.children, self.block_rows = children, block_rows
        self.blocks: queue.Queue[Any] = queue.Queue()
        self.error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._deal, args=(items,), daemon=True)
        self._thread.start()

    def _deal(self, items: Iterable[Item]) -> None:
        try:
            for k, block in enumerate(_blocks(iter(items), self.block_rows)):
                if self._stopped:
                    break
                child = k % len(self.children)
                self.children[child].send(block)
                self.blocks.put((child, block[-1].index))
        except BrokenPipeError:
            pass  # a child died: its reader reports why
        except BaseException as exc:  # e.g. inputs changed since the run was interrupted: raised in run()
            self.error = exc
        finally:
            for child in self.children:
                child.finish()
            self.blocks.put(_DONE)

    def next_block(self) -> tuple[int, int] | None:
        block = self.blocks.get()
        if block is _DONE:
            if self.error is not None:
                raise self.error
            return None
        return block

    def stop(self) -> None:
        self._stopped = True

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _blocks(items: Iterator[Item], most: int) -> Iterator[list[Item]]:
    """Up to ``most`` items at a time; a container alone (its rows are many: the containers go round the
    children one by one)."""
    block: list[Item] = []
    for item in items:
        if is_container(item.locator):
            if block:
                yield block
            yield [item]
            block = []
            continue
        block.append(item)
        if len(block) == most:
            yield block
            block = []
    if block:
        yield block


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


class _Child:
    def __init__(self, plan: ScoringPlan, number: int, of: int) -> None:
        self.number, self.of = number, of
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        # The child's lifeline: it gets the read end; the write end stays here only (not inheritable), so
        # the child reads EOF the moment this process is gone. A parent-death signal fires when the
        # *thread* that started the child ends: armed only when that is the main thread.
        lifeline, self._lifeline = os.pipe()
        main = threading.current_thread() is threading.main_thread()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "perceptscore.engines.process", str(lifeline), str(os.getpid()),
                 str(int(main))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, pass_fds=(lifeline,),
                start_new_session=True,  # a terminal's Ctrl-C is the parent's to handle
            )  # fmt: skip
        except BaseException:
            os.close(self._lifeline)
            raise
        finally:
            os.close(lifeline)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(plan.to_json().encode() + b"\n")
        # storage options (credentials, maybe) on the pipe, never in argv or the environment
        self.proc.stdin.write(json.dumps(remote.current().options).encode() + b"\n")
        self._writer: pa.RecordBatchStreamWriter | None = pa.ipc.new_stream(self.proc.stdin, WIRE_SCHEMA)
        self._results: queue.Queue[Any] = queue.Queue()
        self._held: pa.RecordBatch | None = None
        self._reader = threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def send(self, items: list[Item]) -> None:
        writer = self._writer
        if writer is None:
            raise BrokenPipeError("the child's input is closed")
        writer.write_batch(to_wire_batch(items))
        assert self.proc.stdin is not None
        self.proc.stdin.flush()

    def finish(self) -> None:
        """Close the child's input (from the dealer's thread or this one, once). The writer is dropped
        here, not left to the interpreter's exit: a pyarrow writer over a Python file destroyed while the
        interpreter finalizes aborts the process (PyGILState_Release), and an exception's traceback can
        keep this object alive until then."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(OSError, ValueError, pa.ArrowException):  # gone already
                writer.close()
            del writer
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()

    def _drain(self, stdout: IO[bytes]) -> None:
        try:
            while (batch := read_frame(stdout)) is not None:
                self._results.put(batch)
        except (pa.ArrowInvalid, OSError):
            pass  # the child died mid-stream: take() reports it
        finally:  # however the reading ended (a MemoryError too), take() must not wait for ever
            self._results.put(_DONE)

    def take(self, last: int, dealer: _Dealer) -> pa.RecordBatch | None:
        """This child's next rows of items up to ``last`` as soon as it has some; None once a later
        item's row has come, or the child has ended (a block's last items may be containers without
        rows: only what comes after them says they have ended)."""
        if self._held is None:
            batch = self._results.get()
            if batch is _DONE:
                self._results.put(_DONE)
                if dealer.error is not None:
                    raise dealer.error
                if self.proc.wait() == 0:
                    return None  # all it was dealt is scored
                raise self._failure()
            self._held = batch
        owners = self._held.column(ITEM).to_numpy()
        mine = int(np.searchsorted(owners, last, side="right"))  # rows come in input order
        if mine == 0:
            return None
        batch = self._held.slice(0, mine)
        self._held = self._held.slice(mine) if self._held.num_rows > mine else None
        return batch

    def _failure(self) -> UsageError:
        code = self.proc.wait()
        if code == 0:
            return UsageError(f"scoring process {self.number + 1} of {self.of} ended before all it was dealt")
        self.log.seek(0)
        last = (self.log.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return UsageError(f"scoring process {self.number + 1} of {self.of} failed (exit code {code}): {last}")

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc: object) -> None:
        # The child's whole session (it leads one): its decode workers hold its stdout too, and the
        # reader thread sees the end of that pipe only when they are gone. A reader still blocked in
        # pyarrow when the interpreter finalizes aborts the process (PyGILState_Release).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        os.close(self._lifeline)
        self.finish()
        self._reader.join(timeout=10)
        self.log.close()


def _end_with_parent(lifeline: int, parent: int, signal_too: bool) -> None:
    """End this child and its decode workers (its process group: it leads its session) as soon as the
    parent is gone: when the lifeline reads EOF (a thread waits on it), or on the parent-death signal
    (Linux), whichever comes first."""

    def end(*_: object) -> None:
        os.killpg(0, signal.SIGKILL)

    def wait_for_eof() -> None:
        with contextlib.suppress(OSError):
            while os.read(lifeline, 64):  # nothing is ever written: only the end of the parent ends it
                pass
        end()

    threading.Thread(target=wait_for_eof, name="perceptscore-lifeline", daemon=True).start()
    if signal_too and sys.platform.startswith("linux"):
        signal.signal(signal.SIGUSR1, end)
        _parent_death_signal(signal.SIGUSR1)
        if os.getppid() != parent:  # it died before the signal was armed
            end()


def _parent_death_signal(signum: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends ``signum`` to this process when its parent thread ends."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum, 0, 0, 0)


def _child_main() -> int:
    """A child: the plan's first line, then item batches on stdin; result batches on stdout."""
    from perceptscore.engines.local import LocalEngine

    stdin = sys.stdin.buffer
    plan = ScoringPlan.from_json(stdin.readline().decode())
    remote.configure(remote.Settings(json.loads(stdin.readline())))  # remembered, to redact them
    limits.install(plan.limits)  # before anything reads a limit: the run's, not this environment's

    if plan.device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(torch.device(plan.device))  # else each child opens a context on GPU 0 too
    plain: deque[int] = deque()  # the plain items fed, whose rows come one each, in order

    def items() -> Iterator[Item]:
        with pa.ipc.open_stream(stdin) as reader:
            for batch in reader:
                for item in from_wire_batch(batch):
                    if not is_container(item.locator):
                        plain.append(item.index)
                    yield item

    out = sys.stdout.buffer
    for batch in LocalEngine().run(plan, items()):
        if ITEM not in batch.schema.names:  # plain items' rows: name them
            owners = [plain.popleft() for _ in range(batch.num_rows)]
            batch = batch.append_column(ITEM, pa.array(owners, pa.int64()))
        write_frame(out, batch)
    return 0


def write_frame(out: IO[bytes], batch: pa.RecordBatch) -> None:
    """One batch as a framed Arrow stream of its own (its length, then the stream): batches of containers
    carry their values' types, which a single stream's one schema could not."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    data = sink.getvalue()
    out.write(len(data).to_bytes(8, "little"))
    out.write(data)
    out.flush()


def read_frame(stream: IO[bytes]) -> pa.RecordBatch | None:
    """The next framed batch; None at the end. A frame cut short (its writer died) raises ``OSError``."""
    head = stream.read(8)
    if not head:
        return None
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    data = stream.read(size) if size >= 0 else b""
    if size < 0 or len(data) != size:
        raise OSError("a result cut short")
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        return reader.read_next_batch()


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the parent decides when to stop, and ends its children
    if len(sys.argv) == 4:  # lifeline fd, parent pid, whether the parent's signal can be armed
        _end_with_parent(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")
    from perceptscore.errors import PerceptScoreError

    try:
        sys.exit(_child_main())
    except PerceptScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
