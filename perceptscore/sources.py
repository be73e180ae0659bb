"""What to score: files, directories, globs, ``@lists``, stdin and parquet/CSV/JSONL manifests, streamed.

Every input is checked before anything is scored (a typo fails in a second with exit code 2, not after an
hour); the items themselves are produced lazily, so a manifest of millions of rows is never held whole.

Paths in the output are the paths used to open the files: as typed for command-line inputs, joined to
the manifest's folder for relative manifest rows. Scores files (written by ``perceptscore score``) hold
such paths already, so their relative paths are taken as relative to the working directory.

Any of these may be a URL (``s3://bucket/photos/`` lists a prefix recursively; ``https://`` objects;
remote manifests), and ``.tar`` shards (named, globbed, brace-expanded, or listed in a manifest) give a
row per image member (``shards``). Datasets as published (parquet or arrow files holding the image bytes,
a ``save_to_disk`` or hub-layout folder) give a row per table row (``tables``).
"""

from __future__ import annotations

import glob
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from perceptscore import remote, shards, tables
from perceptscore.columns import ERROR, PATH
from perceptscore.containers import ShardRows, TableRows, expand
from perceptscore.errors import DecodeError, UsageError
from perceptscore.formats import FORMATS, format_of, is_scores_file, restore_formulas
from perceptscore.images import IMAGE_EXTENSIONS, looks_like_image
from perceptscore.items import Item
from perceptscore.locators import TAR_SCHEME, Locator, RemoteFile, Unavailable, locate, member_uri

MANIFEST_SUFFIXES = tuple(FORMATS)  # every table format is also read as a manifest


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
                _refuse_deep_lines(path, shown_as)
            self.is_scores = is_scores_file(path)
            schema = self.format.read_schema(path, self._strings)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise UsageError(
                f"manifest {shown_as}: unreadable ({' '.join(str(exc).split())[:200]})"
            ) from None
        _refuse_deep_columns(schema, shown_as)
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
        manifest's rows are URLs only (``_remote_row``)."""
        if remote.is_remote(self.named):
            return _remote_row(self.folder, path)
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


