"""`valuekit.clean` (this module, `valuekit.pipeline`): one call from a noisy table and a trusted dev table to a
better table and model.

    result = valuekit.clean("train.parquet", "dev.parquet", test="test.parquet", out="cleaned")

The dev table is split once, stratified by class, with a seeded torch.Generator into two halves:

* half A is every candidate's dev set: early stopping picks each candidate's checkpoint by it, and the learned
  methods learn their weights from it;
* half B only judges: every candidate's best-dev model is scored on it, and the candidate with the highest half-B
  accuracy is the pick. Half B never chose a checkpoint, so the pick's half-B accuracy is not fitted twice
  (it is still the maximum over the candidates, hence optimistic by the usual winner's margin).

Candidates, from the simplest pipeline to the most elaborate (ties go to the earlier one):

1. ``uniform``: plain training with early stopping;
2. each learned method of `methods` (``auto``: dds and mwnet), with early stopping;
3. ``clean+retrain``: uniform retrained on the table without the rows that `valuekit audit` flags
   (analysis.mislabel.audit on the uniform run: the two-means split of its label_score);
4. ``weighted+retrain`` (with `weighted=True` and a learned method): uniform retrained with each row's loss
   multiplied by the exported `weight` (export.scoring.score, mean 1) of the learned method with the best half-A
   accuracy (half A, so that half B judges this candidate once, like the others);
5. ``subset+retrain`` (with `subset=True`): uniform retrained on the top `keep_fraction` of rows by the value of the
   learned method with the best half-B accuracy.

With `cross_fit=True` every candidate is trained a second time with the halves' roles swapped (fitted on half B,
judged on half A; in runs/swapped/), and the pick is the candidate with the best accuracy over all dev rows, each
half judged by the candidate's model that did not see it: twice the judging rows for twice the training, which
matters on small dev tables, where half-B accuracy moves in steps of 10-20 points. Measured on the outcome grid it is
no better than the half-B pick (+0.3 points on the choice sets, -0.7 on the held-out ones; reports/outcome-pick.md),
so it is off by default.

With `refit=True` the picked pipeline is then trained once more, early-stopped on (and, for a learned method,
learning from) the *whole* dev table: half A alone costs accuracy on small dev tables (reports/outcome.md), and
the choice is already made. The refit's table is what the user gets; clean.json keeps the half-A model's test
accuracy beside the refit's.

The model handed over is an ensemble of the `ensemble` (default 2) candidates best by the judged accuracy (the
pick first, then the runner-up; ties to the simpler pipeline), each refitted: it predicts the class of highest mean
softmax probability (`predict`). It was chosen by a rule fixed in advance on the outcome grid's saved candidates
(half-A models: the two best by half-B accuracy averaged were +1.5 points above the pick alone on the five sets the
choice was made on, +1.0 on six held-out sets), then measured as this function on the same 132 cells: +4.0 points
over early-stopped uniform on the choice sets (the pick alone +2.2) and +0.8 on the held-out ones (the pick alone
-0.3; reports/outcome-ensemble.md). Averaging two good candidates spends less on the pick's noise, on a half B of a
few rows per class, than betting on one. `ensemble=1` hands over the pick alone.

``auto`` is dds and mwnet because, in the measurements behind this command (five tabular sets: 30 % symmetric,
40 % pair, 30 % instance-dependent and long-tail noise), DDS was the one method far above early-stopped training on
structured (pair) flips and MW-Net the best on the long-tail set; clean+retrain was best or close on symmetric
flips. The half-B spread is the standard deviation of the accuracy over `bootstrap` resamples of the half-B rows.

Outputs in `out`: table.parquet (the pick's table, every input column kept: all rows for uniform, the kept rows
for a retrain, the rows with `weight`/`value`/`rank` from export.scoring.score for a weighting method or the
weighted retrain), ensemble.pt (the members' names and best-dev state dicts, refitted unless `refit=False`;
`torch.load(..., weights_only=True)`; `predict` uses it), model.pt (the pick's state dict alone, for a single
network), candidates.parquet and clean.json (every candidate's half-A and half-B accuracy, spread, test accuracy,
run directory, whether it is the pick or a member; the pick and why; the refits' runs and accuracies; the
ensemble's test accuracy, `test_acc`, beside the pick's alone, `test_acc_pick`) and runs/<candidate>/ (the refits
in runs/<candidate>-refit/). `valuekit report OUT` renders the candidates, the pick and why, and the handed-over
runs as HTML (valuekit.reporting.clean_members).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from valuekit.config import METHODS
from valuekit.errors import InputError, held_warnings

AUTO_METHODS = ("dds", "mwnet")
CANDIDATE_DIRS = {"clean+retrain": "clean-retrain", "subset+retrain": "subset-retrain",
                  "weighted+retrain": "weighted-retrain"}
WEIGHT_COL = "__valuekit_weight"  # the weighted retrain's loss weights, beside the input's own columns


def _read(source, what: str) -> tuple[pd.DataFrame, str | None]:
    """A table as a DataFrame (Parquet, CSV or a DataFrame) and its path."""
    if isinstance(source, pd.DataFrame):
        return source, None
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{path}: {what} table not found")
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path), str(path)
    if path.suffix.lower() == ".csv":
        return pd.read_csv(path), str(path)
    raise InputError(f"{path}: {what} table must be .parquet or .csv")


def _methods(methods) -> list[str]:
    if methods is None or methods == "auto":
        return list(AUTO_METHODS)
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    for m in names:
        if m == "uniform":
            raise InputError("methods: 'uniform' is always a candidate; list only learned methods")
        if m not in METHODS:
            raise InputError(f"methods: unknown method {m!r} (known: {', '.join(sorted(METHODS))})")
    return list(dict.fromkeys(names))


def split_dev(labels, *, seed: int = 0) -> np.ndarray:
    """Boolean mask of half A of a dev table: within every class a seeded random floor(n_c / 2) (rounded up for
    every other odd class, so the halves differ by at most one row); the rest is half B."""
    import torch

    labels = np.asarray(labels)
    gen = torch.Generator().manual_seed(seed)
    mask = np.zeros(len(labels), dtype=bool)
    odd = 0
    for c in sorted(pd.unique(labels), key=str):
        idx = np.flatnonzero(labels == c)
        take = len(idx) // 2
        if len(idx) % 2:
            take += odd
            odd = 1 - odd
        perm = torch.randperm(len(idx), generator=gen).numpy()
        mask[idx[perm[:take]]] = True
    return mask


def bootstrap_std(correct, *, resamples: int = 1000, seed: int = 0) -> float:
    """Standard deviation of the accuracy over `resamples` bootstrap resamples (rows drawn with replacement)."""
    import torch

    correct = np.asarray(correct, dtype=np.float64)
    if len(correct) < 2:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(correct), (resamples, len(correct)), generator=gen).numpy()
    return float(correct[idx].mean(1).std(ddof=1))


@held_warnings()  # warnings while the tables are checked wait until the first run has passed its checks
def clean(table, dev, *, out, test=None, methods="auto", steps: int | None = None, seed: int = 0,
          subset: bool = False, keep_fraction: float = 0.5, weighted: bool = True, refit: bool = True,
          cross_fit: bool = False, ensemble: int = 2, bootstrap: int = 1000, id_col: str = "id",
          label_col: str = "label", log=None, overwrite: bool = False, **settings) -> dict:
    """Train the candidate pipelines of the module docstring on `table` with early stopping on half A of `dev`, pick
    the one with the best half-B accuracy (with `cross_fit`, the best accuracy over both halves, each judged by the
    candidate trained on the other), refit it and the next `ensemble - 1` candidates by that accuracy on the whole
    dev table (`refit`), and write the outputs to `out`. Returns the clean.json record. `settings` go to
    `valuekit.train` (batch_size, lr, hidden, device, ...). A folder `out` that is not empty is refused unless
    `overwrite=True`, which replaces the files and candidate runs a clean writes there (said on stderr) and keeps
    the folder's other files."""
    import torch

    from valuekit.analysis.mislabel import audit
    from valuekit.api import evaluate
    from valuekit.api import train as train_run
    from valuekit.data.tables import load_table
    from valuekit.export.scoring import score

    log = log or (lambda msg: None)
    if dev is None:
        raise InputError("valuekit.clean: a trusted dev table is required (dev=...)")
    names = _methods(methods)
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
        raise InputError(f"valuekit.clean: ensemble={ensemble!r}: must be a whole number >= 1 (1: the pick alone)",
                         cli=f"--ensemble {ensemble}: must be a whole number >= 1 (1: the pick alone)")
    if not 0 < keep_fraction < 1:
        raise InputError(f"valuekit.clean: keep_fraction={keep_fraction}: must be between 0 and 1")
    if settings.get("early_stopping") is False or "epochs" in settings:
        raise InputError("valuekit.clean: early stopping is always on and the length is `steps`")
    settings.pop("early_stopping", None)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"out={str(out)!r}: folder is not empty; pass overwrite=True to replace what an earlier clean "
                         "wrote there, or choose another out",
                         cli=f"-o {out}: folder is not empty; pass --overwrite to replace what an earlier clean wrote "
                             "there, or choose another -o")
    df, path = _read(table, "training")
    dev_df, dev_path = _read(dev, "dev")
    # messages name the file, or the argument a DataFrame came in (the dev halves are rows of the dev file)
    where = path or "training table (argument `table`)"
    dev_where = dev_path or "dev table (argument `dev`)"
    for frame, what in ((df, where), (dev_df, dev_where)):
        for col in (id_col, label_col):
            if col not in frame.columns:
                raise InputError(f"{what}: no column {col!r} (columns: {list(frame.columns)[:12]})")
    kw: dict[str, Any] = {"id_col": id_col, "label_col": label_col}
    tr = load_table(df if path is None else path, where=where, **kw)  # from the file: its metadata is kept
    half_a = split_dev(dev_df[label_col].to_numpy(), seed=seed)
    if half_a.all() or not half_a.any():
        raise InputError(f"{dev_where}: {len(dev_df)} rows: too few to split in two halves")
    dev_a = load_table(dev_df[half_a].reset_index(drop=True), like=tr, name="dev", where=dev_where, **kw)
    dev_b = load_table(dev_df[~half_a].reset_index(drop=True), like=tr, name="dev", where=dev_where, **kw)
    test_ds = None
    if test is not None:
        test_df, test_path = _read(test, "test")
        test_ds = load_table(test_df if test_path is None else test_path, like=tr, name="test",
                             where="test table (argument `test`)", **kw)

    runs_dir = out / "runs"
    common = dict(steps=steps, seed=seed, early_stopping=True, overwrite=overwrite, **{"progress": False, **settings})

    def fold(fit_dev, judge_dev, folder: Path, tag: str) -> dict:
        """Every candidate trained with early stopping on (and, for a learned method, learning from) `fit_dev` and
        judged on `judge_dev`: {"cands": records, "correct": candidate -> judged rows' correctness, "runs",
        "recipe": candidate -> (method, training table), "retrain": candidate -> its table, "flagged": ids}."""
        cands: list[dict] = []
        f: dict = {"cands": cands, "correct": {}, "runs": {}, "recipe": {}, "retrain": {}}

        def add(name: str, method: str, train_ds, note: str, rows: int):
            where_to = folder / CANDIDATE_DIRS.get(name, name)
            log(f"clean: training {name} ({method}, {rows} rows){tag}")
            run = train_run(train_ds, fit_dev, test_ds, out=where_to, method=method, **common)
            f["runs"][name], f["recipe"][name] = run, (method, train_ds)
            ev = evaluate(judge_dev, run, train=train_ds)
            f["correct"][name] = ev["correct"]
            best = run.meta["best_metrics"]
            cands.append({"candidate": name, "method": method, "rows": rows, "dev_a_acc": best["dev_acc"],
                          "dev_b_acc": ev["acc"],
                          "dev_b_std": bootstrap_std(ev["correct"], resamples=bootstrap, seed=seed),
                          "test_acc": best.get("test_acc") if test_ds is not None else None,
                          "best_step": run.meta["best_step"], "run_dir": str(where_to), "note": note})
            return run

        add("uniform", "uniform", tr, "plain training, early-stopped on half A", len(df))
        method_runs = {m: add(m, m, tr, f"{m} weights learned on half A", len(df)) for m in names}
        flags = audit([f["runs"]["uniform"]], df, predict=False, id_col=id_col, label_col=label_col)
        f["flagged"] = flagged = set(flags.id[flags.is_label_issue].tolist())
        keep = ~df[id_col].isin(flagged).to_numpy()
        if keep.all() or not keep.any():
            log(f"clean: the audit flags {int((~keep).sum())} of {len(df)} rows: clean+retrain skipped")
        else:
            kept = df[keep].reset_index(drop=True)
            add("clean+retrain", "uniform", load_table(kept, like=tr, where=where, **kw),
                f"uniform without the {int((~keep).sum())} rows the audit of the uniform run flags", len(kept))
            f["retrain"]["clean+retrain"] = kept
        if weighted and names:
            # the source of the weights is chosen by the fitting half (what the methods learned from), so that the
            # judging half judges the weighted retrain once, like every other candidate
            by_a = {c["candidate"]: c["dev_a_acc"] for c in cands}
            src = max(names, key=lambda m: (by_a[m], -names.index(m)))
            scored = score(df, method_runs[src].path, id_col=id_col, label_col=label_col)
            assert isinstance(scored, pd.DataFrame)
            # a private column name: the input table may have its own `weight`; like=tr keeps the features the same
            weighted_df = df.assign(**{WEIGHT_COL: scored["weight"].to_numpy()})
            add("weighted+retrain", "uniform",
                load_table(weighted_df, like=tr, weight_col=WEIGHT_COL, where=where, **kw),
                f"uniform with each row's loss multiplied by {src}'s exported weight (mean 1)", len(df))
            f["retrain"]["weighted+retrain"] = scored  # every input row with the weights it was trained on
        if subset and names:
            by_b = {c["candidate"]: c["dev_b_acc"] for c in cands}
            best_m = max(names, key=lambda m: (by_b[m], -names.index(m)))
            scored = score(df, method_runs[best_m].path, keep_fraction=keep_fraction, id_col=id_col,
                           label_col=label_col)
            assert isinstance(scored, pd.DataFrame)  # score() returns a DataFrame when no out= is given
            kept = df[scored["selected"].to_numpy(dtype=bool)].reset_index(drop=True)
            add("subset+retrain", "uniform", load_table(kept, like=tr, where=where, **kw),
                f"uniform on the top {keep_fraction:g} of rows by {best_m}'s value", len(kept))
            f["retrain"]["subset+retrain"] = kept
        return f

    main = fold(dev_a, dev_b, runs_dir, "")
    runs, recipe, retrain, flagged = main["runs"], main["recipe"], main["retrain"], main["flagged"]
    frame = pd.DataFrame(main["cands"])
    n_b = int((~half_a).sum())
    if cross_fit:
        # the same pipelines with the halves' roles swapped; each candidate is then judged on every dev row, each
        # half by the models that did not see it, which halves the judging noise of the pick on a small dev table
        swap = fold(dev_b, dev_a, runs_dir / "swapped", " (halves swapped)")
        both = {c: np.concatenate([main["correct"][c], swap["correct"][c]]) for c in frame.candidate
                if c in swap["correct"]}
        frame["dev_a_judged_acc"] = [float(swap["correct"][c].mean()) if c in both else np.nan for c in frame.candidate]
        frame["judged_acc"] = [float(both[c].mean()) if c in both else np.nan for c in frame.candidate]
        frame["judged_std"] = [bootstrap_std(both[c], resamples=bootstrap, seed=seed) if c in both else np.nan
                               for c in frame.candidate]
        what, n_judged = "cross-fitted dev accuracy (each half judged by the models fitted on the other)", len(dev_df)
    else:
        frame["judged_acc"], frame["judged_std"] = frame.dev_b_acc, frame.dev_b_std
        what, n_judged = "half-B accuracy", n_b
    judged = frame.judged_acc.fillna(-1.0).to_numpy()
    order = np.argsort(-judged, kind="stable")  # stable: among tied candidates the simpler pipeline comes first
    pick_i = int(order[0])
    pick = frame.iloc[pick_i]
    members = [str(frame.candidate.iloc[i]) for i in order[:ensemble]]
    frame["picked"] = np.arange(len(frame)) == pick_i
    frame["member"] = frame.candidate.isin(members)
    ties = [c for c in frame.candidate[judged == judged[pick_i]] if c != pick.candidate]
    uni_j = float(frame.judged_acc.iloc[0])
    why = (f"highest {what} {pick.judged_acc:.4f} ± {pick.judged_std:.4f} of {len(frame)} candidates "
           f"(uniform {uni_j:.4f}; {n_judged} judged rows)"
           + (f"; tied with {', '.join(ties)}, the simpler pipeline wins" if ties else ""))
    if len(members) > 1:
        why += f"; handed over averaged with the next by {what}: {', '.join(members[1:])}"

    member_runs = {m: runs[m] for m in members}
    run_dirs = dict(zip(frame.candidate, frame.run_dir))
    member_dirs = {m: Path(run_dirs[m]) for m in members}
    refit_rec, refits = None, {}
    if refit:  # the pick is made: the same pipelines again, early-stopped (and learning) on every dev row
        dev_all = load_table(dev_df, like=tr, name="dev", where=dev_where, **kw)
        for m in members:
            method, train_ds = recipe[m]
            folder = runs_dir / f"{CANDIDATE_DIRS.get(m, m)}-refit"
            log(f"clean: refitting {m} on the whole dev table ({len(dev_df)} rows)")
            member_runs[m] = run = train_run(train_ds, dev_all, test_ds, out=folder, method=method, **common)
            member_dirs[m] = folder
            best_m = run.meta["best_metrics"]
            refits[m] = {"run_dir": str(folder), "dev_acc": best_m["dev_acc"], "best_step": run.meta["best_step"],
                         "test_acc": best_m.get("test_acc") if test_ds is not None else None}
        refit_rec = refits[pick.candidate]
    final = member_runs[pick.candidate]
    states = [torch.load(member_runs[m].best_model_path, map_location="cpu", weights_only=True)["model"]
              for m in members]
    ens_rec: dict[str, Any] = {"members": members, "model": str(out / "ensemble.pt"),
                               # relative to `out` (every run folder is made under it), so that `predict` finds
                               # them in a moved folder
                               "runs": [str(member_dirs[m].relative_to(out)) for m in members],
                               "test_acc": None, "test_acc_half_a": None}
    if test_ds is not None and len(members) == 1:
        ens_rec["test_acc"] = refit_rec["test_acc"] if refit_rec else _num(pick.test_acc)
        ens_rec["test_acc_half_a"] = _num(pick.test_acc)
    elif test_ds is not None:
        ens_rec["test_acc"] = _ensemble_acc(test_ds, [(member_runs[m], recipe[m][1]) for m in members])
        ens_rec["test_acc_half_a"] = (_ensemble_acc(test_ds, [(runs[m], recipe[m][1]) for m in members]) if refit
                                      else ens_rec["test_acc"])
    out.mkdir(parents=True, exist_ok=True)
    if pick.candidate in retrain:
        cleaned = retrain[pick.candidate]
    elif pick.method == "uniform":
        cleaned = df
    else:  # a weighting method: its weights (of the refit run, when refitted) joined onto every input row
        cleaned = score(df, final.path, id_col=id_col, label_col=label_col)
    cleaned.to_parquet(out / "table.parquet", index=False)
    torch.save(states[0], out / "model.pt")
    torch.save({"members": members, "models": states, "combine": "mean of the members' softmax probabilities"},
               out / "ensemble.pt")
    frame.to_parquet(out / "candidates.parquet", index=False)
    record = {
        "pick": pick.candidate, "why": why, "table": str(out / "table.parquet"), "model": str(out / "model.pt"),
        "dev_rows": {"half_a": int(half_a.sum()), "half_b": int((~half_a).sum())}, "seed": seed,
        "cross_fit": bool(cross_fit),
        "steps": int(runs[pick.candidate].meta["config"]["steps"]),
        # the model handed over: the ensemble of the members (`predict`); model.pt is the pick alone, refitted
        # (trained with every dev row) or its half-A model
        "refit": refit_rec, "refits": refits, "ensemble": ens_rec,
        "test_acc": ens_rec["test_acc"],
        "test_acc_pick": refit_rec["test_acc"] if refit_rec else _num(pick.test_acc),
        "test_acc_half_a": _num(pick.test_acc),
        "flagged_rows": len(flagged), "rows": {"input": len(df), "output": len(cleaned)},
        "candidates": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in c.items()}
                       for c in frame.to_dict("records")],
    }
    (out / "clean.json").write_text(json.dumps(record, indent=2, default=_plain))
    return record


