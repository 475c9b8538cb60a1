"""Speed machinery: the background part writer, the bench's breakdown and layer-under-load pieces,
BatchNorm in the gradient tape."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from valuekit.runs.layout import METRICS_SCHEMA, steps_schema
from valuekit.runs.parts import AsyncPartWriter, PartWriter


def _rows(step, n, *, weight=True, src=True):
    return dict(step=step, example_id=np.arange(n) + 10 * step, label=np.arange(n, dtype=np.int32) % 3,
                source=np.array([f"s{i % 2}" for i in range(n)], dtype=object) if src else None,
                weight=np.linspace(0, 1, n, dtype=np.float32) if weight else None, reward=None,
                loss=np.full(n, step, dtype=np.float32), selected=None)


def test_async_part_writer_writes_what_part_writer_writes(tmp_path):
    """Same parts, same numbering, same contents as the synchronous writer, including steps that lack a
    column (nulls for those rows only) and the metrics table's optional columns."""
    a = AsyncPartWriter(tmp_path / "a", steps_schema("int64"), "steps", "run")
    s = PartWriter(tmp_path / "s", steps_schema("int64"), "steps", "run")
    for step in range(1, 8):
        kw = _rows(step, 4, weight=step % 3 != 0, src=step != 5)
        a.add(**kw)
        s.add(**kw)
        if step % 3 == 0:
            a.flush()
            s.flush()
    a.close()
    s.flush()
    assert a.next_part == s.next_part == 3
    for k in range(3):
        ta = pq.read_table(tmp_path / "a" / f"part-{k:05d}.parquet")
        ts = pq.read_table(tmp_path / "s" / f"part-{k:05d}.parquet")
        assert ta.schema.equals(ts.schema, check_metadata=True)
        assert ta.equals(ts)
    t = pq.read_table(tmp_path / "a" / "part-00000.parquet").to_pandas()
    assert t.weight.isna().sum() == 4 and t.weight.notna().sum() == 8  # step 3 had no weights
    m = AsyncPartWriter(tmp_path / "m", METRICS_SCHEMA, "metrics", "run")
    m.add(step=1, train_loss=0.5, step_time=0.1, wall_time=0.1, scorer_loss=None)
    m.add(step=2, train_loss=0.4, step_time=0.1, wall_time=0.2, scorer_loss=1.5, dev_loss=0.3, dev_acc=0.9)
    m.close()
    mt = pq.read_table(tmp_path / "m" / "part-00000.parquet").to_pandas()
    assert mt.scorer_loss.isna().tolist() == [True, False] and mt.dev_acc.iloc[1] == 0.9
    assert mt.train_acc.isna().all()


def test_async_part_writer_sync_and_errors(tmp_path):
    w = AsyncPartWriter(tmp_path / "w", steps_schema("int64"), "steps", "run")
    w.add(**_rows(1, 3))
    w.flush()
    w.sync()  # after sync the part is on disk
    assert (tmp_path / "w" / "part-00000.parquet").exists()
    # a failure in the thread comes back to the caller
    w.add(**{**_rows(2, 3), "loss": np.array(["not", "a", "number"], dtype=object)})
    w.flush()
    with pytest.raises(RuntimeError, match="writing .* failed"):
        w.sync()
    w.close()


def test_writer_thread_cpu_time_is_counted_per_part(tmp_path):
    w = AsyncPartWriter(tmp_path / "w", steps_schema("int64"), "steps", "run")
    assert w.busy_s == 0.0
    for step in range(1, 4):
        w.add(**_rows(step, 2000))
        w.flush()
    w.close()
    assert 0.0 < w.busy_s < 5.0


def test_step_log_overhead_is_the_fastest_runs_ratio_with_the_logs_own_cpu_time():
    from valuekit.bench.common import logging_overhead

    out = logging_overhead(steps=30, repeats=2)
    log, nolog = out["runs_s"]["log"], out["runs_s"]["nolog"]
    assert len(log) == len(nolog) == 2
    assert out["overhead"] == pytest.approx(min(log) / min(nolog) - 1, abs=1e-9)
    assert out["overhead_median"] == pytest.approx(np.median(log) / np.median(nolog) - 1, abs=1e-9)
    # each repeat's two runs ran back to back: the median of their ratios
    assert out["overhead_paired"] == pytest.approx(np.median([a / b for a, b in zip(log, nolog)]) - 1, abs=1e-9)
    c_log, c_nolog = out["cpu_s"]["log"], out["cpu_s"]["nolog"]
    assert out["cpu_overhead_paired"] == pytest.approx(np.median([a / b for a, b in zip(c_log, c_nolog)]) - 1, abs=1e-9)
    assert all(0 < c < 60 for c in c_log + c_nolog)
    assert 0.0 < out["log_cpu_share"] < 0.5  # the loop's add calls plus the writer thread, over the run's wall time


