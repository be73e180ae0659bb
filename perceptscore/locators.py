"""Where an item's bytes live. A locator opens them and reads their size and mtime, so nothing downstream
(decoding, incremental runs, the engines) calls ``os.stat`` or ``open`` on a path itself.

- ``LocalFile``: a path on this machine (``file://`` URLs become one).
- ``RemoteFile``: an object behind a URL (``s3://``, ``gs://``, ``https://`` ...), fetched whole through
  fsspec when opened (``prefetch`` fetches many at once ahead of decoding).
- ``InMemory``: bytes already read (a fetched object, a tar member): decoding never goes back to the
  network or the shard, and engines in other processes receive the bytes themselves (``to_wire``).
- ``TarMember``: ``tar://name::shard`` rows found again later (``explain``, ``report``): the shard is read
  front to back up to the member.
- ``DatasetRow``: ``<file>::<column>[<row>]`` rows of a parquet or arrow dataset found again later
  (``tables``): the file is read up to the row (a parquet file: only the row group holding it).
- ``Unavailable``: a row that cannot be opened, with the reason (an unknown URL scheme, say).
"""

from __future__ import annotations

import io
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from perceptscore import remote
from perceptscore.errors import DecodeError, UsageError


class Locator(Protocol):
    @property
    def uri(self) -> str:
        """What the output's ``path`` column shows, and what ``locate`` turns back into this locator."""
        ...

    def open(self) -> BinaryIO:
        """The bytes, as a seekable binary file; ``DecodeError`` with a one-line reason if unreadable."""
        ...

    def stat(self) -> tuple[int, int] | None:
        """(size, mtime_ns): what ``--incremental`` compares to tell a file is unchanged; None if unknown."""
        ...


