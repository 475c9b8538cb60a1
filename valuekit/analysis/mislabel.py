"""Mislabel audit: one row per training example, ranked from most to least suspicious.

Inputs are run directories (their `values.parquet`) and the training table (class names,
features, and `is_noisy` when the data was corrupted on purpose). `is_noisy` is used only
to *evaluate* the audit (summary metrics); it never decides a flag.

label_score (in [0, 1], lower = more likely mislabelled) combines the runs' signals, each rescaled::

    u_s(i) = 0.01 + 0.98 (v_s(i) - q01_s) / (q99_s - q01_s)        for q01_s <= v_s(i) <= q99_s
    u_s(i) = 0.01 (r_s(i) - 1) / n_low                           below q01_s (r_s = rank, 1 = lowest)
    u_s(i) = 1 - 0.01 (n - r_s(i)) / n_high                      above q99_s
    label_score(i) = mean over signals s of u_s(i)

where the signals s are, for every run, its `value` and, when its values.parquet has them, its
in-run small-loss signal -mean_loss and its area under the margin `aum` (`signal_columns`; higher =
more valuable), and q01_s / q99_s are the values at the 1st and 99th percentile ranks. Using all
three beat every peer detector in reports/quality.md. This rank-anchored rescaling makes runs with
different value scales comparable, is robust to a few extreme values, and keeps the gap
between a low-value cluster and the rest, so that the two-means split below can find it
(a pure percentile rank is uniform whatever the data, so any split of it would flag a
fixed fraction); the rows beyond the percentiles keep their order in the outer 1 % of [0, 1], so the
most suspicious rows are not tied at 0. Rows a run never sampled (NaN value) are neutral (u = 1/2)
for that run. `rank` (1 = most suspicious) sorts by label_score, ties broken by the mean percentile
rank of the values over the runs.

value_pct_<run>: each run's `value` as its within-run percentile rank ((rank - 1) / (n - 1), 1 = most
valuable), so that the runs of different methods (`uniform`'s -mean loss beside DDS's value in [0, 1])
stand side by side on one scale; value_<run> keeps the run's own value.

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

from valuekit.analysis.scores import (
    _aligned,
    _pct_rank,
    _plain,
    fraction_split,
    label_score,
    mean_pct_rank,
    open_runs,
    run_columns,
    signal_columns,
    table_path,
    two_means_split,
)
from valuekit.errors import InputError

BASELINE_COLUMNS = ("baseline_small_loss", "cleanlab_label_quality")


# ---------------------------------------------------------------- scores and splits








SIGNALS = ("value", "mean_loss", "aum")










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










def training_table(run, data=None, *, id_col: str = "id", label_col: str = "label") -> dict:
    """The training table as numpy pieces: ids, given codes, x (N, D) float32 or None, image_shape, is_noisy.

    `data` (path or DataFrame) overrides run.json's data.train.path. Class codes follow the run's `classes`.
    """
    from valuekit.data.tables import label_text, read_any

    df, meta, path = read_any(data if data is not None else table_path(run), name="train")
    where = path or "training table (argument `data`)"
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
    text = label_text(df[label_col])
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
    shape = run.meta.get("image_shape") or meta.get("image_shape")
    x, note = _table_features(df, where, reserved, feature_cols, ids, shape, base=Path(path).parent if path else None)
    if shape is not None and (x is None or int(np.prod(shape)) != x.shape[1]):
        shape = None
    is_noisy = df["is_noisy"].to_numpy().astype(bool) if "is_noisy" in df.columns else None
    return {"ids": ids, "y": y, "classes": classes, "x": x, "image_shape": tuple(shape) if shape else None,
            "is_noisy": is_noisy, "path": path, "features_note": note}


def _table_features(df, where, reserved, feature_cols, ids, shape, *, base) -> tuple[np.ndarray | None, str | None]:
    """(x (N, D) float32, None), or (None, why not) when the table has no features the audit can use: numeric
    columns or a list column, else an encoded image column (bytes, {bytes, path}, file names relative to the
    table's folder), decoded to the run's image shape."""
    from valuekit.data.tables import decode_image_column, feature_matrix, image_kind

    try:
        x, _, _ = feature_matrix(df, where, reserved, feature_cols, ids)
        return x, None
    except InputError as exc:
        why = str(exc)
    cols = [c for c in (feature_cols or df.columns) if c in df.columns and c not in reserved]
    images = [c for c in cols if image_kind(df[c]) is not None]
    if len(images) != 1:
        return None, why  # the audit still works without features (no predicted_label, no thumbnails)
    col = images[0]
    hw = (int(shape[1]), int(shape[2])) if shape is not None and len(shape) == 3 else None
    try:
        x, _ = decode_image_column(df[col], where=where, col=col, ids=ids, base=base or Path.cwd(), size=hw,
                                   channels=int(shape[0]) if hw else None)
    except InputError as exc:
        return None, str(exc)
    return np.asarray(x, dtype=np.float32), None




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
          id_col: str = "id", label_col: str = "label", out=None, overwrite: bool = False) -> pd.DataFrame:
    """Mislabel audit table, one row per training example, sorted from most to least suspicious.

    Columns: id, given_label, predicted_label (class names), value_pct_<run> per run (the run's value as a
    within-run percentile, 1 = most valuable: one scale for every method), label_score (module docstring),
    is_label_issue, rank (1 = most suspicious), value_<run> and weight_<run> per run, is_noisy when
    the table has it; with `baselines=True` also baseline_small_loss (a uniform run's value,
    -mean training loss, when one is among the runs) and cleanlab_label_quality /
    cleanlab_is_label_issue (confident learning on cross-validated probabilities).
    `data` (path or DataFrame) replaces the training table named in run.json.
    `frame.attrs` records the runs, the flag rule and the cross-validation stand-in (or `predict_note`: one line
    saying why there is no predicted_label). An image column (PNG/JPEG bytes, {bytes, path}, file names relative
    to the table's folder) is decoded to the run's image shape for the prediction and the report's thumbnails.
    With `out` (.parquet or .csv) the table is also written there and its `audit_summary` to
    `summary_path(out)`, as `valuekit audit -o` does; existing files are refused unless `overwrite=True` (the
    training table and the runs' files never are replaced).
    """
    if flag_fraction is not None and not 0.0 <= flag_fraction <= 1.0:
        raise InputError(f"flag_fraction={flag_fraction}: must be between 0 and 1",
                         cli=f"--flag-fraction {flag_fraction}: must be between 0 and 1")
    runs = open_runs(run_dirs)
    names = run_columns(runs)
    if out is not None:
        out = _check_out(out, runs, data, overwrite)
    from valuekit.analysis.instruction_audit import has_no_classes, instruction_audit

    if any(has_no_classes(r) for r in runs):
        frame = instruction_audit(runs, data, flag_fraction=flag_fraction, id_col=id_col)
        if out is not None:
            write_audit(frame, out)
        return frame
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
        frame[f"value_pct_{name}"] = _pct_rank(frame[f"value_{name}"].to_numpy())
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
    predict_note = None if probs is not None else (
        "predict=False" if not predict else f"no features to predict from ({table['features_note']})")

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

    cols = ["id", "given_label", "predicted_label", *[f"value_pct_{n}" for n in names], "label_score",
            "is_label_issue", "rank", *value_cols, *[f"weight_{n}" for n in names]]
    cols += [c for c in frame.columns if c not in cols]
    frame = frame[cols].sort_values("rank", ignore_index=True)
    frame.attrs.update(
        {
            "runs": [str(r.path) for r in runs],
            "run_names": names,
            "methods": [r.method for r in runs],
            "flag_rule": rule,
            "cv_stand_in": stand_in,
            "predict_note": predict_note,
            "baselines_skipped": skipped,
            "classes": classes,
        }
    )
    if out is not None:
        write_audit(frame, out)
    return frame


AUDIT_SUFFIXES = (".parquet", ".pq", ".csv")


def summary_path(out) -> Path:
    """AUDIT.parquet -> AUDIT.summary.json (same folder): where the audit's summary is written."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")


def _check_out(out, runs, data, overwrite: bool) -> Path:
    """`out` and its summary file may be written: the right suffix, not the training table or a run's file, and
    not already there unless `overwrite`."""
    from valuekit.runs.paths import check_output, refuse_existing

    tables = [data] if isinstance(data, (str, Path)) else []
    for run in runs:
        try:
            tables.append(table_path(run))
        except InputError:  # trained from a DataFrame: no table file to protect
            pass
    run_paths = [r.path for r in runs]
    path = check_output(out, option="-o", inputs=tables, runs=run_paths, suffixes=AUDIT_SUFFIXES, overwrite=overwrite)
    check_output(summary_path(out), option="-o", inputs=tables, runs=run_paths)
    refuse_existing(summary_path(out), overwrite=overwrite, of=str(out))
    return path


def write_audit(frame: pd.DataFrame, out) -> dict:
    """Write an audit table to `out` (.csv, else Parquet) and its `audit_summary` (with the cross-validation
    stand-in) to `summary_path(out)`, each atomically; return the summary."""
    import json

    from valuekit.runs.atomic import write_atomic

    out = Path(out)
    summary = audit_summary(frame)
    summary["cv_stand_in"] = frame.attrs.get("cv_stand_in")
    out.parent.mkdir(parents=True, exist_ok=True)
    table = frame.copy()
    table.attrs = {}
    if out.suffix.lower() == ".csv":
        write_atomic(out, lambda p: table.to_csv(p, index=False))
    else:
        write_atomic(out, lambda p: table.to_parquet(p, index=False))
    text = json.dumps(summary, indent=2)

    def write_summary(tmp: Path) -> None:
        tmp.write_text(text)

    write_atomic(summary_path(out), write_summary)
    return summary


def value_columns(frame: pd.DataFrame, *, pct: bool = False) -> list[str]:
    """The audit's value_<run> columns (pct=False) or value_pct_<run> columns (pct=True), in run order."""
    return [c for c in frame.columns if c.startswith("value_") and c.startswith("value_pct_") == pct]


def audit_summary(frame: pd.DataFrame) -> dict:
    """Summary of an audit table: n_flagged; with is_noisy the detection metrics of label_score
    (auroc, auprc, precision/recall/f1 at k = #noisy, two-means F1) and per score column
    (each run's value and the baselines); Spearman agreement between the runs' values.
    """
    for col in ("label_score", "is_label_issue"):
        if col not in frame.columns:
            raise InputError(f"audit table: missing column {col!r}")
    value_cols = value_columns(frame)
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
    tasks = task_summary(frame) if frame.attrs.get("kind") in ("instructions", "translation") else None
    if tasks is not None:
        out["tasks" if frame.attrs.get("kind") == "instructions" else "sources"] = tasks.to_dict("records")
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


def task_summary(frame: pd.DataFrame) -> pd.DataFrame | None:
    """Per task of an instruction audit (per source language of a translation audit: its `group_col`): rows, flagged
    rows, mean label_score and each run's mean weight and value percentile (a junk task shows as low weight and low
    score); is_noisy's share when the table has it."""
    group = frame.attrs.get("group_col", "task")
    if group not in frame.columns:
        return None
    agg = {"rows": ("id", "size"), "flagged": ("is_label_issue", "sum"), "mean_label_score": ("label_score", "mean")}
    for c in frame.columns:
        if c.startswith(("weight_", "value_pct_")):
            agg[f"mean_{c}"] = (c, "mean")
    if "is_noisy" in frame.columns:
        agg["noisy_share"] = ("is_noisy", "mean")
    return frame.groupby(group, sort=True).agg(**agg).reset_index().sort_values("mean_label_score", ignore_index=True)