class Sources:
    """The inputs of one run, validated up front, iterated lazily as ``Item``s in input order.

    ``reserved``: output column names; a manifest column with such a name is passed through as
    ``input_<name>`` instead of being overwritten. ``skip_folders``: real paths of folders a walk does not
    enter below a folder input (``explain``'s output folder); a folder named as an input is still walked.
    ``tar_fields``: what tar rows bring besides ``shard`` and ``key`` (``shards.parse_fields``).
    ``retry_errors``: the one input is a scores file whose rows are produced again, the failed tar shards
    among them read again whole (``--retry-errors``). ``image_column``: a dataset's column of image bytes
    (``--image-column``; else found by ``tables.choose_column``).
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
        tar_fields: Sequence[str] = (),
        retry_errors: bool = False,
        image_column: str | None = None,
    ) -> None:
        if not inputs:
            raise UsageError("no inputs given: name image files, folders, globs, @lists, manifests or -")
        self.recursive, self.follow_links = recursive, follow_links
        self.skip = frozenset(os.path.realpath(f) for f in skip_folders)
        self.stdin = stdin if stdin is not None else sys.stdin
        self.tar_fields = tuple(tar_fields)
        reserved = list(reserved)
        self.image_column, self._reserved = image_column, reserved
        self._path_column = path_column  # as given: one naming a column of bytes is the image column
        self._rename = {name: shards.input_name(name) for name in reserved}
        self.tar_columns = shards.columns(self.tar_fields, reserved)  # json.path is no second path column
        if retry_errors:
            self._plan: list[tuple[str, Any]] = [self._retried(inputs, path_column or PATH, reserved)]
        else:
            self._plan = [self._classify(text, path_column or PATH) for text in _expanded(inputs)]
        if sum(kind == "stdin" for kind, _ in self._plan) > 1:
            raise UsageError("'-' (paths on stdin) can be given only once")
        self.ignored: list[str] = []  # files in folders passed over: not images by name or content
        self.passthrough = self._passthrough_schema()

    @property
    def manifests(self) -> list[_Manifest]:
        return [m for kind, m in self._plan if kind in ("manifest", "retry")]

    def _retried(self, inputs: Sequence[str], path_column: str, reserved: list[str]) -> tuple[str, Any]:
        if len(inputs) != 1:
            raise UsageError("--retry-errors takes its rows from the scores file it names: give no inputs")
        (old,) = inputs  # a local copy, when it was named by URL (``remote.local_copy``)
        if not (os.path.isfile(old) and is_scores_file(old)):
            raise UsageError(f"--retry-errors {old!r}: not a scores file written by perceptscore score")
        return "retry", _Manifest(old, PATH, drop=reserved)

    def _classify(self, text: str, path_column: str) -> tuple[str, Any]:
        if text == "-":
            return "stdin", None
        if text.startswith("@"):
            listing = remote.local_path(text[1:])
            if remote.is_remote(listing):
                return "list", (remote.local_copy(listing), listing)
            if not os.path.isfile(listing):
                raise UsageError(f"list file {listing!r} not found")
            return "list", (listing, listing)
        if remote.is_remote(text):
            return self._classify_url(text, path_column)
        text = remote.local_path(text)
        if os.path.isdir(text):
            found = tables.folder_files(text)
            return ("dir", text) if found is None else ("dataset", self._dataset(found[1], text))
        if os.path.isfile(text):
            if tables.is_table_file(text) and self._is_dataset(text, path_column):
                return "dataset", self._dataset([text], text)
            if text.lower().endswith(MANIFEST_SUFFIXES):
                return "manifest", _Manifest(text, path_column)
            if shards.is_shard(text):
                return "shard", text
            return "file", text
        if _is_glob(text):
            matches = sorted(glob.iglob(text, recursive=True))
            if not matches:
                raise UsageError(f"no files match {text!r}")
            if all(tables.is_table_file(m) and os.path.isfile(m) for m in matches) and self._is_dataset(
                matches[0], path_column
            ):
                return "dataset", self._dataset(matches, text)
            return "glob", matches
        if os.path.lexists(text):
            return "file", text  # a dangling symlink: an error row, not a usage error
        raise UsageError(f"no such file or directory: {text!r}")

    def _classify_url(self, url: str, path_column: str) -> tuple[str, Any]:
        """A URL input. Shards are not looked at until read (a missing one is an error row: a list of a
        thousand shards costs no thousand requests up front); anything else is checked now."""
        name = remote.scheme(url)
        if name == "hf":  # huggingface_hub's file system: datasets only
            return "dataset", tables.hub_dataset(url, self._asked_columns(), self._reserved)
        if name not in remote.READABLE:
            known = ", ".join(f"{s}://" for s in remote.READABLE)
            shown_as = remote.without_secrets(url)
            raise UsageError(f"{shown_as}: unsupported URL scheme {name}:// (known: {known})")
        remote.trust(url)  # named on the command line: its HTTP origin gets the storage options
        remote.filesystem(name)  # a missing backend: the extra to install, now
        shown_as = remote.without_secrets(url)
        path = url.split("?", 1)[0]
        if shards.is_shard(path):
            return "shard", url
        if path.lower().endswith(MANIFEST_SUFFIXES) or tables.is_table_file(path):
            local = remote.local_copy(url)  # a dataset too is read from this copy: seekable, on disk
            if tables.is_table_file(path) and self._is_dataset(local, path_column):
                return "dataset", tables.open_files(
                    [(url, local)], url, self._asked_columns(), self._reserved
                )
            return "manifest", _Manifest(local, path_column, url)
        if _is_glob(path.split("://", 1)[1]) and name not in ("http", "https"):
            found = self._listed(url)
            if not found:
                raise UsageError(f"no objects match {shown_as!r}")
            return "remote_glob", found
        if remote.is_prefix(url) and name not in ("http", "https"):
            if not self._exists(url):
                raise UsageError(f"no objects under {shown_as!r}")
            return "remote_dir", url
        try:
            about = remote.info(url)
        except DecodeError as exc:
            raise UsageError(f"{shown_as}: {exc}") from None
        if about.get("type") == "directory":
            return "remote_dir", url.rstrip("/") + "/"
        return "remote_file", RemoteFile(url, remote.stat_of(about))

    def _is_dataset(self, file: str, path_column: str) -> bool:
        """A parquet or arrow file scored from its bytes, not read as a manifest (``tables.is_dataset``);
        a scores file never is (its rows name their images)."""
        if file.lower().endswith(".arrow"):
            return True
        if not remote.is_remote(file) and is_scores_file(file):
            return False
        asked = None if path_column == PATH else path_column
        try:
            with tables.open_table(file) as f:
                schema = pq.read_schema(f)
        except (pa.ArrowException, OSError, ValueError) as exc:
            shown_as = remote.without_secrets(file)
            raise UsageError(
                f"manifest {shown_as}: unreadable ({' '.join(str(exc).split())[:200]})"
            ) from None
        return tables.is_dataset(schema, self.image_column, asked)

    def _dataset(self, files: Sequence[str], named: str) -> tables.Dataset:
        return tables.open_files([(f, f) for f in files], named, self._asked_columns(), self._reserved)

    def _asked_columns(self) -> tables.Asked:
        return tables.Asked(self.image_column, self._path_column)

    def _exists(self, url: str) -> bool:
        try:
            return remote.exists(url)
        except DecodeError as exc:
            raise UsageError(f"{remote.without_secrets(url)}: {exc}") from None

    def _listed(self, url: str, recursive: bool = True) -> list[tuple[str, dict[str, Any]]]:
        try:
            return list(remote.listing(url, recursive))
        except DecodeError as exc:
            raise UsageError(f"{remote.without_secrets(url)}: cannot list ({exc})") from None

    def _passthrough_schema(self) -> pa.Schema:
        fields: dict[str, pa.Field] = {}
        tables = [(m.named, m.extras) for m in self.manifests]
        tables += [(d.named, d.passthrough) for kind, d in self._plan if kind == "dataset"]
        if self.tar_fields or any(self._has_shards(kind, value) for kind, value in self._plan):
            tables.append(("tar shards", shards.schema(self.tar_columns)))
        for where, extras in tables:
            for f in extras:
                name = self._rename.get(f.name, f.name)
                if name in fields and fields[name].type != f.type:
                    if where == "tar shards":
                        raise UsageError(
                            f"manifest column {f.name!r} has type {fields[name].type}, but tar rows give "
                            f"{f.name} as text: rename that column, or score the shards separately"
                        )
                    raise UsageError(
                        f"manifest column {f.name!r} has type {f.type} in {where} "
                        f"but {fields[name].type} in an earlier manifest"
                    )
                fields.setdefault(name, f.with_name(name))
        return pa.schema(list(fields.values()))

    @staticmethod
    def _has_shards(kind: str, value: Any) -> bool:
        """Whether an input gives tar rows (then ``shard`` and ``key`` are columns). A manifest or list
        may name shards too: its member rows have those columns only with ``--tar-fields``."""
        if kind == "shard":
            return True
        if kind in ("glob", "remote_glob"):
            return any(shards.is_shard(p if isinstance(p, str) else p[0]) for p in value)
        return False

    def _walk(self, folder: str) -> Iterator[str]:
        return _walk(folder, self.recursive, self.ignored, self.follow_links, self.skip)

    def _shard(self, shard: str) -> Iterator[tuple[Locator, dict[str, Any]]]:
        """A shard is one item, a container: its members are read where they are decoded."""
        yield ShardRows(shard, tuple(self.tar_columns.items()), self.passthrough), {}

    def _named(self, path: str | Locator) -> Iterator[tuple[str | Locator, dict[str, Any]]]:
        """A path or URL named by a list, stdin or a manifest row: a shard gives its members (a row
        refused already is a locator that says why)."""
        if isinstance(path, str) and shards.is_shard(path) and not path.startswith("tar://"):
            yield from self._shard(path)
        else:
            yield path, {}

    def _remote_objects(
        self, found: Iterable[tuple[str, dict[str, Any]]]
    ) -> Iterator[tuple[Locator, dict[str, Any]]]:
        for url, about in found:
            if _named_image(url):
                yield RemoteFile(url, remote.stat_of(about)), {}
            else:
                self.ignored.append(url)

    def _paths(self) -> Iterator[tuple[str | Locator | None, dict[str, Any]]]:
        for kind, value in self._plan:
            if kind == "file":
                yield value, {}
            elif kind == "dir":
                yield from ((p, {}) for p in self._walk(value))
            elif kind == "glob":
                for path in value:
                    if os.path.isdir(path):
                        yield from ((p, {}) for p in self._walk(path))
                    elif shards.is_shard(path):
                        yield from self._shard(path)
                    else:
                        yield path, {}
            elif kind == "shard":
                yield from self._shard(value)
            elif kind == "remote_file":
                yield value, {}
            elif kind == "remote_dir":
                yield from self._remote_objects(self._listed(value, self.recursive))
            elif kind == "remote_glob":
                for url, about in value:
                    if shards.is_shard(url):
                        yield from self._shard(url)
                    else:
                        yield from self._remote_objects([(url, about)])
            elif kind == "list":
                local, named = value
                folder = remote.parent(named) if remote.is_remote(named) else os.path.dirname(named)
                with open(local, encoding="utf-8") as lines:
                    for p in _listed(lines):
                        yield from self._named(_joined(folder, p))
            elif kind == "stdin":
                for p in _listed(self.stdin):
                    yield from self._named(p)
            elif kind == "retry":
                yield from self._retry_rows(value)
            elif kind == "dataset":  # a container per read task: its rows are read where they are decoded
                yield from ((TableRows(value, task, self.passthrough), {}) for task in value.read_tasks())
            else:
                manifest: _Manifest = value
                for path, extras in manifest.rows():
                    renamed = {self._rename.get(k, k): v for k, v in extras.items()}
                    if path is None:
                        yield None, renamed
                        continue
                    for found, more in self._named(manifest.resolve(path)):
                        yield found, {**more, **renamed}  # the manifest's own columns win

    def _retry_rows(self, old: _Manifest) -> Iterator[tuple[str | Locator | None, dict[str, Any]]]:
        """The rows of a scores file again: each as it was (the scores are reused by ``Previous``), but a
        failed shard's row becomes the shard's members, read again (its rows that had been scored before
        it broke off are dropped: they come again with the others). A failed member is read again from its
        shard, each shard once for all its failed members (``shards.MemberCursor``)."""
        failed = _failed_shards(old)
        cursor: shards.MemberCursor | None = None
        # the current shard's member rows so far, by path: a repeated name's n-th row is its n-th member
        occurrences: dict[str, int] = {}
        try:
            for (path, extras), error in zip(old.rows(), _row_errors(old), strict=True):
                member = path is not None and path.startswith("tar://") and "::" in path
                if member and path.rpartition("::")[2] in failed:
                    continue
                if path is not None and path in failed:
                    yield from self._shard(path)
                    continue
                if not member:
                    yield path, extras
                    continue
                name, _, shard = path[len("tar://") :].rpartition("::")
                if occurrences and next(iter(occurrences)).rpartition("::")[2] != shard:
                    occurrences.clear()  # a scores file holds a shard's rows together: counts stay small
                n = occurrences[path] = occurrences.get(path, 0) + 1
                if error is None:
                    yield path, extras
                    continue
                if cursor is None or cursor.shard != shard:
                    if cursor is not None:
                        cursor.close()
                    cursor = shards.MemberCursor(shard)
                found = cursor.find(name, n)
                yield (path if found is None else found), extras  # None: passed already, opened alone
        finally:
            if cursor is not None:
                cursor.close()

    def __iter__(self) -> Iterator[Item]:
        """The items in input order; a tar shard or a dataset's read task is one item, a container
        (``containers``), whose rows the engine reads where it decodes them."""
        self.ignored = []  # counted anew on each pass
        for index, (where, extras) in enumerate(self._paths()):
            if not where:
                yield Item(index, locate(""), extras, error="manifest row has no path")
            else:
                locator = locate(where) if isinstance(where, str) else where
                # a row known to be unopenable carries its reason as its error: it travels to other
                # processes with the row (a locator of no bytes would be looked up again there)
                reason = locator.reason if isinstance(locator, Unavailable) else None
                yield Item(index, locator, extras, error=reason)

    def rows(self) -> Iterator[Item]:
        """One item per image, containers read here (``explain`` makes a heatmap per image), numbered
        anew in input order."""
        number = 0
        for item in self:
            for found in expand(item):
                yield replace(found, index=number)
                number += 1

    def count(self) -> int | None:
        """The number of rows when it is cheap to know (no stdin, no JSONL read); else None."""
        if any(kind == "stdin" for kind, _ in self._plan):
            return None
        total = 0
        for kind, value in self._plan:
            if kind == "manifest" and value.format.suffix == ".parquet":
                total += pq.ParquetFile(value.path).metadata.num_rows
            elif kind == "remote_file" or kind == "file":
                total += 1
            elif kind == "dataset" and (rows := value.count()) is not None:
                total += rows
            elif kind == "glob" and not any(shards.is_shard(p) for p in value):
                total += len(value)
            else:
                return None
        return total

    def counting(self, every: int = 500) -> Iterator[int] | None:
        """A running count of the items, for a progress bar's total: local folders are walked (a second
        listing, on the caller's thread, while the run reads the first), the rest counted as ``count``
        does. None when some input cannot be counted cheaply (stdin, lists, shards, remote folders)."""
        countable = ("file", "remote_file", "dir", "glob", "manifest")
        if any(kind not in countable for kind, _ in self._plan) or self.count() is not None:
            return None
        if any(kind == "glob" and any(shards.is_shard(p) for p in value) for kind, value in self._plan):
            return None
        if any(kind == "manifest" and value.format.suffix != ".parquet" for kind, value in self._plan):
            return None
        return self._running_count(every)

    def _running_count(self, every: int) -> Iterator[int]:
        total = 0
        for kind, value in self._plan:
            if kind == "manifest":
                total += pq.ParquetFile(value.path).metadata.num_rows
            elif kind in ("file", "remote_file"):
                total += 1
            else:  # a folder, or a glob's matches (folders among them walked)
                for path in [value] if kind == "dir" else value:
                    if kind == "glob" and not os.path.isdir(path):
                        total += 1
                        continue
                    for _ in _walk(path, self.recursive, None, self.follow_links, self.skip):
                        total += 1
                        if total % every == 0:
                            yield total
            yield total


def _expanded(inputs: Sequence[str]) -> list[str]:
    """Brace lists expanded (``shards/{00000..00099}.tar``), unless a local file has that very name."""
    out: list[str] = []
    for text in inputs:
        if text in ("-",) or text.startswith("@") or os.path.lexists(text):
            out.append(text)
        else:
            out.extend(shards.expand_braces(text))
    return out


def _joined(folder: str, path: str) -> str | Locator:
    """A list's line as it is opened: relative to the list's folder; a remote list's lines are URLs only."""
    if remote.is_remote(folder):
        return _remote_row(folder, path)
    if remote.scheme(path) is not None or os.path.isabs(path):
        return path
    return os.path.join(folder, path)


