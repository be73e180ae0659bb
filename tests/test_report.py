"""``report`` and ``score --report``: the page holds what the scores file says (counts, statistics,
histogram bars and axes, rankings, classes, errors, provenance), shows each image once per task, links each
local picture to its file, embeds everything, escapes hostile names, and a real browser loads it without an
error, draws every image, lays it out compactly and follows its links to the real files."""

from __future__ import annotations

import io
import itertools
import json
import os
import statistics
import subprocess
import sysconfig
import urllib.parse
import urllib.request
from collections import Counter
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
from perceptscore.commands.report import original_link
from perceptscore.report import Row, gather

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
        self.section_cells: dict[str, list[str]] = {}
        self.stats: dict[tuple[str, str], tuple[str, str]] = {}  # (section, stat) -> (data-value, text)
        self.ticks: dict[
            tuple[str, str], list[tuple[float, float, str]]
        ] = {}  # (svg, class) -> (x, y, label)
        self._section, self._grid, self._svg, self._text, self._href = "", "", "", None, None
        self._attrs: dict[str, str | None] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section":
            self._section = a.get("id") or ""
            self.sections.append(self._section)
        elif tag == "div" and "grid" in (a.get("class") or ""):
            self._grid = a.get("class") or ""
        elif tag == "a":
            self._href = a.get("href")
        elif tag == "img":  # the link around it, if any, as "link"
            self.images.setdefault((self._section, self._grid), []).append({**a, "link": self._href})
        elif tag == "svg":
            self._svg = a.get("aria-label") or ""
        elif tag == "rect" and a.get("class") == "bar":
            self.bars.setdefault(self._svg, []).append(int(a["data-count"] or -1))
        elif tag in ("figcaption", "td", "text"):
            self._text, self._attrs = "", a

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._grid = ""
        elif tag == "a":
            self._href = None
        elif tag in ("figcaption", "td", "text") and self._text is not None:
            if tag == "figcaption":
                self.captions.append(self._text)
            elif tag == "td":
                self.cells.append(self._text)
                self.section_cells.setdefault(self._section, []).append(self._text)
                if stat := self._attrs.get("data-stat"):
                    self.stats[(self._section, stat)] = (self._attrs["data-value"] or "", self._text)
            elif (kind := self._attrs.get("class")) in ("x-tick", "y-tick"):
                at = (float(self._attrs["x"] or "nan"), float(self._attrs["y"] or "nan"), self._text)
                self.ticks.setdefault((self._svg, kind), []).append(at)
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text += data


