"""`valuekit bench quality`: are the values worth trusting? Every method next to its trivial baselines and
the peers, in the same run.

For each data set x label-flip setting x seed the bench trains every method (MLP, default settings) and
measures, from each run's values.parquet:

* mislabel detection: AUROC and F1@k (k = number of flipped rows) of `value` against the hidden
  `is_noisy`, next to the AUROC of the *same run's* -mean_loss and aum columns and of the method's raw
  learned quantity (`LEARNED`), and the Spearman correlation of that quantity with -mean_loss;
* the subset test: logistic regression trained on the top 50 % of rows by value (global, and stratified
  by class) vs on a random 50 % and on all rows, test accuracy, and the smallest class share kept
  (share of class c among the kept rows / its share among all rows);
* test accuracy at the last step, and for uniform also with early stopping on the dev set (the test
  accuracy at the evaluation with the best dev accuracy; evaluations every `eval_every` steps);
* the median effective sample size ESS = (sum w)^2 / (B sum w^2) of the logged batch weights;
* `valuekit audit`'s label_score over all the cell's runs (analysis.mislabel.label_score on their value,
  -mean_loss and aum columns);
* peers: pyDVL Data-OOB (random forest) and KNN-Shapley (valuekit.bench.peers, own interpreter), and cleanlab
  confident learning on 5-fold out-of-sample probabilities of an early-stopped scikit-learn MLP.

`quality.md` holds the tables and a pass/fail line for each acceptance criterion of the quality study, computed
from the numbers in the same file.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

QUALITY_METHODS = ("uniform", "dds", "hostcp", "lrdi", "l2rw", "mwnet", "bads")
LEARNED = {"dds": "scorer_logit", "lrdi": "teacher_weight", "mwnet": "teacher_weight", "hostcp": "selection_weight",
           "bads": "posterior_mean", "l2rw": "mean_weight"}
SETTINGS = {"noise20": {"noise": 0.2}, "noise40": {"noise": 0.4}, "imbalance10": {"imbalance": 10.0}}
DEFAULT_SETTINGS = ("noise20", "noise40")
PEERS = ("data-oob", "knn-shapley", "cleanlab-es")


# ---------------------------------------------------------------- pieces (numpy / scikit-learn)


def subset_accuracy(x, y, keep, x_test, y_test, *, seed: int = 0) -> float:
    """Test accuracy of a logistic regression (after standard scaling) trained on the rows `keep`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    keep = np.asarray(keep, dtype=bool)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=1.0, random_state=seed))
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        pipe.fit(x[keep], y[keep])
        return float((pipe.predict(x_test) == y_test).mean())


def top_fraction(value, labels, fraction: float = 0.5, *, per_class: bool = False) -> np.ndarray:
    """Mask of the top `fraction` rows by value (NaN last; stable order), globally or within each class
    (round(fraction * n_c) rows of class c)."""
    from valuekit.export.scoring import select_top

    return select_top(np.asarray(value, dtype=np.float64), int(round(fraction * len(value))),
                      labels=np.asarray(labels) if per_class else None, fraction=fraction if per_class else None)


def min_class_share(keep, labels) -> float:
    """min over classes of (share of class c among kept rows) / (share of class c among all rows)."""
    keep, labels = np.asarray(keep, dtype=bool), np.asarray(labels)
    if not keep.any():
        return 0.0
    return float(min((keep & (labels == c)).sum() / keep.sum() / ((labels == c).mean()) for c in np.unique(labels)))


def early_stopped_acc(metrics: pd.DataFrame) -> float:
    """Test accuracy at the (first) evaluation with the best dev accuracy."""
    m = metrics.dropna(subset=["dev_acc", "test_acc"]) if "test_acc" in metrics else metrics.iloc[:0]
    if not len(m):
        return float("nan")
    return float(m.test_acc.iloc[int(np.argmax(m.dev_acc.to_numpy()))])


