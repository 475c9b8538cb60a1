"""Matplotlib figures of the HTML report, returned as inline data URIs (no files, no network).

Each `plot_*` takes small, already aggregated frames keyed by run name and returns a
Figure with one panel per run (side by side) or one shared panel with a line per run.
`data_uri(fig)` turns a Figure into a base64 PNG `data:` URI and closes it.
"""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False,
                     "figure.dpi": 96})
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]
PANEL_W, PANEL_H, MAX_COLS = 4.4, 3.0, 3


def data_uri(fig, *, dpi: int = 96) -> str:
    """base64 PNG data URI of a figure (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_uri(pixels: np.ndarray, shape) -> str:
    """Tiny PNG of one image-shaped feature row (C, H, W); grayscale for C = 1, RGB for C = 3."""
    shape = tuple(int(s) for s in shape)
    img = np.asarray(pixels, dtype=np.float64).reshape(shape)
    if len(shape) == 3:
        img = img[0] if shape[0] == 1 else np.moveaxis(img[:3], 0, -1)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    buf = io.BytesIO()
    plt.imsave(buf, img, cmap="gray_r" if img.ndim == 2 else None, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def step_axis(ax):
    """Few integer ticks with k/M suffixes, so large step counts stay readable in narrow panels."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    return ax


def grid(n: int, *, cols: int = MAX_COLS, w: float = PANEL_W, h: float = PANEL_H):
    """A figure with n panels, at most `cols` per row; unused panels are hidden."""
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, list(flat[:n])


def plot_training_curves(curves: dict[str, pd.DataFrame], best: dict[str, int] | None = None):
    """2 x 2: loss and accuracy, training (binned mean, solid) and dev (dashed) / test (dotted), one colour per run;
    `best` {run: step}: a thin vertical line at each early-stopped run's best step."""
    fig, axes = plt.subplots(1, 2, figsize=(2 * PANEL_W + 0.6, PANEL_H + 0.3))
    for i, (name, c) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        if (best or {}).get(name) is not None:
            for ax in axes:
                ax.axvline(best[name], color=color, lw=0.9, ls="-.", alpha=0.8,
                           label=f"{name} best step" if ax is axes[1] else None)
        for ax, what in zip(axes, ("loss", "acc")):
            tr = c[["step", f"train_{what}"]].dropna()
            ax.plot(tr["step"], tr[f"train_{what}"], color=color, lw=1.2, alpha=0.75, label=f"{name} train")
            for split, ls in (("dev", "--"), ("test", ":")):
                ev = c[["step", f"{split}_{what}"]].dropna()
                if len(ev):
                    ax.plot(ev["step"], ev[f"{split}_{what}"], ls, color=color, lw=1.6, marker="o", ms=2.5,
                            label=f"{name} {split}")
    for ax in axes:
        step_axis(ax)
    axes[0].set(title="loss", xlabel="step", ylabel="cross-entropy")
    axes[1].set(title="accuracy", xlabel="step", ylabel="accuracy")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_histograms(series: dict[str, tuple[np.ndarray, str]], *, bins: int = 40):
    """One panel per run: histogram of a per-example quantity (final weight, or value when weights are constant)."""
    fig, axes = grid(len(series))
    for ax, (name, (v, label)) in zip(axes, series.items()):
        v = np.asarray(v, dtype=np.float64)
        v = v[np.isfinite(v)]
        ax.hist(v, bins=bins, color=COLORS[0], alpha=0.85)
        ax.set(title=name, xlabel=label, ylabel="examples")
    fig.tight_layout()
    return fig


