"""Lossless write-back (issue 24, items 3 and 4): kept samples of img2dataset-layout shards written again
and read back by the real ``webdataset`` library, every member byte-identical and keys unchanged, scores
beside them; kept rows of a ``datasets``-written parquet dataset loaded back by the real ``datasets``
library with the ``Image`` feature intact. A kept row that can't be written is a ``missing`` line."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds

import perceptscore
from perceptscore import limits
from perceptscore.errors import UsageError
from perceptscore.writeback import WrittenBack, to_parquet, to_shards

PER_SHARD = 4  # samples per input shard
SAMPLES = 10  # three input shards: 4, 4, 2


@pytest.fixture(scope="module")
def scorer(release_checkpoints) -> perceptscore.Scorer:  # type: ignore[no-untyped-def]
    return perceptscore.Scorer(
        "mem", {"mem": release_checkpoints["memorability"][0]}, device="cpu", workers=0
    )


@pytest.fixture(scope="module")
def photos(many_photos: Path) -> list[Path]:
    return sorted(many_photos.iterdir())[:SAMPLES]


def img2dataset_shards(folder: Path, photos: list[Path]) -> list[Path]:
    """img2dataset's layout, written by webdataset's own ShardWriter: ``NNNNN.tar`` holding
    ``key.jpg``, ``key.txt`` and ``key.json`` per sample, keys ``SSSSSIIII``."""
    folder.mkdir()
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i, photo in enumerate(photos):
            key = f"{i // PER_SHARD:05d}{i % PER_SHARD:04d}"
            sink.write(
                {
                    "__key__": key,
                    "jpg": photo.read_bytes(),
                    "txt": f"caption of {photo.name}",
                    "json": {"url": f"https://example.com/{photo.name}", "key": key, "i": i},
                }
            )
    return sorted(folder.glob("*.tar"))


@pytest.fixture(scope="module")
def scored_shards(
    scorer: perceptscore.Scorer, photos: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[Path], pd.DataFrame]:
    shards = img2dataset_shards(tmp_path_factory.mktemp("wb") / "shards", photos)
    assert len(shards) == 3
    table = scorer.score([str(s) for s in shards])
    assert table["error"].isna().all() and len(table) == SAMPLES
    return shards, table


def members_of(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as archive:
        return archive.getmembers()


def input_members(shards: list[Path]) -> dict[str, bytes]:
    """Every member of the input shards by name, read with tarfile (not the code under test)."""
    found = {}
    for shard in shards:
        with tarfile.open(shard) as archive:
            for info in archive.getmembers():
                found[info.name] = archive.extractfile(info).read()  # type: ignore[union-attr]
    return found


def test_kept_samples_read_back_by_webdataset_byte_identical_with_their_scores(
    scored_shards: tuple[list[Path], pd.DataFrame], tmp_path: Path
) -> None:
    shards, table = scored_shards
    kept = table.iloc[[0, 2, 3, 4, 7, 8, 9]]  # a filter's answer: rows from all three shards
    out = tmp_path / "out"
    done = to_shards(kept, out, score_columns=["memorability"], samples_per_shard=3)
    assert isinstance(done, WrittenBack)
    assert done.missing == [] and done.samples == 7
    assert done.files == [str(out / f"{n:05d}.tar") for n in range(3)]
    assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar", "00002.tar"]  # no partial left behind
    originals = input_members(shards)
    read: list[dict[str, Any]] = []
    for file, size in zip(done.files, [3, 3, 1], strict=True):
        samples = list(wds.WebDataset(file, shardshuffle=False, empty_check=False))
        assert len(samples) == size  # shard sizes as asked
        read.extend(samples)
    assert [s["__key__"] for s in read] == kept["key"].tolist()  # keys unchanged, input order
    for sample, (_, row) in zip(read, kept.iterrows(), strict=True):
        key = sample["__key__"]
        for extension in ("jpg", "txt", "json"):
            assert sample[extension] == originals[f"{key}.{extension}"]  # byte for byte
        assert json.loads(sample["perceptscore.json"]) == {"memorability": row["memorability"]}
    # within a sample the input's order, then the scores; mode normalised, mtime kept
    names = [m.name for m in members_of(out / "00000.tar")]
    given = [m.name for m in members_of(shards[0]) if m.name.startswith("000000000.")]
    assert len(given) == 3 and names[:4] == [*given, "000000000.perceptscore.json"]
    first_in = {m.name: m for m in members_of(shards[0])}
    for member in members_of(out / "00000.tar"):
        assert member.mode == 0o644 and member.isfile()
        if member.name in first_in:
            assert member.mtime == int(first_in[member.name].mtime)  # whole seconds


def test_all_samples_with_several_score_columns_and_nulls(
    scored_shards: tuple[list[Path], pd.DataFrame], tmp_path: Path
) -> None:
    """``--all`` with percentile columns: every sample, NaN and None written as JSON null, numbers as the
    table holds them; one output shard for all when it fits."""
    shards, table = scored_shards
    rows = table.assign(
        memorability_percentile=[float("nan"), *(range(1, SAMPLES))], label=[None, *("x" * (SAMPLES - 1))]
    )
    done = to_shards(
        rows, tmp_path / "all", score_columns=["memorability", "memorability_percentile", "label"]
    )
    assert done.missing == [] and done.samples == SAMPLES and len(done.files) == 1
    got = list(wds.WebDataset(done.files[0], shardshuffle=False))
    assert [s["__key__"] for s in got] == table["key"].tolist()
    first = json.loads(got[0]["perceptscore.json"])
    assert first == {"memorability": table["memorability"][0], "memorability_percentile": None, "label": None}
    assert json.loads(got[5]["perceptscore.json"])["memorability_percentile"] == 5.0
    # written back and scored again: the scores member is replaced, never doubled
    again = to_shards(
        rows.assign(
            path=[p.replace(str(shards[n // PER_SHARD]), done.files[0]) for n, p in enumerate(rows["path"])]
        ),
        tmp_path / "again",
        score_columns=["label"],
    )
    assert again.missing == []
    names = [m.name for m in members_of(Path(again.files[0]))]
    assert names.count("000000000.perceptscore.json") == 1
    assert json.loads(
        next(iter(wds.WebDataset(again.files[0], shardshuffle=False)))["perceptscore.json"]
    ) == {"label": None}


def test_rows_that_cant_be_written_are_missing_lines_and_the_rest_is_written(
    scored_shards: tuple[list[Path], pd.DataFrame], photos: list[Path], tmp_path: Path
) -> None:
    shards, table = scored_shards
    copies = tmp_path / "copies"
    shutil.copytree(shards[0].parent, copies)
    rows = table.assign(path=[p.replace(str(shards[0].parent), str(copies)) for p in table["path"]])
    (copies / "00001.tar").unlink()  # a shard that is gone
    changed = copies / "00002.tar"  # a shard written again with other images under the same keys
    with tarfile.open(changed, "w") as archive:
        for i in (8, 9):
            data = b"another image" * (i + 1)
            info = tarfile.TarInfo(f"00002{i - 8:04d}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    loose = pd.DataFrame({"path": ["/photos/a.jpg"], "memorability": [0.5]})
    # the reader's limit (as a run installs it) under the photos' size: shard 0's samples can't be copied
    smallest = min(len(p.read_bytes()) for p in photos)
    limits.install(dataclasses.replace(limits.current(), max_file_bytes=smallest - 1))
    done = to_shards(pd.concat([rows, loose]), tmp_path / "out", score_columns=["memorability"])
    big = [r for r in done.missing if "over the limit" in r]
    assert len(big) == PER_SHARD and all(r.startswith(f"tar://00000000{i}.jpg::") for i, r in enumerate(big))
    gone = [r for r in done.missing if "unreadable shard" in r]
    assert gone == [f"{p}: unreadable shard (no such file)" for p in rows["path"][4:8]]
    assert [r for r in done.missing if "changed since it was scored" in r] == [
        f"{p}: the shard changed since it was scored (this member's size or mtime differs)"
        for p in rows["path"][8:]
    ]
    assert done.missing[-1] == "/photos/a.jpg: not a tar member (its sample can't be written to shards)"
    assert len(done.missing) == SAMPLES + 1 and done.samples == 0 and done.files == []
    limits.install(dataclasses.replace(limits.current(), max_file_bytes=512 << 20))
    partly = to_shards(rows, tmp_path / "partly", score_columns=["memorability"])
    assert partly.samples == PER_SHARD and len(partly.missing) == SAMPLES - PER_SHARD
    assert [s["__key__"] for s in wds.WebDataset(partly.files[0], shardshuffle=False)] == rows["key"][
        :4
    ].tolist()


def test_a_shard_cut_short_keeps_the_samples_before_the_cut_and_a_row_named_twice_is_written_once(
    scored_shards: tuple[list[Path], pd.DataFrame], tmp_path: Path
) -> None:
    shards, table = scored_shards
    cut = tmp_path / "00000.tar"
    whole = shards[0].read_bytes()
    third = next(m for m in members_of(shards[0]) if m.name == "000000002.jpg")
    cut.write_bytes(whole[: third.offset_data + 100])  # inside the third sample's image
    rows = table.iloc[:PER_SHARD].assign(
        path=[p.replace(str(shards[0]), str(cut)) for p in table["path"][:4]]
    )
    done = to_shards(pd.concat([rows, rows]), tmp_path / "out", score_columns=["memorability"])
    assert done.samples == 2 and [
        s["__key__"] for s in wds.WebDataset(done.files[0], shardshuffle=False)
    ] == [
        "000000000",
        "000000001",
    ]
    assert len(done.missing) == 2 and all(
        m.startswith(f"{p}: the shard broke off at or before this sample (truncated shard")
        for m, p in zip(done.missing, rows["path"][2:], strict=True)
    )


def test_an_output_folder_that_is_not_new_or_empty_is_refused(
    scored_shards: tuple[list[Path], pd.DataFrame], tmp_path: Path
) -> None:
    _, table = scored_shards
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    for target, says in (("full", "not empty"), ("file", "not a folder")):
        for write in (to_shards, to_parquet):
            with pytest.raises(UsageError, match=says) as caught:
                write(table, tmp_path / target, score_columns=["memorability"])
            assert "\n" not in str(caught.value)
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "keep me too"
    with pytest.raises(UsageError, match="no column 'quality'"):
        to_shards(table, tmp_path / "new", score_columns=["quality"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert to_shards(table.iloc[:1], empty, score_columns=["memorability"]).samples == 1


# ---- parquet datasets --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_dataset(
    scorer: perceptscore.Scorer, photos: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, pd.DataFrame]:
    """A hub-layout dataset written by ``datasets``: an ``Image`` feature and a label, two files of row
    groups of 2 rows, scored."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": p.read_bytes(), "path": p.name} for p in photos], "label": list(range(SAMPLES))},
        features=features,
    )
    root = tmp_path_factory.mktemp("wbds") / "hub"
    (root / "data").mkdir(parents=True)
    half = SAMPLES // 2
    ds.select(range(half)).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"), batch_size=2)
    ds.select(range(half, SAMPLES)).to_parquet(
        str(root / "data" / "train-00001-of-00002.parquet"), batch_size=2
    )
    table = scorer.score(str(root))
    assert table["error"].isna().all() and len(table) == SAMPLES
    return root, table


