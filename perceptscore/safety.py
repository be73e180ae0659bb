"""What a command may write: never over one of its inputs, and a list of paths only where a list belongs.
perceptscore runs unattended over other people's folders; these checks run before any work starts."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from perceptscore.errors import UsageError
from perceptscore.folders import check_output_folder

LIST_SUFFIXES = (".txt", ".lst")
MANIFESTS = (".csv", ".parquet", ".jsonl")


def input_files(inputs: Sequence[str]) -> Iterable[str]:
    """The files named by command-line inputs: files, manifests, ``@lists`` and glob matches (not the
    contents of folders, which are only ever read)."""
    for text in inputs:
        if text == "-":
            continue
        path = text[1:] if text.startswith("@") else text
        if os.path.isfile(path):
            yield path
        elif any(ch in path for ch in "*?["):
            yield from (p for p in glob.iglob(path, recursive=True) if os.path.isfile(p))


def listings(inputs: Sequence[str]) -> Iterable[str]:
    """The manifests and ``@lists`` among the inputs: files that say what to score (a resumed run checks
    they are unchanged)."""
    for text in inputs:
        path = text[1:] if text.startswith("@") else text
        if (text.startswith("@") or Path(path).suffix.lower() in MANIFESTS) and os.path.isfile(path):
            yield path


def refuse_overwriting_an_input(out: str | None, inputs: Sequence[str], allowed: Sequence[str] = ()) -> None:
    """An output that is one of the inputs (the same file, through any link) would destroy it: refused.
    ``allowed``: inputs that may be the output (``--incremental OLD`` with ``-o OLD``)."""
    if not out or out == "-":
        return
    from perceptscore.parts import is_scores_folder

    inside = os.path.abspath(out)
    for text in inputs:  # a folder of parts: nothing may be written among them (readers take every part)
        if is_scores_folder(text) and inside.startswith(os.path.abspath(text).rstrip(os.sep) + os.sep):
            raise UsageError(f"output {out!r} is inside the input {text!r}: choose another output")
    if not os.path.exists(out):
        return
    exempt = [a for a in allowed if os.path.exists(a) and os.path.samefile(a, out)]
    for path in input_files(inputs):
        if os.path.samefile(path, out) and not exempt:
            raise UsageError(
                f"output {out!r} is the input {path!r}: refusing to overwrite an input; choose another output"
            )


def check_list_output(out: str) -> None:
    """A list of paths goes to stdout (``-``) or a ``.txt``/``.lst`` file, never over anything else (a
    photo named by mistake, say)."""
    if out == "-":
        return
    if Path(out).suffix.lower() not in LIST_SUFFIXES:
        raise UsageError(
            f"-o {out!r}: a list of paths is written to a .txt or .lst file, or - for stdout "
            "(rows: .csv, .parquet or .jsonl)"
        )
    if os.path.isdir(out):
        raise UsageError(f"-o {out!r} is a folder")
    check_output_folder(out)
