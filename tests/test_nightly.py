"""The nightly job never loses what it had: the README's cron block run as written (night one, night two,
an unmounted disk, deleted files), outputs that are someone else's, run state that a refused start, a full
disk or a planted link could poison."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from perceptscore.cli import app
from perceptscore.errors import PerceptScoreError
from perceptscore.sinks import write_atomic

from photos import sample
from test_cli_score import EXE

README = Path(__file__).parent.parent / "README.md"


def cli(*args: str | Path) -> tuple[int, str]:
    """The command in this process, as ``main`` would end it: (exit code, what it printed). ``score`` runs
    on the CPU: these tests are about the files a night leaves, and on a GPU host auto would mean one
    process per GPU (other shards, a CUDA context in the test process)."""
    pinned = ("--device", "cpu") if args[:1] == ("score",) else ()
    result = CliRunner().invoke(app, [str(a) for a in (*args, *pinned)], env={"COLUMNS": "300"})
    if isinstance(result.exception, PerceptScoreError):
        return result.exception.exit_code, f"error: {result.exception}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def photos(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sample("astronaut.png" if i % 2 else "coffee.png").resize((64 + i, 48)).save(folder / f"p{i}.jpg")
    return folder


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory: pytest.TempPathFactory, release_checkpoints) -> Path:
    """``$PERCEPTSCORE_WEIGHTS`` holding the release file names: the README's lines run with no flag."""
    folder = tmp_path_factory.mktemp("weights")
    for task, name in (("memorability", "perceptCLIP_Memorability.pth"), ("quality", "perceptCLIP_IQA.pth")):
        (folder / name).symlink_to(release_checkpoints[task][0])
    return folder


def cron_block() -> str:
    text = README.read_text()
    block = text[text.index("## Cron jobs") :].split("```bash\n", 1)[1].split("```", 1)[0]
    assert "--incremental /data/scores.parquet" in block and "-o /data/scores.parquet" in block
    return block


@pytest.mark.slow
def test_the_readmes_cron_block_night_after_night(tmp_path: Path, weights_folder: Path) -> None:
    data = tmp_path / "data"
    photos(data / "photos", 6)
    script = cron_block().replace("/data/", f"{data}/").replace("perceptscore ", f"{EXE} ")
    env = {**os.environ, "PERCEPTSCORE_WEIGHTS": str(weights_folder)}
    scores = data / "scores.parquet"

    def night() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=300)

    first = night()  # night one: no scores file yet means nothing to reuse
    assert first.returncode == 0, first.stderr
    assert "nothing to reuse: " in first.stderr and "does not exist yet" in first.stderr
    assert len(pd.read_parquet(scores)) == 6

    second = night()
    assert second.returncode == 0, second.stderr
    assert "6 unchanged, reused" in second.stderr and "0 gone since the last run" in second.stderr

    (data / "photos" / "p0.jpg").unlink()  # a file deleted: its row goes, and the summary says so
    third = night()
    assert third.returncode == 0, third.stderr
    assert "5 unchanged, reused" in third.stderr and "1 gone since the last run" in third.stderr
    assert sorted(pd.read_parquet(scores)["path"]) == sorted(str(p) for p in (data / "photos").iterdir())

    before = scores.read_bytes()
    shutil.move(data / "photos", tmp_path / "elsewhere")  # the disk is not mounted tonight
    (data / "photos").mkdir()
    empty = night()
    assert empty.returncode == 2
    assert empty.stderr.strip().splitlines() == [
        f"error: no images found in {data}/photos: nothing written (--allow-empty writes an empty output)"
    ]
    assert scores.read_bytes() == before and not list(data.glob(".scores.parquet.*"))

    for p in sorted((tmp_path / "elsewhere").iterdir())[:2]:  # back, but with 2 of 5 files: 3 would go
        shutil.copy2(p, data / "photos" / p.name)
    most = night()
    assert most.returncode == 2 and scores.read_bytes() == before
    assert "would drop 3 of the 5 rows" in most.stderr and "--max-delete all" in most.stderr
    allowed = subprocess.run(["bash", "-c", script.strip() + " --max-delete 3"], capture_output=True,
                             text=True, env=env, timeout=300)  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert "3 gone since the last run" in allowed.stderr and len(pd.read_parquet(scores)) == 2


