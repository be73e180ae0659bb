"""webdataset tar shards as inputs: every image member of a shard is a row.

A shard (local or remote) is read once, front to back, by the process that lists the inputs; never
extracted to disk. Each member's bytes travel with its row (``InMemory``), so decoding (in workers,
``--processes`` children or Ray tasks) never reads the shard again. A row's ``path`` is fsspec's URL of
the member (``tar://00001.jpg::s3://b/00000.tar``), with ``shard`` and ``key`` columns; ``--tar-fields``
adds the sample's caption (``txt``), its ``.json`` as text (``json``), or fields of it (``json.NAME``;
``input_NAME`` when NAME is an output column, as manifest columns are renamed).

A shard that cannot be read (missing, truncated, not a tar) is one error row whose ``path`` is the shard:
``--retry-errors`` reads such a shard again whole.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from perceptscore import remote
from perceptscore.errors import DecodeError, UsageError
from perceptscore.images import IMAGE_EXTENSIONS
from perceptscore.locators import InMemory, Locator, Unavailable, member_uri, open_shard

SHARD_SUFFIX = ".tar"
SHARD, KEY = "shard", "key"
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([^{},]*(?:,[^{},]*)+)\}")
_MAX_EXPANSION = 1_000_000
_MAX_DIGITS = 18  # a brace range bound longer than this names more than a million inputs anyway
_SHOWN = 120  # characters of a hostile input shown in its error line


def is_shard(text: str) -> bool:
    return text.split("?", 1)[0].lower().endswith(SHARD_SUFFIX)


def expand_braces(text: str) -> list[str]:
    """``shards/{00000..00099}.tar`` (zero padding kept) and ``{a,b}`` alternatives, as webdataset and
    the shell spell shard lists; left to right, every combination (a million at most: counted first)."""
    total = 1
    for match in _BRACES.finditer(text):
        if match.group(3) is not None:
            total *= len(match.group(3).split(","))
        elif max(len(match.group(1)), len(match.group(2))) > _MAX_DIGITS:
            # int() refuses 4,300 digits with a traceback; such a range is over the cap in any case
            raise UsageError(f"{_shown(text)} names over {_MAX_EXPANSION} inputs")
        else:
            total *= abs(int(match.group(2)) - int(match.group(1))) + 1
        if total > _MAX_EXPANSION:
            raise UsageError(f"{_shown(text)} names over {_MAX_EXPANSION} inputs")
    return _expand(text)


def _shown(text: str) -> str:
    """``text`` quoted for an error line, cut short if long (the line stays readable)."""
    return repr(text) if len(text) <= _SHOWN else f"{text[:_SHOWN]!r}... ({len(text)} characters)"


def _expand(text: str) -> list[str]:
    match = _BRACES.search(text)
    if match is None:
        return [text]
    head, tail = text[: match.start()], text[match.end() :]
    if match.group(3) is not None:
        choices = match.group(3).split(",")
    else:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        start, end = int(first), int(last)
        step = 1 if end >= start else -1
        choices = [str(n).zfill(width) for n in range(start, end + step, step)]
    return [f"{head}{choice}{rest}" for choice in choices for rest in _expand(tail)]


def parse_fields(text: str | None) -> tuple[str, ...]:
    """``--tar-fields txt,json,json.caption``."""
    if not text:
        return ()
    fields = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))  # each once
    for f in fields:
        if f not in ("txt", "json") and not (f.startswith("json.") and len(f) > 5):
            raise UsageError(
                f"--tar-fields {f!r}: use txt, json, or json.NAME (a field of the sample's .json)"
            )
    return fields


def input_name(name: str) -> str:
    """The one rule for a passed-through column whose name an output column has (manifest columns and
    ``--tar-fields`` alike): it is renamed, never written over the output's own."""
    return f"input_{name}"


def columns(fields: Sequence[str], reserved: Iterable[str] = ()) -> dict[str, str]:
    """Each field of ``--tar-fields`` -> its column: ``txt``, ``json``, or NAME for ``json.NAME``. A NAME
    that is an output column (``reserved``: path, error, the task columns ...), a tar column (``shard``,
    ``key``) or another field's column is renamed by ``input_name``; a clash left after that is refused."""
    taken = {*reserved, SHARD, KEY, *(f for f in fields if not f.startswith("json."))}
    out: dict[str, str] = {}
    for f in fields:
        name = f.removeprefix("json.") if f.startswith("json.") else f
        if f.startswith("json.") and name in taken:
            name = input_name(name)
        if name in taken - {f} or name in out.values():
            raise UsageError(
                f"--tar-fields {f!r}: its column {name!r} is taken by another column; leave one of them out"
            )
        out[f] = name
    return out


def schema(fields: Mapping[str, str]) -> pa.Schema:
    """The columns tar rows bring: ``shard``, ``key``, then the fields asked for (``columns``), as text."""
    return pa.schema([pa.field(n, pa.string()) for n in (SHARD, KEY, *fields.values())])


