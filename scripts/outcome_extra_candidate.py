"""Would another learned method help `valuekit clean` as a candidate? Re-use a `valuekit bench outcome --runs-dir
RUNS` grid: per cell, train METHOD exactly as `clean` trains its candidates (early-stopped on half A of the dev
table, 400 steps, the cell's seed) on the cell's saved data, judge it on half B, and re-apply clean's pick rule
(first maximum of half-B accuracy) with and without it. Scores are the picked candidate's half-A model's test
accuracy (no refit: only the pick changes), against the better of the cell's two early-stopped uniform runs.

    python scripts/outcome_extra_candidate.py RUNS --method l2rw [--part I/K] [--report OUT.md]
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


def cells(runs: str) -> list[str]:
    return sorted(os.path.dirname(c) for c in glob.glob(os.path.join(runs, "*/*/*/cell.json")))


def run_cell(cell: str, method: str) -> dict:
    import valuekit
    from valuekit.api import evaluate
    from valuekit.data.tables import load_table
    from valuekit.pipeline import split_dev

    key = json.load(open(os.path.join(cell, "cell.json")))
    row, out = key["row"], os.path.join(cell, f"extra-{method}")
    record = os.path.join(out, "extra.json")
    if os.path.exists(record):
        return json.load(open(record))
    data = os.path.join(cell, "data")
    tr = load_table(os.path.join(data, "train.parquet"))
    dev = pd.read_parquet(os.path.join(data, "dev.parquet"))
    half_a = split_dev(dev["label"].to_numpy(), seed=row["seed"])
    dev_a = load_table(dev[half_a].reset_index(drop=True), like=tr, name="dev")
    dev_b = load_table(dev[~half_a].reset_index(drop=True), like=tr, name="dev")
    test = load_table(os.path.join(data, "test.parquet"), like=tr, name="test")
    run = valuekit.train(tr, dev_a, test, out=os.path.join(out, "run"), method=method, steps=key["key"]["steps"],
                         seed=row["seed"], device="cpu", early_stopping=True, progress=False, overwrite=True)
    ev = evaluate(dev_b, run, train=tr)
    res = {"cell": cell, "dev_b_acc": ev["acc"], "test_acc": run.meta["best_metrics"]["test_acc"]}
    with open(record, "w") as f:
        json.dump(res, f)
    return res


def report(runs: str, method: str) -> str:
    rows = []
    for cell in cells(runs):
        rec = os.path.join(cell, f"extra-{method}", "extra.json")
        if not os.path.exists(rec):
            continue
        extra = json.load(open(rec))
        row = json.load(open(os.path.join(cell, "cell.json")))["row"]
        c = pd.read_parquet(os.path.join(cell, "clean", "candidates.parquet"))
        base = c.iloc[int(np.argmax(c.dev_b_acc.to_numpy()))]
        # the extra method sits after the learned methods, before the retrains, as clean would list it
        retrains = np.flatnonzero(c.candidate.str.endswith("+retrain").to_numpy())
        at = int(retrains[0]) if len(retrains) else len(c)
        names = [*c.candidate[:at], method, *c.candidate[at:]]
        accs = [*c.dev_b_acc[:at], extra["dev_b_acc"], *c.dev_b_acc[at:]]
        tests = [*c.test_acc[:at], extra["test_acc"], *c.test_acc[at:]]
        i = int(np.argmax(accs))
        rows.append({"dataset": row["dataset"], "setting": row["setting"], "seed": row["seed"],
                     "held_out": row["dataset"] not in CHOICE,
                     "uniform": max(row["uniform"], row["uniform (whole dev)"]), "clean": float(base.test_acc),
                     "with": float(tests[i]), "pick_with": names[i], "extra_test": extra["test_acc"]})
    frame = pd.DataFrame(rows)
    g = frame.groupby(["held_out", "dataset", "setting"])[["uniform", "clean", "with", "extra_test"]].mean()
    g = g.reset_index()
    lines = ["| candidates | sets | cells | mean gain over uniform ES (points) | >= +1 | >= 0 | worst |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for col, name in (("clean", "clean's (half-A models)"), ("with", f"clean's + {method}")):
        for held, h in g.groupby("held_out"):
            gain = 100 * (h[col] - h.uniform)
            lines.append(f"| {name} | {'held-out' if held else 'choice'} | {len(h)} | {gain.mean():+.2f} | "
                         f"{int((gain >= 1).sum())} | {int((gain >= 0).sum())} | {gain.min():+.1f} |")
    lines += ["", f"{method} alone (early-stopped on half A), mean gain over uniform ES per noise kind (points):", "",
              "| noise | choice | held-out |", "| --- | --- | --- |"]
    for s, h in g.groupby("setting"):
        d = {held: 100 * (x.extra_test - x.uniform).mean() for held, x in h.groupby("held_out")}
        lines.append(f"| {s} | {d.get(False, float('nan')):+.2f} | {d.get(True, float('nan')):+.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("--method", default="l2rw")
    ap.add_argument("--part", default="0/1")
    ap.add_argument("--report", default=None)
    a = ap.parse_args(argv)
    if a.report:
        text = report(a.runs, a.method)
        open(a.report, "w").write(text + "\n")
        print(text)
        return 0
    i, k = (int(x) for x in a.part.split("/"))
    for c in cells(a.runs)[i::k]:
        print(json.dumps(run_cell(c, a.method)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
