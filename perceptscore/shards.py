"""webdataset tar shards as inputs: every image member of a shard is a row.

A shard (local or remote) is read once, front to back, by the process that lists the inputs; never
extracted to disk. Each member's bytes travel with its row (``InMemory``), so decoding (in workers,
``--processes`` children or Ray tasks) never reads the shard again. A row's ``path`` is fsspec's URL of
the member (``tar://00001.jpg::s3://b/00000.tar``), with ``shard`` and ``key`` columns; ``--tar-fields``
adds the sample's caption (``txt``), its ``.json`` as text (``json``), or fields of it (``json.NAME``).

A shard that cannot be read (missing, truncated, not a tar) is one error row whose ``path`` is the shard:
``--retry-errors`` reads such a shard again whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
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


def is_shard(text: str) -> bool:
    return text.split("?", 1)[0].lower().endswith(SHARD_SUFFIX)


def expand_braces(text: str) -> list[str]:
    """``shards/{00000..00099}.tar`` (zero padding kept) and ``{a,b}`` alternatives, as webdataset and
    the shell spell shard lists; left to right, every combination (a million at most: counted first)."""
    total = 1
    for match in _BRACES.finditer(text):
        if match.group(3) is not None:
            total *= len(match.group(3).split(","))
        else:
            total *= abs(int(match.group(2)) - int(match.group(1))) + 1
        if total > _MAX_EXPANSION:
            raise UsageError(f"{text!r} names over {_MAX_EXPANSION} inputs")
    return _expand(text)


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
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    for f in fields:
        if f not in ("txt", "json") and not (f.startswith("json.") and len(f) > 5):
            raise UsageError(
                f"--tar-fields {f!r}: use txt, json, or json.NAME (a field of the sample's .json)"
            )
    return fields


def schema(fields: Sequence[str]) -> pa.Schema:
    """The columns tar rows bring: ``shard``, ``key``, then the fields asked for (as text)."""
    names = [SHARD, KEY, *(f.removeprefix("json.") if f.startswith("json.") else f for f in fields)]
    return pa.schema([pa.field(n, pa.string()) for n in names])


def members(shard: str, fields: Sequence[str]) -> Iterator[tuple[Locator, dict[str, Any]]]:
    """(locator, extras) of every image member of ``shard``, in archive order; an unreadable shard ends
    with one error row whose path is the shard itself."""
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
                extras = {**base, KEY: sample.key, **_fields(sample, fields)}
                for member in sample.members:
                    if member.fatal:  # the shard broke off here: a row for the shard, to read it again
                        yield Unavailable(shard, member.error or "unreadable shard"), base
                    elif not _is_image(member.extension):
                        continue  # the sample's caption, metadata or other fields
                    elif member.error or member.data is None:
                        yield (
                            Unavailable(member_uri(member.name, shard), member.error or "unreadable"),
                            extras,
                        )
                    else:
                        stat = (len(member.data), member.mtime * 10**9)
                        yield InMemory(member_uri(member.name, shard), member.data, stat), extras
    except OSError as exc:  # the connection to a remote shard failed mid-read, past its retries
        yield Unavailable(shard, f"unreadable shard: {remote.read_failure(exc)}"), base
    except DecodeError as exc:
        yield Unavailable(shard, f"unreadable shard: {exc}"), base


def _is_image(extension: str) -> bool:
    return "." + extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def _fields(sample: Any, fields: Sequence[str]) -> dict[str, Any]:
    if not fields:
        return {}
    text: str | None = None
    parsed: Any = None
    caption: str | None = None
    for member in sample.members:
        if member.data is None:
            continue
        if member.extension == "json":
            text = member.data.decode("utf-8", "replace")
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
        elif member.extension == "txt":
            caption = member.data.decode("utf-8", "replace")
    out: dict[str, Any] = {}
    for f in fields:
        if f == "txt":
            out["txt"] = caption
        elif f == "json":
            out["json"] = text
        else:
            name = f.removeprefix("json.")
            value = parsed.get(name) if isinstance(parsed, dict) else None
            out[name] = value if value is None or isinstance(value, str) else json.dumps(value)
    return out