def _ensemble_acc(table, models: list) -> float:
    """Accuracy on `table` of the class of highest mean softmax probability over `models`, (run, training table)
    pairs: the handed-over model's accuracy, computed as `predict` computes its predictions."""
    from valuekit.api import evaluate

    got = [evaluate(table, run, train=train) for run, train in models]
    probs = np.mean([g["probs"] for g in got], axis=0)
    return float((probs.argmax(1) == got[0]["labels"]).mean())


def predict(table, out, *, train, id_col: str = "id", label_col: str = "label") -> pd.DataFrame:
    """The model a `valuekit.clean` folder `out` hands over, on `table`: each row's class probabilities, the mean of
    the ensemble members' softmax probabilities (ensemble.pt: the members' best-dev state dicts, each in its run's
    architecture), and the class of highest mean probability. `train` is the training table given to `clean` (it
    fixes the class codes and the feature columns); `table` needs the feature columns and `id_col`, and its label
    column, if any, is not read. Returns a DataFrame: `id_col`, ``prediction`` and one ``prob_<class>`` column per
    class."""
    import torch

    from valuekit.api import _table, evaluate
    from valuekit.data.tables import load_table
    from valuekit.reporting import clean_members
    from valuekit.runs.reader import open_run

    out = Path(out)
    for name in ("clean.json", "ensemble.pt"):
        if not (out / name).is_file():
            raise InputError(f"out={str(out)!r}: no {name} (not an output folder of valuekit.clean)",
                             cli=f"--clean {out}: no {name} (not an output folder of valuekit clean)")
    found = clean_members(out)  # the one reader of clean.json: it checks the record and resolves the member runs
    if found is None or not (found[0].get("ensemble") or {}).get("runs"):
        raise InputError(f"{out / 'clean.json'}: not a record of valuekit clean with an ensemble "
                         "(no ensemble.runs)")
    runs = found[1]
    bundle = torch.load(out / "ensemble.pt", map_location="cpu", weights_only=True)
    df, path = _read(table, "prediction")
    if id_col not in df.columns:
        raise InputError(f"{path or 'prediction table (argument `table`)'}: no column {id_col!r} "
                         f"(columns: {list(df.columns)[:12]})")
    train_ds = _table(train, "train", table_kw={"id_col": id_col, "label_col": label_col})
    trained = open_run(runs[0]).meta
    for what, mine, theirs in (("feature columns", train_ds.feature_cols, trained["feature_cols"]),
                               ("classes", train_ds.classes, trained["classes"])):
        if list(mine) != list(theirs):
            raise InputError(f"{train_ds.path or 'training table (argument `train`)'}: not the training table of "
                             f"{out}: its {what} {list(mine)[:8]} differ from the models' {list(theirs)[:8]}",
                             cli=f"--train {train_ds.path or train}: not the training table of --clean {out}: its "
                                 f"{what} {list(mine)[:8]} differ from the models' {list(theirs)[:8]}")
    missing = [c for c in train_ds.feature_cols if c not in df.columns]
    if missing:
        raise InputError(f"{path or 'prediction table (argument `table`)'}: no feature column {missing[0]!r} of the "
                         f"training table (columns: {list(df.columns)[:12]})")
    # `evaluate` reads the columns `id` and `label`; the loader codes every row's label, which the probabilities do
    # not depend on, so any training class will do
    rows = df.drop(columns=[label_col], errors="ignore").rename(columns={id_col: "id"})
    rows = load_table(rows.assign(label=train_ds.classes[0]), like=train_ds, name="dev",
                      where=path or "prediction table (argument `table`)")
    probs = np.mean([evaluate(rows, run, train=train_ds, state=state)["probs"]
                     for run, state in zip(runs, bundle["models"])], axis=0)
    classes = np.asarray(train_ds.classes, dtype=object)
    result = pd.DataFrame({id_col: df[id_col].to_numpy(), "prediction": classes[probs.argmax(1)]})
    for j, c in enumerate(train_ds.classes):
        result[f"prob_{c}"] = probs[:, j]
    return result


