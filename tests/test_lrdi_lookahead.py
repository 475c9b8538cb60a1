"""The optimizer look-ahead of LRDI / L2RW (Config.lookahead="optimizer"): the meta-gradient w.r.t. the example
weights equals finite differences of the dev loss after real torch.optim steps (Adam with its moments, SGD with its
momentum buffer) on the weighted loss, and the fused path equals the second-order one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_lrdi import _flat, tiny_ctx, tiny_trainer

from valuekit.errors import InputError
from valuekit.methods.lrdi import Config, Trainer, _safe_sqrt
from valuekit.ops.losses import per_example_loss

LOOP = {"adam": {"optimizer": "adam", "lr": 0.02, "weight_decay": 0.01},
        "sgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.8, "weight_decay": 0.01}}


def _warm(tr: Trainer, steps: int = 3) -> None:
    """A few real optimizer steps, so that Adam's moments / step count (or SGD's buffer) are not at their start."""
    g = torch.Generator().manual_seed(5)
    x, y = tr.ctx.x, tr.ctx.y
    for _ in range(steps):
        r = torch.rand(len(y), generator=g, dtype=torch.float64)
        tr.opt.zero_grad(set_to_none=True)
        (r * per_example_loss(tr.model(x), y)).mean().backward()
        tr.opt.step()
    tr.opt.zero_grad(set_to_none=True)


def _dev_loss_after_real_steps(tr: Trainer, weights: torch.Tensor, *, k: int, reduce: str) -> float:
    """J after k real steps of the loop's optimizer on reduce_i(w_i ℓ_i); model and optimizer restored after."""
    model_state, opt_state = copy.deepcopy(tr.model.state_dict()), copy.deepcopy(tr.opt.state_dict())
    ctx = tr.ctx
    for _ in range(k):
        tr.opt.zero_grad(set_to_none=False)
        weighted = weights * per_example_loss(tr.model(ctx.x), ctx.y)
        (weighted.sum() if reduce == "sum" else weighted.mean()).backward()
        tr.opt.step()
    with torch.no_grad():
        j = F.cross_entropy(tr.model(ctx.dev_x), ctx.dev_y).item()
    tr.model.load_state_dict(model_state)
    tr.opt.load_state_dict(opt_state)
    tr.opt.zero_grad(set_to_none=True)
    return j


