"""Mislabel audit: one row per training example, ranked from most to least suspicious.

Inputs are run directories (their `values.parquet`) and the training table (class names,
features, and `is_noisy` when the data was corrupted on purpose). `is_noisy` is used only
to *evaluate* the audit (summary metrics); it never decides a flag.

label_score (in [0, 1], lower = more likely mislabelled) combines the runs' signals, each rescaled::

    u_s(i) = clip((v_s(i) - q01_s) / (q99_s - q01_s), 0, 1)
    label_score(i) = mean over signals s of u_s(i)

where the signals s are, for every run, its `value` and, when its values.parquet has them, its
in-run small-loss signal -mean_loss and its area under the margin `aum` (`signal_columns`; higher =
more valuable), and q01_s / q99_s are the values at the 1st and 99th percentile ranks. Using all
three beat every peer detector in reports/quality.md. This rank-anchored rescaling makes runs with
different value scales comparable, is robust to a few extreme values, and keeps the gap
between a low-value cluster and the rest, so that the two-means split below can find it
(a pure percentile rank is uniform whatever the data, so any split of it would flag a
fixed fraction). Rows a run never sampled (NaN value) are neutral (u = 1/2) for that run.
`rank` (1 = most suspicious) sorts by label_score, ties (at the clipped ends) broken by
the mean percentile rank of the values over the runs.

is_label_issue: by default the low cluster of an exact 1-D two-means (k-means, k = 2)
split of label_score — the rule OpenDataVal uses on data values (Jiang et al. 2023,
"noisy_detection" kmeans_f1). With `flag_fraction=f` the round(f * n) lowest scores
are flagged instead.

predicted_label: out-of-sample prediction from K-fold cross-validation (default 5 folds)
of a scikit-learn stand-in for the runs' model family: LogisticRegression for
`model=linear`, MLPClassifier(one hidden layer of the run's `hidden` width) for `mlp`
and `cnn`, each fitted on at most `cv_max_train` rows per fold with a fixed iteration
budget. valuekit's run directories hold no per-example predictions, and analysis code
does not import torch, hence the stand-in. The same out-of-sample probabilities feed
the cleanlab baseline (confident learning, Northcutt et al. 2021) when asked.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.errors import InputError, RunDirError

BASELINE_COLUMNS = ("baseline_small_loss", "cleanlab_label_quality")


# ---------------------------------------------------------------- scores and splits


def _pct_rank(v: np.ndarray) -> np.ndarray:
    """(rank - 1) / (n - 1) with ties averaged; NaN stays NaN."""
    s = pd.Series(v)
    n = int(s.notna().sum())
    r = s.rank(method="average").to_numpy()
    return (r - 1) / (n - 1) if n > 1 else np.where(np.isnan(r), np.nan, 0.5)


def run_score(v) -> np.ndarray:
    """u_r of the module docstring: one run's value rescaled between its 1st and 99th percentiles, clipped."""
    v = np.asarray(v, dtype=np.float64)
    finite = np.isfinite(v)
    out = np.full(len(v), 0.5)
    if finite.sum() < 2:
        return out
    lo, hi = np.quantile(v[finite], [0.01, 0.99])
    if hi <= lo:
        lo, hi = v[finite].min(), v[finite].max()
    if hi > lo:
        out[finite] = np.clip((v[finite] - lo) / (hi - lo), 0.0, 1.0)
    return out


def mean_pct_rank(values) -> np.ndarray:
    """Mean over runs (columns) of the percentile rank of the value; NaN counts as 1/2."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[:, None] if arr.ndim == 1 else arr
    return np.mean([np.nan_to_num(_pct_rank(arr[:, j]), nan=0.5) for j in range(arr.shape[1])], axis=0)


SIGNALS = ("value", "mean_loss", "aum")


def signal_columns(vals: pd.DataFrame) -> dict[str, np.ndarray]:
    """The detection signals of one run's values (higher = more valuable): value, -mean_loss, aum (those present)."""
    out = {"value": vals["value"].to_numpy(dtype=np.float64)}
    if "mean_loss" in vals and vals["mean_loss"].notna().any():
        out["neg_mean_loss"] = -vals["mean_loss"].to_numpy(dtype=np.float64)
    if "aum" in vals and vals["aum"].notna().any():
        out["aum"] = vals["aum"].to_numpy(dtype=np.float64)
    return out


