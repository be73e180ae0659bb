"""Remote objects fetched ahead of decoding, many at once: one object's latency would otherwise bound the
run (50 ms a request is 20 files a second). Items keep their order; a ``RemoteFile`` becomes an
``InMemory`` holding its bytes, or an error row saying why it could not be fetched.

Bounded three ways, by the run's ``Limits``: objects in flight (``remote_concurrency``); bytes
(``prefetch_bytes``, ``PERCEPTSCORE_PREFETCH_BYTES``, 256 MiB), counting what is fetched and not yet
handed on *and* what fetches in flight will hold: a fetch reserves an object's size before reading it, or a
chunk ahead of what it has read when the server sends no length, and waits for room (``_Budget``); only
the object the run waits for next may go past the bound (by one object, at most ``max_file_bytes``), so
it never waits on the objects behind it. And time: an object not fetched by its deadline
(``Limits.deadline_seconds``: tries and the pauses between) is an error row, and the run goes on without
waiting for it. The fetching threads are daemons: stopping a run (Ctrl-C) never waits for a fetch in
flight.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Any

from perceptscore.errors import DecodeError
from perceptscore.items import Item
from perceptscore.limits import Limits, current
from perceptscore.locators import InMemory, RemoteFile, Unavailable
from perceptscore.remote import Stopped, stop_requested

__all__ = ["Stopped", "prefetched", "stop_requested"]  # the stop flag lives in ``remote`` (streams use it)
_SLICE_SECONDS = 0.25


class _Ticket:
    """One item's share of the budget."""

    __slots__ = ("closed", "held")

    def __init__(self) -> None:
        self.held, self.closed = 0, False


class _Budget:
    """Bytes held by the items ahead, reserved before they are read. A fetch waits while the total would
    pass the limit, unless its item is the one the run waits for (``head``): that one always goes on,
    so the bytes behind it (which wait for it to be handed on) can never hold it up."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.head: _Ticket | None = None
        self._changed = threading.Condition()

    def reserve(self, ticket: _Ticket, total: int, deadline: float) -> None:
        """Make ``ticket`` hold ``total`` bytes, waiting for room (a stop or the deadline ends the wait)."""
        with self._changed:
            while ticket.held < total:
                if ticket.closed:  # its item was given up on (its deadline): no more bytes for it
                    raise DecodeError("given up on")
                more = total - ticket.held
                if ticket is self.head or self.used + more <= self.limit:
                    self.used += more
                    ticket.held = total
                    return
                if stop_requested.is_set():
                    raise Stopped("stopped while waiting for a remote object")
                if time.monotonic() > deadline:
                    raise DecodeError("timed out waiting for room under PERCEPTSCORE_PREFETCH_BYTES")
                self._changed.wait(_SLICE_SECONDS)

    def settle(self, ticket: _Ticket, total: int) -> None:
        """``ticket`` holds ``total`` bytes from now on (what was fetched)."""
        with self._changed:
            if ticket.closed:
                return
            self.used += total - ticket.held
            ticket.held = total
            self._changed.notify_all()

    def close(self, ticket: _Ticket) -> None:
        """The item is handed on (the consumer holds its bytes now), or given up on: its share is free,
        and a fetch still running for it cannot take any more."""
        self.settle(ticket, 0)
        with self._changed:
            ticket.closed = True

    def wait_for(self, ticket: _Ticket) -> None:
        with self._changed:
            self.head = ticket
            self._changed.notify_all()


def _fetch(locator: RemoteFile, budget: _Budget, ticket: _Ticket, deadline: float) -> Any:
    """The object's bytes, reserved in ``budget`` as they are read; the reservation shrinks to what was
    fetched (nothing, when it failed)."""
    try:
        data, stat = locator.fetch(deadline, lambda total: budget.reserve(ticket, total, deadline))
    except BaseException:
        budget.settle(ticket, 0)
        raise
    budget.settle(ticket, len(data))
    return data, stat


class _DaemonPool:
    """Threads that never hold up the interpreter's exit (``ThreadPoolExecutor`` joins its threads at exit,
    so a fetch stuck on a dead host would keep a stopped run alive)."""

    def __init__(self, threads: int) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            call, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)
            # an idle thread must not keep the last object's bytes alive (through its future) after the
            # consumer let go of them: one copy, held by whoever holds the item
            del job, call, future

    def submit(self, call: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self.jobs.put((call, future))
        return future

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)


Ahead = deque[tuple[Item, Future[Any] | None, float, _Ticket]]


def prefetched(items: Iterable[Item], limits: Limits | None = None) -> Iterator[Item]:
    """``items`` in order, remote ones fetched ahead (see the module's docstring) under ``limits`` (the
    run's; by default this process's). No thread is started until a remote item comes."""
    limits = limits or current()
    pool: _DaemonPool | None = None
    ahead: Ahead = deque()
    budget, in_flight = _Budget(limits.prefetch_bytes), limits.remote_concurrency
    seconds = limits.deadline_seconds
    source = iter(items)
    exhausted = False
    try:
        while True:
            while not exhausted and _room(ahead, in_flight, budget):
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                ticket = _Ticket()
                if isinstance(item.locator, RemoteFile) and not item.error:
                    pool = pool or _DaemonPool(in_flight)
                    deadline = time.monotonic() + seconds
                    call = functools.partial(_fetch, item.locator, budget, ticket, deadline)
                    ahead.append((item, pool.submit(call), deadline, ticket))
                else:
                    budget.settle(ticket, _held(item))  # bytes already in memory (a tar member) count too
                    ahead.append((item, None, 0.0, ticket))
            if not ahead:
                return
            item, future, deadline, ticket = ahead.popleft()
            budget.wait_for(ticket)
            try:
                yield _fetched(item, future, deadline, seconds) if future is not None else item
            finally:
                budget.close(ticket)  # handed on: the consumer holds it now
    finally:
        for _, future, _, ticket in ahead:
            budget.close(ticket)
            if future is not None:
                future.cancel()
        if pool is not None:
            pool.close()


def _room(ahead: Ahead, in_flight: int, budget: _Budget) -> bool:
    """Whether to take another item: fewer fetches running than allowed, room in the byte budget, and a
    bounded look-ahead (items behind a slow one wait in order)."""
    running = sum(1 for _, f, _, _ in ahead if f is not None and not f.done())
    return running < in_flight and budget.used < budget.limit and len(ahead) < 4 * in_flight


def _held(item: Item) -> int:
    """Bytes an item holds already (a tar member): they count against the limit like fetched ones."""
    return len(item.locator.data) if isinstance(item.locator, InMemory) else 0


def _fetched(item: Item, future: Future[Any], deadline: float, seconds: float) -> Item:
    while True:  # in slices: a stop asked meanwhile ends the wait
        if stop_requested.is_set():
            raise Stopped("stopped while waiting for a remote object")
        left = deadline - time.monotonic()
        try:
            data, stat = future.result(timeout=max(0.0, min(left, _SLICE_SECONDS)))
            break
        except FutureTimeout:
            if left > _SLICE_SECONDS:
                continue
            future.cancel()
            reason = f"timed out after {seconds:.0f} s"
            return replace(item, locator=Unavailable(item.path, reason))
        except DecodeError as exc:
            if stop_requested.is_set():  # the fetch gave up because of the stop: not this row's failure
                raise Stopped("stopped while waiting for a remote object") from None
            return replace(item, locator=Unavailable(item.path, str(exc)))
    return replace(item, locator=InMemory(item.path, data, stat))
