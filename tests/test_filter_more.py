"""filter keeps everything it drops, selects by fraction and percentile, and writes back (issue 24, items 2
and 5, and the CLI of 3-4): ``--rejected FILE`` holds exactly the rows -o does not, each with why;
``--min-percentile`` and ``--top-fraction`` agree with an independent computation over every input file;
``--percentiles`` columns are exact; ``--to-shards`` / ``--to-parquet`` end to end through the CLI, read back
with the real webdataset and datasets libraries. In-process through Typer's runner; real files read back."""

from __future__ import annotations

import json
import math
import os
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from test_cli_words import _main  # the console script in-process: exit code, stderr
from typer.testing import CliRunner

from perceptscore.cli import app

LABELS = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]


def _score_into(scores: Path, release_checkpoints: dict, *inputs: str | Path) -> None:  # type: ignore[type-arg]
    """``score`` with the tiny memorability weights on CPU, in this process, into ``scores``."""
    checkpoint = f"memorability={release_checkpoints['memorability'][0]}"
    options = ["-t", "mem", "--checkpoint", checkpoint, "--device", "cpu", "--workers", "0", "-o", scores]
    done = _cli("score", *inputs, *options)
    assert done.exit_code == 0, done.output


def _cli(*args: str | Path):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def _scores_file(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    Path(f"{path}.meta.json").write_text("{}")  # marks it a scores file
    return path


@pytest.fixture
def two_files(tmp_path: Path) -> tuple[list[Path], pd.DataFrame]:
    """Two scores files (17 and 13 rows) with every task's columns: quality in tenths (many ties), an
    error row in each, and a row with no quality (but no error) in the first. Returns the files and their
    rows as one frame, in input order."""
    rng = np.random.default_rng(24)
    frames = []
    for name, n in (("a", 17), ("b", 13)):
        probs = rng.dirichlet(np.ones(8), size=n)
        frame = pd.DataFrame(
            {
                "path": [str(tmp_path / f"{name}{i:02d}.jpg") for i in range(n)],
                "memorability": rng.uniform(0.4, 0.9, n),
                "quality": rng.integers(0, 10, n) / 10,
                "quality_raw": rng.uniform(-4, 2, n),
                "emotion": [LABELS[j] for j in probs.argmax(axis=1)],
                "emotion_confidence": probs.max(axis=1),
                **{f"emotion_{label}": probs[:, j] for j, label in enumerate(LABELS)},
                "error": [None] * (n - 1) + ["cannot identify image file"],
            }
        )
        frames.append(frame)
    frames[0].loc[3, "quality"] = np.nan  # scored, but this column has no value
    files = [_scores_file(tmp_path / f"{name}.csv", f) for name, f in zip("ab", frames, strict=True)]
    return files, pd.concat(frames, ignore_index=True)


def _percentile(values: list[float], v: float) -> float:
    """The share (x100) of ``values`` at or below ``v``: the definition, counted one by one."""
    return sum(1 for w in values if w <= v) * 100.0 / len(values)


def _scored(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    return frame[frame["error"].isna() & frame[column].notna()]


def test_rejected_is_the_complement_of_out_with_reasons(
    two_files: tuple[list[Path], pd.DataFrame], tmp_path: Path
) -> None:
    files, frame = two_files
    wanted = ("awe", "fear", "contentment", "amusement", "excitement")
    criteria = ["--min-quality", "0.3", "--max-memorability", "0.8", "--emotion", ",".join(wanted)]
    criteria += ["--top-fraction", "0.5", "--by", "quality_raw"]
    # what each row should meet, in the order filter checks: the first failing one is the reason
    expected: dict[str, str | None] = {}
    for row in frame.itertuples():
        if row.error is not None and not pd.isna(row.error):
            expected[row.path] = "error"
        elif pd.isna(row.quality):
            expected[row.path] = "no quality"
        elif row.quality < 0.3:
            expected[row.path] = "quality < 0.3"
        elif row.memorability > 0.8:
            expected[row.path] = "memorability > 0.8"
        elif row.emotion not in wanted:
            expected[row.path] = f"emotion not in {','.join(wanted)}"
        else:
            expected[row.path] = None
    survivors = frame[[expected[p] is None for p in frame["path"]]]
    k = math.ceil(0.5 * len(survivors))
    best = survivors["path"].to_numpy()[np.argsort(-survivors["quality_raw"].to_numpy(), kind="stable")[:k]]
    for path in survivors["path"]:
        expected[path] = None if path in set(best) else "not in top 50% by quality_raw"
    assert {None, "error", "no quality", "not in top 50% by quality_raw"} <= set(expected.values())

    for suffix in (".csv", ".parquet", ".jsonl"):
        kept, dropped = tmp_path / f"kept{suffix}", tmp_path / f"dropped{suffix}"
        done = _cli("filter", *files, *criteria, "-o", kept, "--rejected", dropped)
        assert done.exit_code == 0, done.output  # an earlier run's error rows fail nothing now
        kept_rows, dropped_rows = _read(kept), _read(dropped)
        assert kept_rows["path"].tolist() == [p for p, why in expected.items() if why is None]
        assert dropped_rows["path"].tolist() == [p for p, why in expected.items() if why is not None]
        assert dropped_rows["rejected"].tolist() == [why for why in expected.values() if why is not None]
        assert "rejected" not in kept_rows.columns
        # row for row, the two files together are the input: every column, in input order
        union = pd.concat([kept_rows, dropped_rows.drop(columns="rejected")]).sort_values("path")
        original = frame.sort_values("path")
        assert union["path"].tolist() == original["path"].tolist()
        for column in ("quality", "memorability", "emotion_awe"):
            got, want = union[column].to_numpy(float), original[column].to_numpy(float)
            assert [repr(v) for v in got] == [repr(v) for v in want], (suffix, column)
        assert union["error"].notna().sum() == 2


def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True, precise_float=True)
    return pd.read_csv(path)


def test_rejected_never_replaces_an_input_or_a_file_it_did_not_write(
    two_files: tuple[list[Path], pd.DataFrame],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files, _ = two_files
    a, b, kept = str(files[0]), str(files[1]), str(tmp_path / "kept.csv")

    def refused(*args: str) -> str:
        code, err = _main(monkeypatch, capsys, "filter", a, b, "--min-quality", "0.5", *args)
        assert code == 2 and err.count("\n") == 1, err  # one line
        return err

    before = files[0].read_bytes()
    assert "refusing to overwrite an input" in refused("-o", kept, "--rejected", a)
    assert files[0].read_bytes() == before
    mine = tmp_path / "notes.csv"
    mine.write_text("my,own\n1,2\n")
    assert refused("--rejected", str(mine)).startswith(f"error: --rejected {mine} exists and was not written")
    assert mine.read_text() == "my,own\n1,2\n"
    assert "two files" in refused("-o", kept, "--rejected", kept)
    assert ".csv, .parquet or .jsonl" in refused("--rejected", str(tmp_path / "dropped.txt"))
    assert "already go to stdout" in refused("--rejected", "-")
    assert not os.path.exists(kept)
    # a rerun replaces its own --rejected file without --overwrite
    for _ in range(2):
        done = _cli("filter", a, b, "--min-quality", "0.5", "-o", kept, "--rejected", tmp_path / "r.csv")
        assert done.exit_code == 0, done.output


def test_min_percentile_and_top_fraction_over_every_input_file(
    two_files: tuple[list[Path], pd.DataFrame], tmp_path: Path
) -> None:
    files, frame = two_files
    scored = _scored(frame, "quality")
    values = scored["quality"].to_numpy()
    share_at_or_below = (values[None, :] <= values[:, None]).mean(axis=1) * 100  # numpy, all pairs
    for p in (0, 35, 50, 70, 90, 100):
        done = _cli(
            "filter",
            *files,
            "--min-percentile",
            str(p),
            "--by",
            "iqa",
            "-o",
            tmp_path / "k.txt",
            "--overwrite",
        )
        assert done.exit_code == 0, done.output
        expected = scored["path"][share_at_or_below >= p - 1e-9].tolist()
        assert (tmp_path / "k.txt").read_text().splitlines() == expected, p
    done = _cli(
        "filter", *files, "--min-percentile", "90", "--by", "quality", "--rejected", tmp_path / "r.csv"
    )
    reasons = set(pd.read_csv(tmp_path / "r.csv")["rejected"])
    assert reasons == {"error", "no quality", "quality_percentile < 90"}
    # the top 10% of 28 scored rows of quality_raw (no ties): 3 rows, the best three, in input order
    for fraction in (0.1, 0.25, 1.0):
        done = _cli("filter", *files, "--top-fraction", str(fraction), "--by", "quality_raw")
        assert done.exit_code == 0, done.output
        raw = _scored(frame, "quality_raw")
        k = math.ceil(round(fraction * len(raw), 9))
        best = set(raw["path"].to_numpy()[np.argsort(-raw["quality_raw"].to_numpy())[:k]])
        assert done.stdout.splitlines() == [p for p in raw["path"] if p in best]
        assert len(done.stdout.splitlines()) == {0.1: 3, 0.25: 7, 1.0: 28}[fraction]


def test_percentiles_are_exact_over_the_whole_input(
    two_files: tuple[list[Path], pd.DataFrame], tmp_path: Path
) -> None:
    files, frame = two_files
    kept = tmp_path / "kept.parquet"
    done = _cli("filter", *files, "--min-quality", "0.5", "--percentiles", "-o", kept)
    assert done.exit_code == 0, done.output
    rows = pd.read_parquet(kept)
    ranked = tmp_path / "ranked.parquet"
    done = _cli("rank", *files, "--by", "emotion_awe", "--top", "0", "--percentiles", "-o", ranked)
    assert done.exit_code == 0, done.output
    ranks = pd.read_parquet(ranked)
    for written, columns in (
        (rows, ["memorability", "quality", "emotion_confidence"]),
        (ranks, ["memorability", "quality", "emotion_confidence", "emotion_awe"]),
    ):
        rated = [c for c in written.columns if c.endswith("_percentile")]
        assert rated == [f"{c}_percentile" for c in columns]
        for column in columns:
            values = _scored(frame, column)[column].tolist()  # every scored row of both files
            by_path = dict(zip(frame["path"], frame[column], strict=True))
            # a row with no value has no percentile (rank shows the row with no quality)
            expected = [
                math.nan if pd.isna(v) else _percentile(values, v) for v in map(by_path.get, written["path"])
            ]
            got = written[f"{column}_percentile"].tolist()
            assert list(map(repr, got)) == list(map(repr, expected))  # exact, not approximately
    # ties share the highest: every row of one quality value has one percentile
    tied = rows.groupby("quality")["quality_percentile"].nunique()
    assert (tied == 1).all() and rows["quality"].duplicated().any()
    assert rows["quality_percentile"].max() == 100.0


def test_all_keeps_every_row_and_takes_no_criteria(
    two_files: tuple[list[Path], pd.DataFrame],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files, frame = two_files
    done = _cli("filter", *files, "--all", "-o", tmp_path / "all.parquet")
    assert done.exit_code == 0, done.output
    assert pd.read_parquet(tmp_path / "all.parquet")["path"].tolist() == frame["path"].tolist()
    code, err = _main(monkeypatch, capsys, "filter", str(files[0]), "--all", "--min-quality", "0.5")
    assert code == 2 and err.startswith("error: --all keeps every row: give it no --min/--max")


def test_write_back_needs_rows_of_its_kind(
    two_files: tuple[list[Path], pd.DataFrame],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files, _ = two_files
    given = [str(f) for f in files]
    code, err = _main(monkeypatch, capsys, "filter", *given, "--all", "--to-shards", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --to-shards needs rows read from .tar shards (columns shard and key); ")
    assert "the input holds rows of image files (columns: path, memorability, quality" in err
    code, err = _main(monkeypatch, capsys, "filter", *given, "--all", "--to-parquet", str(tmp_path / "out"))
    assert (
        code == 2
        and "--to-parquet needs rows read from a parquet or arrow dataset (columns shard and row)" in err
    )
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    code, err = _main(monkeypatch, capsys, "filter", *given, "--all", "--to-shards", str(tmp_path / "full"))
    assert code == 2 and "exists and is not an empty folder" in err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]


# ---- write-back end to end ---------------------------------------------------------------------------
def _img2dataset_shards(folder: Path, photos: list[Path], per_shard: int) -> list[Path]:
    """img2dataset's layout, written by webdataset's own ShardWriter: key.jpg, key.txt, key.json."""
    folder.mkdir()
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, photo in enumerate(photos):
            key = f"{i // per_shard:05d}{i % per_shard:04d}"
            sink.write({"__key__": key, "jpg": photo.read_bytes(), "txt": f"caption {i}", "json": {"i": i}})
    return sorted(folder.glob("*.tar"))


def _members(shards: list[Path]) -> dict[str, bytes]:
    """Every member of the shards by name, read with tarfile (not the code under test)."""
    found = {}
    for shard in shards:
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                found[member.name] = archive.extractfile(member).read()  # type: ignore[union-attr]
    return found


def test_to_shards_through_the_cli(many_photos: Path, release_checkpoints, tmp_path: Path) -> None:
    shards = _img2dataset_shards(tmp_path / "shards", sorted(many_photos.iterdir())[:10], per_shard=4)
    scores = tmp_path / "scores.parquet"
    _score_into(scores, release_checkpoints, *shards)
    table = pd.read_parquet(scores)
    out = tmp_path / "kept"
    selection = ["--min-percentile", "50", "--by", "mem", "--percentiles"]
    done = _cli("filter", scores, *selection, "--to-shards", out, "--samples-per-shard", "3")
    assert done.exit_code == 0, done.output
    values = table["memorability"].tolist()
    kept = table[[_percentile(values, v) >= 50 for v in values]]
    assert len(kept) == 6  # the 5th to the 10th of 10 values: 50% to 100% at or below
    assert f"wrote 6 samples to 2 shards in {out}" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar"]
    given = _members(shards)
    samples = list(wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False))
    assert [s["__key__"] for s in samples] == kept["key"].tolist()  # keys unchanged, input order
    for sample, row in zip(samples, kept.itertuples(), strict=True):
        for ext in ("jpg", "txt", "json"):
            assert sample[ext] == given[f"{row.key}.{ext}"]  # byte for byte
        written = json.loads(sample["perceptscore.json"])
        assert written["memorability"] == row.memorability
        assert written["memorability_percentile"] == _percentile(values, row.memorability)


def test_to_parquet_through_the_cli(photo_dir: Path, release_checkpoints, tmp_path: Path) -> None:
    photos = sorted(photo_dir.iterdir())
    source = tmp_path / "source" / "data"
    source.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    images = [{"bytes": p.read_bytes(), "path": p.name} for p in photos]
    ds = datasets.Dataset.from_dict({"image": images, "label": list(range(len(photos)))}, features=features)
    ds.to_parquet(str(source / "train-00000-of-00001.parquet"))
    scores = tmp_path / "scores.parquet"
    _score_into(scores, release_checkpoints, source.parent)
    out = tmp_path / "with-scores"
    done = _cli("filter", scores, "--all", "--to-parquet", out)
    assert done.exit_code == 0, done.output
    assert f"wrote {len(photos)} samples to 1 file in {out}" in done.stderr
    back = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert isinstance(back.features["image"], datasets.Image)
    raw = back.cast_column("image", datasets.Image(decode=False))
    assert [r["image"]["bytes"] for r in raw] == [p.read_bytes() for p in photos]  # untouched
    assert back["label"] == list(range(len(photos)))
    assert back["memorability"] == pd.read_parquet(scores)["memorability"].tolist()


def test_help_names_the_new_options() -> None:
    done = _cli("filter", "--help")
    for option in ("--rejected", "--min-percentile", "--percentiles", "--to-shards", "--samples-per-shard",
                   "--to-parquet", "--all"):  # fmt: skip
        assert option in done.stdout
    assert "--percentiles" in _cli("rank", "--help").stdout
