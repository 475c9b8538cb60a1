"""Mislabel audit (valuekit.analysis.mislabel) and `valuekit audit`, on hand-made run directories."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from valuekit.cli.main import main

from valuekit.analysis import mislabel as m
from valuekit.analysis import scores
from valuekit.errors import InputError, RunDirError
from valuekit.runs.layout import SCHEMA_VERSION

CLASSES = ["cat", "dog", "eel"]
N, NOISY = 45, [3, 10, 17, 24, 31, 38]  # rows whose label is flipped


def make_table(tmp_path, *, seed=0) -> pd.DataFrame:
    """Three well separated 2-D clusters; rows in NOISY carry the next class's label."""
    rng = np.random.default_rng(seed)
    clean = np.arange(N) % 3
    x = np.eye(3)[clean][:, :2] * 6 + rng.normal(0, 0.3, (N, 2))
    label = clean.copy()
    label[NOISY] = (clean[NOISY] + 1) % 3
    df = pd.DataFrame({"id": np.arange(100, 100 + N), "label": np.asarray(CLASSES)[label],
                       "f0": x[:, 0], "f1": x[:, 1], "is_noisy": np.isin(np.arange(N), NOISY)})
    df.to_parquet(tmp_path / "train.parquet", index=False)
    return df


def make_run(tmp_path, name, value, *, weight=None, method="dds", table="train.parquet", ids=None):
    """A run directory as the training loop leaves it: run.json + values.parquet (value per table row)."""
    d = tmp_path / name
    d.mkdir()
    n = len(value)
    ids = np.arange(100, 100 + n) if ids is None else ids
    meta = {"name": name, "method": method, "schema_version": SCHEMA_VERSION, "status": "completed",
            "config": {"model": "linear", "hidden": 8, "steps": 10}, "classes": CLASSES,
            "data": {"train": {"path": str(tmp_path / table), "fingerprint": "abc"}},
            "feature_cols": ["f0", "f1"], "image_shape": None, "id_type": "int64"}
    (d / "run.json").write_text(json.dumps(meta))
    w = np.ones(n) if weight is None else weight
    order = np.argsort(-np.asarray(value), kind="stable")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(1, n + 1)
    # stored in a shuffled order: the audit must align by example_id, not by row position
    perm = np.random.default_rng(1).permutation(n)
    pd.DataFrame({"example_id": ids[perm], "value": np.asarray(value, float)[perm], "value_std": np.nan,
                  "weight": np.asarray(w, float)[perm], "rank": rank[perm]}).to_parquet(d / "values.parquet")
    return d


def clear_values(seed=0):
    """Clean rows around +1, noisy rows around -3: a clearly bimodal value."""
    rng = np.random.default_rng(seed)
    v = 1 + rng.normal(0, 0.2, N)
    v[NOISY] = -3 + rng.normal(0, 0.2, len(NOISY))
    return v


# ---------------------------------------------------------------- the table


def test_audit_columns_dtypes_and_values(tmp_path):
    df = make_table(tmp_path)
    v = clear_values()
    w = np.exp(v) / np.exp(v).mean()
    run = make_run(tmp_path, "a", v, weight=w)
    f = m.audit(run)
    assert list(f.columns) == ["id", "given_label", "predicted_label", "value_pct_a", "label_score",
                               "is_label_issue", "rank", "value_a", "weight_a", "is_noisy"]
    assert f["id"].dtype == np.int64 and f["rank"].dtype == np.int64
    assert f["is_label_issue"].dtype == bool and f["is_noisy"].dtype == bool
    assert f["value_a"].dtype == np.float64 and f["label_score"].dtype == np.float64
    assert len(f) == N and sorted(f["id"]) == list(df["id"])
    # sorted from most to least suspicious, rank is a permutation of 1..N
    assert list(f["rank"]) == list(range(1, N + 1))
    by_id = f.set_index("id")
    # values and weights aligned by id although values.parquet was shuffled
    np.testing.assert_allclose(by_id.loc[df["id"], "value_a"], v)
    np.testing.assert_allclose(by_id.loc[df["id"], "weight_a"], w)
    # class names, not codes
    assert (by_id.loc[df["id"], "given_label"].to_numpy() == df["label"].to_numpy()).all()
    assert set(f["predicted_label"]) <= set(CLASSES)
    # out-of-sample predictions recover the clean class of the flipped rows (clusters are well separated)
    clean = np.asarray(CLASSES)[np.arange(N) % 3]
    assert (by_id.loc[df["id"], "predicted_label"].to_numpy() == clean).mean() >= 0.9
    assert ((f["label_score"] >= 0) & (f["label_score"] <= 1)).all()
    # the bimodal value: the two-means split flags exactly the noisy rows
    assert set(f.loc[f["is_label_issue"], "id"]) == set(100 + np.array(NOISY))
    assert (by_id.loc[df["id"], "is_noisy"].to_numpy() == df["is_noisy"].to_numpy()).all()
    assert f.attrs["flag_rule"] == "two-means split of label_score"


