"""Would averaging `valuekit clean`'s candidates beat picking one? Re-read a `valuekit bench outcome --runs-dir RUNS`
grid and score ensembles of the candidates each cell already trained (no retraining).

Every cell's clean run trained 4-5 candidates (uniform, dds, mwnet, clean+retrain, weighted+retrain), each
early-stopped on half A of the dev table. An ensemble here is the mean of the candidates' softmax probabilities
(their best.pt models, `valuekit.api.evaluate(...)["probs"]`), predicting the class of highest mean probability.
Rules, each scored by the test accuracy of the model it hands over (half-A models, before any refit), against the
better of the cell's two early-stopped uniform runs, per (data set, noise) averaged over the seeds:

* clean's rule: the candidate with the best half-B accuracy (first maximum);
* ensemble (all): every candidate averaged;
* ensemble as a candidate: the ensemble of all joins the candidates (last, so ties go to a single model) and the
  half-B accuracy picks;
* uniform + pick: the ensemble of uniform and clean's pick (the pick alone when the pick is uniform);
* top-2 by half B: the ensemble of the two candidates with the best half-B accuracy.

The rule for adoption was fixed before the run: a variant replaces clean's rule only if on the choice sets it
raises the mean gain by >= 1 point without lowering the number of cells at or above uniform; among several such,
the one with the highest choice-set mean. The held-out sets are then only reported.

    python scripts/outcome_ensemble.py RUNS [--out reports/outcome-ensemble.csv]
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

CHOICE = set(CHOICE_SETS)


def cell_probs(base: str) -> tuple[pd.DataFrame, dict, dict, np.ndarray, np.ndarray]:
    """A cell's candidates, their half-B and test probabilities, and the half-B and test labels (class codes)."""
    from valuekit.api import evaluate
    from valuekit.data.tables import load_table
    from valuekit.pipeline import split_dev

    record = json.load(open(os.path.join(base, "clean", "clean.json")))
    dev = pd.read_parquet(os.path.join(base, "data", "dev.parquet"))
    half_a = split_dev(dev["label"].to_numpy(), seed=record["seed"])
    train = load_table(os.path.join(base, "data", "train.parquet"))
    dev_b = dev[~half_a].reset_index(drop=True)
    test = pd.read_parquet(os.path.join(base, "data", "test.parquet"))
    cands = pd.read_parquet(os.path.join(base, "clean", "candidates.parquet"))
    pb, pt = {}, {}
    for _, c in cands.iterrows():
        eb = evaluate(dev_b, c.run_dir, train=train)
        et = evaluate(test, c.run_dir, train=train)
        assert abs(eb["acc"] - c.dev_b_acc) < 1e-9 and abs(et["acc"] - c.test_acc) < 1e-9
        pb[c.candidate], pt[c.candidate] = eb["probs"], et["probs"]
        yb, yt = eb["labels"], et["labels"]
    return cands, pb, pt, yb, yt


def acc(p: np.ndarray, y: np.ndarray) -> float:
    return float((p.argmax(1) == y).mean())


def top_k_acc(names: list, judged, probs: dict, y: np.ndarray, k: int = 2) -> tuple[float, list]:
    """Accuracy of the mean probabilities of the k candidates with the best judged accuracy (ties: the earlier
    candidate, as `valuekit clean` orders them) and those candidates."""
    order = [names[i] for i in np.argsort(-np.asarray(judged), kind="stable")[:k]]
    return acc(np.mean([probs[n] for n in order], axis=0), y), order


def rules(cands: pd.DataFrame, pb: dict, pt: dict, yb: np.ndarray, yt: np.ndarray) -> dict[str, float]:
    names = list(cands.candidate)
    b = cands.dev_b_acc.to_numpy()
    pick = names[int(np.argmax(b))]
    mean = lambda ps: np.mean(ps, axis=0)  # noqa: E731
    ens_b, ens_t = mean([pb[n] for n in names]), mean([pt[n] for n in names])
    out = {"clean's rule (half-B pick)": acc(pt[pick], yt), "ensemble (all candidates)": acc(ens_t, yt)}
    out["ensemble as a candidate"] = acc(ens_t, yt) if acc(ens_b, yb) > b.max() else acc(pt[pick], yt)
    out["uniform + pick"] = acc(mean([pt["uniform"], pt[pick]]), yt) if pick != "uniform" else acc(pt[pick], yt)
    out["top-2 by half B"] = top_k_acc(names, b, pt, yt)[0]
    out["oracle single candidate (not a rule)"] = max(acc(pt[n], yt) for n in names)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("--out", default=None, help="per-cell CSV")
    a = ap.parse_args(argv)
    res = []
    for cj in sorted(glob.glob(os.path.join(a.runs, "*/*/*/cell.json"))):
        base = os.path.dirname(cj)
        if not os.path.exists(os.path.join(base, "clean", "candidates.parquet")):
            continue
        row = json.load(open(cj))["row"]
        for name, test in rules(*cell_probs(base)).items():
            res.append({"rule": name, "dataset": row["dataset"], "setting": row["setting"], "seed": row["seed"],
                        "test": test, "uniform": max(row["uniform"], row["uniform (whole dev)"]),
                        "cleanlab": row["cleanlab+retrain"], "held_out": row["dataset"] not in CHOICE})
        print(base, flush=True)
    frame = pd.DataFrame(res)
    if a.out:
        frame.to_csv(a.out, index=False)
    cells = frame.groupby(["rule", "held_out", "dataset", "setting"], sort=False)[["test", "uniform", "cleanlab"]]
    cells = cells.mean().reset_index()
    cells["gain"] = 100 * (cells.test - cells.uniform)
    print("| rule | sets | cells | mean gain (points) | >= +1 | >= 0 | worst | >= cleanlab |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for held in (False, True):
        for rule, g in cells[cells.held_out == held].groupby("rule", sort=False):
            print(f"| {rule} | {'held-out' if held else 'choice'} | {len(g)} | {g.gain.mean():+.2f} | "
                  f"{int((g.gain >= 1).sum())} | {int((g.gain >= 0).sum())} | {g.gain.min():+.1f} | "
                  f"{int((g.test >= g.cleanlab).sum())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
