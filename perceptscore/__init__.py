"""perceptscore: score images for memorability, quality and emotion with PerceptCLIP.

``import perceptscore`` stays light (no torch) so the CLI starts instantly; the heavy names are
imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from perceptscore._version import __version__

if TYPE_CHECKING:
    from perceptscore.checkpoints import load_model
    from perceptscore.explain import Explainer
    from perceptscore.model import PerceptModel
    from perceptscore.scorer import Scorer

__all__ = ["Explainer", "PerceptModel", "Scorer", "__version__", "load_model"]

_LAZY = {
    "Explainer": "perceptscore.explain",
    "load_model": "perceptscore.checkpoints",
    "PerceptModel": "perceptscore.model",
    "Scorer": "perceptscore.scorer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'perceptscore' has no attribute {name!r}")