def label_score(values: pd.DataFrame | np.ndarray) -> np.ndarray:
    """Mean over runs (columns) of `run_score`; in [0, 1], lower = more likely mislabelled."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    return np.mean([run_score(arr[:, j]) for j in range(arr.shape[1])], axis=0)


def two_means_split(x) -> np.ndarray:
    """Boolean mask of the lower cluster of the optimal 1-D k-means with k = 2.

    In one dimension the optimal clusters are contiguous in sorted order, so the exact
    optimum is the split point minimising the summed within-cluster squared error,
    found with prefix sums in O(n log n). NaN counts as the median; no split (all False)
    when all values are equal.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        return np.zeros(n, dtype=bool)
    if np.isnan(x).any():
        x = np.where(np.isnan(x), np.nanmedian(x) if np.isfinite(x).any() else 0.0, x)
    sx = np.sort(x)
    s = sx - x.mean()  # centring keeps the prefix-sum differences accurate
    if sx[0] == sx[-1]:
        return np.zeros(n, dtype=bool)
    c1, c2 = np.cumsum(s), np.cumsum(s * s)
    j = np.arange(1, n)
    left = c2[j - 1] - c1[j - 1] ** 2 / j
    right = (c2[-1] - c2[j - 1]) - (c1[-1] - c1[j - 1]) ** 2 / (n - j)
    total = np.where(sx[j - 1] < sx[j], left + right, np.inf)  # split only between distinct values
    return x <= sx[int(np.argmin(total))]


def fraction_split(x, fraction: float) -> np.ndarray:
    """Boolean mask of the round(fraction * n) lowest values (stable order for ties)."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=np.inf)
    k = int(round(fraction * len(x)))
    mask = np.zeros(len(x), dtype=bool)
    mask[np.argsort(x, kind="stable")[:k]] = True
    return mask


# ---------------------------------------------------------------- metrics (numpy; checked against sklearn in tests)


def _suspicion(score) -> np.ndarray:
    """Higher = more suspicious; NaN (never sampled) = the median, i.e. neutral."""
    s = np.asarray(score, dtype=np.float64)
    if np.isnan(s).any():
        s = np.where(np.isnan(s), np.nanmedian(s) if np.isfinite(s).any() else 0.0, s)
    return -s


def roc_auc(y_true, suspicion) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties averaged) = sklearn's roc_auc_score."""
    y = np.asarray(y_true, dtype=bool)
    p, q = int(y.sum()), int((~y).sum())
    if p == 0 or q == 0:
        return float("nan")
    r = pd.Series(np.asarray(suspicion, dtype=np.float64)).rank(method="average").to_numpy()
    return float((r[y].sum() - p * (p + 1) / 2) / (p * q))