def plot_by_class(frames: dict[str, pd.DataFrame], label: dict[str, str], classes: list[str] | None = None):
    """One panel per run: box plot of the quantity (column `v`) per class (column `class`), in `classes` order."""
    fig, axes = grid(len(frames))
    for ax, (name, f) in zip(axes, frames.items()):
        f = f[np.isfinite(f["v"])]
        present = set(f["class"])
        order = [c for c in (classes or sorted(present)) if c in present]
        data = [f.loc[f["class"] == c, "v"].to_numpy() for c in order]
        ax.boxplot(data, showfliers=True, flierprops={"markersize": 2, "alpha": 0.4}, widths=0.6)
        ax.set_xticks(np.arange(1, len(order) + 1), [str(c) for c in order],
                      rotation=45 if len(order) > 12 else 0, fontsize=7 if len(order) > 12 else 8)
        ax.set(title=name, xlabel="class (given label)", ylabel=label[name])
    fig.tight_layout()
    return fig


def plot_split_noisy(frames: dict[str, pd.DataFrame], label: dict[str, str], *, bins: int = 40):
    """One panel per run: overlaid histograms of `v` for is_noisy False / True (evaluation only)."""
    fig, axes = grid(len(frames))
    for ax, (name, f) in zip(axes, frames.items()):
        f = f[np.isfinite(f["v"])]
        edges = np.histogram_bin_edges(f["v"], bins=bins)
        for flag, color, text in ((False, COLORS[0], "clean"), (True, COLORS[3], "noisy (is_noisy)")):
            ax.hist(f.loc[f["noisy"] == flag, "v"], bins=edges, alpha=0.6, color=color, label=text)
        ax.set(title=name, xlabel=label[name], ylabel="examples")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_trajectories(frames: dict[str, pd.DataFrame], label: dict[str, str], names: dict[str, dict] | None = None):
    """One panel per run: the logged quantity of a few examples at each step they were seen."""
    fig, axes = grid(len(frames))
    for ax, (run, f) in zip(axes, frames.items()):
        tags = (names or {}).get(run, {})
        for i, (eid, g) in enumerate(f.groupby("example_id", sort=False)):
            tag = tags.get(eid, "")
            ax.plot(g["step"], g["value"], marker="." if len(g) <= 100 else None, ms=3, lw=1,
                    color=COLORS[i % len(COLORS)], ls="-" if "high" in tag else "--", label=f"id {eid} {tag}")
        ax.set(title=run, xlabel="step", ylabel=label[run])
        step_axis(ax)
        ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    return fig


def plot_quantile_bands(frames: dict[str, pd.DataFrame], ylabel: str):
    """One panel per run: mean, median and the 10-90 / 25-75 % bands per step bin."""
    fig, axes = grid(len(frames))
    for ax, (name, f) in zip(axes, frames.items()):
        s = f["step"].to_numpy()
        ax.fill_between(s, f["q10"], f["q90"], color=COLORS[0], alpha=0.18, lw=0, label="10-90 %")
        ax.fill_between(s, f["q25"], f["q75"], color=COLORS[0], alpha=0.35, lw=0, label="25-75 %")
        ax.plot(s, f["q50"], color=COLORS[0], lw=1.2, label="median")
        ax.plot(s, f["mean"], color=COLORS[1], lw=1.2, ls="--", label="mean")
        ax.set(title=name, xlabel="step", ylabel=ylabel)
        step_axis(ax)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_discovery(curves: dict[str, pd.DataFrame]):
    """Fraction of truly noisy examples found vs fraction inspected (lowest score first),
    one line per score, with the random (diagonal) and optimal lines."""
    fig, ax = plt.subplots(figsize=(PANEL_W + 1.2, PANEL_H + 0.6))
    first = next(iter(curves.values()))
    ax.plot(first["inspected"], first["optimal"], color="black", lw=1, ls=":", label="optimal")
    ax.plot(first["inspected"], first["random"], color="grey", lw=1, ls="--", label="random")
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(c["inspected"], c["found"], lw=1.6 if i == 0 else 1.1, color=COLORS[i % len(COLORS)], label=name)
    ax.set(xlabel="fraction of training set inspected", ylabel="fraction of noisy labels found",
           xlim=(0, 1), ylim=(0, 1.02), title="discovery curve")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def run_panels(n: int):
    """Figure with one panel per run for plot functions of other modules that take `ax=`."""
    return grid(n)
