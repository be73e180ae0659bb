"""perceptscore.tars: webdataset shards written by Python's tarfile (the formats img2dataset's writers
produce) and hand-made hostile bytes, read back member by member and sample by sample."""

from __future__ import annotations

import io
import json
import random
import tarfile
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

import pytest

from perceptscore import tars
from perceptscore.tars import Member, Sample, members, samples

MB = 1 << 20
MTIME = 1_700_000_000


def shard(entries: Iterable[tuple[str, bytes] | tarfile.TarInfo], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar archive, as tarfile writes it: (name, data) pairs are regular files, TarInfos go in as given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                archive.addfile(entry)
                continue
            name, data = entry
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), MTIME
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    result = tarfile.TarInfo(name)
    result.type, result.linkname, result.mtime = kind, linkname, MTIME
    return result


def with_checksum(header: bytearray) -> bytes:
    """A header block whose checksum field is recomputed after editing it."""
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def read(data: bytes, max_member_bytes: int = MB) -> list[Member]:
    return list(members(io.BytesIO(data), max_member_bytes))


def rows(data: bytes, max_member_bytes: int = MB) -> list[tuple[str, bytes | None, str | None]]:
    return [(m.name, m.data, m.error) for m in read(data, max_member_bytes)]


def img2dataset_entries(count: int = 4) -> list[tuple[str, bytes]]:
    rng = random.Random(7)
    entries = []
    for i in range(count):
        key = f"{i:09d}"
        entries.append((f"{key}.jpg", rng.randbytes(rng.randint(600, 5000))))
        entries.append((f"{key}.txt", f"caption {i}".encode()))
        entries.append((f"{key}.json", json.dumps({"key": key, "width": 64}).encode()))
    return entries


class ShortReads:
    """A body that hands out at most 7 bytes a call, as a network stream may."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._inner.read(min(n, 7) if n >= 0 else 7)


class NoSeek:
    """A body that can only be read: any seek or tell fails the test."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._inner.read(n)

    def seek(self, *args: object) -> int:
        raise AssertionError("seek called")

    def tell(self) -> int:
        raise AssertionError("tell called")


def test_img2dataset_shard_members_and_samples() -> None:
    entries = img2dataset_entries()
    data = shard(entries)
    got = read(data)
    assert [(m.name, m.data) for m in got] == entries
    assert [(m.key, m.extension, m.error, m.mtime) for m in got[:3]] == [
        ("000000000", "jpg", None, MTIME),
        ("000000000", "txt", None, MTIME),
        ("000000000", "json", None, MTIME),
    ]
    grouped = list(samples(io.BytesIO(data), MB, 10 * MB))
    assert [s.key for s in grouped] == [f"{i:09d}" for i in range(4)]
    assert all(isinstance(s, Sample) for s in grouped)
    assert [[(m.extension, m.data) for m in s.members] for s in grouped] == [
        [("jpg", entries[i][1]), ("txt", entries[i + 1][1]), ("json", entries[i + 2][1])]
        for i in range(0, 12, 3)
    ]


def test_keys_extensions_and_directories() -> None:
    data = shard(
        [
            info("part", tarfile.DIRTYPE),
            ("part/000001.SEG.PNG", b"png"),
            ("part/000001.jpg", b"jpg"),
            ("./noext", b"x"),
            ("part.d/000002.Json", b"{}"),
        ]
    )
    got = read(data)
    assert [(m.name, m.key, m.extension, m.data) for m in got] == [
        ("part/000001.SEG.PNG", "part/000001", "seg.png", b"png"),
        ("part/000001.jpg", "part/000001", "jpg", b"jpg"),
        ("./noext", "./noext", "", b"x"),
        ("part.d/000002.Json", "part.d/000002", "json", b"{}"),
    ]
    assert [(s.key, len(s.members)) for s in samples(io.BytesIO(data), MB, MB)] == [
        ("part/000001", 2),
        ("./noext", 1),
        ("part.d/000002", 1),
    ]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_come_back_whole(fmt: int) -> None:
    # ustar can only split a long name at a slash into prefix (155) + name (100): that case is kept short.
    long = "d" * 120 + "/" + "x" * 90 + ".jpg"
    if fmt != tarfile.USTAR_FORMAT:
        long = "d" * 150 + "/" + "é" * 60 + "/" + "x" * 200 + ".jpg"
    entries = [(long, b"long one"), ("short.txt", b"short")]
    got = read(shard(entries, fmt))
    assert [(m.name, m.data, m.error) for m in got] == [(n, d, None) for n, d in entries]
    assert (got[0].key, got[0].extension) == (long[: -len(".jpg")], "jpg")