def median_ess(run) -> float:
    """Median over steps of (sum w)^2 / (B sum w^2) of the logged weights (NaN without weights)."""
    steps = run.steps(["step", "weight"])
    if steps is None or steps.num_rows == 0:
        return float("nan")
    df = steps.to_pandas().dropna()
    if not len(df):
        return float("nan")
    g = df.assign(w2=df.weight ** 2).groupby("step").agg(s=("weight", "sum"), s2=("w2", "sum"), b=("weight", "size"))
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = g.s ** 2 / (g.b * g.s2)
    return float(np.nanmedian(ess.to_numpy())) if np.isfinite(ess).any() else float("nan")


def cv_probs_early_stopped(x, y, num_classes: int, *, seed: int = 0, folds: int = 5) -> np.ndarray:
    """K-fold out-of-sample class probabilities (N, C) of a scikit-learn MLP with early stopping (10 % of each
    fold's training part held out, patience 5 epochs), so the model stops before it memorises the flipped labels.
    A fold too small for that split is fitted without early stopping (max 200 epochs)."""
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    probs = np.zeros((len(y), num_classes))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")
            try:
                pipe = _fit_mlp(x[tr], y[tr], seed=seed, early_stopping=True)
            except ValueError:  # a fold too small for sklearn's early-stopping split (a tiny long-tailed set)
                pipe = _fit_mlp(x[tr], y[tr], seed=seed, early_stopping=False)
            probs[np.ix_(te, pipe.classes_)] = pipe.predict_proba(x[te])
    return probs


def _fit_mlp(x, y, *, seed: int, early_stopping: bool):
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = MLPClassifier(hidden_layer_sizes=(128,), early_stopping=early_stopping, validation_fraction=0.1,
                        n_iter_no_change=5, max_iter=200, random_state=seed)
    return make_pipeline(StandardScaler(), clf).fit(x, y)


def cleanlab_early_stopped(x, y, num_classes: int, *, seed: int = 0, folds: int = 5) -> np.ndarray:
    """cleanlab label quality (higher = label more likely right) from `cv_probs_early_stopped`."""
    from cleanlab.rank import get_label_quality_scores

    return get_label_quality_scores(y, cv_probs_early_stopped(x, y, num_classes, seed=seed, folds=folds))


def _quality_data(name: str, setting: str, seed: int, folder: Path):
    from valuekit.data.bundled import prepare
    from valuekit.data.tables import load_table

    kw = dict(SETTINGS[setting])
    if name == "fashion-mnist":
        kw.update(max_train=3000, test_fraction=0.05)
    paths = prepare(name, folder, seed=seed, **kw)
    tr = load_table(paths["train"])
    return tr, load_table(paths["dev"], like=tr, name="dev"), load_table(paths["test"], like=tr, name="test")


def _auroc(v, noisy) -> float:
    from valuekit.analysis.mislabel import roc_auc

    v = np.asarray(v, dtype=np.float64)
    if not np.isfinite(v).any():
        return float("nan")
    return roc_auc(noisy, -np.where(np.isfinite(v), v, np.nanmedian(v)))


# ---------------------------------------------------------------- one cell


