"""DDS: scale-only reward normalisation and the effective-sample-size floor on the batch weights."""

import pytest
import torch
from test_dds import batch_of, make_ctx

from valuekit.methods import dds


def _ess(trainer, batch) -> float:
    with torch.no_grad():
        p = torch.softmax(trainer.scorer(batch.x, batch.y), 0)
    return float(1.0 / (len(p) * (p * p).sum()))


def _collapsed(**cfg):
    ctx = make_ctx()
    tr = dds.Trainer(ctx, dds.Config(update_every=1, scorer_warmup=0, reward_scale=0.0, **cfg))
    with torch.no_grad():  # the scorer puts (almost) all mass on class 0
        tr.scorer.label_bias.weight[:] = torch.tensor([[6.0], [0.0], [0.0]])
    return tr, batch_of(ctx, list(range(8)))


def test_ess_floor_pushes_a_collapsed_batch_back_and_is_silent_above_it():
    tr, b = _collapsed(ess_floor=0.8)
    before = _ess(tr, b)
    assert before < 0.5
    tr.step(b)  # rewards scaled to 0: only the floor's penalty moves the scorer
    assert _ess(tr, b) > before
    off, b2 = _collapsed(ess_floor=0.0)
    params = [p.detach().clone() for p in off.scorer.parameters()]
    off.step(b2)
    assert all(torch.equal(p, q) for p, q in zip(params, off.scorer.parameters()))
    low, b3 = _collapsed(ess_floor=0.05)  # ESS above this floor: no pull towards uniform either
    params = [p.detach().clone() for p in low.scorer.parameters()]
    low.step(b3)
    assert all(torch.equal(p, q) for p, q in zip(params, low.scorer.parameters()))


def test_scale_norm_divides_by_the_running_rms_without_shifting():
    ctx = make_ctx()
    tr = dds.Trainer(ctx, dds.Config(reward_norm="scale", reward_momentum=0.5))
    r1 = torch.tensor([1.0, 3.0, -1.0, 5.0], dtype=torch.float64)
    out1 = tr._normalise(r1)
    ms = float((r1 * r1).mean())
    torch.testing.assert_close(out1, r1 / ms ** 0.5)  # first batch sets the average
    r2 = torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    out2 = tr._normalise(r2)
    torch.testing.assert_close(out2, r2 / (0.5 * ms + 0.5 * 4.0) ** 0.5)
    assert torch.equal(torch.sign(out1), torch.sign(r1))  # a positive factor: REINFORCE's direction


def test_paper_update_settings_validate():
    dds.Config(reward_norm="none", ess_floor=0.0, entropy_weight=0.0).validate()
    with pytest.raises(Exception, match="ess_floor"):
        dds.Config(ess_floor=1.5).validate()
