"""What to score: files, directories, globs, ``@lists``, stdin and parquet/CSV/JSONL manifests, streamed.

Every input is checked before anything is scored (a typo fails in a second with exit code 2, not after an
hour); the items themselves are produced lazily, so a manifest of millions of rows is never held whole.

Paths in the output are the paths used to open the files: as typed for command-line inputs, joined to
the manifest's folder for relative manifest rows. Scores files (written by ``perceptscore score``) hold
such paths already, so their relative paths are taken as relative to the working directory.
"""

from __future__ import annotations

import glob
import os
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from perceptscore.columns import PATH
from perceptscore.errors import UsageError
from perceptscore.formats import FORMATS, format_of, is_scores_file, restore_formulas
from perceptscore.images import IMAGE_EXTENSIONS, looks_like_image
from perceptscore.locators import Locator, locate

MANIFEST_SUFFIXES = tuple(FORMATS)  # every table format is also read as a manifest


@dataclass(frozen=True)
class Item:
    """One row to produce: where its bytes are, the manifest columns to pass through, or why it can't be."""

    index: int
    locator: Locator
    extras: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def path(self) -> str:
        """The ``path`` column's value."""
        return self.locator.uri


def _sniffed_image(path: str) -> bool:
    """A regular file whose first bytes are an image signature (never opens a FIFO or device)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return looks_like_image(f.read(32))
    except OSError:
        return False


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _walk(
    root: str,
    recursive: bool,
    ignored: list[str] | None = None,
    follow_links: bool = False,
    skip: frozenset[str] = frozenset(),
) -> Iterator[str]:
    """Image files below ``root`` in sorted order, depth first; each real folder visited once. A linked
    folder is followed only when it stays under ``root`` (a link to / would walk the whole machine), unless
    ``follow_links``. A file with no extension at all is an image if its first bytes say so. Other files
    are passed over and appended to ``ignored``. Sub-folders whose real path is in ``skip`` are not entered
    (a command's own output folder inside the folder it reads). Iterative: no depth is too deep."""
    inside = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:
            continue  # unreadable, or gone since it was listed
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a second link to a visited folder
            continue
        seen.add((st.st_dev, st.st_ino))
        folders = []
        for entry in entries:
            if _is_folder(entry):
                followed = follow_links or not entry.is_symlink() or _under(entry.path, inside)
                if recursive and followed and (not skip or os.path.realpath(entry.path) not in skip):
                    folders.append(entry.path)
            elif entry.name.startswith("._"):  # macOS AppleDouble metadata files, never images
                _note(ignored, entry.path)
            elif entry.is_symlink() and not follow_links and not _under(entry.path, inside):
                _note(ignored, entry.path)  # a linked file that leads outside the folder walked
            elif _named_image(entry.name) or (
                not os.path.splitext(entry.name)[1] and _sniffed_image(entry.path)
            ):
                yield entry.path
            else:
                _note(ignored, entry.path)
        stack.extend(reversed(folders))


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows links; a dangling one is a file (and its row says so)
    except OSError:
        return False


def _under(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _named_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _note(ignored: list[str] | None, path: str) -> None:
    if ignored is not None:
        ignored.append(path)


class _Manifest:
    """A parquet/CSV/JSONL table with a path column; read in blocks of rows."""

    def __init__(self, path: str, path_column: str) -> None:
        self.path, self.path_column = path, path_column
        self.format = format_of(path)
        assert self.format is not None, path
        try:
            self.is_scores = is_scores_file(path)
            schema = self.format.read_schema(path, [path_column])
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise UsageError(f"manifest {path}: unreadable ({' '.join(str(exc).split())[:200]})") from None
        self.folder = "" if self.is_scores else os.path.dirname(path)
        if path_column not in schema.names:
            found = ", ".join(schema.names) or "none"
            hint = "; choose one with --path-column" if path_column == PATH else ""
            raise UsageError(f"manifest {path} has no column {path_column!r} (columns found: {found}){hint}")
        self.extras = pa.schema([f for f in schema if f.name != PATH])

    def batches(self) -> Iterator[pa.RecordBatch]:
        batches = self.format.read_batches(self.path, [self.path_column])
        if not (self.is_scores and self.format.suffix == ".csv"):
            return batches
        # a CSV perceptscore wrote: its cells that would be formulas carry a quote to take off
        return (b for t in batches for b in restore_formulas(pa.Table.from_batches([t])).to_batches())

    def rows(self) -> Iterator[tuple[str | None, dict[str, Any]]]:
        batches, read = iter(self.batches()), 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:  # a malformed row far down a streamed manifest
                reason = " ".join(str(exc).split())[:200]
                raise UsageError(f"manifest {self.path}: unreadable after row {read} ({reason})") from None
            paths = batch.column(self.path_column).to_pylist()
            extras = batch.select(self.extras.names).to_pylist() if self.extras.names else None
            for i, value in enumerate(paths):
                yield (None if value is None else str(value)), (extras[i] if extras else {})
            read += len(paths)


class Sources:
    """The inputs of one run, validated up front, iterated lazily as ``Item``s in input order.

    ``reserved``: output column names; a manifest column with such a name is passed through as
    ``input_<name>`` instead of being overwritten. ``skip_folders``: real paths of folders a walk does not
    enter below a folder input (``explain``'s output folder); a folder named as an input is still walked.
    """

    def __init__(
        self,
        inputs: Sequence[str],
        recursive: bool = True,
        path_column: str | None = None,
        reserved: Iterable[str] = (),
        stdin: TextIO | None = None,
        follow_links: bool = False,
        skip_folders: Iterable[str] = (),
    ) -> None:
        if not inputs:
            raise UsageError("no inputs given: name image files, folders, globs, @lists, manifests or -")
        self.recursive, self.follow_links = recursive, follow_links
        self.skip = frozenset(os.path.realpath(f) for f in skip_folders)
        self.stdin = stdin if stdin is not None else sys.stdin
        self._plan: list[tuple[str, Any]] = [self._classify(text, path_column or PATH) for text in inputs]
        if sum(kind == "stdin" for kind, _ in self._plan) > 1:
            raise UsageError("'-' (paths on stdin) can be given only once")
        self._rename = {name: f"input_{name}" for name in reserved}
        self.ignored: list[str] = []  # files in folders passed over: not images by name or content
        self.passthrough = self._passthrough_schema()

    @property
    def manifests(self) -> list[_Manifest]:
        return [m for kind, m in self._plan if kind == "manifest"]

    def _classify(self, text: str, path_column: str) -> tuple[str, Any]:
        if text == "-":
            return "stdin", None
        if text.startswith("@"):
            listing = text[1:]
            if not os.path.isfile(listing):
                raise UsageError(f"list file {listing!r} not found")
            return "list", listing
        if os.path.isdir(text):
            return "dir", text
        if os.path.isfile(text):
            if text.lower().endswith(MANIFEST_SUFFIXES):
                return "manifest", _Manifest(text, path_column)
            return "file", text
        if _is_glob(text):
            matches = sorted(glob.iglob(text, recursive=True))
            if not matches:
                raise UsageError(f"no files match {text!r}")
            return "glob", matches
        if os.path.lexists(text):
            return "file", text  # a dangling symlink: an error row, not a usage error
        raise UsageError(f"no such file or directory: {text!r}")

    def _passthrough_schema(self) -> pa.Schema:
        fields: dict[str, pa.Field] = {}
        for manifest in self.manifests:
            for f in manifest.extras:
                name = self._rename.get(f.name, f.name)
                if name in fields and fields[name].type != f.type:
                    raise UsageError(
                        f"manifest column {f.name!r} has type {f.type} in {manifest.path} "
                        f"but {fields[name].type} in an earlier manifest"
                    )
                fields[name] = f.with_name(name)
        return pa.schema(list(fields.values()))

    def _walk(self, folder: str) -> Iterator[str]:
        return _walk(folder, self.recursive, self.ignored, self.follow_links, self.skip)

    def _paths(self) -> Iterator[tuple[str | None, dict[str, Any]]]:
        for kind, value in self._plan:
            if kind == "file":
                yield value, {}
            elif kind == "dir":
                yield from ((p, {}) for p in self._walk(value))
            elif kind == "glob":
                for path in value:
                    if os.path.isdir(path):
                        yield from ((p, {}) for p in self._walk(path))
                    else:
                        yield path, {}
            elif kind == "list":
                folder = os.path.dirname(value)
                with open(value, encoding="utf-8") as lines:
                    yield from ((os.path.join(folder, p), {}) for p in _listed(lines))
            elif kind == "stdin":
                yield from ((p, {}) for p in _listed(self.stdin))
            else:
                manifest: _Manifest = value
                for path, extras in manifest.rows():
                    if path is not None and not os.path.isabs(path):
                        path = os.path.join(manifest.folder, path)
                    yield path, {self._rename.get(k, k): v for k, v in extras.items()}

    def __iter__(self) -> Iterator[Item]:
        self.ignored = []  # counted anew on each pass
        for index, (path, extras) in enumerate(self._paths()):
            if not path:
                yield Item(index, locate(""), extras, error="manifest row has no path")
            else:
                yield Item(index, locate(path), extras)

    def count(self) -> int | None:
        """The number of items when it is cheap to know (no stdin, no JSONL read); else None."""
        if any(kind == "stdin" for kind, _ in self._plan):
            return None
        total = 0
        for kind, value in self._plan:
            if kind == "manifest" and value.format.suffix == ".parquet":
                total += pq.ParquetFile(value.path).metadata.num_rows
            elif kind in ("manifest", "dir", "list"):
                return None
            else:
                total += len(value) if kind == "glob" else 1
        return total


def _listed(lines: Iterable[str]) -> Iterator[str]:
    """Non-blank lines that are not ``#`` comments, stripped of the newline only (names may have spaces)."""
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip() and not line.lstrip().startswith("#"):
            yield line