def test_run_writer_part_counts_wait_for_disk(tmp_path):
    from valuekit.runs.writer import RunWriter

    rw = RunWriter(tmp_path / "run", meta={"method": "x"}, id_type="int64")
    for step in range(1, 4):
        rw.steps.add(**_rows(step, 5))
        rw.flush()
    counts = rw.part_counts()
    assert counts["steps"] == 3
    assert sorted(p.name for p in (tmp_path / "run" / "steps").glob("part-*.parquet")) == [
        f"part-{k:05d}.parquet" for k in range(3)]
    rw.close("completed")


def test_resnet_model_shapes():
    from valuekit.models.builtin import build_model

    m = build_model("resnet", in_features=784, num_classes=10, image_shape=(1, 28, 28),
                    generator=torch.Generator().manual_seed(0))
    assert m(torch.randn(5, 784)).shape == (5, 10) and m.features(torch.randn(5, 784)).shape == (5, 64)
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    with pytest.raises(ValueError, match="needs image-shaped features"):
        build_model("resnet", in_features=10, num_classes=2)


def test_lrdi_fused_meta_gradient_is_exact_with_batchnorm():
    """On the resnet (BatchNorm: rows interact) auto picks forward-mode dots, which equal the second-order
    meta-gradient."""
    from valuekit.bench.common import bench_tables
    from valuekit.config import TrainConfig
    from valuekit.training.loop import make_trainer

    tr, dv = bench_tables(side=16)
    out = {}
    for mode in ("auto", "autograd"):
        trainer, _, ctx = make_trainer(tr, dv, TrainConfig(method="lrdi", model="resnet", batch_size=16, steps=10,
                                                           progress=False, device="cpu"), {"meta_grad": mode})
        trainer.model.double()
        trainer.teacher.double()
        x, y = ctx.x[:16].double(), ctx.y[:16]
        assert trainer.dots_by == ("jvp" if mode == "auto" else None)
        m = trainer.meta_gradient(x, y, ctx.dev_x[:12].double(), ctx.dev_y[:12], progress=0.2)
        out[mode] = torch.cat([g.reshape(-1) for g in m["grads"]])
    torch.testing.assert_close(out["auto"], out["autograd"], rtol=1e-8, atol=1e-12)


def test_step_times_breakdown_and_layer_under_load():
    from valuekit.bench.common import bench_tables
    from valuekit.bench.layer import layer_under_load
    from valuekit.bench.speed import step_times

    tr, dv = bench_tables()
    times, parts = step_times(tr, dv, methods=["uniform", "lrdi", "dds"], model="mlp", batch_size=32, steps=4,
                              warmup=4, reps=2, breakdown=True)
    assert times["lrdi"].shape == (2, 4) and (times["uniform"] > 0).all()
    assert (parts["lrdi"]["meta"] > 0).all() and (parts["lrdi"]["meta"] < times["lrdi"]).all()
    assert (parts["uniform"]["meta"] == 0).all() and (parts["uniform"]["logging"] > 0).all()
    assert (parts["dds"]["reward"] > 0).any()  # dds computes rewards every 4th step
    rows = layer_under_load(n=64, batch=4, reps=2, default_threads=2)
    assert [r["setting"] for r in rows][0] == "idle, 1 thread" and len(rows) == 4
    assert all(r["median_ms"] > 0 for r in rows) and rows[1]["vs_loaded_1_thread"] == pytest.approx(1.0)
    assert torch.get_num_threads() >= 1


def test_batchnorm_models_use_exact_dots_in_dds_and_hostcp():
    from valuekit.bench.common import bench_tables
    from valuekit.config import TrainConfig
    from valuekit.training.context import Batch
    from valuekit.training.loop import make_trainer

    tr, dv = bench_tables(side=16)
    dds, _, ctx = make_trainer(tr, dv, TrainConfig(method="dds", model="resnet", batch_size=8, steps=10,
                                                   progress=False, device="cpu"))
    assert dds.tape is None
    hc, _, _ = make_trainer(tr, dv, TrainConfig(method="hostcp", model="resnet", batch_size=8, steps=10,
                                                progress=False, device="cpu"))
    assert hc.tape is None and hc.dots_method == "exact"
    mlp, _, _ = make_trainer(tr, dv, TrainConfig(method="hostcp", model="mlp", batch_size=8, steps=10,
                                                 progress=False, device="cpu"))
    assert mlp.tape is not None and mlp.dots_method == "fused"
    # a dds scorer update on the resnet runs and gives finite rewards
    dds.cfg.scorer_warmup = 0
    for step in range(1, 5):
        idx = torch.arange(8 * step, 8 * step + 8)
        rec = dds.step(Batch(step=step, idx=idx, x=ctx.x[idx], y=ctx.y[idx]))
    assert rec.reward is not None and torch.isfinite(rec.reward).all()