def test_base256_size_field() -> None:
    header = bytearray(tarfile.TarInfo("big.jpg").tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"\x80" + (5).to_bytes(11, "big")
    data = with_checksum(header) + padded(b"abcde") + shard([("next.txt", b"next")])
    assert rows(data) == [("big.jpg", b"abcde", None), ("next.txt", b"next", None)]


def test_pax_size_and_mtime_override_the_header() -> None:
    header = tarfile.TarInfo("a.jpg")
    header.size, header.mtime = 0, 5
    header.pax_headers = {"size": "5", "mtime": "1700000000.75"}
    data = header.tobuf(tarfile.PAX_FORMAT) + padded(b"12345") + shard([("b.txt", b"b")])
    got = read(data)
    assert [(m.name, m.data, m.mtime) for m in got] == [("a.jpg", b"12345", MTIME), ("b.txt", b"b", MTIME)]


def test_global_pax_header_is_ignored() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}) as t:
        member = tarfile.TarInfo("a.jpg")
        member.size = 3
        t.addfile(member, io.BytesIO(b"abc"))
    assert buffer.getvalue()[156:157] == b"g"  # the case is really there
    assert rows(buffer.getvalue()) == [("a.jpg", b"abc", None)]


def test_truncated_inside_a_member_keeps_earlier_members_and_never_partial_bytes() -> None:
    entries = [("a.jpg", b"A" * 700), ("a.txt", b"caption"), ("b.jpg", bytes(range(256)) * 8)]
    data = shard(entries)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        offset = archive.getmember("b.jpg").offset_data
    got = read(data[: offset + 100])
    assert [(m.name, m.data, m.error) for m in got] == [
        ("a.jpg", b"A" * 700, None),
        ("a.txt", b"caption", None),
        ("b.jpg", None, "truncated shard: ended inside member 'b.jpg' (read 100 of 2048 bytes)"),
    ]
    assert (got[-1].key, got[-1].extension) == ("b", "jpg")
    grouped = list(samples(io.BytesIO(data[: offset + 100]), MB, MB))
    assert [(s.key, [m.name for m in s.members]) for s in grouped] == [
        ("a", ["a.jpg", "a.txt"]),
        ("b", ["b.jpg"]),
    ]


def test_truncated_in_padding_or_header() -> None:
    data = shard([("a.jpg", b"A" * 700), ("b.jpg", b"B" * 10)])
    # a.jpg: header 0-512, data 512-1212, padding to 1536; b.jpg's header 1536-2048.
    assert rows(data[:1300]) == [
        ("a.jpg", None, "truncated shard: ended inside the padding after member 'a.jpg'")
    ]
    got = read(data[:1600])
    assert [(m.name, m.data, m.error) for m in got] == [
        ("a.jpg", b"A" * 700, None),
        ("", None, "truncated shard: ended inside a header at byte 1536"),
    ]
    # A shard-level error without a member is a sample of its own, key "".
    assert [(s.key, len(s.members)) for s in samples(io.BytesIO(data[:1600]), MB, MB)] == [("a", 1), ("", 1)]


def test_end_of_stream_without_end_marker_is_a_normal_end() -> None:
    data = shard([("a.jpg", b"A" * 700)])
    assert rows(data[:1536]) == [("a.jpg", b"A" * 700, None)]


def test_lone_zero_block_between_members_is_passed_over() -> None:
    first = shard([("a.jpg", b"a")])[:1024]
    data = first + bytes(512) + shard([("b.jpg", b"b")])
    assert rows(data) == [("a.jpg", b"a", None), ("b.jpg", b"b", None)]


def test_links_and_special_files_are_error_rows() -> None:
    data = shard(
        [
            ("a.jpg", b"real"),
            info("b.jpg", tarfile.SYMTYPE, "a.jpg"),
            info("c.jpg", tarfile.LNKTYPE, "a.jpg"),
            info("d.jpg", tarfile.FIFOTYPE),
            info("e.jpg", tarfile.CHRTYPE),
            ("f.jpg", b"after"),
        ]
    )
    assert rows(data) == [
        ("a.jpg", b"real", None),
        ("b.jpg", None, "a link, not a file (tar member)"),
        ("c.jpg", None, "a link, not a file (tar member)"),
        ("d.jpg", None, "not a regular file (tar member)"),
        ("e.jpg", None, "not a regular file (tar member)"),
        ("f.jpg", b"after", None),
    ]