def load(folder: Path) -> Any:
    return datasets.load_dataset("parquet", data_dir=str(folder), split="train")


def test_kept_rows_load_with_datasets_image_feature_intact_and_scores_equal(
    scored_dataset: tuple[Path, pd.DataFrame], photos: list[Path], tmp_path: Path
) -> None:
    _, table = scored_dataset
    picked = [1, 2, 4, 5, 8]  # from both files, several row groups, one group skipped
    kept = table.iloc[picked].assign(memorability_percentile=[10.0, None, 30.0, 40.0, 50.0])
    out = tmp_path / "out"
    done = to_parquet(kept, out, score_columns=["memorability", "memorability_percentile"], rows_per_file=2)
    assert done.missing == [] and done.samples == len(picked)
    assert done.files == [str(out / "data" / f"train-0000{i}-of-00003.parquet") for i in range(3)]
    assert sorted(os.listdir(out / "data")) == [Path(f).name for f in done.files]  # no temporaries left
    got = load(out)
    assert isinstance(got.features["image"], datasets.Image)
    assert got["label"] == picked  # every original column, in the source's order
    assert got["memorability"] == kept["memorability"].tolist()
    assert got["memorability_percentile"] == [10.0, None, 30.0, 40.0, 50.0]
    raw = got.cast_column("image", datasets.Image(decode=False))
    assert [r["bytes"] for r in raw["image"]] == [photos[i].read_bytes() for i in picked]  # untouched
    assert [r["path"] for r in raw["image"]] == [photos[i].name for i in picked]
    assert got[0]["image"].size == (480, 360)  # and decodes as an image
    # read back as a scored dataset again: the same rows, found by the scorer's own reader
    assert pq.read_table(done.files[0]).column_names == [
        "image",
        "label",
        "memorability",
        "memorability_percentile",
    ]


