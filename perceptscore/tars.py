"""Webdataset tar shards (what img2dataset writes: ``00000.tar`` holding ``key.jpg``, ``key.txt``,
``key.json``), read as a stream of members and of samples.

The headers are parsed here (ustar, GNU and pax) rather than by ``tarfile``: in stream mode ``tarfile``
keeps every ``TarInfo`` it has seen (memory grows with the shard), reads a pax header of any declared size
into memory, and raises on things that should only cost one row. This reader calls ``read`` and nothing
else (the stream may be an HTTP or S3 body), front to back, and holds at most one member's bytes, one
header block and a bounded amount of metadata, whatever the archive declares.

A member that can't be used becomes a ``Member`` with ``error`` set and the shard goes on; a shard that
can't be read any further (truncated, corrupt header, oversized metadata) ends with one final error member.
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
METADATA_CAP = 1 << 20  # a pax record or GNU long name larger than this is hostile or broken, never read
SKIP_CHUNK = 1 << 20  # unwanted data is read and dropped this much at a time
# Wanted data is read this much at a time: a header may declare far more bytes than the stream holds, and
# some streams (io.FileIO, io.BufferedReader) allocate the whole requested size before reading.
READ_CHUNK = 16 << 20

POSIX_MAGIC = b"ustar\x00"  # ustar/pax: name = prefix + "/" + name; GNU headers use that field otherwise
REGULAR = (b"0", b"\x00", b"7")
LINKS = (b"1", b"2")
SPECIAL = (b"3", b"4", b"6")
NO_DATA = LINKS + SPECIAL + (b"5",)  # POSIX: no data blocks follow these, whatever their size field says
SKIPPED = (b"5", b"D", b"V")  # directories, GNU dump directories and volume labels: not samples
PAX = (b"x", b"X")  # "X": Solaris' name for the same thing
METADATA = (*PAX, b"g", b"L", b"K")
PAX_KEYS = ("path", "size", "mtime")  # only these are kept, so any number of records stays bounded
SIZE_DIGITS = 20  # a pax size longer than this is over any limit (and Python refuses ints of 4,300 digits)
# mtimes outside int64 nanoseconds (about years 1678 to 2262) can't be stored; such a header's mtime is 0
MTIME_LIMIT = (1 << 63) // 10**9
SPARSE = "GNU.sparse"  # stands for any GNU.sparse.* keyword

_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(rb"[0-9]+")
_UNSIGNED = struct.Struct("148B8x356B")
_SIGNED = struct.Struct("148b8x356b")


class ShardError(Exception):
    """The shard can't be read any further. ``members`` turns it into its final error member; it is not
    raised to callers. ``name``: the member being read when it happened, or ""."""

    def __init__(self, message: str, name: str = "", mtime: int = 0) -> None:
        super().__init__(message)
        self.name = name
        self.mtime = mtime


@dataclass(frozen=True)
class Member:
    name: str  # the path inside the shard as stored (pax 'path' / GNU long name applied)
    key: str  # webdataset sample key: the name up to the first '.' of its basename, dir part kept
    extension: str  # the rest after that dot, lower-cased: "jpg", "seg.png"
    data: bytes | None  # None when error is set
    error: str | None  # one line: why this member can't be used
    mtime: int  # header mtime in seconds, 0 if unparsable
    fatal: bool = False  # the shard broke off here (truncated, corrupt): no member follows


@dataclass(frozen=True)
class Sample:
    key: str
    members: list[Member]  # in archive order


def members(stream: BinaryIO, max_member_bytes: int) -> Iterator[Member]:
    """Every regular-file member of a tar stream, in order, as valid members or error members; a shard that
    can't be read on ends with one error member. Directories are skipped. Only ``stream.read`` is used."""
    reader = _Reader(stream, max_member_bytes)
    while True:
        # The yield stays outside the try: a ShardError is only ever this reader's own.
        try:
            member = reader.next_member()
        except ShardError as exc:
            yield replace(_member(exc.name, None, str(exc), exc.mtime), fatal=True)
            return
        if member is None:
            return
        yield member


