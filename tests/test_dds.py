"""DDS (Wang et al. 2020, Algorithm 1): rewards, REINFORCE update, uniform limit, run log, resume, retrained DDS."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from valuekit.config import TrainConfig
from valuekit.data.tables import load_table
from valuekit.errors import InputError
from valuekit.methods import dds, uniform
from valuekit.ops.losses import per_example_loss
from valuekit.training.context import Batch, TrainContext
from valuekit.training.loop import run_training

DIGITS = Path(__file__).resolve().parents[1] / "data" / "digits-noisy20"  # from any working directory


def make_ctx(*, n=24, d=5, c=3, m=10, seed=0, batch_size=8, dtype=torch.float32, model="mlp") -> TrainContext:
    d = 16 if model == "cnn" else d
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.arange(n) % c
    dev_x = torch.randn(m, d, generator=g, dtype=dtype)
    dev_y = torch.arange(m) % c
    cfg = TrainConfig(model=model, hidden=6, batch_size=batch_size, seed=seed, lr=0.05, progress=False)
    return TrainContext(
        config=cfg, device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed), x=x, y=y,
        ids=np.arange(n), num_classes=c, classes=[str(i) for i in range(c)], dev_x=dev_x, dev_y=dev_y,
        mean=x.mean(0), std=x.std(0), image_shape=(1, 4, 4) if model == "cnn" else None,
    )


def batch_of(ctx, rows, step=1) -> Batch:
    idx = torch.as_tensor(rows)
    return Batch(step=step, idx=idx, x=ctx.x[idx], y=ctx.y[idx])


def float64_trainer(ctx, **cfg) -> dds.Trainer:
    tr = dds.Trainer(ctx, dds.Config(**cfg))
    tr.model.double()
    tr.scorer.double()
    return tr


def loop_rewards(model, theta_prev, x, y, dev_x, dev_y) -> torch.Tensor:
    """Reference: explicit per-example gradients at theta_{t-1} dotted with the dev gradient at theta_t."""
    params = list(model.parameters())
    d = torch.autograd.grad(per_example_loss(model(dev_x), dev_y).mean(), params)
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, name in zip(params, [n for n, _ in model.named_parameters()]):
            p.copy_(theta_prev[name])
    out = []
    for i in range(len(y)):
        gi = torch.autograd.grad(per_example_loss(model(x[i: i + 1]), y[i: i + 1]).sum(), params)
        out.append(sum((a * b).sum() for a, b in zip(gi, d)))
    with torch.no_grad():
        for p, a in zip(params, after):
            p.copy_(a)
    return torch.stack(out)


@pytest.mark.parametrize("model,method,tol", [
    ("mlp", "exact", 1e-10), ("mlp", "ghost", 1e-10), ("mlp", "fused", 1e-10), ("mlp", "taylor", 2e-2),
    ("cnn", "exact", 1e-10), ("cnn", "fused", 1e-10),
])
def test_reward_matches_per_example_loop(model, method, tol):
    ctx = make_ctx(dtype=torch.float64, model=model)
    tr = float64_trainer(ctx, reward_method=method, dev_batch_size=0, scorer_warmup=0, update_every=1)
    tr.scorer_opt.param_groups[0]["lr"] = 0.5  # make the scorer non-uniform after the first step
    b1 = batch_of(ctx, [0, 1, 2, 3, 4, 5, 6, 7])
    tr.step(b1)
    b2 = batch_of(ctx, [8, 9, 10, 11, 12, 13, 14, 15], step=2)
    theta_prev = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.cfg.dev_batch_size = len(ctx.dev_y)  # whole dev set: no sampling in the reference
    rec = tr.step(b2)
    assert not torch.allclose(rec.weight, torch.ones(8, dtype=rec.weight.dtype))  # weights really used
    ref = loop_rewards(tr.model, theta_prev, b2.x, b2.y, ctx.dev_x, ctx.dev_y)
    scale = ref.abs().max()
    assert scale > 0
    assert torch.allclose(rec.reward, ref, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("norm,ent", [("none", 0.0), ("ema", 0.0), ("ema", 0.3)])
def test_reinforce_update_matches_hand_gradient(norm, ent):
    """Closed form for the label-bias and label-embedding parameters of the mlp scorer:
    d/db_c log p_i = [y_i=c] - P_c, d/dE_c log p_i = [y_i=c] h_i - sum_j p_j [y_j=c] h_j;
    the entropy bonus ent * sum_i p_i log p_i adds ent * sum_i p_i log p_i * d log p_i."""
    ctx = make_ctx(dtype=torch.float64)
    tr = float64_trainer(ctx, reward_norm=norm, reward_scale=0.7, scorer_lr=1e-3, entropy_weight=ent, update_every=1)
    with torch.no_grad():  # a non-uniform scorer so that P_c is not trivial
        tr.scorer.label.weight.copy_(
            torch.randn(tr.scorer.label.weight.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        )
    b = batch_of(ctx, [0, 1, 2, 3, 4, 5, 6, 7])
    E0 = tr.scorer.label.weight.detach().clone()
    bias0 = tr.scorer.label_bias.weight.detach().clone()
    with torch.no_grad():
        h = tr.scorer.body(b.x)
        p = torch.softmax((h * E0[b.y]).sum(-1) + bias0[b.y, 0], 0)
    rec = tr.step(b)
    r = rec.reward.double()
    if norm == "ema":  # first batch: baseline = batch mean, std = batch std (population)
        r = (r - r.mean()) / ((r - r.mean()) ** 2).mean().sqrt()
    r = 0.7 * r
    onehot = torch.nn.functional.one_hot(b.y, 3).double()
    P = p @ onehot  # (C,)
    B = len(b.y)
    c = -r / B + ent * p * torch.log(p)  # coefficient of d log p_i in d(scorer loss)
    grad_b = (c[:, None] * (onehot - P)).sum(0)
    ph = (p[:, None, None] * onehot[:, :, None] * h[:, None, :]).sum(0)  # (C, H): sum_j p_j [y_j=c] h_j
    grad_E = (c[:, None, None] * (onehot[:, :, None] * h[:, None, :] - ph)).sum(0)
    assert torch.allclose(tr.scorer.label_bias.weight.grad[:, 0], grad_b, atol=1e-12)
    assert torch.allclose(tr.scorer.label.weight.grad, grad_E, atol=1e-12)
    # Adam's first step moves each coordinate by -lr * g / (|g| + eps)
    step = -1e-3 * grad_b / (grad_b.abs() + 1e-8)
    assert torch.allclose(tr.scorer.label_bias.weight[:, 0] - bias0[:, 0], step, atol=1e-9)
    expected_loss = -(r * torch.log(p)).mean() + ent * (p * torch.log(p)).sum()
    assert rec.scorer_loss == pytest.approx(float(expected_loss), rel=1e-9)


def test_frozen_uniform_scorer_is_plain_training():
    ctx_d, ctx_u = make_ctx(), make_ctx()
    tr_d = dds.Trainer(ctx_d, dds.Config(scorer_lr=0.0))
    tr_u = uniform.Trainer(ctx_u, uniform.Config())
    for p, q in zip(tr_d.model.parameters(), tr_u.model.parameters()):
        assert torch.equal(p, q)  # same init: the model is built before the scorer
    for step in range(1, 4):
        rows = torch.arange(8) + 8 * (step - 1)
        rd = tr_d.step(batch_of(ctx_d, rows, step))
        tr_u.step(batch_of(ctx_u, rows, step))
        assert torch.allclose(rd.weight, torch.ones(8), rtol=0, atol=1e-6)
        assert rd.reward is None and rd.scorer_loss is None  # scorer not updated: nothing to reward
    for p, q in zip(tr_d.model.parameters(), tr_u.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    v = tr_d.values().columns
    assert torch.all(v["scorer_logit"] == 0) and torch.allclose(v["weight"], torch.ones(ctx_d.n, dtype=torch.float64))


def test_warmup_uses_uniform_weights_while_scorer_learns():
    ctx = make_ctx()
    tr = dds.Trainer(ctx, dds.Config(scorer_warmup=2, scorer_lr=0.1, update_every=1))
    w = [tr.step(batch_of(ctx, torch.arange(8) + 8 * (s % 3), s + 1)).weight for s in range(3)]
    assert torch.equal(w[0], torch.ones(8)) and torch.equal(w[1], torch.ones(8))
    assert not torch.allclose(w[2], torch.ones(8), atol=1e-4)
    assert w[2].mean().item() == pytest.approx(1.0, abs=1e-5)


def test_update_every_skips_rewards():
    ctx = make_ctx()
    tr = dds.Trainer(ctx, dds.Config(update_every=2))
    recs = [tr.step(batch_of(ctx, torch.arange(8), s + 1)) for s in range(4)]
    assert [r.reward is None for r in recs] == [True, False, True, False]
    assert [r.scorer_loss is None for r in recs] == [True, False, True, False]


def test_class_balance_prior_equalises_class_mass():
    n = 60
    ctx = make_ctx(n=n, batch_size=16)
    ctx.y = torch.tensor([0] * 40 + [1] * 15 + [2] * 5)
    tr = dds.Trainer(ctx, dds.Config(prior="class_balance", prior_steps=300, prior_lr=3e-2))
    w = tr.values().columns["weight"]
    mass = torch.zeros(3, dtype=torch.float64).index_add_(0, ctx.y, w) / n
    assert torch.allclose(mass, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.05), mass


@pytest.mark.parametrize("bad", [{"reward_method": "magic"}, {"scorer": "tree"}, {"reward_norm": "z"},
                                 {"update_every": 0}, {"init_scorer": "/nonexistent/run"}, {"scorer_lr": -1.0}])
def test_config_validation(bad):
    (key, value), = bad.items()  # the message names the setting and the value given
    with pytest.raises(InputError, match=rf"{key}\W+'?{re.escape(str(value))}"):
        dds.Config(**bad).validate()


# ---------------------------------------------------------------- through the loop, on digits


@pytest.fixture(scope="module")
def digits():
    tr = load_table(f"{DIGITS}/train.parquet", name="train")
    dv = load_table(f"{DIGITS}/dev.parquet", like=tr, name="dev")
    return tr, dv


def run_dds(digits, out, *, steps=12, resume=False, **mcfg):
    tr, dv = digits
    cfg = TrainConfig(method="dds", steps=steps, batch_size=32, hidden=32, eval_every=6, log_every=4,
                      checkpoint_every=4, progress=False)
    return run_training(
        tr,
        dv,
        out=out,
        config=cfg,
        method_config={"dev_batch_size": 32, "scorer_warmup": 0, "update_every": 1, **mcfg},
        resume=resume,
    )


def test_short_run_logs_rewards_and_weights(digits, tmp_path):
    run = run_dds(digits, tmp_path / "r")
    steps = run.steps().to_pandas()
    assert len(steps) == 12 * 32
    assert steps["weight"].notna().all() and steps["reward"].notna().all() and steps["loss"].notna().all()
    per_batch = steps.groupby("step")["weight"].mean()
    assert np.allclose(per_batch, 1.0, atol=1e-5)
    assert steps["weight"].std() > 1e-4  # the scorer moved away from uniform
    m = run.metrics()
    assert m["scorer_loss"].notna().all() and m["dev_loss"].notna().sum() == 2
    v = run.values()
    assert len(v) == len(digits[0].ids)
    assert v["weight"].mean() == pytest.approx(1.0, abs=1e-9)
    # weight is the softmax of the scorer logit over the whole training set, times N
    w = np.exp(v["scorer_logit"] - v["scorer_logit"].max())
    assert np.allclose(v["weight"], w / w.sum() * len(v), rtol=1e-9)
    assert np.array_equal(v["label"].to_numpy(), digits[0].y.numpy())
    # value = percentile rank of -mean_loss over the table (signals.in_run_value), scorer_logit_z = the logit
    # standardised within each class
    from valuekit.training.signals import class_percentile, class_standardise
    labels = digits[0].y.numpy()
    np.testing.assert_allclose(v["value"].to_numpy(), class_percentile(-v["mean_loss"].to_numpy(), np.zeros(len(v))),
                               rtol=1e-12)
    z = v["scorer_logit_z"].to_numpy()
    np.testing.assert_allclose(z, class_standardise(v["scorer_logit"].to_numpy(), labels), rtol=1e-9, atol=1e-12)
    for c in np.unique(labels):
        assert z[labels == c].mean() == pytest.approx(0.0, abs=1e-9) and z[labels == c].std() == pytest.approx(1.0)
    ck = torch.load(run.path / "checkpoint.pt", weights_only=True)
    assert "scorer" in ck["trainer"]


@pytest.mark.parametrize("mcfg", [{}, {"update_every": 3, "reward_method": "fused", "scorer_warmup": 5}])
def test_resume_equals_uninterrupted(digits, tmp_path, mcfg):
    full = run_dds(digits, tmp_path / "full", steps=12, **mcfg)
    run_dds(digits, tmp_path / "part", steps=8, **mcfg)
    resumed = run_dds(digits, tmp_path / "part", steps=12, resume=True, **mcfg)
    a = full.steps().to_pandas().sort_values(["step", "example_id"], ignore_index=True)
    b = resumed.steps().to_pandas().sort_values(["step", "example_id"], ignore_index=True)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(full.values(), resumed.values())


def test_retrained_dds_loads_the_scorer(digits, tmp_path):
    src = run_dds(digits, tmp_path / "src", steps=8)
    again = run_dds(digits, tmp_path / "again", steps=4, init_scorer=str(src.path), scorer_lr=0.0)
    assert np.array_equal(src.values()["scorer_logit"].to_numpy(), again.values()["scorer_logit"].to_numpy())
    w = again.steps(["weight"]).column("weight").to_numpy()
    assert w.std() > 1e-4  # the loaded scorer, not a uniform one, weighted the batches
    plain = run_dds(digits, tmp_path / "plain", steps=4, scorer_lr=0.0)
    assert np.all(plain.values()["scorer_logit"].to_numpy() == 0)
    # a run without a scorer cannot seed retrained DDS
    tr, dv = digits
    u = run_training(tr, dv, out=tmp_path / "u", config=TrainConfig(steps=2, progress=False))
    with pytest.raises(InputError, match="no DDS scorer"):
        run_dds(digits, tmp_path / "bad", steps=2, init_scorer=str(u.path))
