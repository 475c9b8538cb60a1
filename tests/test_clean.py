"""valuekit clean: candidates early-stopped on half A of the dev table, the pick by half B, the outputs, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from valuekit.cli.main import main

from valuekit.api import evaluate
from valuekit.pipeline import bootstrap_std, split_dev

FAST = ["--steps", "60", "--batch-size", "16", "--lr", "0.03", "--device", "cpu"]


def test_split_dev_is_stratified_seeded_and_disjoint():
    labels = np.array(["a"] * 7 + ["b"] * 5 + ["c"] * 4)
    a = split_dev(labels, seed=3)
    assert (a == split_dev(labels, seed=3)).all() and not (a == split_dev(labels, seed=4)).all()
    counts = {c: int(a[labels == c].sum()) for c in "abc"}
    assert counts == {"a": 3, "b": 3, "c": 2}  # floor(n/2), the odd classes alternating up


def test_bootstrap_std_matches_the_binomial_standard_error():
    correct = np.r_[np.ones(60), np.zeros(40)]
    assert bootstrap_std(correct, resamples=4000) == pytest.approx(np.sqrt(0.6 * 0.4 / 100), rel=0.08)


def test_clean_writes_the_pick_its_model_and_every_candidate(tables, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["clean", str(tables["train"]), "--dev", str(tables["dev"]), "--test", str(tables["test"]),
               "--methods", "dds", "--subset", "--no-refit", "--ensemble", "1", *FAST, "-o", str(out)])
    assert rc == 0
    record = json.loads((out / "clean.json").read_text())
    assert torch.load(out / "ensemble.pt", weights_only=True)["members"] == [record["pick"]]  # the pick alone
    cands = pd.read_parquet(out / "candidates.parquet")
    assert list(cands.candidate) == ["uniform", "dds", "clean+retrain", "weighted+retrain", "subset+retrain"]
    assert record["refit"] is None
    assert record["test_acc"] == record["test_acc_half_a"] == cands.test_acc[cands.picked].item()
    # the pick is the first argmax of half-B accuracy, and it is marked once
    assert record["pick"] == cands.candidate.iloc[int(np.argmax(cands.dev_b_acc.to_numpy()))]
    assert cands.picked.sum() == 1 and cands.candidate[cands.picked].item() == record["pick"]
    assert record["dev_rows"] == {"half_a": 12, "half_b": 12}
    train = pd.read_parquet(tables["train"])
    for c in cands.itertuples():
        meta = json.loads((out / "runs" / c.run_dir.split("/runs/")[1] / "run.json").read_text())
        assert c.dev_a_acc == meta["best_metrics"]["dev_acc"] and c.test_acc == meta["best_metrics"]["test_acc"]
    # model.pt is the pick's best state dict and reproduces its recorded half-B and test accuracy
    pick = cands[cands.picked].iloc[0]
    state = torch.load(out / "model.pt", weights_only=True)
    cleaned = pd.read_parquet(out / "table.parquet")
    assert evaluate(tables["test"], pick.run_dir, train=cleaned if pick.candidate.endswith("retrain") else train,
                    state=state)["acc"] == pytest.approx(pick.test_acc, abs=1e-12)
    dev = pd.read_parquet(tables["dev"])
    from valuekit.pipeline import split_dev as _split

    half_b = dev[~_split(dev.label.to_numpy(), seed=0)]
    got = evaluate(half_b, pick.run_dir, train=train, state=state)
    assert got["acc"] == pytest.approx(pick.dev_b_acc, abs=1e-12)
    assert pick.dev_b_std == pytest.approx(bootstrap_std(got["correct"]), abs=1e-12)
    # the table keeps every input column; clean+retrain drops exactly the rows the uniform run's audit flags
    assert set(train.columns) <= set(cleaned.columns)
    retrain = cands.set_index("candidate").loc["clean+retrain"]
    assert retrain.rows == len(train) - record["flagged_rows"] and 0 < record["flagged_rows"] < len(train)
    subset = cands.set_index("candidate").loc["subset+retrain"]
    assert subset.rows == len(train) // 2
    assert len(cleaned) == cands[cands.picked].rows.item()
    text = capsys.readouterr().out
    assert f"pick: {record['pick']}" in text and "clean+retrain" in text


def test_cross_fit_judges_each_half_by_the_candidate_fitted_on_the_other(tables, tmp_path, capsys):
    out = tmp_path / "x"
    rc = main(["clean", str(tables["train"]), "--dev", str(tables["dev"]), "--test", str(tables["test"]),
               "--methods", "dds", "--cross-fit", "--no-refit", *FAST, "-o", str(out)])
    assert rc == 0
    record = json.loads((out / "clean.json").read_text())
    cands = pd.read_parquet(out / "candidates.parquet")
    assert record["cross_fit"] is True
    assert list(cands.candidate) == ["uniform", "dds", "clean+retrain", "weighted+retrain"]
    dev, train = pd.read_parquet(tables["dev"]), pd.read_parquet(tables["train"])
    half_a = split_dev(dev.label.to_numpy(), seed=0)
    for c in cands.itertuples():
        swapped = out / "runs" / "swapped" / c.run_dir.split("/runs/")[1]
        meta = json.loads((swapped / "run.json").read_text())
        assert meta["data"]["dev"]["n_rows"] == int((~half_a).sum()) == 12  # fitted on half B
        # the swapped candidate's own table (a retrain's rows come from its own audit / weights)
        table = train if c.candidate in ("uniform", "dds", "weighted+retrain") else None
        if table is not None:
            got = evaluate(dev[half_a], swapped, train=table)
            assert c.dev_a_judged_acc == pytest.approx(got["acc"], abs=1e-12)
        assert c.judged_acc == pytest.approx((12 * c.dev_b_acc + 12 * c.dev_a_judged_acc) / 24, abs=1e-12)
    # the pick is the first argmax of the accuracy over both halves, not of half B alone
    assert record["pick"] == cands.candidate.iloc[int(np.argmax(cands.judged_acc.to_numpy()))]
    assert "cross-fitted dev accuracy" in record["why"] and "24 judged rows" in record["why"]
    text = capsys.readouterr().out
    assert "both halves" in text and f"pick: {record['pick']}" in text


def test_a_weighting_pick_writes_the_weighted_table(tables, tmp_path, monkeypatch):
    import valuekit
    import valuekit.api

    real = valuekit.api.evaluate

    def dds_wins(table, run, **kw):  # make dds the half-B winner, so the weighted branch is the one taken
        got = real(table, run, **kw)
        dds = str(getattr(run, "path", run)).endswith("dds")
        return {**got, "acc": 1.0, "correct": np.ones_like(got["correct"])} if dds else got

    monkeypatch.setattr(valuekit.api, "evaluate", dds_wins)
    rec = valuekit.clean(tables["train"], tables["dev"], out=tmp_path / "w", methods=["dds"], steps=30,
                         batch_size=16, lr=3e-2, device="cpu", hidden=16)
    cands = pd.read_parquet(tmp_path / "w" / "candidates.parquet")
    assert rec["pick"] == "dds" and cands.test_acc.isna().all()  # no test table: no test accuracy
    table = pd.read_parquet(tmp_path / "w" / "table.parquet")
    train = pd.read_parquet(tables["train"])
    assert set(train.columns) | {"weight", "value", "rank"} <= set(table.columns) and len(table) == len(train)
    assert table.weight.mean() == pytest.approx(1.0)
    # refitted on the whole dev table: the table carries the refit run's weights, model.pt is its best model
    assert rec["refit"]["run_dir"].endswith("dds-refit")
    values = pd.read_parquet(tmp_path / "w" / "runs" / "dds-refit" / "values.parquet").set_index("example_id")
    assert table.value.to_numpy() == pytest.approx(values.value.reindex(table.id).to_numpy())
    refit_meta = json.loads((tmp_path / "w" / "runs" / "dds-refit" / "run.json").read_text())
    state = torch.load(tmp_path / "w" / "model.pt", weights_only=True)
    best = torch.load(tmp_path / "w" / "runs" / "dds-refit" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(state[k], best[k]) for k in best)
    assert rec["refit"]["dev_acc"] == refit_meta["best_metrics"]["dev_acc"]
    assert refit_meta["data"]["dev"]["n_rows"] == len(pd.read_parquet(tables["dev"])) == 24  # every dev row, not half A


def test_weighted_retrain_trains_uniform_on_the_best_methods_weights_and_the_refit_reports_both_models(
        tables, tmp_path):
    import valuekit
    from valuekit.export.scoring import score

    out = tmp_path / "c"
    rec = valuekit.clean(tables["train"], tables["dev"], test=tables["test"], out=out, methods=["dds"], steps=30,
                         batch_size=16, lr=3e-2, device="cpu", hidden=16)
    cands = pd.read_parquet(out / "candidates.parquet").set_index("candidate")
    assert list(cands.index) == ["uniform", "dds", "clean+retrain", "weighted+retrain"]
    w_run = out / "runs" / "weighted-retrain"
    meta = json.loads((w_run / "run.json").read_text())
    assert meta["config"]["method"] == "uniform"
    # every logged row's loss weight is dds's exported weight for that row (mean 1 over the table)
    weights = score(pd.read_parquet(tables["train"]), out / "runs" / "dds").set_index("id").weight
    from valuekit.runs.reader import read_run

    steps = read_run(w_run).steps(["example_id", "weight"]).to_pandas()
    assert steps.weight.to_numpy() == pytest.approx(weights.reindex(steps.example_id).to_numpy(), rel=1e-6)
    assert weights.mean() == pytest.approx(1.0) and weights.std() > 0
    # the handed-over model is the refit's; both test accuracies are recorded
    pick_dir = {"clean+retrain": "clean-retrain", "weighted+retrain": "weighted-retrain"}.get(rec["pick"], rec["pick"])
    refit = json.loads((out / "runs" / f"{pick_dir}-refit" / "run.json").read_text())
    assert rec["test_acc_pick"] == refit["best_metrics"]["test_acc"] == rec["refit"]["test_acc"]
    assert rec["test_acc_half_a"] == cands.test_acc[rec["pick"]]
    assert refit["data"]["dev"]["n_rows"] == 24 and refit["config"]["early_stopping"]


def test_the_handed_over_model_averages_the_two_best_candidates_refitted(tables, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["clean", str(tables["train"]), "--dev", str(tables["dev"]), "--test", str(tables["test"]),
                 "--methods", "dds", *FAST, "-o", str(out)]) == 0
    record = json.loads((out / "clean.json").read_text())
    cands = pd.read_parquet(out / "candidates.parquet")
    # the two best by half-B accuracy, ties to the earlier (simpler) candidate; the first is the pick
    order = sorted(range(len(cands)), key=lambda i: (-cands.dev_b_acc[i], i))
    members = [cands.candidate[i] for i in order[:2]]
    assert record["ensemble"]["members"] == members and record["pick"] == members[0]
    assert set(cands.candidate[cands.member]) == set(members) and cands.picked.sum() == 1
    # each member is refitted on every dev row; ensemble.pt holds the refits' best-dev models in the members' order
    bundle = torch.load(out / "ensemble.pt", weights_only=True)
    assert bundle["members"] == members
    train, test = pd.read_parquet(tables["train"]), pd.read_parquet(tables["test"])
    dirs = {"clean+retrain": "clean-retrain", "weighted+retrain": "weighted-retrain"}
    got = []
    for m, run, state in zip(members, record["ensemble"]["runs"], bundle["models"]):
        assert run == f"runs/{dirs.get(m, m)}-refit"
        best = torch.load(out / run / "best.pt", weights_only=True)["model"]
        assert all(torch.equal(state[k], best[k]) for k in best)
        assert json.loads((out / run / "run.json").read_text())["data"]["dev"]["n_rows"] == 24
        got.append(evaluate(test, out / run, train=train))
    # model.pt is the pick alone; the recorded test accuracy is the mean-probability ensemble's, recomputed here
    pick_state = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(pick_state[k], bundle["models"][0][k]) for k in pick_state)
    assert record["test_acc_pick"] == pytest.approx(got[0]["acc"], abs=1e-12)
    mean = (got[0]["probs"] + got[1]["probs"]) / 2
    assert record["test_acc"] == pytest.approx(float((mean.argmax(1) == got[0]["labels"]).mean()), abs=1e-12)
    assert "handed over: the mean of" in capsys.readouterr().out
    # valuekit predict: the same probabilities on the test rows without their labels
    rows = tmp_path / "rows.csv"
    test.drop(columns=["label"]).to_csv(rows, index=False)
    assert main(["predict", str(rows), "--clean", str(out), "--train", str(tables["train"]),
                 "-o", str(tmp_path / "p.parquet")]) == 0
    pred = pd.read_parquet(tmp_path / "p.parquet")
    classes = sorted(train.label.unique())
    assert list(pred.columns) == ["id", "prediction"] + [f"prob_{c}" for c in classes]
    assert list(pred.id) == list(test.id)
    assert pred[[f"prob_{c}" for c in classes]].to_numpy() == pytest.approx(mean, abs=1e-6)
    assert list(pred.prediction) == list(np.array(classes)[mean.argmax(1)])
    assert (pred.prediction == test.label).mean() == pytest.approx(record["test_acc"], abs=1e-12)
    # the folder finds its runs wherever it is moved (clean.json names them relative to it)
    import shutil

    import valuekit

    shutil.copytree(out, tmp_path / "moved")
    shutil.rmtree(out / "runs")
    again = valuekit.predict(rows, tmp_path / "moved", train=tables["train"])
    assert again.drop(columns="id").equals(pred.drop(columns="id"))
    capsys.readouterr()
    assert main(["predict", str(rows), "--clean", str(out), "--train", str(tables["train"]),
                 "-o", str(tmp_path / "p.parquet")]) == 2  # an existing output is kept without --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    # a table without one of the training table's feature columns is refused, naming the file and the column
    test.drop(columns=["f0"]).to_parquet(tmp_path / "bad.parquet")
    assert main(["predict", str(tmp_path / "bad.parquet"), "--clean", str(tmp_path / "moved"), "--train",
                 str(tables["train"]),
                 "-o", str(tmp_path / "q.csv")]) == 2
    err = capsys.readouterr().err
    assert "bad.parquet: no feature column 'f0'" in err and len(err.strip().splitlines()) == 1
    # so is a training table that is not the one the models were trained on
    train.assign(f9=1.0).to_parquet(tmp_path / "other.parquet")
    assert main(["predict", str(tables["test"]), "--clean", str(tmp_path / "moved"), "--train",
                 str(tmp_path / "other.parquet"), "-o", str(tmp_path / "q.csv")]) == 2
    err = capsys.readouterr().err
    assert "other.parquet: not the training table of --clean" in err and "'f9'" in err
    assert not (tmp_path / "q.csv").exists()


def test_report_of_a_clean_folder_lists_the_candidates_and_shows_the_handed_over_runs(tables, tmp_path):
    import re

    out = tmp_path / "c"
    assert main(["clean", str(tables["train"]), "--dev", str(tables["dev"]), "--test", str(tables["test"]),
                 "--methods", "dds", *FAST, "-o", str(out)]) == 0
    record = json.loads((out / "clean.json").read_text())
    assert main(["report", str(out), "-o", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    text = " ".join(re.sub(r"<[^>]+>", " ", html).split())
    section = text.split("valuekit clean: the candidates and the model handed over")[2].split("2. Run summary")[0]
    # one row per candidate: name, rows, half-A accuracy, judged accuracy ± spread, test accuracy, role
    from valuekit.reporting import _fmt

    for c in record["candidates"]:
        role = "pick" if c["picked"] else "averaged with the pick" if c["member"] else ""
        want = (f"{c['candidate']} {c['rows']} {_fmt(c['dev_a_acc'])} {_fmt(c['judged_acc'])} ± "
                f"{_fmt(c['judged_std'])} {_fmt(c['test_acc'])} {role}".strip())
        assert want in section, want
    assert f"Pick: {record['pick']}" in section and f"test accuracy {_fmt(record['test_acc'])}" in section
    # the rest of the report is about the runs of the handed-over model
    members = [r.split("/")[-1] for r in record["ensemble"]["runs"]]
    assert f"runs: {', '.join(members)}" in text


def test_predict_refuses_a_folder_that_clean_did_not_write(tables, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tables["test"]), "--clean", str(tmp_path / "empty"), "--train", str(tables["train"]),
                 "-o", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert f"--clean {tmp_path / 'empty'}: no clean.json" in err and len(err.strip().splitlines()) == 1
    # a clean.json that is not a clean record: one line from predict and from report, naming the file
    (tmp_path / "empty" / "clean.json").write_text("{}")
    (tmp_path / "empty" / "ensemble.pt").write_bytes(b"")
    assert main(["predict", str(tables["test"]), "--clean", str(tmp_path / "empty"), "--train", str(tables["train"]),
                 "-o", str(tmp_path / "p.csv")]) == 2
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(f"{tmp_path / 'empty' / 'clean.json'}: not a record of valuekit clean" in e
                                 for e in err)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "--dev: a trusted dev table is required"),
    (["--dev", "DEV", "--ensemble", "0"], "--ensemble 0: must be a whole number >= 1"),
    (["--dev", "DEV", "--methods", "nope"], "unknown method 'nope'"),
    (["--dev", "DEV", "--methods", "uniform"], "'uniform' is always a candidate"),
    (["--dev", "missing.parquet"], "dev table not found"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tables, tmp_path, capsys, argv, message):
    argv = [str(tables["dev"]) if a == "DEV" else str(tmp_path / a) if a.endswith(".parquet") else a for a in argv]
    out = tmp_path / "out"
    assert main(["clean", str(tables["train"]), *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