def test_label_score_is_rank_consistent():
    rng = np.random.default_rng(0)
    v = rng.normal(size=200) ** 3  # heavy tails: the quantile clip matters
    s = scores.label_score(v)
    assert s.min() >= 0 and s.max() <= 1 and s.min() == 0 and s.max() == 1
    order = np.argsort(v)
    assert np.all(np.diff(s[order]) >= 0)  # monotone in the value
    # scale and shift of a run's values do not change its score; two copies average to the same
    np.testing.assert_allclose(scores.label_score(1000 * v - 7), s)
    np.testing.assert_allclose(scores.label_score(np.c_[v, 5 * v]), s)
    # two runs: the mean of the per-run scores
    v2 = rng.normal(size=200)
    np.testing.assert_allclose(scores.label_score(np.c_[v, v2]), (scores.run_score(v) + scores.run_score(v2)) / 2)
    # NaN (never sampled) is neutral
    vn = v.copy()
    vn[5] = np.nan
    assert scores.label_score(vn)[5] == 0.5


def test_rank_follows_value_for_one_run(tmp_path):
    make_table(tmp_path)
    v = np.random.default_rng(3).normal(size=N) ** 3
    f = m.audit(make_run(tmp_path, "a", v), predict=False)
    # rank 1 = lowest value, ties of the clipped label_score broken by the value's rank
    assert np.all(np.diff(f["value_a"].to_numpy()) > 0)
    assert np.all(np.diff(f["label_score"].to_numpy()) >= 0)
    assert f["predicted_label"].isna().all()


def test_flags_never_read_is_noisy(tmp_path):
    df = make_table(tmp_path)
    runs = [make_run(tmp_path, "a", clear_values(0)), make_run(tmp_path, "b", clear_values(1) * 3)]
    with_flag = m.audit(runs)
    without = m.audit(runs, data=df.drop(columns=["is_noisy"]))
    assert "is_noisy" not in without.columns
    for col in ("id", "label_score", "is_label_issue", "rank", "predicted_label"):
        assert (with_flag[col].to_numpy() == without[col].to_numpy()).all(), col
    # flipping the hidden truth does not move a single flag either
    flipped = df.assign(is_noisy=~df["is_noisy"])
    assert (m.audit(runs, data=flipped)["is_label_issue"].to_numpy() == with_flag["is_label_issue"].to_numpy()).all()
    s = m.audit_summary(without)
    assert s["n_flagged"] == int(without["is_label_issue"].sum()) and "auroc" not in s


def test_flag_fraction(tmp_path):
    make_table(tmp_path)
    f = m.audit(make_run(tmp_path, "a", clear_values()), flag_fraction=0.2, predict=False)
    assert f["is_label_issue"].sum() == round(0.2 * N)
    assert f["is_label_issue"].to_numpy()[: round(0.2 * N)].all()  # the lowest-ranked rows
    with pytest.raises(InputError, match=r"^flag_fraction=1.5: must be between 0 and 1$") as info:
        m.audit(make_run(tmp_path, "b", clear_values()), flag_fraction=1.5)
    assert info.value.cli == "--flag-fraction 1.5: must be between 0 and 1"


# ---------------------------------------------------------------- splits and metrics


def test_two_means_split_on_bimodal_input():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 0.3, 30), rng.normal(5, 0.3, 70)]
    perm = rng.permutation(100)
    x, low = x[perm], (perm < 30)
    mask = scores.two_means_split(x)
    assert (mask == low).all()
    km = KMeans(2, n_init=10, random_state=0).fit(x.reshape(-1, 1))
    low_cluster = km.labels_ == km.predict([[x.min()]])[0]
    assert (mask == low_cluster).all()
    # exact optimum: no other threshold has a smaller within-cluster sum of squares
    s = np.sort(x)

    def sse(k):
        return ((s[:k] - s[:k].mean()) ** 2).sum() + ((s[k:] - s[k:].mean()) ** 2).sum()

    assert sse(int(mask.sum())) <= min(sse(k) for k in range(1, 100)) + 1e-9
    assert not scores.two_means_split(np.ones(10)).any()
    assert scores.fraction_split([3.0, 1.0, 2.0, 0.0], 0.5).tolist() == [False, True, False, True]


