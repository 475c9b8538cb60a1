"""Value of a subset, the torch-free half: the top-by-value row ids and the summary and plot of
``RUN_DIR/subset_value.parquet`` (columns ``fraction, selection, seed, test_acc, size``).

The evaluation itself trains fresh models on top-f subsets, so it lives outside the analysis layer:
`valuekit.bench.retrain.subset_value` (Das et al., HOST-CP, ECML-PKDD 2021, Sec. 5).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from valuekit.errors import InputError

COLUMNS = ("fraction", "selection", "seed", "test_acc", "size")


def values_of(run) -> tuple[pd.DataFrame, object | None]:
    """(values frame with example_id/value, the Run or None) for a run dir, Run or DataFrame."""
    if isinstance(run, pd.DataFrame):
        for col in ("example_id", "value"):
            if col not in run.columns:
                raise InputError(f"values DataFrame: missing column {col!r} (columns: {list(run.columns)[:12]})")
        return run, None
    from valuekit.runs.reader import open_run

    r = open_run(run)
    return r.values(), r


def top_ids(values: pd.DataFrame, size: int) -> np.ndarray:
    """The example_ids of the `size` highest values (NaN last, ties in table order)."""
    v = values["value"].to_numpy(dtype=np.float64)
    order = np.lexsort((np.arange(len(v)), -np.nan_to_num(v, nan=-np.inf)))
    return values["example_id"].to_numpy()[order[:size]]


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and std of test accuracy over seeds, one row per (fraction, selection)."""
    g = frame.groupby(["fraction", "selection"], sort=True)["test_acc"]
    return g.agg(mean="mean", std="std", seeds="count").reset_index()


def plot_subset_value(frame: pd.DataFrame, *, ax=None):
    """Test accuracy (mean over seeds, error bar = std) against subset fraction, one line per selection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    summ = summarise(frame)
    order = ["value", "random"] + sorted(set(summ["selection"]) - {"value", "random"})
    for name in order:
        part = summ[summ["selection"] == name].sort_values("fraction")
        if part.empty:
            continue
        ax.errorbar(part["fraction"] * 100, part["mean"], yerr=part["std"].fillna(0), marker="o", capsize=3,
                    label="top by value" if name == "value" else name)
    ax.set_xlabel("training subset (% of rows)")
    ax.set_ylabel("test accuracy")
    ax.set_title("value of a subset")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return ax
