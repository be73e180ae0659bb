"""What produced a scores file: version, each task's weights (path, origin, sha256), device, precision,
preprocessing, the run's limits (``limits.Limits``: a file's error row may be one of them). Written into
parquet metadata or a ``<out>.meta.json`` sidecar (see ``formats``). No torch."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from perceptscore._safetensors import safetensors_metadata
from perceptscore._version import __version__
from perceptscore.tasks import get_task


def _source(path: Path) -> dict[str, str]:
    """For a converted file: the release file it came from and that file's sha256."""
    if path.suffix.lower() != ".safetensors":
        return {}
    metadata = safetensors_metadata(path)
    return {"source": metadata.get("source", ""), "source_sha256": metadata.get("source_sha256", "")}


def provenance(plan: Any, device: str | None = None) -> dict[str, Any]:
    """The provenance of a run of ``plan`` (a ``ScoringPlan``); ``device`` overrides how the device is
    described (e.g. "2 processes on cpu")."""
    tasks = {}
    for w in plan.weights:
        task = get_task(w.task)
        tasks[task.name] = {
            "checkpoint": w.path,
            "origin": w.origin,
            "sha256": w.sha256,
            **_source(Path(w.path)),
            "preprocessing": task.preprocess.describe(),
            **({"labels": list(task.labels), "labels_note": "index order assumed"} if task.labels else {}),
        }
    return {
        "perceptscore": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device or plan.device,
        "precision": plan.precision,
        "fast_decode": plan.fast_decode,
        "decode": plan.decode,  # where JPEGs were decoded: cpu (Pillow, in workers) or gpu (tv_decode)
        "cwd": plan.cwd,  # relative paths in the rows are relative to it (filter --copy-to reads them)
        "tasks": tasks,
        "limits": plan.limits.to_dict(),  # never the storage options: they are not in a plan
    }
