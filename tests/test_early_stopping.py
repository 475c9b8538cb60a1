"""Early stopping, the evaluation interval and --epochs: the best-dev model in best.pt and run.json, resume,
the report, and bad input (one line, exit code 2, nothing written)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from valuekit.cli.main import main

import valuekit
from valuekit.config import TrainConfig
from valuekit.data.tables import load_table
from valuekit.errors import InputError
from valuekit.runs.reader import read_run
from valuekit.training.context import evaluate
from valuekit.training.early_stopping import eval_interval, schedule
from valuekit.training.loop import make_trainer
from valuekit.training.loop import run_training as train_loop

FAST = dict(batch_size=16, device="cpu", progress=False, hidden=16, lr=3e-2)


def _best_by_metrics(run) -> dict:
    """The evaluation early stopping must keep, from metrics/: highest dev accuracy, then lowest dev loss,
    then the earliest step."""
    m = run.metrics().dropna(subset=["dev_acc"])
    return m.sort_values(["dev_acc", "dev_loss", "step"], ascending=[False, True, True]).iloc[0]


def _run(tables, out, **kw):
    return valuekit.train(str(tables["train"]), dev=str(tables["dev"]), test=str(tables["test"]), out=out,
                          **{**FAST, **kw})


def _evaluate_state(tables, state: dict, split: str) -> tuple[float, float]:
    """(loss, accuracy) of a saved model state on a table, through a freshly built model of the same shape."""
    tr = load_table(tables["train"])
    data = load_table(tables[split], like=tr, name=split)
    cfg = TrainConfig(**{k: v for k, v in FAST.items() if k != "lr"}, steps=1)
    trainer, _, ctx = make_trainer(tr, data, cfg)
    trainer.model.load_state_dict(state)
    return evaluate(trainer.model, ctx.dev_x, ctx.dev_y)


@pytest.mark.parametrize("method", ["uniform", "dds"])
def test_best_step_is_the_argmax_of_dev_accuracy_and_best_pt_reproduces_it(tables, tmp_path, method):
    run = _run(tables, tmp_path / method, method=method, steps=60, eval_every=3, early_stopping=True)
    want = _best_by_metrics(run)
    evals = run.metrics().dropna(subset=["dev_acc"])
    assert list(evals.step) == list(range(3, 61, 3))
    assert run.meta["best_step"] == int(want.step)
    assert run.meta["best_metrics"] == pytest.approx({k: float(want[k]) for k in
                                                      ("dev_acc", "dev_loss", "test_acc", "test_loss")})
    assert run.meta["stopped_early"] is False and run.meta["steps_done"] == 60
    blob = torch.load(run.best_model_path, map_location="cpu", weights_only=True)
    assert blob["step"] == run.meta["best_step"] and blob["dev_acc"] == run.meta["best_metrics"]["dev_acc"]
    for split in ("dev", "test"):
        loss, acc = _evaluate_state(tables, blob["model"], split)
        assert acc == pytest.approx(run.meta["best_metrics"][f"{split}_acc"], abs=1e-12)
        assert loss == pytest.approx(run.meta["best_metrics"][f"{split}_loss"], rel=1e-5)
    # the last model is still in checkpoint.pt and gives the final metrics
    last = torch.load(run.checkpoint_path, map_location="cpu", weights_only=True)["trainer"]["model"]
    assert _evaluate_state(tables, last, "dev")[1] == pytest.approx(run.meta["final_metrics"]["dev_acc"], abs=1e-12)


def test_patience_stops_after_that_many_evaluations_without_a_better_one(tables, tmp_path):
    run = _run(tables, tmp_path / "p", steps=400, eval_every=2, early_stopping=True, patience=3)
    evals = run.metrics().dropna(subset=["dev_acc"])
    best = _best_by_metrics(run)
    assert run.meta["stopped_early"] is True
    assert run.meta["steps_done"] == int(best.step) + 3 * 2 == int(evals.step.max()) < 400
    assert run.meta["best_step"] == int(best.step)
    assert run.meta["status"] == "completed" and run.values() is not None


def test_default_evaluates_about_20_times_and_keeps_an_explicit_interval(tables, tmp_path):
    assert eval_interval(TrainConfig(steps=500)) == 25 and eval_interval(TrainConfig(steps=7)) == 1
    assert eval_interval(TrainConfig(steps=500, eval_every=50)) == 50
    run = _run(tables, tmp_path / "d", steps=60)
    evals = run.metrics().dropna(subset=["dev_acc"]).step.tolist()
    assert evals == list(range(3, 61, 3)) and run.meta["eval_every"] == 3
    assert run.best_model_path is None and "best_step" not in run.meta  # no early stopping: as before
    run = _run(tables, tmp_path / "e", steps=60, eval_every=25)
    assert run.metrics().dropna(subset=["dev_acc"]).step.tolist() == [25, 50, 60]


def test_epochs_give_ceil_of_epochs_times_rows_over_batch(tables, tmp_path):
    # 90 rows, batch 16: 2.5 epochs = ceil(225 / 16) = 15 steps; with 2 processes the batch is 32 rows
    assert schedule(TrainConfig(epochs=2.5, batch_size=16), 90).steps == 15
    assert schedule(TrainConfig(epochs=2.5, batch_size=16), 90, world_size=2).steps == 8
    assert schedule(TrainConfig(epochs=1e-6, batch_size=16), 90).steps == 1
    assert schedule(TrainConfig(steps=7), 90).steps == 7
    run = _run(tables, tmp_path / "ep", epochs=2.5)
    assert run.meta["steps_done"] == 15 == run.meta["config"]["steps"] and run.meta["config"]["epochs"] == 2.5
    assert run.metrics().step.max() == 15


def test_resume_keeps_the_best_model(tables, tmp_path):
    kw = dict(eval_every=4, early_stopping=True, checkpoint_every=8)
    whole = _run(tables, tmp_path / "whole", steps=80, **kw)
    part = tmp_path / "part"
    _run(tables, part, steps=40, **kw)
    first = read_run(part).meta["best_step"]
    # a run killed between writing best.pt and checkpoint.pt leaves a later best.pt: resume restores the one
    # that belongs to the checkpoint
    torch.save({"step": 999, "model": {}}, part / "best.pt")
    resumed = _run(tables, part, steps=80, resume=True, **kw)
    assert first <= 40 and resumed.meta["best_step"] == whole.meta["best_step"]
    assert resumed.meta["best_metrics"] == whole.meta["best_metrics"]
    a = torch.load(whole.best_model_path, weights_only=True)
    b = torch.load(resumed.best_model_path, weights_only=True)
    assert a["step"] == b["step"] and a.keys() == b.keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


def test_resume_of_a_finished_run_restores_best_pt_from_its_checkpoint(tables, tmp_path):
    kw = dict(eval_every=4, early_stopping=True)
    out = tmp_path / "r"
    run = _run(tables, out, steps=40, **kw)
    keep = torch.load(run.best_model_path, weights_only=True)
    torch.save({"step": 999, "model": {}}, out / "best.pt")
    again = _run(tables, out, steps=40, resume=True, **kw)
    got = torch.load(again.best_model_path, weights_only=True)
    assert got["step"] == keep["step"] == again.meta["best_step"]
    for k in keep["model"]:
        torch.testing.assert_close(got["model"][k], keep["model"][k], rtol=0, atol=0)


def test_cli_prints_last_and_best_and_the_report_marks_the_best_step(tables, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tables["train"]), "--dev", str(tables["dev"]), "--test", str(tables["test"]),
                 "--steps", "40", "--batch-size", "16", "--device", "cpu", "--set", "progress=false",
                 "--set", "lr=0.03", "--eval-every", "4", "--early-stopping", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    meta = json.loads((out / "run.json").read_text())
    b, f = meta["best_metrics"], meta["final_metrics"]
    assert (f"  best:    step {meta['best_step']}, dev_acc={b['dev_acc']:.4f}, test_acc={b['test_acc']:.4f}  "
            f"{out / 'best.pt'}") in text
    assert f"  last:    step 40, dev_acc={f['dev_acc']:.4f}, test_acc={f['test_acc']:.4f}" in text
    html = tmp_path / "r.html"
    assert main(["report", str(out), "-o", str(html)]) == 0
    page = html.read_text(encoding="utf-8")
    assert f"best step {meta['best_step']} (dev acc {b['dev_acc']:.4g}, test acc {b['test_acc']:.4g}" in page
    assert f"{meta['best_step']} · {b['dev_acc']:.4g} · {b['test_acc']:.4g}" in page  # summary row


@pytest.mark.parametrize("extra, message", [
    (["--eval-every", "0"], "--eval-every 0: must be >= 1"),
    (["--eval-every", "-3"], "--eval-every -3: must be >= 1"),
    (["--set", "eval_every=0"], "--eval-every 0: must be >= 1"),
    (["--epochs", "2", "--steps", "5"], "--steps 5 --epochs 2.0: give one of them"),
    (["--epochs", "0"], "--epochs 0.0: must be a finite number > 0"),
    (["--epochs", "nan"], "--epochs nan: must be a finite number > 0"),
    (["--patience", "2"], "--patience 2: needs --early-stopping"),
    (["--early-stopping", "--patience", "-1"], "--patience -1: must be >= 0"),
    (["--set", "epochs=x"], "--set epochs=x: expected float or none"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tables, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code = main(["train", str(tables["train"]), "--dev", str(tables["dev"]), "--device", "cpu", "--out", str(out),
                 *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_early_stopping_without_a_dev_table_is_refused(tables, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", str(tables["train"]), "--early-stopping", "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--dev" in err and not out.exists()
    with pytest.raises(InputError, match="^valuekit.train: dev is None; .*early_stopping chooses the model by it"):
        valuekit.train(str(tables["train"]), out=out, early_stopping=True)
    tr = load_table(tables["train"])
    with pytest.raises(InputError, match="^early_stopping: needs a dev table"):
        train_loop(tr, None, out=out, config=TrainConfig(early_stopping=True, **FAST))
    with pytest.raises(InputError, match="steps=5 and epochs=2: give one of them"):
        valuekit.train(str(tables["train"]), dev=str(tables["dev"]), out=out, steps=5, epochs=2)
    assert not out.exists()


def test_resume_with_other_early_stopping_is_refused(tables, tmp_path):
    out = tmp_path / "r"
    _run(tables, out, steps=8)
    from valuekit.errors import RunDirError

    with pytest.raises(RunDirError, match="early_stopping: the run has False, this call True"):
        _run(tables, out, steps=16, resume=True, early_stopping=True)
    assert math.isfinite(read_run(out).meta["final_metrics"]["dev_acc"])
    assert np.isfinite(read_run(out).metrics().train_loss).all()


def test_torchrun_keeps_the_same_best_model_as_one_process_with_the_doubled_batch(tmp_path, monkeypatch):
    """2 processes x batch 16 against 1 process x batch 32: --epochs counts the global batch, both stop at the
    same evaluation, and rank 0's best.pt holds the same model (float tolerance as in test_distributed)."""
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    digits = Path(__file__).resolve().parents[1] / "data" / "digits-noisy20"
    common = [
        str(digits / "train.parquet"),
        "--dev",
        str(digits / "dev.parquet"),
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--eval-every",
        "3",
        "--early-stopping",
        "--patience",
        "2",
        "--set",
        "hidden=32",
        "--set",
        "progress=false",
        "--set",
        "checkpoint_every=4",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *common, "--batch-size", "32", "--out", str(one)]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "valuekit.cli", "train", *common, "--batch-size", "16", "--out", str(two)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1, r2 = read_run(one), read_run(two)
    rows = r1.meta["data"]["train"]["n_rows"]
    assert r1.meta["config"]["steps"] == r2.meta["config"]["steps"] == math.ceil(rows / 32)
    assert r1.meta["stopped_early"] and r1.meta["steps_done"] < r1.meta["config"]["steps"]
    for key in ("best_step", "steps_done", "stopped_early"):
        assert r1.meta[key] == r2.meta[key], key
    assert r2.meta["best_metrics"] == pytest.approx(r1.meta["best_metrics"], rel=1e-4, abs=1e-5)
    a = torch.load(r1.best_model_path, weights_only=True)["model"]
    b = torch.load(r2.best_model_path, weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert not list(two.glob(".*.tmp")) and not (two / ".lock").exists()


@pytest.mark.parametrize("method", ["uniform", "dds"])
def test_the_evaluation_interval_does_not_change_training(tables, tmp_path, method):
    """The new default (about 20 evaluations) trains exactly as the old eval_every=50: evaluation draws no
    randomness and changes no state, so the step log and the values are identical."""
    old = _run(tables, tmp_path / "old", method=method, steps=100, eval_every=50)
    new = _run(tables, tmp_path / "new", method=method, steps=100)
    assert old.metrics().dev_acc.notna().sum() == 2 and new.metrics().dev_acc.notna().sum() == 20
    assert old.steps().equals(new.steps())
    pd.testing.assert_frame_equal(old.values(), new.values())
    assert old.meta["final_metrics"]["dev_acc"] == new.meta["final_metrics"]["dev_acc"]


def test_resume_may_change_the_evaluation_interval_and_continues_runs_made_before_early_stopping(tables, tmp_path):
    out = tmp_path / "r"
    _run(tables, out, steps=20, eval_every=50)
    meta = json.loads((out / "run.json").read_text())
    for key in ("early_stopping", "patience", "epochs"):  # a run.json written before these settings existed
        del meta["config"][key]
    (out / "run.json").write_text(json.dumps(meta))
    run = _run(tables, out, steps=40, resume=True)
    assert run.metrics().dropna(subset=["dev_acc"]).step.tolist() == [20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40]