def average_precision(y_true, suspicion) -> float:
    """Sum over distinct thresholds of (recall step) * precision = sklearn's average_precision_score."""
    y = np.asarray(y_true, dtype=bool)
    p = int(y.sum())
    if p == 0:
        return float("nan")
    s = np.asarray(suspicion, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, yy = s[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(yy)[ends]
    precision = tp / (ends + 1)
    recall = tp / p
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(flags: np.ndarray, y: np.ndarray) -> float:
    tp = int((flags & y).sum())
    denom = int(flags.sum()) + int(y.sum())
    return 2 * tp / denom if denom else float("nan")


def detection_metrics(score, is_noisy) -> dict:
    """auroc, auprc, precision/recall/f1 at k = #noisy, two-means F1 for a score (lower = more suspicious)."""
    y = np.asarray(is_noisy, dtype=bool)
    sus = _suspicion(score)
    k = int(y.sum())
    top = np.zeros(len(y), dtype=bool)
    top[np.argsort(-sus, kind="stable")[:k]] = True
    tp = int((top & y).sum())
    prec = tp / k if k else float("nan")
    rec = tp / k if k else float("nan")
    return {
        "auroc": roc_auc(y, sus), "auprc": average_precision(y, sus),
        "precision_at_k": prec, "recall_at_k": rec,
        "f1_at_k": 2 * prec * rec / (prec + rec) if k and (prec + rec) > 0 else (0.0 if k else float("nan")),
        "two_means_f1": _f1(two_means_split(-sus), y),
    }


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson on average ranks) over rows where both are finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = _pct_rank(a[ok]), _pct_rank(b[ok])
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def discovery_curve(score, is_noisy) -> pd.DataFrame:
    """Fraction of the truly noisy found vs fraction inspected, inspecting lowest scores first.

    Columns: inspected, found, random (= inspected), optimal (= min(1, inspected * n / #noisy)).
    """
    y = np.asarray(is_noisy, dtype=bool)
    n, k = len(y), int(y.sum())
    order = np.argsort(-_suspicion(score), kind="stable")
    inspected = np.r_[0.0, np.arange(1, n + 1) / n]
    found = np.r_[0.0, np.cumsum(y[order]) / max(k, 1)]
    return pd.DataFrame({"inspected": inspected, "found": found, "random": inspected,
                         "optimal": np.minimum(1.0, inspected * n / max(k, 1))})


# ---------------------------------------------------------------- reading runs and the training table


def open_runs(run_dirs) -> list:
    """Open run directories (paths or Run objects), refusing ones without values.parquet."""
    from valuekit.runs.reader import Run, open_run

    if isinstance(run_dirs, (str, Path, Run)):
        run_dirs = [run_dirs]
    runs = [open_run(r).check() for r in run_dirs]
    if not runs:
        raise InputError("no run directory given")
    for r in runs:
        # An unfinished run (killed, interrupted) is audited from its step log; see Run.values().
        if r.values() is None:
            raise RunDirError(f"{r.path}: no values.parquet and no step log (status {r.meta.get('status', '?')!r}); "
                              f"finish or resume the run first")
    prints = {r.meta.get("data", {}).get("train", {}).get("fingerprint") for r in runs}
    if len(prints - {None}) > 1:
        raise InputError(f"runs were trained on different training tables (fingerprints {sorted(prints - {None})}); "
                         f"audit runs of the same data together")
    return runs


def run_columns(runs) -> list[str]:
    """Unique column suffixes for the runs (their names, with _2, _3 for repeats)."""
    names, seen = [], {}
    for r in runs:
        base = str(r.name)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def _table_path(run) -> Path:
    raw = (run.meta.get("data", {}).get("train") or {}).get("path")
    if not raw:
        raise InputError(f"{run.meta_path}: data.train.path is empty (trained from a DataFrame); "
                         f"pass --data TABLE")
    p = Path(raw)
    for cand in (p, run.path / p, run.path.parent / p):
        if cand.exists():
            return cand
    raise InputError(f"{run.meta_path}: training table {raw!r} (data.train.path) not found; pass --data TABLE")


def _plain(v):
    """numpy scalars as plain Python values (messages show 0, not np.int64(0))."""
    return v.item() if isinstance(v, np.generic) else v


def training_table(run, data=None, *, id_col: str = "id", label_col: str = "label") -> dict:
    """The training table as numpy pieces: ids, given codes, x (N, D) float32 or None, image_shape, is_noisy.

    `data` (path or DataFrame) overrides run.json's data.train.path. Class codes follow the run's `classes`.
    """
    from valuekit.data.tables import _features, _label_text, read_any

    df, meta, path = read_any(data if data is not None else _table_path(run), name="train")
    where = path or "<data DataFrame>"
    if len(df) == 0:
        raise InputError(f"{where}: table is empty")
    for col in (id_col, label_col):
        if col not in df.columns:
            raise InputError(f"{where}: missing column {col!r} (columns: {list(df.columns)[:12]})")
        if df[col].isna().any():
            row = int(np.flatnonzero(df[col].isna().to_numpy())[0])
            raise InputError(f"{where}: column {col!r} has a null value at row {row}")
    dup = df[id_col][df[id_col].duplicated()]
    if len(dup):
        raise InputError(f"{where}: column {id_col!r} has duplicate id {_plain(dup.iloc[0])!r}")
    ids = df[id_col].to_numpy()
    ids = ids.astype(np.int64) if ids.dtype.kind in "iu" else df[id_col].astype(str).to_numpy(dtype=object)
    classes = [str(c) for c in run.meta.get("classes") or []]
    text = _label_text(df[label_col])
    if not classes:
        classes = sorted(set(text.tolist()))
    code = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(text.tolist()) - set(code))
    if unknown:
        raise InputError(f"{where}: column {label_col!r} has label {unknown[0]!r} not among the run's classes "
                         f"{classes[:10]}")
    y = np.array([code[t] for t in text], dtype=np.int64)
    feature_cols = run.meta.get("feature_cols") or None
    if feature_cols and not all(c in df.columns for c in feature_cols):
        feature_cols = None
    reserved = {id_col, label_col, "source", "is_noisy", "clean_label"}
    try:
        x, _, _ = _features(df, where, reserved, feature_cols, ids)
    except InputError:
        x = None  # audit still works without features (no predicted_label, no thumbnails)
    shape = run.meta.get("image_shape") or meta.get("image_shape")
    if shape is not None and (x is None or int(np.prod(shape)) != x.shape[1]):
        shape = None
    is_noisy = df["is_noisy"].to_numpy().astype(bool) if "is_noisy" in df.columns else None
    return {"ids": ids, "y": y, "classes": classes, "x": x, "image_shape": tuple(shape) if shape else None,
            "is_noisy": is_noisy, "path": path}


