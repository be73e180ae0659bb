"""What a scores file holds besides its rows: typed columns and provenance. No torch: a run's lock and
resumable state are set up before any model loads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from perceptscore._version import __version__
from perceptscore.hub import Weights, file_sha256
from perceptscore.tasks import Task


def output_schema(tasks: Sequence[Task], passthrough: pa.Schema | None = None) -> pa.Schema:
    """The columns of a scores file for these tasks, typed, then the manifests' passthrough columns."""
    fields = [pa.field("path", pa.string())]
    for task in tasks:
        fields += [
            pa.field(c, pa.string() if c == task.name and task.labels else pa.float64()) for c in task.columns
        ]
    fields += [
        pa.field("error", pa.string()),
        pa.field("file_size", pa.int64()),
        pa.field("file_mtime_ns", pa.int64()),
    ]
    return pa.schema(fields + list(passthrough or []))


def safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (8-byte length, then JSON) and the offset where its tensor data starts."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length)), 8 + length


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, tensors unread."""
    return safetensors_header(path)[0].get("__metadata__") or {}


def _source(path: Path) -> dict[str, str]:
    """For a converted file: the release file it came from and that file's sha256."""
    if path.suffix.lower() != ".safetensors":
        return {}
    metadata = safetensors_metadata(path)
    return {"source": metadata.get("source", ""), "source_sha256": metadata.get("source_sha256", "")}


def provenance(
    tasks: Sequence[Task], weights: dict[str, Weights], device: str, precision: str, fast_decode: bool
) -> dict[str, Any]:
    """What produced a scores file: version, each task's weights (path, origin, sha256), device, precision."""
    return {
        "perceptscore": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "precision": precision,
        "fast_decode": fast_decode,
        "tasks": {
            t.name: {
                "checkpoint": str(weights[t.name].path),
                "origin": weights[t.name].origin,
                "sha256": file_sha256(weights[t.name].path),
                **_source(weights[t.name].path),
                "preprocessing": t.preprocess.describe(),
                **({"labels": list(t.labels), "labels_note": "index order assumed"} if t.labels else {}),
            }
            for t in tasks
        },
    }
