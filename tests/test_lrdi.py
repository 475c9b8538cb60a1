"""LRDI / Meta-Weight-Net / L2RW: meta-gradients against finite differences and hand computations,
variant behaviour, run-directory contents, resume and flat memory."""

from __future__ import annotations

import gc
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from valuekit.config import TrainConfig
from valuekit.data.tables import load_table
from valuekit.errors import InputError
from valuekit.methods.lrdi import Config, Trainer, student_signals
from valuekit.ops.losses import per_example_loss
from valuekit.training.context import Batch, TrainContext
from valuekit.training.loop import run_training
from valuekit.training.options import parse_overrides

DIGITS = Path(__file__).resolve().parents[1] / "data" / "digits-noisy20"


def tiny_ctx(*, n=10, d=5, classes=3, n_dev=7, seed=0, dtype=torch.float64, **loop) -> TrainContext:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    dev_x = torch.randn(n_dev, d, generator=g, dtype=dtype)
    dev_y = torch.randint(0, classes, (n_dev,), generator=g)
    cfg = TrainConfig(**{"model": "mlp", "hidden": 4, "batch_size": n, "steps": 100, **loop})
    return TrainContext(config=cfg, device=torch.device("cpu"), generator=g, x=x, y=y, ids=np.arange(n),
                        num_classes=classes, classes=[f"c{k}" for k in range(classes)], dev_x=dev_x, dev_y=dev_y,
                        mean=torch.zeros(d, dtype=dtype), std=torch.ones(d, dtype=dtype))


def tiny_trainer(cfg: Config, **loop) -> Trainer:
    ctx = tiny_ctx(**loop)
    tr = Trainer(ctx, cfg)
    tr.model.double()
    if tr.teacher is not None:
        tr.teacher.double()
    return tr


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


# ---------------------------------------------------------------- meta-gradient vs finite differences


