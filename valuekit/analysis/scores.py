"""What a mislabel audit is built from, for class and instruction tables alike: each run's signals rescaled
(`run_score`) and combined into `label_score`, percentile ranks, the flag rules, and the runs opened and named as
audit columns. The audits themselves are `valuekit.analysis.mislabel` and `valuekit.analysis.instruction_audit`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.errors import InputError, RunDirError


def _pct_rank(v: np.ndarray) -> np.ndarray:
    """(rank - 1) / (n - 1) with ties averaged; NaN stays NaN."""
    s = pd.Series(v)
    n = int(s.notna().sum())
    r = s.rank(method="average").to_numpy()
    return (r - 1) / (n - 1) if n > 1 else np.where(np.isnan(r), np.nan, 0.5)


def mean_pct_rank(values) -> np.ndarray:
    """Mean over runs (columns) of the percentile rank of the value; NaN counts as 1/2."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[:, None] if arr.ndim == 1 else arr
    return np.mean([np.nan_to_num(_pct_rank(arr[:, j]), nan=0.5) for j in range(arr.shape[1])], axis=0)


def signal_columns(vals: pd.DataFrame) -> dict[str, np.ndarray]:
    """The detection signals of one run's values (higher = more valuable): value, -mean_loss, aum (those present)."""
    out = {"value": vals["value"].to_numpy(dtype=np.float64)}
    if "mean_loss" in vals and vals["mean_loss"].notna().any():
        out["neg_mean_loss"] = -vals["mean_loss"].to_numpy(dtype=np.float64)
    if "aum" in vals and vals["aum"].notna().any():
        out["aum"] = vals["aum"].to_numpy(dtype=np.float64)
    return out


def label_score(values: pd.DataFrame | np.ndarray) -> np.ndarray:
    """Mean over runs (columns) of `run_score`; in [0, 1], lower = more likely mislabelled."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    return np.mean([run_score(arr[:, j]) for j in range(arr.shape[1])], axis=0)


def two_means_split(x) -> np.ndarray:
    """Boolean mask of the lower cluster of the optimal 1-D k-means with k = 2.

    In one dimension the optimal clusters are contiguous in sorted order, so the exact
    optimum is the split point minimising the summed within-cluster squared error,
    found with prefix sums in O(n log n). NaN counts as the median; no split (all False)
    when all values are equal.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        return np.zeros(n, dtype=bool)
    if np.isnan(x).any():
        x = np.where(np.isnan(x), np.nanmedian(x) if np.isfinite(x).any() else 0.0, x)
    sx = np.sort(x)
    s = sx - x.mean()  # centring keeps the prefix-sum differences accurate
    if sx[0] == sx[-1]:
        return np.zeros(n, dtype=bool)
    c1, c2 = np.cumsum(s), np.cumsum(s * s)
    j = np.arange(1, n)
    left = c2[j - 1] - c1[j - 1] ** 2 / j
    right = (c2[-1] - c2[j - 1]) - (c1[-1] - c1[j - 1]) ** 2 / (n - j)
    total = np.where(sx[j - 1] < sx[j], left + right, np.inf)  # split only between distinct values
    return x <= sx[int(np.argmin(total))]


def fraction_split(x, fraction: float) -> np.ndarray:
    """Boolean mask of the round(fraction * n) lowest values (stable order for ties)."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=np.inf)
    k = int(round(fraction * len(x)))
    mask = np.zeros(len(x), dtype=bool)
    mask[np.argsort(x, kind="stable")[:k]] = True
    return mask


def open_runs(run_dirs) -> list:
    """Open run directories (paths or Run objects), refusing ones without values.parquet."""
    from valuekit.runs.reader import Run, open_run

    if isinstance(run_dirs, (str, Path, Run)):
        run_dirs = [run_dirs]
    runs = [open_run(r).check() for r in run_dirs]
    if not runs:
        raise InputError("no run directory given")
    for r in runs:
        # An unfinished run (killed, interrupted) is audited from its step log; see Run.values().
        if r.values() is None:
            raise RunDirError(f"{r.path}: no values.parquet and no step log (status {r.meta.get('status', '?')!r}); "
                              f"finish or resume the run first")
    prints = {r.meta.get("data", {}).get("train", {}).get("fingerprint") for r in runs}
    if len(prints - {None}) > 1:
        raise InputError(f"runs were trained on different training tables (fingerprints {sorted(prints - {None})}); "
                         f"audit runs of the same data together")
    return runs


def run_columns(runs) -> list[str]:
    """Unique column suffixes for the runs (their names, with _2, _3 for repeats)."""
    names, seen = [], {}
    for r in runs:
        base = str(r.name)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def table_path(run) -> Path:
    raw = (run.meta.get("data", {}).get("train") or {}).get("path")
    if not raw:
        raise InputError(f"{run.meta_path}: data.train.path is empty (trained from a DataFrame); "
                         f"pass --data TABLE")
    p = Path(raw)
    for cand in (p, run.path / p, run.path.parent / p):
        if cand.exists():
            return cand
    raise InputError(f"{run.meta_path}: training table {raw!r} (data.train.path) not found; pass --data TABLE")


def _plain(v):
    """numpy scalars as plain Python values (messages show 0, not np.int64(0))."""
    return v.item() if isinstance(v, np.generic) else v


def _aligned(run, column_ids: np.ndarray, index: pd.Index, name: str) -> pd.DataFrame:
    vals = run.values()
    partial = vals.attrs.get("partial", False)
    vals = vals.set_index(vals["example_id"].to_numpy(dtype=column_ids.dtype))
    missing = index.difference(vals.index)
    if len(missing) and not partial:  # a partial run has simply not seen every row yet
        raise InputError(f"{run.values_path}: has no value for training id {_plain(missing[0])!r} "
                         f"({len(missing)} ids missing); was the run trained on this table? ({name})")
    return vals.reindex(index)


def run_score(v) -> np.ndarray:
    """u_s of the module docstring: one signal rescaled between its 1st and 99th percentiles; the rows beyond them
    keep their order inside the outer 1 % of [0, 1] (by rank), so the most suspicious rows are not tied."""
    v = np.asarray(v, dtype=np.float64)
    finite = np.isfinite(v)
    out = np.full(len(v), 0.5)
    if finite.sum() < 2:
        return out
    f = v[finite]
    lo, hi = np.quantile(f, [0.01, 0.99])
    if hi <= lo:
        lo, hi = f.min(), f.max()
    if hi <= lo:
        return out
    below, above = f < lo, f > hi
    a = TAIL if below.any() else 0.0
    b = 1.0 - TAIL if above.any() else 1.0
    u = a + (b - a) * (np.clip(f, lo, hi) - lo) / (hi - lo)
    r = pd.Series(f).rank(method="average").to_numpy()  # 1 = smallest
    if below.any():  # the lowest rows rank 1..n_below: u in [0, TAIL)
        u[below] = TAIL * (r[below] - 1) / below.sum()
    if above.any():  # the highest: u in (1 - TAIL, 1]
        u[above] = 1.0 - TAIL * (len(f) - r[above]) / above.sum()
    out[finite] = u
    return out


TAIL = 0.01  # share of [0, 1] that run_score gives to each tail beyond the 1st / 99th percentile