def test_inputs_with_no_image_write_nothing_unless_allowed(tmp_path: Path, release_checkpoints) -> None:
    ckpt = str(release_checkpoints["memorability"][0])
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.csv").write_text("path\n")
    out = tmp_path / "s.csv"
    for given, said in (
        ([tmp_path / "empty"], "no images found in"),
        ([f"{tmp_path}/nothing/*.jpg"], "no files match"),
        ([tmp_path / "list.csv"], "no images found in"),
    ):
        code, printed = cli("score", *given, "-t", "mem", "--checkpoint", ckpt, "-o", out)
        assert code == 2 and said in printed, printed
        assert not out.exists() and not list(tmp_path.glob(".s.csv*"))
    code, printed = cli(
        "score", tmp_path / "empty", "-t", "mem", "--checkpoint", ckpt, "-o", out, "--allow-empty"
    )
    assert code == 0, printed
    assert pd.read_csv(out).empty and "0 scored, 0 errors" in printed


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory: pytest.TempPathFactory, checkpoint_args: list[str]) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("two-tasks")
    photos(folder / "photos", 2)
    out = folder / "scores.parquet"
    code, printed = cli("score", folder / "photos", "-t", "mem,quality", *checkpoint_args, "-o", out)
    assert code == 0, printed
    return folder / "photos", out


def test_an_output_perceptscore_did_not_write_needs_overwrite(
    two_tasks: tuple[Path, Path], checkpoint_args: list[str], tmp_path: Path
) -> None:
    folder, scores = two_tasks
    mine = tmp_path / "mydata.csv"
    mine.write_text("name,value\na,1\n")
    code, printed = cli("score", folder, "-t", "mem", *checkpoint_args, "-o", mine)
    assert code == 2 and "mydata.csv exists and was not written by perceptscore: pass --overwrite" in printed
    assert mine.read_text() == "name,value\na,1\n"
    # the memorability column an earlier run wrote would be lost by a quality-only run
    before = scores.read_bytes()
    code, printed = cli("score", folder, "-t", "quality", *checkpoint_args, "-o", scores)
    assert code == 2 and "holds memorability scores that this run would not write" in printed
    assert "-t quality,memorability" in printed and scores.read_bytes() == before
    # the same command on its own output (cron) never needs the flag; --overwrite replaces a stranger's
    assert cli("score", folder, "-t", "mem,quality", *checkpoint_args, "-o", scores)[0] == 0
    code, printed = cli("score", folder, "-t", "mem", *checkpoint_args, "-o", mine, "--overwrite")
    assert code == 0, printed
    assert len(pd.read_csv(mine)) == 2

    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>")
    code, printed = cli("report", scores, "-o", notes)
    assert (
        code == 2
        and "report " in printed
        and "--overwrite" in printed
        and notes.read_text() == "<p>my notes</p>"
    )
    page = tmp_path / "page.html"
    assert cli("report", scores, "-o", page)[0] == 0 and cli("report", scores, "-o", page)[0] == 0

    listing = tmp_path / "keep.txt"
    listing.write_text("my own list\n")
    code, printed = cli("filter", scores, "--min-quality", "0", "-o", listing)
    assert code == 2 and listing.read_text() == "my own list\n"
    assert cli("filter", scores, "--min-quality", "0", "-o", listing, "--overwrite")[0] == 0
    assert cli("filter", scores, "--min-quality", "0", "-o", listing)[0] == 0  # ours now: a rerun is fine
    listing.write_text(listing.read_text() + "an edit by hand\n")  # edited since: not ours any more
    assert cli("filter", scores, "--min-quality", "0", "-o", listing)[0] == 2
    rows = tmp_path / "ranked.csv"
    rows.write_text("x\n1\n")
    assert cli("rank", scores, "-t", "mem", "-o", rows)[0] == 2 and rows.read_text() == "x\n1\n"


def test_explain_replaces_its_own_maps_only(tmp_path: Path, release_checkpoints) -> None:
    folder = photos(tmp_path / "photos", 1)
    ckpt, out = str(release_checkpoints["memorability"][0]), tmp_path / "maps"
    args = ("explain", folder, "-t", "mem", "--checkpoint", ckpt, "-o", out, "--device", "cpu")
    assert cli(*args)[0] == 0
    assert cli(*args)[0] == 0  # its own heatmap from the night before
    png = out / "p0.memorability.relevance.png"
    sample("coffee.png").save(png)  # a picture of the user's under that name
    code, printed = cli(*args)
    assert code == 2 and "p0.memorability.relevance.png exists and was not written by perceptscore" in printed


