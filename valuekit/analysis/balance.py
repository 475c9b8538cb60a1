"""Class balance learned by a scorer: per-class weight mass vs the training and dev class frequencies.

Reproduces the DDS paper's "class distribution learned by the scorer" figure (Wang et al., ICML 2020,
Fig. 3): a trained scorer that up-weights rare classes moves the training distribution toward the
(balanced) dev distribution. Reads only the run directory (and the dev table it names); pandas,
pyarrow and numpy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from valuekit.errors import InputError
from valuekit.runs.reader import Run, open_run

__all__ = ["class_balance", "class_balance_over_steps", "plot_class_balance", "plot_class_balance_over_steps", "kl"]



def kl(p, q) -> float:
    """KL(p || q) = sum_c p_c log(p_c / q_c) in nats (terms with p_c = 0 are 0; inf where q_c = 0 < p_c)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if np.isnan(p).any() or np.isnan(q).any():
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def _label_text(values: np.ndarray) -> list[str]:
    # Same text form as valuekit.data.tables (integral floats from CSV round trips lose their '.0').
    if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        values = values.astype(np.int64)
    return [str(v) for v in values]


def _table_freq(path, classes: list[str], label_col: str = "label") -> np.ndarray | None:
    """Class frequencies of a table's label column, or None when the file or column is not there."""
    from valuekit.data.tables import read_any

    if not path or not Path(path).exists():
        return None
    try:
        df, _, _ = read_any(path, name="dev")
    except InputError:
        return None
    if label_col not in df.columns:
        return None
    code = {c: i for i, c in enumerate(classes)}
    codes = np.array([code.get(t, -1) for t in _label_text(df[label_col].to_numpy())])
    codes = codes[codes >= 0]
    if len(codes) == 0:
        return None
    return np.bincount(codes, minlength=len(classes)) / len(codes)


def _example_labels(run: Run) -> pd.DataFrame:
    """example_id -> label code for every row seen in steps/ (one group_by over the log, not a full load)."""
    d = run.dataset("steps")
    if d is None:
        raise InputError(f"{run.path}: no steps/ parts, so the training labels are unknown")
    parts = [b.group_by("example_id").aggregate([("label", "min")])
             for b in (pa.Table.from_batches([rb]) for rb in d.to_batches(columns=["example_id", "label"])) if len(b)]
    t = pa.concat_tables(parts).group_by("example_id").aggregate([("label_min", "min")])
    return pd.DataFrame({"example_id": t["example_id"].to_numpy(zero_copy_only=False),
                         "label": t["label_min_min"].to_numpy().astype(np.int64)})


def class_balance(run) -> pd.DataFrame:
    """One row per class: `class`, `scorer_mass`, `empirical`, `dev`.

    scorer_mass = sum of the final values.parquet weights of the class's training rows / N (the
    share of the training distribution the scorer gives the class; sums to 1); empirical = training
    class frequency; dev = class frequency of the dev table named in run.json (NaN when that file is
    gone). Training labels come from values.parquet's `label` column when the method wrote one (dds
    does), otherwise from steps/ (rows never sampled are then left out).

    df.attrs["kl_scorer_dev"] = KL(dev || scorer_mass) and df.attrs["kl_empirical_dev"] =
    KL(dev || empirical), in nats: the direction that asks how well each distribution covers the dev
    distribution (NaN without dev frequencies).
    """
    run = open_run(run)
    classes = list(run.meta.get("classes") or [])
    values = run.values()
    if values is None:
        raise InputError(f"{run.path}: no values.parquet (the run did not finish); nothing to compare")
    if "label" in values.columns:
        labels = values["label"].to_numpy().astype(np.int64)
        weight = values["weight"].to_numpy(dtype=np.float64)
    else:
        merged = values[["example_id", "weight"]].merge(_example_labels(run), on="example_id", how="inner")
        labels, weight = merged["label"].to_numpy(), merged["weight"].to_numpy(dtype=np.float64)
    k = len(classes) if classes else int(labels.max()) + 1
    classes = classes or [str(i) for i in range(k)]
    weight = np.nan_to_num(weight, nan=0.0)
    mass = np.bincount(labels, weights=weight, minlength=k)
    mass = mass / mass.sum() if mass.sum() > 0 else np.full(k, np.nan)
    empirical = np.bincount(labels, minlength=k) / len(labels)
    dev_path = ((run.meta.get("data") or {}).get("dev") or {}).get("path")
    dev = _table_freq(dev_path, classes)
    dev = np.full(k, np.nan) if dev is None else dev
    frame = pd.DataFrame({"class": classes, "scorer_mass": mass, "empirical": empirical, "dev": dev})
    frame.attrs["kl_scorer_dev"] = kl(dev, mass)
    frame.attrs["kl_empirical_dev"] = kl(dev, empirical)
    frame.attrs["weights_of"] = weights_of(run.method)
    return frame