def samples(stream: BinaryIO, max_member_bytes: int, max_sample_bytes: int) -> Iterator[Sample]:
    """Consecutive members of one key, grouped. A sample holds at most ``max_sample_bytes`` of data: members
    beyond that are kept as error members, so a shard of many same-key members can't exhaust memory."""
    key: str | None = None
    held: list[Member] = []
    held_bytes = 0
    for member in members(stream, max_member_bytes):
        # A member named "" is a shard-level error (or a nameless member): never part of another sample.
        if key is not None and (member.key != key or member.name == "" or held[-1].name == ""):
            yield Sample(key, held)
            held, held_bytes = [], 0
        key = member.key
        if member.data is not None:
            if held_bytes + len(member.data) > max_sample_bytes:
                member = replace(
                    member, data=None, error=f"sample exceeds {max_sample_bytes} bytes; member not held"
                )
            else:
                held_bytes += len(member.data)
        held.append(member)
    if key is not None:
        yield Sample(key, held)


def split_key(name: str) -> tuple[str, str]:
    """Webdataset's rule: the key is the name up to the first dot of its basename."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot:
        return name, ""
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _member(name: str, data: bytes | None, error: str | None, mtime: int) -> Member:
    key, extension = split_key(name)
    return Member(name=name, key=key, extension=extension, data=data, error=error, mtime=mtime)


def _text(raw: bytes) -> str:
    """Names are UTF-8 in practice (pax requires it); other bytes are escaped visibly rather than replaced,
    so two different names don't become one."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace")


def _cstring(field: bytes) -> bytes:
    return field.split(b"\x00", 1)[0]


def _number(field: bytes) -> int:
    """An octal field (NUL or space padded) or a GNU base-256 one (high bit of the first byte set)."""
    if field and field[0] & 0x80:
        if field[0] & 0x40:  # negative: two's complement over the whole field
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.lstrip(b" \x00").split(b"\x00", 1)[0].strip(b" ")
    if not digits:
        return 0
    if not _OCTAL.fullmatch(digits):
        raise ValueError(f"not an octal number: {field!r}")
    return int(digits, 8)


def _mtime(seconds: int) -> int:
    """A header's mtime, or 0 (unknown) when its nanoseconds would not fit the int64 ``file_mtime_ns``
    column: a base-256 field or a pax record can say anything."""
    return seconds if -MTIME_LIMIT <= seconds <= MTIME_LIMIT else 0


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _number(block[148:156])
    except ValueError:
        return False
    # The checksum field counts as 8 spaces; some old writers summed signed bytes, which tarfile accepts too.
    return stored in (sum(_UNSIGNED.unpack(block)) + 256, sum(_SIGNED.unpack(block)) + 256)


def _is_unsafe(name: str) -> bool:
    """Absolute, or with a '..' component (backslashes count as separators too: Windows tools honour them)."""
    return name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name)


