"""`valuekit bench outcome`: does the user end up with a better model? Every pipeline `valuekit clean` weighs, the
pick it makes, and cleanlab's pipeline, on the same prepared tables, the same model and the same early stopping.

For each data set x noise setting x seed (`prepare` writes train/dev/test; flips in train only):

* `valuekit.clean(train, dev, test=test, methods=...)`: its candidates, each early-stopped on half A of the dev
  table: uniform, each learned method, clean+retrain (uniform without the rows the uniform run's audit flags);
  its pick (the best half-B accuracy) and the model it hands over (the pick and the runner-up, refitted on the
  whole dev table and averaged). Every accuracy is the test accuracy of the early-stopped model;
* uniform early-stopped on the *whole* dev table (what a user without `clean` would train);
* cleanlab + retrain: `cleanlab.filter.find_label_issues` on 5-fold out-of-sample probabilities of an early-stopped
  scikit-learn MLP (`bench.quality.cv_probs_early_stopped`), then uniform retrained without those rows, early-stopped
  on half A like clean+retrain;
* detection against the hidden is_noisy: F1@k (k = number of flipped rows) of the audit's label_score over the
  uniform run (the flags clean+retrain uses) and over the uniform and method runs, against F1@k of cleanlab's label
  quality; F1 of the flags each retrain actually dropped; per run, AUROC of `value` and of the same run's -mean_loss.

`outcome.md` holds the per-cell table, the detection tables, the issue's acceptance checks computed from the same
numbers, and a "which pipeline when" table (best mean test accuracy per noise kind, with how close the runner-up is).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

SETTINGS = {
    "sym30": {"noise": 0.3},
    "pair40": {"noise": 0.4, "noise_kind": "pair"},
    "inst30": {"noise": 0.3, "noise_kind": "instance"},
    "lt10+sym20": {"imbalance": 10.0, "noise": 0.2},
}
SETTING_DOC = {"sym30": "30 % symmetric flips", "pair40": "40 % pair flips (c -> c+1)",
               "inst30": "30 % instance-dependent flips", "lt10+sym20": "long tail 10:1 + 20 % symmetric flips"}
# the sets the pipeline's choices were made on, and the sets held out to report them (reports/outcome.md)
CHOICE_SETS = ("digits", "breast-cancer", "wine", "iris", "segment")
HELD_OUT_SETS = ("phishing", "banana", "penguins", "seattle-weather", "mnist5k", "fashion-mnist")
DATASETS = (*CHOICE_SETS, *HELD_OUT_SETS)
# the two 784-feature image sets are capped for CPU time (as in reports/quality.md for fashion-mnist)
PREPARE = {"mnist5k": {"max_train": 3000}, "fashion-mnist": {"max_train": 3000, "test_fraction": 0.05}}
CELL_VERSION = 3  # bumped when the pipeline's candidates change: older cell.json files are measured again
QUICK = {"datasets": ("wine",), "settings": ("sym30", "pair40"), "steps": 40, "seeds": (0,), "methods": ("dds",)}
PIPELINES = ("uniform", "uniform (whole dev)", "clean+retrain", "weighted+retrain", "cleanlab+retrain")


def _cleanlab(x, y, num_classes: int, *, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(label quality, is_label_issue, folds) from cleanlab on out-of-sample probabilities of an early-stopped MLP;
    fewer folds when the smallest class has fewer than 5 rows."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from valuekit.bench.quality import cv_probs_early_stopped

    folds = int(min(5, np.bincount(y, minlength=num_classes)[np.bincount(y, minlength=num_classes) > 0].min()))
    probs = cv_probs_early_stopped(x, y, num_classes, seed=seed, folds=max(folds, 2))
    # one process: cleanlab's default pool forks, and a fork of a process with live threads can deadlock
    return get_label_quality_scores(y, probs), find_label_issues(y, probs, n_jobs=1), max(folds, 2)


def _flag_f1(flags, noisy) -> float:
    flags, noisy = np.asarray(flags, dtype=bool), np.asarray(noisy, dtype=bool)
    tp = int((flags & noisy).sum())
    return 2 * tp / (flags.sum() + noisy.sum()) if flags.sum() + noisy.sum() else float("nan")


def run_cell(name: str, setting: str, seed: int, folder: Path, *, methods, steps: int, device: str = "cpu",
             log=print) -> tuple[dict, list[dict]]:
    """(the cell's row, per-run AUROC rows) of one data set x setting x seed; everything written under `folder`."""
    import valuekit
    from valuekit.analysis.mislabel import audit, detection_metrics
    from valuekit.bench.quality import _auroc
    from valuekit.data.bundled import prepare
    from valuekit.data.tables import load_table
    from valuekit.pipeline import clean, split_dev
    from valuekit.runs.reader import read_run

    t0 = time.perf_counter()
    paths = prepare(name, folder / "data", seed=seed, **SETTINGS[setting], **PREPARE.get(name, {}))
    df, dev_df = pd.read_parquet(paths["train"]), pd.read_parquet(paths["dev"])
    noisy = df["is_noisy"].to_numpy(dtype=bool)
    base = {"dataset": name, "setting": setting, "seed": seed}
    rec = clean(paths["train"], paths["dev"], test=paths["test"], out=folder / "clean", methods=list(methods),
                steps=steps, seed=seed, device=device)
    cands = pd.DataFrame(rec["candidates"]).set_index("candidate")
    row = {**base, "rows": len(df), "classes": int(df.label.nunique()), "noisy": int(noisy.sum()),
           **{c: float("nan") for c in ("uniform", *methods, "clean+retrain", "weighted+retrain")}}  # skipped: NaN
    for c in cands.index:
        row[c] = float(cands.test_acc[c])
    # clean = the model `clean` hands over (its members refitted on the whole dev table, averaged); clean (pick) =
    # the pick's refit alone; clean (half A) = the pick's own half-A model
    row["clean"], row["clean (pick)"] = rec["test_acc"], rec["test_acc_pick"]
    row["clean (half A)"], row["clean_pick"] = rec["test_acc_half_a"], rec["pick"]
    row["clean_flagged"] = rec["flagged_rows"]
    common = dict(steps=steps, seed=seed, device=device, early_stopping=True, progress=False)
    if rec["pick"] == "uniform":  # the refit is this very run (same table, dev table, seed and settings)
        row["uniform (whole dev)"] = rec["test_acc_pick"]
    else:
        whole = valuekit.train(paths["train"], paths["dev"], paths["test"], out=folder / "uniform-whole-dev",
                               **common)
        row["uniform (whole dev)"] = float(whole.meta["best_metrics"]["test_acc"])

    tr = load_table(paths["train"])
    x, y = tr.x.numpy().astype(np.float64), tr.y.numpy()
    quality, issues, folds = _cleanlab(x, y, tr.num_classes, seed=seed)
    kept = df[~issues].reset_index(drop=True)
    dev_a = dev_df[split_dev(dev_df.label.to_numpy(), seed=seed)].reset_index(drop=True)
    kept_ds = load_table(kept, like=tr)  # like: the table's metadata (an image shape) and class codes carry over
    cl = valuekit.train(kept_ds, load_table(dev_a, like=kept_ds, name="dev"),
                        load_table(paths["test"], like=kept_ds, name="test"), out=folder / "cleanlab-retrain", **common)
    row["cleanlab+retrain"] = float(cl.meta["best_metrics"]["test_acc"])
    row["cleanlab_flagged"], row["cleanlab_folds"] = int(issues.sum()), folds

    runs_dir = folder / "clean" / "runs"
    uni_dir = runs_dir / "uniform"
    order = df.id.to_numpy()
    one = audit([uni_dir], df, predict=False).set_index("id").reindex(order)
    every = audit([uni_dir, *[runs_dir / m for m in methods]], df, predict=False).set_index("id").reindex(order)
    row["audit_f1_at_k"] = detection_metrics(one.label_score.to_numpy(), noisy)["f1_at_k"]
    row["audit_all_f1_at_k"] = detection_metrics(every.label_score.to_numpy(), noisy)["f1_at_k"]
    row["cleanlab_f1_at_k"] = detection_metrics(quality, noisy)["f1_at_k"]
    row["audit_flag_f1"] = _flag_f1(one.is_label_issue.to_numpy(), noisy)
    row["cleanlab_flag_f1"] = _flag_f1(issues, noisy)
    aurocs = []
    for m in ("uniform", *methods):
        vals = read_run(runs_dir / m).values().set_index("example_id").reindex(order)
        aurocs.append({**base, "method": m, "auroc_value": _auroc(vals.value, noisy),
                       "auroc_neg_mean_loss": _auroc(-vals.mean_loss, noisy)})
    row["seconds"] = time.perf_counter() - t0
    log(f"{name} {setting} seed {seed}: uniform {row['uniform']:.3f} clean {row['clean']:.3f} ({rec['pick']}) "
        f"cleanlab {row['cleanlab+retrain']:.3f}  F1@k audit {row['audit_f1_at_k']:.3f} cleanlab "
        f"{row['cleanlab_f1_at_k']:.3f}  {row['seconds']:.0f}s")
    return row, aurocs


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _pm(values, digits: int = 3) -> str:
    v = np.asarray(values, dtype=float)
    return _fmt(v.mean(), digits) + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")


def which_when(frame: pd.DataFrame, pipelines: list[str]) -> list[str]:
    """Per noise setting: the pipeline with the best mean test accuracy over the cells, the runner-up and the gap,
    and on how many data sets the winner is the best of the pipelines."""
    lines = ["| noise | cells | best mean test acc | runner-up | gap | best on data sets | verdict |",
             "|---|---|---|---|---|---|---|"]
    for setting, g in frame.groupby("setting", sort=False):
        means = g[pipelines].mean().sort_values(ascending=False)
        first, second = means.index[0], means.index[1]
        per_set = g.groupby("dataset")[pipelines].mean()
        wins = int((per_set[first] >= per_set.max(axis=1) - 1e-12).sum())
        gap = means.iloc[0] - means.iloc[1]
        notes = [f"best on only {wins} of {per_set.shape[0]} sets"] if wins < per_set.shape[0] else []
        if len(g) < 3 * per_set.shape[0] or per_set.shape[0] < 3:
            notes.append("< 3 seeds or sets: indicative only")
        verdict = ("too close to tell (< 1 point)" if gap < 0.01 else
                   first + (f" ({'; '.join(notes)})" if notes else ""))
        lines.append(f"| {SETTING_DOC.get(setting, setting)} | {len(g)} | {first} {means.iloc[0]:.3f} | "
                     f"{second} {means.iloc[1]:.3f} | {gap * 100:+.1f} pt | {wins} of {per_set.shape[0]} | {verdict} |")
    return lines


def refit_gain(frame: pd.DataFrame) -> list[str]:
    """Per noise setting and data-set role: the mean gain of the refit over the half-A model and how many cells it
    raised, left equal and lowered."""
    d = frame.assign(gain=frame["clean (pick)"] - frame["clean (half A)"], role=[role(x) for x in frame.dataset])
    rows = [{"setting": s, "role": r, "cells": len(g), "mean gain (pt)": round(g.gain.mean() * 100, 2),
             "up": int((g.gain > 1e-12).sum()), "equal": int((g.gain.abs() <= 1e-12).sum()),
             "down": int((g.gain < -1e-12).sum())} for (s, r), g in d.groupby(["setting", "role"], sort=False)]
    rows.append({"setting": "all", "role": "all", "cells": len(d), "mean gain (pt)": round(d.gain.mean() * 100, 2),
                 "up": int((d.gain > 1e-12).sum()), "equal": int((d.gain.abs() <= 1e-12).sum()),
                 "down": int((d.gain < -1e-12).sum())})
    from valuekit.bench.common import markdown_table

    return markdown_table(pd.DataFrame(rows))


def role(dataset: str) -> str:
    """`choice` for the sets the pipeline's choices were made on, `held-out` for the others."""
    return "choice" if dataset in CHOICE_SETS else "held-out"


def criteria(frame: pd.DataFrame, *, clean: str = "clean") -> list[str]:
    """The issue's acceptance checks for the pipeline column `clean`, from the per-cell numbers averaged over seeds
    per data set x setting; each check also counted on the held-out sets alone."""
    g = frame.groupby(["dataset", "setting"], sort=False)[
        [clean, "uniform", "uniform (whole dev)", "cleanlab+retrain", "audit_f1_at_k", "cleanlab_f1_at_k"]].mean()
    held = np.array([role(d) == "held-out" for d in g.index.get_level_values(0)])
    noisy = list(g.index.get_level_values(1).unique())  # every setting here flips >= 20 % of the labels
    base = g[["uniform", "uniform (whole dev)"]].max(axis=1)  # the stronger of the two early-stopped uniforms
    c = g[clean]

    def count(ok) -> str:
        ok = np.asarray(ok)
        return (f"{'PASS' if ok.all() else 'FAIL'} ({int(ok.sum())} of {len(ok)} sets; held-out "
                f"{int(ok[held].sum())} of {int(held.sum())})")

    out = [f"- `{clean}` ≥ early-stopped uniform (the better of half-A / whole-dev stopping) + 1 point on every set "
           f"with ≥ 20 % noise: {count(c >= base + 0.01)}; settings {', '.join(noisy)}",
           f"- `{clean}` never below early-stopped uniform: {count(c >= base - 1e-12)}; worst "
           f"{(c - base).min() * 100:+.1f} pt",
           f"- `{clean}` ≥ cleanlab + retrain on every set: {count(c >= g['cleanlab+retrain'] - 1e-12)}"]
    if clean == "clean":
        ok = g.audit_f1_at_k >= g.cleanlab_f1_at_k + 0.02
        out.append(f"- audit F1@k ≥ cleanlab's + 0.02 on every set: {count(ok)}" + ("; where not:" if not ok.all()
                                                                                   else ""))
        for (d, s), r in g[~ok].iterrows():
            out.append(f"  - {d} {s}: audit {r.audit_f1_at_k:.3f}, cleanlab {r.cleanlab_f1_at_k:.3f}")
    return out


def write_report(out: Path, frame: pd.DataFrame, aurocs: pd.DataFrame, *, command: str, device: str, steps: int,
                 methods) -> Path:
    from valuekit.bench.common import header, markdown_table, stem, write

    pipes = ["uniform", "uniform (whole dev)", *methods, "clean+retrain", "weighted+retrain", "cleanlab+retrain"]
    frame = frame.assign(role=[role(d) for d in frame.dataset])
    sets = ", ".join(f"{d} ({role(d)})" for d in dict.fromkeys(frame.dataset))
    lines = header("Outcome: which pipeline gives the user the better model", command, device)
    lines += [f"Model: MLP (valuekit default), {steps} steps, batch 64; every accuracy is the test accuracy of an "
              "early-stopped model. `uniform`, the methods and the retrains stop on half A of the dev table "
              "(`valuekit clean`'s split); `uniform (whole dev)` stops on the whole dev table. `clean` is the test "
              "accuracy of the model `valuekit clean` hands over: the mean of the probabilities of the two candidates "
              "best by half-B accuracy (the first is `pick`), each refitted on the whole dev table; `clean (pick)` "
              "is the pick's refit alone and `clean (half A)` the pick's own half-A model. weighted+retrain: uniform "
              "with each row's loss multiplied by the exported weight of the learned method with the best half-A "
              "accuracy. cleanlab: find_label_issues on 5-fold out-of-sample "
              "probabilities of an early-stopped scikit-learn MLP, then the same uniform retraining. F1@k: k = "
              "number of flipped rows; audit = label_score of the uniform run (the flags clean+retrain drops), "
              "audit (all) = over the uniform and method runs.", "",
              f"Data sets (choice = the pipeline's choices were made on it; held-out = only reported): {sets}.", "",
              "## Test accuracy per cell", ""]
    cols = ["dataset", "setting", "seed", *pipes, "clean (half A)", "clean (pick)", "clean", "clean_pick"]
    lines += markdown_table(frame[cols].round(3), digits=3)
    if frame.seed.nunique() > 1:
        lines += ["", "## Mean ± sd over seeds", ""]
        agg = frame.groupby(["dataset", "setting"], sort=False)
        rows = [{"dataset": d, "setting": s, **{p: _pm(g[p]) for p in [*pipes, "clean (half A)", "clean (pick)",
                                                                        "clean"]}}
                for (d, s), g in agg]
        lines += markdown_table(pd.DataFrame(rows))
    lines += ["", "## Does the refit on the whole dev table help? (clean (pick) - clean (half A), per cell)", "",
              *refit_gain(frame)]
    lines += ["", "## Mislabel detection", ""]
    det = ["dataset", "setting", "seed", "noisy", "audit_f1_at_k", "audit_all_f1_at_k", "cleanlab_f1_at_k",
           "clean_flagged", "audit_flag_f1", "cleanlab_flagged", "cleanlab_flag_f1"]
    lines += markdown_table(frame[det].round(3), digits=3)
    lines += ["", "AUROC of each run's `value` against the same run's -mean_loss (higher = flipped rows ranked lower):",
              ""]
    piv = aurocs.groupby(["setting", "method"], sort=False)[["auroc_value", "auroc_neg_mean_loss"]].mean()
    piv["value - loss"] = piv.auroc_value - piv.auroc_neg_mean_loss
    lines += markdown_table(piv.reset_index().round(3), digits=3)
    lines += ["", "## Acceptance checks (computed from the tables above)", "",
              "The model `clean` hands over (two candidates refitted and averaged):", "", *criteria(frame), "",
              "The pick alone, refitted:", "", *criteria(frame, clean="clean (pick)"), "",
              "Without the refit (the picked candidate's half-A model):", "", *criteria(frame, clean="clean (half A)"),
              "",
              "## Which pipeline when (from these measurements only)", "",
              *which_when(frame, [*pipes[:1], *pipes[2:]]), "",
              "`uniform (whole dev)` is left out of this table: it is not one of the pipelines `clean` chooses from. "
              "A verdict with fewer than three data sets or seeds per noise kind is indicative only.", ""]
    full = frame.merge(aurocs.groupby(["dataset", "setting", "seed"]).apply(
        lambda g: pd.Series({f"auroc_{r.method}_{k}": getattr(r, k) for r in g.itertuples()
                             for k in ("auroc_value", "auroc_neg_mean_loss")}), include_groups=False).reset_index(),
        on=["dataset", "setting", "seed"])
    return write(out, stem("outcome", device), lines, full)


def _cell(name: str, setting: str, seed: int, folder: Path, *, methods, steps: int, device: str, log):
    """One cell's numbers: read from FOLDER/cell.json when a run with the same methods and steps recorded them
    there (a stopped bench continues where it was), else measured by `run_cell` (a partial cell is redone)."""
    import json
    import shutil

    saved = folder / "cell.json"
    key = {"methods": list(methods), "steps": steps, "device": device, "version": CELL_VERSION}
    if saved.exists():
        got = json.loads(saved.read_text())
        if got.get("key") == key:
            log(f"{name} {setting} seed {seed}: recorded in {saved}")
            return got["row"], got["aurocs"]
    if folder.exists():
        shutil.rmtree(folder)
    row, aurocs = run_cell(name, setting, seed, folder, methods=methods, steps=steps, device=device, log=log)
    plain = lambda v: v.item() if hasattr(v, "item") else str(v)  # noqa: E731
    saved.write_text(json.dumps({"key": key, "row": row, "aurocs": aurocs}, default=plain))
    return row, aurocs


def bench_outcome(out: Path, *, command: str, device: str = "cpu", quick: bool = False, datasets=None, seeds=None,
                  methods=None, steps: int | None = None, settings=None, runs_dir=None, log=print) -> Path:
    """Run every cell and write OUT/outcome.md and outcome.csv; run directories under `runs_dir` (a temporary
    folder when None), where each finished cell's numbers are kept in cell.json and reused by the next run."""
    import tempfile

    from valuekit.pipeline import AUTO_METHODS

    d = QUICK if quick else {}
    datasets = tuple(datasets or d.get("datasets", DATASETS))
    settings = tuple(settings or d.get("settings", tuple(SETTINGS)))
    seeds = tuple(seeds if seeds is not None else d.get("seeds", (0, 1, 2)))
    methods = tuple(methods or d.get("methods", AUTO_METHODS))
    steps = steps or d.get("steps", 1500)
    rows, aurocs, md = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(runs_dir) if runs_dir else Path(tmp)
        # seeds outermost, and the report rewritten after every cell: a stopped run leaves whole seeds reported
        for seed in seeds:
            for name in datasets:
                for setting in settings:
                    row, au = _cell(name, setting, seed, root / name / setting / str(seed), methods=methods,
                                    steps=steps, device=device, log=log)
                    rows.append(row)
                    aurocs += au
                    md = write_report(Path(out), pd.DataFrame(rows), pd.DataFrame(aurocs), command=command,
                                      device=device, steps=steps, methods=methods)
    return md