def weights_of(method: str) -> str:
    """What learned the weights of a method's run, as the figures name it (uniform learns none)."""
    return {"dds": "scorer", "multidds": "scorer", "lrdi": "teacher", "mwnet": "teacher",
            "uniform": "uniform weights (all 1)"}.get(method, "weights")


def class_balance_over_steps(run, *, bins: int = 20) -> pd.DataFrame:
    """Columns `step, class, mass`: per step bin, the share of the logged weight (steps/ `weight`,
    null = 1) that went to each class; `step` is the last step of the bin.

    Streams steps/ record batches and aggregates each with pyarrow group_by, so the log is never
    loaded whole into pandas.
    """
    if bins < 1:
        raise InputError(f"bins={bins}: must be >= 1")
    run = open_run(run)
    d = run.dataset("steps")
    if d is None:
        raise InputError(f"{run.path}: no steps/ parts to aggregate")
    last = int(run.meta.get("steps_done") or 0) or int(pc.max(d.to_table(columns=["step"])["step"]).as_py())
    bins = min(bins, max(last, 1))
    partial = []
    for rb in d.to_batches(columns=["step", "label", "weight"]):
        if not len(rb):
            continue
        t = pa.Table.from_batches([rb])
        step = pc.cast(t["step"], pa.int64())
        b = pc.divide(pc.multiply(pc.subtract(step, 1), bins), last)  # integer division: bin 0..bins-1
        b = pc.min_element_wise(pc.max_element_wise(b, 0), bins - 1)
        w = pc.fill_null(pc.cast(t["weight"], pa.float64()), 1.0)
        g = pa.table({"bin": b, "label": t["label"], "w": w}).group_by(["bin", "label"]).aggregate([("w", "sum")])
        partial.append(g)
    t = pa.concat_tables(partial).group_by(["bin", "label"]).aggregate([("w_sum", "sum")])
    frame = t.to_pandas().rename(columns={"w_sum_sum": "w"})
    classes = list(run.meta.get("classes") or [])
    frame["mass"] = frame["w"] / frame.groupby("bin")["w"].transform("sum")
    # last step of bin b: the largest s with (s - 1) * bins // last == b
    frame["step"] = ((frame["bin"] + 1) * last + bins - 1) // bins
    frame["class"] = [classes[i] if 0 <= i < len(classes) else str(i) for i in frame["label"]]
    return frame.sort_values(["step", "label"], ignore_index=True)[["step", "class", "mass"]]


def _axes(ax):
    if ax is None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(7, 3.5))
    return ax


def plot_class_balance(frame: pd.DataFrame, *, ax=None):
    """Grouped bars per class: scorer mass vs empirical training frequency vs dev frequency."""
    ax = _axes(ax)
    x = np.arange(len(frame))
    who = frame.attrs.get("weights_of", "scorer")
    cols = [("scorer_mass", who), ("empirical", "train (empirical)"), ("dev", "dev")]
    cols = [(c, lab) for c, lab in cols if c in frame and not frame[c].isna().all()]
    width = 0.8 / max(len(cols), 1)
    for j, (c, lab) in enumerate(cols):
        ax.bar(x + (j - (len(cols) - 1) / 2) * width, frame[c].to_numpy(), width, label=lab)
    ax.set_xticks(x, [str(c) for c in frame["class"]])
    ax.set_xlabel("class")
    ax.set_ylabel("probability mass")
    title = ("class distribution of uniform weights (nothing learned: equals train)" if who.startswith("uniform")
             else f"class distribution learned by the {who}")
    kl_s, kl_e = frame.attrs.get("kl_scorer_dev"), frame.attrs.get("kl_empirical_dev")
    if kl_s is not None and kl_e is not None and np.isfinite(kl_s) and np.isfinite(kl_e):
        title += f"\nKL(dev||{who.split(' ')[0]})={kl_s:.3f}  KL(dev||train)={kl_e:.3f}"
    ax.set_title(title, fontsize=9)
    top = np.nanmax([frame[c].max() for c, _ in cols]) if cols else 1.0
    ax.set_ylim(0, 1.3 * top)  # headroom so the one-row legend never covers the bars
    ax.legend(fontsize=7, ncol=len(cols) or 1, loc="upper center", frameon=False)
    return ax


def plot_class_balance_over_steps(frame: pd.DataFrame, *, ax=None):
    """Stacked area of each class's weight mass per step bin (the paper's usage-by-step figures)."""
    ax = _axes(ax)
    wide = frame.pivot_table(index="step", columns="class", values="mass", sort=False).fillna(0.0)
    order = list(dict.fromkeys(frame["class"]))
    wide = wide[order].sort_index()
    ax.stackplot(wide.index.to_numpy(), wide.to_numpy().T, labels=[str(c) for c in order])
    ax.set_xlabel("step")
    ax.set_ylabel("weight mass")
    ax.set_ylim(0, 1)
    ax.set_title("class weight mass by training step", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax
