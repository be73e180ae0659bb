"""`filter --copy-to/--symlink-to` run again places nothing twice (issue 22, item 10): a file already there
(the recorded copy with its size and mtime, else the same bytes; a link to the same file) is counted, not
copied to a `-1` name; a different file of that name still gets one; perceptscore-placed.csv maps every
source to its copy after each run. Through the CLI in this process, on real files."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from perceptscore.cli import app


def _filter(scores: Path, *args: str | Path):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["filter", str(scores), *map(str, args)], env={"COLUMNS": "300"})


def _scores(tmp_path: Path, files: list[Path], values: list[float] | None = None) -> Path:
    """A scores file as `score` writes it (size and mtime recorded: copy-to checks them)."""
    values = values or [0.5] * len(files)
    path = tmp_path / "scores.csv"
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "memorability", "error", "file_size", "file_mtime_ns"])
        for file, value in zip(files, values, strict=True):
            out.writerow([file, value, "", file.stat().st_size, file.stat().st_mtime_ns])
    Path(f"{path}.meta.json").write_text("{}")
    return path


def _record(folder: Path) -> list[tuple[str, str]]:
    with open(folder / "perceptscore-placed.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["source", "destination"]
    return [(a, Path(b).name) for a, b in rows[1:]]


@pytest.fixture
def photos(tmp_path: Path, photo_dir: Path) -> list[Path]:
    """Three photos, two of them named alike in different folders."""
    files = [tmp_path / "one" / "pic.jpg", tmp_path / "two" / "pic.jpg", tmp_path / "two" / "other.jpg"]
    for file, sample in zip(files, ["a_square.jpg", "d_portrait.jpg", "b_landscape.png"], strict=True):
        file.parent.mkdir(exist_ok=True)
        shutil.copy(photo_dir / sample, file)
    return files


def test_copy_to_twice_copies_nothing_again(tmp_path: Path, photos: list[Path]) -> None:
    scores, dest = _scores(tmp_path, photos), tmp_path / "best"
    first = _filter(scores, "--min-memorability", "0", "--copy-to", dest)
    assert first.exit_code == 0, first.output
    assert "copied 3 files to" in first.stderr and "already there" not in first.stderr
    placed = sorted(p.name for p in dest.iterdir())
    mapping = [(str(photos[0]), "pic.jpg"), (str(photos[1]), "pic-1.jpg"), (str(photos[2]), "other.jpg")]
    assert _record(dest) == mapping
    second = _filter(scores, "--min-memorability", "0", "--copy-to", dest)
    assert second.exit_code == 0, second.output
    assert f"copied 0 files to {dest}, 3 already there" in second.stderr
    assert sorted(p.name for p in dest.iterdir()) == placed  # no pic-2.jpg, no perceptscore-placed-1.csv
    assert _record(dest) == mapping
    for source, name in mapping:
        assert (dest / name).read_bytes() == Path(source).read_bytes()


def test_a_different_file_of_that_name_still_gets_a_number(tmp_path: Path, photos: list[Path]) -> None:
    dest = tmp_path / "best"
    dest.mkdir()
    (dest / "pic.jpg").write_bytes(b"the user's own pic.jpg")
    (dest / "other.jpg").write_bytes(photos[2].read_bytes())  # the same bytes, copied without its mtime
    os.utime(dest / "other.jpg", ns=(0, 0))
    scores = _scores(tmp_path, photos)
    done = _filter(scores, "--min-memorability", "0", "--copy-to", dest)
    assert done.exit_code == 0, done.output
    assert f"copied 2 files to {dest}, 1 already there" in done.stderr
    assert (dest / "pic.jpg").read_bytes() == b"the user's own pic.jpg"
    assert (dest / "pic-1.jpg").read_bytes() == photos[0].read_bytes()
    assert (dest / "pic-2.jpg").read_bytes() == photos[1].read_bytes()
    assert _record(dest) == [(str(photos[0]), "pic-1.jpg"), (str(photos[1]), "pic-2.jpg"),
                             (str(photos[2]), "other.jpg")]  # fmt: skip


def test_files_of_one_name_size_and_mtime_are_told_apart_by_their_bytes(
    tmp_path: Path, photo_dir: Path
) -> None:
    """Files written in one clock tick share an mtime: only the recorded copy of a source is trusted on
    size and mtime; any other file of its name must have its bytes."""
    data = (photo_dir / "a_square.jpg").read_bytes()
    files = []
    for i in range(4):
        file = tmp_path / f"card{i}" / "IMG_0001.jpg"
        file.parent.mkdir()
        file.write_bytes(data + bytes([i]))  # distinct files, one name, one size
        os.utime(file, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))  # and one mtime
        files.append(file)
    scores, dest = _scores(tmp_path, files), tmp_path / "keep"
    for run, expected in enumerate(["copied 4 files to", "copied 0 files to"]):
        done = _filter(scores, "--min-memorability", "0", "--copy-to", dest)
        assert done.exit_code == 0 and expected in done.stderr, (run, done.output)
        record = _record(dest)
        assert [source for source, _ in record] == list(map(str, files))
        assert all((dest / name).read_bytes() == Path(source).read_bytes() for source, name in record)
    assert len(list(dest.glob("IMG_0001*.jpg"))) == 4


def test_the_record_follows_the_folder(tmp_path: Path, photos: list[Path]) -> None:
    scores, dest = _scores(tmp_path, photos, [0.9, 0.2, 0.8]), tmp_path / "best"
    assert _filter(scores, "--min-memorability", "0.5", "--copy-to", dest).exit_code == 0
    assert _record(dest) == [(str(photos[0]), "pic.jpg"), (str(photos[2]), "other.jpg")]
    (dest / "other.jpg").unlink()  # the user deletes a copy, then lowers the bar
    done = _filter(scores, "--min-memorability", "0.1", "--copy-to", dest)
    assert f"copied 2 files to {dest}, 1 already there" in done.stderr, done.output
    # the earlier rows first (other.jpg's again, as it is there again), then the new one
    assert _record(dest) == [(str(photos[0]), "pic.jpg"), (str(photos[2]), "other.jpg"),
                             (str(photos[1]), "pic-1.jpg")]  # fmt: skip
    assert not (dest / "perceptscore-placed-1.csv").exists()


def test_a_record_name_that_is_not_ours_is_left_alone(tmp_path: Path, photos: list[Path]) -> None:
    dest = tmp_path / "best"
    dest.mkdir()
    (dest / "perceptscore-placed.csv").write_text("my,own,notes\n")
    scores = _scores(tmp_path, photos)
    for _ in range(2):
        assert _filter(scores, "--min-memorability", "0", "--copy-to", dest).exit_code == 0
    assert (dest / "perceptscore-placed.csv").read_text() == "my,own,notes\n"
    theirs = (dest / "perceptscore-placed-1.csv").read_text().splitlines()
    assert len(theirs) == 4 and theirs[0] == "source,destination"


def test_symlink_to_twice_links_nothing_again(tmp_path: Path, photos: list[Path]) -> None:
    scores, links = _scores(tmp_path, photos), tmp_path / "links"
    links.mkdir()
    os.symlink(photos[2].parent / "elsewhere.jpg", links / "other.jpg")  # a link of that name, elsewhere
    first = _filter(scores, "--min-memorability", "0", "--symlink-to", links)
    assert f"symlinked 3 files to {links}" in first.stderr, first.output
    second = _filter(scores, "--min-memorability", "0", "--symlink-to", links)
    assert f"symlinked 0 files to {links}, 3 already there" in second.stderr, second.output
    found = {p.name: os.readlink(p) for p in links.iterdir() if p.is_symlink()}
    assert found == {
        "other.jpg": str(photos[2].parent / "elsewhere.jpg"),
        "pic.jpg": str(photos[0]),
        "pic-1.jpg": str(photos[1]),
        "other-1.jpg": str(photos[2]),
    }
    assert _record(links) == [(str(photos[0]), "pic.jpg"), (str(photos[1]), "pic-1.jpg"),
                              (str(photos[2]), "other-1.jpg")]  # fmt: skip


def test_a_name_taken_by_another_file_since_is_not_the_old_sources_copy(tmp_path: Path) -> None:
    """a's copy deleted, b (other bytes, same size and mtime) takes its name: a placed again gets a number,
    and the record names one source a copy."""
    from perceptscore import select

    a, b, out = tmp_path / "a" / "IMG.raw", tmp_path / "b" / "IMG.raw", tmp_path / "out"
    for path, byte in ((a, b"A"), (b, b"B")):
        path.parent.mkdir()
        path.write_bytes(byte * 100)
        os.utime(path, ns=(10**18, 10**18))  # whole seconds, as FAT cards and archives give

    def place(src: Path) -> select.Placement:
        placement = select.place([(str(src), str(src))], out)
        select.write_placement_map(out, placement.mapped)
        return placement

    place(a)
    (out / "IMG.raw").unlink()
    place(b)
    again = place(a)
    assert (again.placed, again.already) == (1, 0)
    assert (out / "IMG.raw").read_bytes() == b"B" * 100 and (out / "IMG-1.raw").read_bytes() == b"A" * 100
    with open(out / "perceptscore-placed.csv", newline="") as f:
        rows = [(Path(s).parent.name, Path(d).name) for s, d in list(csv.reader(f))[1:]]
    assert sorted(rows) == [("a", "IMG-1.raw"), ("b", "IMG.raw")]
