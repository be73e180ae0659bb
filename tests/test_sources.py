"""Inputs: folders, globs, lists, stdin and manifests, on real files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perceptscore.errors import UsageError
from perceptscore.sources import Sources


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def paths(sources: Sources) -> list[str]:
    return [item.path for item in sources]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for name in [
        "b.JPG",
        "a.jpeg",
        "c.webp",
        "notes.txt",
        "._a.jpeg",
        "sub/d.png",
        "sub/deep/e.Png",
        "sub/f.gif",
    ]:
        touch(root / name)
    os.symlink(root / "sub", root / "sub" / "deep" / "loop")  # a symlink loop
    os.symlink(tmp_path / "elsewhere", root / "linked")  # a symlink to a folder outside the tree
    touch(tmp_path / "elsewhere" / "g.jpg")
    return root


def test_folder_is_walked_recursively_sorted_case_insensitive_without_looping(tree: Path) -> None:
    rel = [os.path.relpath(p, tree) for p in paths(Sources([str(tree)]))]
    assert rel == ["a.jpeg", "b.JPG", "c.webp", "sub/d.png", "sub/f.gif", "sub/deep/e.Png"]  # linked: outside
    rel = [os.path.relpath(p, tree) for p in paths(Sources([str(tree)], follow_links=True))]
    assert rel == ["a.jpeg", "b.JPG", "c.webp", "linked/g.jpg", "sub/d.png", "sub/f.gif", "sub/deep/e.Png"]


def test_no_recursive_stays_at_the_top(tree: Path) -> None:
    rel = [os.path.relpath(p, tree) for p in paths(Sources([str(tree)], recursive=False))]
    assert rel == ["a.jpeg", "b.JPG", "c.webp"]


def test_globs_lists_and_stdin(tree: Path, tmp_path: Path) -> None:
    assert paths(Sources([str(tree / "sub" / "*.png")])) == [str(tree / "sub" / "d.png")]
    listing = tmp_path / "list.txt"
    listing.write_text("# chosen\nphotos/a.jpeg\n\nphotos/with space.jpg\n")
    assert paths(Sources([f"@{listing}"])) == [
        str(tmp_path / "photos/a.jpeg"),
        str(tmp_path / "photos/with space.jpg"),
    ]
    stdin = io.StringIO("x/1.jpg\ny/2.png\n")
    assert paths(Sources(["-"], stdin=stdin)) == ["x/1.jpg", "y/2.png"]


def test_indices_run_across_inputs_in_order(tree: Path) -> None:
    items = list(Sources([str(tree / "c.webp"), str(tree / "sub"), str(tree / "a.jpeg")]))
    assert [i.index for i in items] == list(range(len(items)))
    assert [Path(i.path).name for i in items] == ["c.webp", "d.png", "f.gif", "e.Png", "a.jpeg"]


def test_parquet_manifest_resolves_relative_paths_and_passes_columns_through(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    table = pa.table(
        {"id": [7, 8, 9], "path": ["img/1.jpg", "/abs/2.jpg", None], "memorability": [0.1, 0.2, 0.3]}
    )
    pq.write_table(table, folder / "manifest.parquet")
    sources = Sources([str(folder / "manifest.parquet")], reserved=["path", "memorability", "error"])
    items = list(sources)
    assert [i.path for i in items] == [str(folder / "img/1.jpg"), "/abs/2.jpg", ""]
    assert items[0].extras == {"id": 7, "input_memorability": 0.1}  # an output name is kept as input_<name>
    assert items[2].error == "manifest row has no path"
    assert sources.passthrough.names == ["id", "input_memorability"]
    assert sources.count() == 3


def test_csv_manifest_with_another_path_column(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label\n001.jpg,3\nsub/002.jpg,5\n")
    items = list(Sources([str(manifest)], path_column="file"))
    assert [i.path for i in items] == [str(tmp_path / "001.jpg"), str(tmp_path / "sub/002.jpg")]
    assert items[1].extras == {"file": "sub/002.jpg", "label": 5}


def test_manifest_without_the_path_column_names_the_columns_found(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("filename,score\na.jpg,1\n")
    with pytest.raises(UsageError) as info:
        Sources([str(manifest)])
    assert str(info.value) == (
        f"manifest {manifest} has no column 'path' (columns found: filename, score); "
        "choose one with --path-column"
    )


def test_a_large_manifest_is_streamed(tmp_path: Path) -> None:
    """Rows are read block by block as items are consumed: cutting the file after the first item
    shortens the stream, which could not happen had the manifest been read whole up front."""
    n = 2_000_000
    manifest = tmp_path / "big.csv"
    manifest.write_text("path\n" + "".join(f"images/{i:08d}.jpg\n" for i in range(n)))
    it = iter(Sources([str(manifest)]))
    assert next(it).path == str(tmp_path / "images/00000000.jpg")
    os.truncate(manifest, 4_000_000)
    assert 1 + sum(1 for _ in it) < n


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["nowhere/x.jpg"], "no such file or directory: 'nowhere/x.jpg'"),
        (["nowhere/*.jpg"], "no files match 'nowhere/*.jpg'"),
        (["@nolist.txt"], "list file 'nolist.txt' not found"),
        (["-", "-"], "'-' (paths on stdin) can be given only once"),
        ([], "no inputs given"),
    ],
)
def test_input_mistakes_are_one_line_usage_errors(inputs: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        Sources(inputs, stdin=io.StringIO(""))
