"""Issue 22: README promises that had no test, checked by contents (figures, columns, dtypes, text)."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pandas as pd
import pytest
from conftest import blobs
from test_report import parse
from valuekit.cli.main import main

import valuekit
from valuekit.runs.reader import read_run

LOOP = ["--device", "cpu", "--batch-size", "16", "--set", "eval_every=10"]


def cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A noisy table with renamed columns (key, y, origin, a..d), a dev table, and a uniform and a dds run."""
    root = tmp_path_factory.mktemp("promises")
    ren = {"id": "key", "label": "y", "source": "origin"}
    train = blobs(120, seed=1, noise=0.25).rename(columns=ren)
    train["origin"] = np.where(np.arange(120) % 2 == 0, "web", "books")
    train["junk"] = 7.0  # a numeric column that is not a feature: left out by --feature-cols
    dev = blobs(30, seed=2, id_start=1000).rename(columns=ren)
    dev["origin"], dev["junk"] = "web", 7.0
    paths = {"root": root, "train": root / "train.parquet", "dev": root / "dev.parquet"}
    train.to_parquet(paths["train"], index=False)
    dev.to_parquet(paths["dev"], index=False)
    cols = ["--id-col", "key", "--label-col", "y", "--source-col", "origin", "--feature-cols", "f0,f1,f2,f3"]
    for method, steps in (("uniform", 30), ("dds", 30)):
        paths[method] = root / method
        code, _, err = cli(["train", paths["train"], "--dev", paths["dev"], "--out", paths[method], "--method", method,
                            "--steps", steps, *LOOP, *cols])
        assert code == 0, err
    paths["cols"] = cols
    return paths


def test_column_options_end_to_end(world):
    run = read_run(world["dds"])
    assert run.meta["feature_cols"] == ["f0", "f1", "f2", "f3"] and sorted(run.meta["sources"]) == ["books", "web"]
    steps = run.steps().to_pandas()
    assert set(steps.source) == {"books", "web"} and steps.example_id.isin(range(120)).all()
    out = world["root"] / "scored.parquet"
    code, _, err = cli(["score", world["train"], "--run", world["dds"], "-o", out, "--id-col", "key"])
    assert code == 0, err
    scored = pd.read_parquet(out)
    assert list(scored.columns[:3]) == ["key", "y", "f0"] and scored["rank"].dtype == np.int64
    by_py = valuekit.score(pd.read_parquet(world["train"]), world["dds"], id_col="key")
    np.testing.assert_allclose(by_py["weight"].to_numpy(), scored["weight"].to_numpy())
    code, _, err = cli(["score", world["train"], "--run", world["dds"], "-o", world["root"] / "no-key.parquet"])
    assert code == 2 and "missing column 'id'" in err and "--id-col" in err
    a = world["root"] / "audit.csv"
    code, _, err = cli(["audit", world["dds"], "-o", a, "--id-col", "key", "--label-col", "y", "--no-predict"])
    assert code == 0, err
    assert len(pd.read_csv(a)) == 120


def test_report_on_a_run_with_weights_and_rewards_title_baselines_data(world):
    from valuekit.analysis import curves

    out = world["root"] / "r.html"
    data = world["root"] / "standard.parquet"  # report reads --data with the default column names
    pd.read_parquet(world["train"]).rename(columns={"key": "id", "y": "label"}).to_parquet(data, index=False)
    code, _, err = cli(["report", world["uniform"], world["dds"], "-o", out, "--title", "Noisy blobs <check>",
                        "--baselines", "--data", data])
    assert code == 0, err
    html = out.read_text()
    page = parse(out)
    figs = {i.get("id") for i in page.imgs}
    assert {"fig-rewards", "fig-loss-quantiles", "fig-weight-hist", "fig-discovery"} <= figs
    assert "<title>Noisy blobs &lt;check&gt;</title>" in html  # the title, escaped
    # the rewards figure's series: DDS's logged rewards, binned by step (what the figure draws)
    q = curves.step_quantiles_many(world["dds"], ["reward"])["reward"]
    steps = read_run(world["dds"]).steps().to_pandas()
    logged = steps.dropna(subset=["reward"]).groupby("step").reward.mean()  # one bin per step at 30 steps
    assert len(logged) > 0 and q.step.tolist() == logged.index.tolist()
    np.testing.assert_allclose(q["mean"].to_numpy(), logged.to_numpy(), rtol=1e-5)
    assert curves.step_quantiles_many(world["uniform"], ["reward"])["reward"] is None  # uniform logs none
    # --baselines and --data reach the audit section: cleanlab / small-loss columns and the thumbnails-free table
    assert "baseline_small_loss" in html or "small loss" in html.lower()
    numbers = [int(n) for n in re.findall(r"<h2>(\d+)\. ", html)]
    assert numbers == list(range(1, len(numbers) + 1))  # no gaps where a section is absent (no sources here)


