"""HOST-CP representativeness program (valuekit.ops.representatives): gradients vs finite differences,
constraints, the effect of the memory, nearest-neighbour candidates, any batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from valuekit.ops.representatives import RepresentativeMemory, RepresentativeSelection

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
DT = torch.float64
ACCURATE = {"eps_abs": 1e-11, "eps_rel": 1e-11, "max_iters": 200_000, "mode": "lsmr"}


def tiny(seed=0, B=5, d=3, old=4):
    g = torch.Generator().manual_seed(seed)
    layer = RepresentativeSelection(k=2, ridge=0.5, max_old=3, solver_args=ACCURATE)
    layer.remember(torch.randn(old, d, generator=g, dtype=DT))
    f = torch.randn(B, d, generator=g, dtype=DT)
    s = torch.randn(B, generator=g, dtype=DT)
    return layer, f, s


def test_gradient_matches_finite_differences():
    layer, f, s = tiny()
    g = torch.randn(5, generator=torch.Generator().manual_seed(9), dtype=DT)
    x = s.clone().requires_grad_(True)
    t, _, _ = layer(x, f)
    (grad,) = torch.autograd.grad(t, x, g)
    eps = 1e-5
    fd = torch.zeros(5, dtype=DT)
    with torch.no_grad():
        for i in range(5):
            e = torch.zeros(5, dtype=DT)
            e[i] = eps
            fd[i] = (layer(s + e, f)[0] - layer(s - e, f)[0]) @ g / (2 * eps)
    assert grad.abs().max() > 1e-2  # informative, not the zero gradient of a vertex solution
    torch.testing.assert_close(grad, fd, rtol=1e-4, atol=1e-6)

    # gradient with respect to the features too (through Dn and Do)
    ff = f.clone().requires_grad_(True)
    t, _, _ = layer(s, ff)
    (gf,) = torch.autograd.grad(t, ff, g)
    with torch.no_grad():
        for i, j in ((0, 0), (2, 1), (4, 2)):
            e = torch.zeros_like(f)
            e[i, j] = eps
            num = (layer(s, f + e)[0] - layer(s, f - e)[0]) @ g / (2 * eps)
            assert gf[i, j].item() == pytest.approx(num.item(), rel=1e-3, abs=1e-6)


def test_solution_satisfies_the_constraints():
    layer, f, s = tiny(seed=1, old=2)
    t, Zn, Zo = layer(s, f)
    tol = 1e-7
    assert t.sum().item() == pytest.approx(2.0, abs=1e-7)
    assert (t >= 0).all() and (t <= 1).all()
    torch.testing.assert_close(Zn.sum(1) + Zo.sum(1), torch.ones(5, dtype=DT), atol=1e-7, rtol=0)
    assert (Zn >= -tol).all() and (Zo >= -tol).all()
    assert (Zn <= t[None, :] + tol).all()  # only selected points represent
    assert Zo[:, 2:].abs().max() < 1e-6  # the padding slot is unused (2 stored, max_old 3)
    assert Zo[:, :2].sum() > 1e-3  # the old points do represent


def test_points_covered_by_memory_are_not_reselected():
    """Two clusters, equal scores, budget 1: the memory covers cluster A, so the new representative is in B."""
    a = torch.tensor([[0.0, 0.0], [0.1, 0.0]], dtype=DT)
    b = torch.tensor([[5.0, 5.0], [5.1, 5.0]], dtype=DT)
    f = torch.cat([a, b])
    s = torch.zeros(4, dtype=DT)
    with_mem = RepresentativeSelection(k=1, ridge=0.1, max_old=2, solver_args=ACCURATE)
    with_mem.remember(a + 0.01)
    t, _, Zo = with_mem(s, f)
    assert t[2:].sum() > 0.95 and t[:2].sum() < 0.05
    assert Zo[:2].sum(1).min() > 0.9  # cluster A is represented by the old points
    # without a memory the budget is split between the clusters by symmetry
    t0, _, _ = RepresentativeSelection(k=1, ridge=0.1, max_old=2, solver_args=ACCURATE)(s, f)
    assert t0[:2].sum().item() == pytest.approx(0.5, abs=1e-4)


def test_memory_is_bounded_fifo_and_nearest_neighbours():
    mem = RepresentativeMemory(capacity=5, n_neighbors=2)
    pts = torch.arange(7, dtype=DT)[:, None] * torch.tensor([[1.0, 0.0]], dtype=DT)
    mem.add(pts[:3], torch.arange(3))
    mem.add(pts[3:], torch.arange(3, 7))
    assert len(mem) == 5
    torch.testing.assert_close(mem.stored(), pts[2:])  # the two oldest were evicted, order kept
    q = torch.tensor([[2.2, 0.0], [6.4, 0.0]], dtype=DT)
    cand = mem.candidates(q, max_old=10)
    # stored = points 2..6; nearest two of 2.2 are {2, 3}, of 6.4 are {6, 5}; ordered by distance
    assert sorted(mem.stored()[cand, 0].tolist()) == [2.0, 3.0, 5.0, 6.0]
    assert mem.stored()[cand[0], 0].item() == 2.0  # distance 0.2 is the smallest
    assert len(mem.candidates(q, max_old=3)) == 3
    brute = torch.cdist(q, mem.stored()).topk(2, largest=False).indices
    assert set(cand.tolist()) == set(brute.view(-1).tolist())
    state = mem.state_dict()
    other = RepresentativeMemory(capacity=5, n_neighbors=2)
    other.load_state_dict(state)
    torch.testing.assert_close(other.stored(), mem.stored())
    assert torch.equal(other.candidates(q, 10), cand)


def test_any_batch_size_including_partial_last_batch():
    layer = RepresentativeSelection(fraction=0.5, ridge=0.2, max_old=2)
    g = torch.Generator().manual_seed(4)
    for B in (6, 3, 2):
        s = torch.randn(B, generator=g, dtype=DT, requires_grad=True)
        f = torch.randn(B, 2, generator=g, dtype=DT)
        t, Zn, Zo = layer(s, f)
        assert t.shape == (B,) and Zn.shape == (B, B) and Zo.shape == (B, 2)
        assert t.sum().item() == pytest.approx(max(0.5 * B, 1.0), abs=1e-4)
        t.sum().backward()
        assert s.grad.shape == (B,)
        layer.remember(f[t > 0.5])
    assert len(layer.memory) > 0


@pytest.mark.parametrize("kwargs, match", [({}, "exactly one"), ({"k": 2, "fraction": 0.5}, "exactly one"),
                                           ({"fraction": 1.5}, "fraction"), ({"k": 0.5}, "k="),
                                           ({"k": 2, "ridge": 0.0}, "ridge"), ({"k": 2, "max_old": -1}, "max_old")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RepresentativeSelection(**kwargs)


def test_budget_must_be_below_batch_size():
    with pytest.raises(ValueError, match="batch size"):
        RepresentativeSelection(k=3)(torch.zeros(3, dtype=DT), torch.zeros(3, 2, dtype=DT))
    assert np.isclose(RepresentativeSelection(fraction=0.25).budget(2), 1.0)  # at least one representative
