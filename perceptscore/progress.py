"""Progress for long runs: a Rich bar on a terminal, plain timestamped log lines otherwise (cron, CI, pipes).

A folder's size is not known before it is walked: as rclone does, the files are counted on a thread of
their own while scoring starts, the bar shows "found so far" and gets its total and ETA the moment the walk
ends. Before the first row, the bar says what the wait is for (loading weights, and how large they are).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn


class Reporter:
    """Counts files and errors; shows them live on a TTY or as a log line every ``interval`` seconds.
    ``quiet``: shows nothing at all (``-q``: errors only, and those are not the reporter's)."""

    def __init__(
        self,
        console: Console,
        total: int | None,
        interval: float = 30.0,
        label: str = "scoring",
        quiet: bool = False,
    ) -> None:
        self.console, self.total, self.interval, self.label = console, total, interval, label
        self.files = self.errors = 0
        self.found: int | None = None  # files counted so far by a walk still going on
        self.start = self._last_log = time.monotonic()
        self._walk_done = threading.Event()
        self._bar: Progress | None = None
        self._quiet = quiet
        if console.is_terminal and not quiet:
            columns = [
                SpinnerColumn(),
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(),
                TextColumn("{task.fields[done]}", markup=False),
                TimeRemainingColumn(),
                TextColumn("{task.fields[rate]}", markup=False),
                TextColumn("{task.fields[errors]}", style="red", markup=False),
            ]
            self._bar = Progress(*columns, console=console, transient=False)
            self._task = self._bar.add_task(label, total=total, done=self._done(), rate="", errors="")

    # ---- what the run tells it ------------------------------------------------------------------------
    def phase(self, description: str) -> None:
        """What the run waits for before its first row (``loading weights (1.2 GB)``), on the bar; the
        first row turns the description back into the label. Off a terminal: nothing (a log has a line
        per interval, and a cron mail none it does not need)."""
        if self._bar is not None:
            self._bar.update(self._task, description=description)

    def count_in_background(self, counts: Iterator[int] | None) -> None:
        """Take the total from ``counts`` (a running count, its last value the total) on a thread, while
        the run goes on; None: the total stays unknown."""
        if counts is None or self.total is not None or (self._bar is None and self._silent()):
            return  # nothing would show the total: no second walk of the folders
        threading.Thread(target=self._count, args=(counts,), name="perceptscore-count", daemon=True).start()

    def _count(self, counts: Iterator[int]) -> None:
        try:
            for found in counts:
                if self._walk_done.is_set():  # the run ended first: stop walking
                    return
                self.found = found
                self._refresh()
            self.total = self.found or 0
            self.found = None
            self._refresh()
        except Exception:  # a folder gone under the count: the run says so; the bar just has no total
            self.found = None
        finally:
            if hasattr(counts, "close"):
                counts.close()  # type: ignore[attr-defined]

    def advance(self, files: int, errors: int) -> None:
        first = self.files == 0 and files > 0
        self.files += files
        self.errors += errors
        if self._bar is not None:
            if first:
                self._bar.update(self._task, description=self.label)
            self._refresh()
        elif not self._quiet and time.monotonic() - self._last_log >= self.interval:
            self._last_log = time.monotonic()
            self.console.print(self.line(), highlight=False, soft_wrap=True)  # a log line is never wrapped

    def _silent(self) -> bool:
        return self._quiet or self.interval == float("inf")

    # ---- what it shows --------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        return self.files / max(time.monotonic() - self.start, 1e-9)

    def eta(self) -> float | None:
        """Seconds left at the rate so far, when the total is known and a file is done."""
        if not self.total or not self.files:
            return None
        return max(self.total - self.files, 0) / max(self.rate, 1e-9)

    def _done(self) -> str:
        if self.total is not None:
            return f"{self.files}/{self.total} files"
        if self.found is not None:
            return f"{self.files}/{self.found}+ files (counting)"
        return f"{self.files} files"

    def _refresh(self) -> None:
        if self._bar is None:
            return
        errors = f"{self.errors} error{'s' if self.errors != 1 else ''}" if self.errors else ""
        self._bar.update(
            self._task, total=self.total, completed=self.files, done=self._done(),
            rate=f"{self.rate:.1f} files/s" if self.files else "", errors=errors,
        )  # fmt: skip

    def line(self) -> str:
        """One log line: when, how far, how fast, how long to go."""
        percent = f" ({100 * self.files / self.total:.0f}%)" if self.total else ""
        eta = self.eta()
        left = f", ETA {_duration(eta)}" if eta is not None else ""
        return (
            f"{_now()} {self.label}: {self._done()}{percent}, {self.rate:.2f} files/s{left}, "
            f"{self.errors} errors"
        )

    def __enter__(self) -> Reporter:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._walk_done.set()
        if self._bar is not None:
            self._bar.stop()


def _now() -> str:
    """Local time with its offset, to the second: what a log reader lines up with other logs."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def weights_phase(sizes: list[int]) -> str:
    """``loading weights (1.2 GB)``: what a first row waits for."""
    total = sum(sizes)
    size = f"{total / 1e9:.1f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"
    return f"loading weights ({size})"
