"""`valuekit bench value` on hand-made run directories: candidates, the choice rule and the held-out verdict."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from valuekit.analysis.mislabel import detection_metrics, roc_auc
from valuekit.bench.value import candidates, choose, held_out_table, score_cell


def _cell(root, dataset, setting, seed, *, noisy, mean_loss, aum, labels, method="dds", last_loss=None, learned=None):
    """ROOT/DATASET/SETTING/SEED with data/train.parquet and runs/METHOD/{values.parquet, run.json}."""
    cell = root / dataset / setting / str(seed)
    (cell / "data").mkdir(parents=True)
    n = len(noisy)
    ids = np.arange(100, 100 + n)
    pd.DataFrame({"id": ids, "label": labels, "is_noisy": noisy}).to_parquet(cell / "data" / "train.parquet")
    run = cell / "runs" / method
    run.mkdir(parents=True)
    order = np.arange(n)[::-1]  # values.parquet in another row order than the table: rows are matched by id
    pd.DataFrame({"example_id": ids[order], "value": np.zeros(n), "mean_loss": np.asarray(mean_loss)[order],
                  "aum": np.asarray(aum)[order],
                  "last_loss": np.asarray(mean_loss if last_loss is None else last_loss)[order] * 2,
                  "scorer_logit": -np.asarray(mean_loss if learned is None else learned)[order] ** 2}
                 ).to_parquet(run / "values.parquet")
    (run / "run.json").write_text(json.dumps({"status": "completed", "method": method, "steps_done": 40}))
    return cell


def test_candidates_match_hand_ranks():
    vals = pd.DataFrame({"mean_loss": [0.1, 0.9, 0.5, 0.3], "aum": [2.0, -1.0, 1.0, 0.5],
                         "last_loss": [0.2, 0.1, 0.4, 0.3], "scorer_logit": [1.0, 2.0, 3.0, 4.0]})
    c = candidates(vals, [0, 0, 1, 1], "scorer_logit")
    np.testing.assert_allclose(c["-mean_loss"], [-0.1, -0.9, -0.5, -0.3])
    # global percentile ranks: -mean_loss 1, 0, 1/3, 2/3; aum 1, 0, 2/3, 1/3 -> mean
    np.testing.assert_allclose(c["global rank(-mean_loss, aum)"], [1.0, 0.0, 0.5, 0.5])
    # within class {0, 1} and {2, 3}: -mean_loss 1, 0 | 0, 1; aum 1, 0 | 1, 0
    np.testing.assert_allclose(c["class rank(-mean_loss, aum)"], [1.0, 0.0, 0.5, 0.5])
    np.testing.assert_allclose(c["class rank(-mean_loss)"], [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(c["learned"], [1.0, 2.0, 3.0, 4.0])
    assert "learned" not in candidates(vals, [0, 0, 1, 1], None)


def test_score_cell_reads_runs_by_id_and_scores_against_is_noisy(tmp_path):
    noisy = np.array([0, 1, 0, 0, 1, 0], dtype=bool)
    loss = np.array([0.1, 0.8, 0.2, 0.9, 0.7, 0.3])
    cell = _cell(tmp_path, "wine", "sym30", 0, noisy=noisy, mean_loss=loss, aum=-loss, labels=[0, 0, 0, 1, 1, 1])
    rows = pd.DataFrame(score_cell("wine", "sym30", 0, cell, methods=("dds", "mwnet"))).set_index("candidate")
    assert set(rows.method) == {"dds"}  # no mwnet run in the cell: nothing for it
    # low loss = valuable; the suspects are the high-loss rows 3 (clean), 1 and 4 (flipped): 8 of 8 pairs right
    # except (row 3 clean vs flipped rows 1, 4) -> AUROC 6/8
    assert rows.auroc["-mean_loss"] == pytest.approx(roc_auc(noisy, loss)) == pytest.approx(0.75)
    assert rows.f1_at_k["-mean_loss"] == pytest.approx(detection_metrics(-loss, noisy)["f1_at_k"]) == 0.5
    assert rows.auroc["learned"] == pytest.approx(0.75)  # -loss^2: same order


def test_choose_takes_the_best_mean_over_sets_and_held_out_verdict():
    def rows(dataset, aucs, seeds=(0, 1)):
        return [{"dataset": dataset, "setting": "sym30", "seed": s, "method": "dds", "candidate": c,
                 "auroc": a + s / 100, "f1_at_k": a - 0.1} for s in seeds for c, a in aucs.items()]

    # set "a" has many rows but counts once: per-set means first
    choice = pd.DataFrame(rows("a", {"-mean_loss": 0.90, "aum": 0.99}, seeds=range(6))
                          + rows("b", {"-mean_loss": 0.90, "aum": 0.70}) + rows("c", {"-mean_loss": 0.90, "aum": 0.80}))
    pick, table = choose(choice)
    assert pick == "-mean_loss"  # mean over sets 0.9x vs (0.99 + 0.70 + 0.80) / 3 = 0.83
    assert table.loc["aum", "worst set - (-mean_loss)"] == pytest.approx(-0.20)
    held = pd.DataFrame(rows("h1", {"-mean_loss": 0.90, "aum": 0.896, "class rank(-mean_loss, aum)": 0.5})
                        + rows("h2", {"-mean_loss": 0.90, "aum": 0.80, "class rank(-mean_loss, aum)": 0.5}))
    lines, verdict = held_out_table(held, "aum")
    assert verdict == {"h1": True, "h2": False}  # -0.004 within the 0.005 tolerance, -0.100 not
    assert "| **h2** | all | all | 2 | **0.805** | **0.905** | 0.505 | **-0.1000 FAIL** |" in lines


def _cli(*argv):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from valuekit.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_bench_value_reports_recorded_cells_without_training(tmp_path):
    rng = np.random.default_rng(0)
    for ds in ("digits", "wine", "iris", "penguins"):
        noisy = rng.random(40) < 0.3
        loss = rng.random(40) + noisy
        _cell(tmp_path / "runs", ds, "sym30", 0, noisy=noisy, mean_loss=loss, aum=rng.random(40),
              labels=rng.integers(0, 3, 40), last_loss=rng.random(40), learned=rng.random(40))
    # --report-only: seed 1 was never trained, and is not trained now
    code, out, err = _cli("bench", "value", "--datasets", "digits,wine,iris,penguins", "--settings", "sym30",
                          "--seeds", "0,1", "--methods", "dds", "--runs-dir", tmp_path / "runs", "--report-only",
                          "-o", tmp_path / "out")
    assert code == 0 and "trained" not in out and not (tmp_path / "runs" / "wine" / "sym30" / "1").exists()
    text = (tmp_path / "out" / "value-choice.md").read_text()
    frame = pd.read_csv(tmp_path / "out" / "value-choice.csv")
    assert len(frame) == 4 * frame.candidate.nunique()
    assert "Command: `valuekit bench value --report-only --device auto" in text
    assert "penguins: 1 settings x 1 seeds x dds (40 steps; " in text
    # loss separates the flips, the other signals are noise: the pick is -mean_loss; held-out penguins passes
    assert "| -mean_loss (pick) |" in text and "penguins PASS" in text
    assert "held-out sets without runs: mnist5k" in text
    pen = frame[(frame.dataset == "penguins") & (frame.candidate == "-mean_loss")].auroc.item()
    row = next(line for line in text.splitlines() if line.startswith("| **penguins** | all | all | 1 |"))
    assert row.startswith(f"| **penguins** | all | all | 1 | **{pen:.3f}** |") and row.endswith("**+0.0000 PASS** |")
    assert "the criterion holds by construction" in text


def test_bench_value_refuses_an_unknown_setting(tmp_path):
    code, out, err = _cli("bench", "value", "--settings", "noise20", "--runs-dir", tmp_path, "-o", tmp_path / "out")
    assert code == 2 and err.strip().endswith("choose from sym30, pair40, inst30, lt10+sym20")
    assert not (tmp_path / "out" / "value-choice.md").exists()
