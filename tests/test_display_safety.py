"""What leaves the program besides the scores file (issue 21, items 16, 19, 20): no credential of a URL
or of ``--storage-options`` in a page, a message, an ``error`` cell or a file name; a report draws and
explains only the very files scored, with the very weights recorded; CSV headers hold no formula; bidi and
zero-width characters in names are shown escaped."""

from __future__ import annotations

import io
import json
import os
import sys
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from typer.testing import CliRunner

import perceptscore.cli
from perceptscore.cli import app, main

from servers import FaultyHTTPServer, MotoS3

PASSWORD, SIGNATURE, TOKEN = "pw-c0ffee-0001", "sig-c0ffee-0002", "tok-c0ffee-0003"
SECRETS = (PASSWORD, SIGNATURE, TOKEN)


def _cli(*args: str | Path, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300", **(env or {})})


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The console script in-process (``main``: how a usage error becomes one line): exit code, stderr."""
    monkeypatch.setattr(sys, "argv", ["perceptscore", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0), capsys.readouterr().err


@pytest.fixture
def s3(moto_s3: MotoS3, photo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A bucket holding one photo, and storage options for it that botocore echoes in its messages (an
    unknown ``signature_version``: what any option value may be, a token included)."""
    for name, value in {**moto_s3.env, "PERCEPTSCORE_REMOTE_TRIES": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"display-{uuid.uuid4().hex[:10]}"
    moto_s3.make_bucket(bucket)
    moto_s3.put(bucket, "a.jpg", (photo_dir / "a_square.jpg").read_bytes())
    options = {"s3": {"endpoint_url": moto_s3.endpoint, "config_kwargs": {"signature_version": TOKEN}}}
    return bucket, json.dumps(options)


def _scoring(checkpoint: str) -> list[str]:
    return ["-t", "mem", "--checkpoint", f"memorability={checkpoint}", "--device", "cpu", "--workers", "0"]


def _assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret} in {where}: {text}"


def test_credentials_show_only_in_the_scores_files_path_column(
    http_server: FaultyHTTPServer, s3: tuple[str, str], photo_dir: Path, release_checkpoints,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    bucket, options = s3
    http_server.files["/photos/a.jpg"] = (photo_dir / "a_square.jpg").read_bytes()
    # a presigned URL whose query holds a "/" (as X-Amz-Credential does): a naive stem would keep it
    url = http_server.url("/photos/a.jpg").replace("http://", f"http://user:{PASSWORD}@")
    url += f"?X-Amz-Credential=AKIA/2024/us-east-1/s3/aws4_request&X-Amz-Signature={SIGNATURE}"
    ckpt = str(release_checkpoints["memorability"][0])
    manifest = tmp_path / "inputs" / "m.csv"  # the user's own file: it holds the URLs as they are
    manifest.parent.mkdir()
    manifest.write_text(f"path\n{url}\ns3://{bucket}/a.jpg\n")
    out, page = tmp_path / "scores.csv", tmp_path / "report.html"
    try:
        done = _cli("score", manifest, *_scoring(ckpt), "--storage-options", options, "-o", out,
                    "--report", page)  # fmt: skip
        assert done.exit_code == 1, (done.output, done.exception)  # the S3 row fails: a bad signature version
        rows = pd.read_csv(out)
        assert rows["path"].tolist() == [url, f"s3://{bucket}/a.jpg"]
        assert rows["error"].tolist()[1] == "Unknown Signature Version: ***."  # the option's value redacted
        outputs = [done.stderr]
        explained = _cli("explain", url, "-t", "mem", "--checkpoint", ckpt,
                         "--device", "cpu", "-o", tmp_path / "maps")  # fmt: skip
        assert explained.exit_code == 0, explained.output
        assert [p.name for p in (tmp_path / "maps").iterdir()] == ["a.memorability.relevance.png"]
        assert "http://***@127.0.0.1" in explained.stderr and "a.jpg?***" in explained.stderr
        kept = _cli("filter", out, "--min-memorability", "-1000", "--copy-to", tmp_path / "kept")
        assert "not placed: http://***@" in kept.stderr, kept.output
        outputs += [explained.stderr, kept.stderr]
    finally:
        http_server.reset()
        del http_server.files["/photos/a.jpg"]
    # the rank table on a terminal
    terminal = io.StringIO()
    monkeypatch.setattr(perceptscore.cli, "console", Console(file=terminal, force_terminal=True, width=300))
    ranked = _cli("rank", out, "-t", "mem")
    assert ranked.exit_code == 0 and "a.jpg?***" in terminal.getvalue(), terminal.getvalue()
    outputs += [terminal.getvalue(), ranked.output]
    for text in outputs:
        _assert_no_secret(text, "a message")
    for path in tmp_path.rglob("*"):
        _assert_no_secret(str(path.relative_to(tmp_path)), "a file name")
        if path.is_file() and path not in (out, manifest):
            _assert_no_secret(path.read_bytes().decode("latin-1"), str(path))
    # the scores file holds the URL as given, in its path column and nowhere else
    cells = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(column_types={"path": pa.string()}))
    rest = cells.drop_columns(["path"]).to_pandas().to_csv()
    _assert_no_secret(rest + ",".join(cells.column_names), "a scores file's other cells")
    assert "Unknown Signature Version" in page.read_text()


def test_a_usage_error_redacts_storage_option_values(
    s3: tuple[str, str], photo_dir: Path, release_checkpoints, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    bucket, options = s3
    ckpt = str(release_checkpoints["memorability"][0])
    code, err = _main(monkeypatch, capsys, "score", str(photo_dir / "a_square.jpg"), *_scoring(ckpt),
                      "--storage-options", options, "-o", f"s3://{bucket}/out/s.csv")  # fmt: skip
    assert code == 2 and err.startswith("error: cannot write to s3://"), err
    assert "Unknown Signature Version: ***" in err and len(err.strip().splitlines()) == 1, err
    _assert_no_secret(err, "a usage error")


def _forged_scores(folder: Path, rows: list[tuple[str, int | None, int | None]], about: dict) -> Path:
    """A scores file another tool wrote: paths with the size and mtime it claims for them."""
    frame = pd.DataFrame(
        {
            "path": [p for p, _, _ in rows],
            "memorability": [0.9 - i / 10 for i in range(len(rows))],
            "error": [None] * len(rows),
            "file_size": pd.array([s for _, s, _ in rows], dtype="Int64"),
            "file_mtime_ns": pd.array([m for _, _, m in rows], dtype="Int64"),
        }
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    scores = folder / "forged.parquet"
    pq.write_table(table.replace_schema_metadata({"perceptscore": json.dumps(about)}), scores)
    return scores


def test_a_report_draws_and_explains_only_the_files_scored(
    photo_dir: Path, release_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    photos = sorted(p for p in photo_dir.iterdir() if p.suffix == ".jpg")[:3]
    scored, changed = (p.stat() for p in photos[:2])
    rows = [(str(photos[0]), scored.st_size, scored.st_mtime_ns),
            (str(photos[1]), changed.st_size, changed.st_mtime_ns - 1),  # another file, or this one changed
            (str(photos[2]), None, None)]  # fmt: skip
    checkpoint, _ = release_checkpoints["memorability"]
    weights = {"checkpoint": str(checkpoint), "origin": "--checkpoint", "sha256": "0" * 64}
    scores = _forged_scores(tmp_path, rows, {"cwd": str(tmp_path), "tasks": {"memorability": weights}})
    page = tmp_path / "r.html"
    done = _cli("report", scores, "-o", page, "--explain", "--device", "cpu",
                "--checkpoint", f"memorability={checkpoint}")  # fmt: skip
    assert done.exit_code == 0, done.output
    html = page.read_text()
    assert html.count('class="heatmap"') == 1  # shown once: 3 images, all ranked
    assert html.count("(changed since it was scored)") == 1
    assert html.count("(no file size and mtime recorded, so it cannot be checked; score it again)") == 1
    # the weights a provenance names are loaded only when their sha256 is the one recorded; here it is not,
    # and no other weights are there (offline): no model ran at all
    again = str(tmp_path / "r2.html")
    code, err = _main(monkeypatch, capsys, "report", str(scores), "-o", again, "--explain",
                      "--device", "cpu")  # fmt: skip
    assert code == 3 and "no weights for task memorability" in err, err


NAMES = ['=HYPERLINK("http://x.invalid")', "+cmd", "-2+3", "@SUM(A1)", "ok"]


def test_formula_column_names_are_defused_in_csv_headers_and_restored_on_reading(
    photo_dir: Path, release_checkpoints, tmp_path: Path
) -> None:
    photo = photo_dir / "a_square.jpg"
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(photo)], **{n: [f"v{i}"] for i, n in enumerate(NAMES)}}).to_csv(
        manifest, index=False
    )
    ckpt = str(release_checkpoints["memorability"][0])
    out = tmp_path / "s.csv"
    done = _cli(
        "score",
        manifest,
        "-t",
        "mem",
        "--checkpoint",
        f"memorability={ckpt}",
        "--device",
        "cpu",
        "--workers",
        "0",
        "-o",
        out,
    )
    assert done.exit_code == 0, done.output
    header = out.read_text().splitlines()[0]
    assert header.endswith('"\'=HYPERLINK(""http://x.invalid"")","\'+cmd","\'-2+3","\'@SUM(A1)","ok"'), header
    again = tmp_path / "again.parquet"  # read back (rank reads a scores CSV): the names as given
    assert _cli("rank", out, "-t", "mem", "-o", again).exit_code == 0
    assert pq.read_schema(again).names[-len(NAMES) :] == NAMES
    assert pq.read_table(again).column(NAMES[0]).to_pylist() == ["v0"]
    twice = tmp_path / "twice.csv"  # written again as CSV: defused once, not twice
    assert _cli("filter", out, "--min-memorability", "-1000", "-o", twice).exit_code == 0
    assert twice.read_text().splitlines()[0] == header


def test_bidi_and_zero_width_characters_in_names_are_shown_escaped(
    photo_dir: Path, release_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    tricky = ["invoice\u202egpj.exe.jpg", "a\u200bb.jpg"]  # reads "invoiceexe.jpg"; looks like "ab.jpg"
    for name in tricky:
        (folder / name).write_bytes((photo_dir / "a_square.jpg").read_bytes())
    ckpt = str(release_checkpoints["memorability"][0])
    out, page = tmp_path / "s.parquet", tmp_path / "r.html"
    done = _cli("score", folder, *_scoring(ckpt), "-o", out,
                "--report", page)  # fmt: skip
    assert done.exit_code == 0, done.output
    assert sorted(Path(p).name for p in pq.read_table(out).column("path").to_pylist()) == sorted(tricky)
    explained = _cli("explain", folder, "-t", "mem", "--checkpoint", ckpt, "--device", "cpu",
                     "-o", tmp_path / "maps")  # fmt: skip
    terminal = io.StringIO()
    monkeypatch.setattr(perceptscore.cli, "console", Console(file=terminal, force_terminal=True, width=300))
    assert _cli("rank", out, "-t", "mem").exit_code == 0
    for text in (page.read_text(), explained.stderr, terminal.getvalue()):
        assert "invoice\\u202egpj.exe.jpg" in text and "a\\u200bb.jpg" in text, text
        assert "\u202e" not in text and "\u200b" not in text
    assert os.path.isfile(tmp_path / "maps" / "invoice\u202egpj.exe.memorability.relevance.png")  # the file
