"""``report`` and ``score --report``: the page holds what the scores file says (counts, histogram bars,
rankings, classes, errors, provenance), embeds everything, escapes hostile names, and a real browser
loads it without an error and draws every image."""

from __future__ import annotations

import io
import json
import subprocess
import sysconfig
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from perceptscore.cli import app
from perceptscore.report import gather

from browser import chromium
from photos import sample

EXE = str(Path(sysconfig.get_path("scripts")) / "perceptscore")
HOSTILE = ["<script>.jpg", '"><img src=x onerror=alert(1)>.jpg']
TASKS = ("memorability", "quality", "emotion")


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory, checkpoint_args: list[str]) -> tuple[Path, Path]:
    """A scores file of 7 files (6 photos, 2 with hostile names, and a broken one), written by
    ``score --report``; then one photo is deleted (the report must draw a placeholder for it)."""
    folder = tmp_path_factory.mktemp("report")
    photos = folder / "photos"
    photos.mkdir()
    pictures = [sample(n) for n in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")]
    names = ["a.jpg", "b.png", "gone.jpg", "d.jpg", *HOSTILE]
    for i, name in enumerate(names):
        pictures[i % 4].rotate(15 * i).save(photos / name, quality=90)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    out, page = folder / "scores.parquet", folder / "from-score.html"
    done = subprocess.run(
        [EXE, "score", str(photos), "-t", ",".join(TASKS), *checkpoint_args, "--device", "cpu",
         "-o", str(out), "--report", str(page)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # one error row
    # the summary, then one line on the page
    assert done.stderr.strip().splitlines()[-1].startswith(f"report -> {page} ("), done.stderr
    (photos / "gone.jpg").unlink()
    return out, page


class Page(HTMLParser):
    """What the tests look at: tags, images in order per grid, histogram bars, texts per element."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.sections: list[str] = []
        self.images: dict[tuple[str, str], list[dict[str, str | None]]] = {}
        self.bars: dict[str, list[int]] = {}
        self.captions: list[str] = []
        self.cells: list[str] = []
        self._section, self._grid, self._svg, self._text = "", "", "", None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section":
            self._section = a.get("id") or ""
            self.sections.append(self._section)
        elif tag == "div" and "grid" in (a.get("class") or ""):
            self._grid = a.get("class") or ""
        elif tag == "img":
            self.images.setdefault((self._section, self._grid), []).append(a)
        elif tag == "svg":
            self._svg = a.get("aria-label") or ""
        elif tag == "rect":
            self.bars.setdefault(self._svg, []).append(int(a["data-count"] or -1))
        elif tag in ("figcaption", "td"):
            self._text = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._grid = ""
        elif tag in ("figcaption", "td") and self._text is not None:
            (self.captions if tag == "figcaption" else self.cells).append(self._text)
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text += data


def _report(*args: str | Path) -> str:
    result = CliRunner().invoke(app, ["report", *map(str, args)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return result.output


def test_report_structure_is_the_data(scores, tmp_path: Path) -> None:
    out, _ = scores
    page_path = tmp_path / "report.html"
    _report(out, "-o", page_path, "--top", "3", "--device", "cpu")
    html = page_path.read_text(encoding="utf-8")
    page = Page(html)
    frame = pd.read_parquet(out)
    ok = frame[frame["error"].isna()]
    assert page.sections == ["summary", *(f"task-{t}" for t in TASKS), "errors", "provenance"]
    # every number drawn is the data's: histogram bars against numpy's own counts
    for column in ("memorability", "quality", "emotion_confidence"):
        values = ok[column].to_numpy()
        expected, _ = np.histogram(values, bins=30, range=(values.min(), values.max()))
        assert page.bars[f"histogram of {column}"] == expected.tolist()
    # the rankings: highest and lowest first, ties in input order, as pandas sorts them
    for task in ("memorability", "quality"):
        for grid, ascending in (("grid top", False), ("grid bottom", True)):
            expected = ok.sort_values(task, ascending=ascending, kind="stable")["path"].head(3).tolist()
            shown = [img["alt"] for img in page.images[(f"task-{task}", grid)] if img["class"] == "thumb"]
            assert shown == expected
    counts = ok["emotion"].value_counts()
    rows = dict(zip(page.cells[0::2], page.cells[1::2], strict=False))
    for label in ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"):
        assert rows[label] == str(counts.get(label, 0))
    thumbs = [a for (_, _), imgs in page.images.items() for a in imgs if a.get("class") == "thumb"]
    assert len(thumbs) == 3 * 2 * 2 + ok["emotion"].nunique()  # top/bottom 3 of two tasks; 1 per class
    # self-contained: every image embedded, no URL to anywhere, nothing to run
    assert all((a["src"] or "").startswith("data:image/") for _, a in page.tags if a.get("src"))
    assert "http://" not in html and "https://" not in html and "url(" not in html
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object")]
    assert all(not k.startswith("on") for _, a in page.tags for k in a)  # no injected handlers
    for name in HOSTILE:  # shown as text, exactly
        assert any(caption.endswith(name) for caption in page.captions)
    # errors and counts
    assert "broken.jpg" in " ".join(page.cells) and "0 errors" not in html
    assert f'<b id="rows">{len(frame)}</b>' in html and f'<b id="errors">{len(frame) - len(ok)}</b>' in html
    # a file gone since scoring is a placeholder with its reason, not a failure
    assert any("gone.jpg" in c and "no such file" in c for c in page.captions)


def test_score_report_records_provenance_and_how_long(scores) -> None:
    out, page_path = scores
    html = page_path.read_text(encoding="utf-8")
    about = json.loads(pq.read_schema(out).metadata[b"perceptscore"])
    assert about["seconds"] > 0
    for task in TASKS:
        assert about["tasks"][task]["sha256"] in html
    page = Page(html)
    assert f"{about['seconds']:.1f} s" in page.cells and about["created"] in page.cells
    assert about["device"] in page.cells and about["precision"] in page.cells
    assert not any("no such file" in c for c in page.captions)  # made before the file was deleted


def test_report_with_explain_puts_a_heatmap_beside_each_shown_image(scores, tmp_path: Path) -> None:
    out, _ = scores
    page_path = tmp_path / "explained.html"
    _report(out, "-o", page_path, "--top", "1", "--explain", "--device", "cpu")
    page = Page(page_path.read_text(encoding="utf-8"))
    for (section, grid), images in page.images.items():
        for thumb, heat in zip(images[0::2], images[1::2], strict=False):
            if "gone.jpg" in (thumb["alt"] or ""):
                continue
            assert thumb["class"] == "thumb" and heat["class"] == "heatmap", (section, grid, thumb["alt"])
            assert heat["alt"] == f"heatmap of {thumb['alt']}"
            picture = Image.open(io.BytesIO(_decoded(heat["src"] or "")))
            assert max(picture.size) <= 256


def _decoded(uri: str) -> bytes:
    import base64

    return base64.b64decode(uri.split(",", 1)[1])


def test_report_loads_in_chromium_without_errors_and_draws_every_image(scores, tmp_path: Path) -> None:
    out, page_path = scores
    explained = tmp_path / "explained.html"
    _report(out, "-o", explained, "--top", "2", "--explain", "--device", "cpu")
    with chromium(tmp_path) as browser:
        for page in (page_path, explained):
            browser.get(page.resolve().as_uri())
            widths = browser.execute_script(
                "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)"
            )
            assert widths and min(widths) > 0, widths
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
            assert browser.execute_script("return document.querySelectorAll('svg rect.bar').length") == 90
            shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
            pixels = np.asarray(shot)
            assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # not blank


def test_gather_ranks_and_counts_like_pandas_on_many_rows(tmp_path: Path) -> None:
    """20,000 rows with ties, missing scores and errors; the CSV path reads only the needed columns."""
    rng = np.random.default_rng(0)
    n = 20_000
    quality = rng.integers(0, 50, n).astype(float) / 50  # many ties
    quality[rng.random(n) < 0.01] = np.nan
    error = np.where(rng.random(n) < 0.02, "unreadable image: test", None)
    frame = pd.DataFrame({"path": [f"p{i}.jpg" for i in range(n)], "quality": quality,
                          "quality_raw": quality * 9.63 - 6.52, "error": error,
                          "extra": ["x" * 50] * n})  # fmt: skip
    parquet, csv = tmp_path / "s.parquet", tmp_path / "s.csv"
    about = {"perceptscore": "test", "cwd": str(tmp_path), "tasks": {}}
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({"perceptscore": json.dumps(about)}), parquet)
    frame.to_csv(csv, index=False)
    Path(f"{csv}.meta.json").write_text(json.dumps(about))
    ok = frame[frame["error"].isna() & frame["quality"].notna()]
    for path in (parquet, csv):
        data = gather([str(path)], top=25)
        (section,) = data.tasks
        assert [r.path for r in section.top] == ok.sort_values("quality", ascending=False, kind="stable")[
            "path"
        ].head(25).tolist()
        assert [r.path for r in section.bottom] == ok.sort_values("quality", kind="stable")["path"].head(
            25
        ).tolist()
        expected, _ = np.histogram(ok["quality"], bins=30, range=(ok["quality"].min(), ok["quality"].max()))
        assert section.histogram.counts == expected.tolist() and section.scored == len(ok)
        assert data.errors == int(frame["error"].notna().sum()) and data.rows == n


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "SCORES", "-o", "OUT/report.txt"], "name an .html file"),
        (["report", "PHOTO", "-o", "OUT/report.html"], "not a scores file"),
        (["report", "SCORES", "-o", "OUT/report.html", "--top", "0"], "--top must be at least 1"),
        (
            ["score", "PHOTO", "-t", "mem", "-o", "-", "--report", "OUT/r.html"],
            "--report needs a file output",
        ),
        (["score", "PHOTO", "-t", "mem", "-o", "OUT/s.csv", "--report", "OUT/r.pdf"], "name an .html file"),
    ],
)
def test_report_usage_mistakes_are_one_line_and_exit_2(scores, tmp_path: Path, args, message) -> None:
    out, _ = scores
    photo = out.parent / "photos" / "a.jpg"
    args = [
        a.replace("SCORES", str(out)).replace("PHOTO", str(photo)).replace("OUT", str(tmp_path)) for a in args
    ]
    done = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_remote_and_missing_files_get_a_placeholder_with_the_reason(tmp_path: Path) -> None:
    paths = ["s3://bucket/a.jpg", "gone/b.jpg", "c.jpg"]
    errors = [None, None, "unreadable image: test"]
    frame = pd.DataFrame({"path": paths, "memorability": [0.9, 0.5, None], "error": errors})
    about = {"perceptscore": "test", "cwd": str(tmp_path), "tasks": {}}
    table = pa.Table.from_pandas(frame, preserve_index=False)
    scores = tmp_path / "s.parquet"
    pq.write_table(table.replace_schema_metadata({"perceptscore": json.dumps(about)}), scores)
    _report(scores, "-o", tmp_path / "r.html", "--top", "2")
    page = Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    top = page.images[("task-memorability", "grid top")]
    assert [img["alt"] for img in top] == ["s3://bucket/a.jpg", "gone/b.jpg"]
    assert len({img["src"] for img in top}) == 1  # the same grey placeholder for both
    assert next(c for c in page.captions if "a.jpg" in c).endswith("(remote file: not fetched)")
    assert next(c for c in page.captions if "b.jpg" in c).endswith("(no such file)")
    assert "c.jpg" in page.cells and "unreadable image: test" in page.cells


@pytest.mark.parametrize(
    "about",
    [
        {"tasks": {"memorability": "oops"}, "seconds": "12", "device": 7},
        {"tasks": ["memorability"], "seconds": True, "created": {"at": 1}},
        {"tasks": {"memorability": {"checkpoint": 3, "sha256": None}}, "seconds": float("nan")},
    ],
)
def test_malformed_provenance_shows_not_recorded_instead_of_a_traceback(tmp_path: Path, about) -> None:
    frame = pd.DataFrame({"path": ["c.jpg"], "memorability": [0.5], "error": [None]})
    table = pa.Table.from_pandas(frame, preserve_index=False)
    scores = tmp_path / "s.parquet"
    pq.write_table(table.replace_schema_metadata({"perceptscore": json.dumps(about)}), scores)
    done = subprocess.run([EXE, "report", str(scores), "-o", str(tmp_path / "r.html")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    page = Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    how_long, device, when = page.cells[2], page.cells[3], page.cells[1]  # after the version's cell
    assert (how_long, device, when) == ("not recorded", "not recorded", "not recorded"), page.cells
    if isinstance(about["tasks"], dict):  # the task is listed, each malformed field not recorded
        assert page.cells[-1] == "not recorded (not recorded)sha256 not recorded", page.cells


def test_score_report_failure_still_prints_the_summary_then_one_error_and_exits_2(
    release_checkpoints, tmp_path: Path
) -> None:
    photo = tmp_path / "a.jpg"
    sample("astronaut.png").resize((96, 64)).save(photo)
    out = tmp_path / "s.parquet"
    page = tmp_path / ("r" * 250 + ".html")  # a legal name whose temporary sibling is too long: write fails
    ckpt = str(release_checkpoints["memorability"][0])
    done = subprocess.run(
        [EXE, "score", str(photo), "-t", "memorability", "--checkpoint", ckpt, "--device", "cpu",
         "-o", str(out), "--report", str(page)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-2].startswith("scored 1 file, 0 errors -> ") and str(out) in lines[-2], done.stderr
    assert lines[-1].startswith("error: report ") and "not written" in lines[-1], done.stderr
    assert "Traceback" not in done.stderr and not page.exists()
    assert pd.read_parquet(out)["memorability"].notna().all()  # the scores are there, complete
