"""``to_shards``: the kept samples of webdataset shards, written again into new shards.

Each source shard is read once, front to back, by the scorer's own reader (``tars.samples``: one sample's
bytes held at a time, local or remote alike), and stops being read once its last kept sample is found.
Every member of a kept sample is written byte for byte under its own name (so its key is unchanged), in
the input's order, followed by ``<key>.perceptscore.json``. The headers are pax (``tarfile``'s own
``TarInfo.tobuf``) written by this module rather than by ``TarFile``, which keeps a ``TarInfo`` for every
member it writes: memory stays one sample, whatever the shard sizes. A member's mtime is the input's
(whole seconds); mode is normalised to 0644, owner to uid/gid 0 with no user or group names.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

from perceptscore import remote, tars
from perceptscore.errors import DecodeError, UsageError
from perceptscore.locators import TAR_SCHEME, TarMember, open_shard
from perceptscore.sinks import create_new
from perceptscore.writeback._common import (
    Missing,
    Stat,
    WrittenBack,
    check_columns,
    column_values,
    expected_stat,
    json_value,
    prepare_folder,
    same_stat,
    shown,
)

SCORES_SUFFIX = ".perceptscore.json"
RECORD = tarfile.RECORDSIZE  # a tar file is padded to a multiple of this, as tar and tarfile write them
WRITE_BUFFER = 1 << 20


@dataclass
class _Row:
    uri: str  # the row's ``path``: what a missing line names
    position: int  # its row in the scores table: where its missing line goes
    name: str  # the member it scored
    scores: dict[str, Any]
    stat: Stat | None  # (size, mtime_ns) when it was scored


def to_shards(
    rows: pd.DataFrame, out_dir: Path, *, score_columns: Sequence[str], samples_per_shard: int = 10_000
) -> WrittenBack:
    """The kept rows' samples, grouped by source shard in the order the rows first name each, into
    ``out_dir/00000.tar, 00001.tar ...`` of at most ``samples_per_shard`` samples each."""
    if samples_per_shard < 1:
        raise UsageError(f"samples per shard must be at least 1 (got {samples_per_shard})")
    columns = check_columns(rows, score_columns)
    out = prepare_folder(out_dir)
    result, missing = WrittenBack(), Missing()
    plan = _plan(rows, columns, missing)
    writer = _ShardWriter(out, samples_per_shard)
    try:
        for shard, wanted in plan.items():
            _copy_shard(shard, wanted, writer, missing)
        writer.close()
    finally:
        writer.abort()  # removes a partial shard after a failure; nothing once closed
    result.files, result.samples, result.missing = writer.files, writer.samples, missing.lines()
    return result


def _plan(rows: pd.DataFrame, columns: list[str], missing: Missing) -> dict[str, dict[str, list[_Row]]]:
    """shard -> sample key -> its kept rows, shards in first-appearance order. A row that is no tar member
    is a missing line; a row named twice is written once (its first row's scores)."""
    plan: dict[str, dict[str, list[_Row]]] = {}
    seen: set[str] = set()
    values = [column_values(rows, c) for c in columns]
    sizes, versions = column_values(rows, "file_size"), column_values(rows, "file_mtime_ns")
    for i, uri in enumerate(rows["path"].tolist()):
        if not isinstance(uri, str) or not uri.startswith(TAR_SCHEME) or "::" not in uri:
            missing.add(i, str(uri), "not a tar member (its sample can't be written to shards)")
            continue
        if uri in seen:
            continue
        seen.add(uri)
        name, shard = TarMember(uri).parts()
        key, _ = tars.split_key(name)  # the reader's own rule, so keys match what it yields
        scores = {c: json_value(v[i]) for c, v in zip(columns, values, strict=True)}
        row = _Row(uri, i, name, scores, expected_stat(sizes[i], versions[i]))
        plan.setdefault(shard, {}).setdefault(key, []).append(row)
    return plan


def _copy_shard(shard: str, wanted: dict[str, list[_Row]], writer: _ShardWriter, missing: Missing) -> None:
    """Every wanted sample of one shard, written as it streams past; whatever is not found, or can't be
    read, is a missing line per row."""
    broken = ""
    try:
        stream = open_shard(shard)
    except DecodeError as exc:
        broken = f"unreadable shard ({exc})"
    else:
        limit = remote.max_bytes()
        try:
            with stream:
                broken = _stream_samples(tars.samples(stream, limit, 4 * limit), wanted, writer, missing)
        except OSError as exc:  # a remote shard's connection failed mid-read, past its retries
            broken = f"unreadable shard ({remote.read_failure(exc)})"
        except DecodeError as exc:
            broken = f"unreadable shard ({exc})"
    for rows in wanted.values():
        for row in rows:
            reason = broken or f"no member {row.name!r} in {shown(shard)}"
            missing.add(row.position, row.uri, reason)


def _stream_samples(
    samples: Any, wanted: dict[str, list[_Row]], writer: _ShardWriter, missing: Missing
) -> str:
    """Writes the wanted samples and takes their rows out of ``wanted``; stops once none is left. Returns
    why the shard broke off ("" if it did not)."""
    for sample in samples:
        fatal = next((m for m in sample.members if m.fatal), None)
        if fatal is not None:
            return f"the shard broke off at or before this sample ({fatal.error})"
        rows = wanted.get(sample.key)
        if not rows:
            continue
        names = {m.name for m in sample.members}
        here = [r for r in rows if r.name in names]
        if not here:  # the key's member is in another run of the same key (a shard out of order)
            continue
        problem = _problem(sample, here)
        if problem:
            for row in here:
                missing.add(row.position, row.uri, problem)
        else:
            writer.write(_members_out(sample, here[0].scores))
        rows[:] = [r for r in rows if r not in here]
        if not rows:
            del wanted[sample.key]
        if not wanted:
            return ""  # every kept sample of this shard is written: the rest is never read
    return ""


def _problem(sample: tars.Sample, rows: list[_Row]) -> str:
    """Why this sample can't be copied whole ("" if it can): a member the reader could not hold (over
    the size limit, a link, a duplicate name ...), or a scored member whose size or mtime changed."""
    for member in sample.members:
        if member.error or member.data is None:
            return f"member {member.name!r} can't be copied ({member.error or 'unreadable'})"
    by_name = {m.name: m for m in sample.members}
    for row in rows:
        member = by_name[row.name]
        if row.stat is not None and not same_stat(row.stat, len(member.data or b""), member.mtime * 10**9):
            return "the shard changed since it was scored (this member's size or mtime differs)"
    return ""


def _members_out(sample: tars.Sample, scores: dict[str, Any]) -> list[tuple[str, bytes, int]]:
    """(name, bytes, mtime) to write: the sample's members as they were, then its scores. A scores member
    the sample already has (a write-back scored again) is replaced, not duplicated."""
    scores_name = f"{sample.key}{SCORES_SUFFIX}"
    kept = [(m.name, m.data or b"", m.mtime) for m in sample.members if m.name != scores_name]
    mtime = max((m.mtime for m in sample.members), default=0)
    text = json.dumps(scores, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return [*kept, (scores_name, text.encode("utf-8"), mtime)]


class _ShardWriter:
    """Samples into ``00000.tar, 00001.tar ...`` of at most ``per_shard`` samples; each written under a
    temporary name and renamed when complete, so a file under its final name is always whole."""

    def __init__(self, folder: Path, per_shard: int) -> None:
        self._folder, self._per_shard = folder, per_shard
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None
        self._in_shard = 0
        self.files: list[str] = []
        self.samples = 0

    def write(self, members: list[tuple[str, bytes, int]]) -> None:
        if self._file is None:
            self._open()
        assert self._file is not None
        for name, data, mtime in members:
            self._file.write(_header(name, len(data), mtime))
            self._file.write(data)
            self._file.write(bytes(-len(data) % tarfile.BLOCKSIZE))
        self._in_shard += 1
        self.samples += 1
        if self._in_shard == self._per_shard:
            self.close()

    def _open(self) -> None:
        name = f"{len(self.files):05d}.tar"  # 5 digits, more past 99999
        self._tmp = self._folder / f".{name}.partial-{os.getpid()}"
        self._file = io.BufferedWriter(io.FileIO(create_new(self._tmp), "wb"), WRITE_BUFFER)
        self._in_shard = 0

    def close(self) -> None:
        """Ends the current shard (two zero blocks, padded to a whole record) and gives it its name."""
        if self._file is None or self._tmp is None:
            return
        written = self._file.tell()
        end = written + 2 * tarfile.BLOCKSIZE
        self._file.write(bytes(end - written + (-end % RECORD)))
        self._file.close()
        final = self._folder / f"{len(self.files):05d}.tar"
        os.replace(self._tmp, final)
        self.files.append(str(final))
        self._file = self._tmp = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._file = self._tmp = None


_USTAR_LIMIT = 8**11  # a size or mtime in 11 octal digits: no pax record needed
# A plain member's header after its name, size and mtime: mode 0644, uid/gid 0, a regular file, no link,
# the ustar magic, empty owner names, no device numbers (a regular file has none), no prefix: ``tarfile``'s
# bytes for the same member (Python 3.11 leaves the device fields empty too).
_MODE_OWNER = b"0000644\x000000000\x000000000\x00"
_AFTER_CHECKSUM = b"0" + bytes(100) + b"ustar\x0000" + bytes(64 + 16 + 167)
_CHECKSUM_BASE = 8 * ord(" ") + sum(_MODE_OWNER) + sum(_AFTER_CHECKSUM)  # the checksum field: 8 spaces


def _header(name: str, size: int, mtime: int) -> bytes:
    """A member's header: a short ASCII name with an ordinary size and mtime (nearly every member) built
    here, byte for byte what ``tarfile`` writes for it (a ustar block: it needs no pax record), without
    its per-member cost; anything else by ``tarfile`` itself (``_pax_header``)."""
    if name.isascii() and 0 < len(name) <= 100 and 0 <= size < _USTAR_LIMIT and 0 <= mtime < _USTAR_LIMIT:
        raw = name.encode("ascii")
        if b"\x00" not in raw:
            numbers = b"%011o\x00%011o\x00" % (size, mtime)
            checksum = _CHECKSUM_BASE + sum(raw) + sum(numbers)
            return raw.ljust(100, b"\x00") + _MODE_OWNER + numbers + b"%06o\x00 " % checksum + _AFTER_CHECKSUM
    return _pax_header(name, size, mtime)


def _pax_header(name: str, size: int, mtime: int) -> bytes:
    """A member's pax header: a long name, a large size or an odd mtime get pax records."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
