"""Tests for valuekit.methods.bads (Bayesian data point selection by SGLD).

The drift is checked in float64 against autograd of the log posterior written out here, in the
form the module's docstring states; the rest checks the sampler's bookkeeping and, on a small
synthetic table with flipped labels, that the posterior puts less weight on the flipped rows.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from valuekit.config import TrainConfig
from valuekit.data.tables import load_table
from valuekit.errors import InputError
from valuekit.methods import bads
from valuekit.training.context import Batch, TrainContext
from valuekit.training.loop import run_training

DT = torch.float64


# ---------------------------------------------------------------- tiny problems


def _context(n=12, m=6, d=3, c=3, model="mlp", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    dev_x = torch.randn(m, d, generator=g, dtype=dtype)
    dev_y = torch.randint(0, c, (m,), generator=g)
    cfg = TrainConfig(model=model, hidden=5, seed=seed)
    return TrainContext(
        config=cfg, device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed), x=x, y=y,
        ids=np.arange(n), num_classes=c, classes=[str(k) for k in range(c)], dev_x=dev_x, dev_y=dev_y,
        mean=torch.zeros(d, dtype=dtype), std=torch.ones(d, dtype=dtype),
    )


def _float64_trainer(**overrides):
    """Trainer on a tiny float64 problem with weights spread out (not all at init_weight)."""
    ctx = _context(dtype=DT)
    cfg = bads.Config(
        **{"dev_batch_size": 100, "dev_every": 1, "prior_precision": 0.3, "rho_w": 2.0, "beta": 0.4, **overrides}
    )
    tr = bads.Trainer(ctx, cfg)
    tr.model.double()
    g = torch.Generator().manual_seed(5)
    tr.u = torch.randn(ctx.n, generator=g, dtype=DT)
    tr.wsum = torch.sigmoid(tr.u).sum()
    tr.samples = tr.samples.double()
    return ctx, cfg, tr


def _log_post(model, theta, u, ctx, cfg, rows, dev_rows, meta_scale=1.0):
    """log pi as stated in the bads docstring, with the train/meta sums estimated on `rows`/`dev_rows`
    (scaled by N/B and meta_scale * M/B'), plus T times the log-Jacobian of w = sigmoid(u) over all N rows: the
    function whose u-gradient is the drift of a chain that samples pi^(1/T) in w (bads docstring)."""
    n, m = ctx.n, len(ctx.dev_y)
    w = torch.sigmoid(u)
    names = [k for k, _ in model.named_parameters()]
    params = dict(zip(names, theta))
    def loss(x, y):
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y, reduction="none")

    lt = loss(ctx.x[rows], ctx.y[rows])
    lm = loss(ctx.dev_x[dev_rows], ctx.dev_y[dev_rows])
    log_prior_theta = -0.5 * cfg.prior_precision * sum((t * t).sum() for t in theta)
    log_prior_w = -(cfg.rho_w * n / 2) * (w.mean() - cfg.beta) ** 2
    train_term = -cfg.rho_theta * (n / len(rows)) * (w[rows] * lt).sum()
    meta_term = -meta_scale * (m / len(dev_rows)) * lm.sum()
    jacobian = cfg.temperature * torch.log(w * (1 - w)).sum()
    return log_prior_theta + log_prior_w + train_term + meta_term + jacobian


def _grads(tr, ctx, cfg, rows, dev_rows, meta_scale=1.0):
    theta = [p.detach().clone().requires_grad_(True) for p in tr.model.parameters()]
    u = tr.u.detach().clone().requires_grad_(True)
    lp = _log_post(tr.model, theta, u, ctx, cfg, rows, dev_rows, meta_scale)
    g = torch.autograd.grad(lp, theta + [u])
    return g[:-1], g[-1]


def _batch(ctx, rows, step=1):
    rows = torch.as_tensor(rows)
    return Batch(step=step, idx=rows, x=ctx.x[rows], y=ctx.y[rows])


# ---------------------------------------------------------------- drift = gradient of the stated log posterior


def test_theta_drift_is_gradient_of_minibatch_log_posterior():
    ctx, cfg, tr = _float64_trainer()
    rows, dev_rows = torch.tensor([1, 4, 7, 9]), torch.tensor([0, 2, 5])
    g_theta, _, w, _, _, _ = tr.drift(_batch(ctx, rows), ctx.dev_x[dev_rows], ctx.dev_y[dev_rows])
    ref_theta, _ = _grads(tr, ctx, cfg, rows, dev_rows)
    assert len(g_theta) == len(ref_theta)
    for a, b in zip(g_theta, ref_theta):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.allclose(w, torch.sigmoid(tr.u[rows]))


def test_weight_drift_is_exact_partial_of_full_log_posterior():
    """Each batch coordinate u_i moves along d log pi / d u_i of the full-data log posterior
    (w_i enters only through its own term, so this needs no N/B scaling)."""
    ctx, cfg, tr = _float64_trainer()
    rows = torch.tensor([0, 3, 5, 11])
    _, g_u, _, losses, dw, _ = tr.drift(_batch(ctx, rows), ctx.dev_x, ctx.dev_y)
    _, ref_u_full = _grads(tr, ctx, cfg, torch.arange(ctx.n), torch.arange(len(ctx.dev_y)))
    torch.testing.assert_close(g_u, ref_u_full[rows], rtol=1e-10, atol=1e-10)
    # the logged reward is d log pi / d w_i = -rho_theta l_i - rho_w (mean w - beta), by hand
    wbar = torch.sigmoid(tr.u).mean()
    torch.testing.assert_close(dw, -cfg.rho_theta * losses - cfg.rho_w * (wbar - cfg.beta))


@pytest.mark.parametrize("inputs", ["loss", "features"])
def test_weight_net_drift_is_chain_rule_of_the_batch_estimate(inputs):
    """weight_net: d/dphi of (N/B) sum_B [-rho_theta w_i l_i - rho_w (wbar - beta) w_i] - prior_precision/2 |phi|^2,
    with wbar the window estimate (held fixed), by autograd through the net."""
    ctx = _context(dtype=DT)
    cfg = bads.Config(weight_net=True, weight_inputs=inputs, prior_precision=0.3, rho_w=2.0, beta=0.4, s_avg=3,
                      dev_batch_size=100, dev_every=1)
    tr = bads.Trainer(ctx, cfg)
    tr.model.double()
    tr.weight_net.double()
    tr.window = tr.window.double()
    tr.window[1] = 0.7  # a stale batch mean from an earlier step
    rows = torch.tensor([1, 2, 8, 10])
    _, g_phi, _, losses, dw, _ = tr.drift(_batch(ctx, rows), ctx.dev_x, ctx.dev_y)
    phi = list(tr.weight_net.parameters())
    lt = F.cross_entropy(tr.model(ctx.x[rows]), ctx.y[rows], reduction="none").detach()
    w_ref = tr.weight_net(ctx.x[rows], ctx.y[rows], lt)
    wbar = (0.7 + w_ref.detach().mean()) / 2  # slot 0 = this batch, slot 1 = 0.7, slot 2 empty
    obj = (ctx.n / len(rows)) * (-cfg.rho_theta * w_ref * lt - cfg.rho_w * (wbar - cfg.beta) * w_ref).sum()
    obj = obj - 0.5 * cfg.prior_precision * sum((p * p).sum() for p in phi)
    ref = torch.autograd.grad(obj, phi)
    for a, b in zip(g_phi, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dw, -cfg.rho_theta * losses - cfg.rho_w * (wbar - cfg.beta))


# ---------------------------------------------------------------- the weight chain samples pi^(1/T)


def _run_weight_chains(reward, *, chains, steps, lr, temperature, seed=0):
    """Independent chains of the trainer's weight step (bads.langevin_logit_step), each from u = logit(0.6); reward(w)
    gives d log pi / d w at the chain's current w. Returns the final w of every chain."""
    g = torch.Generator().manual_seed(seed)
    u = torch.full((chains,), math.log(0.6 / 0.4), dtype=DT)
    for _ in range(steps):
        noise = torch.randn(chains, generator=g, dtype=DT)
        u = bads.langevin_logit_step(u, reward(torch.sigmoid(u)), lr, temperature, noise)
    return torch.sigmoid(u).numpy()


def _ks_against_density(samples, log_density):
    """Kolmogorov-Smirnov p-value of `samples` against the density exp(log_density(w)) on (0, 1), its CDF integrated
    numerically (trapezoid on 200k points)."""
    from scipy import stats

    grid = np.linspace(0, 1, 200_001)
    logd = log_density(grid)
    dens = np.exp(logd - logd.max())
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2)])
    cdf /= cdf[-1]
    return stats.kstest(samples, lambda x: np.interp(x, grid, cdf)).pvalue


