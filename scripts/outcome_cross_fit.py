"""`valuekit clean --cross-fit` on the cells of a `valuekit bench outcome --runs-dir RUNS` grid, against the same
cells' `clean` (half-B pick), early-stopped uniform and cleanlab + retrain.

Each cell's saved data (RUNS/<set>/<noise>/<seed>/data/{train,dev,test}.parquet) is cleaned again with
`valuekit.clean(..., methods=<the cell's>, steps=<the cell's>, seed=<the cell's>, cross_fit=True)` (refit on, as the
grid's clean) into <cell>/clean-crossfit/; the cell's other numbers are read from its cell.json. Resumable: a cell
with a finished clean-crossfit/clean.json is read, not rerun. Held-out sets run first.

    python scripts/outcome_cross_fit.py RUNS [--part I/K] [--report OUT.md]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import pandas as pd

from valuekit.bench.outcome import CHOICE_SETS

CHOICE = set(CHOICE_SETS)  # the sets the grid's choices were made on; the others are held out


def cells(runs: str) -> list[str]:
    found = sorted(os.path.dirname(c) for c in glob.glob(os.path.join(runs, "*/*/*/cell.json")))
    return sorted(found, key=lambda c: (c.split(os.sep)[-3] in CHOICE, c))


def run_cell(cell: str) -> dict:
    import valuekit

    key = json.load(open(os.path.join(cell, "cell.json")))
    row, out = key["row"], os.path.join(cell, "clean-crossfit")
    done = os.path.join(out, "clean.json")
    if os.path.exists(done):
        rec = json.load(open(done))
    else:
        data = os.path.join(cell, "data")
        rec = valuekit.clean(os.path.join(data, "train.parquet"), os.path.join(data, "dev.parquet"),
                             test=os.path.join(data, "test.parquet"), out=out, methods=key["key"]["methods"],
                             steps=key["key"]["steps"], seed=row["seed"], device="cpu", cross_fit=True,
                             overwrite=True)
    return {"dataset": row["dataset"], "setting": row["setting"], "seed": row["seed"],
            "uniform": max(row["uniform"], row["uniform (whole dev)"]), "clean": row["clean"],
            "clean_pick": row["clean_pick"], "cross_fit": rec["test_acc"], "cross_fit_pick": rec["pick"],
            "cleanlab": row["cleanlab+retrain"], "held_out": row["dataset"] not in CHOICE}


def report(frame: pd.DataFrame) -> str:
    g = frame.groupby(["held_out", "dataset", "setting"])[["uniform", "clean", "cross_fit", "cleanlab"]].mean()
    g = g.reset_index()
    lines = ["| pipeline | sets | cells | mean gain over uniform ES (points) | >= +1 | >= 0 | worst | >= cleanlab |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for col, name in (("clean", "clean (half-B pick)"), ("cross_fit", "clean --cross-fit")):
        for held, h in g.groupby("held_out"):
            gain = 100 * (h[col] - h.uniform)
            lines.append(f"| {name} | {'held-out' if held else 'choice'} | {len(h)} | {gain.mean():+.2f} | "
                         f"{int((gain >= 1).sum())} | {int((gain >= 0).sum())} | {gain.min():+.1f} | "
                         f"{int((h[col] >= h.cleanlab).sum())} |")
    per = g.assign(clean=100 * (g.clean - g.uniform), cross_fit=100 * (g.cross_fit - g.uniform))
    lines += ["", "| data set | noise | held out | clean gain | cross-fit gain |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r.dataset} | {r.setting} | {'yes' if r.held_out else 'no'} | {r.clean:+.1f} | {r.cross_fit:+.1f} |"
              for r in per.itertuples()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("--part", default="0/1", help="I/K: run every K-th cell from the I-th")
    ap.add_argument("--report", default=None, help="write the comparison of every finished cell here")
    a = ap.parse_args(argv)
    i, k = (int(x) for x in a.part.split("/"))
    todo = cells(a.runs)
    if a.report:
        rows = [run_cell(c) for c in todo if os.path.exists(os.path.join(c, "clean-crossfit", "clean.json"))]
        frame = pd.DataFrame(rows)
        frame.to_csv(os.path.splitext(a.report)[0] + ".csv", index=False)
        text = report(frame)
        open(a.report, "w").write(text + "\n")
        print(text)
        return 0
    for c in todo[i::k]:
        r = run_cell(c)
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