def test_parquet_rows_that_cant_be_written_are_missing_lines_and_score_columns_are_replaced_not_theirs(
    scored_dataset: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    root, table = scored_dataset
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    rows = table.assign(path=[p.replace(str(root), str(copy)) for p in table["path"]])
    second = copy / "data" / "train-00001-of-00002.parquet"
    shuffled = pq.read_table(second)
    pq.write_table(shuffled.take([1, 0, 2, 3, 4]), second)  # rows 0 and 1 swapped: other images there
    gone = f"{copy}/data/gone.parquet::image[0]"
    extra = pd.DataFrame({"path": [f"{copy}/data/train-00000-of-00002.parquet::image[99]", "x.jpg", gone]})
    done = to_parquet(pd.concat([rows, extra]), tmp_path / "out", score_columns=["memorability"])
    changed = "the file changed since it was scored (this row's image differs)"
    assert done.missing == [
        f"{rows['path'][5]}: {changed}",
        f"{rows['path'][6]}: {changed}",
        f"{extra['path'][0]}: no row 99 in {copy}/data/train-00000-of-00002.parquet",
        "x.jpg: not a dataset row (its row can't be written to parquet)",
        f"{gone}: unreadable file (no such file)",
    ]
    assert done.samples == SAMPLES - 2 and load(tmp_path / "out")["label"] == [0, 1, 2, 3, 4, 7, 8, 9]
    # the output written back again: its own score column is replaced ...
    again_rows = pd.DataFrame(
        {"path": [f"{done.files[0]}::image[{i}]" for i in range(3)], "memorability": [7.0, 8.0, 9.0]}
    )
    again = to_parquet(again_rows, tmp_path / "again", score_columns=["memorability"])
    assert again.missing == [] and load(tmp_path / "again")["memorability"] == [7.0, 8.0, 9.0]
    # ... while a column of the user's own under a score column's name is refused
    theirs = pd.DataFrame({"path": [f"{copy}/data/train-00000-of-00002.parquet::image[0]"], "label": [5]})
    with pytest.raises(UsageError, match="has a column 'label' of its own"):
        to_parquet(theirs, tmp_path / "theirs", score_columns=["label"])


def test_a_save_to_disk_arrow_dataset_is_written_back_too(
    scorer: perceptscore.Scorer, photos: list[Path], tmp_path: Path
) -> None:
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": p.read_bytes(), "path": None} for p in photos[:3]], "n": [1, 2, 3]},
        features=datasets.Features({"image": datasets.Image(), "n": datasets.Value("int32")}),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    table = scorer.score(str(tmp_path / "saved"))
    done = to_parquet(table.iloc[[0, 2]], tmp_path / "out", score_columns=["memorability"])
    assert done.missing == [] and done.files == [
        str(tmp_path / "out" / "data" / "train-00000-of-00001.parquet")
    ]
    got = load(tmp_path / "out").cast_column("image", datasets.Image(decode=False))
    assert got["n"] == [1, 3] and [r["bytes"] for r in got["image"]] == [
        photos[0].read_bytes(),
        photos[2].read_bytes(),
    ]
    assert got["memorability"] == table["memorability"].iloc[[0, 2]].tolist()