@dataclass(frozen=True)
class LocalFile:
    path: str

    @property
    def uri(self) -> str:
        return self.path

    def stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except (OSError, ValueError):  # ValueError: a NUL byte in the path (a list or manifest line)
            return None
        return st.st_size, st.st_mtime_ns

    def open(self) -> BinaryIO:
        try:
            st = os.stat(self.path)
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device named like an image would block or never end
                raise DecodeError("is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
            if st.st_size == 0:
                raise DecodeError("empty file")
            return open(self.path, "rb")
        except FileNotFoundError:
            raise DecodeError("no such file") from None
        except IsADirectoryError:
            raise DecodeError("is a directory") from None
        except PermissionError:
            raise DecodeError("permission denied") from None
        except OSError as exc:
            raise DecodeError(f"unreadable image: {' '.join(str(exc).split())[:300]}") from None
        except ValueError:  # os calls refuse a path with a NUL byte; no file has one
            raise DecodeError("the path holds a NUL byte") from None


@dataclass(frozen=True)
class RemoteFile:
    url: str
    listed: tuple[int, int] | None = None  # (size, version) as a listing reported it: no request for stat

    @property
    def uri(self) -> str:
        return self.url

    def stat(self) -> tuple[int, int] | None:
        if self.listed is not None:
            return self.listed
        try:
            return remote.stat_of(remote.info(self.url))
        except (DecodeError, UsageError):
            return None

    def open(self) -> BinaryIO:
        return io.BytesIO(self.fetch()[0])

    def fetch(
        self, deadline: float | None = None, reserve: remote.Reserve | None = None
    ) -> tuple[bytes, tuple[int, int] | None]:
        """The bytes and stat; ``reserve`` is told the bytes they will take before they are read."""
        try:
            return remote.fetch(self.url, deadline=deadline, reserve=reserve)
        except remote.Stopped:  # a stop, not this file's failure: never recorded as its row
            raise
        except UsageError as exc:  # a backend not installed: this row's error, not the run's
            raise DecodeError(str(exc)) from None


@dataclass(frozen=True)
class InMemory:
    uri: str
    data: bytes
    known: tuple[int, int] | None = None

    def stat(self) -> tuple[int, int] | None:
        return self.known

    def open(self) -> BinaryIO:
        if not self.data:
            raise DecodeError("empty file")
        return io.BytesIO(self.data)


@dataclass(frozen=True)
class Unavailable:
    uri: str
    reason: str

    def stat(self) -> tuple[int, int] | None:
        return None

    def open(self) -> BinaryIO:
        raise DecodeError(self.reason)


TAR_SCHEME = "tar://"


def member_uri(name: str, shard: str) -> str:
    """fsspec's chained URL of a tar member (``fsspec.open`` opens it too)."""
    return f"{TAR_SCHEME}{name}::{shard}"


@dataclass(frozen=True)
class TarMember:
    uri: str

    def parts(self) -> tuple[str, str]:
        name, _, shard = self.uri[len(TAR_SCHEME) :].rpartition("::")  # a shard's URL holds no "::"
        return name, shard

    def stat(self) -> tuple[int, int] | None:
        return None

    def open(self) -> BinaryIO:
        from perceptscore import tars

        name, shard = self.parts()
        found: list[tars.Member] = []
        try:
            with open_shard(shard) as stream:
                for member in tars.members(stream, remote.max_bytes()):
                    if member.name == name or member.fatal:
                        found.append(member)
        except OSError as exc:  # a remote shard's connection failed past its retries
            raise DecodeError(f"unreadable shard: {remote.read_failure(exc)}") from None
        if found and found[-1].fatal:
            raise DecodeError(found[-1].error or "unreadable shard")
        if len(found) > 1:  # the name alone cannot say which member the row was
            raise DecodeError("duplicate member name in this shard")
        if not found:
            raise DecodeError(f"no member {name!r} in {remote.without_secrets(shard)}")
        if found[0].error:
            raise DecodeError(found[0].error)
        return io.BytesIO(found[0].data or b"")


# a dataset row's ``path`` (``tables.row_uri``): the file's name ends in .parquet or .arrow
DATASET_ROW = re.compile(
    r"^(?P<file>.+\.(?:parquet|arrow)(?:\?[^\n]*?)?)::(?P<column>[^\n]+)\[(?P<row>\d+)\]$", re.IGNORECASE
)


@dataclass(frozen=True)
class DatasetRow:
    uri: str

    def stat(self) -> tuple[int, int] | None:
        return None  # as a tar member's: its bytes come from the file only when opened

    def open(self) -> BinaryIO:
        from perceptscore import tables

        return io.BytesIO(tables.row_bytes(self.uri))


def open_shard(shard: str) -> Any:
    """A shard's bytes as a sequential stream (local, or remote with retried reads); ``DecodeError``
    when it cannot be opened."""
    if remote.is_remote(shard):
        try:
            return remote.open_stream(shard)
        except remote.Stopped:  # a stop, not the shard's failure: never recorded as its row
            raise
        except UsageError as exc:
            raise DecodeError(str(exc)) from None
    return LocalFile(remote.local_path(shard)).open()


def locate(uri: str) -> Locator:
    """The locator for a ``uri`` (what ``Locator.uri`` gave): a local path, a URL, a tar member, or a
    dataset's row."""
    if uri.startswith(TAR_SCHEME) and "::" in uri:
        return TarMember(uri)
    if DATASET_ROW.match(uri):
        return DatasetRow(uri)
    name = remote.scheme(uri)
    if name is None:
        return LocalFile(uri)
    if name == "file":
        try:
            return LocalFile(remote.local_path(uri))
        except UsageError as exc:
            return Unavailable(uri, str(exc))
    if name not in remote.READABLE:
        return Unavailable(uri, f"unsupported URL scheme {name}://")
    return RemoteFile(uri)


# ---- across processes -------------------------------------------------------------------------------

Wire = tuple[str, bytes | None, int | None, int | None]  # uri, bytes held, size, version


def to_wire(locator: Locator) -> Wire:
    """What another process needs to rebuild ``locator`` without reading anything again: bytes already
    held travel with it (a tar member is never looked for in its shard a second time)."""
    if isinstance(locator, InMemory):
        size, version = locator.known if locator.known else (None, None)
        return locator.uri, locator.data, size, version
    return locator.uri, None, None, None


def from_wire(uri: str, data: bytes | None, size: Any = None, version: Any = None) -> Locator:
    if data is not None:
        known = (int(size), int(version)) if size is not None and version is not None else None
        return InMemory(uri, data, known)
    return locate(uri)