@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_flat_likelihood_weight_chain_samples_uniform(temperature):
    """d log pi / d w = 0: the tempered target pi^(1/T) is Uniform(0, 1) at every T. With the log-Jacobian unscaled
    (the old drift) the chain at T = 0.1 sampled (w(1-w))^9, spread 0.11 instead of 0.29 -- p ~ 0 here."""
    from scipy import stats

    # lr T = 0.1 (the defaults lr_w = 1, T = 0.1): Langevin time per step, small enough for little step-size bias
    w = _run_weight_chains(lambda w: torch.zeros_like(w), chains=4000, steps=600, lr=0.1 / temperature,
                           temperature=temperature)
    assert stats.kstest(w, "uniform").pvalue > 0.01
    assert abs(w.std() - 1 / math.sqrt(12)) < 0.01


@pytest.mark.parametrize(("temperature", "loss"), [(1.0, 1.0), (0.1, 1.0), (0.1, 2.3)])
def test_weight_chain_matches_tempered_posterior_of_one_row(temperature, loss):
    """One row (N = 1) with a fixed loss l: log pi(w) = -rho_theta w l - (rho_w / 2)(w - beta)^2 (the docstring's
    likelihood and sparsity prior, mean(w) = w), reward by the trainer's own bads.weight_reward. The chain's samples
    match the density pi(w)^(1/T) on (0, 1) (KS against the numerically integrated CDF). The old drift (unscaled
    log-Jacobian) gave at T = 0.1 and l = 2.3 (rho_theta l = 6.9) a mean weight of ~0.13 instead of ~0.05."""
    cfg = bads.Config()
    reward = lambda w: bads.weight_reward(torch.full_like(w, loss), w, cfg.rho_theta, cfg.rho_w, cfg.beta)  # noqa: E731
    w = _run_weight_chains(reward, chains=4000, steps=1500, lr=0.1, temperature=temperature)

    def log_density(x):
        return (-cfg.rho_theta * loss * x - cfg.rho_w / 2 * (x - cfg.beta) ** 2) / temperature

    assert _ks_against_density(w, log_density) > 0.01
    grid = np.linspace(0, 1, 200_001)
    dens = np.exp(log_density(grid) - log_density(grid).max())
    mean = (grid * dens).sum() / dens.sum()
    assert abs(w.mean() - mean) < 0.01, (w.mean(), mean)