def run_cell(name: str, setting: str, seed: int, folder: Path, *, methods, steps: int, device: str = "cpu",
             peers=PEERS, eval_every: int = 100, log=print) -> tuple[list[dict], list[dict]]:
    """(method rows, detector rows) of one data set x setting x seed; run directories under `folder`."""
    from valuekit.analysis.mislabel import detection_metrics, spearman
    from valuekit.analysis.scores import label_score, signal_columns
    from valuekit.config import TrainConfig
    from valuekit.training.loop import run_training

    tr, dv, te = _quality_data(name, setting, seed, folder / "data")
    noisy = tr.is_noisy if tr.is_noisy is not None and tr.is_noisy.any() else None
    x, y = tr.x.numpy().astype(np.float64), tr.y.numpy()
    xt, yt = te.x.numpy().astype(np.float64), te.y.numpy()
    rng = np.random.default_rng(1000 + seed)
    rand_keep = np.zeros(len(y), dtype=bool)
    rand_keep[rng.permutation(len(y))[: int(round(0.5 * len(y)))]] = True
    acc_random = subset_accuracy(x, y, rand_keep, xt, yt, seed=seed)
    acc_all = subset_accuracy(x, y, np.ones(len(y), dtype=bool), xt, yt, seed=seed)
    base = {"dataset": name, "setting": setting, "seed": seed}
    rows, detectors, signal_cols, small_loss = [], [], [], None
    for m in methods:
        cfg = TrainConfig(method=m, model="mlp", steps=steps, batch_size=64, seed=seed, device=device, progress=False,
                          eval_every=eval_every, log_every=500, checkpoint_every=steps)
        t0 = time.perf_counter()
        run = run_training(tr, dv, te, out=folder / m, config=cfg)
        dt = time.perf_counter() - t0
        vals = run.values().set_index("example_id").reindex(tr.ids)
        value = vals.value.to_numpy(dtype=np.float64)
        metrics = run.metrics()
        row = {**base, "method": m, "seconds": dt, "test_acc": run.meta["final_metrics"].get("test_acc", np.nan),
               "test_acc_es": early_stopped_acc(metrics), "median_ess": median_ess(run)}
        if noisy is not None:
            det = detection_metrics(value, noisy)
            row.update(auroc=det["auroc"], f1_at_k=det["f1_at_k"], auroc_loss=_auroc(-vals.mean_loss, noisy),
                       auroc_aum=_auroc(vals.aum, noisy))
            col = LEARNED.get(m)
            if col in vals:
                row["auroc_learned"] = _auroc(vals[col], noisy)
                row["spearman_learned_loss"] = spearman(vals[col].to_numpy(dtype=float), -vals.mean_loss.to_numpy())
            row["spearman_value_loss"] = spearman(value, -vals.mean_loss.to_numpy())
            sig = signal_columns(vals)
            signal_cols += list(sig.values())
            if m == "uniform":
                small_loss = sig["neg_mean_loss"]
        keep = top_fraction(value, y, 0.5)
        keep_pc = top_fraction(value, y, 0.5, per_class=True)
        row.update(acc_top50=subset_accuracy(x, y, keep, xt, yt, seed=seed),
                   acc_top50_pc=subset_accuracy(x, y, keep_pc, xt, yt, seed=seed), acc_random50=acc_random,
                   acc_all=acc_all, min_share_top50=min_class_share(keep, y),
                   min_share_top50_pc=min_class_share(keep_pc, y))
        rows.append(row)
        log(f"{name} {setting} seed {seed} {m}: {dt:.1f}s auroc {row.get('auroc', np.nan):.3f} "
            f"loss {row.get('auroc_loss', np.nan):.3f} top50 {row['acc_top50']:.3f} rand {acc_random:.3f}")
    if noisy is None:
        return rows, detectors

    def add(det_name, v, seconds):
        d = detection_metrics(np.asarray(v, dtype=np.float64), noisy)
        detectors.append({**base, "detector": det_name, "auroc": d["auroc"], "f1_at_k": d["f1_at_k"],
                          "seconds": seconds})

    add("valuekit audit label_score", label_score(np.stack(signal_cols, 1)), 0.0)
    if small_loss is not None:  # -mean_loss column of the uniform run
        add("uniform small loss", small_loss, 0.0)
    if "cleanlab-es" in peers:
        try:
            t0 = time.perf_counter()
            add("cleanlab (early-stopped MLP)", cleanlab_early_stopped(x, y, tr.num_classes, seed=seed),
                time.perf_counter() - t0)
        except ImportError:
            log("cleanlab not installed: peer skipped")
    want = [p for p in ("data-oob", "knn-shapley") if p in peers]
    if want:
        from valuekit.bench.peers import pydvl_values

        try:
            t0 = time.perf_counter()
            pv = pydvl_values(x, y, dv.x.numpy(), dv.y.numpy(), seed=seed, methods=want)
            dt = (time.perf_counter() - t0) / len(want)
            for p, v in pv.items():
                add(f"pyDVL {p}", v, dt)
        except RuntimeError as exc:
            log(f"pyDVL peers skipped: {exc}")
    return rows, detectors


