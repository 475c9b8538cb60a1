"""Data-valuation baselines people would use instead of valuekit (numpy only).

`knn_shapley` is the exact Shapley value of each training point for a K-nearest-neighbour
classifier's validation accuracy (Jia et al., "Efficient Task-Specific Data Valuation for
Nearest Neighbor Algorithms", VLDB 2019, Theorem 1), computed by its O(N log N) recursion
per validation point.
"""

from __future__ import annotations

import numpy as np


def knn_shapley(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
                k: int = 10, chunk: int = 256) -> np.ndarray:
    """Shapley value of each training point for the utility "fraction of the K nearest neighbours (among the
    chosen points) that share the validation point's label", averaged over validation points.

    Recursion (Jia et al. 2019, Thm. 1), with training points sorted by distance alpha_1..alpha_N:
        s_N = 1[y_{alpha_N} = y] / N
        s_i = s_{i+1} + (1[y_{alpha_i} = y] - 1[y_{alpha_{i+1}} = y]) / K * min(K, i) / i
    """
    x_train = np.asarray(x_train, dtype=np.float64)
    x_val = np.asarray(x_val, dtype=np.float64)
    n = len(x_train)
    values = np.zeros(n)
    i = np.arange(1, n + 1, dtype=np.float64)
    coef = np.minimum(k, i[:-1]) / i[:-1] / k  # for positions 1..N-1
    sq_train = (x_train ** 2).sum(1)
    for start in range(0, len(x_val), chunk):
        xv, yv = x_val[start:start + chunk], y_val[start:start + chunk]
        dist = sq_train[None, :] - 2 * xv @ x_train.T  # + |xv|^2, constant per row
        order = np.argsort(dist, axis=1, kind="stable")
        match = (y_train[order] == yv[:, None]).astype(np.float64)  # (m, N) in distance order
        s = np.empty_like(match)
        s[:, -1] = match[:, -1] / n
        # s_i = s_{i+1} + (match_i - match_{i+1}) * coef_i, accumulated from the far end
        steps = (match[:, :-1] - match[:, 1:]) * coef[None, :]
        s[:, :-1] = s[:, -1:] + np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]
        np.add.at(values, order.ravel(), s.ravel())
    return values / len(x_val)


def knn_utility(subset: np.ndarray, x_train, y_train, xv, yv, k: int) -> float:
    """Utility of a subset of training rows for one validation point (used to check `knn_shapley`)."""
    if len(subset) == 0:
        return 0.0
    d = ((x_train[subset] - xv) ** 2).sum(1)
    nearest = subset[np.argsort(d, kind="stable")[:k]]
    return float((y_train[nearest] == yv).sum()) / k
