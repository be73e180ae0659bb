"""Datasets as published, as inputs (issue 23, item 4): parquet files, a ``save_to_disk`` folder and a
hub-layout folder written by the real ``datasets`` library score each row from its bytes, exactly as the
same images score as loose files; the other columns pass through (nested ones too, JSON in CSV); rows are
found again by their ``path`` (``--incremental``, ``--retry-errors``, ``locate``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import perceptscore
from perceptscore.errors import UsageError
from perceptscore.locators import DatasetRow, InMemory, locate
from perceptscore.sources import Sources

from test_cli_score import EXE

datasets = pytest.importorskip("datasets")

RESERVED = ["path", "memorability", "error", "file_size", "file_mtime_ns"]


def image_features(**more: Any) -> Any:
    return datasets.Features({"image": datasets.Image(), **more})


def hf_dataset(photos: list[Path]) -> Any:
    """The photos as ``datasets`` holds them: an ``Image`` feature (bytes and the file's name), with a
    label, a list and a struct column beside it."""
    features = image_features(
        label=datasets.Value("int64"),
        tags=datasets.Sequence(datasets.Value("string")),
        meta={"w": datasets.Value("int32"), "note": datasets.Value("string")},
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": p.read_bytes(), "path": p.name} for p in photos],
            "label": list(range(len(photos))),
            "tags": [[p.suffix, "=SUM(A1)"] for p in photos],
            "meta": [{"w": i, "note": None if i % 2 else f"n{i}"} for i in range(len(photos))],
        },
        features=features,
    )


@pytest.fixture(scope="module")
def scorer(release_checkpoints) -> perceptscore.Scorer:  # type: ignore[no-untyped-def]
    return perceptscore.Scorer(
        "mem", {"mem": release_checkpoints["memorability"][0]}, device="cpu", workers=0
    )


@pytest.fixture(scope="module")
def photos(photo_dir: Path) -> list[Path]:
    return sorted(photo_dir.iterdir())


@pytest.fixture(scope="module")
def loose(scorer: perceptscore.Scorer, photos: list[Path]) -> pd.DataFrame:
    return scorer.score([str(p) for p in photos])


@pytest.fixture(scope="module")
def published(photos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same dataset three ways: ``to_parquet`` (row groups of 2 rows), ``save_to_disk``, and the hub
    layout pushed by hand (two parquet shards under ``data/``, a README at the top)."""
    root = tmp_path_factory.mktemp("published")
    ds = hf_dataset(photos)
    ds.to_parquet(str(root / "ds.parquet"), batch_size=2)
    ds.save_to_disk(str(root / "saved"))
    hub = root / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: default\n---\n")
    half = len(photos) // 2
    ds.select(range(half)).to_parquet(str(hub / "data" / "train-00000-of-00002.parquet"))
    ds.select(range(half, len(photos))).to_parquet(str(hub / "data" / "train-00001-of-00002.parquet"))
    return {"parquet": root / "ds.parquet", "saved": root / "saved", "hub": hub}


def expected_paths(kind: str, where: Path, n: int) -> list[str]:
    if kind == "parquet":
        return [f"{where}::image[{i}]" for i in range(n)]
    if kind == "saved":
        return [f"{where / 'data-00000-of-00001.arrow'}::image[{i}]" for i in range(n)]
    half = n // 2
    files = [where / "data" / f"train-0000{i}-of-00002.parquet" for i in (0, 1)]
    return [f"{files[i >= half]}::image[{i - half if i >= half else i}]" for i in range(n)]


@pytest.mark.parametrize("kind", ["parquet", "saved", "hub"])
def test_published_rows_equal_loose_files_and_pass_columns_through(
    kind: str,
    scorer: perceptscore.Scorer,
    loose: pd.DataFrame,
    published: dict[str, Path],
    photos: list[Path],
) -> None:
    got = scorer.score(str(published[kind]))
    assert got["error"].isna().all(), got["error"].tolist()
    assert float(np.max(np.abs(got["memorability"].to_numpy() - loose["memorability"].to_numpy()))) == 0.0
    paths = expected_paths(kind, published[kind], len(photos))
    assert got["path"].tolist() == paths
    assert got["shard"].tolist() == [p.rpartition("::")[0] for p in paths]
    assert got["row"].tolist() == [int(p.rpartition("[")[2][:-1]) for p in paths]
    assert got["image_path"].tolist() == [p.name for p in photos]  # the Image feature's own path
    assert "image" not in got.columns  # the bytes never pass through
    assert got["label"].tolist() == list(range(len(photos)))
    assert [list(t) for t in got["tags"]] == [[p.suffix, "=SUM(A1)"] for p in photos]
    assert got["file_size"].tolist() == [p.stat().st_size for p in photos]


def test_a_row_is_opened_again_from_its_path(published: dict[str, Path], photos: list[Path]) -> None:
    """``locate`` reads the row back from its file (explain, report, --retry-errors): the same bytes."""
    for kind in published:
        for i, path in enumerate(expected_paths(kind, published[kind], len(photos))):
            found = locate(path)
            assert isinstance(found, DatasetRow)
            assert found.open().read() == photos[i].read_bytes()
    with pytest.raises(perceptscore.errors.DecodeError, match="no row 99"):
        locate(f"{published['saved'] / 'data-00000-of-00001.arrow'}::image[99]").open()


def test_several_row_groups_stream_in_order(published: dict[str, Path], photos: list[Path]) -> None:
    """Row groups of 2 rows are read one task at a time; the items come in file order with their bytes,
    and the stat is (size, a digest of the bytes), the same for the same bytes in another file."""
    metadata = pq.ParquetFile(published["parquet"]).metadata
    assert metadata.num_row_groups == 3
    sources = Sources([str(published["parquet"])], reserved=RESERVED)
    (found,) = sources._plan
    assert found.kind == "dataset"
    assert [(t.part, t.first_row) for t in found.dataset.read_tasks()] == [(0, 0), (1, 2), (2, 4)]
    assert sources.count() == len(photos)
    assert Sources([str(published["saved"])], reserved=RESERVED).count() == len(photos)  # arrow, mapped
    containers = list(sources)  # a container per row group: its rows are read where they are decoded
    assert [(type(c.locator).__name__, c.index, c.path) for c in containers] == [
        ("TableRows", n, str(published["parquet"])) for n in range(3)
    ]
    items = list(sources.rows())
    assert [i.index for i in items] == list(range(len(photos)))
    assert all(isinstance(i.locator, InMemory) for i in items)
    assert [i.locator.open().read() for i in items] == [p.read_bytes() for p in photos]
    assert [i.locator.stat()[0] for i in items] == [p.stat().st_size for p in photos]
    hub = [i.locator.stat() for i in Sources([str(published["hub"])], reserved=RESERVED).rows()]
    assert hub == [i.locator.stat() for i in items]  # other files, the same bytes: the same stat


def test_image_column_is_found_or_asked_for_in_one_line(tmp_path: Path, photos: list[Path]) -> None:
    """Plain binary columns: the one found; two ask for ``--image-column`` naming them; a column that
    holds no bytes is refused naming its type."""
    jpeg = photos[0].read_bytes()
    one = datasets.Dataset.from_dict(
        {"jpg": [jpeg], "caption": ["a"]},
        features=datasets.Features({"jpg": datasets.Value("binary"), "caption": datasets.Value("string")}),
    )
    one.to_parquet(str(tmp_path / "one.parquet"))
    (item,) = Sources([str(tmp_path / "one.parquet")], reserved=RESERVED).rows()
    assert item.path == f"{tmp_path / 'one.parquet'}::jpg[0]" and item.extras["caption"] == "a"
    two = datasets.Dataset.from_dict(
        {"jpg": [jpeg], "mask": [jpeg]},
        features=datasets.Features({"jpg": datasets.Value("binary"), "mask": datasets.Value("binary")}),
    )
    two.to_parquet(str(tmp_path / "two.parquet"))
    with pytest.raises(
        UsageError, match=r"several columns of image bytes \(jpg, mask\); choose one with --image-column"
    ):
        Sources([str(tmp_path / "two.parquet")], reserved=RESERVED)
    (item,) = Sources([str(tmp_path / "two.parquet")], reserved=RESERVED, image_column="mask").rows()
    assert item.path.endswith("::mask[0]") and item.extras["jpg"] == jpeg  # other bytes pass through
    with pytest.raises(UsageError, match="column 'caption' holds string, not image bytes"):
        Sources([str(tmp_path / "one.parquet")], reserved=RESERVED, image_column="caption")
    with pytest.raises(UsageError, match=r"has no column 'nope' \(columns found: jpg, caption\)"):
        Sources([str(tmp_path / "one.parquet")], reserved=RESERVED, image_column="nope")


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_writes_nested_columns_to_every_format_and_path_column_names_the_images(
    release_checkpoints,
    published: dict[str, Path],
    photos: list[Path],
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """The issue's command (``--path-column image``, which was a pyarrow traceback) scores the rows; the
    struct and list columns are JSON in CSV (formula-like text still defused), as they are in JSONL and
    parquet. ``--processes 2`` children receive each row's bytes and score them the same (batches of
    one row everywhere: the same sums whoever scores a row; on the CPU, where two processes are two
    scorers of the same kind whatever GPUs the host has)."""
    base = [
        "score",
        "-t",
        "mem",
        "--checkpoint",
        release_checkpoints["memorability"][0],
        "--workers",
        "0",
        "--batch-size",
        "1",
        "--device",
        "cpu",
    ]
    csv, jsonl, parquet = tmp_path / "s.csv", tmp_path / "s.jsonl", tmp_path / "s.parquet"
    done = run(*base, published["parquet"], "--path-column", "image", "-o", csv)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    table = pd.read_csv(csv)
    assert [json.loads(m) for m in table["meta"]] == [
        {"w": i, "note": None if i % 2 else f"n{i}"} for i in range(len(photos))
    ]
    assert json.loads(table["tags"][0]) == [photos[0].suffix, "=SUM(A1)"]  # one cell: not a formula
    done = run(*base, published["saved"], "-o", jsonl)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert lines[1]["meta"] == {"w": 1, "note": None} and lines[1]["tags"] == [photos[1].suffix, "=SUM(A1)"]
    done = run(*base, published["hub"], "--processes", "2", "-o", parquet)
    assert done.returncode == 0, done.stderr
    schema = pq.read_schema(parquet)
    assert str(schema.field("meta").type) == "struct<w: int32, note: string>"
    np.testing.assert_array_equal(pd.read_parquet(parquet)["memorability"], table["memorability"])
    np.testing.assert_array_equal([r["memorability"] for r in lines], table["memorability"])


@pytest.mark.slow
def test_incremental_reuses_unchanged_rows_and_retry_errors_opens_failed_rows_again(
    release_checkpoints,
    photos: list[Path],
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """A row without bytes and a row of corrupt bytes are error rows. Written again as another file of
    the same rows, ``--incremental`` reuses every scored row (the stat is the bytes' size and digest);
    ``--retry-errors`` keeps the scored rows and opens each failed row again from its file."""
    rows = [
        {"bytes": photos[0].read_bytes(), "path": "a.jpg"},
        None,
        {"bytes": b"not an image", "path": "x.jpg"},
    ]
    ds = datasets.Dataset.from_dict({"image": rows}, features=image_features())
    ds.to_parquet(str(tmp_path / "d.parquet"))
    base = [
        "score",
        "-t",
        "mem",
        "--checkpoint",
        release_checkpoints["memorability"][0],
        "--workers",
        "0",
        "--batch-size",
        "1",
    ]
    first, again, retried = tmp_path / "1.parquet", tmp_path / "2.parquet", tmp_path / "3.parquet"
    done = run(*base, tmp_path / "d.parquet", "-o", first)
    assert done.returncode == 1, done.stderr
    errors = pq.read_table(first).column("error").to_pylist()
    assert errors[0] is None and errors[1] == "no image bytes in this row" and errors[2]
    ds.to_parquet(str(tmp_path / "d.parquet"))  # written again: a new mtime, the same rows
    done = run(*base, tmp_path / "d.parquet", "--incremental", first, "-o", again, "--json")
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["reused"], summary["scored"], summary["errors"]) == (1, 0, 2)
    done = run(*base, "--retry-errors", first, "-o", retried, "--json")
    assert done.returncode == 1, done.stderr
    old, new = pq.read_table(first).to_pydict(), pq.read_table(retried).to_pydict()
    assert new["path"] == old["path"] and new["row"] == [0, 1, 2]
    assert new["memorability"][0] == old["memorability"][0]
    assert new["error"][1:] == old["error"][1:]  # opened again from the file: still no image
    assert json.loads(done.stdout)["reused"] == 1


def test_a_dataset_over_http_scores_as_local_and_its_rows_open_again_by_url(
    http_server,  # type: ignore[no-untyped-def]
    scorer: perceptscore.Scorer,
    loose: pd.DataFrame,
    published: dict[str, Path],
    photos: list[Path],
) -> None:
    """A parquet dataset named by URL: read from one download, rows named by the URL (``hf://`` works the
    same way through huggingface_hub's file system, which cannot be reached offline)."""
    http_server.files["/d/ds.parquet"] = published["parquet"].read_bytes()
    try:
        url = http_server.url("/d/ds.parquet")
        got = scorer.score(url)
        assert got["path"].tolist() == [f"{url}::image[{i}]" for i in range(len(loose))]
        assert float(np.max(np.abs(got["memorability"].to_numpy() - loose["memorability"].to_numpy()))) == 0.0
        assert locate(f"{url}::image[3]").open().read() == photos[3].read_bytes()  # range reads
    finally:
        http_server.reset()


def test_csv_cells_hold_nested_values_as_json_and_bytes_as_base64() -> None:
    """What a CSV output makes of passed-through columns pyarrow's CSV writer refuses: a struct, a list
    and bytes, each one cell read back by ``json.loads`` / base64 (NaN inside a struct is null)."""
    import base64
    import io

    import pyarrow as pa

    from perceptscore.formats import FORMATS, read_csv_scores

    table = pa.table(
        {
            "path": ["a", "b"],
            "meta": [{"w": 1.5, "x": float("nan")}, None],
            "tags": [["=1+1", "ü"], []],
            "blob": [b"\x00\xff", None],
        }
    )
    stream = io.BytesIO()
    writer = FORMATS[".csv"].open_writer(stream, table.schema, {})
    writer.write(table)
    writer.close()
    back = read_csv_scores(io.BytesIO(stream.getvalue())).to_pydict()
    assert [None if m is None else json.loads(m) for m in back["meta"]] == [{"w": 1.5, "x": None}, None]
    assert [json.loads(t) for t in back["tags"]] == [["=1+1", "ü"], []]
    assert base64.b64decode(back["blob"][0]) == b"\x00\xff" and back["blob"][1] is None


def test_a_rows_path_is_no_local_file_and_names_its_heatmap_by_file_and_row() -> None:
    from perceptscore.commands.explain import output_stem
    from perceptscore.thumbnails import local_path

    row = "ds/data/train-00000-of-00002.parquet::image[12]"
    assert local_path(row, "/somewhere") is None  # a report shows no link and no thumbnail of "a file"
    assert output_stem(row) == "train-00000-of-00002_12"
    assert output_stem("ds/x.parquet::jpg[0]") != output_stem("ds/x.parquet::jpg[1]")


@pytest.mark.slow
def test_map_columns_and_clashing_names_survive_every_output_and_read_back(
    release_checkpoints, tmp_path: Path
) -> None:
    """A map column (rank/filter gave it back through pandas as a traceback; JSONL wrote pairs its own
    reader refused) and a dataset's own ``row`` beside an ``input_row`` (one of them was dropped)."""
    import pyarrow as pa
    from test_nightly import photos as make_photos

    pics = sorted(make_photos(tmp_path / "p", 3).iterdir())
    table = pa.table({
        "jpg": pa.array([p.read_bytes() for p in pics], pa.binary()),
        "m": pa.array([[("k", i)] for i in range(3)], pa.map_(pa.string(), pa.int64())),
        "row": [10, 11, 12],
        "input_row": [20, 21, 22],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "d.parquet")
    ckpt = str(release_checkpoints["memorability"][0])

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        return done

    for suffix in ("parquet", "jsonl", "csv"):
        out = tmp_path / f"o.{suffix}"
        run("score", tmp_path / "d.parquet", "-t", "mem", "--checkpoint", ckpt, "-o", out)
        kept = tmp_path / f"kept.{suffix}"
        run("filter", out, "--min-memorability", "-100", "-o", kept)
        run("rank", out, "-t", "mem", "--top", "0", "-o", tmp_path / f"ranked.{suffix}")
        back = pd.read_parquet(kept) if suffix == "parquet" else (
            pd.read_json(kept, lines=True) if suffix == "jsonl" else pd.read_csv(kept)
        )  # fmt: skip
        assert sorted(back["input_row_2"]) == [10, 11, 12] and sorted(back["input_row"]) == [20, 21, 22]
        assert sorted(back["row"]) == [0, 1, 2]  # ours: the row in its file
    assert pq.read_table(tmp_path / "kept.parquet").schema.field("m").type == table.schema.field("m").type
    first = json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])
    assert first["m"] == {"k": 0}


def test_a_presigned_rows_path_opens_as_that_row() -> None:
    row = locate("https://host/ds.parquet?X-Amz-Signature=a:b::image[3]")
    assert isinstance(row, DatasetRow)


def test_a_resumed_run_does_not_give_a_rows_score_to_the_row_that_replaced_it(tmp_path: Path) -> None:
    """A dataset downloaded again between a kill and the rerun: same file names and row count, other
    bytes. Its rows' paths are positions, so the shards' digest holds each row's (size, digest) too."""
    import pyarrow as pa

    from perceptscore.columns import output_schema
    from perceptscore.items import Item
    from perceptscore.runs import InputsChanged, ShardedRun
    from perceptscore.tasks import get_task

    schema, out = output_schema([get_task("memorability")]), tmp_path / "s.parquet"

    def items(version: int) -> list[Item]:
        return [
            Item(i, InMemory(f"ds.parquet::image[{i}]", b"x", (100 + i, version * 10 + i))) for i in range(3)
        ]

    run = ShardedRun(out, schema, {"run": 1})
    fed = list(run.pending(items(1)[:2]))  # what the run hands on is what its shards' digest holds
    rows = [{"path": it.path, "memorability": 0.5, "error": None, "file_size": it.locator.known[0],
             "file_mtime_ns": it.locator.known[1]} for it in fed]  # fmt: skip
    run.add([0, 1], pa.RecordBatch.from_pylist(rows, schema=schema))
    run.flush(whole=True)
    again = ShardedRun(out, schema, {"run": 1})
    assert [it.index for it in again.pending(items(1))] == [2]  # the same rows: continued
    with pytest.raises(InputsChanged, match="other files than were scored"):
        list(ShardedRun(out, schema, {"run": 1}).pending(items(2)))
