"""Value of a subset: train a fresh model on the top-f fraction of the training table by `value` and
compare its test accuracy with random subsets of the same size and with other runs' values.

This is the "value of a subset" evaluation of Das et al. (HOST-CP, ECML-PKDD 2021, Sec. 5): a
good valuation ranks first the rows that, on their own, train the best model.  For every fraction
f in `fractions` and seed in `seeds`:

* ``selection="value"``: the round(f * N) rows with the highest value of the run (values.parquet's
  `rank`: NaN values last, ties by table order);
* ``selection="random"``: round(f * N) rows drawn uniformly without replacement (numpy, seeded);
* ``selection=<name>``: the top rows by each of the `others` runs' values;

With ``stratify=True`` every selection (random included) is made within each class separately,
round(f * N_c) rows of class c (its given label), so the subsets keep the table's class proportions:
a valuation that prefers whole classes (HOST-CP's selector has a per-class bias) is then judged on
which examples it ranks first inside each class.

A fresh model (the run's model family, hidden width and batch size unless overridden) is
trained with the `uniform` method for `steps` steps with that seed; its final test accuracy is
recorded.  Results go to ``RUN_DIR/subset_value.parquet`` with columns
``fraction, selection, seed, test_acc, size``.

This is the one analysis module that trains: torch and valuekit.trainers are imported lazily
inside :func:`subset_value`; everything else (and :func:`plot_subset_value`) needs only
pandas/numpy/matplotlib.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.errors import InputError

SUBSET_FILE = "subset_value.parquet"
COLUMNS = ("fraction", "selection", "seed", "test_acc", "size")


def _values_of(run) -> tuple[pd.DataFrame, object | None]:
    """(values frame with example_id/value, the Run or None) for a run dir, Run or DataFrame."""
    if isinstance(run, pd.DataFrame):
        for col in ("example_id", "value"):
            if col not in run.columns:
                raise InputError(f"values DataFrame: missing column {col!r} (columns: {list(run.columns)[:12]})")
        return run, None
    from valuekit.runlog import read_run

    r = run if hasattr(run, "values") and hasattr(run, "meta") else read_run(run)
    return r.values(), r


def top_ids(values: pd.DataFrame, size: int) -> np.ndarray:
    """The example_ids of the `size` highest values (NaN last, ties in table order)."""
    v = values["value"].to_numpy(dtype=np.float64)
    order = np.lexsort((np.arange(len(v)), -np.nan_to_num(v, nan=-np.inf)))
    return values["example_id"].to_numpy()[order[:size]]


def _sibling(path, name: str):
    if path is None:
        return None
    cand = Path(path).with_name(f"{name}.parquet")
    return cand if cand.exists() else None


def subset_value(
    run,
    data=None,
    *,
    dev=None,
    test=None,
    fractions=(0.1, 0.2, 0.3, 0.5, 0.7),
    seeds=(0, 1, 2),
    others=None,
    model: str | None = None,
    hidden: int | None = None,
    steps: int = 500,
    batch_size: int | None = None,
    lr: float = 1e-3,
    out=None,
    write: bool = True,
    stratify: bool = False,
) -> pd.DataFrame:
    """Test accuracy of fresh models trained on top-f subsets by value vs random subsets (module doc).

    Args:
        run: a run directory, an opened Run, or a DataFrame with ``example_id`` and ``value``.
        data: the training table (path or DataFrame); default the run's ``data.train.path``.
        dev, test: dev and test tables; default ``dev.parquet``/``test.parquet`` next to the
            training table.
        fractions: subset sizes as fractions of the training rows, each in (0, 1].
        seeds: one model training (and one random subset) per seed.
        others: other runs to compare, ``{name: run}`` or a list of runs (named by run.json's name).
        model, hidden, batch_size: default the run's settings (mlp, 128, 64 for a DataFrame).
        steps, lr: training of each fresh model.
        stratify: select within each class (module doc).
        out: where to write the Parquet file (default ``RUN_DIR/subset_value.parquet``; a
            DataFrame run needs ``out`` or ``write=False``).

    Returns the frame written: one row per (fraction, selection, seed).
    """
    fractions = [float(f) for f in fractions]
    seeds = [int(s) for s in seeds]
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise InputError(f"fractions {fractions}: each must be in (0, 1]")
    if not seeds:
        raise InputError("seeds: give at least one seed")
    if steps < 1:
        raise InputError(f"steps {steps}: must be >= 1")
    values, r = _values_of(run)
    if write and out is None:
        if r is None:
            raise InputError("subset_value: values given as a DataFrame; pass out=PATH or write=False")
        out = Path(r.path) / SUBSET_FILE
    if data is None:
        if r is None:
            raise InputError("subset_value: values given as a DataFrame; pass data=TRAINING_TABLE")
        from valuekit.analysis.mislabel import _table_path

        data = _table_path(r)
    train_path = data if isinstance(data, (str, Path)) else None
    dev = dev if dev is not None else _sibling(train_path, "dev")
    test = test if test is not None else _sibling(train_path, "test")
    if dev is None or test is None:
        raise InputError("subset_value: pass dev= and test= tables (no dev.parquet/test.parquet next to the training table)")
    cfg_run = (r.meta.get("config") or {}) if r is not None else {}
    model = model or cfg_run.get("model", "mlp")
    hidden = hidden or cfg_run.get("hidden", 128)
    batch_size = batch_size or cfg_run.get("batch_size", 64)

    # the selections: name -> values frame
    selections = {"value": values}
    if others:
        items = others.items() if isinstance(others, dict) else ((None, o) for o in others)
        for name, o in items:
            ov, orun = _values_of(o)
            name = name or (orun.meta.get("name") if orun is not None else None) or f"run{len(selections)}"
            if name in ("value", "random") or name in selections:
                raise InputError(f"others: name {name!r} is already used; give the runs as a dict of distinct names")
            selections[name] = ov

    from valuekit.datasets import load_table  # noqa: PLC0415  (lazy: torch)
    from valuekit.trainers.base import TrainConfig, train  # noqa: PLC0415

    full = load_table(data, name="train")
    dev_ds = load_table(dev, like=full, name="dev")
    test_ds = load_table(test, like=full, name="test")
    n = len(full)
    pos = pd.Series(np.arange(n), index=pd.Index(full.ids))
    for name, v in selections.items():
        missing = pd.Index(full.ids).difference(pd.Index(v["example_id"].to_numpy(dtype=full.ids.dtype)))
        if len(missing):
            raise InputError(f"values of {name!r}: no value for training id {missing[0]!r} ({len(missing)} missing)")

    def subset(rows: np.ndarray):
        rows = np.sort(rows)
        keep = {"ids": full.ids[rows], "x": full.x[rows], "y": full.y[rows],
                "source": None if full.source is None else full.source[rows], "is_noisy": None, "clean_label": None,
                "path": None, "file_sha256": None}
        return dataclasses.replace(full, **keep)

    ranked = {name: pos.loc[top_ids(v.assign(example_id=v["example_id"].to_numpy(dtype=full.ids.dtype)), n)
                            ].to_numpy() for name, v in selections.items()}  # row numbers, best first
    labels = full.y.numpy()

    def take(order: np.ndarray, f: float) -> np.ndarray:
        if not stratify:
            return order[: max(1, int(round(f * n)))]
        parts = []
        for c in np.unique(labels):
            of_c = order[labels[order] == c]
            parts.append(of_c[: max(1, int(round(f * len(of_c))))])
        return np.concatenate(parts)

    records = []
    with tempfile.TemporaryDirectory(prefix="valuekit-subsets-") as tmp:
        for f in fractions:
            for seed in seeds:
                picks = {name: take(order, f) for name, order in ranked.items()}
                picks["random"] = take(np.random.default_rng(seed).permutation(n), f)
                for name, rows in picks.items():
                    cfg = TrainConfig(method="uniform", model=model, hidden=hidden, steps=steps,
                                      batch_size=min(batch_size, len(rows)), lr=lr, seed=seed, device="cpu",
                                      progress=False, eval_every=steps, log_every=steps, checkpoint_every=steps)
                    res = train(subset(rows), dev_ds, test_ds, out=Path(tmp) / f"{name}-{f}-{seed}", config=cfg)
                    records.append({"fraction": f, "selection": name, "seed": seed,
                                    "test_acc": float(res.meta["final_metrics"]["test_acc"]), "size": len(rows)})
    frame = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    if write:
        frame.to_parquet(out, index=False)
    return frame


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
