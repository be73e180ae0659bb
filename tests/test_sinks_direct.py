"""Each sink of ``sinks.SINKS`` on its own: rows written are the rows read back, and a write that does not
finish leaves nothing that looks complete (the file sink's CSV/parquet/JSONL are in test_sinks.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perceptscore import limits
from perceptscore.destinations import RemoteOutput, RemoteSink
from perceptscore.errors import UsageError
from perceptscore.formats import read_csv_scores, read_provenance, read_scores
from perceptscore.sinks import SINKS, FileSink, MemorySink, Sink, StreamSink, create, for_output, writing

from servers import MotoS3

SCHEMA = pa.schema([("path", pa.string()), ("memorability", pa.float64()), ("error", pa.string())])
ROWS = [
    {"path": "a.jpg", "memorability": 0.5, "error": None},
    {"path": '=b,"c".jpg', "memorability": None, "error": "empty file"},  # quoting, a formula-like name
]


def test_every_registered_sink_is_made_by_name() -> None:
    assert isinstance(create("memory"), MemorySink)
    assert isinstance(create("stream"), StreamSink)
    assert isinstance(for_output("-"), StreamSink)
    assert {"file", "stream", "memory"} <= set(SINKS)
    with pytest.raises(UsageError, match="unknown output kind 'nowhere'"):
        create("nowhere")


def test_the_memory_sink_holds_the_rows_in_order_with_the_schemas_types() -> None:
    sink = MemorySink()
    batch = pa.RecordBatch.from_pylist(ROWS[1:], schema=SCHEMA)
    extra = pa.Table.from_pylist(ROWS[:1]).append_column("ignored", pa.array([1]))  # columns beyond
    with writing(sink, SCHEMA, {"run": 1}):
        sink.write(extra)
        sink.write(batch)
    assert sink.table is not None and sink.table.schema == SCHEMA
    assert sink.table.to_pylist() == [ROWS[0], ROWS[1]]
    assert sink.provenance == {"run": 1}


def test_an_aborted_memory_sink_has_no_table() -> None:
    sink = MemorySink()
    with pytest.raises(RuntimeError), writing(sink, SCHEMA, {}):
        sink.write(ROWS)
        raise RuntimeError("the engine failed")
    assert sink.table is None


def test_an_empty_memory_sink_is_an_empty_table_of_the_schema() -> None:
    sink = MemorySink()
    with writing(sink, SCHEMA, {}):
        pass
    assert sink.table is not None and sink.table.num_rows == 0 and sink.table.schema == SCHEMA


_STREAM = """
import sys, pyarrow as pa
from perceptscore.sinks import create, writing
schema = pa.schema([("path", pa.string()), ("memorability", pa.float64()), ("error", pa.string())])
rows = {rows!r}
with writing(create("stream"), schema, {{}}) as sink:
    for row in rows:
        sink.write([row])
"""


def test_the_stream_sink_writes_csv_that_reads_back_exactly() -> None:
    done = subprocess.run([sys.executable, "-c", _STREAM.format(rows=ROWS)], capture_output=True, check=True)
    table = read_csv_scores(io.BytesIO(done.stdout))
    assert table.to_pylist() == ROWS


_ENDLESS = """
import os, sys, pyarrow as pa
from perceptscore.sinks import StdoutClosed, create, writing
schema = pa.schema([("path", pa.string())])
try:
    with writing(create("stream"), schema, {}) as sink:
        for i in range(1_000_000):
            sink.write([{"path": f"{i}.jpg"}] * 100)
except StdoutClosed:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the CLI does too: no "Exception ignored" at exit
    sys.exit("stdout closed")
