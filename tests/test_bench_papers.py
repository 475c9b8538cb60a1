"""`valuekit bench papers`: the quick mode writes every part's table with its arms and numbers; the pieces it is
built from (imbalanced two-class tables, the inverse-frequency arm, early stopping, k-center) are exact."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pandas as pd
import pytest
from valuekit.cli.main import main

from valuekit.bench import papers


def cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow  # 30 runs with HOST-CP's representativeness program: ~20 s on an idle machine, minutes on a busy one
def test_quick_mode_writes_every_part_with_its_arms_and_numbers(tmp_path):
    out = tmp_path / "reports"
    code, printed, err = cli(["bench", "papers", "--quick", "--device", "cpu", "-o", out])
    assert code == 0, err
    assert f"papers: {out / 'papers.md'}" in printed
    md = (out / "papers.md").read_text()
    assert f"Command: `valuekit bench papers --quick --device cpu -o {out}`" in md
    for title in ("## Class imbalance", "## Structured noise: 40 % pair flips",
                  "## HOST-CP: the value of a small subset", "## DDS: rows only the dev set can tell apart"):
        assert title in md
    frame = pd.read_csv(out / "papers.csv")
    arms = {part: set(g.arm) for part, g in frame.groupby("part")}
    assert arms["imbalance"] == set(papers.IMBALANCE_ARMS)
    assert arms["pairflip"] == set(papers.PAIRFLIP_ARMS)
    assert arms["shift"] == set(papers.SHIFT_ARMS)
    assert arms["hostcp"] == {"hostcp", "hostcp (value)", "hostcp representatives", "hostcp representatives (value)",
                              "random", "stratified random", "k-center (raw inputs)"}
    assert arms["hostcp-run"] == {"hostcp", "hostcp representatives"}
    assert frame[["test_acc_es", "test_acc_final"]].stack().between(0, 1).all()
    sub = frame[frame.part == "hostcp"]
    assert set(sub.setting) == {"fraction 0.1", "fraction 0.3"} and sub.class_coverage.between(0.1, 1).all()
    # every table row carries the arm's numbers, formatted as in the CSV (percent, one decimal)
    for _, row in frame[frame.part.isin(["imbalance", "pairflip", "shift"])].iterrows():
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {row.dataset} | {row.setting} | {row.arm} |"))
        assert f"| {100 * row.test_acc_es:.1f} | {100 * row.test_acc_final:.1f} |" in line
    assert re.search(r"\| dds \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [+-][\d.]+ vs uniform \| (yes|no) \|", md)
    assert "classweight" not in __import__("valuekit.training.method", fromlist=["REGISTRY"]).REGISTRY


def test_quick_parts_run_only_the_requested_parts_and_methods(tmp_path):
    out = tmp_path / "reports"
    code, printed, err = cli(["bench", "papers", "--quick", "--device", "cpu", "-o", out,
                              "--settings", "imbalance,shift", "--methods", "dds", "--steps", "10"])
    assert code == 0, err
    md = (out / "papers-imbalance-shift.md").read_text()
    assert not (out / "papers.md").exists()
    assert "## Class imbalance" in md and "## DDS: rows only" in md
    assert "## HOST-CP" not in md and "pair flips" not in md
    frame = pd.read_csv(out / "papers-imbalance-shift.csv")
    assert sorted(map(tuple, frame[["part", "arm"]].to_numpy())) == sorted(
        [("imbalance", "uniform"), ("imbalance", "classweight"), ("imbalance", "dds"), ("shift", "uniform"),
         ("shift", "dds")])
    assert (frame.setting[frame.part == "imbalance"] == "majority 0.95").all() and (frame.seed == 0).all()
    assert frame[["test_acc_es", "test_acc_final"]].stack().between(0, 1).all()
    for _, row in frame.iterrows():  # each arm's row in the table holds its numbers (percent, one decimal)
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {row.dataset} | {row.setting} | {row.arm} |"))
        assert f"| {100 * row.test_acc_es:.1f} | {100 * row.test_acc_final:.1f} |" in line
    assert re.search(r"\| dds \| [\d.]+ \| [\d.]+ \| [+-][\d.]+ vs (uniform|classweight) \| (yes|no) \|", md)
    assert "10 steps per run" in md
    lines = md.splitlines()
    for i, line in enumerate(lines):  # every table: the separator and each row have the header's columns
        if line.startswith("| dataset |"):
            block = [ln for ln in lines[i:] if ln.startswith("|")][: 1 + 1 + 3]
            assert {ln.count("|") for ln in block} == {line.count("|")}


def test_papers_rejects_an_unknown_part(tmp_path):
    code, _, err = cli(["bench", "papers", "--quick", "--settings", "imbalance,cifar", "-o", tmp_path / "r"])
    assert code == 2 and "--settings 'cifar'" in err and "imbalance, pairflip, instance, features, hostcp, shift" in err
    assert not (tmp_path / "r" / "papers.md").exists()


@pytest.mark.parametrize("share", [0.9, 0.99])
def test_imbalance_data_has_the_share_and_balanced_dev_and_test(share):
    tr, dv, te = papers.imbalance_data("digits", share, 0)
    assert tr.classes == ["4", "9"]
    counts = np.bincount(tr.y.numpy(), minlength=2)
    assert counts[0] == max(1, round(counts[1] * (1 - share) / share))
    assert abs(counts[1] / counts.sum() - share) < 0.01
    assert np.bincount(dv.y.numpy()).tolist() == [10, 10]
    t = np.bincount(te.y.numpy())
    assert t[0] == t[1] and len(set(tr.ids) | set(dv.ids) | set(te.ids)) == len(tr) + len(dv) + len(te)


def test_classweight_weights_each_row_by_inverse_class_frequency(tmp_path):
    import valuekit

    tr, dv, te = papers.imbalance_data("digits", 0.9, 1)
    with papers.bench_methods():
        run = valuekit.train(tr, dv, te, out=tmp_path / "run", method="classweight", steps=3, batch_size=32,
                             device="cpu", progress=False)
    steps = run.steps(["label", "weight"]).to_pandas()
    counts = np.bincount(tr.y.numpy())
    expect = {i: len(tr) / (2 * counts[i]) for i in range(2)}
    np.testing.assert_allclose(steps.weight, steps.label.map(expect), rtol=1e-6)
    assert len(steps) == 3 * 32


def test_early_stopped_reads_test_accuracy_at_the_first_best_dev_accuracy():
    class Run:
        def metrics(self):
            return pd.DataFrame({"step": [10, 20, 30, 40, 50], "dev_acc": [0.5, 0.8, np.nan, 0.8, 0.7],
                                 "test_acc": [0.4, 0.75, 0.9, 0.7, 0.6]})

    assert papers.early_stopped(Run()) == (0.75, 0.8, 20)


def test_k_center_is_farthest_first():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 4.0], [9.0, 1.0]])
    # the first centre is drawn; each next one is the row farthest (standardised inputs) from those chosen
    order = papers.k_center(x, 3, seed=0)
    first = order[0]
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    d = ((z - z[first]) ** 2).sum(1)
    assert order[1] == int(np.argmax(d))
    d = np.minimum(d, ((z - z[order[1]]) ** 2).sum(1))
    assert order[2] == int(np.argmax(d)) and len(set(order)) == 3


def test_feature_noise_data_corrupts_the_inputs_of_the_masked_rows_only(tmp_path):
    from valuekit.data.bundled import prepare

    tr, dv, te, noisy = papers.feature_noise_data("digits", 0, tmp_path / "noisy")
    clean = pd.read_parquet(prepare("digits", tmp_path / "clean", seed=0)["train"])
    x0 = np.stack(clean["pixels"].to_numpy()).astype(np.float32)
    x = tr.x.reshape(len(tr), -1).numpy()
    assert abs(noisy.mean() - 0.5) < 0.05 and len(tr) == len(x0)
    np.testing.assert_array_equal(x[~noisy], x0[~noisy])  # clean rows untouched, labels kept
    assert tr.y.tolist() == [tr.classes.index(c) for c in clean["label"]]
    added = (x[noisy] - x0[noisy]).ravel()
    assert abs(added.std() / (papers.FEATURE_NOISE * x0.std()) - 1) < 0.02 and abs(added.mean()) < 0.05 * added.std()


def test_quick_instance_and_features_parts_write_their_tables(tmp_path):
    out = tmp_path / "reports"
    code, _, err = cli(["bench", "papers", "--quick", "--device", "cpu", "-o", out, "--settings", "instance,features",
                        "--methods", "bads", "--steps", "10"])
    assert code == 0, err
    md = (out / "papers-instance-features.md").read_text()
    assert "## Structured noise: 40 % instance-dependent flips" in md and "## BADS's noisy features" in md
    frame = pd.read_csv(out / "papers-instance-features.csv")
    assert sorted(map(tuple, frame[["part", "arm"]].to_numpy())) == [
        ("features", "bads"), ("features", "uniform"), ("instance", "bads"), ("instance", "uniform")]
    feats = frame[frame.part == "features"].set_index("arm")
    assert feats.loc["uniform", "w_noisy/w_clean"] == 1.0 and feats.loc["bads", "w_noisy/w_clean"] > 0
    line = next(ln for ln in md.splitlines() if ln.startswith("| digits | half the rows with noisy inputs | bads |"))
    assert f"| {feats.loc['bads', 'w_noisy/w_clean']:.2f} |" in line
