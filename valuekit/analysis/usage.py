"""Source usage by training step: the "language usage by training step" figure of DDS (Wang et al.,
ICML 2020, Algorithm 2 experiments; MultiDDS).

`source_usage` reads a run directory's `sources/` parts (written by multi-source methods at each scorer
update: step, source, prob, count) and returns each source's share per logged step. Runs without
`sources/` (e.g. uniform) fall back to the per-row `steps/` log for `by="count"`.
"""

from __future__ import annotations


import numpy as np
import pandas as pd

from valuekit.errors import InputError
from valuekit.runlog import open_run

BY = ("prob", "count")



def source_usage(run, *, by: str = "prob") -> pd.DataFrame:
    """DataFrame[step, source, share]: per logged step, each source's share of the scorer probability
    (`by="prob"`: mean p(S | y) normalised to sum 1 over sources) or of the rows drawn since the previous
    log (`by="count"`). Shares sum to 1 at every step; rows are sorted by step then source."""
    if by not in BY:
        raise InputError(f"source_usage by={by!r}: use 'prob' or 'count'")
    r = open_run(run)
    t = r.table("sources", ["step", "source", "prob", "count"])
    if t is None:
        if by == "count":
            steps = r.steps(["step", "source"])
            if steps is not None and steps.num_rows and steps.column("source").null_count < steps.num_rows:
                frame = steps.to_pandas().dropna(subset=["source"])
                frame = frame.groupby(["step", "source"]).size().rename("value").reset_index()
                return _shares(frame)
        raise InputError(f"{r.path}: no sources/ log (only multi-source methods such as multidds write one)"
                         + ("" if by == "count" else "; by='count' can use steps/ when the table has sources"))
    frame = t.to_pandas().rename(columns={by: "value"})[["step", "source", "value"]]
    frame["value"] = frame["value"].astype(float)
    return _shares(frame)


def _shares(frame: pd.DataFrame) -> pd.DataFrame:
    total = frame.groupby("step")["value"].transform("sum")
    share = np.where(total > 0, frame["value"] / total.where(total > 0, 1.0), np.nan)
    out = pd.DataFrame({"step": frame["step"].astype("int64"), "source": frame["source"].astype(str),
                        "share": share.astype(float)})
    return out.sort_values(["step", "source"], ignore_index=True)


def plot_source_usage(frame: pd.DataFrame, *, ax=None, title: str | None = None):
    """Stacked area plot of each source's share by training step (the paper's language-usage figure);
    returns the Axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    wide = frame.pivot_table(index="step", columns="source", values="share", aggfunc="mean").fillna(0.0)
    if len(wide):
        n = len(wide.columns)
        # tab10 repeats after ten sources; tab20 keeps up to twenty apart
        colors = plt.get_cmap("tab10" if n <= 10 else "tab20").colors[:n] if n <= 20 else None
        ax.stackplot(wide.index.to_numpy(), wide.to_numpy().T, labels=[str(c) for c in wide.columns], alpha=0.85,
                     colors=colors)
        ax.set_xlim(wide.index.min(), wide.index.max())
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("share")
    if title:
        ax.set_title(title)
    if len(wide.columns):
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)
    return ax
