"""The write-back's own tar headers (``writeback.shards._header``): for the members nearly every shard
holds (a short ASCII name, an ordinary size and mtime) built directly, and byte for byte what ``tarfile``
writes for the same member; anything else is ``tarfile``'s pax header itself."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from perceptscore.writeback.shards import _header, _pax_header


def test_headers_equal_tarfiles_for_every_kind_of_name_size_and_mtime() -> None:
    rng = random.Random(0)
    names = ["a.jpg", "x" * 100, "x" * 101, "dir/000001.jpg", "café.jpg", "a b.txt", "n\x00ul"]
    sizes = [0, 1, 511, 512, 10**6, 8**11 - 1, 8**11, 2**40]
    mtimes = [0, 1_700_000_000, 8**11 - 1, 8**11]
    fast = 0
    for _ in range(3000):
        name = rng.choice([*names, "".join(rng.choice("abc./_-0") for _ in range(rng.randint(1, 120)))])
        size, mtime = rng.choice(sizes), rng.choice(mtimes)
        ours = _header(name, size, mtime)
        fast += len(ours) == tarfile.BLOCKSIZE and ours[156:157] == b"0"  # one block, no pax record
        assert ours == _pax_header(name, size, mtime), (name, size, mtime)
    assert fast > 1000  # the direct path was taken, and agreed


@pytest.mark.parametrize("name", ["000001.jpg", "deep/folder/000001.json", "x" * 100])
def test_tarfile_reads_a_direct_header_back(name: str) -> None:
    data = b"payload bytes"
    header = _header(name, len(data), 1_700_000_123)
    archive = header + data + bytes(-len(data) % 512) + bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:  # checks the checksum as it reads
        (member,) = tar.getmembers()
        assert (member.name, member.size, member.mtime, member.mode) == (
            name,
            len(data),
            1_700_000_123,
            0o644,
        )
        assert member.isfile() and (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        assert tar.extractfile(member).read() == data  # type: ignore[union-attr]