def _pax_records(payload: bytes, offset: int) -> dict[str, bytes]:
    """Records "LEN KEY=VALUE\\n", LEN counting the whole record. Only the keys used here are kept."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(payload):
        if payload[pos] == 0 and payload.count(b"\x00", pos) == len(payload) - pos:  # NUL padding at the end
            break  # (counted, not sliced: a copy of the rest per record is quadratic in a hostile header)
        space = payload.find(b" ", pos, pos + 21)
        length_text = payload[pos:space] if space > pos else b""
        length = int(length_text) if _DECIMAL.fullmatch(length_text) else 0
        end = pos + length
        if length <= space - pos + 1 or end > len(payload) or payload[end - 1] != 0x0A:
            raise ShardError(f"not a tar archive, or corrupt at byte {offset} (pax record)")
        keyword, equals, value = payload[space + 1 : end - 1].partition(b"=")
        if not equals:
            raise ShardError(f"not a tar archive, or corrupt at byte {offset} (pax record)")
        name = keyword.decode("utf-8", "replace")
        if name in PAX_KEYS or name == "GNU.sparse.name":
            records[name] = value
        elif name.startswith("GNU.sparse."):
            records[SPARSE] = b"1"  # only noticed: a pax sparse member is an error row (its map isn't read)
        pos = end
    return records


def _size_and_mtime(block: bytes, start: int) -> tuple[int, int]:
    """A header's size and mtime fields. A bad size makes the rest of the stream unreadable (where the
    next header starts is unknown), so it ends the shard; a bad mtime only costs the mtime (0)."""
    try:
        size = _number(block[124:136])
    except ValueError:
        size = -1
    if size < 0:
        raise ShardError(f"not a tar archive, or corrupt at byte {start} (size field)")
    try:
        mtime = _mtime(_number(block[136:148]))
    except ValueError:
        mtime = 0
    return size, mtime


def _extended_fields(
    block: bytes, long_name: str | None, pax: dict[str, bytes], start: int, size: int, mtime: int
) -> tuple[str, int, int]:
    """The member's name, size and mtime: the header's own fields, overridden by a GNU long name and
    then by pax records (GNU.sparse.name before path), the more specific source winning."""
    raw_name = _cstring(block[0:100])
    if block[257:263] == POSIX_MAGIC:
        prefix = _cstring(block[345:500])
        if prefix:
            raw_name = prefix + b"/" + raw_name
    name = _text(raw_name)
    if long_name is not None:
        name = long_name
    if "GNU.sparse.name" in pax:
        name = _text(pax["GNU.sparse.name"])
    elif "path" in pax:
        name = _text(pax["path"])
    if "size" in pax:
        # A bad pax size, like a bad header size, leaves the next header's position unknown.
        if not _DECIMAL.fullmatch(pax["size"]) or len(pax["size"]) > SIZE_DIGITS:
            raise ShardError(f"not a tar archive, or corrupt at byte {start} (pax size)", name, mtime)
        size = int(pax["size"])
    if "mtime" in pax:
        with contextlib.suppress(ValueError, OverflowError):  # unparsable: the header's mtime stands
            mtime = _mtime(int(float(pax["mtime"])))
    return name, size, mtime


def _is_skipped(kind: bytes, name: str) -> bool:
    """Headers that are neither samples nor error rows (directories, dump directories, volume labels).
    Old (v7) tars mark directories only by a trailing slash (tarfile's rule: type NUL only)."""
    return kind in SKIPPED or (kind == b"\x00" and name.endswith("/"))


class _Reader:
    """One shard's headers and data, read front to back."""

    def __init__(self, stream: BinaryIO, max_member_bytes: int) -> None:
        self._stream = stream
        self._max = max_member_bytes
        self._offset = 0  # bytes consumed: where the errors say they happened
        self._seen: set[str] = set()  # names already given a row: a row's address must name one member
        self._ended = False

    def _read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream (short reads are retried)."""
        if n <= 0:
            return b""
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = self._stream.read(min(n - got, READ_CHUNK))
            if not chunk:
                break
            parts.append(chunk if isinstance(chunk, bytes) else bytes(chunk))
            got += len(chunk)
        self._offset += got
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _skip(self, n: int) -> int:
        """Read and drop up to ``n`` bytes, a chunk at a time; how many there were."""
        done = 0
        while done < n:
            chunk = self._stream.read(min(n - done, SKIP_CHUNK))
            if not chunk:
                break
            done += len(chunk)
        self._offset += done
        return done

    def _data(self, size: int, what: str, name: str, mtime: int, keep: bool) -> bytes | None:
        """A record's ``size`` bytes and its padding to the next block; kept only if ``keep``. Cut short,
        it's a ShardError: partial data never leaves here."""
        data = self._read(size) if keep else None
        got = len(data) if data is not None else self._skip(size)
        if got < size:
            raise ShardError(
                f"truncated shard: ended inside {what} (read {got} of {size} bytes)", name, mtime
            )
        padding = -size % BLOCK
        if self._skip(padding) < padding:
            raise ShardError(f"truncated shard: ended inside the padding after {what}", name, mtime)
        return data

    def _header(self) -> bytes | None:
        """The next header block, or None at the end of the archive."""
        start = self._offset
        block = self._read(BLOCK)
        if not block:
            if start == 0:
                raise ShardError("not a tar archive (empty)")
            return None
        if len(block) < BLOCK:
            if start == 0:
                raise ShardError(f"not a tar archive, or truncated: {len(block)} bytes, less than one header")
            raise ShardError(f"truncated shard: ended inside a header at byte {start}")
        if block == ZERO_BLOCK:
            # Two zero blocks end the archive; so does the end of the stream after one. A lone zero block
            # before another header is passed over, as GNU tar's --ignore-zeros does, to keep what follows.
            start = self._offset
            block = self._read(BLOCK)
            if not block or block == ZERO_BLOCK:
                return None
            if len(block) < BLOCK:
                raise ShardError(f"truncated shard: ended inside a header at byte {start}")
        if not _checksum_ok(block):
            raise ShardError(f"not a tar archive, or corrupt at byte {start} (header checksum)")
        return block

    def next_member(self) -> Member | None:
        """The next row: a regular file's member or an error member; None at the end of the archive."""
        if self._ended:
            return None
        # Extended headers (GNU long name, pax records) describe the next real header, so they are
        # gathered across loop turns and dropped once a header consumes them.
        long_name: str | None = None
        pax: dict[str, bytes] = {}
        while True:
            block = self._header()
            if block is None:
                self._end_of_archive(long_name, pax)
                return None
            start = self._offset - BLOCK  # a lone zero block may have been passed over
            kind = block[156:157]
            size, mtime = _size_and_mtime(block, start)
            if kind in METADATA:
                long_name, pax = self._metadata(kind, size, start, long_name, pax)
                continue
            name, size, mtime = _extended_fields(block, long_name, pax, start, size, mtime)
            sparse = kind == b"S" or SPARSE in pax
            if _is_skipped(kind, name):
                if kind in (b"D", b"V"):  # GNU dump directories carry data; the others have none
                    self._data(size, f"member {name!r}", name, mtime, keep=False)
                long_name, pax = None, {}
                continue
            return self._file_member(block, kind, name, size, mtime, sparse)

    def _end_of_archive(self, long_name: str | None, pax: dict[str, bytes]) -> None:
        """Mark the shard ended; an extended header with no member after it means the stream was cut
        short, which is the shard's final error rather than a silent end."""
        self._ended = True
        if long_name is not None or "path" in pax:
            name = _text(pax["path"]) if "path" in pax else long_name or ""
            raise ShardError(
                "truncated shard: the archive ends after an extended header, before its member", name
            )

    def _metadata(
        self, kind: bytes, size: int, start: int, long_name: str | None, pax: dict[str, bytes]
    ) -> tuple[str | None, dict[str, bytes]]:
        """Read one metadata record (pax, GNU long name, ...) and fold it into the pending long name and
        pax records. Its size is capped first: metadata is held in memory, member data is not."""
        if size > METADATA_CAP:
            raise ShardError(
                f"corrupt shard: a tar metadata record at byte {start} declares {size} bytes "
                f"(limit {METADATA_CAP})"
            )
        what = f"a tar metadata record at byte {start}"
        payload = self._data(size, what, "", 0, keep=True) or b""
        if kind in PAX:
            pax.update(_pax_records(payload, start))
            # An empty value unsets a keyword (POSIX): the header's own field applies again.
            pax = {k: v for k, v in pax.items() if v}
        elif kind == b"L":
            long_name = _text(_cstring(payload))
        # "g" (global pax) and "K" (long link name) say nothing this reader uses.
        return long_name, pax

    def _file_member(
        self, block: bytes, kind: bytes, name: str, size: int, mtime: int, sparse: bool
    ) -> Member:
        """The row for a non-metadata, non-skipped header: links and special files have no data to
        consume; anything else has its data read (kept only if the member is usable)."""
        if kind in LINKS:
            return self._row(name, "a link, not a file (tar member)", mtime)
        if kind in SPECIAL:
            return self._row(name, "not a regular file (tar member)", mtime)
        if kind == b"S":
            self._sparse_extensions(block, name, mtime)
        error = self._member_error(kind, name, size, sparse)
        # Data is consumed before the row is made: a member cut short is the shard's final error
        # member instead, never a row of its own as well.
        data = self._data(size, f"member {name!r}", name, mtime, keep=error is None)
        if error is not None:
            return self._row(name, error, mtime)
        self._seen.add(name)
        return _member(name, data, None, mtime)

    def _member_error(self, kind: bytes, name: str, size: int, sparse: bool) -> str | None:
        """Why this member can't be a sample, or None if it can; the first reason that applies wins,
        so the order of the checks is the order of the messages' precedence."""
        if sparse:
            return "a sparse file, not supported (tar member)"
        if kind not in REGULAR:
            return "not a regular file (tar member)"
        if name == "":
            return "no member name (tar member)"
        if _is_unsafe(name):
            return "unsafe member name (absolute or ..)"
        if name in self._seen:
            return "duplicate member name in this shard"
        if size == 0:
            return "empty file"
        if size > self._max:
            return f"{size} bytes, over the limit of {self._max} per member"
        return None

    def _row(self, name: str, error: str, mtime: int) -> Member:
        self._seen.add(name)
        return _member(name, None, error, mtime)

    def _sparse_extensions(self, block: bytes, name: str, mtime: int) -> None:
        """An old GNU sparse header may be followed by extension blocks (flag at byte 482 of the header,
        byte 504 of each extension) before its data: they are read and dropped."""
        extended = block[482]
        while extended:
            start = self._offset
            extension = self._read(BLOCK)
            if len(extension) < BLOCK:
                raise ShardError(
                    f"truncated shard: ended inside a sparse header at byte {start}", name, mtime
                )
            extended = extension[504]