def test_weight_net_on_the_loss_is_sigmoid_of_its_mlp_by_hand():
    """weight_inputs="loss": w_i = sigmoid(W2 relu(W1 [l_i, onehot(y_i)] + b1) + b2), with l_i the row's loss under
    the current model (the same losses the drift uses); the output bias starts at logit(init_weight)."""
    ctx = _context(dtype=DT)
    tr = bads.Trainer(ctx, bads.Config(weight_net=True, init_weight=0.3, dev_batch_size=100, dev_every=1))
    tr.model.double()
    tr.weight_net.double()
    net = tr.weight_net.net
    assert net[0].in_features == 1 + 3 and net[2].bias.item() == pytest.approx(math.log(0.3 / 0.7))
    rows = torch.tensor([0, 4, 5, 9])
    _, _, w, losses, _, _ = tr.drift(_batch(ctx, rows), ctx.dev_x, ctx.dev_y)
    torch.testing.assert_close(losses, F.cross_entropy(tr.model(ctx.x[rows]), ctx.y[rows], reduction="none").detach())
    z = torch.cat([losses[:, None], F.one_hot(ctx.y[rows], 3).double()], 1)
    h = torch.relu(z @ net[0].weight.T + net[0].bias)
    torch.testing.assert_close(w, torch.sigmoid(h @ net[2].weight.T + net[2].bias).squeeze(1), rtol=1e-12, atol=1e-12)
    # the weight is a function of the loss and the class only: same class and loss, same weight, whatever x
    x2 = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(tr.weight_net(x2, ctx.y[rows], losses), w)


