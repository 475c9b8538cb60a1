"""multidds (DDS Algorithm 2): synthetic copy-vs-noise sources, REINFORCE by hand, per-source gradients, resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from valuekit.datasets import load_table
from valuekit.errors import InputError
from valuekit.trainers import multidds
from valuekit.trainers.base import Batch, TrainConfig, TrainContext, train

torch.set_num_threads(1)


def make_tables(seed=0, n=300, C=4, D=8, dev_source=False):
    """Three sources over the same classes: `copy` of the target distribution, `noise` (labels drawn
    uniformly, i.e. pure label noise) and `shift` (features shifted by 3)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 2, (C, D))

    def block(src, n, noise=False, shift=0.0):
        y = rng.integers(0, C, n)
        x = mu[y] + rng.normal(0, 1, (n, D)) + shift
        if noise:
            y = rng.integers(0, C, n)
        cols = {f"x{j}": x[:, j].astype(np.float32) for j in range(D)}
        return pd.DataFrame({"label": y.astype(str), "source": src, **cols})

    tr = pd.concat([block("copy", n), block("noise", n, noise=True), block("shift", n, shift=3.0)], ignore_index=True)
    tr.insert(0, "id", np.arange(len(tr)))
    dev = block("copy", 80)
    if not dev_source:
        dev = dev.drop(columns="source")
    dev.insert(0, "id", np.arange(len(dev)))
    train_ds = load_table(tr)
    return tr, train_ds, load_table(dev, like=train_ds, name="dev")


def cfg(steps=150, **kw):
    return TrainConfig(method="multidds", steps=steps, batch_size=32, eval_every=50, progress=False, hidden=32, **kw)


@pytest.mark.parametrize("sampling", ["categorical", "bernoulli"])
def test_copy_source_rises_above_noise_source(tmp_path, sampling):
    tr, train_ds, dev_ds = make_tables()
    run = train(train_ds, dev_ds, out=tmp_path / "r", config=cfg(),
                method_config={"update_every": 64, "sampling": sampling})
    s = run.sources()
    prob = s.pivot(index="step", columns="source", values="prob")
    first, last = prob.iloc[0], prob.iloc[-1]
    assert last["copy"] > first["copy"] + 0.1  # the copy's probability rises ...
    assert last["copy"] > last["noise"] + 0.3  # ... and ends well above the noise source's
    assert last["noise"] < first["noise"]
    # usage (rows drawn) in the second half of training follows the probabilities
    late = s[s.step > 75].groupby("source")["count"].sum()
    assert late["copy"] > 2 * late["noise"]
    # the per-step log agrees with the sources/ counts
    steps = run.steps(["step", "source"]).to_pandas()
    assert steps.groupby("source").size().sum() == s["count"].sum() == 150 * 32
    # values: log p(S | y) ranks copy rows above noise rows
    v = run.values().merge(pd.DataFrame({"example_id": tr.id, "source": tr.source}))
    means = v.groupby("source")["value"].mean()
    assert means["copy"] > means["noise"]
    assert np.isclose(v["weight"].mean(), 1.0)


def test_reinforce_loss_gradient_by_hand():
    psi = torch.tensor([[0.2, -0.5, 1.0], [0.0, 0.3, -0.1]], dtype=torch.float64, requires_grad=True)
    avail = torch.tensor([[True, True, True], [True, False, True]])
    r = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    multidds.reinforce_loss(psi, avail, r, "categorical").backward()
    # d/dpsi_j sum_i r_i log p_i = r_j - p_j sum_i r_i (available i, j), averaged over the 2 targets
    p0 = np.exp([0.2, -0.5, 1.0]) / np.exp([0.2, -0.5, 1.0]).sum()
    p1 = np.exp([0.0, -0.1]) / np.exp([0.0, -0.1]).sum()
    g0 = np.array([0.5, -0.2, 0.1]) - p0 * 0.4
    g1 = np.array([0.5, 0.1]) - p1 * 0.6
    want = -np.array([g0, [g1[0], 0.0, g1[1]]]) / 2
    np.testing.assert_allclose(psi.grad.numpy(), want, atol=1e-12)

    psi.grad = None
    multidds.reinforce_loss(psi, avail, r, "bernoulli").backward()
    sig = 1 / (1 + np.exp(-psi.detach().numpy()))
    want = -(np.array([0.5, -0.2, 0.1]) * (1 - sig) * avail.numpy()) / 2
    np.testing.assert_allclose(psi.grad.numpy(), want, atol=1e-12)


def _context(train_ds, dev_ds, seed=0):
    config = cfg(seed=seed)
    codes = {s: i for i, s in enumerate(train_ds.sources)}
    from valuekit.models import feature_stats

    mean, std = feature_stats(train_ds.x)
    return TrainContext(
        config=config, device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed), x=train_ds.x,
        y=train_ds.y, ids=train_ds.ids, num_classes=train_ds.num_classes, classes=train_ds.classes,
        dev_x=dev_ds.x, dev_y=dev_ds.y, source=torch.tensor([codes[s] for s in train_ds.source]),
        sources=train_ds.sources, mean=mean, std=std,
        dev_source=None if dev_ds.source is None else torch.tensor([codes.get(s, -1) for s in dev_ds.source]),
    )


