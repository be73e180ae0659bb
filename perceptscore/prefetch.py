"""Remote objects fetched ahead of decoding, many at once: one object's latency would otherwise bound the
run (50 ms a request is 20 files a second). Items keep their order; a ``RemoteFile`` becomes an
``InMemory`` holding its bytes, or an error row saying why it could not be fetched.

Bounded three ways: objects in flight (``remote.concurrency()``), bytes fetched and not yet handed on
(``PERCEPTSCORE_PREFETCH_BYTES``, 256 MiB: at most that plus the objects in flight are held), and time: an
object not fetched by its deadline (every try's timeout, and the pauses between) is an error row, and the run
goes on without waiting for it. The fetching threads are daemons: stopping a run (Ctrl-C) never waits for a
fetch in flight.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Any

from perceptscore import remote
from perceptscore.errors import DecodeError, UsageError
from perceptscore.locators import InMemory, RemoteFile, Unavailable
from perceptscore.sources import Item


class Stopped(UsageError):
    """A stop was asked (SIGINT/SIGTERM) while waiting for an object: the run ends now, with the rows
    scored so far saved, instead of waiting out the object's deadline. Nothing is recorded for it."""


# Set by ``runs.StopOnSignal`` on the first SIGINT/SIGTERM: a wait for a fetch ends at once.
stop_requested = threading.Event()
_SLICE_SECONDS = 0.25


def held_bytes() -> int:
    return int(os.environ.get("PERCEPTSCORE_PREFETCH_BYTES", str(256 << 20)))


def deadline_seconds() -> float:
    """How long one object may take, all tries together (with the backoff pauses between them)."""
    return remote.timeout() * remote.tries() + 15.0


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

    def submit(self, call: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self.jobs.put((call, future))
        return future

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)


def prefetched(items: Iterable[Item]) -> Iterator[Item]:
    """``items`` in order, remote ones fetched ahead (see the module's docstring). No thread is started
    until a remote item comes."""
    pool: _DaemonPool | None = None
    ahead: deque[tuple[Item, Future[Any] | None, float]] = deque()
    limit, in_flight = held_bytes(), remote.concurrency()
    source = iter(items)
    exhausted = False
    try:
        while True:
            while not exhausted and _room(ahead, in_flight, limit):
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                if isinstance(item.locator, RemoteFile) and not item.error:
                    pool = pool or _DaemonPool(in_flight)
                    deadline = time.monotonic() + deadline_seconds()
                    locator = item.locator
                    ahead.append((item, pool.submit(lambda loc=locator, d=deadline: loc.fetch(d)), deadline))
                else:
                    ahead.append((item, None, 0.0))
            if not ahead:
                return
            item, future, deadline = ahead.popleft()
            yield _fetched(item, future, deadline) if future is not None else item
    finally:
        for _, future, _ in ahead:
            if future is not None:
                future.cancel()
        if pool is not None:
            pool.close()


def _room(ahead: deque[tuple[Item, Future[Any] | None, float]], in_flight: int, limit: int) -> bool:
    """Whether to take another item: fewer fetches running than allowed, the fetched bytes waiting under
    the limit, and a bounded look-ahead (items behind a slow one wait in order)."""
    running = sum(1 for _, f, _ in ahead if f is not None and not f.done())
    held = sum(_size(f) if f is not None else _held(item) for item, f, _ in ahead)
    return running < in_flight and held < limit and len(ahead) < 4 * in_flight


def _held(item: Item) -> int:
    """Bytes an item holds already (a tar member): they count against the limit like fetched ones."""
    return len(item.locator.data) if isinstance(item.locator, InMemory) else 0


def _size(future: Future[Any] | None) -> int:
    if future is None or not future.done() or future.cancelled() or future.exception() is not None:
        return 0
    return len(future.result()[0])


def _fetched(item: Item, future: Future[Any], deadline: float) -> Item:
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
            reason = f"timed out after {deadline_seconds():.0f} s"
            return replace(item, locator=Unavailable(item.path, reason))
        except DecodeError as exc:
            return replace(item, locator=Unavailable(item.path, str(exc)))
    return replace(item, locator=InMemory(item.path, data, stat))