def _report(*args: str | Path) -> str:
    result = CliRunner().invoke(app, ["report", *map(str, args)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_report_structure_is_the_data(scores, tmp_path: Path) -> None:
    out, _ = scores
    page_path = tmp_path / "report.html"
    _report(out, "-o", page_path, "--top", "2", "--device", "cpu")  # 6 scored: a top 2 and a bottom 2
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
            expected = ok.sort_values(task, ascending=ascending, kind="stable")["path"].head(2).tolist()
            shown = [img["alt"] for img in page.images[(f"task-{task}", grid)] if img["class"] == "thumb"]
            assert shown == expected
    counts = ok["emotion"].value_counts()
    cells = page.section_cells["task-emotion"][7:]  # after the statistics: class, images, share
    rows = dict(zip(cells[0::3], cells[1::3], strict=True))
    for label in ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"):
        assert rows[label] == str(counts.get(label, 0))
    thumbs = [a for (_, _), imgs in page.images.items() for a in imgs if a.get("class") == "thumb"]
    assert len(thumbs) == 2 * 2 * 2 + ok["emotion"].nunique()  # top/bottom 2 of two tasks; 1 per class
    # self-contained: every image embedded, no URL to anywhere, nothing to run
    assert all((a["src"] or "").startswith("data:image/") for _, a in page.tags if a.get("src"))
    assert "http://" not in html and "https://" not in html and "url(" not in html
    links = [a["link"] for imgs in page.images.values() for a in imgs]
    assert all(link is None or not link.startswith(("http", "//")) for link in links)
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object")]
    assert all(not k.startswith("on") for _, a in page.tags for k in a)  # no injected handlers
    for name in HOSTILE:  # shown as text, exactly
        assert any(caption.endswith(name) for caption in page.captions)
    # errors and counts
    assert "broken.jpg" in " ".join(page.cells) and "0 errors" not in html
    assert f'<b id="rows">{len(frame)}</b>' in html and f'<b id="errors">{len(frame) - len(ok)}</b>' in html
    # --top 3: the 6 scored once each, highest first; a file gone since scoring is a placeholder with its
    # reason, not a failure, and links nowhere
    _report(out, "-o", page_path, "--top", "3", "--device", "cpu")
    page = Page(page_path.read_text(encoding="utf-8"))
    for task in ("memorability", "quality"):
        expected = ok.sort_values(task, ascending=False, kind="stable")["path"].tolist()
        assert [img["alt"] for img in page.images[(f"task-{task}", "grid all")]] == expected
        gone = [img for img in page.images[(f"task-{task}", "grid all")] if img["alt"].endswith("gone.jpg")]
        assert [img["link"] for img in gone] == [None]
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


@pytest.mark.browser
@pytest.mark.slow
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
            png = browser.get_screenshot_as_png()
            (tmp_path / f"{page.stem}.png").write_bytes(png)  # to look at when the layout changes
            shot = Image.open(io.BytesIO(png)).convert("RGB")
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
    shown = page.images[("task-memorability", "grid all")]  # 2 scored: all of them, highest first
    assert [img["alt"] for img in shown] == ["s3://bucket/a.jpg", "gone/b.jpg"]
    assert len({img["src"] for img in shown}) == 1  # the same grey placeholder for both
    assert [img["link"] for img in shown] == [None, None]  # nothing to open: remote, and gone
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
    cells = page.section_cells["provenance"]
    how_long, device, when = cells[2], cells[3], cells[1]  # after the version's cell
    assert (how_long, device, when) == ("not recorded", "not recorded", "not recorded"), cells
    if isinstance(about["tasks"], dict):  # the task is listed, each malformed field not recorded
        assert cells[-1] == "not recorded (not recorded)sha256 not recorded", cells


@pytest.mark.slow
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
    assert "0 errors -> " in lines[-2] and str(out) in lines[-2], done.stderr  # the scoring summary
    assert lines[-1].startswith("error: report ") and "not written" in lines[-1], done.stderr
    assert "Traceback" not in done.stderr and not page.exists()
    assert pd.read_parquet(out)["memorability"].notna().all()  # the scores are there, complete


# ---- statistics, axes, each image once, links to originals, the default name (issue 22, item 12) ----


def _forge(cwd: Path, columns: dict[str, list], out: Path) -> Path:
    """A scores file as ``score`` writes one, scored from ``cwd``: each local file's size and mtime
    recorded (so the report draws it), provenance in the parquet metadata."""
    frame = pd.DataFrame(columns)
    found = [os.stat(cwd / p) if "://" not in p and (cwd / p).is_file() else None for p in frame["path"]]
    frame["error"] = frame.get("error", pd.Series([None] * len(frame)))
    frame["file_size"] = pd.array([s.st_size if s else None for s in found], dtype="Int64")
    frame["file_mtime_ns"] = pd.array([s.st_mtime_ns if s else None for s in found], dtype="Int64")
    about = {"perceptscore": "test", "cwd": str(cwd), "tasks": {}}
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({"perceptscore": json.dumps(about)}), out)
    return out


def _photos(folder: Path, names: list[str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        sample("coffee.png").resize((120, 80)).rotate(20 * i).save(folder / name, quality=85)
    return names


def test_statistics_per_task_are_the_scores_files_own(scores, tmp_path: Path) -> None:
    """Count, mean, quartiles, median and range of the number each task ranks by, over its scored rows,
    against Python's ``statistics`` on the file read back with pandas."""
    out, _ = scores
    page_path = tmp_path / "r.html"
    _report(out, "-o", page_path)
    page = Page(page_path.read_text(encoding="utf-8"))
    frame = pd.read_parquet(out)
    for task, column in (("memorability", "memorability"), ("quality", "quality"),
                         ("emotion", "emotion_confidence")):  # fmt: skip
        values = frame.loc[frame["error"].isna(), column].dropna().tolist()
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")  # numpy's linear rule
        expected = {"count": len(values), "mean": statistics.fmean(values), "q1": q1, "median": median,
                    "q3": q3, "low": min(values), "high": max(values)}  # fmt: skip
        assert statistics.median(values) == pytest.approx(median, rel=1e-12)
        for stat, want in expected.items():
            value, text = page.stats[(f"task-{task}", stat)]
            assert float(value) == pytest.approx(want, rel=1e-12, abs=1e-15), (task, stat)
            assert text == (str(want) if stat == "count" else f"{float(value):.4f}"), (task, stat)
    assert page.stats[("task-quality", "count")][0] == "6"  # the broken file's row takes no part


def test_histogram_axes_have_ticks_on_the_bars_scale(scores, tmp_path: Path) -> None:
    """Each score tick's position, read on the bars' own scale (the bars span numpy's bin edges), is the
    value its label says; each count tick sits where a bar of that count would end."""
    out, _ = scores
    page_path = tmp_path / "r.html"
    _report(out, "-o", page_path)
    html = page_path.read_text(encoding="utf-8")
    page = Page(html)
    frame = pd.read_parquet(out)
    for column in ("memorability", "quality", "emotion_confidence"):
        svg = f"histogram of {column}"
        values = frame.loc[frame["error"].isna(), column].to_numpy()
        low, high = values.min(), values.max()
        bars = _bar_geometry(html, svg)
        left, width = bars[0][0], bars[-1][0] + bars[-1][2] - bars[0][0]
        x_ticks = page.ticks[(svg, "x-tick")]
        assert len(x_ticks) >= 3, x_ticks
        step = float(x_ticks[1][2]) - float(x_ticks[0][2])
        for x, _, label in x_ticks:
            assert low - 1e-9 <= float(label) <= high + 1e-9
            assert low + (x - left) / width * (high - low) == pytest.approx(
                float(label), abs=abs(step) * 0.02
            )
        counts = page.bars[svg]
        y_ticks = page.ticks[(svg, "y-tick")]
        assert y_ticks[0][2] == "0" and int(y_ticks[-1][2]) >= max(counts)
        tallest = max(range(len(counts)), key=counts.__getitem__)
        _, top_y, _, height = bars[tallest]
        baseline = top_y + height
        per_count = height / counts[tallest]
        for _, y, label in y_ticks:  # a label's baseline sits 4 px below its tick
            assert y - 4 == pytest.approx(baseline - int(label) * per_count, abs=0.02)


def _bar_geometry(html: str, svg: str) -> list[tuple[float, float, float, float]]:
    """(x, y, width, height) of each bar of the histogram labelled ``svg``."""
    found: list[tuple[float, float, float, float]] = []

    class Bars(HTMLParser):
        inside = False

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if tag == "svg":
                self.inside = a.get("aria-label") == svg
            elif tag == "rect" and self.inside and a.get("class") == "bar":
                found.append(tuple(float(a[k] or "nan") for k in ("x", "y", "width", "height")))  # type: ignore[arg-type]

    Bars().feed(html)
    return found


def _thumbs(page: Page, section: str) -> list[str]:
    return [a["alt"] or "" for (s, _), imgs in page.images.items() if s == section for a in imgs
            if a["class"] == "thumb"]  # fmt: skip


def test_a_small_collection_shows_each_image_once_per_section(tmp_path: Path) -> None:
    """5 images, --top 3: no top and bottom sharing images, but all 5 once, highest first; reported from
    two scores files holding the same images (a copy), still once each, top and bottom apart."""
    names = _photos(tmp_path / "photos", [f"{i}.jpg" for i in range(5)])
    paths = [f"photos/{n}" for n in names]
    quality = [0.3, 0.9, 0.1, 0.5, 0.7]
    emotion = ["awe", "awe", "fear", "awe", "fear"]
    confidence = [0.5, 0.9, 0.8, 0.6, 0.4]
    one = _forge(tmp_path, {"path": paths, "quality": quality, "emotion": emotion,
                            "emotion_confidence": confidence}, tmp_path / "one.parquet")  # fmt: skip
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(one.read_bytes())
    _report(one, "-o", tmp_path / "r.html", "--top", "3")
    page = Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert [a["alt"] for a in page.images[("task-quality", "grid all")]] == [
        paths[i] for i in (1, 4, 3, 0, 2)
    ]
    assert ("task-quality", "grid top") not in page.images and (
        "task-quality",
        "grid bottom",
    ) not in page.images
    assert page.stats[("task-quality", "count")][0] == "5"
    _report(one, copy, "-o", tmp_path / "twice.html", "--top", "2")  # 10 rows of 5 images
    page = Page((tmp_path / "twice.html").read_text(encoding="utf-8"))
    for section in ("task-quality", "task-emotion"):
        shown = _thumbs(page, section)
        assert shown and max(Counter(shown).values()) == 1, (section, shown)
    assert [a["alt"] for a in page.images[("task-quality", "grid top")]] == [paths[1], paths[4]]
    assert [a["alt"] for a in page.images[("task-quality", "grid bottom")]] == [paths[2], paths[0]]
    assert page.stats[("task-quality", "count")][0] == "10"  # statistics are of rows, as the histogram
    # emotion: each class's most confident, once (per class: ceil(2 / 4) = 1)
    assert _thumbs(page, "task-emotion") == [paths[1], paths[2]]


def test_a_task_with_nothing_scored_says_so(tmp_path: Path) -> None:
    scores = _forge(tmp_path, {"path": ["a.jpg", "b.jpg"], "quality": [None, None],
                               "error": ["unreadable image: test"] * 2}, tmp_path / "s.parquet")  # fmt: skip
    _report(scores, "-o", tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    page = Page(html)
    assert page.sections == ["summary", "task-quality", "errors", "provenance"]
    assert "No image scored." in html and not page.images and not page.stats
    assert "0 images scored" in html and page.bars == {}


NAMES = ["plain.jpg", "a #1.jpg", "50% off?.jpg", "ünïcödé.jpg", "javascript:alert(1).jpg"]


def test_each_thumbnail_links_to_its_original_relative_to_the_report(tmp_path: Path) -> None:
    """The links are percent-encoded paths relative to the report's folder, and resolve to the very files
    (as a browser resolves them: against the page's URL); a placeholder has no link."""
    photos = tmp_path / "shoot" / "day 1"
    _photos(photos, NAMES)
    paths = [str(photos / n) if i % 2 else f"shoot/day 1/{n}" for i, n in enumerate(NAMES)]  # both kinds
    paths.append("shoot/day 1/gone.jpg")
    scores = _forge(tmp_path, {"path": paths, "memorability": [0.1 * i for i in range(6)]},
                    tmp_path / "s.parquet")  # fmt: skip
    reports = tmp_path / "reports" / "june"
    reports.mkdir(parents=True)
    page_path = reports / "r.html"
    _report(scores, "-o", page_path)
    (shown,) = (
        imgs for (s, _), imgs in Page(page_path.read_text("utf-8")).images.items() if s == "task-memorability"
    )
    links = {a["alt"]: a["link"] for a in shown}
    assert links.pop("shoot/day 1/gone.jpg") is None
    assert len(links) == len(NAMES)
    for alt, link in links.items():
        assert link and link.startswith("../../shoot/day%201/"), link
        assert (
            ":" not in link and "?" not in link and "#" not in link and " " not in link
        )  # nothing but a path
        url = urllib.parse.urljoin(page_path.as_uri(), link)
        target = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
        assert os.path.samefile(target, alt if os.path.isabs(alt) else tmp_path / alt), (link, alt)


def test_a_link_is_a_file_uri_when_only_the_root_is_shared_and_none_for_remote_files(tmp_path: Path) -> None:
    photo = tmp_path / "x y.jpg"
    _photos(tmp_path, [photo.name])
    link = original_link(Row(photo.name, str(tmp_path), 0.5), "/nowhere-else/reports")
    assert link == photo.as_uri() and link.startswith("file:///")
    assert os.path.samefile(urllib.request.url2pathname(urllib.parse.urlparse(link).path), photo)
    assert original_link(Row(photo.name, str(tmp_path), 0.5), str(tmp_path)) == "x%20y.jpg"
    for remote in ("s3://bucket/a.jpg", "tar://00001.jpg::/data/00000.tar", "https://host/a.jpg"):
        assert original_link(Row(remote, str(tmp_path), 0.5), str(tmp_path)) is None


def test_the_default_report_is_beside_the_first_scores_file_and_replaces_only_its_own(tmp_path: Path) -> None:
    _photos(tmp_path / "photos", ["a.jpg"])
    night = tmp_path / "night"
    night.mkdir()
    scores = _forge(tmp_path, {"path": ["photos/a.jpg"], "quality": [0.5]}, night / "scores.parquet")
    csv = tmp_path / "other.csv"
    pd.read_parquet(scores).to_csv(csv, index=False)
    Path(f"{csv}.meta.json").write_text(json.dumps({"perceptscore": "test", "cwd": str(tmp_path)}))
    printed = _report(scores, csv)
    page = night / "scores.html"
    assert printed.strip().endswith(f"-> {page} (0.0 MB)") or f"-> {page} (" in printed, printed
    assert Page(page.read_text("utf-8")).stats[("task-quality", "count")][0] == "2"  # both files
    assert _report(scores) and _report(csv) and (tmp_path / "other.html").is_file()  # again: its own
    mine = tmp_path / "mine.html"
    mine.write_text("<p>my notes</p>")
    theirs = _forge(tmp_path, {"path": ["photos/a.jpg"], "quality": [0.5]}, tmp_path / "mine.parquet")
    done = subprocess.run([EXE, "report", str(theirs)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--overwrite" in done.stderr and len(done.stderr.splitlines()) == 1
    assert mine.read_text() == "<p>my notes</p>"
    assert _report(theirs, "--overwrite") and "perceptscore" in mine.read_text()
    photo = tmp_path / "photos" / "a.jpg"
    done = subprocess.run([EXE, "report", str(photo)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a scores file" in done.stderr, done.stderr
    assert not (tmp_path / "photos" / "a.html").exists()


@pytest.fixture(scope="module")
def many_report(many_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A report of 300 real photos (scores drawn at random: the layout is the point), written in a folder
    of its own; returns (page, the folder the paths are relative to)."""
    rng = np.random.default_rng(7)
    names = sorted(p.name for p in many_photos.iterdir())
    labels = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
    shares = [0.2, 0.05, 0.25, 0.2, 0.05, 0.1, 0.1, 0.05]
    folder = tmp_path_factory.mktemp("many-report")
    scores = _forge(many_photos, {"path": names, "memorability": rng.beta(5, 3, len(names)),
                                  "quality": rng.normal(0.55, 0.12, len(names)),
                                  "emotion": rng.choice(labels, len(names), p=shares),
                                  "emotion_confidence": rng.uniform(0.2, 1.0, len(names))},
                    folder / "scores.parquet")  # fmt: skip
    _report(scores, "--top", "12")
    return folder / "scores.html", many_photos


@pytest.mark.browser
def test_chromium_shows_a_compact_page_with_readable_axes_and_links_to_the_files(
    many_report, tmp_path
) -> None:
    """Laid out by a real browser at 1280 px: statistics beside their histogram, seven or more thumbnails a
    row, tick labels inside their chart and apart; every link, resolved by the browser, is the file. The
    full page is saved as ``report.png`` (look at it when the layout changes)."""
    page, photos = many_report
    with chromium(tmp_path, 1280, 1000) as browser:
        browser.get(page.as_uri())
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        widths = browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
        assert len(widths) == 2 * 24 + 8 * 3 and min(widths) > 0  # top and bottom 12; 3 per class
        for task in ("memorability", "quality", "emotion"):
            stats, chart = browser.execute_script(
                f"const s = document.querySelector('#task-{task}');"
                "return [s.querySelector('table.stats'), s.querySelector('svg')]"
                ".map(e => {const r = e.getBoundingClientRect(); return [r.left, r.top, r.right]})"
            )
            assert stats[2] < chart[0] and abs(stats[1] - chart[1]) < 40, (task, stats, chart)  # side by side
            boxes = browser.execute_script(
                f"const svg = document.querySelector('#task-{task} svg');"
                "const w = svg.viewBox.baseVal.width;"
                "return [w, ...['x-tick', 'y-tick'].map(c => Array.from(svg.querySelectorAll('text.' + c))"
                ".map(t => {const b = t.getBBox(); return [b.x, b.y, b.x + b.width, b.y + b.height]}))]"
            )
            width, x_ticks, y_ticks = boxes
            assert len(x_ticks) >= 3 and len(y_ticks) >= 3
            for a, b in itertools.pairwise(x_ticks):
                assert a[2] + 4 < b[0], (task, x_ticks)  # apart, with room between
            for a, b in itertools.pairwise(y_ticks):
                assert b[3] < a[1], (task, y_ticks)  # upwards, apart
            assert all(b[0] >= 0 and b[2] <= width for b in x_ticks + y_ticks), (task, x_ticks, y_ticks)
        rows = browser.execute_script(
            "return Array.from(document.querySelectorAll('#task-quality .grid.top figure'))"
            ".map(f => f.getBoundingClientRect().top)"
        )
        assert len(rows) == 12 and rows.count(rows[0]) >= 7, rows
        links = browser.execute_script(
            "return Array.from(document.querySelectorAll('figure a'))"
            ".map(a => [a.href, a.querySelector('img').alt])"
        )
        assert len(links) == len(widths)
        for href, alt in links:
            assert href.startswith("file:///"), href
            assert os.path.samefile(
                urllib.request.url2pathname(urllib.parse.urlparse(href).path), photos / alt
            )
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, height + 200)
        (tmp_path / "report.png").write_bytes(browser.get_screenshot_as_png())
