"""Hostile inputs cost a row (or one line and exit 2), never a traceback, a crash or a hang (issue 21): tar
headers whose numbers overflow, a sample's JSON nested a hundred thousand deep, ``--tar-fields`` that
name output columns, JSONL manifests nested thousands deep, items a decode worker can't be sent, NUL
bytes in paths, brace ranges of thousands of digits; and ``--retry-errors`` reads a shard once however
many of its members failed."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd
import pytest

import perceptscore
from perceptscore.cli import main
from perceptscore.engines import local
from perceptscore.items import Item
from perceptscore.locators import LocalFile

from servers import FaultyHTTPServer
from test_cli_score import EXE

MTIME = 1_700_000_000
DEEP = 100_000


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def with_checksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), MTIME
    return info.tobuf(tarfile.USTAR_FORMAT) + padded(data)


def pax_member(name: str, key: str, value: bytes, data: bytes) -> bytes:
    """A member behind a pax header holding one record ``key=value``, written byte by byte (tarfile
    would refuse to write these values)."""
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(body) + len(str(length)) != length:
        length = len(body) + len(str(length))
    record = str(length).encode() + body
    header = bytearray(tarfile.TarInfo("././@PaxHeader").tobuf(tarfile.USTAR_FORMAT))
    header[156:157] = b"x"
    header[124:136] = b"%011o\x00" % len(record)
    return with_checksum(header) + padded(record) + member(name, data)


def base256_mtime_member(name: str, data: bytes) -> bytes:
    """A GNU header whose mtime field is base-256: 2**80 seconds, far past what int64 nanoseconds hold."""
    header = bytearray(member(name, data)[:512])
    header[136:148] = b"\x80" + (1 << 80).to_bytes(11, "big")
    return with_checksum(header) + padded(data)


def run(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], *args: str | Path, stdin: str = ""
) -> tuple[int, str]:
    """The console script in this process, as a user runs it: exit code and stderr (the file descriptor's,
    so a traceback printed by any thread is seen too)."""
    monkeypatch.setattr(sys, "argv", ["perceptscore", *map(str, args)])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0), capfd.readouterr().err


@pytest.fixture(scope="module")
def jpeg(photo_dir: Path) -> bytes:
    return (photo_dir / "a_square.jpg").read_bytes()


@pytest.fixture
def score(release_checkpoints, tmp_path: Path) -> list[str]:
    checkpoint = str(release_checkpoints["memorability"][0])
    return ["score", "-t", "mem", "--checkpoint", checkpoint, "--workers", "0", "--device", "cpu"]


def test_hostile_tar_headers_and_json_are_rows_and_a_rerun_completes(
    jpeg: bytes, score: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """Each of these raised (a traceback, and every rerun stopped at the same row): a sample's .json nested
    100,000 deep under ``--tar-fields json.NAME``, a pax mtime of 1e300 and a base-256 mtime (int64
    overflow), a pax size of 5,000 digits (past it, the shard can't be read on: its row)."""
    shard = tmp_path / "hostile.tar"
    shard.write_bytes(
        member("00.jpg", jpeg)
        + member("00.json", b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}")
        + pax_member("01.jpg", "mtime", b"1e300", jpeg)
        + base256_mtime_member("02.jpg", jpeg)
        + member("03.jpg", jpeg)
        + member("03.json", b'{"a": "kept"}')
        + pax_member("04.jpg", "size", b"9" * 5000, jpeg)
        + member("05.jpg", jpeg)
        + bytes(1024)
    )
    out = tmp_path / "out.parquet"
    code, err = run(monkeypatch, capfd, *score, shard, "--tar-fields", "json.a", "-o", out)
    assert code == 1 and "Traceback" not in err, err
    rows = pd.read_parquet(out)
    assert rows["path"].tolist() == [*(f"tar://0{n}.jpg::{shard}" for n in range(4)), str(shard)]
    errors = [None if pd.isna(e) else e for e in rows["error"]]
    assert errors[:4] == [
        "the sample's .json is nested too deeply to read its fields (--tar-fields)",
        None,
        None,
        None,
    ]
    assert errors[4].startswith("not a tar archive, or corrupt at byte ") and errors[4].endswith("(pax size)")
    assert rows["file_mtime_ns"].tolist()[1:4] == [0, 0, MTIME * 10**9]  # unknown, not a crash
    assert rows["a"].tolist()[3] == "kept"

    again = tmp_path / "again.parquet"
    code, err = run(monkeypatch, capfd, *score, "--retry-errors", out, "--tar-fields", "json.a", "-o", again)
    assert code == 1 and "Traceback" not in err, err
    retried = pd.read_parquet(again)
    assert retried["path"].tolist() == rows["path"].tolist()
    assert retried["error"].tolist() == rows["error"].tolist()


def test_tar_fields_that_name_output_columns_are_renamed_as_manifest_columns_are(
    jpeg: bytes, score: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """``json.shard`` and ``json.key`` overwrote the tar's own columns; ``json.path``, ``json.error`` and a
    task's name gave a column that stayed empty. Each becomes ``input_<name>``, with the JSON's value."""
    values = {"path": "p", "error": "e", "memorability": 9, "shard": "s", "key": "k", "txt": "t", "url": "u"}
    shard = tmp_path / "00000.tar"
    shard.write_bytes(
        member("k0.jpg", jpeg) + member("k0.txt", b"caption") + member("k0.json", json.dumps(values).encode())
    )
    out = tmp_path / "out.csv"
    fields = ",".join(["txt", *(f"json.{name}" for name in values)])
    code, err = run(monkeypatch, capfd, *score, shard, "--tar-fields", fields, "-o", out)
    assert code == 0, err
    (row,) = pd.read_csv(out, dtype=str, keep_default_na=False).to_dict("records")
    assert (row["path"], row["error"], row["shard"], row["key"]) == (
        f"tar://k0.jpg::{shard}",
        "",
        str(shard),
        "k0",
    )
    assert float(row["memorability"]) != 9 and row["txt"] == "caption"
    renamed = {name: row[f"input_{name}"] for name in values if name != "url"}
    assert renamed == {name: str(value) for name, value in values.items() if name != "url"}
    assert row["url"] == "u"

    code, err = run(monkeypatch, capfd, *score, shard, "--tar-fields", "json.path,json.input_path", "-o", out)
    assert code == 2 and err.strip() == (
        "error: --tar-fields 'json.input_path': its column 'input_path' is taken by another column; "
        "leave one of them out"
    )


def nested_manifest(folder: Path, levels: int, photo: Path) -> Path:
    manifest = folder / f"nested{levels}.jsonl"
    deep = '{"a": ' * levels + "1" + "}" * levels
    manifest.write_text(
        f'{{"path": "{photo}", "meta": {deep}}}\n{{"path": "{photo}", "meta": null}}\n', encoding="utf-8"
    )
    return manifest


@pytest.mark.parametrize("levels", [2_000, 100_000])
def test_a_deeply_nested_jsonl_manifest_is_one_line_not_a_crash_or_a_hang(
    levels: int, photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    """At 2,000 levels the run hung for good with its lock held (the decode worker could not be sent the
    row); at 100,000 pyarrow's parser crashed the process. A real process, under a time limit."""
    manifest = nested_manifest(tmp_path, levels, photo_dir / "a_square.jpg")
    out = tmp_path / "out.csv"
    checkpoint = str(release_checkpoints["memorability"][0])
    command = [EXE, "score", manifest, "-t", "mem", "--checkpoint", checkpoint, "--workers", "1", "-o", out]
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"error: manifest {manifest}: line 1 nests values over 32 levels deep; flatten them, or store them "
        "as JSON text"
    )
    assert not out.exists()


@dataclass(frozen=True)
class Unsendable:
    """A locator that can't be pickled, as a row holding a value 2,000 levels deep couldn't be: torch's
    feeder thread drops such an item, and its batch never comes back."""

    uri: str

    def open(self) -> BinaryIO:
        return io.BytesIO(b"")

    def stat(self) -> tuple[int, int] | None:
        return None

    def __reduce__(self) -> Any:
        raise RecursionError("maximum recursion depth exceeded while pickling an object")


@pytest.mark.slow
def test_passthrough_values_stay_here_and_an_item_that_cant_reach_a_worker_is_an_error_row(
    release_checkpoints, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local engine with a decode worker: a row's passthrough values are never sent to it (a lock can't
    be pickled: the run hung), and a batch that never comes back is waited for a bounded time, then its
    items are decoded one at a time and the one that can't be sent is an error row."""
    monkeypatch.setenv("PERCEPTSCORE_DECODE_TIMEOUT", "1")
    monkeypatch.setattr(local, "POLL_S", 0.5)
    monkeypatch.setattr(local, "START_S", 15.0)  # a fresh worker per isolated item, on a loaded machine
    scorer = perceptscore.Scorer(
        "mem", {"mem": release_checkpoints["memorability"][0]}, device="cpu", workers=1, batch_size=4
    )
    photo = str(photo_dir / "a_square.jpg")
    items = [Item(0, LocalFile(photo), {"meta": threading.Lock()}), Item(1, Unsendable("unsendable.jpg")),
             Item(2, LocalFile(photo), {"meta": threading.Lock()})]  # fmt: skip
    rows: list[dict[str, Any]] = []
    worker = threading.Thread(
        target=lambda: rows.extend(r for b in scorer.iter_batches(items) for r in b.to_pylist()), daemon=True
    )
    worker.start()
    worker.join(timeout=90)
    assert not worker.is_alive(), "the run hung"
    assert [r["path"] for r in rows] == [photo, "unsendable.jpg", photo]
    assert [r["error"] for r in rows] == [
        None,
        "the decoder crashed, or hung for 1 s, in its worker process",
        None,
    ]


@pytest.fixture
def http(http_server: FaultyHTTPServer) -> FaultyHTTPServer:
    yield http_server
    http_server.reset()


def test_retry_errors_reads_a_shard_once_for_all_its_failed_members(
    jpeg: bytes,
    score: list[str],
    http: FaultyHTTPServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd,
) -> None:
    """Every failed member was looked for from the start of its shard, one read each (300 errors, 300
    reads): the shard is read once now, and each row is matched to its own member."""
    failed = 12
    http.files["/retry/00000.tar"] = (
        member("good.jpg", jpeg)
        + b"".join(member(f"bad{n:02d}.jpg", b"not an image %d" % n) for n in range(failed))
        + member("last.jpg", jpeg)
        + bytes(1024)
    )
    url = http.url("/retry/00000.tar")
    first, again = tmp_path / "first.parquet", tmp_path / "again.parquet"
    code, err = run(monkeypatch, capfd, *score, url, "-o", first)
    assert code == 1, err
    http.requests.clear()
    code, err = run(monkeypatch, capfd, *score, "--retry-errors", first, "-o", again)
    assert code == 1, err
    assert http.requests["GET", "/retry/00000.tar"] == 1, http.requests.snapshot()
    before, after = pd.read_parquet(first), pd.read_parquet(again)
    assert after["path"].tolist() == before["path"].tolist()
    assert after["error"].tolist() == before["error"].tolist()
    assert after["error"].notna().sum() == failed
    assert after["memorability"].tolist()[:: failed + 1] == before["memorability"].tolist()[:: failed + 1]


def test_nul_bytes_in_paths_are_error_rows_and_a_huge_brace_range_is_one_line(
    photo_dir: Path, score: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    photo = str(photo_dir / "a_square.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photo}\nx\x00y.jpg\n", encoding="utf-8")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a\x00b.jpg"}) + "\n" + json.dumps({"path": "c\x00.tar"}) + "\n")
    out = tmp_path / "out.csv"
    code, err = run(monkeypatch, capfd, *score, f"@{listing}", "-", manifest, "-o", out, stdin="s\x00.jpg\n")
    assert code == 1 and "Traceback" not in err, err
    rows = pd.read_csv(out, keep_default_na=False)
    nul = "the path holds a NUL byte"
    assert rows["error"].tolist() == ["", nul, nul, nul, f"unreadable shard: {nul}"]

    huge = "x{" + "9" * 5000 + "..1}.tar"
    code, err = run(monkeypatch, capfd, *score, huge, "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and len(err) < 300, err
    assert "names over 1000000 inputs" in err