def test_gnu_sparse_member_is_an_error_row_and_its_data_skipped() -> None:
    header = bytearray(tarfile.TarInfo("sparse.jpg").tobuf(tarfile.GNU_FORMAT))
    header[156:157] = b"S"
    header[124:136] = b"%011o\x00" % 600
    header[482] = 1  # extension blocks follow, each flagging whether another one does (byte 504)
    more, last = bytearray(512), bytearray(512)
    more[0:12] = last[0:12] = b"%011o\x00" % 0  # a sparse entry's offset
    more[504] = 1
    extensions = bytes(more) + bytes(last)
    data = with_checksum(header) + extensions + padded(b"S" * 600) + shard([("next.jpg", b"next")])
    assert rows(data) == [
        ("sparse.jpg", None, "a sparse file, not supported (tar member)"),
        ("next.jpg", b"next", None),
    ]


def test_unsafe_names_are_error_rows_with_the_name_as_stored() -> None:
    names = ["../x.jpg", "/etc/x.jpg", "a/../../x.jpg", "a/..", "..\\x.jpg"]
    data = shard([*[(n, b"bad") for n in names], ("a/..b.jpg", b"fine")])
    assert rows(data) == [(n, None, "unsafe member name (absolute or ..)") for n in names] + [
        ("a/..b.jpg", b"fine", None)
    ]


def test_empty_member() -> None:
    assert rows(shard([("a.jpg", b""), ("a.txt", b"t")])) == [
        ("a.jpg", None, "empty file"),
        ("a.txt", b"t", None),
    ]


def test_over_limit_member_is_skipped_in_chunks_keeping_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tars, "SKIP_CHUNK", 1000)  # several skip chunks, one not block-aligned
    big = random.Random(1).randbytes(5000)
    data = shard([("big.jpg", big), ("small.jpg", b"small" * 100), ("big.txt", big[:1001])])
    assert rows(data, max_member_bytes=1000) == [
        ("big.jpg", None, "5000 bytes, over the limit of 1000 per member"),
        ("small.jpg", b"small" * 100, None),
        ("big.txt", None, "1001 bytes, over the limit of 1000 per member"),
    ]


def test_pax_record_declaring_a_gibibyte_is_a_shard_error_without_allocating() -> None:
    header = bytearray(tarfile.TarInfo("././@PaxHeader").tobuf(tarfile.USTAR_FORMAT))
    header[156:157] = b"x"
    header[124:136] = b"%011o\x00" % (1 << 30)
    data = shard([("a.jpg", b"a")])[:1024] + with_checksum(header) + b"30 path=whatever\n"
    tracemalloc.start()
    try:
        got = read(data, max_member_bytes=2 << 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(m.name, m.data, m.error) for m in got] == [
        ("a.jpg", b"a", None),
        (
            "",
            None,
            "corrupt shard: a tar metadata record at byte 1024 declares 1073741824 bytes (limit 1048576)",
        ),
    ]
    assert peak < 50 * MB


def test_gnu_long_name_over_the_cap_is_a_shard_error() -> None:
    header = bytearray(tarfile.TarInfo("././@LongLink").tobuf(tarfile.GNU_FORMAT))
    header[156:157] = b"L"
    header[124:136] = b"%011o\x00" % (tars.METADATA_CAP + 1)
    assert rows(with_checksum(header) + b"x" * 600) == [
        ("", None, "corrupt shard: a tar metadata record at byte 0 declares 1048577 bytes (limit 1048576)")
    ]


def test_member_declaring_far_more_than_the_file_holds_is_truncated_without_allocating(
    tmp_path: Path,
) -> None:
    header = bytearray(tarfile.TarInfo("huge.jpg").tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"\x80" + (1 << 33).to_bytes(11, "big")
    path = tmp_path / "00000.tar"
    path.write_bytes(with_checksum(header) + b"x" * 3000)
    tracemalloc.start()
    try:
        with path.open("rb") as stream:  # a real file: BufferedReader allocates what each read asks for
            got = list(members(stream, 16 << 30))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(m.name, m.data, m.error) for m in got] == [
        ("huge.jpg", None, f"truncated shard: ended inside member 'huge.jpg' (read 3000 of {1 << 33} bytes)")
    ]
    assert peak < 50 * MB