def _num(v) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _plain(v):
    return v.item() if hasattr(v, "item") else str(v)


def format_summary(record: dict) -> str:
    """A few lines for the terminal: every candidate's accuracies and the pick."""
    crossed = record.get("cross_fit", False)
    lines = [f"{'candidate':<16} {'rows':>6} {'dev A':>7} {'dev B':>15} " + ("{:>15} ".format("both halves")
                                                                             if crossed else "") + f"{'test':>7}"]
    for c in record["candidates"]:
        t = "" if c["test_acc"] is None else f"{c['test_acc']:.4f}"
        mark = "  <- pick" if c["picked"] else "  <- averaged with the pick" if c.get("member") else ""
        both = "" if not crossed or c.get("judged_acc") is None else f"{c['judged_acc']:>7.4f} ± {c['judged_std']:.4f} "
        lines.append(f"{c['candidate']:<16} {c['rows']:>6} {c['dev_a_acc']:>7.4f} "
                     f"{c['dev_b_acc']:>7.4f} ± {c['dev_b_std']:.4f} {both}{t:>7}{mark}")
    lines.append(f"pick: {record['pick']}: {record['why']}")
    r = record.get("refit")
    if r:
        t = ("" if r["test_acc"] is None else
             f", test {r['test_acc']:.4f} (half-A model {record['test_acc_half_a']:.4f})")
        lines.append(f"refit on the whole dev table: dev {r['dev_acc']:.4f} (fitted: it chose the checkpoint){t}")
    e = record.get("ensemble")
    if e and len(e["members"]) > 1:
        t = ("" if e["test_acc"] is None else
             f": test {e['test_acc']:.4f} (half-A models {e['test_acc_half_a']:.4f})")
        lines.append(f"handed over: the mean of the probabilities of {' and '.join(e['members'])}{t}; "
                     f"{e['model']} (valuekit.predict)")
    lines.append(f"table: {record['table']} ({record['rows']['output']} of {record['rows']['input']} rows)   "
                 f"model: {record['model']} (the pick alone)")
    return "\n".join(lines)