def members(shard: str, fields: Mapping[str, str]) -> Iterator[tuple[Locator, dict[str, Any]]]:
    """(locator, extras) of every image member of ``shard``, in archive order; an unreadable shard ends
    with one error row whose path is the shard itself. ``fields``: ``columns``' answer."""
    from perceptscore import tars

    base = {SHARD: shard}
    try:
        stream = open_shard(shard)
    except DecodeError as exc:
        yield Unavailable(shard, f"unreadable shard: {exc}"), base
        return
    limit = remote.max_bytes()
    try:
        with stream:
            for sample in tars.samples(stream, limit, 4 * limit):
                values, refused = _fields(sample, fields)
                extras = {**base, KEY: sample.key, **values}
                for member in sample.members:
                    if member.fatal:  # the shard broke off here: a row for the shard, to read it again
                        yield Unavailable(shard, member.error or "unreadable shard"), base
                    elif _is_image(member.extension):  # others: the sample's caption, metadata, fields
                        found = _locator(member, shard)
                        if refused and isinstance(found, InMemory):
                            found = Unavailable(found.uri, refused)
                        yield found, extras
    except OSError as exc:  # the connection to a remote shard failed mid-read, past its retries
        yield Unavailable(shard, f"unreadable shard: {remote.read_failure(exc)}"), base
    except DecodeError as exc:
        yield Unavailable(shard, f"unreadable shard: {exc}"), base


def _locator(member: Any, shard: str) -> Locator:
    """A member's row: its bytes, or why there are none (a ``tars.Member``)."""
    uri = member_uri(member.name, shard)
    if member.error or member.data is None:
        return Unavailable(uri, member.error or "unreadable")
    return InMemory(uri, member.data, (len(member.data), member.mtime * 10**9))


class MemberCursor:
    """``--retry-errors``: the errored members of one shard found again in one front-to-back read, however
    many there are (a ``TarMember`` per row would read the shard from its start once per row). Rows ask in
    archive order, the order a scores file holds them; ``occurrence`` tells a repeated name's n-th member
    from the others. ``find`` answers None for a member already passed: the caller opens it on its own."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self._passed: Counter[str] = Counter()  # names read so far, with their counts
        self._stream: Any = None
        self._members: Iterator[Any] | None = None
        self._broken: str | None = None  # why the shard can't be read on, once it can't

    def find(self, name: str, occurrence: int) -> Locator | None:
        uri = member_uri(name, self.shard)
        if self._broken is None and self._passed[name] < occurrence:
            while (member := self._next()) is not None:
                self._passed[member.name] += 1
                if member.fatal:
                    self._broken = member.error or "unreadable shard"
                elif member.name == name and self._passed[name] == occurrence:
                    return _locator(member, self.shard)
            if self._broken is None and self._passed[name] == 0:
                return Unavailable(uri, f"no member {name!r} in {remote.without_secrets(self.shard)}")
        return Unavailable(uri, self._broken) if self._broken is not None else None

    def _next(self) -> Any | None:
        """The shard's next member (opened at the first call), or None at its end or when it can't be read
        on (then ``_broken`` says why)."""
        from perceptscore import tars

        try:
            if self._members is None:
                self._stream = open_shard(self.shard)
                self._members = tars.members(self._stream, remote.max_bytes())
            return next(self._members, None)
        except OSError as exc:  # a remote shard's connection failed, past its retries
            self._broken = f"unreadable shard: {remote.read_failure(exc)}"
        except DecodeError as exc:
            self._broken = f"unreadable shard: {exc}"
        return None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _is_image(extension: str) -> bool:
    return "." + extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def _fields(sample: Any, fields: Mapping[str, str]) -> tuple[dict[str, Any], str | None]:
    """The sample's values of ``fields`` by column, and why its image rows are errors if they must be: a
    ``.json`` nested too deeply to parse, when fields of it are asked for (an unparsable one gives nulls)."""
    if not fields:
        return {}, None
    text: str | None = None
    parsed: Any = None
    caption: str | None = None
    refused: str | None = None
    wants_parsed = any(f.startswith("json.") for f in fields)
    for member in sample.members:
        if member.data is None:
            continue
        if member.extension == "json":
            text = member.data.decode("utf-8", "replace")
            parsed, refused = _parsed(text) if wants_parsed else (None, None)
        elif member.extension == "txt":
            caption = member.data.decode("utf-8", "replace")
    out: dict[str, Any] = {}
    for f, column in fields.items():
        if f == "txt":
            out[column] = caption
        elif f == "json":
            out[column] = text
        else:
            value = parsed.get(f.removeprefix("json.")) if isinstance(parsed, dict) else None
            out[column] = value if value is None or isinstance(value, str) else json.dumps(value)
    return out, refused


def _parsed(text: str) -> tuple[Any, str | None]:
    """A sample's ``.json`` parsed (None if it is no JSON), or why it can't be: the parser recurses once
    per level, and a hostile file nests a hundred thousand."""
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "the sample's .json is nested too deeply to read its fields (--tar-fields)"
    except ValueError:
        return None, None