def test_two_means_split_is_the_exact_optimum_on_unclustered_data():
    """On data with no clear gap (where a wrong cost still picks a plausible split) the split is the brute-force
    minimum of the within-cluster sum of squares, for several sizes."""
    rng = np.random.default_rng(3)
    for n in (5, 17, 60):
        for _ in range(5):
            x = rng.gamma(2.0, size=n)
            s = np.sort(x)
            cost = [((s[:k] - s[:k].mean()) ** 2).sum() + ((s[k:] - s[k:].mean()) ** 2).sum() for k in range(1, n)]
            assert scores.two_means_split(x).sum() == 1 + int(np.argmin(cost))


def test_small_cases_of_scores_and_metrics():
    """Edges: a run whose 1st and 99th percentiles coincide falls back to min/max; percentile ranks are
    (rank - 1) / (n - 1); one positive is enough for an AUROC; the discovery curve by hand."""
    np.testing.assert_array_equal(scores.run_score(np.r_[np.zeros(199), 4.0]), np.r_[np.zeros(199), 1.0])
    np.testing.assert_allclose(scores.mean_pct_rank([3.0, 1.0, 2.0, np.nan, 5.0]), [2 / 3, 0.0, 1 / 3, 0.5, 1.0])
    assert np.isnan(m.spearman([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]))  # one side constant: undefined
    assert np.isnan(m.spearman([5.0, 5.0, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0]))
    assert m.spearman([1.0, 2.0, 3.0, np.nan], [3.0, 2.0, 1.0, 0.0]) == pytest.approx(-1.0)
    assert m.roc_auc([True, False, False], [0.9, 0.1, 0.5]) == 1.0
    assert m.roc_auc([False, True, True], [0.9, 0.1, 0.5]) == 0.0
    two = m.discovery_curve([0.5, 0.1, 0.9, 0.2], [True, True, False, False])
    assert two.found.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0] and two.optimal.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    none = m.discovery_curve([0.5, 0.1, 0.9, 0.2], [False] * 4)
    assert none.found.tolist() == [0.0] * 5 and none.optimal.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert scores.two_means_split([0.0, 5.0]).tolist() == [True, False]
    assert scores.two_means_split([0.0, 0.0, 5.0]).tolist() == [True, True, False]
    curve = m.discovery_curve([0.5, 0.1, 0.9, 0.2], [False, True, False, False])
    assert curve.inspected.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.found.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0] and curve.random.tolist() == curve.inspected.tolist()
    assert curve.optimal.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_training_features_follow_the_runs_feature_cols(tmp_path):
    """x holds the run's feature_cols (an extra numeric column in the table is left out); without them in the
    table, every numeric non-reserved column."""
    df = make_table(tmp_path)
    run = scores.open_runs([make_run(tmp_path, "a", clear_values())])[0]
    got = m.training_table(run, df.assign(extra=7.0))
    np.testing.assert_array_equal(got["x"], df[["f0", "f1"]].to_numpy(np.float32))
    other = m.training_table(run, df.rename(columns={"f1": "g1"}).assign(extra=7.0))
    assert other["x"].shape == (N, 3)


