"""Numerical tests for valuekit.ops.gradients (per-example gradient · vector dots).

All comparisons run in float64 on tiny models built here.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from valuekit.bench.layer import time_dot_methods
from valuekit.ops.gradients import (
    DOT_METHODS,
    flatten,
    mean_gradient,
    per_example_dots,
    per_example_dots_loop,
    trainable_names,
)

DT = torch.float64
RTOL, ATOL = 1e-9, 1e-10  # exact / ghost vs the explicit loop
# Taylor: forward difference with eps=1e-4 has O(eps * curvature) error; we require
# max |taylor - exact| < 1e-2 * max |exact| (max-norm relative error < 1 %).
TAYLOR_EPS, TAYLOR_REL = 1e-4, 1e-2


# ---------------------------------------------------------------------------
# tiny models (built here; valuekit.models.builtin is not imported)
# ---------------------------------------------------------------------------
class Seq3D(nn.Module):
    """Linear on (B, T, D) inputs, mean over T, then a 2-D Linear head."""

    def __init__(self, d=5, h=6, c=3):
        super().__init__()
        self.proj = nn.Linear(d, h)
        self.head = nn.Linear(h, c)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(1))


class Tied(nn.Module):
    """One Linear applied twice plus a second Linear tied to its weight."""

    def __init__(self, d=4):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


def linear_model():
    return nn.Linear(5, 3)


def mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def cnn_variants():
    # stride / dilation / groups / 'same' and reflect padding, bias-free conv
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding="same", padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2), nn.Tanh(),
        nn.Conv2d(4, 2, (1, 2), bias=False), nn.Flatten(), nn.Linear(2 * 3 * 2, 3),
    )


def seq3d():
    return Seq3D()


def data(kind, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = {"flat": (b, 5), "img": (b, 1, 6, 6), "seq": (b, 4, 5), "tied": (b, 4)}[kind]
    x = torch.randn(*shape, generator=g, dtype=DT)
    y = torch.randint(0, 4 if kind == "tied" else 3, (b,), generator=g)
    return x, y


MODELS = {
    "linear": (linear_model, "flat"),
    "mlp": (mlp, "flat"),
    "cnn": (cnn, "img"),
    "cnn_variants": (cnn_variants, "img"),
    "seq3d": (seq3d, "seq"),
    "tied": (Tied, "tied"),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    factory, kind = MODELS[name]
    model = factory().to(DT)
    x, y = data(kind, seed=seed)
    return model, x, y


def rand_v(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype)
        for n, p in model.named_parameters() if p.requires_grad
    }


# ---------------------------------------------------------------------------
# exact and ghost against the loop
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["exact", "ghost"])
def test_matches_loop(name, method):
    model, x, y = build(name)
    v = rand_v(model)
    ref = per_example_dots_loop(model, x, y, v)
    got = per_example_dots(model, x, y, v, method=method)
    assert got.shape == (x.shape[0],) and got.dtype == DT
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


def test_loop_matches_explicit_per_example_gradients():
    # independent check of the reference itself: flatten full per-example grads
    model, x, y = build("mlp")
    v = rand_v(model)
    names = trainable_names(model)
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(flatten(torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])))
    expected = torch.stack(rows) @ flatten(v)
    torch.testing.assert_close(per_example_dots_loop(model, x, y, v), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq3d"])
def test_mean_of_dots_is_mean_gradient_dot(name):
    model, x, y = build(name)
    v = rand_v(model)
    g = mean_gradient(model, x, y)
    assert list(g) == trainable_names(model)
    expected = (flatten(g) * flatten(v)).sum()
    for method in ("exact", "ghost"):
        torch.testing.assert_close(per_example_dots(model, x, y, v, method=method).mean(), expected,
                                   rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# taylor
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("eps", [1e-4, 1e-3])
def test_taylor_close_to_exact(name, eps):
    model, x, y = build(name)
    v = rand_v(model)
    exact = per_example_dots(model, x, y, v, method="exact")
    tay = per_example_dots(model, x, y, v, method="taylor", eps=eps)
    assert (tay - exact).abs().max() < TAYLOR_REL * exact.abs().max()


def test_taylor_error_is_first_order():
    # forward difference: error ~ eps, so shrinking eps 10x shrinks the error ~10x
    model, x, y = build("mlp")
    v = rand_v(model)
    exact = per_example_dots(model, x, y, v)
    e3 = (per_example_dots(model, x, y, v, method="taylor", eps=1e-3) - exact).abs().max()
    e4 = (per_example_dots(model, x, y, v, method="taylor", eps=1e-4) - exact).abs().max()
    assert 5 < e3 / e4 < 20


def test_taylor_uses_normalised_direction():
    # scaling v scales the result linearly (eps is applied along v/||v||)
    model, x, y = build("mlp")
    v = rand_v(model)
    r1 = per_example_dots(model, x, y, v, method="taylor", eps=1e-4)
    r2 = per_example_dots(model, x, y, {n: 1e3 * t for n, t in v.items()}, method="taylor", eps=1e-4)
    torch.testing.assert_close(r2, 1e3 * r1, rtol=1e-8, atol=0)


def test_zero_v_gives_zeros():
    model, x, y = build("cnn")
    v = {n: torch.zeros_like(t) for n, t in rand_v(model).items()}
    for method in DOT_METHODS:
        r = per_example_dots(model, x, y, v, method=method)
        assert torch.equal(r, torch.zeros(x.shape[0], dtype=DT)), method


def test_taylor_dropout_model_is_deterministic_and_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT)
    x, y = data("flat", b=8)
    v = rand_v(model)
    model.train()
    r1 = per_example_dots(model, x, y, v, method="taylor")
    r2 = per_example_dots(model, x, y, v, method="taylor")
    assert model.training and model[2].training
    model.eval()
    r_eval = per_example_dots(model, x, y, v, method="taylor")
    assert not model.training and not model[2].training
    assert torch.equal(r1, r2)
    torch.testing.assert_close(r1, r_eval, rtol=0, atol=0)
    # and it approximates the exact eval-mode dots
    exact = per_example_dots(model, x, y, v, method="exact")
    assert (r1 - exact).abs().max() < 1e-2 * exact.abs().max()


# ---------------------------------------------------------------------------
# API details
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", DOT_METHODS)
def test_v_dict_or_list(method):
    model, x, y = build("cnn")
    v = rand_v(model)
    a = per_example_dots(model, x, y, v, method=method)
    b = per_example_dots(model, x, y, list(v.values()), method=method)
    c = per_example_dots(model, x, y, dict(reversed(list(v.items()))), method=method)  # key order irrelevant
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", DOT_METHODS)
def test_explicit_params_are_used(method):
    model, x, y = build("mlp")
    v = rand_v(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(7)
    params = {n: p.detach() + 0.5 * torch.randn(p.shape, generator=g, dtype=DT) for n, p in model.named_parameters()}
    got = per_example_dots(model, x, y, v, method=method, params=params, eps=TAYLOR_EPS)
    ref = per_example_dots_loop(model, x, y, v, params=params)
    # the loop with params equals the loop on a model that really holds those params
    shifted = build("mlp")[0]
    shifted.load_state_dict(params)
    torch.testing.assert_close(ref, per_example_dots_loop(shifted, x, y, v), rtol=RTOL, atol=ATOL)
    own = per_example_dots_loop(model, x, y, v)
    assert (ref - own).abs().max() > 1e-3  # the two parameter sets really differ
    if method == "taylor":
        assert (got - ref).abs().max() < TAYLOR_REL * ref.abs().max()
    else:
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    for n, p in model.named_parameters():  # module untouched
        assert torch.equal(p, before[n])
    # mean_gradient honours params too
    mg = mean_gradient(model, x, y, params=params)
    torch.testing.assert_close(flatten(mg), flatten(mean_gradient(shifted, x, y)), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("method", DOT_METHODS)
@pytest.mark.parametrize("train", [True, False])
def test_no_grad_fields_and_mode_unchanged(method, train):
    model, x, y = build("cnn")
    model.train(train)
    model[0].train(not train)  # mixed per-module flags must be preserved too
    flags = [m.training for m in model.modules()]
    v = rand_v(model)
    per_example_dots(model, x, y, v, method=method)
    per_example_dots_loop(model, x, y, v)
    mean_gradient(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == flags


def test_batchnorm_buffers_not_updated_and_exact_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).to(DT).train()
    x, y = data("flat")
    v = rand_v(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    r = per_example_dots(model, x, y, v)  # batch-coupled: d l_i / d theta . v through the batch statistics
    assert r.shape == (x.shape[0],)
    # exact reference: for each i, backward of l_i from one whole-batch forward (train mode) on a copy
    import copy

    ref = []
    for i in range(x.shape[0]):
        m = copy.deepcopy(model)
        loss_i = F.cross_entropy(m(x), y, reduction="none")[i]
        names = [n for n, p in m.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss_i, [dict(m.named_parameters())[n] for n in names])
        ref.append(sum((g * v[n]).sum() for g, n in zip(grads, names)))
    torch.testing.assert_close(r, torch.stack(ref), rtol=RTOL, atol=ATOL)
    # and it is not the batch-of-one loop (which would ignore the coupling)
    assert (r - per_example_dots_loop(copy.deepcopy(model).eval(), x, y, v)).abs().max() > 1e-6
    per_example_dots(model, x, y, v, method="taylor")
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    model.eval()  # eval-mode batch-norm: examples independent, exact == loop
    torch.testing.assert_close(per_example_dots(model, x, y, v), per_example_dots_loop(model, x, y, v),
                               rtol=RTOL, atol=ATOL)


def test_frozen_parameters_are_excluded():
    model, x, y = build("mlp")
    model[0].weight.requires_grad_(False)
    v = rand_v(model)
    assert "0.weight" not in v
    ref = per_example_dots_loop(model, x, y, v)
    for method in ("exact", "ghost"):
        torch.testing.assert_close(per_example_dots(model, x, y, v, method=method), ref, rtol=RTOL, atol=ATOL)


def test_custom_loss_fn():
    model, x, _ = build("mlp")
    target = torch.randn(x.shape[0], 3, dtype=DT)

    def mse(out, t):
        return ((out - t) ** 2).sum(-1)

    v = rand_v(model)
    ref = per_example_dots_loop(model, x, target, v, loss_fn=mse)
    for method in ("exact", "ghost"):
        got = per_example_dots(model, x, target, v, method=method, loss_fn=mse)
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "module, typename",
    [(nn.BatchNorm1d(4), "BatchNorm1d"), (nn.LayerNorm(4), "LayerNorm")],
)
def test_ghost_unsupported_layer_raises(module, typename):
    model = nn.Sequential(nn.Linear(5, 4), module, nn.Linear(4, 3)).to(DT).eval()
    x, y = data("flat")
    with pytest.raises(NotImplementedError, match=typename):
        per_example_dots(model, x, y, rand_v(model), method="ghost")
    # exact still works on it
    torch.testing.assert_close(per_example_dots(model, x, y, rand_v(model)),
                               per_example_dots_loop(model, x, y, rand_v(model)), rtol=RTOL, atol=ATOL)


def test_ghost_embedding_raises():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3)).to(DT)
    x = torch.randint(0, 10, (3, 2))
    y = torch.tensor([0, 1, 2])
    with pytest.raises(NotImplementedError, match="Embedding"):
        per_example_dots(model, x, y, rand_v(model), method="ghost")


def test_ghost_train_mode_batchnorm_without_params_raises():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 3)).to(DT).train()
    x, y = data("flat")
    with pytest.raises(NotImplementedError, match="BatchNorm1d"):
        per_example_dots(model, x, y, rand_v(model), method="ghost")


def test_bad_arguments():
    model, x, y = build("mlp")
    v = rand_v(model)
    with pytest.raises(ValueError, match="method"):
        per_example_dots(model, x, y, v, method="nope")
    with pytest.raises(ValueError, match="missing"):
        per_example_dots(model, x, y, {k: t for k, t in v.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="shape"):
        per_example_dots(model, x, y, {**v, "0.bias": torch.zeros(3, dtype=DT)})
    with pytest.raises(ValueError, match="per-example"):
        per_example_dots(model, x, y, v, loss_fn=lambda o, t: F.cross_entropy(o, t))


def test_float32_runs():
    torch.manual_seed(0)
    model = mlp()
    x, y = data("flat")
    x = x.float()
    v = {n: t.float() for n, t in rand_v(model).items()}
    ref = per_example_dots_loop(model, x, y, v)
    for method in DOT_METHODS:
        got = per_example_dots(model, x, y, v, method=method, eps=1e-2)
        assert got.dtype == torch.float32
        tol = 5e-2 if method == "taylor" else 1e-4
        assert (got - ref).abs().max() <= tol * ref.abs().max(), method


def test_time_dot_methods_smoke():
    model, x, y = build("mlp")
    t = time_dot_methods(model, x, y, reps=2)
    assert set(t) == {*DOT_METHODS, "forward_backward"}
    assert all(math.isfinite(s) and s > 0 for s in t.values())
    assert all(p.grad is None for p in model.parameters())
    bn = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT)
    t = time_dot_methods(bn, x, y, reps=1)
    assert math.isnan(t["ghost"]) and math.isfinite(t["exact"])