def test_score_options_on_the_cli(world):
    root, run = world["root"], world["uniform"]
    values = read_run(run).values().set_index("example_id")
    n = len(values)
    # --drop-fraction F drops the lowest round(F*N)
    out = root / "drop.parquet"
    assert cli(["score", world["train"], "--run", run, "-o", out, "--drop-fraction", "0.25", "--id-col", "key",
                "--batch-rows", "7"])[0] == 0
    t = pd.read_parquet(out)
    assert t.selected.sum() == n - round(0.25 * n)
    assert t.loc[~t.selected, "value"].max() <= t.loc[t.selected, "value"].min()
    # --min-weight W keeps weight >= W; --batch-rows changes nothing in the result
    out2 = root / "minw.parquet"
    w = float(np.median(t.weight))
    assert cli(["score", world["train"], "--run", run, "-o", out2, "--min-weight", str(w), "--id-col", "key",
                "--batch-rows", "1000"])[0] == 0
    t2 = pd.read_parquet(out2)
    assert (t2.selected == (t2.weight >= w)).all()
    pd.testing.assert_frame_equal(t.drop(columns="selected"), t2.drop(columns="selected"))
    # --method with --run-dir: the run goes there, and the score comes from it
    out3 = root / "trained.parquet"
    code, stdout, err = cli(["score", world["train"], "--method", "uniform", "--dev", world["dev"], "--run-dir",
                             root / "rd", "-o", out3, "--steps", "5", *LOOP, *world["cols"]])
    assert code == 0, err
    assert read_run(root / "rd").meta["steps_done"] == 5 and not (root / "trained.parquet.run").exists()
    assert str(root / "rd") in stdout


def test_audit_options_on_the_cli(world):
    root = world["root"]
    out = root / "a.parquet"
    code, stdout, err = cli(["audit", world["uniform"], world["dds"], "-o", out, "--id-col", "key", "--label-col", "y",
                             "--flag-fraction", "0.1", "--baselines", "--no-predict"])
    assert code == 0, err
    a = pd.read_parquet(out)
    assert a.is_label_issue.sum() == round(0.1 * len(a))
    assert a.loc[a.is_label_issue, "label_score"].max() <= a.loc[~a.is_label_issue, "label_score"].min()
    assert "baseline_small_loss" in a.columns  # the uniform run's small-loss value
    s = json.loads((root / "a.summary.json").read_text())
    assert s["n_flagged"] == round(0.1 * len(a)) and "auroc" in s


def test_top_level_api(world):
    run = valuekit.read_run(world["dds"])
    assert run.method == "dds" and run.values().shape[0] == 120
    frame = valuekit.audit([world["uniform"], world["dds"]], data=world["train"], id_col="key", label_col="y",
                           predict=False)
    assert len(frame) == 120 and frame.label_score.between(0, 1).all()
    s = valuekit.audit_summary(frame)
    noisy = pd.read_parquet(world["train"]).set_index("key").is_noisy
    assert s["n"] == 120 and s["n_noisy"] == int(noisy.sum())
    assert 0.0 <= s["auroc"] <= 1.0


def test_rank_ties_and_round_half_selections(tmp_path):
    """Ties keep row order; round(F*N) rounds halves up (README), keep-fraction keeps at least one row."""
    from valuekit.runs.writer import RunWriter

    ids = np.arange(10)
    value = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 2.0, np.nan, 1.0, 2.0])
    w = RunWriter(tmp_path / "run", meta={"method": "uniform", "id_type": "int64"}, id_type="int64")
    from valuekit.ranking import rank_by_value

    w.write_values(pd.DataFrame({"example_id": ids, "value": value, "value_std": np.nan, "weight": np.ones(10),
                                 "rank": rank_by_value(value)}))
    w.close("completed")
    table = pd.DataFrame({"id": ids, "x": np.arange(10.0)})
    got = valuekit.score(table, tmp_path / "run")
    assert got["rank"].tolist() == [7, 1, 2, 4, 3, 9, 5, 10, 8, 6]
    for frac, half_up in ((0.25, 3), (0.35, 4), (0.45, 5), (0.15, 2), (0.05, 1), (0.24, 2)):  # F*N = 2.5 -> 3 ...
        got = valuekit.score(table, tmp_path / "run", keep_fraction=frac)
        assert got["selected"].sum() == half_up, frac
        assert set(got.loc[got.selected, "rank"]) == set(range(1, half_up + 1))  # the top ranks, ties by row order
        dropped = valuekit.score(table, tmp_path / "run", drop_fraction=frac)["selected"]
        assert (~dropped).sum() == half_up, frac


def test_cli_device_and_nproc_checks_before_launch(world, tmp_path):
    code, _, err = cli(["train", world["train"], "--dev", world["dev"], "--out", tmp_path / "r", "--nproc", "0",
                        *world["cols"]])
    assert code == 2 and "--nproc 0: must be >= 1" in err and not (tmp_path / "r").exists()
    # bad tables are refused before any process is started
    code, _, err = cli(["train", world["dev"], "--dev", world["dev"], "--out", tmp_path / "r", "--nproc", "2"])
    assert code == 2 and "missing column 'id'" in err and not (tmp_path / "r").exists()


def test_data_prepare_breast_cancer(tmp_path):
    code, out, err = cli(["data", "prepare", "breast-cancer", "--noise", "0.1", "--max-train", "200", "-o", tmp_path])
    assert code == 0, err
    tr = pd.read_parquet(tmp_path / "train.parquet")
    dev = pd.read_parquet(tmp_path / "dev.parquet")
    assert len(tr) == 200 and tr.is_noisy.sum() == round(0.1 * 200) and len(dev) == 20
    assert sorted(dev.label.unique()) == ["benign", "malignant"] or dev.label.nunique() == 2
    assert str(tmp_path / "train.parquet") in out