def test_full_batch_theta_drift_equals_full_gradient():
    ctx, cfg, tr = _float64_trainer(rho_theta=1.7)
    rows = torch.arange(ctx.n)
    g_theta, *_ = tr.drift(_batch(ctx, rows), ctx.dev_x, ctx.dev_y)
    ref_theta, _ = _grads(tr, ctx, cfg, rows, torch.arange(len(ctx.dev_y)))
    for a, b in zip(g_theta, ref_theta):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_noise_off_step_is_explicit_gradient_ascent():
    ctx, cfg, tr = _float64_trainer(temperature=0.0, lr_theta=0.07, lr_w=0.3)
    rows = torch.tensor([2, 6, 8])
    ref_theta, _ = _grads(tr, ctx, cfg, rows, torch.arange(len(ctx.dev_y)))  # dev_batch_size >= M: all dev rows
    _, ref_u = _grads(tr, ctx, cfg, torch.arange(ctx.n), torch.arange(len(ctx.dev_y)))
    theta0 = [p.detach().clone() for p in tr.model.parameters()]
    u0 = tr.u.clone()
    gen_state = ctx.generator.get_state()
    tr.step(_batch(ctx, rows))
    assert torch.equal(ctx.generator.get_state(), gen_state)  # no random draw at all with T = 0
    for p, p0, g in zip(tr.model.parameters(), theta0, ref_theta):
        torch.testing.assert_close(p.detach(), p0 + (cfg.lr_theta / ctx.n) * g, rtol=1e-12, atol=1e-12)
    expect = u0.clone()
    expect[rows] += cfg.lr_w * ref_u[rows]
    torch.testing.assert_close(tr.u, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tr.wsum, torch.sigmoid(tr.u).sum())  # running sum stays exact


def test_dev_every_k_puts_the_meta_term_times_k_on_every_kth_step_only():
    """dev_every=3 at T = 0: steps 1 and 4 ascend log pi with the meta term scaled by 3, steps 2 and 3 without it
    (so over k steps the meta term's expected drift is unchanged), and no dev batch is drawn on the others."""
    ctx, cfg, tr = _float64_trainer(dev_every=3, dev_batch_size=4, temperature=0.0, lr_theta=0.07, lr_w=0.3)
    rows = torch.tensor([2, 6, 8])
    for step, scale in ((1, 3.0), (2, 0.0), (3, 0.0), (4, 3.0)):
        twin = torch.Generator().set_state(ctx.generator.get_state())
        dev_rows = torch.randperm(len(ctx.dev_y), generator=twin)[:4]  # the rows sample_dev(4) will draw
        ref, _ = _grads(tr, ctx, cfg, rows, dev_rows, meta_scale=scale)
        theta0, before = [p.detach().clone() for p in tr.model.parameters()], ctx.generator.get_state()
        tr.step(_batch(ctx, rows, step))
        assert torch.equal(ctx.generator.get_state(), twin.get_state() if scale else before)  # T = 0: no other draw
        for p, p0, g in zip(tr.model.parameters(), theta0, ref):
            torch.testing.assert_close(p.detach(), p0 + (cfg.lr_theta / ctx.n) * g, rtol=1e-12, atol=1e-12)


def test_only_batch_weights_move_and_all_of_them_do():
    ctx = _context(n=30)
    tr = bads.Trainer(ctx, bads.Config(dev_batch_size=4))
    before = tr.u.clone()
    rows = torch.tensor([3, 17, 29, 0, 11])
    rec = tr.step(_batch(ctx, rows))
    changed = (tr.u != before).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(rows.tolist())
    assert rec.weight.shape == (5,) and rec.reward.shape == (5,) and rec.loss.shape == (5,)
    # a repeated row (batch straddling two passes) moves once
    before = tr.u.clone()
    tr.step(_batch(ctx, [4, 4, 9]))
    assert sorted((tr.u != before).nonzero().flatten().tolist()) == [4, 9]
    assert torch.allclose(tr.wsum.float(), torch.sigmoid(tr.u).sum(), atol=1e-5)


