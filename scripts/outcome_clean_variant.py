"""A variant of `valuekit clean` on the cells of a `valuekit bench outcome --runs-dir RUNS` grid, against the same
cells' `clean` (the grid's: half-B pick, the pick's refit handed over), early-stopped uniform and cleanlab + retrain.

Each cell's saved data (RUNS/<set>/<noise>/<seed>/data/{train,dev,test}.parquet) is cleaned again with
`valuekit.clean(..., methods=<the cell's>, steps=<the cell's>, seed=<the cell's>, **VARIANT)` (refit on, as the
grid's clean) into <cell>/<the variant's folder>/; the cell's other numbers are read from its cell.json. Resumable:
a cell with a finished clean.json there is read, not rerun. Held-out sets run first. Variants:

* ``cross-fit``: `cross_fit=True` with the pick alone handed over (`ensemble=1`), into clean-crossfit/;
* ``ensemble``: `clean`'s defaults of the code at hand (the top two candidates by half-B accuracy refitted and
  averaged), into clean-ensemble/.

    python scripts/outcome_clean_variant.py RUNS --variant cross-fit|ensemble [--part I/K] [--report OUT.md]
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


VARIANTS = {"cross-fit": ("clean-crossfit", {"cross_fit": True, "ensemble": 1}),
            "ensemble": ("clean-ensemble", {})}


def run_cell(cell: str, variant: str) -> dict:
    import valuekit

    folder, options = VARIANTS[variant]
    key = json.load(open(os.path.join(cell, "cell.json")))
    row, out = key["row"], os.path.join(cell, folder)
    done = os.path.join(out, "clean.json")
    if os.path.exists(done):
        rec = json.load(open(done))
    else:
        data = os.path.join(cell, "data")
        rec = valuekit.clean(os.path.join(data, "train.parquet"), os.path.join(data, "dev.parquet"),
                             test=os.path.join(data, "test.parquet"), out=out, methods=key["key"]["methods"],
                             steps=key["key"]["steps"], seed=row["seed"], device="cpu", overwrite=True,
                             **options)
    return {"dataset": row["dataset"], "setting": row["setting"], "seed": row["seed"],
            "uniform": max(row["uniform"], row["uniform (whole dev)"]), "clean": row["clean"],
            "clean_pick": row["clean_pick"], "variant": rec["test_acc"], "variant_pick": rec["pick"],
            "variant_members": ",".join(rec.get("ensemble", {}).get("members", [rec["pick"]])),
            "cleanlab": row["cleanlab+retrain"], "held_out": row["dataset"] not in CHOICE}


def report(frame: pd.DataFrame, variant: str) -> str:
    g = frame.groupby(["held_out", "dataset", "setting"])[["uniform", "clean", "variant", "cleanlab"]].mean()
    g = g.reset_index()
    lines = ["| pipeline | sets | cells | mean gain over uniform ES (points) | >= +1 | >= 0 | worst | >= cleanlab |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    label = {"cross-fit": "clean --cross-fit", "ensemble": "clean (top-2 ensemble)"}[variant]
    for col, name in (("clean", "clean (half-B pick)"), ("variant", label)):
        for held, h in g.groupby("held_out"):
            gain = 100 * (h[col] - h.uniform)
            lines.append(f"| {name} | {'held-out' if held else 'choice'} | {len(h)} | {gain.mean():+.2f} | "
                         f"{int((gain >= 1).sum())} | {int((gain >= 0).sum())} | {gain.min():+.1f} | "
                         f"{int((h[col] >= h.cleanlab).sum())} |")
    per = g.assign(clean=100 * (g.clean - g.uniform), variant=100 * (g.variant - g.uniform),
                   cleanlab=100 * (g.cleanlab - g.uniform))
    lines += ["", f"| data set | noise | held out | clean gain | {variant} gain | cleanlab gain |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.dataset} | {r.setting} | {'yes' if r.held_out else 'no'} | {r.clean:+.1f} | {r.variant:+.1f} | "
              f"{r.cleanlab:+.1f} |" for r in per.itertuples()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--part", default="0/1", help="I/K: run every K-th cell from the I-th")
    ap.add_argument("--report", default=None, help="write the comparison of every finished cell here")
    a = ap.parse_args(argv)
    i, k = (int(x) for x in a.part.split("/"))
    todo = cells(a.runs)
    if a.report:
        folder = VARIANTS[a.variant][0]
        rows = [run_cell(c, a.variant) for c in todo if os.path.exists(os.path.join(c, folder, "clean.json"))]
        frame = pd.DataFrame(rows)
        frame.to_csv(os.path.splitext(a.report)[0] + ".csv", index=False)
        text = report(frame, a.variant)
        open(a.report, "w").write(text + "\n")
        print(text)
        return 0
    for c in todo[i::k]:
        r = run_cell(c, a.variant)
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
