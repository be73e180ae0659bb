"""Reading a safetensors file's header without torch (for provenance and the zero-copy loader)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from perceptscore.errors import CheckpointError

_MAX_HEADER = 100 << 20  # safetensors' own limit on the header: 100 MB


def safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (8-byte length, then JSON) and the offset where its tensor data starts.
    A damaged file (a length past the file's end, JSON that is not an object) is a one-line error."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file (its header length {length} does not fit)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, 8 + length


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, tensors unread."""
    return safetensors_header(path)[0].get("__metadata__") or {}
