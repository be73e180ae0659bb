"""webdataset tar shards as inputs, end to end: rows equal the same images scored as loose files, the
sample's caption and JSON pass through, hostile archives become error rows, and a shard that broke off is
read again by ``--retry-errors``. (The tar reader itself: test_tars.py.)"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import perceptscore

from test_cli_score import EXE


@pytest.fixture(scope="module")
def scorer(release_checkpoints) -> perceptscore.Scorer:  # type: ignore[no-untyped-def]
    return perceptscore.Scorer(
        "mem", {"mem": release_checkpoints["memorability"][0]}, device="cpu", workers=0
    )


def add(
    archive: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mtime = len(data), kind, link, 1_700_000_000
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_shards(folder: Path, photos: list[Path], per_shard: int) -> list[Path]:
    """img2dataset's layout: NNNNN.tar holding key.jpg (or .png ...), key.txt and key.json per sample."""
    folder.mkdir(exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(photos), per_shard)):
        shard = folder / f"{number:05d}.tar"
        with tarfile.open(shard, "w") as archive:
            for offset, photo in enumerate(photos[start : start + per_shard]):
                key = f"{number:05d}{offset:04d}"
                add(archive, f"{key}{photo.suffix}", photo.read_bytes())
                add(archive, f"{key}.txt", f"a photo called {photo.name}".encode())
                add(
                    archive,
                    f"{key}.json",
                    json.dumps({"url": f"https://x/{photo.name}", "width": 7}).encode(),
                )
        shards.append(shard)
    return shards


