"""How much of `valuekit clean`'s shortfall is the pick? Re-read a `valuekit bench outcome --runs-dir RUNS` grid
and compare pick rules on the candidates each cell already trained (no retraining).

For every cell (data set, noise, seed) the clean run's candidates.parquet holds each candidate's half-A and half-B
dev accuracy and its test accuracy (the half-A model, before the refit). This script adds each candidate's half-B
mean cross-entropy (its best.pt on the half-B rows, `valuekit.api.evaluate`), then scores every rule by the test
accuracy of the candidate it picks, against the better of the cell's two early-stopped uniform runs (half A, whole
dev), as reports/outcome-3seeds.md does. Rules are judged on the choice sets and on the held-out sets separately:
a rule that only wins on the choice sets was fitted to them.

    python scripts/outcome_pick_rules.py RUNS [--out reports/outcome-pick.md]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np
import pandas as pd

from valuekit.bench.outcome import CHOICE_SETS

CHOICE = set(CHOICE_SETS)  # the sets the grid's choices were made on; the others are held out


def half_b_losses(runs: str) -> pd.DataFrame:
    """(cell, candidate, dev_b_loss) for every clean candidate of the grid; cached beside the grid (pick-losses.csv),
    and only the cells the cache lacks are computed."""
    from valuekit.api import evaluate
    from valuekit.data.tables import load_table
    from valuekit.pipeline import split_dev

    cache = os.path.join(runs, "pick-losses.csv")
    known = pd.read_csv(cache) if os.path.exists(cache) else pd.DataFrame(columns=["cell", "candidate", "dev_b_loss"])
    done = set(known.cell)
    rows = []
    for cell in sorted(glob.glob(os.path.join(runs, "*/*/*/clean/candidates.parquet"))):
        base = os.path.dirname(os.path.dirname(cell))
        if base in done:
            continue
        record = json.load(open(os.path.join(base, "clean", "clean.json")))
        dev = pd.read_parquet(os.path.join(base, "data", "dev.parquet"))
        half_a = split_dev(dev["label"].to_numpy(), seed=record["seed"])
        train = load_table(os.path.join(base, "data", "train.parquet"))
        dev_b = dev[~half_a].reset_index(drop=True)
        for _, c in pd.read_parquet(cell).iterrows():
            ev = evaluate(dev_b, c.run_dir, train=train)
            assert abs(ev["acc"] - c.dev_b_acc) < 1e-9  # the same half B as the clean run's
            rows.append({"cell": base, "candidate": c.candidate, "dev_b_loss": ev["loss"]})
    if rows:
        known = pd.concat([known, pd.DataFrame(rows)], ignore_index=True)
        known.to_csv(cache, index=False)
    return known


def _first_min(c: pd.DataFrame, key: np.ndarray) -> str:
    return str(c.candidate.iloc[int(np.argmin(key))])  # first minimum: candidates are listed simplest first


RULES = {
    "half-B accuracy (clean's rule)": lambda c: _first_min(c, -c.dev_b_acc.to_numpy()),
    "half-B accuracy, ties by half-B loss": lambda c: _first_min(c, -c.dev_b_acc.to_numpy() + 1e-6 * c.dev_b_loss),
    "half-B loss": lambda c: _first_min(c, c.dev_b_loss.to_numpy()),
    "half-A + half-B accuracy": lambda c: _first_min(c, -(c.dev_a_acc + c.dev_b_acc).to_numpy()),
    "always uniform": lambda c: "uniform",
    "oracle (best test accuracy; not a rule)": lambda c: _first_min(c, -c.test_acc.to_numpy()),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    losses = half_b_losses(a.runs)
    res = []
    for cj in sorted(glob.glob(os.path.join(a.runs, "*/*/*/cell.json"))):
        base = os.path.dirname(cj)
        row = json.load(open(cj))["row"]
        cand_file = os.path.join(base, "clean", "candidates.parquet")
        if not os.path.exists(cand_file):
            continue
        c = pd.read_parquet(cand_file).merge(losses[losses.cell == base][["candidate", "dev_b_loss"]], on="candidate")
        uni = max(row["uniform"], row["uniform (whole dev)"])
        for name, rule in RULES.items():
            pick = rule(c)
            res.append({"rule": name, "dataset": row["dataset"], "setting": row["setting"], "seed": row["seed"],
                        "test": float(c.loc[c.candidate == pick, "test_acc"].iloc[0]), "uniform": uni,
                        "cleanlab": row["cleanlab+retrain"], "held_out": row["dataset"] not in CHOICE})
    frame = pd.DataFrame(res)
    cells = frame.groupby(["rule", "held_out", "dataset", "setting"], sort=False)[["test", "uniform", "cleanlab"]]
    cells = cells.mean().reset_index()
    cells["gain"] = 100 * (cells.test - cells.uniform)
    lines = ["| rule | sets | cells | mean gain (points) | >= +1 | >= 0 | worst | >= cleanlab |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (rule, held), g in cells.groupby(["rule", "held_out"], sort=False):
        lines.append(f"| {rule} | {'held-out' if held else 'choice'} | {len(g)} | {g.gain.mean():+.2f} | "
                     f"{int((g.gain >= 1).sum())} | {int((g.gain >= 0).sum())} | {g.gain.min():+.1f} | "
                     f"{int((g.test >= g.cleanlab).sum())} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
