"""From values to what export and values.parquet show: rank 1 = highest value (NaN last), and weights
normalised to mean 1. Torch-free, used by the loop and by export."""

from __future__ import annotations

import numpy as np


def rank_by_value(value) -> np.ndarray:
    """Rank of each row, 1 = highest value; ties keep row order and NaN (never valued) ranks last."""
    order = np.argsort(-np.asarray(value, dtype=np.float64), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    return rank


def mean_one(weight) -> np.ndarray:
    """Weights scaled to mean 1 over the rows (all ones when they sum to zero)."""
    w = np.asarray(weight, dtype=np.float64)
    total = w.sum()
    return w * (len(w) / total) if total > 0 else np.ones(len(w))