# ---------------------------------------------------------------- the report


def _pm(m, sd, digits=3) -> str:
    if not np.isfinite(m):
        return "–"
    return f"{m:.{digits}f}" if not np.isfinite(sd) else f"{m:.{digits}f} ± {sd:.{digits}f}"


def criteria(frame: pd.DataFrame, det: pd.DataFrame) -> list[tuple[str, bool | None, str]]:
    """(criterion, passed, evidence) for each measurable acceptance criterion of the quality study."""
    out = []
    learned = frame[frame.method.isin(list(LEARNED))]
    noisy = learned.dropna(subset=["auroc"])
    if len(noisy):
        g = noisy.groupby(["dataset", "setting", "method"]).agg(v=("auroc", "mean"), l=("auroc_loss", "mean"))
        bad = g[g.v < g.l - 0.01]
        out.append(("AUROC(value) >= AUROC(-mean loss of the same run) - 0.01, every learned method and set",
                    bad.empty, "all cells hold" if bad.empty else "fails: " + "; ".join(
                        f"{d}/{s}/{m} {r.v:.3f} vs {r.l:.3f}" for (d, s, m), r in bad.iterrows())))
    n40 = learned[learned.setting == "noise40"]
    if len(n40):
        g = n40.groupby(["dataset", "method"]).agg(top=("acc_top50", "mean"), rnd=("acc_random50", "mean"),
                                                   share=("min_share_top50", "min"))
        bad = g[(g.top - g.rnd < 0.03) | (g.share < 0.5)]
        out.append(
            (
                "top 50 % by value beats random 50 % by >= 3 points at 40 % flips and keeps every class >= half "
                "its share",
                bad.empty,
                "all hold"
                if bad.empty
                else "fails: "
                + "; ".join(
                    f"{d}/{m} +{100 * (r.top - r.rnd):.1f} pts, min share {r.share:.2f}" for (d, m), r in bad.iterrows()
                ),
            )
        )
    lr = frame[frame.method == "lrdi"]
    if len(lr):
        g = lr.groupby(["dataset", "setting"]).agg(sd=("test_acc", "std"), ess=("median_ess", "median"))
        bad = g[(g.sd > 0.02) | (g.ess < 0.3)]
        ok = bad.empty if g.sd.notna().all() else (False if len(bad) else None)  # std needs >= 2 seeds
        out.append(("LRDI: test-accuracy std over seeds <= 0.02 and median ESS >= 0.3 on every set", ok,
                    "; ".join(f"{d}/{s} std {r.sd:.3f} ESS {r.ess:.2f}" for (d, s), r in g.iterrows())))
    if len(det):
        g = det.groupby(["dataset", "setting", "detector"]).f1_at_k.mean().unstack("detector")
        ours = g["valuekit audit label_score"]
        peers = g[[c for c in g.columns if c.startswith(("pyDVL", "cleanlab"))]]
        if peers.shape[1]:
            margin = ours - peers.max(axis=1)
            per_set = margin.groupby(level="dataset").min()
            ok = bool((margin >= 0).all() and (per_set >= 0.02).sum() >= min(2, len(per_set)))
            out.append(("audit label_score beats the best peer on F1@k by >= 0.02 on >= 2 of the sets and is never "
                        "below it", ok, "; ".join(f"{d}/{s} {m:+.3f}" for (d, s), m in margin.items())))
    uni = frame[(frame.method == "uniform") & (frame.setting == "noise40")]
    if len(uni):
        es = uni.groupby("dataset").test_acc_es.mean()
        g = frame[frame.method.isin(list(LEARNED)) & (frame.setting == "noise40")].groupby(
            ["dataset", "method"]).test_acc.mean()
        bad = [(d, m, a, es[d]) for (d, m), a in g.items() if a <= es[d]]
        # the failing methods' own accuracy at their best dev evaluation (the same early stopping uniform got)
        g_es = frame[frame.setting == "noise40"].groupby(["dataset", "method"]).test_acc_es.mean()
        also = "; ".join(f"{d}/{m} {g_es[(d, m)]:.3f}" for d, m, _, _ in bad)
        out.append(
            (
                "every reweighting method beats early-stopped uniform test accuracy at 40 % flips",
                not bad,
                "all hold"
                if not bad
                else "fails: "
                + "; ".join(f"{d}/{m} {a:.3f} vs {e:.3f}" for d, m, a, e in bad)
                + f" (final model vs uniform's best-dev evaluation; the failing methods early-stopped on dev the "
                f"same way reach: {also})",
            )
        )
    return out