def _fd(tr: Trainer, w0: torch.Tensor, *, k: int, reduce: str, h: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(w0)
    for i in range(len(w0)):
        e = torch.zeros_like(w0)
        e[i] = h
        out[i] = (_dev_loss_after_real_steps(tr, w0 + e, k=k, reduce=reduce)
                  - _dev_loss_after_real_steps(tr, w0 - e, k=k, reduce=reduce)) / (2 * h)
    return out


@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("unroll", [1, 2])
def test_weight_meta_gradient_equals_finite_differences_of_real_optimizer_steps(opt, unroll):
    """∂J(θ_K(w))/∂w_i of the virtual look-ahead equals central differences of the dev loss after K real
    torch.optim steps on mean_i w_i ℓ_i taken from the same optimizer state (float64)."""
    tr = tiny_trainer(Config(lookahead="optimizer", unroll=unroll, meta_grad="autograd"), **LOOP[opt])
    _warm(tr)
    ctx = tr.ctx
    w0 = 0.5 + torch.rand(len(ctx.y), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w = w0.clone().requires_grad_()
    j, _ = tr.dev_loss_after_unroll(per_example_loss(tr.model(ctx.x), ctx.y), w, ctx.x, ctx.y, ctx.dev_x,
                                    ctx.dev_y)
    analytic = torch.autograd.grad(j, w)[0]
    assert j.item() == pytest.approx(_dev_loss_after_real_steps(tr, w0, k=unroll, reduce="mean"), rel=1e-12)
    fd = _fd(tr, w0, k=unroll, reduce="mean")
    assert analytic.abs().max() > 1e-5  # a real signal
    torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-10)
    # and not the sgd look-ahead's number
    sgd = tiny_trainer(Config(unroll=unroll, meta_grad="autograd"), **LOOP[opt])
    sgd.model.load_state_dict(tr.model.state_dict())
    j2, _ = sgd.dev_loss_after_unroll(per_example_loss(sgd.model(ctx.x), ctx.y), w, ctx.x, ctx.y, ctx.dev_x,
                                      ctx.dev_y)
    assert not torch.allclose(torch.autograd.grad(j2, w)[0], analytic, rtol=1e-2)


@pytest.mark.parametrize("mode", ["autograd", "fused"])
def test_l2rw_meta_gradient_equals_finite_differences_of_a_real_adam_step(mode):
    """L2RW's ∂J/∂ε_i at ε = 0 with the Adam look-ahead: the real Adam step at ε = 0 still moves θ (its moments and
    weight decay), and the meta-gradient equals central differences of J after that real step on Σ_i ε_i ℓ_i."""
    tr = tiny_trainer(Config(variant="l2rw", lookahead="optimizer", meta_grad=mode), **LOOP["adam"])
    assert (tr.dots_by == "tape") == (mode == "fused")
    _warm(tr)
    ctx = tr.ctx
    meta = tr.meta_gradient(ctx.x, ctx.y, ctx.dev_x, ctx.dev_y, progress=0.3)
    eps0 = torch.zeros(len(ctx.y), dtype=torch.float64)
    assert meta["dev_loss"].item() == pytest.approx(_dev_loss_after_real_steps(tr, eps0, k=1, reduce="sum"),
                                                    rel=1e-12)
    fd = _fd(tr, eps0, k=1, reduce="sum")
    assert meta["grads"].abs().max() > 1e-5
    torch.testing.assert_close(meta["grads"], fd, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("variant", ["lrdi", "mwnet", "l2rw"])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_fused_optimizer_lookahead_equals_second_order(variant, batchnorm):
    """The fused meta-gradient with the Adam look-ahead (per-example dots with u = ∂J(θ')/∂g, from the tape or
    forward mode under BatchNorm) equals the second-order autograd one."""
    from torch import nn

    def bn_mlp(num_classes, input_shape):
        return nn.Sequential(nn.Linear(input_shape[0], 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, num_classes))

    out = {}
    for mode in ("fused", "autograd"):
        cfg = Config(variant=variant, lookahead="optimizer", meta_grad=mode, teacher_hidden=3, label_dim=2)
        if batchnorm:
            ctx = tiny_ctx(model="python:bn_mlp", **LOOP["adam"])
            ctx.model_factory = bn_mlp
            tr = Trainer(ctx, cfg)
            tr.model.double()
            if tr.teacher is not None:
                tr.teacher.double()
        else:
            tr = tiny_trainer(cfg, **LOOP["adam"])
        assert (tr.dots_by is not None) == (mode == "fused")
        _warm(tr)
        out[mode] = tr.meta_gradient(tr.ctx.x, tr.ctx.y, tr.ctx.dev_x, tr.ctx.dev_y, progress=0.3)
    f, a = out["fused"], out["autograd"]
    gf = f["grads"] if variant == "l2rw" else _flat(f["grads"])
    ga = a["grads"] if variant == "l2rw" else _flat(a["grads"])
    top = ga.abs().max()
    assert top > 1e-8 and (gf != 0).any()  # the Adam look-ahead's scale is lr / sqrt(v): small, but a signal
    torch.testing.assert_close(gf / top, ga / top, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(f["dev_loss"], a["dev_loss"], rtol=1e-12, atol=0)
    if variant != "l2rw":
        torch.testing.assert_close(_flat(out["fused"]["student_grads"]), _flat(out["autograd"]["student_grads"]),
                                   rtol=1e-10, atol=1e-13)


def test_optimizer_lookahead_reads_the_optimizer_state_and_writes_nothing():
    """A training step with the Adam look-ahead leaves the optimizer's state as one real Adam step would, and the
    first step (empty state: m = v = 0, t = 0) gives finite weights."""
    tr = tiny_trainer(Config(lookahead="optimizer"), **LOOP["adam"])
    from valuekit.training.context import Batch

    ctx = tr.ctx
    rec = tr.step(Batch(step=1, idx=torch.arange(len(ctx.y)), x=ctx.x, y=ctx.y))
    assert torch.isfinite(rec.weight).all() and torch.isfinite(torch.as_tensor(rec.meta_loss))
    assert all(float(s["step"]) == 1.0 for s in tr.opt.state.values())
    rec = tr.step(Batch(step=2, idx=torch.arange(len(ctx.y)), x=ctx.x, y=ctx.y))
    assert all(float(s["step"]) == 2.0 for s in tr.opt.state.values())


def test_safe_sqrt_has_zero_gradient_at_zero():
    t = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    out = _safe_sqrt(t)
    out.sum().backward()
    assert out.tolist() == [0.0, 2.0] and t.grad.tolist() == [0.0, 0.25]


def test_lookahead_option_validation():
    with pytest.raises(InputError, match="lookahead"):
        Config(lookahead="adam").validate()
    Config(lookahead="optimizer").validate()
