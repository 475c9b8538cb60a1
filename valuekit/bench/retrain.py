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
``fraction, selection, seed, test_acc, size``; reading, summarising and plotting them needs no torch
(`valuekit.analysis.subsets`). This module trains, so it lives outside `valuekit.analysis`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.analysis.subsets import COLUMNS, top_ids, values_of
from valuekit.errors import InputError
from valuekit.runs.layout import SUBSET_VALUE


def _sibling(path, name: str):
    if path is None:
        return None
    cand = Path(path).with_name(f"{name}.parquet")
    return cand if cand.exists() else None


def _tables(r, data, dev, test):
    """(train, dev, test) tables: the run's training table and the dev/test tables next to it by default."""
    if data is None:
        if r is None:
            raise InputError("subset_value: values given as a DataFrame; pass data=TRAINING_TABLE")
        from valuekit.analysis.scores import table_path

        data = table_path(r)
    train_path = data if isinstance(data, (str, Path)) else None
    dev = dev if dev is not None else _sibling(train_path, "dev")
    test = test if test is not None else _sibling(train_path, "test")
    if dev is None or test is None:
        raise InputError(
            "subset_value: pass dev= and test= tables (no dev.parquet/test.parquet next to the training table)"
        )
    return data, dev, test


def _selections(values: pd.DataFrame, others) -> dict[str, pd.DataFrame]:
    """name -> values frame: the run's own ("value") and each of `others`."""
    selections = {"value": values}
    if others:
        items = others.items() if isinstance(others, dict) else ((None, o) for o in others)
        for name, o in items:
            ov, orun = values_of(o)
            name = name or (orun.meta.get("name") if orun is not None else None) or f"run{len(selections)}"
            if name in ("value", "random") or name in selections:
                raise InputError(f"others: name {name!r} is already used; give the runs as a dict of distinct names")
            selections[name] = ov
    return selections


def _subset(full, rows: np.ndarray):
    """The training rows `rows` (in table order) as a dataset without ground-truth noise columns."""
    rows = np.sort(rows)
    keep = {"ids": full.ids[rows], "x": full.x[rows], "y": full.y[rows],
            "source": None if full.source is None else full.source[rows], "is_noisy": None, "clean_label": None,
            "path": None, "file_sha256": None}
    return dataclasses.replace(full, **keep)


def _take(order: np.ndarray, f: float, labels: np.ndarray, stratify: bool) -> np.ndarray:
    """The first round(f * N) rows of `order`, or with `stratify` the first round(f * N_c) of each class."""
    if not stratify:
        return order[: max(1, int(round(f * len(order))))]
    parts = []
    for c in np.unique(labels):
        of_c = order[labels[order] == c]
        parts.append(of_c[: max(1, int(round(f * len(of_c))))])
    return np.concatenate(parts)


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
    values, r = values_of(run)
    if write and out is None:
        if r is None:
            raise InputError("subset_value: values given as a DataFrame; pass out=PATH or write=False")
        out = Path(r.path) / SUBSET_VALUE
    data, dev, test = _tables(r, data, dev, test)
    cfg_run = (r.meta.get("config") or {}) if r is not None else {}
    model = model or cfg_run.get("model", "mlp")
    hidden = hidden or cfg_run.get("hidden", 128)
    batch_size = batch_size or cfg_run.get("batch_size", 64)
    selections = _selections(values, others)

    from valuekit.config import TrainConfig
    from valuekit.data.tables import load_table  # noqa: PLC0415  (lazy: torch)
    from valuekit.training.loop import run_training

    full = load_table(data, name="train")
    dev_ds = load_table(dev, like=full, name="dev")
    test_ds = load_table(test, like=full, name="test")
    n = len(full)
    pos = pd.Series(np.arange(n), index=pd.Index(full.ids))
    for name, v in selections.items():
        missing = pd.Index(full.ids).difference(pd.Index(v["example_id"].to_numpy(dtype=full.ids.dtype)))
        if len(missing):
            raise InputError(f"values of {name!r}: no value for training id {missing[0]!r} ({len(missing)} missing)")

    ranked = {name: pos.loc[top_ids(v.assign(example_id=v["example_id"].to_numpy(dtype=full.ids.dtype)), n)
                            ].to_numpy() for name, v in selections.items()}  # row numbers, best first
    labels = full.y.numpy()

    records = []
    with tempfile.TemporaryDirectory(prefix="valuekit-subsets-") as tmp:
        for f in fractions:
            for seed in seeds:
                picks = {name: _take(order, f, labels, stratify) for name, order in ranked.items()}
                picks["random"] = _take(np.random.default_rng(seed).permutation(n), f, labels, stratify)
                for name, rows in picks.items():
                    cfg = TrainConfig(method="uniform", model=model, hidden=hidden, steps=steps,
                                      batch_size=min(batch_size, len(rows)), lr=lr, seed=seed, device="cpu",
                                      progress=False, eval_every=steps, log_every=steps, checkpoint_every=steps)
                    res = run_training(
                        _subset(full, rows), dev_ds, test_ds, out=Path(tmp) / f"{name}-{f}-{seed}", config=cfg
                    )
                    records.append({"fraction": f, "selection": name, "seed": seed,
                                    "test_acc": float(res.meta["final_metrics"]["test_acc"]), "size": len(rows)})
    frame = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    if write:
        frame.to_parquet(out, index=False)
    return frame


__all__ = ["subset_value"]
