"""The one training loop with the uniform method: run-log contents, resume, interruption, divergence."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from valuekit.config import TrainConfig
from valuekit.data.tables import load_table
from valuekit.errors import InputError, RunDirError, TrainingDiverged
from valuekit.methods.uniform import Config as UniformConfig
from valuekit.runs.layout import METRICS_SCHEMA, steps_schema
from valuekit.runs.lock import acquire_lock
from valuekit.runs.reader import read_run
from valuekit.training.loop import run_training
from valuekit.training.options import parse_overrides, resolve_device


def _load(tables, drop_eval=False):
    tr = pd.read_parquet(tables["train"])
    if drop_eval:
        tr = tr.drop(columns=["is_noisy", "clean_label"])
    train_ds = load_table(tables["train"] if not drop_eval else tr)
    dev = load_table(tables["dev"], like=train_ds, name="dev")
    test = load_table(tables["test"], like=train_ds, name="test")
    return train_ds, dev, test


def _cfg(**kw):
    base = dict(steps=30, batch_size=16, eval_every=10, log_every=10, checkpoint_every=10, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_uniform_run_directory_contents(tables, tmp_path):
    tr, dev, test = _load(tables)
    run = run_training(tr, dev, test, out=tmp_path / "run", config=_cfg())
    steps = run.steps()
    assert steps.num_rows == 30 * 16
    assert steps.schema.remove_metadata() == steps_schema("int64")
    part = pq.read_schema(tmp_path / "run" / "steps" / "part-00000.parquet")
    assert part.metadata[b"valuekit.schema_version"] == b"1" and part.metadata[b"valuekit.table"] == b"steps"
    df = steps.to_pandas()
    assert sorted(df.step.unique()) == list(range(1, 31))
    assert df.reward.isna().all() and df.selected.isna().all() and df.weight.isna().all()
    assert set(df.example_id) <= set(tr.ids.tolist())

    metrics = run.metrics()
    assert list(metrics.columns) == METRICS_SCHEMA.names and len(metrics) == 30
    assert metrics.dev_acc.notna().sum() == 3 and metrics.test_acc.notna().sum() == 3

    values = run.values()
    assert list(values.columns) == ["example_id", "value", "value_std", "weight", "rank", "mean_loss", "aum",
                                    "mean_weight", "mean_reward", "times_seen", "last_loss"]
    assert len(values) == len(tr) and values.weight.mean() == pytest.approx(1.0)
    assert sorted(values["rank"]) == list(range(1, len(tr) + 1))
    # value is minus the mean logged loss of each example seen; never-seen rows are NaN and rank last
    expected = -df.groupby("example_id").loss.mean()
    got = values.set_index("example_id").value
    np.testing.assert_allclose(got.loc[expected.index], expected, rtol=1e-5)
    assert got.drop(expected.index).isna().all()
    ranked = values.sort_values("rank")
    assert ranked.value.dropna().is_monotonic_decreasing
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["status"] == "completed" and meta["steps_done"] == 30 and meta["method"] == "uniform"
    assert meta["data"]["train"]["n_rows"] == 90 and len(meta["data"]["train"]["file_sha256"]) == 64
    assert meta["versions"]["torch"] and meta["classes"] == ["c0", "c1", "c2"]
    assert not (tmp_path / "run" / ".lock").exists()


def test_training_never_reads_evaluation_columns(tables, tmp_path):
    a = run_training(*_load(tables), out=tmp_path / "a", config=_cfg()).values()
    b = run_training(*_load(tables, drop_eval=True), out=tmp_path / "b", config=_cfg()).values()
    pd.testing.assert_frame_equal(a, b)


def test_same_seed_same_values_other_seed_differs(tables, tmp_path):
    a = run_training(*_load(tables), out=tmp_path / "a", config=_cfg()).values()
    b = run_training(*_load(tables), out=tmp_path / "b", config=_cfg()).values()
    c = run_training(*_load(tables), out=tmp_path / "c", config=_cfg(seed=1)).values()
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.value.fillna(0), c.value.fillna(0))


def test_the_loop_returns_freed_heap_every_few_seconds_without_changing_the_run(tables, tmp_path, monkeypatch):
    import valuekit.training.loop as base

    a = run_training(*_load(tables), out=tmp_path / "a", config=_cfg()).values()
    calls = []
    monkeypatch.setattr(base, "TRIM_SECONDS", -1.0)  # every step
    monkeypatch.setattr(base, "trim_heap", lambda: calls.append(1) or True)
    b = run_training(*_load(tables), out=tmp_path / "b", config=_cfg()).values()
    assert len(calls) == 30
    pd.testing.assert_frame_equal(a, b)


def test_resume_after_interrupt_equals_uninterrupted(tables, tmp_path):
    full = run_training(*_load(tables), out=tmp_path / "full", config=_cfg(steps=40))

    class StopAt:
        def on_step_end(self, step, batch, record, trainer):
            if step == 17:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(*_load(tables), out=tmp_path / "part", config=_cfg(steps=40), hooks=[StopAt()])
    partial = read_run(tmp_path / "part")
    assert partial.meta["status"] == "interrupted" and partial.meta["steps_done"] == 17
    assert partial.values(partial=False) is None and partial.steps().num_rows == 17 * 16
    resumed = run_training(*_load(tables), out=tmp_path / "part", config=_cfg(steps=40), resume=True)
    pd.testing.assert_frame_equal(full.values(), resumed.values())
    a = full.steps().to_pandas().sort_values(["step", "example_id"], ignore_index=True)
    b = resumed.steps().to_pandas().sort_values(["step", "example_id"], ignore_index=True)
    pd.testing.assert_frame_equal(a, b)
    assert resumed.meta["status"] == "completed"


def test_resume_extends_a_finished_run(tables, tmp_path):
    full = run_training(*_load(tables), out=tmp_path / "full", config=_cfg(steps=40))
    run_training(*_load(tables), out=tmp_path / "ext", config=_cfg(steps=20))
    ext = run_training(*_load(tables), out=tmp_path / "ext", config=_cfg(steps=40), resume=True)
    pd.testing.assert_frame_equal(full.values(), ext.values())


def test_resume_refuses_other_data_or_method(tables, tmp_path):
    tr, dev, test = _load(tables)
    run_training(tr, dev, test, out=tmp_path / "run", config=_cfg(steps=10))
    other = load_table(pd.read_parquet(tables["train"]).iloc[:-1])
    with pytest.raises(RunDirError, match="resume=True with different data"):
        run_training(
            other, load_table(tables["dev"], like=other), out=tmp_path / "run", config=_cfg(steps=20), resume=True
        )
    with pytest.raises(RunDirError, match="resume=True with different config") as err:
        run_training(tr, dev, out=tmp_path / "run", config=_cfg(steps=20, lr=0.5), resume=True)
    lr = _cfg(steps=10).lr  # the message names the setting and both values
    assert f"config (lr: the run has {lr!r}, this call 0.5)" in str(err.value)
    with pytest.raises(RunDirError, match="already holds a run"):
        run_training(tr, dev, out=tmp_path / "run", config=_cfg(steps=20))


def test_divergence_stops_with_the_step_and_keeps_the_log(tables, tmp_path):
    tr, dev, _ = _load(tables)
    with pytest.raises(TrainingDiverged, match=r"step \d+: training loss became NaN/inf") as err:
        run_training(tr, dev, out=tmp_path / "run", config=_cfg(steps=200, optimizer="sgd", lr=1e30, momentum=0.0))
    step = int(str(err.value).split(":")[0].split()[1])
    assert str(err.value).endswith("(try a smaller lr)") and err.value.cli.endswith("(try a smaller --lr)")
    run = read_run(tmp_path / "run")
    assert run.meta["status"] == "failed" and run.meta["steps_done"] == step
    assert run.steps().num_rows == step * 16  # every step up to the bad one is logged
    assert run.metrics().step.max() == step


def test_lock_refuses_a_second_writer(tmp_path):
    lock = acquire_lock(tmp_path)
    with pytest.raises(RunDirError, match="in use by another valuekit process"):
        acquire_lock(tmp_path)
    lock.unlink()
    lock.write_text("thishost-does-not-matter:1")  # another host's lock is never taken over
    with pytest.raises(RunDirError):
        acquire_lock(tmp_path)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{socket.gethostname()}:{dead.pid}")
    lock = acquire_lock(tmp_path)
    assert lock.read_text().endswith(f":{os.getpid()}")


def test_overrides_are_typed_by_defaults():
    m, loop = parse_overrides(["eval_every=5", "lr=0.1", "progress=false"], UniformConfig)
    assert loop == {"eval_every": 5, "lr": 0.1, "progress": False} and m == {}
    with pytest.raises(InputError, match="--set eval_every=abc: expected int"):
        parse_overrides(["eval_every=abc"], UniformConfig)
    with pytest.raises(InputError, match="--set nope: unknown setting"):
        parse_overrides(["nope=1"], UniformConfig)


def test_device_choice(monkeypatch):
    import torch

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="device='tpu': use 'auto', 'cpu' or 'cuda'"):
        resolve_device("tpu")
    # both answers of "is there a GPU?", whatever this machine has
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(InputError, match=f"device='{name}': no CUDA device is available"):
            resolve_device(name)


def test_uniform_values_are_minus_mean_loss_and_its_std_over_visits():
    """uniform.values(): value = -(mean loss over the row's visits), value_std = their std (ddof 0), NaN for rows
    never sampled; checked against the losses each step reported."""
    import torch

    from valuekit.methods import uniform
    from valuekit.training.context import Batch, TrainContext

    g = torch.Generator().manual_seed(0)
    n = 8
    x, y = torch.randn(n, 3, generator=g), torch.arange(n) % 2
    ctx = TrainContext(config=TrainConfig(model="mlp", hidden=4, lr=0.5, progress=False), device=torch.device("cpu"),
                       generator=g, x=x, y=y, ids=np.arange(n), num_classes=2, classes=["a", "b"], dev_x=x, dev_y=y,
                       mean=torch.zeros(3), std=torch.ones(3))
    tr = uniform.Trainer(ctx, UniformConfig())
    losses = {i: [] for i in range(n)}
    for step, rows in enumerate([range(6), range(3), range(6)], 1):
        idx = torch.tensor(list(rows))
        rec = tr.step(Batch(step=step, idx=idx, x=x[idx], y=y[idx]))
        for i, loss in zip(idx.tolist(), rec.loss.double().tolist()):
            losses[i].append(loss)
    v = tr.values()
    assert np.std(losses[0]) > 1e-3  # the model moved: the losses differ between visits
    want = [-np.mean(losses[i]) if losses[i] else np.nan for i in range(n)]
    std = [np.std(losses[i]) if losses[i] else np.nan for i in range(n)]
    np.testing.assert_allclose(np.asarray(v.value), want, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(np.asarray(v.columns["value_std"]), std, rtol=1e-4, atol=1e-7, equal_nan=True)


def test_the_mmap_threshold_is_fixed_for_causal_lm_tables_or_when_asked(monkeypatch):
    import os
    import subprocess
    import sys

    from valuekit.data import memory
    from valuekit.errors import InputError

    for value in (None, "", "auto", "default"):
        monkeypatch.delenv("VALUEKIT_MALLOC", raising=False)
        if value is not None:
            monkeypatch.setenv("VALUEKIT_MALLOC", value)
        memory.fix_mmap_threshold.cache_clear()
        assert memory.fix_mmap_threshold() is False, value  # other tables: glibc's own threshold
    memory.fix_mmap_threshold.cache_clear()
    assert memory.fix_mmap_threshold(causal_lm=True) is False  # "default" wins over a causal LM
    monkeypatch.setenv("VALUEKIT_MALLOC", "stedy")
    memory.fix_mmap_threshold.cache_clear()
    with pytest.raises(InputError, match=r"VALUEKIT_MALLOC='stedy': choose from auto, steady, default"):
        memory.fix_mmap_threshold()
    memory.fix_mmap_threshold.cache_clear()
    # a fixed threshold changes this process's allocator: asked in child processes
    code = ("import sys; from valuekit.data.memory import fix_mmap_threshold as f, _malloc_trim as t; "
            "print(f(causal_lm=sys.argv[1] == 'lm'), t() is not None)")
    env = {k: v for k, v in os.environ.items() if k != "VALUEKIT_MALLOC"}
    for extra, kind in (({"VALUEKIT_MALLOC": "steady"}, "table"), ({}, "lm"), ({"VALUEKIT_MALLOC": "auto"}, "lm")):
        out = subprocess.run([sys.executable, "-c", code, kind], capture_output=True, text=True, check=True,
                             env={**env, **extra}).stdout.split()
        assert out[0] == out[1], (extra, kind)  # set wherever the C library is glibc
    out = subprocess.run([sys.executable, "-c", code, "table"], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    assert out[0] == "False"


def test_a_bad_malloc_setting_stops_the_command_line_with_one_line(tmp_path, monkeypatch, capsys):
    from valuekit.cli.main import main

    from valuekit.data import memory

    digits = Path(__file__).resolve().parents[1] / "data" / "digits-noisy20"
    monkeypatch.setenv("VALUEKIT_MALLOC", "stedy")
    memory.fix_mmap_threshold.cache_clear()
    try:
        rc = main(["train", str(digits / "train.parquet"), "--dev", str(digits / "dev.parquet"), "--steps", "2",
                   "--device", "cpu", "--out", str(tmp_path / "run")])
    finally:
        memory.fix_mmap_threshold.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["valuekit: error: $VALUEKIT_MALLOC='stedy': choose from auto, steady, default"]
    assert not (tmp_path / "run").exists()