def test_cv_folds_are_stratified_when_every_class_fills_them(monkeypatch):
    """StratifiedKFold when the smallest class has at least `folds` rows (exactly 5 here), KFold below that."""
    import sklearn.model_selection as ms

    used = []
    for name in ("KFold", "StratifiedKFold"):
        real = getattr(ms, name)
        monkeypatch.setattr(ms, name, lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, 2))
    y = np.r_[np.zeros(20, int), np.ones(5, int)]
    probs = m.cv_pred_probs(x, y, 2, model="linear", folds=5)
    assert used == ["StratifiedKFold"] and probs.shape == (25, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    m.cv_pred_probs(x[1:], y[1:], 2, model="linear", folds=5)
    m.cv_pred_probs(x[:-1], y[:-1], 2, model="linear", folds=5)
    assert used == ["StratifiedKFold", "StratifiedKFold", "KFold"]


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.25
    score = np.round(rng.normal(size=300) - 1.5 * y, 1)  # lower for noisy, with ties
    assert m.roc_auc(y, -score) == pytest.approx(roc_auc_score(y, -score), abs=1e-12)
    assert m.average_precision(y, -score) == pytest.approx(average_precision_score(y, -score), abs=1e-12)
    d = m.detection_metrics(score, y)
    assert d["auroc"] == pytest.approx(roc_auc_score(y, -score), abs=1e-12)
    assert d["auprc"] == pytest.approx(average_precision_score(y, -score), abs=1e-12)
    k = int(y.sum())
    top = np.zeros(300, bool)
    top[np.argsort(score, kind="stable")[:k]] = True
    assert d["precision_at_k"] == pytest.approx(y[top].mean())
    assert d["recall_at_k"] == pytest.approx(y[top].sum() / k)
    assert d["f1_at_k"] == pytest.approx(f1_score(y, top))
    assert d["two_means_f1"] == pytest.approx(f1_score(y, scores.two_means_split(score)))


def test_summary_and_spearman(tmp_path):
    make_table(tmp_path)
    va, vb = clear_values(0), clear_values(1) ** 3
    f = m.audit([make_run(tmp_path, "a", va), make_run(tmp_path, "b", vb)], predict=False)
    s = m.audit_summary(f)
    y = f["is_noisy"].to_numpy()
    assert s["n"] == N and s["n_noisy"] == len(NOISY) and s["n_flagged"] == int(f["is_label_issue"].sum())
    assert s["auroc"] == pytest.approx(roc_auc_score(y, -f["label_score"]))
    assert s["auprc"] == pytest.approx(average_precision_score(y, -f["label_score"]))
    assert set(s["scores"]) == {"value_a", "value_b"}
    expected = pd.Series(va).rank().corr(pd.Series(vb).rank())
    assert s["spearman"]["a ~ b"] == pytest.approx(expected)
    json.dumps(s)  # plain JSON types only


def test_baselines(tmp_path):
    make_table(tmp_path)
    v = clear_values()
    f = m.audit([make_run(tmp_path, "u", v, method="uniform"), make_run(tmp_path, "d", clear_values(2))],
                baselines=True)
    np.testing.assert_array_equal(f["baseline_small_loss"], f["value_u"])
    q = f["cleanlab_label_quality"]
    assert ((q >= 0) & (q <= 1)).all() and f["cleanlab_is_label_issue"].dtype == bool
    # confident learning on out-of-sample probabilities finds most flipped rows of this easy table
    assert f.loc[f["cleanlab_is_label_issue"], "is_noisy"].mean() >= 0.8
    s = m.audit_summary(f)
    assert {"baseline_small_loss", "cleanlab_label_quality"} <= set(s["scores"])
    g = m.audit(make_run(tmp_path, "d2", v), baselines=True, predict=False)
    assert "baseline_small_loss" not in g.columns
    assert any("no uniform run" in note for note in g.attrs["baselines_skipped"])


def test_string_ids(tmp_path):
    df = make_table(tmp_path)
    df["id"] = [f"row-{i}" for i in df["id"]]
    df.to_parquet(tmp_path / "train.parquet", index=False)
    f = m.audit(make_run(tmp_path, "a", clear_values(), ids=df["id"].to_numpy(dtype=object)), predict=False)
    assert set(f.loc[f["is_label_issue"], "id"]) == {f"row-{100 + i}" for i in NOISY}


def test_errors_name_the_problem(tmp_path):
    make_table(tmp_path)
    run = make_run(tmp_path, "gone", clear_values(), table="missing.parquet")
    with pytest.raises(InputError, match="missing.parquet.*--data"):
        m.audit(run)
    other = make_run(tmp_path, "other", clear_values(), ids=np.arange(N))
    with pytest.raises(InputError, match=rf"has no value for training id 100 \({N} ids missing\)"):
        m.audit(other)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "run.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION}))
    with pytest.raises(RunDirError, match="values.parquet"):
        m.audit(tmp_path / "unfinished")
    df = make_table(tmp_path)
    run = make_run(tmp_path, "ok", clear_values())
    for col in ("id", "label"):
        holes = df.astype({col: object})
        holes.loc[[2, 5], col] = None
        where = r"training table \(argument `data`\)"
        with pytest.raises(InputError, match=rf"^{where}: column '{col}' has a null value at row 2$"):
            m.audit(run, holes, predict=False)


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_cli_audit_writes_table_and_summary(tmp_path, capsys, suffix):
    make_table(tmp_path)
    run = make_run(tmp_path, "a", clear_values())
    out = tmp_path / "out" / f"AUDIT{suffix}"
    assert main(["audit", str(run), "-o", str(out), "--cv-folds", "3"]) == 0
    table = pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out)
    assert list(table.columns)[:3] == ["id", "given_label", "predicted_label"] and len(table) == N
    summary = json.loads((tmp_path / "out" / "AUDIT.summary.json").read_text())
    assert summary["n_flagged"] == int(table["is_label_issue"].sum()) == len(NOISY)
    assert summary["auroc"] == pytest.approx(1.0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([out.name, "AUDIT.summary.json"])
    printed = capsys.readouterr().out
    assert "flagged: 6" in printed and str(out) in printed


def test_cli_audit_bad_run_dir(tmp_path, capsys):
    rc = main(["audit", str(tmp_path / "nope"), "-o", str(tmp_path / "a.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("valuekit: error:") and "nope" in err
    assert not (tmp_path / "a.parquet").exists()
    rc = main(["audit", str(tmp_path), "-o", str(tmp_path / "a.txt")])
    assert rc == 2 and ".parquet or .csv" in capsys.readouterr().err
