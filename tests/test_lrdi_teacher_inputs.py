"""LRDI teacher inputs and weight floor: the hidden state is standardised per row, and the batch
weights never fall under the effective-sample-size floor."""

import numpy as np
import pytest
import torch
from test_lrdi import tiny_trainer

from valuekit.methods.lrdi import Config, student_signals


def ess(w):
    return float(w.sum() ** 2 / (len(w) * (w * w).sum()))


def test_teacher_output_is_invariant_to_the_hidden_state_scale():
    tr = tiny_trainer(Config())
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(10, tr.model.head.in_features, generator=g, dtype=torch.float64)
    logits = tr.model.head(feats)
    y = torch.arange(10) % 3
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    s1 = student_signals(feats, logits, loss, y, 0.5)
    s10 = dict(s1, features=10.0 * s1["features"] + 3.0)  # norm growth and a shift of the hidden state
    torch.testing.assert_close(tr.teacher(s1), tr.teacher(s10), rtol=1e-3, atol=1e-4)  # up to LayerNorm eps
    raw = dict(s1, features=1e-3 * s1["features"])  # without the standardisation the output would move
    assert not torch.allclose(tr.teacher.net(torch.cat([raw[k] if k != "label" else tr.teacher.label(raw[k])
                                                        for k in tr.teacher.inputs], 1)).squeeze(1), tr.teacher(s1))


@pytest.mark.parametrize("floor", [0.3, 0.6])
def test_ess_floor_shrinks_to_exactly_the_floor_and_keeps_the_mean(floor):
    tr = tiny_trainer(Config(ess_floor=floor))
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(64, generator=g, dtype=torch.float64) ** 8).requires_grad_(True)
    assert ess(w.detach()) < floor
    out = tr._ess_floor(w, w.mean())
    assert ess(out.detach()) == pytest.approx(floor, rel=1e-9)
    assert float(out.mean()) == pytest.approx(float(w.mean()), rel=1e-12)
    assert np.corrcoef(out.detach().numpy(), w.detach().numpy())[0, 1] == pytest.approx(1.0)  # an affine shrink
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    spread = torch.linspace(0.5, 1.5, 64, dtype=torch.float64)  # ESS ~0.92: above the floor, untouched
    assert torch.equal(tr._ess_floor(spread, spread.mean()), spread)


def test_batch_weights_respect_the_floor_in_training():
    tr = tiny_trainer(Config(ess_floor=0.9))
    with torch.no_grad():  # a teacher that strongly separates rows: ESS under 0.9 without the floor
        tr.teacher.net[-1].weight.mul_(200.0)
    x, y = tr.ctx.x, tr.ctx.y
    feats = tr.model.features(x)
    logits = tr.model.head(feats)
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    sig = student_signals(feats, logits, loss, y, 0.5)
    raw = torch.sigmoid(tr.teacher(sig)).detach()
    assert ess(raw) < 0.9
    w = tr.weights(sig).detach()
    assert ess(w) == pytest.approx(0.9, rel=1e-9) and float(w.mean()) == pytest.approx(1.0)
