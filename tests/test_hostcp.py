"""HOST-CP (Das et al. 2021): meta-gradient vs finite differences, run log sums, values, resume, options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from valuekit.config import TrainConfig
from valuekit.data.tables import load_table
from valuekit.errors import InputError
from valuekit.methods import hostcp
from valuekit.training.context import Batch, TrainContext
from valuekit.training.loop import run_training

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"  # inside cvxpylayers/diffcp
)
DIGITS = Path(__file__).resolve().parents[1] / "data" / "digits-noisy20"  # from any working directory
DT = torch.float64


def make_ctx(*, n=12, d=4, c=3, m=6, seed=0) -> TrainContext:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.arange(n) % c
    dev_x = torch.randn(m, d, generator=g, dtype=DT)
    dev_y = torch.arange(m) % c
    cfg = TrainConfig(model="mlp", hidden=5, batch_size=n, seed=seed, lr=0.05, progress=False)
    return TrainContext(
        config=cfg, device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed), x=x, y=y,
        ids=np.arange(n), num_classes=c, classes=[str(i) for i in range(c)], dev_x=dev_x, dev_y=dev_y,
        mean=x.mean(0), std=x.std(0),
    )


def float64_trainer(ctx, **cfg) -> hostcp.Trainer:
    tr = hostcp.Trainer(ctx, hostcp.Config(**cfg))
    tr.model.double()
    tr.selector.double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-uniform weights, all strictly inside (0, 1) (lam is large): no kinks
        tr.selector.label.weight.copy_(0.3 * torch.randn(tr.selector.label.weight.shape, generator=g, dtype=DT))
        tr.selector.label_bias.weight.copy_(0.3 * torch.randn(tr.selector.label_bias.weight.shape, generator=g,
                                                              dtype=DT))
    return tr


def dev_objective(tr, ctx):
    """phi -> L_dev(theta'(w(phi))) on the whole batch/dev set, through the trainer's own look-ahead."""
    w = tr._weights(ctx.x, ctx.y)
    assert 0 < w.min() and w.max() < 1
    return tr.lookahead_dev_loss(ctx.x, ctx.y, w, ctx.dev_x, ctx.dev_y)


@pytest.mark.parametrize("reg", ["quadratic", "entropy"])
def test_meta_gradient_matches_finite_differences(reg):
    ctx = make_ctx()
    tr = float64_trainer(ctx, reg=reg, lam=2.0, fraction=0.5, lookahead_lr=0.5)
    params = dict(tr.selector.named_parameters())
    loss = dev_objective(tr, ctx)
    auto = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    eps = 1e-6
    checked = 0
    for name in ("label.weight", "label_bias.weight", "body.1.weight", "body.3.bias"):
        p = params[name]
        flat = p.data.view(-1)
        for j in range(0, flat.numel(), max(1, flat.numel() // 4)):
            old = flat[j].item()
            with torch.no_grad():
                flat[j] = old + eps
                up = dev_objective(tr, ctx).item()
                flat[j] = old - eps
                down = dev_objective(tr, ctx).item()
                flat[j] = old
            fd = (up - down) / (2 * eps)
            assert auto[name].view(-1)[j].item() == pytest.approx(fd, rel=1e-5, abs=1e-9), (name, j)
            checked += 1
    assert checked >= 12
    assert max(g.abs().max().item() for g in auto.values()) > 1e-4  # the check is not about zeros

    # the fast path (dot-product identity + backward through layer and selector) gives the same gradient
    for method in ("exact", "ghost"):
        tr.cfg.meta_grad = method
        w = tr._weights(ctx.x, ctx.y)
        tr.model.zero_grad(set_to_none=True)
        losses = torch.nn.functional.cross_entropy(tr.model(ctx.x), ctx.y, reduction="none")
        grads = dict(zip([n for n, _ in tr.model.named_parameters()],
                         torch.autograd.grad((w.detach() * losses).sum() / w.detach().sum(),
                                             list(tr.model.parameters()))))
        dw, dev_loss = tr.meta_gradient(ctx.x, ctx.y, w, ctx.dev_x, ctx.dev_y, grads)
        assert dev_loss == pytest.approx(loss.item(), rel=1e-12)
        fast = torch.autograd.grad(w, list(params.values()), dw)
        for name, g in zip(params, fast):
            torch.testing.assert_close(g, auto[name], rtol=1e-9, atol=1e-12)


def test_step_meta_modes_agree():
    """One full step with meta_grad=autograd and =ghost gives the same selector (and model) update."""
    states = []
    for method in ("autograd", "fused", "ghost", "exact"):
        ctx = make_ctx()
        tr = float64_trainer(ctx, lam=2.0, meta_grad=method, dev_batch_size=100)
        tr.step(Batch(step=1, idx=torch.arange(ctx.n), x=ctx.x, y=ctx.y))
        states.append({**{f"s.{k}": v for k, v in tr.selector.state_dict().items()},
                       **{f"m.{k}": v for k, v in tr.model.state_dict().items()}})
    for other in states[1:]:
        for k in states[0]:
            torch.testing.assert_close(other[k], states[0][k], rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def digits():
    tr = load_table(f"{DIGITS}/train.parquet", name="train")
    dv = load_table(f"{DIGITS}/dev.parquet", like=tr, name="dev")
    return tr, dv


def run_hostcp(digits, out, *, steps=12, resume=False, batch_size=32, **mcfg):
    tr, dv = digits
    cfg = TrainConfig(method="hostcp", steps=steps, batch_size=batch_size, hidden=32, eval_every=6, log_every=4,
                      checkpoint_every=4, progress=False, lr=3e-3)
    return run_training(
        tr,
        dv,
        out=out,
        config=cfg,
        method_config={"dev_batch_size": 32, "selector_lr": 1e-2, "update_every": 1, **mcfg},
        resume=resume,
    )


def test_short_run_logs_weight_and_selected(digits, tmp_path):
    run = run_hostcp(digits, tmp_path / "r", steps=12, fraction=0.25)
    steps = run.steps().to_pandas()
    assert len(steps) == 12 * 32
    per_batch = steps.groupby("step")["weight"].sum()
    assert np.allclose(per_batch, 0.25 * 32, atol=1e-5)  # sum w = k in every batch
    assert steps["weight"].between(0, 1).all()
    assert (steps["selected"] == (steps["weight"] > 0.5)).all()
    assert steps["weight"].std() > 1e-4  # the selector moved away from uniform (w = k/B = 0.25)
    assert steps["reward"].notna().all()
    m = run.metrics()
    assert m["meta_loss"].notna().all() and m["scorer_loss"].isna().all()
    # selection_weight = mean w over the visits of each row, value_std its std, selected_rate the share of visits
    # selected; value = percentile rank of -mean_loss over the table (signals.in_run_value)
    v = run.values().set_index("example_id")
    agg = steps.groupby("example_id").agg(mean=("weight", "mean"), sel=("selected", "mean"),
                                          std=("weight", lambda s: s.std(ddof=0)))
    np.testing.assert_allclose(v.loc[agg.index, "selection_weight"], agg["mean"], rtol=1e-6, atol=1e-7)
    from valuekit.training.signals import class_percentile
    np.testing.assert_allclose(v["value"].to_numpy(), class_percentile(-v["mean_loss"].to_numpy(), np.zeros(len(v))),
                               rtol=1e-12)
    np.testing.assert_allclose(v.loc[agg.index, "selected_rate"], agg["sel"], atol=1e-12)
    np.testing.assert_allclose(v.loc[agg.index, "value_std"], agg["std"], atol=1e-6)
    unseen = v.index.difference(agg.index)
    assert len(unseen) > 0 and v.loc[unseen, "value"].isna().all()
    assert v["score"].notna().all()


def test_values_average_over_repeated_visits():
    """Rows seen several times: selection_weight = mean of their logged w, value_std = its std (ddof 0),
    selected_rate = share of visits with w > threshold, weight = that mean (0 when never seen)."""
    ctx = make_ctx(n=12)
    tr = float64_trainer(ctx, fraction=0.5, lam=1.0, threshold=0.45)
    rows = [torch.arange(12), torch.arange(6), torch.arange(12), torch.arange(3)]
    logged = {i: [] for i in range(12)}
    for step, idx in enumerate(rows, 1):
        rec = tr.step(Batch(step=step, idx=idx, x=ctx.x[idx], y=ctx.y[idx]))
        for i, w in zip(idx.tolist(), rec.weight.double().tolist()):
            logged[i].append(w)
    v = tr.values().columns
    means = np.array([np.mean(logged[i]) for i in range(12)])
    assert len({len(logged[i]) for i in range(12)}) == 3  # 4, 3, 2 visits
    assert sum(np.std(logged[i]) > 1e-3 for i in range(12)) >= 4  # w changes between visits
    np.testing.assert_allclose(np.asarray(v["selection_weight"]), means, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(v["weight"]), means, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(v["value_std"]), [np.std(logged[i]) for i in range(12)], rtol=1e-7,
                               atol=1e-9)
    np.testing.assert_allclose(np.asarray(v["selected_rate"]), [np.mean(np.array(logged[i]) > 0.45) for i in range(12)])


def test_resume_equals_uninterrupted(digits, tmp_path):
    full = run_hostcp(digits, tmp_path / "full", steps=12)
    run_hostcp(digits, tmp_path / "part", steps=8)
    resumed = run_hostcp(digits, tmp_path / "part", steps=12, resume=True)
    a = full.steps().to_pandas().sort_values(["step", "example_id"], ignore_index=True)
    b = resumed.steps().to_pandas().sort_values(["step", "example_id"], ignore_index=True)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(full.values(), resumed.values())


def test_embedding_input_and_update_every(digits, tmp_path):
    run = run_hostcp(digits, tmp_path / "e", steps=8, selector_input="embedding", update_every=3, reg="entropy")
    steps = run.steps().to_pandas()
    assert np.allclose(steps.groupby("step")["weight"].sum(), 16, atol=1e-5)
    updated = steps.groupby("step")["reward"].apply(lambda r: r.notna().all())
    assert updated.to_dict() == {s: (s - 1) % 3 == 0 for s in range(1, 9)}


def test_representatives_option_with_partial_batch(tmp_path):
    """The representativeness layer inside the trainer: sum w = k, memory filled, state round trip."""
    ctx = make_ctx(n=10)
    tr = hostcp.Trainer(ctx, hostcp.Config(representatives=True, fraction=0.4, rep_capacity=5, rep_max_old=3))
    tr.model.double()
    tr.selector.double()
    for step, rows in enumerate(([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3]), start=1):
        idx = torch.tensor(rows)
        rec = tr.step(Batch(step=step, idx=idx, x=ctx.x[idx], y=ctx.y[idx]))
        assert rec.weight.sum().item() == pytest.approx(max(0.4 * len(rows), 1.0), abs=1e-4)
    mem = tr.layer.memory
    assert 0 < len(mem) <= 5
    state = tr.state_dict()
    tr2 = hostcp.Trainer(make_ctx(n=10), hostcp.Config(representatives=True, fraction=0.4, rep_capacity=5,
                                                       rep_max_old=3))
    tr2.model.double()
    tr2.selector.double()
    tr2.load_state_dict(state)
    torch.testing.assert_close(tr2.layer.memory.stored(), mem.stored())


@pytest.mark.parametrize("bad", [{"fraction": 1.0}, {"lam": 0.0}, {"reg": "l1"}, {"backend": "qpth"},
                                 {"selector_input": "pixels"}, {"meta_grad": "fd"}, {"update_every": 0}])
def test_bad_config_rejected(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        hostcp.Config(**bad).validate()


def test_selector_forward_equals_its_layers_composed():
    from valuekit.methods.scorers import label_mlp

    g = torch.Generator().manual_seed(0)
    net = label_mlp(12, 5, 8, mean=torch.randn(12, generator=g), std=torch.rand(12, generator=g) + 0.5, generator=g,
                    device="cpu")
    torch.nn.init.normal_(net.label.weight, generator=g)
    torch.nn.init.normal_(net.label_bias.weight, generator=g)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
    ref = (net.body(x) * net.label(y)).sum(-1) + net.label_bias(y).squeeze(-1)
    assert torch.equal(net(x, y), ref) and ref.std() > 0


def test_values_say_which_selection_program_the_weights_come_from(tmp_path):
    """values.parquet's column docs name the layer: the top-k relaxation by default, the paper's program with
    representatives=True."""
    import json

    import pyarrow.parquet as pq
    from conftest import blobs

    import valuekit

    tr, dv = blobs(64, seed=1, noise=0.2), blobs(24, seed=2, id_start=1000)
    for rep, expect in ((False, "from the top-k relaxation (the default layer, not the paper's"),
                        (True, "from the paper's representativeness program (representatives=True)")):
        run = valuekit.train(tr, dv, out=tmp_path / f"r{rep}", method="hostcp", steps=4, batch_size=16, device="cpu",
                             progress=False, representatives=rep)
        docs = json.loads(pq.read_schema(run.path / "values.parquet").metadata[b"valuekit.column_docs"])
        assert expect in docs["learned"]