def test_a_refused_checkpoint_leaves_no_run_state(tmp_path: Path, release_checkpoints) -> None:
    folder, out = photos(tmp_path / "photos", 2), tmp_path / "s.parquet"
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    code, printed = cli("score", folder, "-t", "mem", "--checkpoint", junk, "-o", out)
    assert code != 0 and not out.exists()
    assert not (tmp_path / ".s.parquet.parts").exists() and not (tmp_path / ".s.parquet.lock").exists()
    wrong = release_checkpoints["emotion"][0]  # 8 outputs where memorability has 1
    code, printed = cli("score", folder, "-t", "mem", "--checkpoint", wrong, "-o", out)
    assert code != 0 and not (tmp_path / ".s.parquet.parts").exists()
    # a run state that holds no row (as older versions left) never holds up the corrected command
    parts = tmp_path / ".s.parquet.parts"
    parts.mkdir()
    (parts / "run.json").write_text('{"weights": "other", "tasks": ["emotion"]}')
    code, printed = cli("score", folder, "-t", "mem", "--checkpoint", release_checkpoints["memorability"][0],
                        "-o", out)  # fmt: skip
    assert code == 0, printed
    assert len(pd.read_parquet(out)) == 2 and not parts.exists()


def test_a_run_folder_without_run_json_is_no_run(tmp_path: Path, release_checkpoints) -> None:
    folder, out = photos(tmp_path / "photos", 2), tmp_path / "s.parquet"
    parts = tmp_path / ".s.parquet.parts"
    parts.mkdir()
    (parts / "shard-000000000000-000000000001.parquet").write_bytes(b"PAR1 not really")
    code, printed = cli("score", folder, "-t", "mem", "--checkpoint", release_checkpoints["memorability"][0],
                        "-o", out)  # fmt: skip
    assert code == 0, printed
    assert "removed .s.parquet.parts: an unfinished run's folder without run.json" in printed
    assert "differs in" not in printed and len(pd.read_parquet(out)) == 2


def _limited(size: int):  # type: ignore[no-untyped-def]
    def limit() -> None:  # a full disk, as the run sees it: writes past ``size`` bytes fail (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


@pytest.mark.parametrize("size", [0, 500], ids=["full-at-start", "full-at-first-shard"])
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_never_blocks_the_next_night(
    size: int, tmp_path: Path, release_checkpoints
) -> None:
    folder, out = photos(tmp_path / "photos", 2), tmp_path / "s.parquet"
    # --workers 0: the limit would also stop the shared-memory files decode workers pass batches through;
    # --device cpu: and CUDA's own cache files on a GPU host
    command = [EXE, "score", str(folder), "-t", "mem", "--checkpoint",
               str(release_checkpoints["memorability"][0]), "-o", str(out), "--workers", "0",
               "--device", "cpu"]  # fmt: skip
    full = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=_limited(size))
    assert full.returncode == 2, full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: cannot write .*File too large", lines[0]), full.stderr
    assert not (tmp_path / ".s.parquet.parts").exists() and not out.exists()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr


def test_planted_links_and_strangers_files_are_never_followed(tmp_path: Path, release_checkpoints) -> None:
    folder, out = photos(tmp_path / "photos", 1), tmp_path / "s.parquet"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o644)
    args = ("score", folder, "-t", "mem", "--checkpoint", release_checkpoints["memorability"][0], "-o", out)
    lock = tmp_path / ".s.parquet.lock"
    lock.symlink_to(victim)
    code, printed = cli(*args)
    assert code == 2 and "is a symbolic link, not a lock file" in printed
    assert victim.read_text() == "precious" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    lock.unlink()
    lock.write_text("")
    os.chown(lock, 65534, 65534)  # another user's file under the lock's name
    code, printed = cli(*args)
    assert code == 2 and "owned by uid 65534" in printed
    lock.unlink()
    parts = tmp_path / ".s.parquet.parts"
    (tmp_path / "victim-folder").mkdir()
    (tmp_path / "victim-folder" / "keep.jpg").write_bytes(b"x")
    parts.symlink_to(tmp_path / "victim-folder")
    code, printed = cli(*args, "--restart")
    assert code == 2 and "is not a folder (a link or a file)" in printed
    assert (tmp_path / "victim-folder" / "keep.jpg").read_bytes() == b"x"
    parts.unlink()
    # a temporary name planted as a link is replaced, never written through
    target = tmp_path / "report.html"
    planted = tmp_path / f".report.html.partial-{os.getpid()}"
    planted.symlink_to(victim)
    write_atomic(target, b"page")
    assert target.read_bytes() == b"page" and victim.read_text() == "precious" and not planted.exists()


