"""score / rank / filter through the real ``perceptscore`` executable; outputs read back with pandas."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from test_pipeline import release_center_outputs

EXE = str(Path(sysconfig.get_path("scripts")) / "perceptscore")


def run(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def scores_parquet(
    tmp_path_factory: pytest.TempPathFactory, photo_dir: Path, checkpoint_args: list[str]
) -> Path:
    out = tmp_path_factory.mktemp("scores") / "scores.parquet"
    # --device cpu: these rows are compared with the release's fp32 CPU outputs (auto takes a GPU if seen)
    done = run("score", photo_dir, "-t", "memorability,quality,emotion", *checkpoint_args, "-o", out,
               "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "6 scored, 0 errors" in done.stderr
    return out


@pytest.mark.slow
def test_score_to_parquet_matches_the_release_and_records_provenance(
    scores_parquet: Path, photo_dir: Path, release_checkpoints
) -> None:
    table = pq.read_table(scores_parquet)
    df = table.to_pandas()
    paths = sorted(photo_dir.iterdir())
    assert df["path"].tolist() == [str(p) for p in paths]
    expected = release_center_outputs(release_checkpoints["memorability"][1], paths)[:, 0]
    np.testing.assert_allclose(df["memorability"], expected, atol=1e-4, rtol=0)
    assert list(df.columns[:5]) == ["path", "memorability", "quality", "quality_raw", "emotion"]
    assert (
        list(df.columns[-3:]) == ["error", "file_size", "file_mtime_ns"]
        and len(df.columns) == 1 + 1 + 2 + 10 + 3
    )
    assert df["file_size"].tolist() == [p.stat().st_size for p in paths]
    meta = json.loads(table.schema.metadata[b"perceptscore"])
    checkpoint = release_checkpoints["quality"][0]
    assert meta["tasks"]["quality"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["device"] == "cpu" and meta["precision"] == "fp32"
    assert "15 x RandomCrop(224)" in meta["tasks"]["quality"]["preprocessing"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.slow
def test_csv_and_jsonl_outputs_hold_the_same_rows(
    tmp_path: Path, photo_dir: Path, checkpoint_args, scores_parquet, fmt: str
) -> None:
    out = tmp_path / f"scores.{fmt}"
    # --device cpu: compared with the fp32 CPU rows to 1e-5 (auto would take a GPU, fp16)
    done = run("score", photo_dir, "-t", "mem,iqa,emotions", *checkpoint_args, "-o", out, "--batch-size", "4",
               "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr
    df = pd.read_csv(out) if fmt == "csv" else pd.read_json(out, lines=True)
    reference = pd.read_parquet(scores_parquet)
    assert df["path"].tolist() == reference["path"].tolist()
    numeric = [c for c in reference.columns if reference[c].dtype.kind == "f"]
    np.testing.assert_allclose(df[numeric], reference[numeric], atol=1e-5, rtol=0)
    assert json.loads(Path(f"{out}.meta.json").read_text())["tasks"].keys() == {
        "memorability",
        "quality",
        "emotion",
    }
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.slow
def test_score_to_stdout_from_a_manifest_passes_columns_through(
    tmp_path: Path, photo_dir: Path, release_checkpoints
) -> None:
    manifest = tmp_path / "manifest.csv"
    names = ["d_portrait.jpg", "a_square.jpg"]
    manifest.write_text(
        "path,photographer\n" + "".join(f"{photo_dir / n},person{i}\n" for i, n in enumerate(names))
    )
    done = run(
        "score", manifest, "-t", "memorability", "--checkpoint", release_checkpoints["memorability"][0]
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == '"path","memorability","error","file_size","file_mtime_ns","photographer"'
    assert [line.split(",")[0].strip('"') for line in lines[1:]] == [str(photo_dir / n) for n in names]
    assert lines[2].endswith('"person1"')


@pytest.mark.slow
def test_rank_from_images_and_from_a_scores_file(
    tmp_path: Path, photo_dir: Path, scores_parquet: Path, release_checkpoints
) -> None:
    expected = (
        pd.read_parquet(scores_parquet).sort_values("quality", ascending=False)["path"].head(3).tolist()
    )
    from_file = run("rank", scores_parquet, "-t", "quality", "--top", "3")
    assert from_file.returncode == 0, from_file.stderr
    assert pd.read_csv(pd.io.common.StringIO(from_file.stdout))["path"].tolist() == expected
    out = tmp_path / "ranked.parquet"
    checkpoint = f"quality={release_checkpoints['quality'][0]}"
    # --device cpu: the same order as the CPU rows (fp16 on a GPU could swap two close ones)
    from_images = run("rank", photo_dir, "-t", "quality", "--top", "3", "--checkpoint", checkpoint, "-o", out,
                      "--device", "cpu")  # fmt: skip
    assert from_images.returncode == 0, from_images.stderr
    assert pd.read_parquet(out)["path"].tolist() == expected
    lowest = run("rank", scores_parquet, "-t", "memorability", "--top", "0", "--ascending")
    ranked = pd.read_csv(pd.io.common.StringIO(lowest.stdout))["memorability"].to_numpy()
    assert len(ranked) == 6 and np.all(np.diff(ranked) >= 0)


def test_filter_thresholds_use_the_display_score(tmp_path: Path, scores_parquet: Path) -> None:
    df = pd.read_parquet(scores_parquet)
    threshold = float(df["quality"].median())  # display scores sit near 0.66, raw ones below zero
    assert (df["quality_raw"] < threshold).all()
    done = run("filter", scores_parquet, "--min-quality", threshold)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == df.loc[df["quality"] >= threshold, "path"].tolist()
    assert 0 < len(done.stdout.splitlines()) < 6
    emotion = df["emotion"].iloc[0]
    listing = tmp_path / "kept.txt"
    done = run("filter", scores_parquet, "--emotion", emotion, "--max-memorability", 10, "-o", listing)
    assert listing.read_text().splitlines() == df.loc[df["emotion"] == emotion, "path"].tolist()
    done = run("filter", scores_parquet, "--top-fraction", "0.5", "--by", "memorability")
    best = set(df.nlargest(3, "memorability")["path"])
    assert done.stdout.splitlines() == [p for p in df["path"] if p in best]  # input order kept


def test_copy_to_copies_exactly_the_selection_and_never_overwrites(tmp_path: Path, photo_dir: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    shutil.copy(photo_dir / "a_square.jpg", tmp_path / "one" / "pic.jpg")
    shutil.copy(photo_dir / "d_portrait.jpg", tmp_path / "two" / "pic.jpg")
    shutil.copy(photo_dir / "f_12mp.jpg", tmp_path / "two" / "other.jpg")
    scores = tmp_path / "scores.csv"
    rows = [("one/pic.jpg", 0.9), ("two/pic.jpg", 0.8), ("two/other.jpg", 0.1)]
    stats = [(tmp_path / p).stat() for p, _ in rows]  # what score records: copy-to checks them
    pd.DataFrame(
        {"path": [str(tmp_path / p) for p, _ in rows], "memorability": [s for _, s in rows], "error": None,
         "file_size": [s.st_size for s in stats], "file_mtime_ns": [s.st_mtime_ns for s in stats]}
    ).to_csv(scores, index=False)  # fmt: skip
    Path(f"{scores}.meta.json").write_text("{}")  # marks it a scores file
    dest = tmp_path / "best"
    dest.mkdir()
    (dest / "pic.jpg").write_bytes(b"already here")
    done = run("filter", scores, "--min-memorability", "0.5", "--copy-to", dest)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in dest.iterdir()) == [
        "perceptscore-placed.csv",
        "pic-1.jpg",
        "pic-2.jpg",
        "pic.jpg",
    ]
    assert (dest / "pic.jpg").read_bytes() == b"already here"
    assert (dest / "pic-1.jpg").read_bytes() == (tmp_path / "one" / "pic.jpg").read_bytes()
    assert (dest / "pic-2.jpg").read_bytes() == (tmp_path / "two" / "pic.jpg").read_bytes()
    links = tmp_path / "links"
    done = run("filter", scores, "--max-memorability", "0.5", "--symlink-to", links)
    linked = [p.resolve() for p in links.iterdir() if p.name != "perceptscore-placed.csv"]
    assert linked == [(tmp_path / "two" / "other.jpg").resolve()]


@pytest.mark.slow
def test_a_folder_with_bad_files_finishes_with_exit_code_1(
    tmp_path: Path, photo_dir: Path, release_checkpoints
) -> None:
    shutil.copy(photo_dir / "a_square.jpg", tmp_path / "good.jpg")
    (tmp_path / "corrupt.jpg").write_bytes((photo_dir / "a_square.jpg").read_bytes()[:3000])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("plain text")
    out = tmp_path / "out.csv"
    done = run(
        "score",
        tmp_path,
        "-t",
        "memorability",
        "--checkpoint",
        release_checkpoints["memorability"][0],
        "-o",
        out,
    )
    assert done.returncode == 1, done.stderr
    assert "1 scored, 3 errors" in done.stderr
    df = pd.read_csv(out)
    assert df.set_index(df["path"].map(lambda p: Path(p).name))["error"].notna().to_dict() == {
        "corrupt.jpg": True, "empty.jpg": True, "good.jpg": False, "text.jpg": True,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["score", "x.jpg", "-t", "beauty"], 2, "error: unknown task 'beauty'"),
        (["score", "missing-dir", "-t", "quality"], 2, "error: no such file or directory: 'missing-dir'"),
        (
            ["score", "PHOTOS", "-t", "quality"],
            3,
            "error: no weights for task quality (HF_HUB_OFFLINE is set and nothing is cached)",
        ),
        (["score", "PHOTOS", "-t", "mem", "--checkpoint", "x.pth", "-o", "out.xlsx"], 2, "unknown format"),
        (["filter", "PHOTOS"], 2, "error: filter needs a criterion"),
    ],
)
def test_user_mistakes_exit_with_their_code_and_one_line(
    photo_dir: Path, args: list[str], code: int, message: str
) -> None:
    done = run(*[str(photo_dir) if a == "PHOTOS" else a for a in args])
    assert done.returncode == code
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_paths_with_brackets_are_printed_as_they_are(
    tmp_path: Path, photo_dir: Path, release_checkpoints
) -> None:
    """Rich would read "[1]" as markup and drop it; messages and tables show user paths verbatim."""
    shutil.copy(photo_dir / "a_square.jpg", tmp_path / "shot[1].jpg")
    out = tmp_path / "scores[v2].csv"
    done = run(
        "score",
        tmp_path / "shot[1].jpg",
        "-t",
        "mem",
        "--checkpoint",
        release_checkpoints["memorability"][0],
        "-o",
        out,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(rf"-> {re.escape(str(out))} in [\d.]+ s$", done.stderr.strip()), done.stderr
    assert pd.read_csv(out)["path"].tolist() == [str(tmp_path / "shot[1].jpg")]
