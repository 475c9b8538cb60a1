"""multidds (DDS Algorithm 2): synthetic copy-vs-noise sources, REINFORCE by hand, per-source gradients, resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from valuekit.config import TrainConfig
from valuekit.data.tables import load_table
from valuekit.errors import InputError
from valuekit.methods import multidds
from valuekit.training.context import Batch, TrainContext
from valuekit.training.loop import run_training

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
    run = run_training(train_ds, dev_ds, out=tmp_path / "r", config=cfg(),
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
    from valuekit.models.builtin import feature_stats

    mean, std = feature_stats(train_ds.x)
    return TrainContext(
        config=config, device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed), x=train_ds.x,
        y=train_ds.y, ids=train_ds.ids, num_classes=train_ds.num_classes, classes=train_ds.classes,
        dev_x=dev_ds.x, dev_y=dev_ds.y, source=torch.tensor([codes[s] for s in train_ds.source]),
        sources=train_ds.sources, mean=mean, std=std,
        dev_source=None if dev_ds.source is None else torch.tensor([codes.get(s, -1) for s in dev_ds.source]),
    )


def test_reward_accumulator_matches_weighted_mean_and_its_standard_error():
    rng = np.random.default_rng(0)
    acc = multidds.RewardAccumulator(3, 5, torch.device("cpu"))
    d = torch.tensor(rng.normal(size=5))
    steps = []  # (source, rows, gradient sum)
    for _ in range(6):
        present = torch.tensor([0, 2])
        counts = torch.tensor([float(rng.integers(1, 5)), float(rng.integers(1, 5))])
        gsums = torch.tensor(rng.normal(size=(2, 5)))
        acc.add(present, gsums, counts, d)
        steps += [(0, counts[0].item(), gsums[0]), (2, counts[1].item(), gsums[1])]
    r, se = acc.finish("dot")
    assert np.isnan(r[1].item()) and np.isnan(se[1].item())  # source 1 was never drawn
    for s in (0, 2):
        w = np.array([c for src, c, _ in steps if src == s])
        q = np.array([float(g @ d) / c for src, c, g in steps if src == s])
        mean = (w * q).sum() / w.sum()
        var = len(w) / (len(w) - 1) * (w ** 2 * (q - mean) ** 2).sum() / w.sum() ** 2
        np.testing.assert_allclose(r[s].item(), mean, rtol=1e-10)
        np.testing.assert_allclose(se[s].item(), np.sqrt(var), rtol=1e-10)
        gbar = sum(g for src, _, g in steps if src == s) / w.sum()
        rc, sec = acc.finish("cosine")
        np.testing.assert_allclose(rc[s].item(), float(gbar @ d) / (gbar.norm() * d.norm()).item(), rtol=1e-6)
        np.testing.assert_allclose(sec[s].item(), np.sqrt(var) / (gbar.norm() * d.norm()).item(), rtol=1e-6)
    acc.add(torch.tensor([1]), torch.ones(1, 5, dtype=torch.float64), torch.tensor([2.0]), d)
    r, se = acc.finish("dot")
    assert np.isclose(r[1].item(), d.sum().item() / 2) and np.isnan(se[1].item())  # one step: no standard error


@pytest.mark.parametrize("conditional", [False, True])
def test_scorer_update_equals_hand_computation(conditional):
    _, train_ds, dev_ds = make_tables(n=40)
    ctx = _context(train_ds, dev_ds)
    t = multidds.Trainer(ctx, multidds.Config(scorer_optimizer="sgd", scorer_lr=0.7, scorer_batch=5, a1=0.25,
                                               dev_batch_size=10_000, conditional=conditional, reward_from="train"))
    d = torch.randn(t.acc.gsum.shape[1], generator=torch.Generator().manual_seed(2))
    gs = torch.randn(3, len(d), generator=torch.Generator().manual_seed(1))
    t.acc.add(torch.arange(3), gs, torch.tensor([2.0, 1.0, 4.0]), d)
    t.rewards = torch.tensor([0.5, float("nan"), -1.0], dtype=torch.float64)  # a previous estimate (1: none)
    psi0 = t.psi.detach().clone()
    gen = torch.Generator()
    gen.set_state(ctx.generator.get_state())
    t.update_scorer()
    # by hand: interval reward <gsum / rows, d>, blended 0.25 old + 0.75 new, then one ascent step
    new = (gs @ d).double() / torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64)
    r = torch.stack([0.25 * 0.5 + 0.75 * new[0], new[1], 0.25 * -1.0 + 0.75 * new[2]]).double()
    np.testing.assert_allclose(t.rewards.numpy(), r.numpy(), rtol=1e-5)
    want = psi0.double().clone()
    if not conditional:  # shared scorer: psi += lr (r - p sum r), the official "base" actor
        p = torch.softmax(psi0[0].double(), 0)
        want[0] += 0.7 * (r - p * r.sum())
    else:
        keys = torch.multinomial(t.key_prob, 5, replacement=True, generator=gen)
        for k in keys.tolist():
            av = t.avail[k]
            p = torch.softmax(psi0[k].double().masked_fill(~av, float("-inf")), 0)
            want[k] += 0.7 / 5 * torch.where(av, r - p * r[av].sum(), torch.zeros_like(r))
    np.testing.assert_allclose(t.psi.detach().double().numpy(), want.numpy(), atol=1e-5)
    # the next interval's reward direction is the dev gradient at the current model
    model = t.model
    loss = torch.nn.functional.cross_entropy(model(ctx.dev_x), ctx.dev_y)
    gdev = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    torch.testing.assert_close(t.d, gdev, rtol=1e-5, atol=1e-7)
    assert t.acc.stats.abs().sum() == 0  # the interval's sums start again


def test_probe_rewards_equal_hand_computation():
    _, train_ds, dev_ds = make_tables(n=40)
    ctx = _context(train_ds, dev_ds)
    t = multidds.Trainer(ctx, multidds.Config(probe_batches=3, probe_size=5, dev_batch_size=10_000))
    gen = torch.Generator()
    gen.set_state(ctx.generator.get_state())
    t.update_scorer()
    # by hand: dev gradient, then 3 batches of 5 rows per source drawn in source order, q = <grad sum / 5, d>
    model, params = t.model, list(t.model.parameters())
    d = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        torch.nn.functional.cross_entropy(model(ctx.dev_x), ctx.dev_y), params)])
    src = ctx.source
    for s in range(3):
        rows_s = torch.nonzero(src == s).squeeze(1)  # the sampler's order: stable sort by source
        q = []
        for _ in range(3):
            u = torch.rand(5, generator=gen, dtype=torch.float64)
            rows = rows_s[(u * len(rows_s)).long()]
            loss = torch.nn.functional.cross_entropy(model(ctx.x[rows]), ctx.y[rows], reduction="sum")
            q.append(float(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]) @ d) / 5)
        np.testing.assert_allclose(t.rewards[s].item(), np.mean(q), rtol=1e-4)
        np.testing.assert_allclose(t.reward_se[s].item(), np.std(q, ddof=1) / np.sqrt(3), rtol=1e-4)


@pytest.mark.parametrize("method", ["batched", "loop", "split"])
def test_source_gradient_sums_match_per_source_reference(method):
    _, train_ds, dev_ds = make_tables(n=40)
    ctx = _context(train_ds, dev_ds)
    t = multidds.Trainer(ctx, multidds.Config(grad_method=method, update_every=10_000, reward_from="train"))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    idx = t.sampler.next(24)
    src = ctx.source[idx]
    batch = Batch(step=2, idx=idx, x=ctx.x[idx], y=ctx.y[idx], source=src)
    t.step(batch)
    d = t.d
    # reference: one plain backward per source on that source's summed loss, at the pre-step weights
    ref = multidds.Trainer(ctx, multidds.Config())
    ref.model.load_state_dict(before)
    params = list(ref.model.parameters())
    r, _ = t.acc.finish("dot")
    for s in range(3):
        rows = src == s
        if not rows.any():
            assert torch.all(t.acc.gsum[s] == 0) and np.isnan(r[s])  # untouched
            continue
        loss = torch.nn.functional.cross_entropy(ref.model(batch.x[rows]), batch.y[rows], reduction="sum")
        g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, params)])
        torch.testing.assert_close(t.acc.gsum[s], g, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r[s].item(), float(g @ d) / rows.sum().item(), rtol=1e-4)


def test_values_are_unconfounded_and_source_table_is_written(tmp_path):
    # target 0 has only the "copy" source: log p(copy | 0) = 0 whatever the scorer, log p + log(#sources) is not
    tr, _, dev_ds = make_tables(n=60, dev_source=True)
    keep = ~((tr.label == "0") & (tr.source != "copy"))
    train_ds = load_table(tr[keep].reset_index(drop=True))
    run = run_training(train_ds, dev_ds, out=tmp_path / "r", config=cfg(steps=60), method_config={"update_every": 64})
    v = run.values().merge(pd.DataFrame({"example_id": tr[keep].id, "source": tr[keep].source,
                                         "label": tr[keep].label}))
    st = run.source_table().set_index("source")
    assert list(st.columns) == ["prob", "logit", "uniform_prob", "mean_reward", "reward_se", "updates", "rows",
                                "drawn", "is_target"]
    np.testing.assert_allclose(st["prob"].sum(), 1.0)
    np.testing.assert_allclose(st["uniform_prob"], 1 / 3)
    assert st.loc["copy", "is_target"] and not st.loc["noise", "is_target"]
    assert st["rows"].to_dict() == tr[keep].source.value_counts().to_dict()
    assert st["drawn"].sum() == 60 * 32 and (st["updates"] > 20).all()
    # value = log(prob / uniform prob) of the row's source, the same for every row of a source
    for s, rows in v.groupby("source"):
        np.testing.assert_allclose(rows["value"], np.log(st.loc[s, "prob"] * 3), rtol=1e-9)
    assert st.loc["copy", "prob"] > st.loc["noise", "prob"]
    # sources/ logs the reward and its standard error at every scorer update
    s = run.sources()
    upd = s[s.reward.notna()]
    assert upd.step.nunique() == 60 * 32 // 64 and upd.reward_se.notna().mean() > 0.8
    means = upd.groupby("source")["reward"].mean()
    np.testing.assert_allclose(st["mean_reward"].sort_index(), means.sort_index(), rtol=1e-9)


def test_default_scorer_update_every_1024_training_examples(tmp_path):
    # the default interval (reports/suite-multidds-update-every.md): batch 32 -> an update on steps 32 and 64
    _, train_ds, dev_ds = make_tables()
    run = run_training(train_ds, dev_ds, out=tmp_path / "r", config=cfg(steps=70))
    s = run.sources()
    assert sorted(s[s.reward.notna()].step.unique()) == [32, 64]
    m = run.metrics()
    assert m[m.scorer_loss.notna()].step.tolist() == [32, 64]


def test_sampler_draws_only_available_cells_with_scorer_probabilities():
    _, train_ds, dev_ds = make_tables(n=60, dev_source=True)
    ctx = _context(train_ds, dev_ds)
    t = multidds.Trainer(ctx, multidds.Config(init="target", target_mass=0.8, conditional=True))
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
    full = run_training(train_ds, dev_ds, out=tmp_path / "full", config=cfg(steps=40, checkpoint_every=20),
                 method_config=mc)
    run_training(train_ds, dev_ds, out=tmp_path / "part", config=cfg(steps=20, checkpoint_every=20), method_config=mc)
    resumed = run_training(train_ds, dev_ds, out=tmp_path / "part", config=cfg(steps=40, checkpoint_every=20),
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
        run_training(no_src, load_table(tr.drop(columns="source"), like=no_src, name="dev"), out=tmp_path / "x",
              config=cfg(steps=2))
    with pytest.raises(InputError, match="init=target"):
        run_training(train_ds, dev_ds, out=tmp_path / "y", config=cfg(steps=2), method_config={"init": "target"})


def test_tcs_prior_from_features_and_text():
    _, train_ds, dev_ds = make_tables(n=60)
    t = multidds.Trainer(_context(train_ds, dev_ds), multidds.Config(init="tcs"))
    sim = dict(zip(train_ds.sources, t.similarity()))
    assert sim["copy"] > sim["shift"] and sim["copy"] > sim["noise"]
    assert t.mean_probs()[train_ds.sources.index("copy")] > 0.5
    s = multidds.char_ngram_similarity({"a": ["la casa"], "b": ["xyz"]}, ["la casa"], n=3)
    assert s["a"] == 1.0 and s["b"] == 0.0
