"""Data safety, each finding of the audit as it was reproduced: real files, the real CLI in subprocesses.
Nothing a user did not name as the output is ever written over; no run mixes rows; no scores file, file
name or endpoint can make perceptscore copy, print or run what it should not."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from perceptscore.errors import UsageError
from perceptscore.runs import OutputLock

from test_cli_score import EXE, run
from test_reliability import ENV, command, shards, wait_for_shards

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def mem(release_checkpoints) -> list[str]:  # type: ignore[no-untyped-def]
    # --device cpu: these tests are about files, shards and locks of one process; on a GPU host auto would
    # run a process per GPU
    return ["-t", "mem", "--checkpoint", str(release_checkpoints["memorability"][0]), "--device", "cpu"]


@pytest.fixture(scope="module")
def scored(photo_dir: Path, release_checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV scores file of the test photos, written from its own folder with relative paths. One run for
    the module: the tests using it only read it (each checks that a refused command left it as it was)."""
    tmp_path = tmp_path_factory.mktemp("scored")
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(photo_dir.iterdir()):
        (photos / p.name).write_bytes(p.read_bytes())
    done = subprocess.run([EXE, "score", "photos", *mem(release_checkpoints), "-o", "s.csv"], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return tmp_path / "s.csv"


# ---- 1, 2: outputs never land on inputs or on anything that is not theirs --------------------------


@pytest.mark.slow
def test_filter_never_writes_a_list_over_a_photo_and_dash_is_stdout(scored: Path) -> None:
    photo = scored.parent / "photos" / "a_square.jpg"
    before = photo.read_bytes()
    done = run("filter", scored, "--min-memorability", "-100", "-o", photo)
    assert done.returncode == 2 and "a list of paths is written to a .txt or .lst file" in done.stderr
    assert photo.read_bytes() == before
    done = subprocess.run([EXE, "filter", str(scored), "--min-memorability", "-100", "-o", "-"],
                          cwd=scored.parent, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 6 and not (scored.parent / "-").exists()


@pytest.mark.slow
def test_an_input_is_never_the_output(scored: Path, release_checkpoints, tmp_path: Path) -> None:
    original = scored.read_bytes()
    for args in (
        ["rank", scored, "-t", "mem", "-o", scored],
        ["filter", scored, "--min-memorability", "-100", "-o", scored],
    ):
        done = run(*args)
        assert done.returncode == 2 and "refusing to overwrite an input" in done.stderr, done.stderr
    link = tmp_path / "link.csv"
    link.symlink_to(scored)
    done = run("rank", scored, "-t", "mem", "-o", link)  # the same file through a link
    assert done.returncode == 2 and "refusing to overwrite an input" in done.stderr
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{scored.parent / 'photos' / 'a_square.jpg'}\n")
    done = run("score", manifest, *mem(release_checkpoints), "-o", manifest)
    assert done.returncode == 2 and "refusing to overwrite an input" in done.stderr
    assert scored.read_bytes() == original and manifest.read_text().startswith("path\n")


# ---- 3, 4: resumed runs never mix rows; interrupted work is never thrown away unasked -----------------


def interrupted_run(args: list[str], out: Path, cwd: Path | None = None, at: int = 2) -> None:
    proc = subprocess.Popen(args, env=ENV, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_shards(proc, out, at)
    proc.kill()
    proc.wait()
    assert shards(out) >= at and not out.exists()


@pytest.mark.slow
def test_resume_checks_every_row_of_a_changed_manifest(
    many_photos: Path, release_checkpoints, reference, tmp_path: Path
) -> None:
    """Rows 1, 2 and 4 changed (the same size and mtime): --resume refuses to continue, in one line; a rerun
    without it reuses the old rows only where the file is the same, so no old row lands on a new file."""
    photos = sorted(str(p) for p in many_photos.iterdir())[:60]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "\n".join(photos) + "\n")
    out = tmp_path / "out.parquet"
    args = command(manifest, release_checkpoints["memorability"][0], out)
    interrupted_run(args, out, at=3)
    changed = list(photos)
    changed[1], changed[2], changed[4] = photos[50], photos[51], photos[52]  # rows inside the first shard
    stat_before = manifest.stat()
    manifest.write_text("path\n" + "\n".join(changed) + "\n")
    os.utime(manifest, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))  # even with the same mtime
    done = subprocess.run([*args, "--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "the inputs changed since the interrupted run (rows 0-7 are other files than were scored)" in line
    done = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "the inputs changed since an interrupted run" in done.stderr
    expected = reference.set_index("path")["memorability"]
    got = pd.read_parquet(out)
    assert got["path"].tolist() == changed
    # each row its own file's score (to float32 rounding: a batch of other files may round the last bit
    # differently on some CPUs; another file's score differs by far more)
    got_scores, expected_scores = got["memorability"].to_numpy(), expected[changed].to_numpy()
    np.testing.assert_allclose(got_scores, expected_scores, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_shorter_input_is_one_line_with_resume(
    many_photos: Path, release_checkpoints, tmp_path: Path
) -> None:
    """It was a RuntimeError traceback."""
    folder = tmp_path / "photos"  # a folder: no file whose size says it changed, its rows say it
    folder.mkdir()
    for p in sorted(many_photos.iterdir())[:40]:
        os.link(p, folder / p.name)
    out = tmp_path / "out.parquet"
    args = command(folder, release_checkpoints["memorability"][0], out, "--resume")
    interrupted_run(args, out, at=3)
    for p in sorted(folder.iterdir())[10:]:
        p.unlink()
    done = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "the inputs changed since the interrupted run (they end at row 9; row " in done.stderr


@pytest.mark.slow
def test_a_resume_from_another_folder_never_mixes_two_trees(
    many_photos: Path, release_checkpoints, reference, tmp_path: Path
) -> None:
    originals = sorted(many_photos.iterdir())
    for tree in ("a", "b"):
        (tmp_path / tree / "photos").mkdir(parents=True)
    for i, p in enumerate(originals[:40]):  # the same names, other photos
        (tmp_path / "a" / "photos" / p.name).write_bytes(p.read_bytes())
        (tmp_path / "b" / "photos" / p.name).write_bytes(originals[40 + i].read_bytes())
    out = tmp_path / "out.parquet"
    args = command(Path("photos"), release_checkpoints["memorability"][0], out)  # relative: as typed in cron
    interrupted_run(args, out, cwd=tmp_path / "a")
    done = subprocess.run([*args, "--resume"], env=ENV, cwd=tmp_path / "b", capture_output=True, text=True)
    assert done.returncode == 2 and "differs in inputs" in done.stderr and "--restart" in done.stderr
    done = subprocess.run(args, env=ENV, cwd=tmp_path / "b", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    scores = reference.set_index("path")["memorability"]
    expected = [scores[str(p)] for p in originals[40:80]]  # tree b's own photos, none of tree a's rows
    assert pd.read_parquet(out)["memorability"].tolist() == expected


@pytest.mark.slow
def test_a_rerun_continues_the_interrupted_run_and_restart_discards_it(
    many_photos: Path, release_checkpoints, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"  # 64 of the photos (8 shards of 8 rows): room to stop at 2 or 3 shards
    folder.mkdir()
    for p in sorted(many_photos.iterdir())[:64]:
        os.link(p, folder / p.name)
    out = tmp_path / "out.parquet"
    args = command(folder, release_checkpoints["memorability"][0], out)
    interrupted_run(args, out, at=3)
    saved = shards(out)
    done = subprocess.run(args, env=ENV, capture_output=True, text=True)  # no flag: a cron line rerun
    assert done.returncode == 0, done.stderr
    assert "resumed from an interrupted run" in done.stderr
    assert pd.read_parquet(out)["path"].tolist() == [str(p) for p in sorted(folder.iterdir())]
    out.unlink()
    interrupted_run(args, out, at=2)
    other = [*args, "--fast-decode"]  # another plan: refused, the shards kept
    done = subprocess.run(other, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and "differs in fast_decode" in done.stderr and shards(out) >= 2
    done = subprocess.run([*other, "--restart"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0 and "rows of an interrupted run (--restart)" in done.stderr
    assert saved >= 3


# ---- 5: one lock, one writer --------------------------------------------------------------------------

HOLD = """
import sys
from pathlib import Path
from perceptscore.runs import OutputLock
with OutputLock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_the_lock_is_never_held_twice(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert first.stdout.readline() == "locked\n"
    lock_path = out.with_name(".out.parquet.lock")
    assert stat.S_IMODE(lock_path.stat().st_mode) == 0o600  # it names a command line
    stale = os.open(lock_path, os.O_RDWR)  # a run that opened the file just before the first one ended
    first.communicate("\n", timeout=30)
    third = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert third.stdout.readline() == "locked\n"

    class Late(OutputLock):
        opened = False

        def _open(self) -> int:  # the stale descriptor first, as the race would have it
            if not Late.opened:
                Late.opened = True
                return stale
            return super()._open()

    try:
        with pytest.raises(UsageError, match="is being written by another run"), Late(out):
            pass
    finally:
        third.communicate("\n", timeout=30)


@pytest.mark.slow
def test_a_symlinked_output_stays_a_link_to_the_file_written(photo_dir: Path, release_checkpoints,
                                                             tmp_path: Path) -> None:  # fmt: skip
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "scores.csv"
    target.write_text("old\n")
    link = tmp_path / "scores.csv"
    link.symlink_to(target)
    done = run("score", photo_dir, *mem(release_checkpoints), "-o", link)
    assert done.returncode == 2 and "was not written by perceptscore" in done.stderr  # "old" is the user's
    done = run("score", photo_dir, *mem(release_checkpoints), "-o", link, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert len(pd.read_csv(link)) == 6 and (tmp_path / "real" / "scores.csv.meta.json").exists()


# ---- 6-11: security -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_copy_to_places_only_the_files_that_were_scored(scored: Path, tmp_path: Path) -> None:
    forged = tmp_path / "forged.csv"
    frame = pd.read_csv(scored)
    frame.loc[0, "path"] = "/etc/passwd"
    frame.to_csv(forged, index=False)
    (tmp_path / "forged.csv.meta.json").write_text(scored.with_name("s.csv.meta.json").read_text())
    dest = tmp_path / "keep"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([EXE, "filter", str(forged), "--min-memorability", "-100", "--copy-to", str(dest)],
                          cwd=elsewhere, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1
    assert "not placed: /etc/passwd: changed or gone since it was scored" in done.stderr
    placed = sorted(p.name for p in dest.iterdir())
    assert "passwd" not in placed and len([p for p in placed if not p.endswith(".csv")]) == 5
    # relative paths were resolved against where they were scored, not the current folder
    mapping = pd.read_csv(dest / "perceptscore-placed.csv")
    assert len(mapping) == 5 and mapping["source"].str.startswith("photos/").all()


@pytest.mark.slow
def test_folder_walks_stay_under_their_root_unless_asked(photo_dir: Path, release_checkpoints,
                                                         tmp_path: Path) -> None:  # fmt: skip
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes((photo_dir / "a_square.jpg").read_bytes())
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    (root / "inner" / "a.jpg").write_bytes((photo_dir / "a_square.jpg").read_bytes())
    (root / "up").symlink_to(outside)
    (root / "also_inner").symlink_to(root / "inner")
    done = run("score", root, *mem(release_checkpoints))
    names = [Path(line.split(",")[0].strip('"')).name for line in done.stdout.splitlines()[1:]]
    assert names == ["a.jpg"], done.stdout  # the inner link leads to a folder already walked
    done = run("score", root, *mem(release_checkpoints), "--follow-links")
    assert "secret.jpg" in done.stdout


@pytest.mark.slow
def test_csv_cells_are_never_formulas_and_read_back_exactly(photo_dir: Path, release_checkpoints,
                                                            tmp_path: Path) -> None:  # fmt: skip
    folder = tmp_path / "photos"
    folder.mkdir()
    name = '=HYPERLINK("evil").jpg'
    (folder / name).write_bytes((photo_dir / "a_square.jpg").read_bytes())
    out = tmp_path / "s.csv"
    # a relative path, so the cell starts with "="
    score = [EXE, "score", name, *mem(release_checkpoints), "-o", str(out)]
    assert subprocess.run(score, cwd=folder, capture_output=True).returncode == 0
    (cell,) = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert cell == '"\'=HYPERLINK(""evil"").jpg"'  # a spreadsheet shows text, runs nothing
    done = subprocess.run([EXE, "filter", str(out), "--min-memorability", "-100"], cwd=folder,
                          capture_output=True, text=True)  # fmt: skip
    assert done.stdout.splitlines() == [name]  # perceptscore reads its own cells back exactly
    done = subprocess.run([*score, "--incremental", str(out)], cwd=folder, capture_output=True, text=True)
    assert "1 unchanged, reused" in done.stderr, done.stderr


@pytest.mark.slow
def test_names_with_escapes_and_newlines_cannot_fake_output(photo_dir: Path, release_checkpoints,
                                                            tmp_path: Path) -> None:  # fmt: skip
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("keep.jpg\nvictim.jpg", "red\x1b[31m.jpg", "plain.jpg"):
        (folder / name).write_bytes((photo_dir / "a_square.jpg").read_bytes())
    scores = tmp_path / "s.parquet"
    assert run("score", folder, *mem(release_checkpoints), "-o", scores).returncode == 0
    done = run("filter", scores, "--min-memorability", "-100")
    assert done.returncode == 1
    assert done.stdout.splitlines() == [str(folder / "plain.jpg"), str(folder / "red\x1b[31m.jpg")]
    assert f"not listed: {folder}/keep.jpg\\x0avictim.jpg: a newline in its name (--print0)" in done.stderr
    done = run("filter", scores, "--min-memorability", "-100", "--print0")
    assert done.returncode == 0 and done.stdout.split("\0")[:-1] == sorted(str(p) for p in folder.iterdir())
    done = run("filter", scores, "--min-memorability", "-100", "--copy-to", tmp_path / "red\x1b[31m")
    assert "\x1b" not in done.stderr and "red\\x1b[31m" in done.stderr


@pytest.mark.slow
def test_credentials_are_never_printed_or_stored(release_checkpoints, tmp_path: Path) -> None:
    from fake_hub import FakeHub

    with FakeHub() as hub:
        hub.refuse["PerceptCLIP/PerceptCLIP_IQA/perceptCLIP_IQA.pth"] = (500, {})
        endpoint = hub.endpoint.replace("http://", "http://user:s3cret-token@")
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
               "PERCEPTSCORE_CACHE": str(tmp_path / "cache")}  # fmt: skip
        done = subprocess.run([EXE, "weights", "fetch", "quality"], env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    assert done.returncode == 3 and "s3cret" not in done.stderr + done.stdout


# ---- 12-16: robustness ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_images_over_the_pixel_limit_are_refused_rows(photo_dir: Path, release_checkpoints,
                                                      tmp_path: Path) -> None:  # fmt: skip
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("1", (9600, 9600)).save(folder / "big.png")  # 92 MP: Pillow only warns, it decoded at 2.4 GB
    (folder / "small.jpg").write_bytes((photo_dir / "a_square.jpg").read_bytes())
    out = tmp_path / "s.csv"
    done = run("score", folder, *mem(release_checkpoints), "-o", out)
    assert done.returncode == 1
    errors = pd.read_csv(out).set_index("path")["error"]
    assert errors[str(folder / "big.png")].startswith("refused: decompression bomb (9600x9600")
    assert "--max-pixels" in errors[str(folder / "big.png")] and pd.isna(errors[str(folder / "small.jpg")])
    done = run("score", folder / "small.jpg", *mem(release_checkpoints), "--max-pixels", "1000")
    assert "over the 1,000 pixel limit" in done.stdout


@pytest.mark.slow
def test_a_very_deep_folder_tree_is_walked(photo_dir: Path, release_checkpoints, tmp_path: Path) -> None:
    deep = tmp_path / "tree"
    deep.mkdir()
    folder = deep
    for _ in range(1100):  # one level at a time: pathlib's own mkdir(parents=True) recurses too
        folder = folder / "d"
        folder.mkdir()
    (folder / "bottom.jpg").write_bytes((photo_dir / "a_square.jpg").read_bytes())
    try:
        done = run("score", deep, *mem(release_checkpoints))
        assert done.returncode == 0, done.stderr[-500:]
        assert "bottom.jpg" in done.stdout and "RecursionError" not in done.stderr
    finally:  # bottom up, one level at a time: pytest's own clean-up (rmtree) recurses too
        (folder / "bottom.jpg").unlink()
        while folder != deep.parent:
            folder.rmdir()
            folder = folder.parent


@pytest.mark.slow
def test_damaged_inputs_and_odd_outputs_are_one_line(
    scored: Path, release_checkpoints, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 this is not parquet at all")
    sidecar = tmp_path / "bad.csv"
    sidecar.write_text(scored.read_text())
    (tmp_path / "bad.csv.meta.json").write_text("{not json")
    folder_csv = tmp_path / "out.csv"  # a folder named like an output: it was a traceback
    folder_csv.mkdir()
    bad_tensors = tmp_path / "bad.safetensors"
    bad_tensors.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    cases = [
        (["score", junk, *mem(release_checkpoints)], "unreadable"),
        (["rank", sidecar, "-t", "mem"], "bad.csv.meta.json: unreadable provenance"),
        (["score", scored.parent / "photos", *mem(release_checkpoints), "-o", folder_csv], "is a folder"),
        (["filter", scored, "--min-memorability", "0", "-o", tmp_path / "no" / "x.txt"], "does not exist"),
    ]
    for args, expected in cases:
        done = run(*args)
        assert done.returncode == 2, (args, done.stderr)
        (line,) = done.stderr.strip().splitlines()
        assert expected in line and "Traceback" not in line, (args, line)
    from perceptscore.errors import CheckpointError
    from perceptscore.tasks import get_task
    from perceptscore.trainer.base import load_base

    with pytest.raises(CheckpointError, match="not a safetensors file"):  # train --init: was a MemoryError
        load_base(str(bad_tensors), get_task("quality").architecture)


@pytest.mark.slow
def test_many_copies_of_one_name_are_all_placed_and_mapped(photo_dir: Path, release_checkpoints,
                                                           tmp_path: Path) -> None:  # fmt: skip
    data = (photo_dir / "a_square.jpg").read_bytes()
    files = []
    for i in range(300):
        folder = tmp_path / "src" / f"{i:03d}"
        folder.mkdir(parents=True)
        (folder / "IMG_0001.jpg").write_bytes(data + i.to_bytes(2, "little"))  # distinct files, one name
        files.append(str(folder / "IMG_0001.jpg"))
    scores = tmp_path / "s.parquet"
    assert run("score", tmp_path / "src", *mem(release_checkpoints), "-o", scores).returncode == 0
    dest = tmp_path / "keep"
    done = run("filter", scores, "--min-memorability", "-100", "--copy-to", dest)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in dest.iterdir() if p.suffix == ".jpg")
    assert len(names) == 300 and "IMG_0001-299.jpg" in names
    mapping = pd.read_csv(dest / "perceptscore-placed.csv")
    assert mapping["source"].tolist() == files and mapping["destination"].nunique() == 300


@pytest.mark.slow
def test_a_killed_writers_partial_files_are_cleaned_up(photo_dir: Path, release_checkpoints,
                                                       tmp_path: Path) -> None:  # fmt: skip
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".s.csv.partial-{dead.pid}"
    orphan.write_text("half a file")
    live = tmp_path / f".s.csv.partial-{os.getpid()}"  # a live writer's: left alone
    live.write_text("being written")
    assert run("score", photo_dir, *mem(release_checkpoints), "-o", tmp_path / "s.csv").returncode == 0
    assert not orphan.exists() and live.exists()
