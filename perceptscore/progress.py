"""Progress for long runs: a Rich bar on a terminal, plain periodic log lines otherwise (cron, CI, pipes)."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)


class Reporter:
    """Counts files and errors; shows them live on a TTY or as a log line every ``interval`` seconds."""

    def __init__(
        self, console: Console, total: int | None, interval: float = 30.0, label: str = "scoring"
    ) -> None:
        self.console, self.total, self.interval, self.label = console, total, interval, label
        self.files = self.errors = 0
        self.start = self._last_log = time.monotonic()
        self._bar: Progress | None = None
        if console.is_terminal:
            columns = [SpinnerColumn(), TextColumn("{task.description}", style="bold", markup=False)]
            columns += [BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()] if total else []
            columns += [
                TextColumn("{task.completed} files" if not total else ""),
                TextColumn("{task.fields[rate]}"),
            ]
            columns += [TextColumn("{task.fields[errors]}", style="red", markup=False)]
            self._bar = Progress(*columns, console=console, transient=False)
            self._task = self._bar.add_task(label, total=total, rate="", errors="")

    @property
    def rate(self) -> float:
        return self.files / max(time.monotonic() - self.start, 1e-9)

    def advance(self, files: int, errors: int) -> None:
        self.files += files
        self.errors += errors
        if self._bar is not None:
            errors_text = f"{self.errors} error{'s' if self.errors != 1 else ''}" if self.errors else ""
            self._bar.update(
                self._task, completed=self.files, rate=f"{self.rate:.1f} files/s", errors=errors_text
            )
        elif time.monotonic() - self._last_log >= self.interval:
            self._last_log = time.monotonic()
            self.console.print(self.line(), highlight=False)

    def line(self) -> str:
        of = f"/{self.total}" if self.total else ""
        return f"{self.label}: {self.files}{of} files, {self.rate:.2f} files/s, {self.errors} errors"

    def __enter__(self) -> Reporter:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
