"""Source usage by training step: the "language usage by training step" figure of DDS (Wang et al.,
ICML 2020, Algorithm 2 experiments; MultiDDS).

`source_usage` reads a run directory's `sources/` parts (written by multi-source methods at each scorer
update: step, source, prob, count, reward, reward_se) and returns each source's share per logged step. Runs
without `sources/` (e.g. uniform) fall back to the per-row `steps/` log for `by="count"`. `source_rewards`
returns the per-update reward and its standard error, `source_table` the run's `sources.parquet` (final
probability, mean reward, rows per source); `plot_source_probs` and `plot_source_rewards` draw the usage
curves with reward error bars.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from valuekit.errors import InputError
from valuekit.runs.reader import open_run

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


def _axes(ax):
    """(ax or a new 6 x 3.5 in Axes, pyplot) on the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    return ax, plt


def _finish(ax, ylabel: str, title: str | None, *, legend: bool):
    """The labels, title and outside legend every source-usage panel shares; returns the Axes."""
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)
    return ax


def plot_source_usage(frame: pd.DataFrame, *, ax=None, title: str | None = None):
    """Stacked area plot of each source's share by training step (the paper's language-usage figure);
    returns the Axes."""
    ax, plt = _axes(ax)
    wide = frame.pivot_table(index="step", columns="source", values="share", aggfunc="mean").fillna(0.0)
    if len(wide):
        n = len(wide.columns)
        # tab10 repeats after ten sources; tab20 keeps up to twenty apart
        colors = plt.get_cmap("tab10" if n <= 10 else "tab20").colors[:n] if n <= 20 else None
        ax.stackplot(wide.index.to_numpy(), wide.to_numpy().T, labels=[str(c) for c in wide.columns], alpha=0.85,
                     colors=colors)
        ax.set_xlim(wide.index.min(), wide.index.max())
    ax.set_ylim(0, 1)
    return _finish(ax, "share", title, legend=len(wide.columns) > 0)


def source_rewards(run, *, max_points: int | None = None) -> pd.DataFrame:
    """DataFrame[step, source, reward, reward_se]: every scorer update's reward per source and its standard
    error (rows where the update observed the source). With `max_points`, the updates of each source are
    grouped into at most that many consecutive bins: step = the bin's last step, reward = mean, reward_se =
    sqrt(sum se^2) / n (the standard error of the mean of independent estimates). Empty for runs that logged
    no reward (fixed scorers, runs written before rewards were logged)."""
    r = open_run(run)
    cols = ["step", "source", "reward", "reward_se"]
    d = r.dataset("sources")
    if d is None or "reward" not in d.schema.names:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "step" else "float64" if c != "source" else object)
                             for c in cols})
    frame = d.to_table(columns=cols).to_pandas().dropna(subset=["reward"])
    frame = frame.sort_values(["source", "step"], ignore_index=True)
    if max_points is not None and len(frame):
        parts = []
        for src, g in frame.groupby("source", sort=True):
            b = np.arange(len(g)) * min(max_points, len(g)) // len(g)
            agg = g.assign(bin=b, se2=g["reward_se"] ** 2).groupby("bin").agg(
                step=("step", "max"), reward=("reward", "mean"), se2=("se2", "sum"), n=("reward", "size"))
            parts.append(
                pd.DataFrame(
                    {
                        "step": agg["step"].to_numpy(),
                        "source": src,
                        "reward": agg["reward"].to_numpy(),
                        "reward_se": np.sqrt(agg["se2"].to_numpy()) / agg["n"].to_numpy(),
                    }
                )
            )
        frame = pd.concat(parts, ignore_index=True)
    frame["step"] = frame["step"].astype("int64")
    return frame[cols].sort_values(["step", "source"], ignore_index=True)


def source_table(run) -> pd.DataFrame:
    """The run's sources.parquet (one row per source: prob, logit, uniform_prob, mean_reward, reward_se,
    updates, rows, drawn, is_target), sorted by prob, highest first."""
    r = open_run(run)
    t = r.source_table()
    if t is None:
        raise InputError(f"{r.path}: no sources.parquet (only finished runs of multi-source methods such as "
                         "multidds write one)")
    return t.sort_values("prob", ascending=False, ignore_index=True)


def _colors(sources) -> dict:
    """One colour per source, stable across panels (tab10 up to ten sources, tab20 up to twenty)."""
    import matplotlib.pyplot as plt

    names = sorted(map(str, sources))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {s: cmap(i % cmap.N) for i, s in enumerate(names)}


