"""The input registry (issue 23, item 1): each kind's class claims the inputs it should, tried in order,
and a new kind is one class and one registry line (a kind defined here is scored through the real
Scorer)."""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import perceptscore
from perceptscore import inputs
from perceptscore.errors import UsageError
from perceptscore.inputs import Context, Input, classify
from perceptscore.sources import Sources

from servers import FaultyHTTPServer, MotoS3


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    """One of each local input kind: a photo, a folder, a list, manifests, a shard, datasets, a link."""
    root = tmp_path_factory.mktemp("kinds")
    photo = (photo_dir / "a_square.jpg").read_bytes()
    (root / "photos").mkdir()
    (root / "photos" / "a.jpg").write_bytes(photo)
    (root / "list.txt").write_text("photos/a.jpg\n")
    (root / "m.csv").write_text("path\nphotos/a.jpg\n")
    pq.write_table(pa.table({"path": ["photos/a.jpg"]}), root / "m.parquet")
    pq.write_table(pa.table({"image": pa.array([photo], pa.binary())}), root / "ds.parquet")
    (root / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"image": [photo]}), root / "hub" / "data" / "train-00000-of-00001.parquet")
    with tarfile.open(root / "s.tar", "w") as tar:
        tar.add(root / "photos" / "a.jpg", "0000.jpg")
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    return root


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("-", "Stdin"),
        ("@{root}/list.txt", "ListFile"),
        ("{root}/photos", "Folder"),
        ("file://{root}/photos", "Folder"),  # a file:// URL is the local path it names
        ("{root}/photos/a.jpg", "File"),
        ("{root}/dangling.jpg", "Dangling"),
        ("{root}/photos/*.jpg", "Glob"),
        ("{root}/m.csv", "Manifest"),
        ("{root}/m.parquet", "Manifest"),  # a parquet of paths: a manifest, not a dataset
        ("{root}/ds.parquet", "Dataset"),  # no path column, a column of bytes: scored from them
        ("{root}/d*.parquet", "Dataset"),  # a glob of such files
        ("{root}/hub", "Dataset"),  # the hub layout: data/<split>-NNNNN-of-NNNNN.parquet
        ("{root}/s.tar", "Shard"),
        ("https://example.invalid/shards/00000.tar", "Shard"),  # not looked at until read
    ],
)
def test_each_local_kind_claims_its_inputs(disk: Path, text: str, kind: str) -> None:
    found = classify(text.format(root=disk), Context())
    assert type(found).__name__ == kind
    assert found.kind == {"Dangling": "file"}.get(kind, getattr(inputs, kind).kind)


def test_what_no_kind_claims_is_a_usage_error(disk: Path) -> None:
    with pytest.raises(UsageError, match=r"^no such file or directory: '.*nothing\.jpg'$"):
        classify(f"{disk}/nothing.jpg", Context())
    with pytest.raises(UsageError, match=r"^no files match '.*\*\.gif'$"):
        classify(f"{disk}/*.gif", Context())
    with pytest.raises(UsageError, match=r"unsupported URL scheme ftp://"):
        classify("ftp://example.invalid/a.jpg", Context())


def test_each_remote_kind_claims_its_urls(
    http_server: FaultyHTTPServer, moto_s3: MotoS3, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over HTTP and S3 (servers on 127.0.0.1): a manifest and a dataset are read from their copies, a
    prefix and a glob are listed, an object is one file."""
    for name, value in moto_s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"kinds-{uuid.uuid4().hex[:10]}"
    moto_s3.make_bucket(bucket)
    moto_s3.put(bucket, "photos/a.jpg", (disk / "photos" / "a.jpg").read_bytes())
    http_server.files["/kinds/m.csv"] = b"path\nhttps://example.invalid/a.jpg\n"
    http_server.files["/kinds/ds.parquet"] = (disk / "ds.parquet").read_bytes()
    http_server.files["/kinds/a.jpg"] = (disk / "photos" / "a.jpg").read_bytes()
    expected = {
        http_server.url("/kinds/m.csv"): "Manifest",
        http_server.url("/kinds/ds.parquet"): "Dataset",
        http_server.url("/kinds/a.jpg"): "RemoteObject",
        f"s3://{bucket}/photos/": "RemoteFolder",
        f"s3://{bucket}/photos": "RemoteFolder",  # no slash: its info says it is a folder
        f"s3://{bucket}/photos/*.jpg": "RemoteGlob",
        f"s3://{bucket}/photos/a.jpg": "RemoteObject",
    }
    try:
        found = {text: type(classify(text, Context())).__name__ for text in expected}
    finally:
        http_server.reset()
    assert found == expected


@dataclass
class Repeat(Input):
    """``repeat:N:PATH``: one file N times over; a new kind of input, made for this test only."""

    kind: ClassVar[str] = "repeat"
    times: int
    path: str

    @classmethod
    def claim(cls, text: str, context: Context) -> Input | None:
        if not text.startswith("repeat:"):
            return None
        times, _, path = text.removeprefix("repeat:").partition(":")
        return cls(int(times), path)

    def rows(self, context: Context) -> Iterator[tuple[str, dict[str, object]]]:
        for n in range(self.times):
            yield self.path, {"copy": n}

    def count(self) -> int | None:
        return self.times

    def passthrough(self) -> tuple[str, pa.Schema] | None:
        return self.path, pa.schema([pa.field("copy", pa.int64())])


def test_a_new_kind_registered_is_one_class_and_one_line(
    photo_dir: Path, release_checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Registered ahead of the others, the new kind's rows are the run's, in input order with the other
    kinds', counted, its column passed through; and the Scorer scores them as it scores any file."""
    photo = str(photo_dir / "a_square.jpg")
    with pytest.raises(UsageError, match="no such file or directory"):
        Sources([f"repeat:2:{photo}"])  # not a kind until it is registered
    monkeypatch.setattr(inputs, "REGISTRY", [Repeat, *inputs.REGISTRY])
    sources = Sources([f"repeat:2:{photo}", photo])
    assert [(i.index, i.path, i.extras) for i in sources] == [
        (0, photo, {"copy": 0}),
        (1, photo, {"copy": 1}),
        (2, photo, {}),
    ]
    assert sources.count() == 3
    assert sources.passthrough.names == ["copy"]
    scorer = perceptscore.Scorer(
        "mem", {"mem": release_checkpoints["memorability"][0]}, device="cpu", workers=0
    )
    rows = scorer.score([f"repeat:2:{photo}", photo])
    assert rows["path"].tolist() == [photo] * 3
    assert rows["copy"].tolist()[:2] == [0, 1]
    assert rows["error"].isna().all()
    alone = scorer.score([photo])["memorability"].tolist()
    # the same bytes three times: the file's score each time (a batch's rows differ in the last bits)
    assert rows["memorability"].tolist() == pytest.approx(alone * 3, abs=1e-5)


def test_stdin_is_read_from_the_context_given(disk: Path) -> None:
    sources = Sources(["-"], stdin=io.StringIO(f"{disk}/photos/a.jpg\n# a comment\n\n{disk}/s.tar\n"))
    assert [type(i.locator).__name__ for i in sources] == ["LocalFile", "ShardRows"]
