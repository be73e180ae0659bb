"""Input kinds: one class per kind of input, and the registry that says which kind an input text is.

Each class claims an input text (or URL) or declines (``claim``); ``REGISTRY`` tries them in order, so
a new input kind is one class and one line there. A claimed input knows its rows (``rows``: (path or
locator, passthrough values) in input order), whether it is cheap to count (``count``) or can be
counted while the run reads it (``countable``, ``counting``), whether it gives tar rows (``shard`` and
``key`` columns) and which passthrough columns it brings. ``Context`` is what every kind reads of the
run's settings (recursion, links, renames, stdin ...) and where a folder walk notes the files passed over.

Claims that look at the network or the disk (a remote table's copy, a glob's matches, a URL's info) go
through the context, which does each once per input, however many kinds ask.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from perceptscore import remote, shards, tables
from perceptscore.columns import ERROR, PATH
from perceptscore.containers import ShardRows, TableRows
from perceptscore.errors import DecodeError, UsageError
from perceptscore.formats import FORMATS, format_of, is_scores_file, restore_formulas
from perceptscore.images import IMAGE_EXTENSIONS, looks_like_image
from perceptscore.locators import TAR_SCHEME, Locator, RemoteFile, Unavailable, member_uri

MANIFEST_SUFFIXES = tuple(FORMATS)  # every table format is also read as a manifest

# ---- folders: walked for images ------------------------------------------------------------------------


def _sniffed_image(path: str) -> bool:
    """A regular file whose first bytes are an image signature (never opens a FIFO or device)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return looks_like_image(f.read(32))
    except OSError:
        return False


