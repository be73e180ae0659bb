"""Evaluation metrics: SRCC and PLCC (scipy) for scores, accuracy and per-class accuracy for emotions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def regression(pred: Sequence[float], target: Sequence[float]) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(t) == 0:
        return {"srcc": float("nan"), "plcc": float("nan"), "n": len(p)}
    return {"srcc": float(spearmanr(p, t).statistic), "plcc": float(pearsonr(p, t).statistic), "n": len(p)}


def classification(pred: Sequence[int], target: Sequence[int], classes: Sequence[str]) -> dict[str, float]:
    p, t = np.asarray(pred, dtype=np.int64), np.asarray(target, dtype=np.int64)
    result: dict[str, float] = {"accuracy": float((p == t).mean()) if len(t) else float("nan"), "n": len(t)}
    for i, name in enumerate(classes):
        of_class = t == i
        result[f"accuracy_{name}"] = float((p[of_class] == i).mean()) if of_class.any() else float("nan")
    return result


def primary(metrics: dict[str, float]) -> tuple[str, float]:
    """The number that picks the best epoch: SRCC for scores, accuracy for classes."""
    key = "accuracy" if "accuracy" in metrics else "srcc"
    return key, metrics[key]
