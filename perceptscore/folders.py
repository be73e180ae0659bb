"""The one check, and the one message, for an output whose folder is missing: every command that writes
(score, rank, filter rows and lists, report, explain, weights convert, eval) fails the same way, before
any work."""

from __future__ import annotations

from pathlib import Path

from perceptscore.errors import UsageError


def check_output_folder(out: str | Path) -> None:
    """Refuse an output (a file, or a folder to create) whose parent folder does not exist: creating
    folders on a mistyped path would scatter outputs where nobody looks for them."""
    folder = Path(out).parent
    if not folder.is_dir():
        raise UsageError(f"output folder {str(folder)!r} does not exist")