def candidate_aurocs(runs_root) -> pd.DataFrame:
    """AUROC against is_noisy of every candidate value of every kept run under `runs_root` (the layout
    `bench_quality(runs_dir=...)` writes: CELL/data/train.parquet and CELL/METHOD/values.parquet): the method's
    `value`, the run's -mean_loss and aum, the raw learned column, it standardised within class, the mean reward,
    the mean weight, and the within-class rank average of -mean_loss, aum and the learned column. One row per
    cell x method x candidate."""
    from valuekit.training.signals import class_standardise, rank_average

    rows = []
    for cell in sorted(p for p in Path(runs_root).iterdir() if (p / "data" / "train.parquet").exists()):
        tr = pd.read_parquet(cell / "data" / "train.parquet")
        if "is_noisy" not in tr or not tr.is_noisy.any():
            continue
        labels, noisy = tr["label"].astype(str).to_numpy(), tr["is_noisy"].to_numpy(dtype=bool)
        for vfile in sorted(cell.glob("*/values.parquet")):
            v = pd.read_parquet(vfile).set_index("example_id").reindex(tr["id"])
            method = vfile.parent.name
            c = {"value": v.value, "-mean_loss": -v.mean_loss, "aum": v.aum}
            col = LEARNED.get(method)
            for k in ("mean_reward", "mean_weight"):
                if k in v and v[k].notna().any() and k != col:
                    c[k] = v[k]
            if col in v:
                c[f"learned ({col})"] = v[col]
                c["learned, class-standardised"] = class_standardise(v[col].to_numpy(dtype=float), labels)
                c["rank avg(-loss, aum, learned)"] = rank_average(
                    [-v.mean_loss.to_numpy(), v.aum.to_numpy(), v[col].to_numpy(dtype=float)], labels)
            for k, x in c.items():
                rows.append({"cell": cell.name, "method": method, "candidate": k,
                             "auroc": _auroc(np.asarray(x, dtype=np.float64), noisy)})
    return pd.DataFrame(rows)


def candidates_table(cands: pd.DataFrame) -> list[str]:
    """Markdown: mean AUROC (and min over cells) of each candidate value per method."""
    if not len(cands):
        return []
    g = cands.groupby(["method", "candidate"], sort=False).auroc.agg(["mean", "min", "size"]).reset_index()
    lines = ["| method | candidate value | mean AUROC | worst cell | cells |", "| --- | --- | --- | --- | --- |"]
    lines += [
        f"| {r.method} | {r.candidate} | {r['mean']:.3f} | {r['min']:.3f} | {r['size']} |" for _, r in g.iterrows()
    ]
    return lines


