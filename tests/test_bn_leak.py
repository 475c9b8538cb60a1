"""Dev rows never reach BatchNorm's running statistics: after one step of each method the running mean, variance
and batch count equal those of the step's training rows alone run once through the model in training mode. The
meta-gradients stay those of the training-mode forward (batch statistics), which eval-mode statistics would not
give. And the one mode switch (`gradients.eval_mode`) restores every submodule's mode as it found it."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from torch import nn

from valuekit.config import TrainConfig
from valuekit.ops.modes import eval_mode, no_running_stats_update
from valuekit.training import context as api
from valuekit.training.context import Batch, TrainContext

torch.set_num_threads(1)

RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def bn_mlp(num_classes, input_shape):
    return nn.Sequential(nn.Linear(input_shape[0], 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5),
                         nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, num_classes))


def make_ctx(method: str, *, n=12, d=4, classes=3, n_dev=9, seed=0, sources=0, dtype=torch.float64) -> TrainContext:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.arange(n) % classes
    dev_x = torch.randn(n_dev, d, generator=g, dtype=dtype) * 2 + 1  # unlike the training rows
    dev_y = torch.arange(n_dev) % classes
    cfg = TrainConfig(method=method, model="python:bn_mlp", batch_size=n, steps=100, progress=False)
    ctx = TrainContext(config=cfg, device=torch.device("cpu"), generator=g, x=x, y=y, ids=np.arange(n),
                       num_classes=classes, classes=[f"c{k}" for k in range(classes)], dev_x=dev_x, dev_y=dev_y,
                       mean=torch.zeros(d, dtype=dtype), std=torch.ones(d, dtype=dtype),
                       source=torch.arange(n) % sources if sources else None,
                       sources=[f"s{k}" for k in range(sources)])
    ctx.model_factory = bn_mlp
    return ctx


def running(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(RUNNING)}


def trainer(module, ctx, cfg):
    tr = module.Trainer(ctx, cfg)
    if ctx.x.dtype != torch.float64:
        return tr
    tr.model.double()
    for name in ("teacher", "scorer", "selector"):
        if getattr(tr, name, None) is not None:
            getattr(tr, name).double()
    if getattr(tr, "params", None) is not None:  # methods that keep a parameter list (bads, multidds)
        tr.params = list(tr.model.parameters())
    return tr


def assert_only_training_rows_seen(tr, batch: Batch) -> None:
    """One step of `tr` on `batch`; its running statistics must be those of the batch alone (train mode, once)."""
    alone = copy.deepcopy(tr.model).train()
    with torch.no_grad():
        alone(batch.x)
    tr.step(batch)
    got, want = running(tr.model), running(alone)
    assert len(want) == 6 and all(int(b) == 1 for n, b in want.items() if n.endswith("num_batches_tracked"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def full_batch(ctx, step=1) -> Batch:
    idx = torch.arange(ctx.n)
    return Batch(step=step, idx=idx, x=ctx.x[idx], y=ctx.y[idx],
                 source=None if ctx.source is None else ctx.source[idx])


# ---------------------------------------------------------------- one step per method


def test_dds_step_leaves_dev_rows_out_of_batchnorm():
    from valuekit.methods import dds

    ctx = make_ctx("dds")
    tr = trainer(dds, ctx, dds.Config(update_every=1, scorer_warmup=0, dev_batch_size=0))
    batch = full_batch(ctx)
    assert_only_training_rows_seen(tr, batch)


@pytest.mark.parametrize("variant,meta_grad,unroll", [("lrdi", "autograd", 2), ("lrdi", "fused", 1),
                                                      ("mwnet", "autograd", 1), ("mwnet", "fused", 1),
                                                      ("l2rw", "autograd", 2), ("l2rw", "fused", 1)])
def test_lrdi_l2rw_mwnet_step_leaves_dev_and_virtual_rows_out_of_batchnorm(variant, meta_grad, unroll):
    from valuekit.methods import lrdi

    ctx = make_ctx(variant)
    tr = trainer(lrdi, ctx, lrdi.Config(variant=variant, meta_grad=meta_grad, unroll=unroll, teacher_hidden=3,
                                        label_dim=2))
    assert_only_training_rows_seen(tr, full_batch(ctx))


@pytest.mark.parametrize("meta_grad", ["fused", "autograd"])
@pytest.mark.parametrize("selector_input", ["features", "embedding"])
def test_hostcp_step_leaves_dev_and_look_ahead_rows_out_of_batchnorm(meta_grad, selector_input):
    from valuekit.methods import hostcp

    ctx = make_ctx("hostcp")
    tr = trainer(hostcp, ctx, hostcp.Config(meta_grad=meta_grad, selector_input=selector_input, update_every=1))
    assert_only_training_rows_seen(tr, full_batch(ctx))


def test_bads_step_leaves_dev_rows_out_of_batchnorm():
    from valuekit.methods import bads

    ctx = make_ctx("bads", dtype=torch.float32)  # BADS keeps its weight variables in float32
    tr = trainer(bads, ctx, bads.Config(dev_every=1))
    assert not tr.joint_forward  # BatchNorm: training and dev rows never share a forward
    assert_only_training_rows_seen(tr, full_batch(ctx))


@pytest.mark.parametrize("reward_from", ["probe", "train"])
def test_multidds_step_and_probes_leave_batchnorm_to_the_training_rows(reward_from):
    from valuekit.methods import multidds

    ctx = make_ctx("multidds", sources=2)
    tr = trainer(multidds, ctx, multidds.Config(reward_from=reward_from, update_every=1, probe_size=4))
    assert_only_training_rows_seen(tr, full_batch(ctx))


# ---------------------------------------------------------------- which statistics the meta-gradient needs


def _bn_eval(*modules):
    """Option (a): eval-mode (running) statistics for the guarded forwards."""
    return eval_mode(*[m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])


OPTIONS = {"train-mode": lambda *m: contextlib.nullcontext(),  # what the methods did: buffers updated
           "eval-stats": _bn_eval, "batch-stats": no_running_stats_update}


def _with_option(monkeypatch, module, option, run):
    monkeypatch.setattr(module, "no_running_stats_update", OPTIONS[option])
    try:
        return run()
    finally:
        monkeypatch.undo()


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_dds_reward_with_batch_statistics_equals_the_train_mode_reward(monkeypatch):
    """The reward r_i = grad l_i . d (Wang et al. Alg. 1 line 11) with d the dev gradient: under the guard it is
    bit for bit the train-mode one (a fresh trainer per option = buffers restored); eval-mode statistics move it."""
    from valuekit.methods import dds

    def run():
        ctx = make_ctx("dds")
        tr = trainer(dds, ctx, dds.Config(update_every=1, scorer_warmup=0, dev_batch_size=0))
        return tr.step(full_batch(ctx)).reward

    got = {opt: _with_option(monkeypatch, dds, opt, run) for opt in OPTIONS}
    assert torch.equal(got["batch-stats"], got["train-mode"])
    assert _gap(got["eval-stats"], got["train-mode"]) > 0.05


@pytest.mark.parametrize("variant,meta_grad,unroll", [("lrdi", "autograd", 2), ("l2rw", "autograd", 1),
                                                      ("mwnet", "fused", 1)])
def test_lrdi_meta_gradient_with_batch_statistics_equals_the_train_mode_one(monkeypatch, variant, meta_grad, unroll):
    from valuekit.methods import lrdi

    def run():
        ctx = make_ctx(variant)
        tr = trainer(lrdi, ctx, lrdi.Config(variant=variant, meta_grad=meta_grad, unroll=unroll, teacher_hidden=3,
                                            label_dim=2, virtual_lr=0.4))
        g = tr.meta_gradient(ctx.x, ctx.y, ctx.dev_x, ctx.dev_y, progress=0.3)["grads"]
        return g if variant == "l2rw" else torch.cat([t.reshape(-1) for t in g])

    got = {opt: _with_option(monkeypatch, lrdi, opt, run) for opt in OPTIONS}
    assert got["train-mode"].abs().max() > 1e-4
    assert torch.equal(got["batch-stats"], got["train-mode"])
    assert _gap(got["eval-stats"], got["train-mode"]) > 0.05


# ---------------------------------------------------------------- the helpers themselves


def test_no_running_stats_update_keeps_forward_gradients_and_buffer_objects():
    torch.manual_seed(0)
    model = bn_mlp(3, (4,)).double().train()
    x = torch.randn(8, 4, dtype=torch.float64)
    ref = copy.deepcopy(model)
    objects = {n: b for n, b in model.named_buffers()}
    before = running(model)
    with no_running_stats_update(model):
        out = model(x)
        inside = running(model)
    out.square().sum().backward()
    want = ref(x)
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
    assert any(not torch.equal(inside[n], before[n]) for n in before)  # the copies took the update ...
    after = running(model)
    assert all(torch.equal(after[n], before[n]) for n in before)  # ... the module's own buffers did not
    assert all(b is objects[n] for n, b in model.named_buffers())  # the same tensors (optimisers, state_dict)


def test_eval_mode_restores_each_submodule_mode_as_found():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)))
    model.train()
    model[2][0].eval()  # a frozen BatchNorm inside a training model
    with eval_mode(model) as ctx:
        assert not any(m.training for m in model.modules()) and torch.is_grad_enabled()
    assert ctx is not None
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    with eval_mode(model, None, no_grad=True):
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled() and [m.training for m in model.modules()] == [True, True, True, True, False, True]
    with pytest.raises(RuntimeError):
        with eval_mode(model[2]):
            raise RuntimeError("boom")
    assert model[2].training and not model[2][0].training
    assert api.eval_mode is eval_mode  # one mechanism, re-exported for methods
