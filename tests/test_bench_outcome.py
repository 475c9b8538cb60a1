"""`valuekit bench outcome` on one tiny cell: the report's numbers are the runs' numbers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from valuekit.analysis.mislabel import audit, detection_metrics
from valuekit.bench.outcome import bench_outcome, which_when
from valuekit.runs.reader import read_run


def test_outcome_report_matches_the_runs(tmp_path):
    runs = tmp_path / "runs"
    md = bench_outcome(tmp_path / "out", command="valuekit bench outcome --quick", device="cpu", quick=True,
                       settings=("pair40",), steps=20, runs_dir=runs, log=lambda m: None)
    text = md.read_text()
    frame = pd.read_csv(tmp_path / "out" / "outcome.csv")
    assert len(frame) == 1 and "Command: `valuekit bench outcome --quick`" in text
    row = frame.iloc[0]
    cell = runs / "wine" / "pair40" / "0"
    rec = json.loads((cell / "clean" / "clean.json").read_text())
    cands = pd.read_parquet(cell / "clean" / "candidates.parquet").set_index("candidate")
    # every pipeline's number is its early-stopped run's test accuracy; clean's is its pick's
    assert row.clean_pick == rec["pick"] == cands.dev_b_acc.idxmax()
    # clean = the refit's model (trained with the whole dev table), clean (half A) = the pick's own model
    pick_dir = {"clean+retrain": "clean-retrain", "weighted+retrain": "weighted-retrain"}.get(rec["pick"], rec["pick"])
    refit = read_run(cell / "clean" / "runs" / f"{pick_dir}-refit").meta
    assert row["clean (pick)"] == pytest.approx(refit["best_metrics"]["test_acc"])
    assert refit["data"]["dev"]["n_rows"] == 30
    # clean = the handed-over model: the refitted members' mean probabilities (tests/test_clean.py recomputes it)
    assert row.clean == pytest.approx(rec["test_acc"]) and rec["ensemble"]["members"][0] == rec["pick"]
    assert len(rec["ensemble"]["members"]) == 2
    assert row["clean (half A)"] == pytest.approx(cands.test_acc[rec["pick"]])
    for name in ("uniform", "dds", "clean+retrain", "weighted+retrain"):
        assert row[name] == pytest.approx(cands.test_acc[name])
    # uniform early-stopped on the whole dev table: its own run, or the refit when the pick is uniform (the same run)
    whole = refit if rec["pick"] == "uniform" else read_run(cell / "uniform-whole-dev").meta
    assert row["uniform (whole dev)"] == pytest.approx(whole["best_metrics"]["test_acc"])
    cl = read_run(cell / "cleanlab-retrain").meta
    assert row["cleanlab+retrain"] == pytest.approx(cl["best_metrics"]["test_acc"])
    # the cleanlab retrain drops exactly the rows cleanlab flags
    train = pd.read_parquet(cell / "data" / "train.parquet")
    kept = read_run(cell / "cleanlab-retrain").values()
    assert len(kept) == len(train) - row.cleanlab_flagged and 0 < row.cleanlab_flagged < len(train)
    # F1@k of the audit over the uniform run, recomputed
    a = audit([cell / "clean" / "runs" / "uniform"], train, predict=False).set_index("id").reindex(train.id)
    want = detection_metrics(a.label_score.to_numpy(), train.is_noisy.to_numpy())["f1_at_k"]
    assert row.audit_f1_at_k == pytest.approx(want)
    assert 0 <= row.cleanlab_f1_at_k <= 1 and row.noisy == int(train.is_noisy.sum())
    # the tables carry the numbers
    assert f"| wine | pair40 | 0 | {round(row.uniform, 3):.3g} | {round(row['uniform (whole dev)'], 3):.3g} |" in text
    assert "## Acceptance checks" in text and "## Which pipeline when" in text
    ok = row.clean >= row["cleanlab+retrain"]
    assert f"`clean` ≥ cleanlab + retrain on every set: {'PASS' if ok else 'FAIL'} ({int(ok)} of 1 sets" in text
    assert "wine (choice)" in text and "| pair40 | choice | 1 |" in text  # the refit table: one choice-set cell
    # a second run over the same runs folder reuses the recorded cell and writes the same numbers
    said = []
    bench_outcome(tmp_path / "again", command="c", device="cpu", quick=True, settings=("pair40",), steps=20,
                  runs_dir=runs, log=said.append)
    assert said == [f"wine pair40 seed 0: recorded in {cell / 'cell.json'}"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "outcome.csv"), frame)


def test_which_when_names_the_best_mean_and_calls_small_gaps_a_tie():
    frame = pd.DataFrame({"setting": ["a", "a", "b", "b"], "dataset": ["x", "y", "x", "y"],
                          "uniform": [0.80, 0.82, 0.90, 0.90], "dds": [0.90, 0.88, 0.905, 0.899]})
    lines = which_when(frame, ["uniform", "dds"])
    assert (
        "| a | 2 | dds 0.890 | uniform 0.810 | +8.0 pt | 2 of 2 | dds (< 3 seeds or sets: indicative only) |" in lines
    )
    assert lines[3].endswith("too close to tell (< 1 point) |") and "b" in lines[3]
    assert np.isclose(frame.loc[frame.setting == "b", "dds"].mean(), 0.902)
