"""Killed runs, concurrent writers, foreign schema versions and random malformed tables."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
from conftest import blobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from valuekit.cli.main import main

from valuekit.runs.reader import read_run


def _train_cmd(tables, out, steps):
    return [sys.executable, "-m", "valuekit.cli", "train", str(tables["train"]), "--dev", str(tables["dev"]),
            "--out", str(out), "--steps", str(steps), "--batch-size", "8", "--device", "cpu",
            "--set", "checkpoint_every=50", "--set", "log_every=10", "--set", "eval_every=500"]


def _wait_for(path, proc, timeout=60):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.005)


def test_sigkill_then_partial_run_reads_and_resume_matches(tables, tmp_path):
    steps = 300
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tables, killed, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(killed / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    run = read_run(killed)
    assert run.meta["status"] == "interrupted"  # the writer died: the lock's process is gone
    steps_table = run.steps()  # every visible part is closed and readable
    assert steps_table.num_rows % 8 == 0 and steps_table.num_rows >= 50 * 8
    assert run.values(partial=False) is None
    partial = run.values()  # stand-in from the step log: minus the mean logged loss of each example seen
    assert partial.attrs["partial"] and len(partial) == steps_table.to_pandas().example_id.nunique()
    expected = -steps_table.to_pandas().groupby("example_id").loss.mean()
    np.testing.assert_allclose(partial.set_index("example_id").value.loc[expected.index], expected, rtol=1e-6)
    # report and audit work on the partial run directory
    assert main(["report", str(killed), "-o", str(tmp_path / "partial.html")]) == 0
    html = (tmp_path / "partial.html").read_text()
    assert "interrupted" in html
    assert main(["audit", str(killed), "-o", str(tmp_path / "partial-audit.csv"), "--no-predict"]) == 0
    audit = pd.read_csv(tmp_path / "partial-audit.csv")
    assert len(audit) == 90 and audit.label_score.between(0, 1).all()

    assert subprocess.run(_train_cmd(tables, killed, steps) + ["--resume"], capture_output=True).returncode == 0
    full = tmp_path / "full"
    assert subprocess.run(_train_cmd(tables, full, steps), capture_output=True).returncode == 0
    pd.testing.assert_frame_equal(read_run(killed).values(), read_run(full).values())
    a = read_run(killed).steps().to_pandas().sort_values(["step", "example_id"], ignore_index=True)
    b = read_run(full).steps().to_pandas().sort_values(["step", "example_id"], ignore_index=True)
    pd.testing.assert_frame_equal(a, b)
    assert read_run(killed).meta["status"] == "completed"


def test_second_writer_is_refused_and_sigterm_keeps_the_first_run_intact(tables, tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tables, out, 100000), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(out / "steps" / "part-00000.parquet", proc)
    base = ["train", str(tables["train"]), "--dev", str(tables["dev"]), "--out", str(out), "--steps", "100000",
            "--batch-size", "8", "--device", "cpu", "--set", "checkpoint_every=50", "--set", "log_every=10",
            "--set", "eval_every=500"]
    for extra in ([], ["--resume"]):
        assert main(base + extra) == 2
        assert "in use by another valuekit process" in capsys.readouterr().err
    assert proc.poll() is None  # the first writer was not disturbed
    proc.send_signal(signal.SIGTERM)  # stops like Ctrl-C: checkpoint, status interrupted
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and b"--resume" in err
    run = read_run(out)
    assert run.meta["status"] == "interrupted"
    done = run.meta["steps_done"]
    assert done > 0 and run.steps().num_rows == done * 8
    assert sorted(run.steps(["step"]).column("step").unique().to_pylist()) == list(range(1, done + 1))


def test_foreign_schema_version_is_refused(tables, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tables["train"]), "--dev", str(tables["dev"]), "--out", str(out), "--steps", "4",
                 "--device", "cpu"]) == 0
    meta = json.loads((out / "run.json").read_text())
    meta["schema_version"] = 99
    (out / "run.json").write_text(json.dumps(meta))
    code = main(["score", str(tables["train"]), "--run", str(out), "-o", str(tmp_path / "s.parquet")])
    assert code == 2 and "schema version 99" in capsys.readouterr().err
    assert not (tmp_path / "s.parquet").exists()


def test_diverging_run_exits_non_zero_naming_the_step(tables, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(tables["train"]), "--dev", str(tables["dev"]), "--out", str(out), "--steps", "200",
                 "--lr", "1e30", "--device", "cpu", "--set", "optimizer=sgd", "--set", "momentum=0.0"])
    err = capsys.readouterr().err
    assert code == 3 and "training loss became NaN/inf" in err and err.startswith("valuekit: error: step ")
    assert read_run(out).meta["status"] == "failed"


_cell = st.one_of(st.none(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3))


@st.composite
def malformed_tables(draw):
    n = draw(st.integers(0, 8))
    cols = {}
    if draw(st.booleans()):
        cols["id"] = draw(st.lists(st.one_of(st.integers(0, 5), st.none()), min_size=n, max_size=n))
    if draw(st.booleans()):
        cols["label"] = draw(st.lists(st.one_of(st.sampled_from(["a", "b"]), st.none()), min_size=n, max_size=n))
    for j in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["float", "mixed", "text"]))
        if kind == "float":
            cols[f"f{j}"] = draw(
                st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=n, max_size=n)
            )
        elif kind == "text":
            cols[f"f{j}"] = draw(st.lists(st.text(max_size=2), min_size=n, max_size=n))
        else:
            cols[f"f{j}"] = [str(v) for v in draw(st.lists(_cell, min_size=n, max_size=n))]
    fmt = draw(st.sampled_from(["parquet", "csv"]))
    return pd.DataFrame(cols), fmt


def _acceptable(path, fmt) -> bool:
    """An oracle written apart from valuekit's loader: what the README says a training table must be."""
    try:
        df = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    except (ValueError, pd.errors.EmptyDataError):  # a CSV with no columns at all
        return False
    if len(df) == 0 or "id" not in df or "label" not in df:
        return False
    if df["id"].isna().any() or df["id"].duplicated().any() or df["label"].isna().any() or df["label"].nunique() < 2:
        return False
    feats = [c for c in df.columns if c not in ("id", "label")]
    if not feats or not all(df[c].dtype.kind in "biuf" for c in feats):
        return False
    x = df[feats].to_numpy(dtype=np.float64)
    return bool(np.isfinite(x).all() and (np.abs(x) <= np.finfo(np.float32).max).all())


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=malformed_tables())
def test_random_malformed_tables_give_a_clean_error(tmp_path_factory, case, capsys):
    """A random table is trained on exactly when the oracle accepts it; otherwise one line, exit 2, no run."""
    df, fmt = case
    d = tmp_path_factory.mktemp("fuzz")
    path = d / f"t.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    dev = d / "dev.parquet"
    dev_df = blobs(6, classes=2)
    dev_df["label"] = np.where(dev_df["label"] == "c0", "a", "b")
    dev_df[[c for c in dev_df.columns if c in ("id", "label") or c in df.columns]].to_parquet(dev, index=False)
    capsys.readouterr()
    code = main(["train", str(path), "--dev", str(dev), "--out", str(d / "run"), "--steps", "2", "--batch-size", "4",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == (0 if _acceptable(path, fmt) else 2), err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("valuekit: error:") and "Traceback" not in err, err
        assert not (d / "run").exists()
    else:
        assert len(read_run(d / "run").values()) == len(df)