@pytest.mark.parametrize("unroll", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_teacher_meta_gradient_matches_central_finite_differences(unroll, normalize):
    cfg = Config(unroll=unroll, virtual_lr=0.5, virtual_momentum=0.7, teacher_hidden=3, label_dim=2,
                 normalize=normalize)
    tr = tiny_trainer(cfg)
    ctx = tr.ctx
    x, y = ctx.x, ctx.y
    meta = tr.meta_gradient(x, y, ctx.dev_x, ctx.dev_y, progress=0.3)
    analytic = _flat(meta["grads"])
    # teacher inputs are detached from the student, and the meta step writes no student gradient
    assert all(not t.requires_grad for t in meta["signals"].values())
    assert all(p.grad is None for p in tr.model.parameters())
    assert all(p.grad is None for p in tr.teacher.parameters())

    signals = meta["signals"]
    names = [n for n, _ in tr.teacher.named_parameters()]
    shapes = [p.shape for _, p in tr.teacher.named_parameters()]
    base = _flat([p.detach() for p in tr.teacher.parameters()]).clone()
    theta0 = {n: p.detach().clone() for n, p in tr.model.named_parameters()}

    def dev_loss(vec):
        tp, i = {}, 0
        for n, s in zip(names, shapes):
            tp[n] = vec[i: i + math.prod(s)].reshape(s)
            i += math.prod(s)
        w = torch.sigmoid(functional_call(tr.teacher, tp, (signals,)))
        if normalize:
            w = w / w.mean()
        theta, buf = {n: t.clone().requires_grad_() for n, t in theta0.items()}, None
        for _ in range(unroll):  # plain momentum SGD, no graph kept
            loss = (w * per_example_loss(functional_call(tr.model, theta, (x,)), y)).mean()
            g = torch.autograd.grad(loss, list(theta.values()))
            buf = list(g) if buf is None else [0.7 * b + gg for b, gg in zip(buf, g)]
            theta = {n: (t - 0.5 * b).detach().requires_grad_() for (n, t), b in zip(theta.items(), buf)}
        return F.cross_entropy(functional_call(tr.model, theta, (ctx.dev_x,)), ctx.dev_y).item()

    assert abs(dev_loss(base) - meta["dev_loss"].item()) < 1e-12
    h = 1e-6
    fd = torch.zeros_like(base)
    for j in range(len(base)):
        e = torch.zeros_like(base)
        e[j] = h
        fd[j] = (dev_loss(base + e) - dev_loss(base - e)) / (2 * h)
    assert analytic.abs().max() > 1e-4  # a real signal, not zeros
    torch.testing.assert_close(analytic, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reuse", [False, True])
def test_real_step_uses_updated_teacher_or_reuses_the_virtual_gradient(reuse):
    lr = 0.05
    tr = tiny_trainer(Config(reuse_gradient=reuse, dev_batch_size=100), optimizer="sgd", momentum=0.0, lr=lr)
    ctx = tr.ctx
    params = list(tr.model.parameters())
    names = [n for n, _ in tr.model.named_parameters()]
    theta_list = [p.detach().clone() for p in params]
    theta0 = _flat(theta_list)
    feats = tr.model.features(ctx.x)
    logits = tr.model.head(feats)
    losses = per_example_loss(logits, ctx.y)
    sig = student_signals(feats, logits, losses, ctx.y, tr.progress(1))
    w_before = tr.weights(sig).detach()
    teacher0 = _flat([p.detach() for p in tr.teacher.parameters()]).clone()
    rec = tr.step(Batch(step=1, idx=torch.arange(ctx.n), x=ctx.x, y=ctx.y))
    assert not torch.equal(teacher0, _flat([p.detach() for p in tr.teacher.parameters()]))  # teacher moved
    w_after = tr.weights(sig).detach()
    w = w_before if reuse else w_after
    torch.testing.assert_close(rec.weight, w, rtol=1e-12, atol=1e-12)
    th = {n: p.detach().clone().requires_grad_() for n, p in zip(names, theta_list)}
    g = _flat(torch.autograd.grad((w * per_example_loss(functional_call(tr.model, th, (ctx.x,)), ctx.y)).mean(),
                                  list(th.values())))
    torch.testing.assert_close(_flat([p.detach() for p in params]), theta0 - lr * g, rtol=1e-10, atol=1e-12)


def test_meta_every_updates_the_teacher_only_on_meta_steps():
    tr = tiny_trainer(Config(meta_every=3))
    ctx = tr.ctx
    changed = []
    for step in range(1, 8):
        before = _flat([p.detach() for p in tr.teacher.parameters()]).clone()
        rec = tr.step(Batch(step=step, idx=torch.arange(ctx.n), x=ctx.x, y=ctx.y))
        changed.append(not torch.equal(before, _flat([p.detach() for p in tr.teacher.parameters()])))
        assert (rec.meta_loss is None) == (not changed[-1]) and rec.scorer_loss is None
    assert changed == [True, False, False, True, False, False, True]


def test_method_defaults_of_the_meta_step_period():
    """mwnet's teacher steps every 4th step by default (reports/suite-lrdi-meta-every.md), lrdi and l2rw every step;
    a user's --set still wins."""
    from valuekit.config import TrainConfig
    from valuekit.training.options import resolve

    period = {m: resolve(TrainConfig(method=m))[1].meta_every for m in ("lrdi", "mwnet", "l2rw")}
    assert period == {"lrdi": 1, "mwnet": 4, "l2rw": 1}
    assert resolve(TrainConfig(method="mwnet"), overrides=["meta_every=1"])[1].meta_every == 1
    assert resolve(TrainConfig(method="mwnet"))[1].variant == "mwnet"


# ---------------------------------------------------------------- l2rw by hand


def test_l2rw_weights_rewards_and_real_step_equal_hand_computation():
    lr_v, lr = 0.3, 0.05
    tr = tiny_trainer(Config(variant="l2rw", virtual_lr=lr_v, dev_batch_size=100),
                      optimizer="sgd", momentum=0.0, lr=lr, seed=3)
    ctx = tr.ctx
    params = list(tr.model.parameters())
    theta0 = [p.detach().clone() for p in params]
    x, y = ctx.x, ctx.y
    b = len(y)
    # explicit per-example gradients and the dev gradient at θ0 (ε = 0 leaves θ1 = θ0)
    per_ex = [_flat(torch.autograd.grad(per_example_loss(tr.model(x[i:i + 1]), y[i:i + 1]).sum(), params))
              for i in range(b)]
    g_dev = _flat(torch.autograd.grad(F.cross_entropy(tr.model(ctx.dev_x), ctx.dev_y), params))
    meta_grad = torch.stack([-lr_v * (gi @ g_dev) for gi in per_ex])  # dJ/dε_i = -α ∇ℓ_i·∇J
    clipped = (-meta_grad).clamp_min(0)
    expected_w = clipped * b / clipped.sum()
    assert (meta_grad > 0).any() and (meta_grad < 0).any()  # both sides of the clip are exercised

    rec = tr.step(Batch(step=1, idx=torch.arange(b), x=x, y=y))
    torch.testing.assert_close(rec.reward, -meta_grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rec.weight, expected_w, rtol=1e-9, atol=1e-12)
    # real step: plain SGD on mean_i w_i ℓ_i
    step_dir = sum(w * gi for w, gi in zip(expected_w, per_ex)) / b
    torch.testing.assert_close(_flat([p.detach() for p in params]), _flat(theta0) - lr * step_dir,
                               rtol=1e-9, atol=1e-12)


def test_l2rw_values_without_signals_are_the_mean_logged_weight():
    """A bare TrainContext (no signal accumulator): value falls back to the row's mean logged weight, NaN for rows
    never sampled; weight is that mean with 0 for them."""
    tr = tiny_trainer(Config(variant="l2rw", dev_batch_size=100), seed=3)
    ctx = tr.ctx
    assert ctx.signals is None
    rows = torch.arange(6)
    w1 = tr.step(Batch(step=1, idx=rows, x=ctx.x[rows], y=ctx.y[rows])).weight.double()
    w2 = tr.step(Batch(step=2, idx=rows[:3], x=ctx.x[:3], y=ctx.y[:3])).weight.double()
    v = tr.values()  # a bare context has no in-run signals: the loop's value would be the learned mean weight
    mean = torch.cat([(w1[:3] + w2) / 2, w1[3:]]).numpy()
    np.testing.assert_allclose(np.asarray(v.learned)[:6], mean, rtol=1e-12)
    assert np.isnan(np.asarray(v.learned)[6:]).all()
    np.testing.assert_allclose(np.asarray(v.columns["weight"]), np.r_[mean, np.zeros(4)], rtol=1e-12)


def test_l2rw_unroll_changes_only_the_scale_of_the_meta_gradient():
    """At ε = 0 every virtual step stays at θ0, so K steps multiply dJ/dε by Σ_k Σ_j μ^j."""
    g = {}
    for k in (1, 3):
        tr = tiny_trainer(Config(variant="l2rw", unroll=k, virtual_momentum=0.5, dev_batch_size=100))
        g[k] = tr.meta_gradient(tr.ctx.x, tr.ctx.y, tr.ctx.dev_x, tr.ctx.dev_y, progress=0.0)["grads"]
    scale = 1 + (1 + 0.5) + (1 + 0.5 + 0.25)
    torch.testing.assert_close(g[3], scale * g[1], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- teacher inputs


def test_mwnet_teacher_sees_only_the_loss():
    tr = tiny_trainer(Config(variant="mwnet"))
    assert tr.teacher.net[0].in_features == 1 and tr.teacher.label is None
    ctx = tr.ctx
    feats = tr.model.features(ctx.x)
    logits = tr.model.head(feats)
    losses = per_example_loss(logits, ctx.y)
    s = student_signals(feats, logits, losses, ctx.y, 0.2)
    w = tr.weights(s)
    other = student_signals(feats * 3 + 1, logits.flip(0), losses, ctx.y.flip(0), 0.9)
    torch.testing.assert_close(tr.weights(other), w, rtol=0, atol=0)
    assert not torch.allclose(tr.weights({**s, "loss": s["loss"] * 2}), w)
    # lrdi's teacher does read the features
    lr = tiny_trainer(Config())
    assert lr.teacher.net[0].in_features == 4 + 4 + 8  # features + loss/prob/margin/progress + label
    s2 = student_signals(feats, logits, losses, ctx.y, 0.2)
    assert not torch.allclose(lr.weights({**s2, "features": s2["features"] * 3 + 1}), lr.weights(s2))


def test_student_signals_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    losses = per_example_loss(logits, y)
    s = student_signals(torch.zeros(2, 1), logits, losses, y, 0.25)
    p = logits.softmax(1)
    torch.testing.assert_close(s["prob"][:, 0], torch.stack([p[0, 0], p[1, 1]]))
    torch.testing.assert_close(s["margin"][:, 0], torch.stack([p[0, 0] - p[0, 1], p[1, 1] - p[1, 2]]))
    torch.testing.assert_close(s["loss"][:, 0], -torch.log(torch.stack([p[0, 0], p[1, 1]])))
    assert s["progress"].tolist() == [[0.25], [0.25]]


def test_teacher_inputs_subset_and_validation():
    tr = tiny_trainer(Config(teacher_inputs="loss,label", label_dim=3))
    assert tr.teacher.net[0].in_features == 1 + 3
    for bad in (dict(unroll=6), dict(unroll=0), dict(variant="nope"), dict(teacher_inputs="loss,grad"),
                dict(teacher_inputs=""), dict(teacher_inputs="loss,loss"),
                dict(variant="mwnet", teacher_inputs="features"), dict(variant="l2rw", meta_every=2),
                dict(virtual_lr=0.0), dict(virtual_momentum=1.0), dict(dev_batch_size=-1), dict(meta_every=0)):
        key, value = list(bad.items())[-1]  # the message names the offending setting and its value
        with pytest.raises(InputError, match=rf"{key}\W+'?{re.escape(str(value))}"):
            Config(**bad).validate()
    Config(variant="mwnet", teacher_inputs="loss").validate()
    vals, _ = parse_overrides(["teacher_inputs=loss,features", "unroll=3"], Config)
    assert vals == {"teacher_inputs": "loss,features", "unroll": 3}
    assert Config(**vals).inputs() == ("loss", "features")


# ---------------------------------------------------------------- runs on digits-noisy20


def _tables():
    tr = load_table(DIGITS / "train.parquet", name="train")
    dev = load_table(DIGITS / "dev.parquet", like=tr, name="dev")
    return tr, dev, load_table(DIGITS / "test.parquet", like=tr, name="test")


class Keep:
    def on_step_end(self, step, batch, record, trainer):
        self.trainer = trainer


@pytest.mark.parametrize("variant", ["lrdi", "mwnet", "l2rw"])
def test_short_run_logs_weights_rewards_and_values(tmp_path, variant):
    data, dev, test = _tables()
    steps, bsz = 60, 32
    keep = Keep()
    run = run_training(data, dev, test, out=tmp_path / variant,
                config=TrainConfig(method=variant, steps=steps, batch_size=bsz, eval_every=30, progress=False),
                method_config={"std_epochs": 1}, hooks=[keep])
    assert run.meta["method_config"]["variant"] == variant
    st = run.steps().to_pandas()
    assert len(st) == steps * bsz and st.weight.notna().all() and (st.weight >= 0).all()
    per_step = st.groupby("step").weight.mean()
    if variant == "l2rw":
        assert st.reward.notna().all() and (st.reward < 0).any() and (st.reward > 0).any()
        assert ((per_step == 0) | np.isclose(per_step, 1.0, atol=1e-5)).all()  # mean 1, or all clipped
        clip = st.reward.clip(lower=0)
        expect = clip * bsz / clip.groupby(st.step).transform("sum")
        assert np.allclose(st.weight, expect, rtol=1e-4, atol=1e-6)
    else:
        assert st.reward.isna().all()
        assert np.allclose(per_step, 1.0, atol=1e-5)  # batch-normalised to mean 1
        assert st.weight.std() > 1e-3  # the teacher does not give every example the same weight
    m = run.metrics()
    period = 4 if variant == "mwnet" else 1  # mwnet's teacher steps every 4th step by default
    assert (m.meta_loss.notna() == ((m.step - 1) % period == 0)).all()
    assert m.scorer_loss.isna().all() and m.test_acc.dropna().iloc[-1] > 0.5

    vals = run.values()
    assert len(vals) == len(data.y) and list(vals.example_id) == list(data.ids)
    mean_w = st.groupby("example_id").weight.mean()
    got = vals.set_index("example_id")
    assert np.allclose(got.mean_weight.loc[mean_w.index], mean_w, rtol=1e-5)
    # value: percentile rank of the run's -mean_loss over the table, NaN for rows never sampled
    from valuekit.training.signals import class_percentile
    want = class_percentile(-vals.mean_loss.to_numpy(), np.zeros(len(vals)))
    np.testing.assert_allclose(vals.value.to_numpy(), want, rtol=1e-12)
    assert got.value.drop(mean_w.index).isna().all() and got.value.loc[mean_w.index].notna().all()
    if variant == "l2rw":  # no teacher: weight = mean logged weight, 0 for rows never sampled
        assert np.allclose(got.weight.loc[mean_w.index] * mean_w.sum() / got.weight.loc[mean_w.index].sum(), mean_w,
                           rtol=1e-5)
    else:  # teacher_weight = the final teacher's eval-mode weight of every row, mean 1
        tr = keep.trainer
        w = tr.teacher_weights(tr.ctx.x, tr.ctx.y, progress=1.0).double()
        assert np.allclose(vals.teacher_weight, (w / w.mean()).numpy(), rtol=1e-6)
        assert vals.teacher_weight.notna().all() and abs(vals.teacher_weight.mean() - 1) < 1e-9
    # value_std: std (ddof 0) of the logged weights in the last epoch (std_epochs=1: ceil(N/B) steps)
    window = math.ceil(len(data.y) / bsz)
    last = st[st.step > steps - window]
    grp = last.groupby("example_id").weight
    std = grp.std(ddof=0)[grp.count() >= 2]
    assert len(std) > 10
    assert np.allclose(got.value_std.loc[std.index], std, atol=1e-6)
    assert got.value_std.drop(std.index).isna().all()


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, batch, record, trainer):
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("variant", ["lrdi", "l2rw"])
def test_resume_equals_uninterrupted(tmp_path, variant):
    data, dev, test = _tables()
    cfg = TrainConfig(method=variant, steps=30, batch_size=32, eval_every=10, checkpoint_every=1000,
                      progress=False)
    mc = {"unroll": 2, "std_epochs": 1}
    full = run_training(data, dev, test, out=tmp_path / "full", config=cfg, method_config=mc)
    with pytest.raises(KeyboardInterrupt):
        run_training(data, dev, test, out=tmp_path / "cut", config=cfg, method_config=mc, hooks=[StopAt(13)])
    cut = run_training(data, dev, test, out=tmp_path / "cut", config=cfg, method_config=mc, resume=True)
    a, b = full.steps().to_pandas(), cut.steps().to_pandas().sort_values(["step"], kind="stable")
    assert len(a) == len(b) == 30 * 32
    for col in ("example_id", "weight", "reward", "loss"):
        assert a[col].reset_index(drop=True).equals(b[col].reset_index(drop=True)), col
    pd.testing.assert_frame_equal(full.values(), cut.values())
    ma, mb = full.metrics(), cut.metrics()
    assert ma.test_acc.dropna().tolist() == mb.test_acc.dropna().tolist()


# ---------------------------------------------------------------- memory


def _live_tensors():
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some lazily deprecated torch module attributes warns
        warnings.simplefilter("ignore")
        ts = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(ts), sum(t.numel() for t in ts), sum(t.grad_fn is not None for t in ts)


@pytest.mark.parametrize("variant,unroll", [("lrdi", 2), ("l2rw", 1)])
def test_live_tensor_memory_is_flat_over_200_steps(variant, unroll):
    tr = tiny_trainer(Config(variant=variant, unroll=unroll), n=40, batch_size=8, steps=200)
    ctx, g = tr.ctx, torch.Generator().manual_seed(0)
    snap = {}
    for step in range(1, 201):
        idx = torch.randint(0, ctx.n, (8,), generator=g)
        tr.step(Batch(step=step, idx=idx, x=ctx.x[idx], y=ctx.y[idx]))
        if step in (20, 100, 200):
            snap[step] = _live_tensors()
    assert snap[20] == snap[100] == snap[200]
    assert snap[200][2] == 0  # no autograd graph survives a step
    n_params = sum(p.numel() for p in tr.model.parameters())
    assert n_params == sum(p.numel() for p in tiny_trainer(Config(variant=variant)).model.parameters())


# ---------------------------------------------------------------- fused meta-gradient (speed)


@pytest.mark.parametrize("variant", ["lrdi", "mwnet", "l2rw"])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_meta_gradient_equals_second_order(variant, normalize):
    """meta_grad=fused (per-example dots from the student's own backward, no double backward) gives the
    second-order autograd meta-gradient, dev loss and student gradient to float64 rounding."""
    out = {}
    for mode in ("fused", "autograd"):
        tr = tiny_trainer(Config(variant=variant, meta_grad=mode, virtual_lr=0.4, teacher_hidden=3, label_dim=2,
                                 normalize=normalize))
        assert (tr.dots_by == "tape") == (mode == "fused")
        ctx = tr.ctx
        out[mode] = tr.meta_gradient(ctx.x, ctx.y, ctx.dev_x, ctx.dev_y, progress=0.3)
    f, a = out["fused"], out["autograd"]
    _assert_same_meta_gradient(f, a, variant, rtol=1e-10, atol=1e-13)
    if variant != "l2rw":
        torch.testing.assert_close(_flat(f["student_grads"]), _flat(a["student_grads"]), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("variant", ["lrdi", "mwnet", "l2rw"])
def test_fused_meta_gradient_with_batchnorm_equals_second_order(variant):
    """With BatchNorm (rows coupled through the batch statistics) the fused meta-gradient takes its dots from one
    forward-mode pass; it equals the second-order autograd meta-gradient (l2rw skips the unused first backward)."""
    from torch import nn

    def bn_mlp(num_classes, input_shape):
        return nn.Sequential(nn.Linear(input_shape[0], 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, num_classes))

    out = {}
    for mode in ("fused", "autograd"):
        ctx = tiny_ctx(model="python:bn_mlp")
        ctx.model_factory = bn_mlp
        tr = Trainer(ctx, Config(variant=variant, meta_grad=mode, virtual_lr=0.4, teacher_hidden=3, label_dim=2))
        tr.model.double()
        if tr.teacher is not None:
            tr.teacher.double()
        assert (tr.dots_by == "jvp") == (mode == "fused")
        out[mode] = tr.meta_gradient(ctx.x, ctx.y, ctx.dev_x, ctx.dev_y, progress=0.3)
    _assert_same_meta_gradient(out["fused"], out["autograd"], variant, rtol=1e-9, atol=1e-12)


def _assert_same_meta_gradient(f: dict, a: dict, variant: str, *, rtol: float, atol: float) -> None:
    """The fused meta-gradient `f` equals the second-order one `a` (teacher grads, or dJ/dε for l2rw), and the dev
    loss."""
    gf = f["grads"] if variant == "l2rw" else _flat(f["grads"])
    ga = a["grads"] if variant == "l2rw" else _flat(a["grads"])
    assert ga.abs().max() > 1e-4
    torch.testing.assert_close(gf, ga, rtol=rtol, atol=atol)
    torch.testing.assert_close(f["dev_loss"], a["dev_loss"], rtol=1e-12, atol=0)


def test_meta_grad_option_validation():
    with pytest.raises(InputError, match="^meta_grad=fused needs unroll 1") as info:  # the argument, no flag
        Config(meta_grad="fused", unroll=2).validate()
    assert info.value.cli.startswith("--set meta_grad=fused needs unroll 1")  # the CLI's form
    with pytest.raises(InputError, match="meta_grad"):
        Config(meta_grad="x").validate()
    assert tiny_trainer(Config(unroll=2)).dots_by is None  # auto: second order for unroll > 1


def test_final_teacher_weights_are_scored_in_eval_batch_size_chunks(monkeypatch):
    tr = tiny_trainer(Config(), eval_batch_size=3)
    chunks = []
    score_rows = tr.ctx.score_rows
    monkeypatch.setattr(
        tr.ctx, "score_rows", lambda fn, *m, **kw: chunks.append(kw["chunk"]) or score_rows(fn, *m, **kw)
    )
    a = tr.teacher_weights(tr.ctx.x, tr.ctx.y, progress=0.5)
    b = tr.teacher_weights(tr.ctx.x, tr.ctx.y, progress=0.5, chunk=10)
    assert chunks == [None, 10] and a.shape == (10,)
    torch.testing.assert_close(a, b)  # rows do not interact in eval mode: the chunking changes nothing
    sizes = []
    monkeypatch.setattr(tr.ctx, "score_rows", score_rows)
    inner = tr.model.forward
    monkeypatch.setattr(tr.model, "forward", lambda x: sizes.append(len(x)) or inner(x))
    tr.teacher_weights(tr.ctx.x, tr.ctx.y, progress=0.5)
    assert sizes == [3, 3, 3, 1]  # eval_batch_size rows at a time