def test_files_missing_from_a_list_count_as_gone_and_spellings_of_one_folder_do_not(
    tmp_path: Path, release_checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    photos(tmp_path / "mnt", 3)
    ckpt = str(release_checkpoints["memorability"][0])
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted((tmp_path / "mnt").iterdir())))
    args = ("-t", "mem", "--checkpoint", ckpt, "-o", "L.parquet", "--incremental", "L.parquet")
    assert cli("score", f"@{listing}", *args)[0] == 0
    before = (tmp_path / "L.parquet").read_bytes()
    (tmp_path / "mnt").rename(tmp_path / "off")  # the list names files on a disk that is not mounted
    code, printed = cli("score", f"@{listing}", *args)
    assert code == 2 and "would drop 3 of the 3 rows of L.parquet: their files are missing" in printed
    assert (tmp_path / "L.parquet").read_bytes() == before
    (tmp_path / "off").rename(tmp_path / "mnt")
    # the same files named relative to the folder the first run started in: nothing is gone (reuse is by
    # the path as written, so they are scored again)
    code, printed = cli("score", "mnt", *args)
    assert code == 0 and "0 gone since the last run" in printed, printed


def test_a_no_images_refusal_keeps_the_rows_an_earlier_run_saved(
    tmp_path: Path, release_checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERCEPTSCORE_SHARD_ROWS", "1")
    folder = photos(tmp_path / "photos", 4)
    ckpt = str(release_checkpoints["memorability"][0])
    args = ("-t", "mem", "--checkpoint", ckpt, "-o", tmp_path / "S.parquet")
    assert cli("score", folder, *args)[0] == 0
    for p in sorted(folder.iterdir())[:3]:
        p.rename(tmp_path / p.name)
    assert cli("score", folder, *args)[0] == 2  # 3 of 4 rows would go: refused, its 1 row kept in shards
    parts = tmp_path / ".S.parquet.parts"
    assert len(list(parts.glob("shard-*.parquet"))) == 1
    for p in folder.iterdir():
        p.unlink()
    code, printed = cli("score", folder, *args)
    assert code == 2 and "no images found in" in printed
    assert len(list(parts.glob("shard-*.parquet"))) == 1  # the saved row is still there
    (tmp_path / "p0.jpg").rename(folder / "p0.jpg")
    code, printed = cli("score", folder, *args, "--max-delete", "all")
    assert code == 0 and "1 scored, 0 errors" in printed and "3 gone since the last run" in printed, printed


def test_symlinked_outputs_run_on_night_one_and_lists_rerun(
    two_tasks: tuple[Path, Path], checkpoint_args: list[str], tmp_path: Path
) -> None:
    folder, scores = two_tasks
    (tmp_path / "real").mkdir()
    link = tmp_path / "s.parquet"
    link.symlink_to(tmp_path / "real" / "s.parquet")  # its target does not exist yet: night one
    code, printed = cli("score", folder, "-t", "mem", *checkpoint_args, "-o", link, "--incremental", link)
    assert code == 0 and "nothing to reuse" in printed, printed
    assert link.is_symlink() and len(pd.read_parquet(link)) == 2
    listing = tmp_path / "keep.txt"
    listing.symlink_to(tmp_path / "real" / "keep.txt")
    for _ in range(2):  # written through the link, then replaced as its own on the rerun
        code, printed = cli("filter", scores, "--min-quality", "0", "-o", listing)
        assert code == 0, printed
    assert listing.is_symlink() and len(listing.read_text().splitlines()) == 2