def values_summary(frame: pd.DataFrame) -> list[str]:
    """Markdown table per method: mean AUROC of value, of the same run's -mean_loss and aum, of the raw learned
    column, the worst cell's AUROC(value) - AUROC(-mean_loss), Spearman(learned, -mean_loss); over all cells."""
    noisy = frame.dropna(subset=["auroc"]) if "auroc" in frame else frame.iloc[:0]
    if not len(noisy):
        return []
    cells = noisy.groupby(["method", "dataset", "setting"], sort=False).agg(
        v=("auroc", "mean"), l=("auroc_loss", "mean"), a=("auroc_aum", "mean"),
        r=("auroc_learned", "mean") if "auroc_learned" in noisy else ("auroc", lambda s: np.nan),
        rho=("spearman_learned_loss", "mean") if "spearman_learned_loss" in noisy else ("auroc", lambda s: np.nan))
    cells["gap"] = cells.v - cells.l
    g = cells.groupby(level="method", sort=False).agg(v=("v", "mean"), l=("l", "mean"), a=("a", "mean"),
                                                      r=("r", "mean"), rho=("rho", "mean"), gap=("gap", "min"),
                                                      n=("v", "size"))
    sets = ", ".join(f"{d} {s}" for d, s in noisy.groupby(["dataset", "setting"], sort=False).size().index)
    lines = [f"Mean over {sets} (seeds averaged within each set):", "",
             "| method | AUROC `value` | AUROC same run's −mean_loss | AUROC aum | AUROC raw learned column | "
             "worst set: value − (−mean_loss) | Spearman(learned column, −mean_loss) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in g.iterrows():
        col = LEARNED.get(m.split(" ")[0])  # "lrdi (ess_floor=0)" -> lrdi's column
        learned = f"{r.r:.3f} (`{col}`)" if col and np.isfinite(r.r) else "–"
        rho = f"{r.rho:.2f}" if np.isfinite(r.rho) else "–"
        lines.append(f"| {m} | {r.v:.3f} | {r.l:.3f} | {r.a:.3f} | {learned} | {r.gap:+.3f} | {rho} |")
    return lines


def write_report(out: Path, frame: pd.DataFrame, det: pd.DataFrame, *, header: list[str], steps: int, seeds,
                 stem: str = "quality") -> Path:
    """quality.md (+ quality.csv, quality_detectors.csv) from the per-run rows."""
    from valuekit.bench.common import write

    lines = header + [
        f"Each cell: mean ± std over seeds {[int(s) for s in seeds]} of `valuekit data prepare DATASET --noise F` "
        f"(fashion-mnist:",
        f"3,000 training rows, 5 % test), MLP, {steps} steps of batch 64, default method settings, dev/test evaluated",
        "every 100 steps. AUROC and F1@k (k = number of flipped rows) rank rows by the score (low = suspect) against",
        "the hidden `is_noisy`. `-mean loss` and `aum` are columns of the *same run's* values.parquet",
        "(valuekit.training.signals); `learned` is the method's raw learned quantity (column named in the table).",
        "Subset test: logistic regression (scikit-learn, standardised features) on the top 50 % of rows by `value`",
        "(global, and stratified by class) vs a random 50 % and all rows; test accuracy. `min share`: smallest",
        "(class share among kept rows) / (class share among all rows). `uniform-ES`: uniform's test accuracy at the",
        "evaluation with the best dev accuracy (early stopping on the dev set).",
        "",
        "## Acceptance criteria, computed from the tables below",
        "",
    ]
    for crit, ok, ev in criteria(frame, det):
        verdict = "NOT MEASURED (needs more seeds)" if ok is None else "PASS" if ok else "FAIL"
        lines.append(f"- **{verdict}** — {crit}: {ev}")
    summary = values_summary(frame)
    if summary:
        lines += ["", "## Value vs the run's own signals (summary)", "", *summary]
    noisy = frame.dropna(subset=["auroc"]) if "auroc" in frame else frame.iloc[:0]
    if len(noisy):
        s = (noisy.groupby(["dataset", "setting", "method"], sort=False)
             .agg(auroc=("auroc", "mean"), auroc_sd=("auroc", "std"), loss=("auroc_loss", "mean"),
                  aum=("auroc_aum", "mean"), learned=("auroc_learned", "mean"), rho=("spearman_learned_loss", "mean"),
                  f1=("f1_at_k", "mean"), acc=("test_acc", "mean"), acc_sd=("test_acc", "std"),
                  sec=("seconds", "mean")).reset_index())
        lines += ["", "## Mislabel detection and test accuracy", "",
                  "| dataset | setting | method | AUROC value | AUROC −mean loss | AUROC aum | AUROC learned | "
                  "Spearman(learned, −loss) | F1@k value | test accuracy | s/run |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in s.itertuples(index=False):
            lname = f" ({LEARNED[r.method]})" if r.method in LEARNED else ""
            lines.append(
                f"| {r.dataset} | {r.setting} | {r.method} | {_pm(r.auroc, r.auroc_sd)} | {_pm(r.loss, np.nan)} | "
                f"{_pm(r.aum, np.nan)} | {_pm(r.learned, np.nan)}{lname} | {_pm(r.rho, np.nan, 2)} | "
                f"{_pm(r.f1, np.nan)} | {_pm(r.acc, r.acc_sd)} | {r.sec:.0f} |"
            )
    s = (frame.groupby(["dataset", "setting", "method"], sort=False)
         .agg(top=("acc_top50", "mean"), top_pc=("acc_top50_pc", "mean"), rnd=("acc_random50", "mean"),
              all_=("acc_all", "mean"), share=("min_share_top50", "min"), share_pc=("min_share_top50_pc", "min"))
         .reset_index())
    lines += ["", "## Subset test (logistic regression on the kept rows; test accuracy)", "",
              "| dataset | setting | method | top 50 % | top 50 % per class | random 50 % | all rows | top − random "
              "(points) | min share (global) | min share (per class) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in s.itertuples(index=False):
        lines.append(f"| {r.dataset} | {r.setting} | {r.method} | {r.top:.3f} | {r.top_pc:.3f} | {r.rnd:.3f} | "
                     f"{r.all_:.3f} | {100 * (r.top - r.rnd):+.1f} | {r.share:.2f} | {r.share_pc:.2f} |")
    s = (frame.groupby(["dataset", "setting", "method"], sort=False)
         .agg(acc=("test_acc", "mean"), sd=("test_acc", "std"), es=("test_acc_es", "mean"),
              ess=("median_ess", "median")).reset_index())
    lines += ["", "## Test accuracy vs early-stopped uniform, and batch-weight ESS", "",
              "| dataset | setting | method | test accuracy (last step) | same run at its best dev evaluation | "
              "uniform-ES | median ESS of batch weights |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in s.itertuples(index=False):
        es = s[(s.dataset == r.dataset) & (s.setting == r.setting) & (s.method == "uniform")].es
        lines.append(f"| {r.dataset} | {r.setting} | {r.method} | {_pm(r.acc, r.sd)} | {_pm(r.es, np.nan)} | "
                     f"{_pm(float(es.iloc[0]) if len(es) else np.nan, np.nan)} | {_pm(r.ess, np.nan, 2)} |")
    if len(det):
        s = (det.groupby(["dataset", "setting", "detector"], sort=False)
             .agg(auroc=("auroc", "mean"), f1=("f1_at_k", "mean"), f1_sd=("f1_at_k", "std"), sec=("seconds", "mean"))
             .reset_index())
        lines += ["", "## Detectors: valuekit audit vs peers", "",
                  "`valuekit audit label_score` = analysis.mislabel.label_score over the value, −mean_loss and aum",
                  "columns of all the cell's valuekit runs. Peers: pyDVL 0.10 Data-OOB (random forest, 100 trees) and",
                  "KNN-Shapley (K = 10, dev set as utility), cleanlab on 5-fold out-of-sample probabilities of an",
                  "early-stopped scikit-learn MLP.", "",
                  "| dataset | setting | detector | AUROC | F1@k | s |", "| --- | --- | --- | --- | --- | --- |"]
        for r in s.itertuples(index=False):
            lines.append(f"| {r.dataset} | {r.setting} | {r.detector} | {_pm(r.auroc, np.nan)} | "
                         f"{_pm(r.f1, r.f1_sd)} | {r.sec:.1f} |")
    out.mkdir(parents=True, exist_ok=True)
    det.to_csv(out / f"{stem}_detectors.csv", index=False)
    return write(out, stem, lines, frame)


def bench_quality(out: Path, *, command: str, device: str = "cpu", quick: bool = False, datasets=None,
                  settings=None, seeds=None, methods=None, steps: int | None = None, runs_dir=None,
                  peers=None, log=print) -> Path:
    """Run the grid (module docstring) and write quality.md / quality.csv / quality_detectors.csv."""
    from valuekit.bench.common import header, stem
    from valuekit.config import available_methods
    from valuekit.data.bundled import FASHION_DIR

    have = set(available_methods())
    if quick:
        datasets, settings, seeds = datasets or ("digits",), settings or ("noise40",), seeds or (0,)
        methods, steps = methods or ("uniform", "dds"), steps or 150
        peers = ("cleanlab-es",) if peers is None else peers
    else:
        datasets = datasets or ("digits", "mnist5k") + (("fashion-mnist",) if Path(FASHION_DIR).is_dir() else ())
        settings, seeds = settings or DEFAULT_SETTINGS, seeds or (0, 1, 2)
        methods, steps = methods or QUALITY_METHODS, steps or 1500
        peers = PEERS if peers is None else peers
    methods = [m for m in methods if m in have]
    rows, dets = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(runs_dir) if runs_dir else Path(tmp)
        for name in datasets:
            for setting in settings:
                for seed in seeds:
                    r, d = run_cell(name, setting, seed, root / f"{name}-{setting}-{seed}", methods=methods,
                                    steps=steps, device=device, peers=peers, log=log)
                    rows += r
                    dets += d
                    if runs_dir:  # partial results survive an interrupted grid
                        pd.DataFrame(rows).to_csv(root / "partial.csv", index=False)
                        pd.DataFrame(dets).to_csv(root / "partial_detectors.csv", index=False)
    frame, det = pd.DataFrame(rows), pd.DataFrame(dets)
    header = header("Quality: are the values worth trusting? Methods vs their own signals, subsets, peers", command,
                     device)
    return write_report(out, frame, det, header=header, steps=steps, seeds=seeds, stem=stem("quality", device))


def report_from_csv(out: Path, csvs, *, command: str, device: str, steps: int, seeds) -> Path:
    """Rewrite quality.md from saved per-run rows (grids' partial.csv files, e.g. one process per data set);
    each `X.csv` may have its detectors in `X_detectors.csv` next to it."""
    from valuekit.bench.common import header, stem

    csvs = [Path(c) for c in ([csvs] if isinstance(csvs, (str, Path)) else csvs)]
    frame = pd.concat([pd.read_csv(c) for c in csvs], ignore_index=True)
    dets = [c.with_name(c.stem + "_detectors.csv") for c in csvs]
    dets = [pd.read_csv(d) for d in dets if d.exists() and d.stat().st_size > 1]
    det = pd.concat(dets, ignore_index=True) if dets else pd.DataFrame()
    header = header("Quality: are the values worth trusting? Methods vs their own signals, subsets, peers", command,
                     device)
    return write_report(out, frame, det, header=header, steps=steps, seeds=seeds, stem=stem("quality", device))


__all__ = ["bench_quality", "run_cell", "write_report", "criteria", "subset_accuracy", "top_fraction",
           "min_class_share", "early_stopped_acc", "median_ess", "cleanlab_early_stopped"]