def test_pax_header_then_end_of_stream() -> None:
    data = shard([("a" * 150 + ".jpg", b"x")])
    assert rows(data[:1024]) == [
        (
            "a" * 150 + ".jpg",
            None,
            "truncated shard: the archive ends after an extended header, before its member",
        )
    ]


def test_duplicate_names_keep_the_first() -> None:
    data = shard([("a.jpg", b"first"), ("a.txt", b"t"), ("a.jpg", b"second"), ("b.jpg", b"b")])
    assert rows(data) == [
        ("a.jpg", b"first", None),
        ("a.txt", b"t", None),
        ("a.jpg", None, "duplicate member name in this shard"),
        ("b.jpg", b"b", None),
    ]


def test_bad_checksum_in_the_middle_ends_the_shard() -> None:
    data = bytearray(shard([("a.jpg", b"a"), ("b.jpg", b"b"), ("c.jpg", b"c")]))
    data[1024 + 10] ^= 0x01  # b.jpg's header, inside its name
    assert rows(bytes(data)) == [
        ("a.jpg", b"a", None),
        ("", None, "not a tar archive, or corrupt at byte 1024 (header checksum)"),
    ]


def test_not_a_tar_archive() -> None:
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + random.Random(3).randbytes(3000)
    assert rows(jpeg) == [("", None, "not a tar archive, or corrupt at byte 0 (header checksum)")]
    assert rows(jpeg[:100]) == [
        ("", None, "not a tar archive, or truncated: 100 bytes, less than one header")
    ]


def test_empty_stream() -> None:
    assert rows(b"") == [("", None, "not a tar archive (empty)")]
    assert [(s.key, [m.error for m in s.members]) for s in samples(io.BytesIO(b""), MB, MB)] == [
        ("", ["not a tar archive (empty)"])
    ]


def hostile_shard() -> bytes:
    """A bit of everything, cut short at the end."""
    entries: list[tuple[str, bytes] | tarfile.TarInfo] = [
        *img2dataset_entries(2),
        ("x" * 130 + ".jpg", b"long"),
        info("link.jpg", tarfile.SYMTYPE, "x.jpg"),
        ("../up.jpg", b"up"),
        ("empty.jpg", b""),
        ("big.jpg", b"B" * 5000),
        ("000000000.jpg", b"dup"),
        ("last.jpg", b"L" * 2000),
    ]
    data = shard(entries)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return data[: archive.getmember("last.jpg").offset_data + 1024]


def test_short_reads_give_the_same_rows() -> None:
    data = hostile_shard()
    expected = read(data, max_member_bytes=4000)
    assert expected[-1].error == "truncated shard: ended inside member 'last.jpg' (read 1024 of 2000 bytes)"
    assert len(expected) == 13 and sum(m.data is not None for m in expected) == 7
    assert list(members(ShortReads(data), 4000)) == expected  # type: ignore[arg-type]
    assert list(samples(ShortReads(data), 4000, MB)) == list(samples(io.BytesIO(data), 4000, MB))  # type: ignore[arg-type]


def test_no_seek_is_used() -> None:
    data = hostile_shard()
    assert list(members(NoSeek(data), 4000)) == read(data, 4000)  # type: ignore[arg-type]


def test_samples_bound_the_bytes_held_per_sample() -> None:
    payload = b"z" * 10 * 1024
    data = shard([(f"same.{i:04d}.bin", payload) for i in range(1000)])
    grouped = list(samples(io.BytesIO(data), MB, 100 * 1024))
    assert len(grouped) == 1 and grouped[0].key == "same"
    held = [m for m in grouped[0].members if m.data is not None]
    refused = [m for m in grouped[0].members if m.data is None]
    assert [m.name for m in held] == [f"same.{i:04d}.bin" for i in range(10)]
    assert all(m.data == payload for m in held)
    assert len(refused) == 990
    assert {m.error for m in refused} == {"sample exceeds 102400 bytes; member not held"}
    assert refused[0].name == "same.0010.bin"


def test_samples_cap_is_per_sample() -> None:
    data = shard([("a.jpg", b"1" * 600), ("a.txt", b"2" * 600), ("b.jpg", b"3" * 600), ("b.txt", b"4" * 400)])
    grouped = list(samples(io.BytesIO(data), MB, 1000))
    assert [(s.key, [(m.name, m.error) for m in s.members]) for s in grouped] == [
        ("a", [("a.jpg", None), ("a.txt", "sample exceeds 1000 bytes; member not held")]),
        ("b", [("b.jpg", None), ("b.txt", None)]),
    ]