def plot_source_probs(frame: pd.DataFrame, *, ax=None, title: str | None = None, highlight=()):
    """One line per source: its scorer probability (frame from `source_usage(run)`: step, source, share) by
    training step; sources in `highlight` (e.g. the target) drawn thicker. Returns the Axes."""
    ax = _axes(ax)[0]
    colors = _colors(frame["source"].unique())
    for src, g in frame.groupby("source", sort=True):
        g = g.sort_values("step")
        ax.plot(g["step"].to_numpy(), g["share"].to_numpy(), color=colors[str(src)], label=str(src),
                lw=2.5 if src in highlight else 1.2)
    return _finish(ax, "scorer probability", title, legend=len(frame) > 0)


def plot_source_rewards(frame: pd.DataFrame, *, ax=None, title: str | None = None):
    """Each source's reward by training step with +-1 standard error bars (frame from `source_rewards`).
    Returns the Axes; one errorbar container per source, in sorted source order."""
    ax = _axes(ax)[0]
    colors = _colors(frame["source"].unique())
    for src, g in frame.groupby("source", sort=True):
        g = g.sort_values("step")
        ax.errorbar(g["step"].to_numpy(), g["reward"].to_numpy(), yerr=g["reward_se"].fillna(0).to_numpy(),
                    color=colors[str(src)], label=str(src), lw=1, marker=".", ms=3, capsize=2, elinewidth=0.8)
    ax.axhline(0.0, color="0.6", lw=0.8)
    return _finish(ax, "reward (+-1 s.e.)", title, legend=len(frame) > 0)


def task_weights(run, *, bins: int = 50) -> pd.DataFrame | None:
    """Per task (the steps/ `source` column: an instruction table's task) and step bin: `share` of the rows drawn
    in the bin and the rows' mean `weight` (the weight the method gave them in training), from one pyarrow scan of
    the step log; DataFrame[step, source, share, weight] (step = the bin's last step), None without a task column."""
    import pyarrow.compute as pc

    from valuekit.analysis.curves import _bin_end, _bin_expr, last_step

    r = open_run(run)
    d = r.dataset("steps")
    if d is None or "source" not in d.schema.names:
        return None
    last = max(last_step(r), 1)
    bins = max(1, min(bins, last))
    t = d.to_table(columns={"bin": _bin_expr(last, bins), "source": pc.field("source"), "weight": pc.field("weight")})
    t = t.filter(pc.is_valid(t.column("source")))
    if not t.num_rows:
        return None
    g = t.group_by(["bin", "source"]).aggregate([("weight", "mean"), ([], "count_all")]).to_pandas()
    g["share"] = g["count_all"] / g.groupby("bin")["count_all"].transform("sum")
    out = pd.DataFrame({"step": _bin_end(g["bin"].to_numpy(), last, bins).astype("int64"),
                        "source": g["source"].astype(str), "share": g["share"].astype(float),
                        "weight": g["weight_mean"].astype(float)})
    return out.sort_values(["step", "source"], ignore_index=True)


def task_table(run) -> pd.DataFrame | None:
    """One row per task: rows of the table that were drawn, share of all draws, mean weight while training (over
    its draws) and mean final weight (values.parquet) of its rows; None without a task column in steps/."""
    import pyarrow.compute as pc

    r = open_run(run)
    d = r.dataset("steps")
    if d is None or "source" not in d.schema.names:
        return None
    t = d.to_table(columns=["example_id", "source", "weight"])
    t = t.filter(pc.is_valid(t.column("source")))
    if not t.num_rows:
        return None
    draws = t.group_by("source").aggregate([("weight", "mean"), ([], "count_all"),
                                            ("example_id", "count_distinct")]).to_pandas()
    rows = t.group_by("example_id").aggregate([("source", "min")]).to_pandas()
    vals = r.values()
    final = None
    if vals is not None:
        m = rows.merge(vals[["example_id", "weight"]], on="example_id", how="left")
        final = m.groupby("source_min")["weight"].mean()
    out = pd.DataFrame({"task": draws["source"].astype(str), "rows_seen": draws["example_id_count_distinct"],
                        "share_of_draws": draws["count_all"] / draws["count_all"].sum(),
                        "mean_weight_in_training": draws["weight_mean"].astype(float)})
    out["final_weight"] = out["task"].map(final) if final is not None else np.nan
    return out.sort_values("task", ignore_index=True)