def test_scorer_update_equals_hand_computation():
    _, train_ds, dev_ds = make_tables(n=40)
    ctx = _context(train_ds, dev_ds)
    t = multidds.Trainer(ctx, multidds.Config(scorer_optimizer="sgd", scorer_lr=0.7, scorer_batch=5,
                                               dev_batch_size=10_000))
    t.g.copy_(torch.randn(t.g.shape, generator=torch.Generator().manual_seed(1)))
    psi0 = t.psi.detach().clone()
    gen = torch.Generator()
    gen.set_state(ctx.generator.get_state())
    t.update_scorer()

    # by hand: dev gradient of the mean dev loss, cosine rewards, one ascent step on the sampled targets
    model = t.model
    loss = torch.nn.functional.cross_entropy(model(ctx.dev_x), ctx.dev_y)
    gdev = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    r = torch.stack([torch.dot(t.g[s], gdev) / (t.g[s].norm() * gdev.norm()) for s in range(3)]).double()
    np.testing.assert_allclose(t.rewards.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)
    keys = torch.multinomial(t.key_prob, 5, replacement=True, generator=gen)
    want = psi0.double().clone()
    for k in keys.tolist():
        av = t.avail[k]
        p = torch.softmax(psi0[k].double().masked_fill(~av, float("-inf")), 0)
        want[k] += 0.7 / 5 * torch.where(av, r - p * r[av].sum(), torch.zeros_like(r))
    np.testing.assert_allclose(t.psi.detach().double().numpy(), want.numpy(), atol=1e-6)


@pytest.mark.parametrize("method", ["batched", "loop", "split"])
def test_source_gradient_emas_match_per_source_reference(method):
    _, train_ds, dev_ds = make_tables(n=40)
    ctx = _context(train_ds, dev_ds)
    t = multidds.Trainer(ctx, multidds.Config(grad_method=method, a1=0.5, a2=2.0, update_every=10_000))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    idx = t.sampler.next(24)
    src = ctx.source[idx]
    batch = Batch(step=2, idx=idx, x=ctx.x[idx], y=ctx.y[idx], source=src)
    t.g.fill_(1.0)
    t.step(batch)
    # reference: one plain backward per source on that source's mean loss, at the pre-step weights
    ref = multidds.Trainer(ctx, multidds.Config())
    ref.model.load_state_dict(before)
    params = list(ref.model.parameters())
    for s in range(3):
        rows = src == s
        if not rows.any():
            assert torch.all(t.g[s] == 1.0)  # untouched
            continue
        loss = torch.nn.functional.cross_entropy(ref.model(batch.x[rows]), batch.y[rows])
        g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, params)])
        torch.testing.assert_close(t.g[s], 0.5 * 1.0 + 2.0 * g, rtol=1e-4, atol=1e-6)


def test_sampler_draws_only_available_cells_with_scorer_probabilities():
    _, train_ds, dev_ds = make_tables(n=60, dev_source=True)
    ctx = _context(train_ds, dev_ds)
    t = multidds.Trainer(ctx, multidds.Config(init="target", target_mass=0.8))
    assert t.target == train_ds.sources.index("copy")
    idx = t.sampler.next(20_000)
    src = ctx.source[idx]
    share = torch.bincount(src, minlength=3).double() / len(idx)
    # every class has all three sources here, so p(copy | y) = 0.8 for every target
    assert abs(share[t.target].item() - 0.8) < 0.02
    np.testing.assert_allclose(t.mean_probs()[t.target].item(), 0.8, atol=1e-6)


def test_resume_equals_uninterrupted(tmp_path):
    _, train_ds, dev_ds = make_tables(n=60)
    mc = {"update_every": 64, "init": "tcs"}
    full = train(train_ds, dev_ds, out=tmp_path / "full", config=cfg(steps=40, checkpoint_every=20),
                 method_config=mc)
    train(train_ds, dev_ds, out=tmp_path / "part", config=cfg(steps=20, checkpoint_every=20), method_config=mc)
    resumed = train(train_ds, dev_ds, out=tmp_path / "part", config=cfg(steps=40, checkpoint_every=20),
                    method_config=mc, resume=True)
    pd.testing.assert_frame_equal(full.values(), resumed.values())
    pd.testing.assert_frame_equal(full.sources().reset_index(drop=True), resumed.sources().reset_index(drop=True))
    a = full.steps(["step", "example_id", "loss"]).to_pandas()
    b = resumed.steps(["step", "example_id", "loss"]).to_pandas()
    pd.testing.assert_frame_equal(a.sort_values(["step", "example_id"]).reset_index(drop=True),
                                  b.sort_values(["step", "example_id"]).reset_index(drop=True))


def test_bad_settings_and_tables(tmp_path):
    with pytest.raises(InputError, match="sampling"):
        multidds.Config(sampling="gumbel").validate()
    with pytest.raises(InputError, match="prior"):
        multidds.Config(prior="es=abc").validate()
    tr, train_ds, dev_ds = make_tables(n=20)
    no_src = load_table(tr.drop(columns="source"))
    with pytest.raises(InputError, match="source"):
        train(no_src, load_table(tr.drop(columns="source"), like=no_src, name="dev"), out=tmp_path / "x",
              config=cfg(steps=2))
    with pytest.raises(InputError, match="init=target"):
        train(train_ds, dev_ds, out=tmp_path / "y", config=cfg(steps=2), method_config={"init": "target"})


def test_tcs_prior_from_features_and_text():
    _, train_ds, dev_ds = make_tables(n=60)
    t = multidds.Trainer(_context(train_ds, dev_ds), multidds.Config(init="tcs"))
    sim = dict(zip(train_ds.sources, t.similarity()))
    assert sim["copy"] > sim["shift"] and sim["copy"] > sim["noise"]
    assert t.mean_probs()[train_ds.sources.index("copy")] > 0.5
    s = multidds.char_ngram_similarity({"a": ["la casa"], "b": ["xyz"]}, ["la casa"], n=3)
    assert s["a"] == 1.0 and s["b"] == 0.0
