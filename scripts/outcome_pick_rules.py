"""Offline: alternative `valuekit clean` pick rules on finished `bench outcome` cells (the half-A models' test
accuracy; no training). Usage: python scripts/outcome_pick_rules.py RUNS_DIR [choice]  (seed-0 cells at 400 steps;
`choice`: only the sets the choices are made on)."""

import glob
import json
import sys

import numpy as np
import pandas as pd

from valuekit.api import evaluate
from valuekit.bench.outcome import CHOICE_SETS
from valuekit.pipeline import split_dev


def paired_se(a, b, resamples=2000):
    """Bootstrap standard error of the paired accuracy difference of two per-row correctness vectors."""
    idx = np.random.default_rng(0).integers(len(a), size=(resamples, len(a)))
    return (a[idx] - b[idx]).mean(1).std(ddof=1)


rows = []
for cj in sorted(glob.glob(f"{sys.argv[1]}/*/*/*/cell.json")):
    saved = json.load(open(cj))
    if saved["key"]["steps"] != 400 or saved["row"]["seed"] != 0:
        continue
    cell, folder = saved["row"], cj.rsplit("/", 1)[0]
    if sys.argv[2:] == ["choice"] and cell["dataset"] not in CHOICE_SETS:
        continue
    rec = json.load(open(f"{folder}/clean/clean.json"))
    dev = pd.read_parquet(f"{folder}/data/dev.parquet")
    half_b = dev[~split_dev(dev.label.to_numpy(), seed=rec["seed"])].reset_index(drop=True)
    corr = {c["candidate"]: evaluate(half_b, c["run_dir"], train=f"{folder}/data/train.parquet")["correct"]
            .astype(float) for c in rec["candidates"]}
    order = list(corr)
    test = {c["candidate"]: c["test_acc"] for c in rec["candidates"]}
    acc = {k: corr[k].mean() for k in order}
    r = {"dataset": cell["dataset"], "setting": cell["setting"], "seed": cell["seed"],
         "base": max(cell["uniform"], cell["uniform (whole dev)"]), "cl": cell["cleanlab+retrain"]}
    r["argmax"] = test[max(order, key=lambda k: (acc[k], -order.index(k)))]
    for z in (0.5, 1.0):
        ok = [k for k in order[1:] if acc[k] - acc["uniform"] > z * paired_se(corr[k], corr["uniform"])]
        r[f"z{z}"] = test[max(ok, key=lambda k: acc[k])] if ok else test["uniform"]
    rest = [k for k in order if k != "weighted+retrain"]
    r["no_weighted"] = test[max(rest, key=lambda k: (acc[k], -order.index(k)))]
    rows.append(r)
df = pd.DataFrame(rows)
g = df.groupby(["dataset", "setting"]).mean(numeric_only=True)
for rule in ("argmax", "z0.5", "z1.0", "no_weighted"):
    d = g[rule] - g.base
    print(f"{rule}: cells {len(df)}, mean vs best uniform {d.mean() * 100:+.2f} pt, >= +1 pt {(d >= 0.01).sum()}/"
          f"{len(g)}, below {(d < 0).sum()} (worst {d.min() * 100:+.1f}), >= cleanlab {(g[rule] >= g.cl).sum()}")
