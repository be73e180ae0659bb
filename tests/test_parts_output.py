"""A folder output (``-o DIR/``, issue 24 item 1): a part per input shard or dataset file, each complete
under its name, the manifest written last; the parts' union is the single-file output row for row; a run
killed with SIGKILL resumes part by part; rank, filter, report, ``--incremental`` and ``--retry-errors``
read the folder as one table, and so do pandas and pyarrow."""

from __future__ import annotations

import json
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from perceptscore.parts import MANIFEST, RUN

from test_cli_score import EXE

MEMBERS = 6


@pytest.fixture(scope="module")
def shard_glob(shard_folder: Path) -> str:
    return f"{shard_folder}/**/*.tar"


@pytest.fixture(scope="module")
def shard_folder(many_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tars") / "shards"
    (folder / "more").mkdir(parents=True)
    photos = sorted(many_photos.iterdir())[: 4 * MEMBERS]
    for number in range(4):  # the last one a folder down: its part keeps that layout
        shard = folder / ("more" if number == 3 else "") / f"{number:05d}.tar"
        with tarfile.open(shard, "w") as archive:
            for offset, photo in enumerate(photos[number * MEMBERS : (number + 1) * MEMBERS]):
                archive.add(photo, arcname=f"{number:05d}{offset:04d}.jpg")
    return folder


def score(inputs: list[str], checkpoint: Path, out: str, *extra: str, env: dict[str, str] | None = None):
    args = [EXE, "score", *inputs, "-t", "mem", "--checkpoint", str(checkpoint), "--batch-size", "4",
            "--workers", "1", "--device", "cpu", "-o", out, *extra]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, env=env)


def test_a_part_per_shard_whose_union_is_the_single_file_output(
    shard_glob: str, release_checkpoints, tmp_path: Path
) -> None:
    checkpoint = release_checkpoints["memorability"][0]
    single, folder = tmp_path / "one.parquet", tmp_path / "scores"
    done = score([shard_glob], checkpoint, str(single))
    assert done.returncode == 0, done.stderr
    done = score([shard_glob], checkpoint, f"{folder}/")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((folder / MANIFEST).read_text())
    names = [p["file"] for p in manifest["parts"]]
    assert names == ["00000.parquet", "00001.parquet", "00002.parquet", "more/00003.parquet"]
    assert [p["rows"] for p in manifest["parts"]] == [MEMBERS] * 4 and manifest["rows"] == 4 * MEMBERS
    assert manifest["provenance"]["tasks"] and not (folder / RUN).exists()
    one = pd.read_parquet(single)
    for name in names:  # each part holds its shard's rows, all of them
        part = pd.read_parquet(folder / name)
        assert part["shard"].nunique() == 1 and part["shard"].iloc[0].endswith(
            name.replace(".parquet", ".tar")
        )
    union = pd.concat([pd.read_parquet(folder / n) for n in names], ignore_index=True)
    pd.testing.assert_frame_equal(union, one)
    # other readers see one table (the manifest and any hidden file skipped)
    assert pads.dataset(folder, format="parquet").to_table().num_rows == len(one)
    assert len(pd.read_parquet(folder)) == len(one)
    import duckdb  # (its globs see hidden files too: none is left once finished)

    found = duckdb.sql(f"select path, memorability from read_parquet('{folder}/**/*.parquet') order by path")
    pd.testing.assert_frame_equal(
        found.df(), one[["path", "memorability"]].sort_values("path", ignore_index=True)
    )