def is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def walk(
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
            elif named_image(entry.name) or (
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


def named_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _note(ignored: list[str] | None, path: str) -> None:
    if ignored is not None:
        ignored.append(path)


# ---- tables and lists of paths: manifests, @lists, stdin ------------------------------------------------


class ManifestTable:
    """A parquet/CSV/JSONL table with a path column; read in blocks of rows. ``named``: what the user
    called it (a URL, when the table was downloaded to ``path``). ``drop``: columns not passed through."""

    def __init__(
        self, path: str, path_column: str, named: str | None = None, drop: Iterable[str] = ()
    ) -> None:
        self.path, self.path_column, self.named = path, path_column, named or path
        # read as text in CSV: a tar key "00000" is no number (a scores file's own shard/key columns)
        self._strings = [path_column, shards.SHARD, shards.KEY]
        self.format = format_of(path)
        shown_as = remote.without_secrets(self.named)
        assert self.format is not None, path
        try:
            if self.format.suffix == ".jsonl":  # before pyarrow parses it: its parser recurses per level
                refuse_deep_lines(path, shown_as)
            self.is_scores = is_scores_file(path)
            schema = self.format.read_schema(path, self._strings)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise UsageError(
                f"manifest {shown_as}: unreadable ({' '.join(str(exc).split())[:200]})"
            ) from None
        refuse_deep_columns(schema, shown_as)
        if self.is_scores:
            self.folder = ""
        elif remote.is_remote(self.named):
            self.folder = remote.parent(self.named)
        else:
            self.folder = os.path.dirname(path)
        if path_column not in schema.names:
            found = ", ".join(schema.names) or "none"
            hint = "; choose one with --path-column" if path_column == PATH else ""
            raise UsageError(
                f"manifest {shown_as} has no column {path_column!r} (columns found: {found}){hint}"
            )
        dropped = {PATH, *drop}
        self.extras = pa.schema([f for f in schema if f.name not in dropped])

    def resolve(self, path: str) -> str | Locator:
        """A row's path as it is opened: relative ones joined to the manifest's folder. A remote
        manifest's rows are URLs only (``remote_row``)."""
        if remote.is_remote(self.named):
            return remote_row(self.folder, path)
        if remote.scheme(path) is not None or os.path.isabs(path):
            return path
        return os.path.join(self.folder, path)

    def batches(self) -> Iterator[pa.RecordBatch]:
        batches = self.format.read_batches(self.path, self._strings)
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


def joined(folder: str, path: str) -> str | Locator:
    """A list's line as it is opened: relative to the list's folder; a remote list's lines are URLs only."""
    if remote.is_remote(folder):
        return remote_row(folder, path)
    if remote.scheme(path) is not None or os.path.isabs(path):
        return path
    return os.path.join(folder, path)


_NOT_A_URL = "not a URL: a remote manifest or list names URLs, or paths relative to itself"


def remote_row(folder: str, path: str) -> str | Locator:
    """A row of a remote manifest or list: an object-store or HTTP URL, or a path relative to the
    table's folder that stays within its origin (host or bucket). Anything naming this machine (``/etc/x``,
    ``file://``, ``~``, a local shard's members) is refused as an error row: whoever wrote the table could
    otherwise have local files read, stat'ed into the output or copied by ``filter --copy-to``. A scores
    file's relative rows were local paths where it was written: refused too (``folder`` is empty)."""
    if path.startswith(TAR_SCHEME) and "::" in path:  # a member: its shard must pass as a row itself
        name, _, shard = path[len("tar://") :].rpartition("::")
        found = remote_row(folder, shard)
        return member_uri(name, found) if isinstance(found, str) else Unavailable(path, found.reason)
    name = remote.scheme(path)
    if name is not None and name != "file":
        return path  # another host gets no storage options unless it was named on the command line
    if name == "file" or not folder or os.path.isabs(path) or path.startswith(("~", "\\")):
        return Unavailable(path, _NOT_A_URL)
    joined = remote.join(folder, path)
    if joined is None:
        return Unavailable(path, "climbs out of the manifest's host or bucket (../ past its root)")
    return joined


MAX_NESTING = 32  # levels of nested lists/objects a manifest row may hold (its own object counted)
_ESCAPE = re.compile(rb"\\.")  # taken out first, so an escaped quote never ends a string
_NOT_NESTING = bytes(b for b in range(256) if b not in b'{}[]"\n')  # all but what the count needs
_CHUNK = 4 << 20


def refuse_deep_lines(path: str, shown_as: str) -> None:
    """A JSONL manifest nested deeper than ``MAX_NESTING`` on some line is refused (``UsageError``) before
    anything parses it: pyarrow's parser crashes the process at 100,000 levels, and a passthrough value
    thousands deep can't be written or sent to a worker. Read in chunks, so a big manifest is never held."""
    line, rest = 1, b""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            lines, newline, rest = (rest + chunk).rpartition(b"\n")  # whole lines now, the rest later
            if newline:
                line = _check_depth(lines + newline, line, shown_as)
        _check_depth(rest, line, shown_as)


def _check_depth(text: bytes, line: int, shown_as: str) -> int:
    """Refuse ``text``'s first line (numbered from ``line``) that nests too deep; the next line's number."""
    import numpy as np

    marks = np.frombuffer(_ESCAPE.sub(b"", text).translate(None, _NOT_NESTING), np.uint8)
    newline = marks == ord("\n")
    start = np.maximum.accumulate(np.where(newline, np.arange(len(marks)), -1))  # -1: the first line

    def within_line(counts: np.ndarray) -> np.ndarray:
        """A running count restarted at each line (a malformed line can't hide the next one)."""
        running = np.cumsum(counts, dtype=np.int32)
        return running - np.where(start >= 0, running[np.maximum(start, 0)], 0)

    # a bracket inside a string (after an odd number of its line's quotes) doesn't nest
    outside = within_line((marks == ord('"')).astype(np.int32)) % 2 == 0
    nesting = np.zeros(256, np.int32)
    nesting[list(b"{[")], nesting[list(b"}]")] = 1, -1
    step = nesting[marks]
    deep = np.flatnonzero(within_line(step * outside) > MAX_NESTING)
    if len(deep):
        at = line + int(np.count_nonzero(newline[: deep[0]]))
        raise UsageError(
            f"manifest {shown_as}: line {at} nests values over {MAX_NESTING} levels deep; "
            "flatten them, or store them as JSON text"
        )
    return line + int(np.count_nonzero(newline))


def refuse_deep_columns(schema: pa.Schema, shown_as: str) -> None:
    """A parquet (or JSONL) column whose type nests deeper than ``MAX_NESTING`` is refused, as lines are."""
    for column in schema:
        stack, deepest = [(column.type, 2)], 0  # the row's own level counts, as in a JSONL line
        while stack:
            kind, level = stack.pop()
            if kind.num_fields:
                deepest = max(deepest, level)
                stack.extend((kind.field(i).type, level + 1) for i in range(kind.num_fields))
        if deepest > MAX_NESTING:
            raise UsageError(
                f"manifest {shown_as}: column {column.name!r} nests values over {MAX_NESTING} levels deep; "
                "flatten it, or store it as JSON text"
            )


def row_errors(old: ManifestTable) -> Iterator[str | None]:
    """Each row's error of a scores file, in the order ``rows`` gives the rows (its passthrough columns
    leave the error out)."""
    for batch in old.format.read_batches(old.path, [PATH, ERROR]):
        yield from batch.column(ERROR).to_pylist()


def failed_shards(old: ManifestTable) -> set[str]:
    """The shards of a scores file whose own row is an error (unreadable, or broke off)."""
    failed: set[str] = set()
    for batch in old.format.read_batches(old.path, [PATH, ERROR]):
        for path, error in zip(batch.column(PATH).to_pylist(), batch.column(ERROR).to_pylist(), strict=True):
            if error is not None and path and shards.is_shard(path) and not path.startswith("tar://"):
                failed.add(path)
    return failed


def listed(lines: Iterable[str]) -> Iterator[str]:
    """Non-blank lines that are not ``#`` comments, stripped of the newline only (names may have spaces)."""
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip() and not line.lstrip().startswith("#"):
            yield line


# ---- the input kinds and their registry ----------------------------------------------------------------


Row = tuple[str | Locator | None, dict[str, Any]]  # a row's path (None: a manifest row without one), extras


@dataclass
class Context:
    """The settings of one ``Sources`` that its inputs read, and the lookups they share."""

    recursive: bool = True
    follow_links: bool = False
    skip: frozenset[str] = frozenset()  # real paths of folders a walk does not enter
    stdin: TextIO | None = None
    path_column: str | None = None  # as given: one naming a column of bytes is the image column
    image_column: str | None = None
    reserved: list[str] = field(default_factory=list)
    rename: dict[str, str] = field(default_factory=dict)  # output column names -> input_<name>
    tar_columns: dict[str, str] = field(default_factory=dict)
    passthrough: pa.Schema = field(default_factory=lambda: pa.schema([]))
    ignored: list[str] = field(default_factory=list)  # files passed over by walks and listings
    _copies: dict[str, str] = field(default_factory=dict)
    _matches: dict[str, list[str]] = field(default_factory=dict)
    _infos: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def column(self) -> str:
        return self.path_column or PATH

    def asked(self) -> tables.Asked:
        return tables.Asked(self.image_column, self.path_column)

    def local_copy(self, url: str) -> str:
        """A remote table downloaded once, whichever kind asks (dataset, then manifest)."""
        if url not in self._copies:
            self._copies[url] = remote.local_copy(url)
        return self._copies[url]

    def matches(self, pattern: str) -> list[str]:
        if pattern not in self._matches:
            self._matches[pattern] = sorted(glob.iglob(pattern, recursive=True))
        return self._matches[pattern]

    def info(self, url: str) -> dict[str, Any]:
        if url not in self._infos:
            try:
                self._infos[url] = remote.info(url)
            except DecodeError as exc:
                raise UsageError(f"{remote.without_secrets(url)}: {exc}") from None
        return self._infos[url]

    def is_dataset(self, file: str) -> bool:
        """A parquet or arrow file scored from its bytes, not read as a manifest (``tables.is_dataset``);
        a scores file never is (its rows name their images)."""
        if file.lower().endswith(".arrow"):
            return True
        if not remote.is_remote(file) and is_scores_file(file):
            return False
        asked = None if self.column == PATH else self.column
        try:
            with tables.open_table(file) as f:
                schema = pq.read_schema(f)
        except (pa.ArrowException, OSError, ValueError) as exc:
            shown_as = remote.without_secrets(file)
            raise UsageError(
                f"manifest {shown_as}: unreadable ({' '.join(str(exc).split())[:200]})"
            ) from None
        return tables.is_dataset(schema, self.image_column, asked)

    def walk(self, folder: str) -> Iterator[str]:
        return walk(folder, self.recursive, self.ignored, self.follow_links, self.skip)

    def shard(self, shard: str) -> Iterator[Row]:
        """A shard is one item, a container: its members are read where they are decoded."""
        yield ShardRows(shard, tuple(self.tar_columns.items()), self.passthrough), {}

    def named(self, path: str | Locator) -> Iterator[Row]:
        """A path or URL named by a list, stdin or a manifest row: a shard gives its members (a row
        refused already is a locator that says why)."""
        if isinstance(path, str) and shards.is_shard(path) and not path.startswith("tar://"):
            yield from self.shard(path)
        else:
            yield path, {}

    def listing(self, url: str, recursive: bool = True) -> list[tuple[str, dict[str, Any]]]:
        try:
            return list(remote.listing(url, recursive))
        except DecodeError as exc:
            raise UsageError(f"{remote.without_secrets(url)}: cannot list ({exc})") from None

    def remote_objects(self, found: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[Row]:
        for url, about in found:
            if named_image(url):
                yield RemoteFile(url, remote.stat_of(about)), {}
            else:
                self.ignored.append(url)


def local(text: str) -> str | None:
    """An input text as the local path it names; None for stdin, a list or a URL."""
    if text == "-" or text.startswith("@") or remote.is_remote(text):
        return None
    return remote.local_path(text)


def url(text: str) -> str | None:
    """An input text that is a URL of a readable scheme (its origin then trusted, its file system's
    backend checked); None for anything else, ``hf://`` among them (datasets only)."""
    if not remote.is_remote(text) or remote.scheme(text) == "hf":
        return None
    name = remote.scheme(text)
    if name not in remote.READABLE:
        known = ", ".join(f"{s}://" for s in remote.READABLE)
        shown_as = remote.without_secrets(text)
        raise UsageError(f"{shown_as}: unsupported URL scheme {name}:// (known: {known})")
    remote.trust(text)  # named on the command line: its HTTP origin gets the storage options
    remote.filesystem(name)  # a missing backend: the extra to install, now
    return text


def _url_path(text: str) -> str:
    return text.split("?", 1)[0]


class Input:
    """One input of a run. Subclasses set ``kind`` and implement ``claim`` and ``rows``."""

    kind: ClassVar[str]
    passthrough_rank: ClassVar[int] = 0  # manifests' columns come before datasets', then tar rows'
    table: ManifestTable | None = None  # a manifest's table (``Sources.manifests``)

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        """This kind's input for ``text``, or None when ``text`` is not of this kind."""
        raise NotImplementedError

    def rows(self, context: Context) -> Iterator[Row]:
        raise NotImplementedError

    def count(self) -> int | None:
        """The number of rows when it is cheap to know; else None."""
        return None

    def countable(self) -> bool:
        """Whether ``counting`` can count the rows while the run reads them (a second folder walk)."""
        return False

    def counting(self, context: Context, total: int, every: int) -> Iterator[int]:
        """Running totals (``total`` so far plus this input's rows) every ``every`` rows; returns the
        new total. Only for a ``countable`` input."""
        yield from ()
        return total + (self.count() or 0)

    def gives_tar_rows(self) -> bool:
        """Whether the input gives tar rows (then ``shard`` and ``key`` are columns). A manifest or list
        may name shards too: its member rows have those columns only with ``--tar-fields``."""
        return False

    def passthrough(self) -> tuple[str, pa.Schema] | None:
        """(where, columns) this input passes through, if any."""
        return None


@dataclass
class Stdin(Input):
    kind: ClassVar[str] = "stdin"

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        return cls() if text == "-" else None

    def rows(self, context: Context) -> Iterator[Row]:
        for p in listed(context.stdin):
            yield from context.named(p)


@dataclass
class ListFile(Input):
    """``@list.txt``: a path per line, relative ones to the list's folder (a remote list: URLs only)."""

    kind: ClassVar[str] = "list"
    local: str  # where it is read (a remote list's copy)
    named: str

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        if not text.startswith("@"):
            return None
        listing = remote.local_path(text[1:])
        if remote.is_remote(listing):
            return cls(remote.local_copy(listing), listing)
        if not os.path.isfile(listing):
            raise UsageError(f"list file {listing!r} not found")
        return cls(listing, listing)

    def rows(self, context: Context) -> Iterator[Row]:
        named = self.named
        folder = remote.parent(named) if remote.is_remote(named) else os.path.dirname(named)
        with open(self.local, encoding="utf-8") as lines:
            for p in listed(lines):
                yield from context.named(joined(folder, p))


@dataclass
class Dataset(Input):
    """Parquet/arrow files holding the image bytes (a file, a glob of them, a ``save_to_disk`` or
    hub-layout folder, a URL, ``hf://``): a container item per read task."""

    kind: ClassVar[str] = "dataset"
    passthrough_rank: ClassVar[int] = 1
    dataset: tables.Dataset

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        if remote.scheme(text) == "hf":  # huggingface_hub's file system: datasets only
            return cls(tables.hub_dataset(text, context.asked(), context.reserved))
        if (found := url(text)) is not None:
            if not tables.is_table_file(_url_path(found)):
                return None
            copy = context.local_copy(found)  # a dataset too is read from this copy: seekable, on disk
            if not context.is_dataset(copy):
                return None
            return cls(tables.open_files([(found, copy)], found, context.asked(), context.reserved))
        path = local(text)
        if path is None:
            return None
        return cls._local(path, context)

    @classmethod
    def _local(cls, path: str, context: Context) -> Input | None:
        if os.path.isdir(path):
            found = tables.folder_files(path)
            return None if found is None else cls._of(found[1], path, context)
        if os.path.isfile(path):
            dataset = tables.is_table_file(path) and context.is_dataset(path)
            return cls._of([path], path, context) if dataset else None
        if not is_glob(path) or not (matches := context.matches(path)):
            return None  # no match: ``Glob`` says so
        if all(tables.is_table_file(m) and os.path.isfile(m) for m in matches) and context.is_dataset(
            matches[0]
        ):
            return cls._of(matches, path, context)
        return None

    @classmethod
    def _of(cls, files: Sequence[str], named: str, context: Context) -> Dataset:
        asked, reserved = context.asked(), context.reserved
        return cls(tables.open_files([(f, f) for f in files], named, asked, reserved))

    def rows(self, context: Context) -> Iterator[Row]:
        # a container per read task: its rows are read where they are decoded
        for task in self.dataset.read_tasks():
            yield TableRows(self.dataset, task, context.passthrough), {}

    def count(self) -> int | None:
        return self.dataset.count()

    def passthrough(self) -> tuple[str, pa.Schema] | None:
        return self.dataset.named, self.dataset.passthrough


@dataclass
class Manifest(Input):
    """A parquet/CSV/JSONL table of paths (local or by URL); its other columns pass through."""

    kind: ClassVar[str] = "manifest"
    table: ManifestTable

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        if (found := url(text)) is not None:
            path = _url_path(found)
            if shards.is_shard(path):
                return None
            if not (path.lower().endswith(MANIFEST_SUFFIXES) or tables.is_table_file(path)):
                return None
            return cls(ManifestTable(context.local_copy(found), context.column, found))
        path = local(text)
        if path is None or not os.path.isfile(path) or not path.lower().endswith(MANIFEST_SUFFIXES):
            return None
        return cls(ManifestTable(path, context.column))

    def rows(self, context: Context) -> Iterator[Row]:
        for path, extras in self.table.rows():
            renamed = {context.rename.get(k, k): v for k, v in extras.items()}
            if path is None:
                yield None, renamed
                continue
            for found, more in context.named(self.table.resolve(path)):
                yield found, {**more, **renamed}  # the manifest's own columns win

    def count(self) -> int | None:
        if self.table.format.suffix != ".parquet":
            return None
        return pq.ParquetFile(self.table.path).metadata.num_rows

    def countable(self) -> bool:
        return self.table.format.suffix == ".parquet"

    def passthrough(self) -> tuple[str, pa.Schema] | None:
        return self.table.named, self.table.extras


@dataclass
class Shard(Input):
    """A ``.tar`` shard, local or by URL (not looked at until read: a missing one is an error row, and
    a list of a thousand shards costs no thousand requests up front)."""

    kind: ClassVar[str] = "shard"
    shard: str

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        if (found := url(text)) is not None:
            return cls(found) if shards.is_shard(_url_path(found)) else None
        path = local(text)
        if path is None or not os.path.isfile(path) or not shards.is_shard(path):
            return None
        return cls(path)

    def rows(self, context: Context) -> Iterator[Row]:
        return context.shard(self.shard)

    def gives_tar_rows(self) -> bool:
        return True


@dataclass
class Folder(Input):
    """A local folder, walked for images (``walk``)."""

    kind: ClassVar[str] = "dir"
    folder: str

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        path = local(text)
        return cls(path) if path is not None and os.path.isdir(path) else None

    def rows(self, context: Context) -> Iterator[Row]:
        return ((p, {}) for p in context.walk(self.folder))

    def countable(self) -> bool:
        return True

    def counting(self, context: Context, total: int, every: int) -> Iterator[int]:
        for _ in walk(self.folder, context.recursive, None, context.follow_links, context.skip):
            total += 1
            if total % every == 0:
                yield total
        return total


@dataclass
class File(Input):
    """One local file, an image or not (its row says so)."""

    kind: ClassVar[str] = "file"
    path: str

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        path = local(text)
        return cls(path) if path is not None and os.path.isfile(path) else None

    def rows(self, context: Context) -> Iterator[Row]:
        yield self.path, {}

    def count(self) -> int | None:
        return 1

    def countable(self) -> bool:
        return True


@dataclass
class Glob(Input):
    """A local glob: its matches in sorted order, folders among them walked, shards read."""

    kind: ClassVar[str] = "glob"
    matches: list[str]

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        path = local(text)
        if path is None or not is_glob(path):
            return None
        if not (matches := context.matches(path)):
            raise UsageError(f"no files match {path!r}")
        return cls(matches)

    def rows(self, context: Context) -> Iterator[Row]:
        for path in self.matches:
            if os.path.isdir(path):
                yield from ((p, {}) for p in context.walk(path))
            elif shards.is_shard(path):
                yield from context.shard(path)
            else:
                yield path, {}

    def count(self) -> int | None:
        return None if self.gives_tar_rows() else len(self.matches)

    def countable(self) -> bool:
        return not self.gives_tar_rows()

    def counting(self, context: Context, total: int, every: int) -> Iterator[int]:
        for path in self.matches:
            if not os.path.isdir(path):
                total += 1
                continue
            total = yield from Folder(path).counting(context, total, every)
        return total

    def gives_tar_rows(self) -> bool:
        return any(shards.is_shard(p) for p in self.matches)


@dataclass
class Dangling(File):
    """A path that names a dangling symlink: an error row, not a usage error."""

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        path = local(text)
        return cls(path) if path is not None and os.path.lexists(path) else None


@dataclass
class RemoteGlob(Input):
    """``s3://bucket/photos/*.jpg``: the matching objects (shards among them read)."""

    kind: ClassVar[str] = "remote_glob"
    found: list[tuple[str, dict[str, Any]]]

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        found = url(text)
        if found is None or remote.scheme(found) in ("http", "https"):
            return None
        if not is_glob(_url_path(found).split("://", 1)[1]):
            return None
        if not (objects := context.listing(found)):
            raise UsageError(f"no objects match {remote.without_secrets(found)!r}")
        return cls(objects)

    def rows(self, context: Context) -> Iterator[Row]:
        for found, about in self.found:
            if shards.is_shard(found):
                yield from context.shard(found)
            else:
                yield from context.remote_objects([(found, about)])

    def gives_tar_rows(self) -> bool:
        return any(shards.is_shard(found) for found, _ in self.found)


@dataclass
class RemoteFolder(Input):
    """An object-store prefix (``s3://bucket/photos/``), listed when read; or a URL whose info says it
    is a directory."""

    kind: ClassVar[str] = "remote_dir"
    prefix: str

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        found = url(text)
        if found is None:
            return None
        if remote.is_prefix(found) and remote.scheme(found) not in ("http", "https"):
            if not _exists(found):
                raise UsageError(f"no objects under {remote.without_secrets(found)!r}")
            return cls(found)
        if context.info(found).get("type") == "directory":
            return cls(found.rstrip("/") + "/")
        return None

    def rows(self, context: Context) -> Iterator[Row]:
        return context.remote_objects(context.listing(self.prefix, context.recursive))


@dataclass
class RemoteObject(Input):
    """One object or HTTP file."""

    kind: ClassVar[str] = "remote_file"
    locator: RemoteFile

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        found = url(text)
        if found is None:
            return None
        return cls(RemoteFile(found, remote.stat_of(context.info(found))))

    def rows(self, context: Context) -> Iterator[Row]:
        yield self.locator, {}

    def count(self) -> int | None:
        return 1

    def countable(self) -> bool:
        return True


def _exists(found: str) -> bool:
    try:
        return remote.exists(found)
    except DecodeError as exc:
        raise UsageError(f"{remote.without_secrets(found)}: {exc}") from None


@dataclass
class Retry(Input):
    """``--retry-errors``: a scores file's rows again (not in the registry: the flag names it)."""

    kind: ClassVar[str] = "retry"
    table: ManifestTable

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        if not is_scores_file(text):
            raise UsageError(f"--retry-errors {text!r}: not a scores file written by perceptscore score")
        return cls(ManifestTable(text, PATH, drop=context.reserved))

    def passthrough(self) -> tuple[str, pa.Schema] | None:
        """The scores file's own passthrough columns (``shard``, ``key``, a manifest's) go on as they were."""
        return self.table.named, self.table.extras

    def rows(self, context: Context) -> Iterator[Row]:
        """Each row as it was (the scores are reused by ``Previous``), but a failed shard's row becomes
        the shard's members, read again (its rows that had been scored before it broke off are dropped:
        they come again with the others). A failed member is read again from its shard, each shard once
        for all its failed members (``shards.MemberCursor``)."""
        failed = failed_shards(self.table)
        cursor: shards.MemberCursor | None = None
        # the current shard's member rows so far, by path: a repeated name's n-th row is its n-th member
        occurrences: dict[str, int] = {}
        try:
            for (path, extras), error in zip(self.table.rows(), row_errors(self.table), strict=True):
                member = path is not None and path.startswith("tar://") and "::" in path
                if member and path.rpartition("::")[2] in failed:
                    continue
                if path is not None and path in failed:
                    yield from context.shard(path)
                    continue
                if not member:
                    yield path, extras
                    continue
                n = _counted(occurrences, path)
                if error is None:
                    yield path, extras
                    continue
                name, _, shard = path[len("tar://") :].rpartition("::")
                if cursor is None or cursor.shard != shard:
                    if cursor is not None:
                        cursor.close()
                    cursor = shards.MemberCursor(shard)
                found = cursor.find(name, n)
                yield (path if found is None else found), extras  # None: passed already, opened alone
        finally:
            if cursor is not None:
                cursor.close()


def _counted(occurrences: dict[str, int], member: str) -> int:
    """This member row's number among the rows of its name in its shard (the count restarts at each
    shard: a scores file holds a shard's rows together, so the counts stay small)."""
    shard = member.rpartition("::")[2]
    if occurrences and next(iter(occurrences)).rpartition("::")[2] != shard:
        occurrences.clear()
    n = occurrences[member] = occurrences.get(member, 0) + 1
    return n


# The input kinds, tried in this order: the first that claims an input text is its kind.
REGISTRY: list[type[Input]] = [
    Stdin,
    ListFile,
    Dataset,  # before Manifest: a table holding image bytes is scored from them
    Manifest,
    Shard,
    Folder,
    File,
    Glob,
    Dangling,  # a name that is no file, no folder and no glob, but a dangling link
    RemoteGlob,
    RemoteFolder,
    RemoteObject,  # any other readable URL
]


def classify(text: str, context: Context, registry: Sequence[type[Input]] | None = None) -> Input:
    """The input ``text`` is: the first kind in ``registry`` (``REGISTRY``) that claims it."""
    for kind in REGISTRY if registry is None else registry:
        found = kind.claim(text, context)
        if found is not None:
            return found
    raise UsageError(f"no such file or directory: {local(text) or text!r}")