def test_shard_rows_equal_loose_files_and_pass_captions_through(
    scorer: perceptscore.Scorer, photo_dir: Path, tmp_path: Path
) -> None:
    photos = sorted(photo_dir.iterdir())
    shards = write_shards(tmp_path / "shards", photos, per_shard=4)
    assert len(shards) == 2
    got = scorer.score(
        str(tmp_path / "shards" / "{00000..00001}.tar"), tar_fields=["txt", "json.url", "json"]
    )
    loose = scorer.score([str(p) for p in photos])
    assert got["error"].isna().all(), got["error"].tolist()
    keys = [f"{n // 4:05d}{n % 4:04d}" for n in range(len(photos))]
    assert got["key"].tolist() == keys
    assert got["path"].tolist() == [
        f"tar://{k}{p.suffix}::{tmp_path / 'shards' / f'{n // 4:05d}.tar'}"
        for n, (k, p) in enumerate(zip(keys, photos, strict=True))
    ]
    assert got["shard"].tolist() == [str(shards[n // 4]) for n in range(len(photos))]
    assert got["txt"].tolist() == [f"a photo called {p.name}" for p in photos]
    assert got["url"].tolist() == [f"https://x/{p.name}" for p in photos]
    assert [json.loads(j)["width"] for j in got["json"]] == [7] * len(photos)
    np.testing.assert_allclose(got["memorability"], loose["memorability"], rtol=0, atol=1e-6)
    assert got["file_size"].tolist() == [p.stat().st_size for p in photos]
    assert got["file_mtime_ns"].tolist() == [1_700_000_000 * 10**9] * len(photos)


def test_hostile_archive_members_are_error_rows_and_nothing_is_written(
    scorer: perceptscore.Scorer, photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jpeg = (photo_dir / "a_square.jpg").read_bytes()
    monkeypatch.setenv("PERCEPTSCORE_MAX_FILE_BYTES", str(len(jpeg) + 10))
    shard = tmp_path / "hostile.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as archive:
        add(archive, "good.jpg", jpeg)
        add(archive, "../escape.jpg", jpeg)
        add(archive, "/etc/absolute.jpg", jpeg)
        add(archive, "link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd")
        add(archive, "hard.jpg", b"", tarfile.LNKTYPE, "good.jpg")
        add(archive, "empty.jpg", b"")
        add(archive, "text.jpg", b"this is not an image at all")
        add(archive, "big.jpg", jpeg + b"\0" * 100)  # over the limit: skipped in chunks, never held
        add(archive, "good.jpg", jpeg)  # a second member of that name: its row would be ambiguous
        add(archive, "after.png", (photo_dir / "c_cat.webp").read_bytes())  # a webp named .png: decoded
    before = sorted(os.listdir(tmp_path))
    rows = scorer.score(str(shard))
    assert sorted(os.listdir(tmp_path)) == before  # nothing extracted, nothing written
    names = [p.removeprefix("tar://").removesuffix(f"::{shard}") for p in rows["path"]]
    assert names == ["good.jpg", "../escape.jpg", "/etc/absolute.jpg", "link.jpg", "hard.jpg", "empty.jpg",
                     "text.jpg", "big.jpg", "good.jpg", "after.png"]  # fmt: skip
    errors = [None if pd.isna(e) else e for e in rows["error"]]
    unsafe, link = "unsafe member name (absolute or ..)", "a link, not a file (tar member)"
    assert errors[:6] == [None, unsafe, unsafe, link, link, "empty file"]
    assert errors[6] == "not a recognised image format"
    assert errors[7] == f"{len(jpeg) + 100} bytes, over the limit of {len(jpeg) + 10} per member"
    assert errors[8:] == ["duplicate member name in this shard", None]  # the second good.jpg: ambiguous


@pytest.mark.slow
def test_a_truncated_shard_is_one_error_row_then_retry_errors_reads_it_again(
    photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    """The CLI end to end: a shard cut short gives its intact members' rows and one row for the shard;
    ``--retry-errors`` keeps every scored row and reads the repaired shard again, whole (its rows that had
    been scored come again with the rest, not twice)."""
    photos = sorted(photo_dir.iterdir())[:5]
    (good,) = write_shards(tmp_path / "a", photos[:2], per_shard=2)
    (broken,) = write_shards(tmp_path / "b", photos[2:], per_shard=3)
    whole = broken.read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])  # cut inside a member
    out = tmp_path / "out.parquet"
    checkpoint = str(release_checkpoints["memorability"][0])
    base = [EXE, "score", "-t", "mem", "--checkpoint", checkpoint, "--workers", "0", "--batch-size", "2"]
    done = subprocess.run([*base, str(good), str(broken), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    first = pd.read_parquet(out)
    (shard_row,) = first.index[first["path"] == str(broken)]
    assert first.loc[shard_row, "error"].startswith("truncated shard: ended inside member")
    assert first["error"].notna().sum() == 1 and len(first) < 2 + 3 + 1
    broken.write_bytes(whole)  # repaired (downloaded again, say)
    again = tmp_path / "again.parquet"
    done = subprocess.run(
        [*base, "--retry-errors", str(out), "-o", str(again)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    intact = int((first["path"].str.endswith(f"::{broken}") & first["error"].isna()).sum())
    assert f"{2 + intact} kept from" in done.stderr  # scored rows are kept; the rest is the repaired shard
    retried = pd.read_parquet(again)
    assert retried["error"].isna().all()
    assert retried["path"].tolist() == [
        *(p for p in first["path"] if p.endswith(f"::{good}")),
        *(f"tar://00000{k:04d}{p.suffix}::{broken}" for k, p in enumerate(photos[2:])),
    ]
    assert retried["key"].notna().all() and (retried["shard"] == str(good)).sum() == 2


@pytest.mark.slow
def test_processes_read_the_shard_in_a_child_and_score_it_as_loose_files(
    photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    """``--processes 2``: the shard goes to a child as its description and is read there (``containers``);
    its rows score as the loose files score."""
    photos = sorted(photo_dir.iterdir())
    (shard,) = write_shards(tmp_path / "s", photos, per_shard=len(photos))
    out, loose = tmp_path / "p.parquet", tmp_path / "loose.parquet"
    checkpoint = str(release_checkpoints["memorability"][0])
    # --device cpu: two CPU processes whatever GPUs the host has, rows compared to 1e-6 in fp32
    base = [EXE, "score", "-t", "mem", "--checkpoint", checkpoint, "--workers", "0", "--batch-size", "2",
            "--device", "cpu"]  # fmt: skip
    done = subprocess.run(
        [*base, str(shard), "--processes", "2", "-o", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*base, *map(str, photos), "-o", str(loose)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(
        pd.read_parquet(out)["memorability"], pd.read_parquet(loose)["memorability"], rtol=0, atol=1e-6
    )


@pytest.mark.slow
def test_retry_errors_from_a_csv_keeps_keys_as_text_and_a_repeated_name_never_takes_anothers_score(
    photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    """A member name repeated in its shard is an error row; retried, it stays one (the name alone cannot
    say which member it was), and the first member keeps its own score. Keys like "00000" survive a CSV."""
    photos = sorted(photo_dir.iterdir())
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        add(archive, "00000.jpg", photos[0].read_bytes())
        add(archive, "00000.jpg", photos[3].read_bytes())  # the same name again, another photo
        add(archive, "00001.jpg", photos[5].read_bytes())
    checkpoint = str(release_checkpoints["memorability"][0])
    base = [EXE, "score", "-t", "mem", "--checkpoint", checkpoint, "--workers", "0"]
    first, again = tmp_path / "first.csv", tmp_path / "again.csv"
    done = subprocess.run([*base, str(shard), "-o", str(first)], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    done = subprocess.run(
        [*base, "--retry-errors", str(first), "-o", str(again)], capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    a = pd.read_csv(first, dtype={"key": str}, keep_default_na=False)
    b = pd.read_csv(again, dtype={"key": str}, keep_default_na=False)
    assert b["key"].tolist() == a["key"].tolist() == ["00000", "00000", "00001"]
    assert b["error"].tolist() == a["error"].tolist() == ["", "duplicate member name in this shard", ""]
    assert b["memorability"].tolist() == a["memorability"].tolist()  # kept as they were


def test_brace_lists_expand_in_order_and_a_huge_product_is_refused_before_expanding() -> None:
    from perceptscore.errors import UsageError
    from perceptscore.shards import expand_braces

    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    with pytest.raises(UsageError, match="names over 1000000 inputs"):
        expand_braces("s3://b/{0000..2999}/{0000..2999}.tar")  # 9 million: refused at once, not built