"""


def test_the_stream_sink_says_so_when_its_reader_goes_away() -> None:
    """``score | head``: the end of a pipeline is ``StdoutClosed`` (the CLI ends quietly), not an error."""
    writer = subprocess.Popen(
        [sys.executable, "-c", _ENDLESS], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert writer.stdout is not None
    assert writer.stdout.read(100).startswith(b'"path"')
    writer.stdout.close()
    _, err = writer.communicate(timeout=60)
    assert err.decode().strip() == "stdout closed"


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_an_aborted_file_sink_keeps_the_earlier_output_and_its_provenance(
    tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"scores{suffix}"
    with writing(FileSink(str(out)), SCHEMA, {"run": 1}) as sink:
        sink.write(ROWS[:1])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KeyboardInterrupt), writing(FileSink(str(out)), SCHEMA, {"run": 2}) as sink:
        sink.write(ROWS)
        raise KeyboardInterrupt
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no partial file left either
    assert read_scores(str(out)).to_pylist() == ROWS[:1] and read_provenance(str(out)) == {"run": 1}


_KILLED = """
import os, signal, pyarrow as pa
from perceptscore.sinks import FileSink
schema = pa.schema([("path", pa.string())])
sink = FileSink({out!r})
sink.open(schema, {{}})
sink.write([{{"path": "a.jpg"}}] * 1000)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_killed_writer_leaves_no_output_and_the_next_one_clears_its_partial(
    tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"scores{suffix}"
    done = subprocess.run([sys.executable, "-c", _KILLED.format(out=str(out))], capture_output=True)
    assert done.returncode == -9
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(f".{out.name}.partial-")  # hidden, named as unfinished
    sink: Sink = FileSink(str(out))
    with writing(sink, SCHEMA, {"run": 3}):
        sink.write(ROWS)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".meta.json")) == [out.name]
    assert read_scores(str(out)).to_pylist() == ROWS
    if suffix == ".csv":
        assert json.loads(Path(f"{out}.meta.json").read_text()) == {"run": 3}


def test_a_file_sink_refuses_stdout_and_a_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="stream sink"):
        FileSink("-")
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        FileSink(str(tmp_path / "d.csv"))


# ---- the remote sink (an object-store output) against moto's S3 server -------------------------------


@pytest.fixture
def bucket(moto_s3: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A bucket of this test's own, the environment that finds it, a work folder of the test's; the
    process's limits put back after."""
    quick = {"PERCEPTSCORE_REMOTE_TIMEOUT": "2", "PERCEPTSCORE_REMOTE_TRIES": "1"}
    for name, value in {**moto_s3.env, **quick, "PERCEPTSCORE_WORK": str(tmp_path / "work")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    before = limits.installed()
    limits.install(limits.Limits.from_env())
    name = f"sink-{uuid.uuid4().hex[:10]}"
    moto_s3.make_bucket(name)
    yield name
    limits.restore(before)


def _work_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "work").rglob("*") if not p.is_dir())


def _parquet_provenance(data: bytes, tmp_path: Path) -> dict[str, object]:
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(data)
    return read_provenance(str(copy))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_the_remote_sink_uploads_the_rows_whole_once_finished(
    moto_s3: MotoS3, bucket: str, tmp_path: Path, suffix: str
) -> None:
    name = f"night/scores{suffix}"
    sink = create("remote", output=f"s3://{bucket}/{name}", fingerprint={"plan": 1})
    assert isinstance(sink, RemoteSink) and "remote" in SINKS
    with writing(sink, SCHEMA, {"run": 1}):
        sink.write(ROWS[:1])
        sink.write(pa.Table.from_pylist(ROWS[1:], schema=SCHEMA))
        assert moto_s3.keys(bucket) == []  # nothing in the store before the whole file is (probe gone)
    data = moto_s3.get(bucket, name)
    if suffix == ".csv":
        assert read_csv_scores(io.BytesIO(data)).to_pylist() == ROWS
        assert json.loads(moto_s3.get(bucket, f"{name}.meta.json")) == {"run": 1}
        assert moto_s3.keys(bucket) == [name, f"{name}.meta.json"]
    else:
        assert pq.read_table(io.BytesIO(data)).to_pylist() == ROWS
        assert _parquet_provenance(data, tmp_path) == {"run": 1}
        assert moto_s3.keys(bucket) == [name]
    assert _work_files(tmp_path) == []  # the local copy and its record go once uploaded


