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

Each input's kind is a class of ``perceptscore.inputs`` (claimed through its registry); this module only
runs them in order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TextIO

import pyarrow as pa

from perceptscore import shards
from perceptscore.containers import expand
from perceptscore.errors import UsageError
from perceptscore.inputs import Context, Input, ManifestTable, Retry, Row, Stdin, classify
from perceptscore.items import Item
from perceptscore.locators import Unavailable, locate


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
        reserved = list(reserved)
        self.tar_fields = tuple(tar_fields)
        self._context = Context(
            recursive=recursive,
            follow_links=follow_links,
            skip=frozenset(os.path.realpath(f) for f in skip_folders),
            stdin=stdin if stdin is not None else sys.stdin,
            path_column=path_column,
            image_column=image_column,
            reserved=reserved,
            rename={name: shards.input_name(name) for name in reserved},
            tar_columns=shards.columns(self.tar_fields, reserved),  # json.path is no second path column
        )
        self._plan: list[Input] = self._classified(inputs, retry_errors)
        if sum(isinstance(entry, Stdin) for entry in self._plan) > 1:
            raise UsageError("'-' (paths on stdin) can be given only once")
        self.passthrough = self._context.passthrough = self._passthrough_schema()

    def _classified(self, inputs: Sequence[str], retry_errors: bool) -> list[Input]:
        if not retry_errors:
            return [classify(text, self._context) for text in _expanded(inputs)]
        if len(inputs) != 1:
            raise UsageError("--retry-errors takes its rows from the scores file it names: give no inputs")
        # a local copy, when it was named by URL (``remote.local_copy``)
        return [Retry.claim(inputs[0], self._context)]  # type: ignore[list-item]

    @property
    def ignored(self) -> list[str]:
        """Files in folders passed over: not images by name or content (counted anew on each pass)."""
        return self._context.ignored

    @property
    def tar_columns(self) -> dict[str, str]:
        return self._context.tar_columns

    @property
    def manifests(self) -> list[ManifestTable]:
        return [entry.table for entry in self._plan if entry.table is not None]

    def _passthrough_schema(self) -> pa.Schema:
        fields: dict[str, pa.Field] = {}
        found = sorted(
            ((entry.passthrough_rank, part) for entry in self._plan if (part := entry.passthrough())),
            key=lambda ranked: ranked[0],  # stable: manifests' columns first, in input order, datasets'
        )
        parts = [part for _, part in found]
        if self.tar_fields or any(entry.gives_tar_rows() for entry in self._plan):
            parts.append(("tar shards", shards.schema(self.tar_columns)))
        rename = self._context.rename
        for where, extras in parts:
            for f in extras:
                name = rename.get(f.name, f.name)
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

    def _paths(self) -> Iterator[Row]:
        for entry in self._plan:
            yield from entry.rows(self._context)

    def __iter__(self) -> Iterator[Item]:
        """The items in input order; a tar shard or a dataset's read task is one item, a container
        (``containers``), whose rows the engine reads where it decodes them."""
        self._context.ignored = []  # counted anew on each pass
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
        if any(isinstance(entry, Stdin) for entry in self._plan):
            return None
        total = 0
        for entry in self._plan:
            if (rows := entry.count()) is None:
                return None
            total += rows
        return total

    def counting(self, every: int = 500) -> Iterator[int] | None:
        """A running count of the items, for a progress bar's total: local folders are walked (a second
        listing, on the caller's thread, while the run reads the first), the rest counted as ``count``
        does. None when some input cannot be counted cheaply (stdin, lists, shards, remote folders)."""
        if not all(entry.countable() for entry in self._plan) or self.count() is not None:
            return None
        return self._running_count(every)

    def _running_count(self, every: int) -> Iterator[int]:
        total = 0
        for entry in self._plan:
            total = yield from entry.counting(self._context, total, every)
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