_NOT_A_URL = "not a URL: a remote manifest or list names URLs, or paths relative to itself"


def _remote_row(folder: str, path: str) -> str | Locator:
    """A row of a remote manifest or list: an object-store or HTTP URL, or a path relative to the
    table's folder that stays within its origin (host or bucket). Anything naming this machine (``/etc/x``,
    ``file://``, ``~``, a local shard's members) is refused as an error row: whoever wrote the table could
    otherwise have local files read, stat'ed into the output or copied by ``filter --copy-to``. A scores
    file's relative rows were local paths where it was written: refused too (``folder`` is empty)."""
    if path.startswith(TAR_SCHEME) and "::" in path:  # a member: its shard must pass as a row itself
        name, _, shard = path[len("tar://") :].rpartition("::")
        found = _remote_row(folder, shard)
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


def _refuse_deep_lines(path: str, shown_as: str) -> None:
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


def _refuse_deep_columns(schema: pa.Schema, shown_as: str) -> None:
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


def _row_errors(old: _Manifest) -> Iterator[str | None]:
    """Each row's error of a scores file, in the order ``rows`` gives the rows (its passthrough columns
    leave the error out)."""
    for batch in old.format.read_batches(old.path, [PATH, ERROR]):
        yield from batch.column(ERROR).to_pylist()


def _failed_shards(old: _Manifest) -> set[str]:
    """The shards of a scores file whose own row is an error (unreadable, or broke off)."""
    failed: set[str] = set()
    for batch in old.format.read_batches(old.path, [PATH, ERROR]):
        for path, error in zip(batch.column(PATH).to_pylist(), batch.column(ERROR).to_pylist(), strict=True):
            if error is not None and path and shards.is_shard(path) and not path.startswith("tar://"):
                failed.add(path)
    return failed


def _listed(lines: Iterable[str]) -> Iterator[str]:
    """Non-blank lines that are not ``#`` comments, stripped of the newline only (names may have spaces)."""
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip() and not line.lstrip().startswith("#"):
            yield line