def test_an_aborted_remote_sink_leaves_the_bucket_as_it_was(
    moto_s3: MotoS3, bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/scores.csv"
    with pytest.raises(KeyboardInterrupt), writing(RemoteSink(url, {"plan": 1}), SCHEMA, {}) as sink:
        sink.write(ROWS)
        raise KeyboardInterrupt
    assert moto_s3.keys(bucket) == [] and _work_files(tmp_path) == []

    moto_s3.put(bucket, "scores.csv", b"earlier")
    with pytest.raises(RuntimeError), writing(RemoteSink(url, {"plan": 2}), SCHEMA, {}) as sink:
        sink.write(ROWS)
        raise RuntimeError("the engine failed")
    assert moto_s3.keys(bucket) == ["scores.csv"] and moto_s3.get(bucket, "scores.csv") == b"earlier"
    assert _work_files(tmp_path) == []


def test_before_upload_sees_the_complete_local_copy_before_the_store_does(
    moto_s3: MotoS3, bucket: str
) -> None:
    """What ``score --report`` is made from: the whole file, not yet uploaded."""
    seen: list[tuple[list[dict[str, object]], list[str]]] = []
    output = RemoteOutput(f"s3://{bucket}/scores.parquet")
    output.prepare()
    hook = lambda local: seen.append((read_scores(str(local)).to_pylist(), moto_s3.keys(bucket)))  # noqa: E731
    with writing(RemoteSink(output, {"plan": 1}, before_upload=hook), SCHEMA, {}) as sink:
        sink.write(ROWS)
    assert seen == [(ROWS, [])]
    assert pq.read_table(io.BytesIO(moto_s3.get(bucket, "scores.parquet"))).to_pylist() == ROWS


def test_a_failed_upload_keeps_the_finished_copy_for_the_same_plan(
    moto_s3: MotoS3, bucket: str, tmp_path: Path
) -> None:
    """The store goes away after the rows are written: one line, and the local copy stays recorded as
    this plan's run, so the same command uploads it without scoring again (another plan's is discarded)."""
    url = f"s3://{bucket}/scores.parquet"
    sink = RemoteSink(url, {"plan": 1})
    failed = pytest.raises(UsageError, match=r"complete in .* could not be uploaded")
    with failed, writing(sink, SCHEMA, {}):
        sink.write(ROWS)
        moto_s3.client().delete_bucket(Bucket=bucket)  # empty: the probe was removed
    assert "scores.parquet" in _work_files(tmp_path)
    finished = RemoteOutput(url).finished_rows({"plan": 1})
    assert finished is not None and finished.to_pylist() == ROWS
    assert RemoteOutput(url).finished_rows({"plan": 2}) is None and _work_files(tmp_path) == []


def test_score_writes_a_remote_output_through_the_sink_with_its_report(
    moto_s3: MotoS3, bucket: str, photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """``score -o s3://... --report``: the report is made from the complete local copy, the rows are
    uploaded, and nothing is left in the work folder (shards, copy, record)."""
    from rich.console import Console

    from perceptscore.commands.score import score
    from perceptscore.plan import ScoreOptions
    from perceptscore.progress import Reporter

    photos = sorted(photo_dir.iterdir())[:3]
    checkpoint = str(release_checkpoints["memorability"][0])
    options = ScoreOptions(["mem"], {"mem": checkpoint}, device="cpu", workers=0)
    page = tmp_path / "page.html"
    outcome = score([str(p) for p in photos], f"s3://{bucket}/scores.parquet", options,
                    lambda total: Reporter(Console(file=io.StringIO()), total), report=str(page))  # fmt: skip
    rows = pq.read_table(io.BytesIO(moto_s3.get(bucket, "scores.parquet")))
    assert rows.column("path").to_pylist() == [str(p) for p in photos] and outcome.rows == 3
    assert moto_s3.keys(bucket) == ["scores.parquet"]  # the probe and the lock object removed
    assert page.is_file() and "report -> " in (outcome.report or "") and not outcome.report_failed
    assert _work_files(tmp_path) == []
