"""Reading a safetensors file's header without torch (for provenance and the zero-copy loader)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (8-byte length, then JSON) and the offset where its tensor data starts."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length)), 8 + length


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, tensors unread."""
    return safetensors_header(path)[0].get("__metadata__") or {}