def test_noise_comes_from_the_context_generator():
    runs = []
    for seed in (0, 0, 1):
        ctx = _context(n=20)
        ctx.generator.manual_seed(seed)
        tr = bads.Trainer(ctx, bads.Config(dev_batch_size=4))
        torch.manual_seed(123 + len(runs))  # the global RNG must not matter
        tr.step(_batch(ctx, [1, 2, 3]))
        runs.append(torch.cat([tr.u] + [p.detach().flatten() for p in tr.model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_noise_every_k_adds_theta_noise_on_every_kth_step_only():
    """noise_every=2: step 1 moves theta by the drift alone (as the T=0 twin), step 2 adds noise."""
    ctx_a, ctx_b = _context(n=20), _context(n=20)
    noisy = bads.Trainer(ctx_a, bads.Config(dev_batch_size=100, noise_every=2, temperature=1.0))
    plain = bads.Trainer(ctx_b, bads.Config(dev_batch_size=100, temperature=0.0))
    flat = lambda t: torch.cat([p.detach().flatten() for p in t.model.parameters()])  # noqa: E731
    assert torch.equal(flat(noisy), flat(plain))
    for t, c in ((noisy, ctx_a), (plain, ctx_b)):
        t.step(_batch(c, [1, 2, 3]))
    assert torch.equal(flat(noisy), flat(plain))
    assert not torch.equal(noisy.u, plain.u)  # w's noise is every step
    noisy.u.copy_(plain.u)
    noisy.wsum = plain.wsum.clone()
    for t, c in ((noisy, ctx_a), (plain, ctx_b)):
        t.step(_batch(c, [4, 5, 6]))
    diff = flat(noisy) - flat(plain)
    # step 2 adds N(0, 2 * k * (lr/N) * T) per parameter
    sd = math.sqrt(2 * 2 * (noisy.cfg.lr_theta / 20) * 1.0)
    assert 0.8 * sd < diff.std().item() < 1.2 * sd


@pytest.mark.parametrize("chunk", [4096, 4])
def test_values_summarise_the_samples_of_each_row(chunk, monkeypatch):
    """burn_in 0: every visit adds the row's new w as a sample. posterior_mean = the mean of its samples (the
    current w for rows never sampled), value_std = their std with ddof 1 (NaN under two samples), samples = count.
    The quantiles are the same when taken a few rows at a time (chunk 4)."""
    import valuekit.methods.bads as bads_mod

    monkeypatch.setattr(bads_mod, "QUANTILE_ROWS", chunk)
    ctx, cfg, tr = _float64_trainer(burn_in=0)
    tr.samples = tr.samples.float()  # the reservoir's own dtype (this test does not read it)
    drawn = {i: [] for i in range(ctx.n)}
    for step, rows in enumerate([range(6), range(3), [0]], 1):
        tr.step(_batch(ctx, list(rows), step=step))
        for i in rows:
            drawn[i].append(float(torch.sigmoid(tr.u[i].double())))
    v = tr.values().columns
    current = torch.sigmoid(tr.u.double()).numpy()
    mean = [np.mean(drawn[i]) if drawn[i] else current[i] for i in range(ctx.n)]
    std = [np.std(drawn[i], ddof=1) if len(drawn[i]) > 1 else np.nan for i in range(ctx.n)]
    np.testing.assert_allclose(np.asarray(v["posterior_mean"]), mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(v["value_std"]), std, rtol=1e-4, atol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(np.asarray(v["samples"]), [3, 2, 2, 1, 1, 1] + [0] * (ctx.n - 6))
    assert np.std(drawn[0], ddof=1) > 1e-6  # the samples differ, so the ddof matters
    # ci_low / ci_high: the (1 - ci) / 2 and 1 - (1 - ci) / 2 quantiles of the row's reservoir samples
    lo, hi = (1 - cfg.ci) / 2, 1 - (1 - cfg.ci) / 2
    for i in range(ctx.n):
        want = np.quantile(drawn[i], [lo, hi]) if drawn[i] else [np.nan, np.nan]
        np.testing.assert_allclose([float(v["ci_low"][i]), float(v["ci_high"][i])], want, rtol=1e-5,
                                   equal_nan=True)


def test_per_source_values_summarise_each_sources_samples():
    """per_source, burn_in 0: one sample of every source's w_t per step; a row's value is its source's mean,
    value_std their std with ddof 1, samples the count."""
    import dataclasses

    ctx = dataclasses.replace(_context(), source=torch.arange(12) % 3, sources=["a", "b", "c"])
    tr = bads.Trainer(ctx, bads.Config(dev_batch_size=6, per_source=True, burn_in=0, temperature=1.0))
    drawn = []
    for step, rows in enumerate([range(12), range(6), range(12)], 1):
        rows = torch.tensor(list(rows))
        tr.step(Batch(step=step, idx=rows, x=ctx.x[rows], y=ctx.y[rows], source=ctx.source[rows]))
        drawn.append(torch.sigmoid(tr.task_u.double()).numpy().copy())
    drawn = np.array(drawn)  # (steps, sources)
    assert drawn.std(0, ddof=1).min() > 1e-6
    v = tr.values()
    src = ctx.source.numpy()
    np.testing.assert_allclose(np.asarray(v.value), drawn.mean(0)[src], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(v.columns["value_std"]), drawn.std(0, ddof=1)[src], rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(v.columns["samples"]), np.full(12, 3.0))
    # before burn-in ends no source has a sample: value = its current w_t, value_std NaN
    early = bads.Trainer(ctx, bads.Config(dev_batch_size=6, per_source=True, burn_in=10, temperature=1.0))
    early.step(Batch(step=1, idx=torch.arange(12), x=ctx.x, y=ctx.y, source=ctx.source))
    e = early.values()
    np.testing.assert_allclose(np.asarray(e.value), torch.sigmoid(early.task_u.double()).numpy()[src], rtol=1e-12)
    assert np.isnan(np.asarray(e.columns["value_std"])).all() and (np.asarray(e.columns["samples"]) == 0).all()
    one = bads.Trainer(ctx, bads.Config(dev_batch_size=6, per_source=True, burn_in=0, temperature=1.0))
    one.step(Batch(step=1, idx=torch.arange(12), x=ctx.x, y=ctx.y, source=ctx.source))
    o = one.values()  # one sample: its value, no spread yet (NaN, not 0)
    np.testing.assert_allclose(np.asarray(o.value), torch.sigmoid(one.task_u.double()).numpy()[src], rtol=1e-12)
    assert np.isnan(np.asarray(o.columns["value_std"])).all() and (np.asarray(o.columns["samples"]) == 1).all()


def test_config_validation():
    for bad in ({"beta": 1.0}, {"lr_w": 0.0}, {"temperature": -1.0}, {"reservoir": 0}, {"ci": 1.5}, {"burn_in": -1}):
        with pytest.raises(InputError, match=next(iter(bad))):
            bads.Config(**bad).validate()
    bads.Config().validate()


# ---------------------------------------------------------------- through the training loop


def _noisy_blobs(n=240, noise=0.25, seed=0):
    """Three well separated Gaussian blobs in 4-D; `noise` of the train labels flipped."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (3, 4))

    def table(k, start, flip):
        y = rng.integers(0, 3, k)
        x = centers[y] + rng.normal(0, 1, (k, 4))
        noisy = np.zeros(k, bool)
        if flip:
            noisy[rng.choice(k, int(round(flip * k)), replace=False)] = True
        lab = np.where(noisy, (y + rng.integers(1, 3, k)) % 3, y)
        df = pd.DataFrame(x, columns=[f"f{j}" for j in range(4)])
        df.insert(0, "id", np.arange(start, start + k))
        df.insert(1, "label", [f"c{v}" for v in lab])
        if flip:
            df["is_noisy"] = noisy
        return df

    return table(n, 0, noise), table(30, 10_000, 0.0), table(90, 20_000, 0.0)


def _train(tmp_path, name, *, steps, seed=0, resume=False, method_config=None, data=None):
    tr_df, dev_df, te_df = data or _noisy_blobs()
    tr = load_table(tr_df)
    dev = load_table(dev_df, like=tr, name="dev")
    te = load_table(te_df, like=tr, name="test")
    cfg = TrainConfig(method="bads", model="mlp", hidden=16, steps=steps, batch_size=16, seed=seed, eval_every=50,
                      log_every=40, checkpoint_every=40, progress=False)
    mc = {"burn_in": 40, "dev_batch_size": 10, **(method_config or {})}
    return run_training(tr, dev, te, out=tmp_path / name, config=cfg, method_config=mc, resume=resume), tr


def test_same_seed_same_run_other_seed_differs(tmp_path):
    a, _ = _train(tmp_path, "a", steps=60)
    b, _ = _train(tmp_path, "b", steps=60)
    c, _ = _train(tmp_path, "c", steps=60, seed=1)
    pd.testing.assert_frame_equal(a.values(), b.values())
    sa, sb = a.steps().to_pandas(), b.steps().to_pandas()
    pd.testing.assert_frame_equal(sa, sb)
    assert not np.allclose(a.values()["value"], c.values()["value"])


def test_resume_equals_uninterrupted(tmp_path):
    full, _ = _train(tmp_path, "full", steps=120)
    _train(tmp_path, "part", steps=80)  # checkpoints at 40 and 80
    part, _ = _train(tmp_path, "part", steps=120, resume=True)
    pd.testing.assert_frame_equal(full.values(), part.values())
    pd.testing.assert_frame_equal(full.steps().to_pandas(), part.steps().to_pandas())
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["trainer"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["trainer"]
    for k in ("u", "wsum", "count", "mean", "m2"):
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["samples"].nan_to_num(-1), b["samples"].nan_to_num(-1))


def test_resume_equals_uninterrupted_weight_net(tmp_path):
    mc = {"weight_net": True, "s_avg": 5}
    full, _ = _train(tmp_path, "full", steps=100, method_config=mc)
    _train(tmp_path, "part", steps=40, method_config=mc)
    part, _ = _train(tmp_path, "part", steps=100, resume=True, method_config=mc)
    pd.testing.assert_frame_equal(full.values(), part.values())


def _auroc(score, positive):
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    ranks = pd.Series(score).rank().to_numpy()
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def test_noisy_rows_get_lower_posterior_mean_and_intervals_hold(tmp_path):
    run, tr = _train(tmp_path, "noisy", steps=400)
    v = run.values()
    noisy = np.asarray(tr.is_noisy)
    assert noisy.sum() == 60
    assert _auroc(v["value"].to_numpy(), ~noisy) > 0.9  # value: in-run signals (signals.in_run_value)
    v = v.assign(value=v["posterior_mean"])  # the chain's summaries below
    clean_mean, noisy_mean = v["value"][~noisy].mean(), v["value"][noisy].mean()
    assert noisy_mean < clean_mean - 0.2, (noisy_mean, clean_mean)
    assert _auroc(v["value"].to_numpy(), ~noisy) > 0.9
    # posterior summaries: every row was sampled after burn-in (400 steps x 16 rows over 240 rows)
    assert (v["samples"] >= 10).all()
    assert v[["value", "value_std", "ci_low", "ci_high"]].notna().all().all()
    assert ((v["ci_low"] >= 0) & (v["ci_high"] <= 1) & (v["value_std"] > 0)).all()
    assert (v["ci_low"] <= v["value"]).all() and (v["value"] <= v["ci_high"]).all()
    # intervals: most flipped rows lie wholly below the clean rows' median weight
    assert (v["ci_high"][noisy] < v["value"][~noisy].median()).mean() > 0.5
    # test accuracy is well above chance on separable blobs despite 25 % flips
    assert run.meta["final_metrics"]["test_acc"] > 0.9
    # the log: weight = w_i used in the step, reward = d log pi / d w_i (finite, lower for flipped rows)
    steps = run.steps(["example_id", "weight", "reward"]).to_pandas()
    assert len(steps) == 400 * 16
    assert steps["weight"].between(0, 1).all() and np.isfinite(steps["reward"]).all()
    noisy_ids = set(np.asarray(tr.ids)[noisy])
    late = steps.iloc[len(steps) // 2:]
    is_noisy = late["example_id"].isin(noisy_ids)
    assert late["reward"][is_noisy].mean() < late["reward"][~is_noisy].mean()


class _FirstNet:
    """Hook: the weight net's parameters after step 1 and the trainer at the end."""

    def on_step_end(self, step, batch, record, trainer):
        if step == 1:
            self.first = {k: v.detach().clone() for k, v in trainer.weight_net.state_dict().items()}
        self.trainer = trainer


def test_weight_net_runs_and_keeps_weights_in_unit_interval(tmp_path):
    run, tr = _train(tmp_path, "wn", steps=200, method_config={"weight_net": True, "s_avg": 5})
    v = run.values()
    assert v["value"].between(0, 1).all()
    assert v["value"].std() > 0  # the net gives rows different weights
    assert (v["ci_low"].dropna() <= v["ci_high"].dropna()).all()
    # Without Langevin noise (T = 0) only the drift moves phi: it must move it (an update set to zero
    # left every assertion above green).
    tr_df, dev_df, te_df = _noisy_blobs()
    data = load_table(tr_df)
    hook = _FirstNet()
    cfg = TrainConfig(method="bads", model="mlp", hidden=16, steps=60, batch_size=16, eval_every=50, progress=False)
    cold = run_training(
        data,
        load_table(dev_df, like=data, name="dev"),
        out=tmp_path / "cold",
        config=cfg,
        hooks=[hook],
        method_config={"weight_net": True, "s_avg": 5, "burn_in": 10, "dev_batch_size": 10, "temperature": 0.0},
    )
    last = hook.trainer.weight_net.state_dict()
    moved = max(float((last[k] - hook.first[k]).abs().max()) for k in last)
    assert moved > 1e-3, moved
    with torch.no_grad():
        t = hook.trainer
        losses = F.cross_entropy(t.model(t.ctx.x), t.ctx.y, reduction="none")
        w_end = t.weight_net(t.ctx.x, t.ctx.y, losses).double().cpu().numpy()
    assert np.all((w_end > 0) & (w_end < 1))
    assert np.isfinite(cold.values()["value"]).all()
    values = cold.values().set_index("example_id")["posterior_mean"].reindex(data.ids).to_numpy()
    assert np.isfinite(values).all() and np.abs(values - w_end).max() < 0.2  # the mean tracks the moving net


def test_weight_net_on_the_loss_gives_flipped_rows_lower_weight(tmp_path):
    """weight_net with the default inputs (the row's loss): the posterior mean of w separates the 25 % flipped rows
    from the clean ones (AUROC > 0.9, clean rows' mean weight > flipped rows' + 0.1). (On the raw features,
    weight_inputs="features", the same run gives AUROC 0.30: the net does not learn which (x, y) disagree.)"""
    run, tr = _train(tmp_path, "wn-loss", steps=400, method_config={"weight_net": True})
    noisy = np.asarray(tr.is_noisy)
    w = run.values()["posterior_mean"].to_numpy()
    auc = _auroc(w, ~noisy)
    assert auc > 0.9 and w[~noisy].mean() > w[noisy].mean() + 0.1, (auc, w[~noisy].mean(), w[noisy].mean())
    assert run.meta["final_metrics"]["test_acc"] > 0.9


def test_batchnorm_model_train_losses_do_not_depend_on_the_dev_rows():
    """With BatchNorm the train and dev rows go through the model separately: a train row's loss in the drift is
    the loss of the train batch alone (batch statistics of train rows only), whatever dev rows were drawn."""
    from torch import nn

    from valuekit.training.loop import make_trainer

    def bn_mlp(num_classes, input_shape):
        return nn.Sequential(nn.Linear(input_shape[0], 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_classes))

    tr_df, dev_df, _ = _noisy_blobs(n=40)
    tr = load_table(tr_df)
    dev = load_table(dev_df, like=tr, name="dev")
    trainer, sampler, ctx = make_trainer(tr, dev, TrainConfig(method="bads", batch_size=8, device="cpu"),
                                         {"dev_batch_size": 6}, model=bn_mlp)
    assert not trainer.joint_forward
    rows = torch.arange(8)
    batch = Batch(step=1, idx=rows, x=ctx.x[rows], y=ctx.y[rows])
    alone = per_example_loss_of(trainer.model, batch)
    for dev_rows in (torch.arange(6), torch.arange(6, 12)):
        losses = trainer.drift(batch, ctx.dev_x[dev_rows], ctx.dev_y[dev_rows])[3]
        torch.testing.assert_close(losses, alone)
    plain, *_ = make_trainer(tr, dev, TrainConfig(method="bads", batch_size=8, device="cpu"))
    assert plain.joint_forward  # no BatchNorm: one forward of train + dev rows (the same numbers)


def per_example_loss_of(model, batch):
    import copy

    twin = copy.deepcopy(model).train()  # its own running statistics: the trainer's stay as they are
    with torch.no_grad():
        return F.cross_entropy(twin(batch.x), batch.y, reduction="none")
