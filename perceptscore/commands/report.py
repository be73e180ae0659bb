"""``perceptscore report``: one self-contained HTML page from scores files (and ``score --report``)."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from perceptscore._version import __version__
from perceptscore.errors import UsageError
from perceptscore.folders import check_output_folder
from perceptscore.replacing import refuse_replacing
from perceptscore.report import ReportData, Row, TaskSection, check_scores_file, gather
from perceptscore.safety import refuse_overwriting_an_input
from perceptscore.sinks import write_atomic

SUFFIXES = (".html", ".htm")


@dataclass
class Shown:
    """How a row is drawn: its thumbnail (or the placeholder, with why), its heatmap (``--explain``), and
    the link to its original (``original_link``; none under a placeholder)."""

    src: str
    note: str = ""
    heatmap: str | None = None
    href: str | None = None


@dataclass
class Written:
    out: str
    data: ReportData
    size: int  # bytes


def check_report_output(out: str, inputs: Sequence[str], overwrite: bool = False) -> None:
    """Fail before any work on a report name that is not an .html file we may write (an existing file
    only if it is an earlier report, or with ``overwrite``)."""
    if Path(out).suffix.lower() not in SUFFIXES:
        raise UsageError(f"report {out!r}: name an .html file")
    if os.path.isdir(out):
        raise UsageError(f"report {out!r} is a folder: name the file to write")
    check_output_folder(out)
    refuse_overwriting_an_input(out, inputs)
    refuse_replacing(out, "report", overwrite, option="report")


def default_report_name(scores: Sequence[str]) -> str:
    """Beside the first scores file, under its name: ``night/scores.csv`` -> ``night/scores.html``."""
    if not scores:
        raise UsageError("name the scores files to report on")
    check_scores_file(scores[0])  # a photo named by mistake is told so, not given a page beside it
    return str(Path(scores[0]).with_suffix(".html"))


def original_link(row: Row, folder: str) -> str | None:
    """Where a thumbnail links: the original file, as a path relative to the report's ``folder`` when the
    two share a folder below the file system's root (the page and the photos can then move together), else
    a ``file://`` URI; percent-encoded, so no name reads as a scheme or a query. None for a remote file or
    a tar member: the page fetches nothing."""
    from perceptscore.thumbnails import local_path

    local = local_path(row.path, row.root)
    if local is None:
        return None
    target, here = os.path.abspath(local), os.path.abspath(folder)
    try:
        common = os.path.commonpath([target, here])
    except ValueError:  # another drive (Windows): no relative path between them
        common = ""
    if not common or os.path.dirname(common) == common:  # nothing in common but the root
        return Path(target).as_uri()
    return urllib.parse.quote(os.fsencode(Path(os.path.relpath(target, here)).as_posix()))


def report(
    scores: Sequence[str],
    out: str | None = None,
    top: int = 24,
    explain: bool = False,
    checkpoints: Mapping[str, str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
) -> Written:
    """Write the report of ``scores`` (files written by ``perceptscore score``) to ``out`` (by default
    ``default_report_name``), atomically. ``explain``: a heatmap beside each image shown (the model runs on
    those images only)."""
    out = out or default_report_name(scores)
    check_report_output(out, scores, overwrite)
    data = gather(scores, top)
    folder = os.path.dirname(os.path.abspath(out))
    pictures = _Pictures(data, folder, explain, dict(checkpoints or {}), device, precision)
    html = render(data, pictures.shown)
    write_atomic(Path(out), html.encode("utf-8"))
    return Written(out, data, len(html.encode("utf-8")))


def displayed(value: Any) -> Any:
    """Every value the page prints, on its way in (jinja's ``finalize``): text is redacted and its control,
    bidi and zero-width characters escaped (``_text.shown``: paths and errors are user data and may hold
    credentials). ``Markup`` goes as it is: the pictures' ``data:`` URIs (``Shown``: ours, base64) and a
    macro's output (its values passed here when the macro was rendered)."""
    from markupsafe import Markup

    from perceptscore._text import shown

    if isinstance(value, str) and not isinstance(value, Markup):
        return shown(value)
    return value


def caption_parts(path: str) -> tuple[str, str]:
    """A caption's two lines: where the file is (its folder, or a tar member's shard) and its name. Split
    after ``displayed``'s redaction: a presigned URL's query may hold a "/", and no piece of it may show."""
    text = str(displayed(path))
    if text.startswith("tar://") and "::" in text:  # tar://member::shard
        member, _, shard = text[len("tar://") :].partition("::")
        return f"{shard} ›", member
    cut = text.rfind("/") + 1  # not at a backslash: a POSIX name may hold one (and escapes do)
    return text[:cut], text[cut:]


def render(data: ReportData, shown: Any) -> str:
    """The page, from the package's template; every value is escaped (paths are user data) and passes
    ``displayed``."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("perceptscore", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        finalize=displayed,
    )
    written = datetime.now(timezone.utc).isoformat(timespec="seconds")
    template = env.get_template("report.html.j2")
    return template.render(data=data, shown=shown, parts=caption_parts, version=__version__, written=written)


class _Pictures:
    """Thumbnails (each file decoded once for all tasks) and, with ``explain``, heatmaps per task."""

    def __init__(
        self,
        data: ReportData,
        folder: str,
        explain: bool,
        checkpoints: dict[str, str],
        device: str,
        precision: str,
    ) -> None:
        self.folder = folder  # the report's: links to originals are relative to it
        self.explain, self.checkpoints, self.device, self.precision = explain, checkpoints, device, precision
        self.recorded: dict[str, dict[str, str]] = {
            t: w for _, about in data.provenance for t, w in (about.get("tasks") or {}).items()
        }
        self.thumbnails: dict[tuple[str, str], tuple[str, str]] = {}
        self.heatmaps: dict[tuple[str, str, str, str | None], str | None] = {}
        self.explainers: dict[str, Any] = {}

    def shown(self, section: TaskSection, row: Row) -> Shown:
        from perceptscore.thumbnails import open_upright, placeholder, thumbnail

        key = (row.path, row.root)
        if key not in self.thumbnails:
            image, why = open_upright(row.path, row.root, row.stat)
            self.thumbnails[key] = (thumbnail(image), "") if image is not None else (placeholder(), why)
        from markupsafe import Markup

        src, note = self.thumbnails[key]
        heatmap = self._heatmap(section, row) if self.explain and not note else None
        href = original_link(row, self.folder) if not note else None  # the link of the picture drawn
        # our own data: URIs, marked so that ``displayed`` leaves them whole (a path never is Markup)
        return Shown(Markup(src), note, Markup(heatmap) if heatmap else None, href)

    def _heatmap(self, section: TaskSection, row: Row) -> str | None:
        from perceptscore.heatmap import overlay
        from perceptscore.thumbnails import SIDE, data_uri, open_upright

        key = (section.task.name, row.path, row.root, row.label)
        if key not in self.heatmaps:
            # as scored: no draft decoding; and checked again, as the thumbnail was: the very file scored
            image, _ = open_upright(row.path, row.root, row.stat, draft=None)
            if image is None:
                self.heatmaps[key] = None
                return None
            explained = self._explainer(section.task.name).explain(image, row.label)
            self.heatmaps[key] = data_uri(overlay(image, explained.display, max_side=SIDE))
        return self.heatmaps[key]

    def _explainer(self, task: str) -> Any:
        """The task's model: ``--checkpoint``, else the weights that scored the file (when still there),
        else the task's weights as ``score`` resolves them."""
        if task not in self.explainers:
            from perceptscore.explain import Explainer

            checkpoint = self.checkpoints.get(task) or _verified(self.recorded.get(task) or {})
            self.explainers[task] = Explainer(task, checkpoint, self.device, self.precision)
        return self.explainers[task]


def _verified(weights: Mapping[str, str]) -> str | None:
    """The checkpoint a provenance names, when it is still there and its sha256 is the one recorded; else
    None (the task's weights as ``score`` resolves them). A scores file is data: one forged or gone stale
    must not choose which file the model is loaded from."""
    from perceptscore.hub import file_sha256

    path, sha256 = weights.get("checkpoint"), weights.get("sha256")
    if not path or not sha256 or not os.path.isfile(path):
        return None
    try:
        return path if file_sha256(path) == sha256 else None
    except OSError:
        return None