@pytest.mark.slow
def test_rank_filter_report_incremental_and_retry_read_the_folder(
    shard_glob: str, release_checkpoints, tmp_path: Path
) -> None:
    checkpoint = release_checkpoints["memorability"][0]
    folder, single = tmp_path / "scores", tmp_path / "one.parquet"
    assert score([shard_glob], checkpoint, f"{folder}/").returncode == 0
    assert score([shard_glob], checkpoint, str(single)).returncode == 0
    one = pd.read_parquet(single)
    top = [EXE, "rank", str(folder), "-t", "mem", "--top", "3", "-o", str(tmp_path / "r.csv")]
    ranked = subprocess.run(top, capture_output=True, text=True)
    assert ranked.returncode == 0, ranked.stderr
    expected = one.sort_values("memorability", ascending=False, kind="stable").head(3)
    assert pd.read_csv(tmp_path / "r.csv")["path"].tolist() == expected["path"].tolist()
    threshold = float(one["memorability"].median())
    kept = subprocess.run([EXE, "filter", str(folder), "--min-memorability", str(threshold), "-o",
                           str(tmp_path / "k.txt")], capture_output=True, text=True)  # fmt: skip
    assert kept.returncode == 0, kept.stderr
    wanted = one.loc[one["memorability"] >= threshold, "path"].tolist()
    assert (tmp_path / "k.txt").read_text().splitlines() == wanted
    report = subprocess.run([EXE, "report", str(folder), "-o", str(tmp_path / "r.html")], capture_output=True,
                            text=True)  # fmt: skip
    assert report.returncode == 0, report.stderr
    again = score([shard_glob], checkpoint, str(tmp_path / "again.parquet"), "--incremental", str(folder),
                  "--json")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["reused"] == len(one)
    retried = score([], checkpoint, str(tmp_path / "retried.parquet"), "--retry-errors", str(folder))
    assert retried.returncode == 0, retried.stderr
    assert pd.read_parquet(tmp_path / "retried.parquet")["path"].tolist() == one["path"].tolist()


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_part_by_part(
    shard_glob: str, release_checkpoints, tmp_path: Path
) -> None:
    """SIGKILL after the first parts: they are whole, in the run's own folder; the folder holds no output
    yet (no manifest); the rerun keeps them as they are (not rewritten) and moves them into place."""
    checkpoint = release_checkpoints["memorability"][0]
    folder = tmp_path / "scores"
    run = folder / RUN
    args = [EXE, "score", shard_glob, "-t", "mem", "--checkpoint", str(checkpoint), "--batch-size", "2",
            "--workers", "0", "--device", "cpu", "-o", f"{folder}/"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and len(list(run.glob("0000*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = {p.name: p.stat().st_mtime_ns for p in run.glob("0000*.parquet")}
    assert len(saved) >= 2 and not (folder / MANIFEST).exists()
    assert not list(folder.glob("*.parquet"))  # nothing that readers would take for scores
    for name in saved:
        assert len(pd.read_parquet(run / name)) == MEMBERS
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {n: (folder / n).stat().st_mtime_ns for n in saved} == saved  # kept, not written again
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["rows"] == 4 * MEMBERS and not run.exists()


def test_a_folder_of_loose_files_and_a_hub_dataset_get_their_own_part_names(
    photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    checkpoint = release_checkpoints["memorability"][0]
    photos = sorted(photo_dir.iterdir())[:4]
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for n in range(2):
        rows = [{"bytes": p.read_bytes(), "path": p.name} for p in photos[n * 2 : n * 2 + 2]]
        pq.write_table(pa.table({"image": pa.array(rows, image)}), hub / f"train-0000{n}-of-00002.parquet")
    out = tmp_path / "hub_scores"
    done = score([str(tmp_path / "hub")], checkpoint, f"{out}/")
    assert done.returncode == 0, done.stderr
    names = [p["file"] for p in json.loads((out / MANIFEST).read_text())["parts"]]
    assert names == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    loose = tmp_path / "loose"
    done = score([str(p) for p in photos], checkpoint, f"{loose}/")
    assert done.returncode == 0, done.stderr
    assert [p["file"] for p in json.loads((loose / MANIFEST).read_text())["parts"]] == [
        "part-000000000000.parquet"
    ]
    np.testing.assert_array_equal(
        pd.read_parquet(out)["memorability"], pd.read_parquet(loose)["memorability"]
    )  # the same images, from bytes or from files


@pytest.mark.slow
def test_a_folder_output_is_refused_where_it_would_lose_or_mix_files(
    shard_folder: Path, shard_glob: str, release_checkpoints, tmp_path: Path
) -> None:
    checkpoint = release_checkpoints["memorability"][0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused = score([shard_glob], checkpoint, f"{mine}/")
    assert refused.returncode == 2 and "not perceptscore's" in refused.stderr
    assert (mine / "notes.txt").read_text() == "mine" and len(list(mine.iterdir())) == 1
    inside = score([str(shard_folder)], checkpoint, f"{shard_folder}/scores/")
    assert inside.returncode == 2 and "inside the input" in inside.stderr
    folder = tmp_path / "scores"
    assert score([shard_glob], checkpoint, f"{folder}/").returncode == 0
    nested = score([f"{shard_folder}/more/*.tar"], checkpoint, f"{folder}/night/")
    assert nested.returncode == 2 and "inside the perceptscore output" in nested.stderr
    (folder / "README.txt").write_text("the user's")  # beside the parts: never removed
    again = score([shard_glob], checkpoint, f"{folder}/", "--incremental", str(folder), "--json")
    assert again.returncode == 0, again.stderr  # a nightly rerun into its own folder
    assert json.loads(again.stdout)["reused"] == 4 * MEMBERS
    reused = json.loads((folder / MANIFEST).read_text())["parts"]  # reused rows keep a part per shard
    assert [p["rows"] for p in reused] == [MEMBERS] * 4
    fewer = score([f"{shard_folder}/more/*.tar"], checkpoint, f"{folder}/")
    assert fewer.returncode == 2 and "--max-delete" in fewer.stderr  # 18 of 24 rows would go: refused
    assert json.loads((folder / MANIFEST).read_text())["rows"] == 4 * MEMBERS  # untouched
    replaced = score([f"{shard_folder}/more/*.tar"], checkpoint, f"{folder}/", "--max-delete", "all")
    assert replaced.returncode == 0, replaced.stderr
    after = json.loads((folder / MANIFEST).read_text())
    assert [p["file"] for p in after["parts"]] == ["00003.parquet"]
    assert sorted(p.name for p in folder.rglob("*.parquet")) == ["00003.parquet"]  # the old parts gone
    assert (folder / "README.txt").read_text() == "the user's"
    kept = ["-o", str(folder / "kept.parquet"), "--overwrite"]
    into = subprocess.run([EXE, "filter", str(folder), "--min-memorability", "-10", *kept],
                          capture_output=True, text=True)  # fmt: skip
    assert into.returncode == 2 and "inside the input" in into.stderr


def test_part_names_never_collide_nor_hide_from_readers(
    photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    """A shard named like a block of plain rows, and shards whose names readers skip (``_``, ``.``): each
    its own part, every one read by pandas."""
    checkpoint = release_checkpoints["memorability"][0]
    photos = sorted(photo_dir.iterdir())[:4]
    shards = tmp_path / "in"
    (shards / "_sub").mkdir(parents=True)
    for name in ("part-000000000000.tar", "_a.tar", "_sub/c.tar"):
        with tarfile.open(shards / name, "w") as archive:
            archive.add(photos[0], arcname="k0.jpg")
            archive.add(photos[1], arcname="k1.jpg")
    out = tmp_path / "out"
    inputs = [str(photos[2]), str(photos[3]), f"{shards}/**/*.tar"]
    done = score(inputs, checkpoint, f"{out}/")
    assert done.returncode == 0, done.stderr
    names = [p["file"] for p in json.loads((out / MANIFEST).read_text())["parts"]]
    assert names == [
        "part-000000000000.parquet",
        "x_a.parquet",
        "x_sub/c.parquet",
        "xpart-000000000000.parquet",
    ]
    assert len(pd.read_parquet(out)) == 8 and pd.read_parquet(out / names[0])["path"].tolist() == inputs[:2]


def test_a_forged_manifest_cannot_make_readers_open_files_elsewhere(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    outside = tmp_path / "secret.parquet"
    pq.write_table(pa.table({"path": ["/etc/x"], "error": [None]}), outside)
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "evil.parquet").symlink_to(outside)
    for listed in (["evil.parquet"], ["../secret.parquet"], ["."]):
        body = {
            "provenance": {"perceptscore": "x"},
            "parts": [{"file": f, "rows": 1, "errors": 0} for f in listed],
        }
        (forged / MANIFEST).write_text(json.dumps(body))
        shown = subprocess.run([EXE, "rank", str(forged), "-t", "mem"], capture_output=True, text=True)
        assert shown.returncode == 2 and "/etc/x" not in shown.stdout, listed


def test_a_swap_cut_short_is_finished_by_the_next_run(tmp_path: Path) -> None:
    """The journal says what the swap does; carried out again after a SIGKILL at any step, it ends with
    the new parts in place, the old ones that are not replaced gone, the new manifest last, the run's
    folder gone, and a file the old manifest did not list left alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from perceptscore import parts

    def table(path: str) -> pa.Table:
        return pa.table({"path": [path], "error": pa.array([None], pa.string())})

    folder = tmp_path / "out"
    (folder / RUN / "sub").mkdir(parents=True)
    for name in ("a.parquet", "b.parquet"):  # the earlier output
        pq.write_table(table(f"old {name}"), folder / name)

    def listed(*names: str) -> list[dict[str, object]]:
        return [{"file": n, "rows": 1, "errors": 0} for n in names]

    old = parts.manifest_body({"perceptscore": "old"}, listed("a.parquet", "b.parquet"), pa.schema([]))
    (folder / MANIFEST).write_text(json.dumps(old))
    (folder / "mine.txt").write_text("the user's")
    for name in ("a.parquet", "sub/c.parquet"):  # the new run's
        pq.write_table(table(f"new {name}"), folder / RUN / name)
    new = parts.manifest_body({"perceptscore": "new"}, listed("a.parquet", "sub/c.parquet"), pa.schema([]))
    journal = {"remove": ["a.parquet", "b.parquet"], "move": ["a.parquet", "sub/c.parquet"], "manifest": new}
    (folder / RUN / parts.SWAP).write_text(json.dumps(journal))
    (folder / MANIFEST).unlink()  # killed after its first steps: the old manifest and b gone, a not moved
    (folder / "b.parquet").unlink()
    assert parts.finish_swap(folder)
    assert parts.read(str(folder)).column("path").to_pylist() == ["new a.parquet", "new sub/c.parquet"]
    assert not (folder / RUN).exists() and not (folder / "b.parquet").exists()
    assert (folder / "mine.txt").read_text() == "the user's" and not parts.finish_swap(folder)