def _aligned(run, column_ids: np.ndarray, index: pd.Index, name: str) -> pd.DataFrame:
    vals = run.values()
    partial = vals.attrs.get("partial", False)
    vals = vals.set_index(vals["example_id"].to_numpy(dtype=column_ids.dtype))
    missing = index.difference(vals.index)
    if len(missing) and not partial:  # a partial run has simply not seen every row yet
        raise InputError(f"{run.values_path}: has no value for training id {_plain(missing[0])!r} "
                         f"({len(missing)} ids missing); was the run trained on this table? ({name})")
    return vals.reindex(index)


# ---------------------------------------------------------------- cross-validated predictions


def cv_pred_probs(x: np.ndarray, y: np.ndarray, num_classes: int, *, model: str = "mlp", hidden: int = 128,
                  folds: int = 5, max_train: int = 2000, max_iter: int = 30, seed: int = 0) -> np.ndarray:
    """Out-of-sample class probabilities (N, C) by K-fold cross-validation of a scikit-learn stand-in.

    `model="linear"` -> LogisticRegression; otherwise MLPClassifier((hidden,)); both after
    StandardScaler, fitted on at most `max_train` rows of each fold's training part with
    `max_iter` iterations (a fixed budget, so the audit's cost does not grow with N).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    counts = np.bincount(y, minlength=num_classes)
    folds = max(2, min(folds, len(y)))
    splitter = (StratifiedKFold(folds, shuffle=True, random_state=seed) if counts[counts > 0].min() >= folds
                else KFold(folds, shuffle=True, random_state=seed))
    probs = np.full((len(y), num_classes), 1.0 / num_classes)
    for tr, te in splitter.split(x, y):
        if len(tr) > max_train:
            tr = rng.choice(tr, max_train, replace=False)
        if model == "linear":
            clf = LogisticRegression(max_iter=max_iter * 3)
        else:
            clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed)
        pipe = make_pipeline(StandardScaler(), clf)
        # One BLAS thread: small fits get slower, not faster, when threads fight for shared cores.
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")  # ConvergenceWarning: the budget is fixed on purpose
            pipe.fit(x[tr], y[tr])
            p = pipe.predict_proba(x[te])
        probs[te] = 0.0
        probs[np.ix_(te, pipe.classes_)] = p
    return probs


# ---------------------------------------------------------------- the audit


def audit(run_dirs, data=None, *, flag_fraction: float | None = None, baselines: bool = False,
          predict: bool = True, cv_folds: int = 5, cv_max_train: int = 2000, seed: int = 0,
          id_col: str = "id", label_col: str = "label") -> pd.DataFrame:
    """Mislabel audit table, one row per training example, sorted from most to least suspicious.

    Columns: id, given_label, predicted_label (class names), value_<run>, weight_<run> per run,
    label_score (module docstring), is_label_issue, rank (1 = most suspicious), is_noisy when
    the table has it; with `baselines=True` also baseline_small_loss (a uniform run's value,
    -mean training loss, when one is among the runs) and cleanlab_label_quality /
    cleanlab_is_label_issue (confident learning on cross-validated probabilities).
    `data` (path or DataFrame) replaces the training table named in run.json.
    `frame.attrs` records the runs, the flag rule and the cross-validation stand-in.
    """
    if flag_fraction is not None and not 0.0 <= flag_fraction <= 1.0:
        raise InputError(f"--flag-fraction {flag_fraction}: must be between 0 and 1")
    runs = open_runs(run_dirs)
    names = run_columns(runs)
    table = training_table(runs[0], data, id_col=id_col, label_col=label_col)
    ids, classes = table["ids"], table["classes"]
    index = pd.Index(ids)
    if index.has_duplicates:
        dup = index[index.duplicated()][0]
        raise InputError(f"{table['path'] or 'data'}: column {id_col!r} has duplicate id {_plain(dup)!r}")
    frame = pd.DataFrame({"id": ids, "given_label": np.asarray(classes, dtype=object)[table["y"]]})
    value_cols, signals = [], []
    for run, name in zip(runs, names):
        v = _aligned(run, ids, index, name)
        frame[f"value_{name}"] = v["value"].to_numpy(dtype=np.float64)
        frame[f"weight_{name}"] = v["weight"].to_numpy(dtype=np.float64)
        value_cols.append(f"value_{name}")
        signals += list(signal_columns(v).values())

    probs = None
    cfg = runs[0].meta.get("config", {})
    family = "linear" if cfg.get("model") == "linear" else "mlp"
    stand_in = None
    if predict and table["x"] is not None:
        probs = cv_pred_probs(table["x"], table["y"], len(classes), model=family, hidden=int(cfg.get("hidden", 128)),
                              folds=cv_folds, max_train=cv_max_train, seed=seed)
        stand_in = (f"{'LogisticRegression' if family == 'linear' else 'MLPClassifier'} (scikit-learn), "
                    f"{cv_folds}-fold, <= {cv_max_train} training rows per fold")
        frame["predicted_label"] = np.asarray(classes, dtype=object)[probs.argmax(1)]
    else:
        frame["predicted_label"] = pd.Series([None] * len(frame), dtype="string")

    score = label_score(np.stack(signals, 1))
    frame["label_score"] = score
    order = np.lexsort((mean_pct_rank(frame[value_cols].to_numpy()), score))
    rank = np.empty(len(score), dtype=np.int64)
    rank[order] = np.arange(1, len(score) + 1)
    if flag_fraction is None:
        frame["is_label_issue"] = two_means_split(score)
        rule = "two-means split of label_score"
    else:
        frame["is_label_issue"] = fraction_split(rank, flag_fraction)  # by rank: ties broken as in `rank`
        rule = f"lowest {flag_fraction:g} of label_score"
    frame["rank"] = rank
    if table["is_noisy"] is not None:
        frame["is_noisy"] = table["is_noisy"]

    skipped = []
    if baselines:
        uni = [c for r, c in zip(runs, value_cols) if r.method == "uniform"]
        if uni:
            frame["baseline_small_loss"] = frame[uni[0]]
        else:
            skipped.append("small_loss: no uniform run among the inputs")
        try:
            from cleanlab.filter import find_label_issues
            from cleanlab.rank import get_label_quality_scores
        except ImportError:
            skipped.append("cleanlab: not installed (pip install cleanlab)")
        else:
            if probs is None:
                skipped.append("cleanlab: no numeric features in the training table")
            else:
                frame["cleanlab_label_quality"] = get_label_quality_scores(table["y"], probs)
                # one process: cleanlab's default worker pool forks, and a fork of a process with live threads (torch,
                # tqdm's monitor, a part writer) can deadlock in the child
                frame["cleanlab_is_label_issue"] = find_label_issues(table["y"], probs, n_jobs=1)

    cols = ["id", "given_label", "predicted_label", *value_cols, *[f"weight_{n}" for n in names],
            "label_score", "is_label_issue", "rank"]
    cols += [c for c in frame.columns if c not in cols]
    frame = frame[cols].sort_values("rank", ignore_index=True)
    frame.attrs.update({
        "runs": [str(r.path) for r in runs], "run_names": names, "methods": [r.method for r in runs],
        "flag_rule": rule, "cv_stand_in": stand_in, "baselines_skipped": skipped, "classes": classes,
    })
    return frame


def audit_summary(frame: pd.DataFrame) -> dict:
    """Summary of an audit table: n_flagged; with is_noisy the detection metrics of label_score
    (auroc, auprc, precision/recall/f1 at k = #noisy, two-means F1) and per score column
    (each run's value and the baselines); Spearman agreement between the runs' values.
    """
    for col in ("label_score", "is_label_issue"):
        if col not in frame.columns:
            raise InputError(f"audit table: missing column {col!r}")
    value_cols = [c for c in frame.columns if c.startswith("value_")]
    out: dict = {"n": int(len(frame)), "n_flagged": int(frame["is_label_issue"].sum()),
                 "flag_rule": frame.attrs.get("flag_rule"), "runs": frame.attrs.get("run_names")}
    if "is_noisy" in frame.columns:
        y = frame["is_noisy"].to_numpy(dtype=bool)
        flags = frame["is_label_issue"].to_numpy(dtype=bool)
        out["n_noisy"] = int(y.sum())
        out.update(detection_metrics(frame["label_score"].to_numpy(), y))
        out["flagged_precision"] = float((flags & y).sum() / flags.sum()) if flags.sum() else float("nan")
        out["flagged_recall"] = float((flags & y).sum() / y.sum()) if y.sum() else float("nan")
        out["scores"] = {c: detection_metrics(frame[c].to_numpy(), y)
                         for c in [*value_cols, *[b for b in BASELINE_COLUMNS if b in frame.columns]]}
        if "cleanlab_is_label_issue" in frame.columns:
            out["scores"].setdefault("cleanlab_label_quality", {})["flagged_f1"] = _f1(
                frame["cleanlab_is_label_issue"].to_numpy(dtype=bool), y)
    pairs = {}
    for i, a in enumerate(value_cols):
        for b in value_cols[i + 1:]:
            pairs[f"{a[6:]} ~ {b[6:]}"] = spearman(frame[a], frame[b])
    out["spearman"] = pairs
    finite = [v for v in pairs.values() if np.isfinite(v)]
    out["spearman_mean"] = float(np.mean(finite)) if finite else None
    if frame.attrs.get("baselines_skipped"):
        out["baselines_skipped"] = frame.attrs["baselines_skipped"]
    return _jsonable(out)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
