"""Should clean+retrain drop the rows flagged by the audit of *all* of clean's runs (uniform and the learned methods)
instead of the uniform run's alone? Re-read a `valuekit bench outcome --runs-dir RUNS` grid and measure it on the
models `valuekit clean` hands over (half-A models, no refit).

Per cell, uniform is retrained early-stopped on half A (the cell's steps and seed, as `clean` trains its candidates)
on the training table without the rows `analysis.mislabel.audit` flags over the clean run's uniform, dds and mwnet
runs (into <cell>/extra-cleanall/). It replaces the clean+retrain candidate, and the top-2 ensemble by half-B
accuracy (`clean`'s rule; scripts/outcome_ensemble.py) is formed again. Scores: test accuracy of the half-A
ensemble against the better of the cell's two early-stopped uniform runs, per (set, noise) over the seeds.

The rule for adoption, fixed before the run: the all-runs flags replace the uniform run's in `clean` only if on the
choice sets the top-2 ensemble's mean gain rises by >= 1 point without lowering the number of cells at or above
uniform. The held-out sets are only reported.

    python scripts/outcome_audit_flags.py RUNS [--part I/K] [--report OUT.md]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import pandas as pd

from valuekit.bench.outcome import CHOICE_SETS

CHOICE = set(CHOICE_SETS)


def run_cell(cell: str) -> dict:
    import valuekit
    from valuekit.analysis.mislabel import audit
    from valuekit.api import evaluate
    from valuekit.data.tables import load_table
    from valuekit.pipeline import split_dev

    sys.path.insert(0, os.path.dirname(__file__))
    from outcome_ensemble import cell_probs, top_k_acc

    key = json.load(open(os.path.join(cell, "cell.json")))
    row, methods = key["row"], key["key"]["methods"]
    cands, pb, pt, yb, yt = cell_probs(cell)
    data = os.path.join(cell, "data")
    df = pd.read_parquet(os.path.join(data, "train.parquet"))
    runs = [os.path.join(cell, "clean", "runs", m) for m in ("uniform", *methods)]
    flags = audit(runs, df, predict=False)
    flagged = set(flags.id[flags.is_label_issue])
    kept = df[~df.id.isin(flagged)].reset_index(drop=True)
    tr = load_table(os.path.join(data, "train.parquet"))
    dev = pd.read_parquet(os.path.join(data, "dev.parquet"))
    half_a = split_dev(dev.label.to_numpy(), seed=row["seed"])
    out = os.path.join(cell, "extra-cleanall")
    kept_ds = load_table(kept, like=tr)
    run = valuekit.train(kept_ds, load_table(dev[half_a].reset_index(drop=True), like=tr, name="dev"),
                         load_table(os.path.join(data, "test.parquet"), like=tr, name="test"), out=out,
                         method="uniform", steps=key["key"]["steps"], seed=row["seed"], device="cpu",
                         early_stopping=True, progress=False, overwrite=True)
    eb = evaluate(dev[~half_a].reset_index(drop=True), run, train=tr)
    et = evaluate(os.path.join(data, "test.parquet"), run, train=tr)

    names, b = list(cands.candidate), list(cands.dev_b_acc)
    before, members_before = top_k_acc(names, b, pt, yt)
    if "clean+retrain" in names:
        i = names.index("clean+retrain")
        b[i] = eb["acc"]
    else:  # the uniform audit flagged nothing or everything: the candidate joins after uniform and the methods
        i = 1 + len(methods)
        names.insert(i, "clean+retrain")
        b.insert(i, eb["acc"])
    after, members_after = top_k_acc(names, b, {**pt, "clean+retrain": et["probs"]}, yt)
    return {"dataset": row["dataset"], "setting": row["setting"], "seed": row["seed"],
            "uniform": max(row["uniform"], row["uniform (whole dev)"]), "cleanlab": row["cleanlab+retrain"],
            "flagged_uniform": row["clean_flagged"], "flagged_all": len(flagged), "retrain_all_test": et["acc"],
            "retrain_uniform_test": row["clean+retrain"], "top2": before, "top2_members": ",".join(members_before),
            "top2_all_flags": after, "top2_all_flags_members": ",".join(members_after),
            "held_out": row["dataset"] not in CHOICE}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("--part", default="0/1")
    ap.add_argument("--report", default=None)
    a = ap.parse_args(argv)
    i, k = (int(x) for x in a.part.split("/"))
    cells = sorted(os.path.dirname(c) for c in glob.glob(os.path.join(a.runs, "*/*/*/cell.json")))
    if a.report:
        rows = [json.loads(line) for f in glob.glob(os.path.join(a.runs, "audit-flags-*.jsonl")) for line in open(f)]
        frame = pd.DataFrame(rows)
        frame.to_csv(os.path.splitext(a.report)[0] + ".csv", index=False)
        g = frame.groupby(["held_out", "dataset", "setting"])[
            ["uniform", "cleanlab", "top2", "top2_all_flags", "retrain_uniform_test", "retrain_all_test"]].mean()
        lines = ["| candidate flags | sets | cells | top-2 mean gain over uniform ES (points) | >= +1 | >= 0 | worst | "
                 "clean+retrain alone, mean gain |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for col, alone, name in (("top2", "retrain_uniform_test", "uniform run's audit (clean now)"),
                                 ("top2_all_flags", "retrain_all_test", "audit of all runs")):
            for held, h in g.groupby(level=0):
                gain = 100 * (h[col] - h.uniform)
                lines.append(f"| {name} | {'held-out' if held else 'choice'} | {len(h)} | {gain.mean():+.2f} | "
                             f"{int((gain >= 1).sum())} | {int((gain >= 0).sum())} | {gain.min():+.1f} | "
                             f"{100 * (h[alone] - h.uniform).mean():+.2f} |")
        text = "\n".join(lines)
        open(a.report, "w").write(text + "\n")
        print(text)
        return 0
    with open(os.path.join(a.runs, f"audit-flags-{i}.jsonl"), "a") as f:
        for c in cells[i::k]:
            f.write(json.dumps(run_cell(c)) + "\n")
            f.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
