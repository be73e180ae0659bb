"""What an output may replace without ``--overwrite``: perceptscore's own earlier output of the same kind,
and nothing else. A cron job re-running its command over its own output never needs the flag; a typo that
names the user's ``mydata.csv``, or a run that would drop the memorability column an earlier run wrote,
stops with one line before any work starts.

How a file is known to be ours, by kind:
- scores (.csv/.parquet/.jsonl): its provenance (parquet metadata or the ``.meta.json`` sidecar);
- report (.html): the ``<meta name="generator" content="perceptscore ...">`` the template writes;
- heatmap (.png): the ``Software: perceptscore`` text chunk explain writes (its ``.npy`` goes with it);
- list (.txt/.lst, a plain list that cannot carry a mark): a hidden ``.<name>.perceptscore`` record of
  the sha256 of what was written, so a list the user has since edited is not ours any more.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from perceptscore._text import shown
from perceptscore.columns import PATH
from perceptscore.errors import PerceptScoreError, UsageError
from perceptscore.formats import format_of, is_scores_file, read_columns, read_provenance
from perceptscore.parts import is_scores_folder
from perceptscore.sinks import write_atomic

Kind = Literal["scores", "report", "heatmap", "list"]
PNG_SOFTWARE = "perceptscore"  # the PNG text chunk ``Software`` explain writes into its heatmaps
_HEAD_BYTES = 64 * 1024


def refuse_replacing(
    out: str | os.PathLike[str], kind: Kind, overwrite: bool, option: str = "-o", named: str | None = None
) -> None:
    """Refuse (one line) to replace an existing ``out`` that perceptscore did not write as a ``kind``
    (a link is judged by what it points to: its target is what would be written). ``named``: how the
    user named it, where ``out`` is a local copy (of an object in a store)."""
    path = Path(out)
    if overwrite or str(out) == "-" or not os.path.exists(path):
        return
    if (path.is_file() or (kind == "scores" and is_scores_folder(path))) and written_by_us(path, kind):
        return  # ours (a folder output too: it is replaced as a whole, ``parts.swap``)
    what = "is a folder" if path.is_dir() else "was not written by perceptscore"
    raise UsageError(
        f"{option} {shown(named or str(out))} exists and {what}: pass --overwrite to replace it, or "
        "choose another output"
    )


def refuse_losing_tasks(out: str, tasks: Sequence[str], overwrite: bool, named: str | None = None) -> None:
    """A scores file holding tasks this run would not write (``-t quality`` over a file that also has
    memorability) is replaced only with ``--overwrite``: the columns would be lost."""
    if overwrite or out == "-" or not (os.path.isfile(out) or is_scores_folder(out)):
        return
    if not written_by_us(Path(out), "scores"):
        return
    earlier = read_provenance(out).get("tasks")
    lost = [t for t in earlier if t not in tasks] if isinstance(earlier, dict) else []
    if lost:
        keep = ",".join([*tasks, *lost])
        raise UsageError(
            f"-o {shown(named or out)} holds {', '.join(lost)} scores that this run would not write: "
            f"score -t {keep} to keep them, or pass --overwrite to replace the file"
        )


def written_by_us(path: Path, kind: Kind) -> bool:
    """Whether ``path`` is perceptscore's own output of this kind; anything unreadable is not (a damaged
    output is then replaced with ``--overwrite``, never left to stop every later run)."""
    try:
        if kind == "scores":
            return format_of(path) is not None and is_scores_file(path) and _paths_readable(path)
        if kind == "report":
            with open(path, "rb") as f:
                return b'<meta name="generator" content="perceptscore' in f.read(_HEAD_BYTES)
        if kind == "heatmap":
            return _heatmap_is_ours(path)
        return _list_is_ours(path)
    except (OSError, ValueError, PerceptScoreError):
        return False


def _paths_readable(path: Path) -> bool:
    read_columns(str(path), lambda schema: [PATH])  # raises (one line) when it cannot be read
    return True


def _heatmap_is_ours(path: Path) -> bool:
    if path.suffix.lower() == ".npy":  # the raw map of a heatmap: ours when its picture is
        png = path.with_suffix(".png")
        return png.is_file() and _heatmap_is_ours(png)
    from PIL import Image

    with Image.open(path) as image:
        return str(image.info.get("Software", "")).startswith(PNG_SOFTWARE)


def _record(path: Path) -> Path:
    return path.with_name(f".{path.name}.perceptscore")


def _list_is_ours(path: Path) -> bool:
    path = Path(os.path.realpath(path))  # the record lies beside what was written (see ``mark_list``)
    record = _record(path)
    if not record.is_file() or record.is_symlink():
        return False
    return record.read_text().strip() == _sha256(path)


def mark_list(path: Path) -> None:
    """Record that the list at ``path`` is ours, as written (best effort: without the record, the next run
    asks for ``--overwrite``, nothing worse)."""
    real = Path(os.path.realpath(path))
    with contextlib.suppress(OSError):
        write_atomic(_record(real), f"{_sha256(real)}\n".encode())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- rows dropped because their files are gone ------------------------------------------------------


@dataclass(frozen=True)
class DeleteLimit:
    """``--max-delete``: how many of an existing output's rows a run may drop because their files are no
    longer among the inputs (a disk not mounted, a folder moved), as rsync's ``--max-delete`` bounds
    deletions: a count (``100``), a share of the earlier rows (``50%``, the default) or ``all``."""

    rows: int | None = None
    fraction: float = 0.5

    @classmethod
    def parse(cls, text: str) -> DeleteLimit:
        value = text.strip().lower()
        try:
            if value == "all":
                return cls(fraction=1.0)
            if value.endswith("%"):
                fraction = float(value[:-1]) / 100
                if 0 <= fraction <= 1:
                    return cls(fraction=fraction)
            elif int(value) >= 0:
                return cls(rows=int(value))
        except ValueError:
            pass
        raise UsageError(f"--max-delete {text!r}: give a number of rows (100), a share (50%) or all")

    def allows(self, gone: int, total: int) -> bool:
        if self.rows is not None:
            return gone <= self.rows
        return gone <= self.fraction * total

    def __str__(self) -> str:
        return str(self.rows) if self.rows is not None else f"{self.fraction * 100:g}%"


@dataclass(frozen=True)
class Safeguards:
    """What a ``score`` run may do to an existing output (the defaults protect it)."""

    overwrite: bool = False  # replace a file perceptscore did not write, or lose its task columns
    allow_empty: bool = False  # inputs that resolve to no images write an empty output (else: exit 2)
    max_delete: DeleteLimit = DeleteLimit()  # rows of the earlier output a run may drop (files gone)


def rows_gone(earlier: str, found: Sequence[str], cwd: str) -> tuple[int, int]:
    """How many of the scores file ``earlier``'s rows name a file that this run did not find (``found``:
    the paths of this run's rows whose file was there, relative ones to ``cwd``), and how many rows it
    has. A file listed but missing (a list or manifest on an unmounted disk) counts as gone, as one no
    longer listed does; relative paths are compared as absolute ones, each from the folder its run
    started in, so ``photos/a.jpg`` and ``/home/me/photos/a.jpg`` are one file."""
    old = read_columns(earlier, lambda schema: [PATH]).column(PATH).to_pylist()
    if not old:
        return 0, 0
    earlier_cwd = str(read_provenance(earlier).get("cwd") or cwd)
    present = {_absolute(p, cwd) for p in found}
    return sum(p is None or _absolute(p, earlier_cwd) not in present for p in old), len(old)


def _absolute(path: str, cwd: str) -> str:
    if os.path.isabs(path) or "://" in path:  # URLs and tar members (``tar://m::shard``) as they are
        return path
    return os.path.normpath(os.path.join(cwd, path))


def refuse_dropping(named: str, gone: int, total: int, limit: DeleteLimit) -> None:
    if limit.allows(gone, total):
        return
    raise UsageError(
        f"this run would drop {gone} of the {total} rows of {shown(named)}: their files are missing or no "
        "longer among the inputs (a disk not mounted, a folder moved?); nothing was replaced (the scored "
        f"rows are kept for the next run); pass --max-delete all (or a count or share above {limit}) to "
        "allow it"
    )
