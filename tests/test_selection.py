"""Numerical tests for valuekit.ops.selection (differentiable convex subset selection).

The exact backend is checked against finite differences (gradcheck), against the
cvxpylayers reference (forward and vector-Jacobian products), against an explicit
KKT check plus two independent solvers (scipy SLSQP, breakpoint enumeration) on tiny
problems, and for the constraints.  Everything is small: the file runs in seconds.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from valuekit.bench.layer import benchmark_layer
from valuekit.ops.selection import DEFAULT_SOLVER_ARGS, SubsetSelection, select_subset

pytestmark = pytest.mark.filterwarnings(
    # numpy 2 deprecation emitted inside cvxpylayers/diffcp when they np.array() a tensor
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

DT = torch.float64
REGS = ("quadratic", "entropy")
CMP_TOL = 1e-5  # exact vs cvxpylayers (SCS eps 1e-9, LSMR derivative), max abs


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def quad_threshold(s, w, lam):
    """tau and the free set of a quadratic solution (per row); s, w: (B, n) float64."""
    free = (w > 0) & (w < 1)
    cnt = free.sum(-1)
    tau = torch.where(free, s - 2 * lam * w, torch.zeros_like(s)).sum(-1) / cnt.clamp(min=1)
    return tau, free, cnt


def kink_margin(s, k, lam):
    """Smallest |s_i - tau| or |s_i - tau - 2 lam| (distance of any item from a kink) and
    the smallest free-set size, over rows.  Used to generate problems where the quadratic
    solution is differentiable with a non-trivial free set."""
    w = select_subset(s, k, reg="quadratic", lam=lam)
    tau, _, cnt = quad_threshold(s, w, lam)
    z = s - tau.unsqueeze(-1)
    margin = torch.minimum(z.abs(), (z - 2 * lam).abs()).min().item()
    return margin, int(cnt.min())


def make_scores(batch, n, k, lam, reg, seed, ties=True, min_margin=1e-3):
    """Random float64 scores (with tied values when ties=True); for the quadratic case,
    re-drawn until every row has a free item and no item is within min_margin of a kink."""
    for attempt in range(200):
        g = torch.Generator().manual_seed(1000 * seed + attempt)
        s = torch.randn(batch, n, generator=g, dtype=DT)
        if ties and n >= 4:
            # copy a block of values onto other positions: exact ties in every row
            m = n // 4
            s[:, n - m:] = s[:, :m]
        if reg == "entropy":
            return s
        margin, free = kink_margin(s, k, lam)
        if margin > min_margin and free >= 1:
            return s
    raise AssertionError("could not draw a well-posed problem")


def exact_and_vjp(layer, s, g):
    x = s.detach().clone().requires_grad_(True)
    w = layer(x)
    (grad,) = torch.autograd.grad(w, x, g)
    return w.detach(), grad


# ---------------------------------------------------------------------------
# gradients: finite differences
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("reg", REGS)
def test_gradcheck_exact(reg):
    lam, k = 0.4, 2.5
    s = make_scores(3, 7, k, lam, reg, seed=1, ties=False, min_margin=1e-2)
    if reg == "quadratic":
        w = select_subset(s, k, reg=reg, lam=lam)
        _, free, cnt = quad_threshold(s, w, lam)
        # non-trivial: free items and clipped items in every row
        assert (cnt >= 2).all() and (~free).sum(-1).min() >= 1
    s.requires_grad_(True)
    fn = lambda x: select_subset(x, k, reg=reg, lam=lam)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(fn, (s,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("reg", REGS)
def test_gradcheck_module_1d(reg):
    lam = 0.3
    layer = SubsetSelection(fraction=0.4, reg=reg, lam=lam)
    s = make_scores(1, 10, 4.0, lam, reg, seed=2, ties=False, min_margin=1e-2)[0].requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (s,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("reg", REGS)
def test_vjp_formula(reg):
    """grad_s of <g, w> equals the closed forms in the spec, computed here independently."""
    lam, k = 0.25, 3.0
    s = make_scores(4, 9, k, lam, reg, seed=3)
    g = torch.randn(4, 9, dtype=DT, generator=torch.Generator().manual_seed(0))
    w, grad = exact_and_vjp(lambda x: select_subset(x, k, reg=reg, lam=lam), s, g)
    if reg == "quadratic":
        free = ((w > 0) & (w < 1)).to(DT)
        mean = (g * free).sum(-1, keepdim=True) / free.sum(-1, keepdim=True)
        expected = free * (g - mean) / (2 * lam)
    else:
        d = w * (1 - w) / lam
        expected = d * (g - (d * g).sum(-1, keepdim=True) / d.sum(-1, keepdim=True))
    assert torch.allclose(grad, expected, atol=1e-12, rtol=0)
    # sum(w) = k is a constant, so the gradient of sum(w) vanishes
    _, grad_sum = exact_and_vjp(lambda x: select_subset(x, k, reg=reg, lam=lam), s, torch.ones_like(s))
    assert grad_sum.abs().max().item() < 1e-12


# ---------------------------------------------------------------------------
# exact vs cvxpylayers reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("n", [5, 17, 40])
def test_exact_matches_cvxpylayers(reg, n):
    # entropy: lam large enough that no weight is ~1e-6; there the conic reference
    # (exp cones solved to ~1e-12 gap) is itself only good to ~1e-5 in w and ~1e-4 in
    # the gradient, while the closed form stays exact (checked by objective values)
    lam = 0.37 if reg == "quadratic" else 0.8
    ks = [1, round(n / 3) + 0.5, n - 1]
    worst_w = worst_g = 0.0
    for i, k in enumerate(ks):
        exact = SubsetSelection(k=k, reg=reg, lam=lam, backend="exact")
        ref = SubsetSelection(k=k, reg=reg, lam=lam, backend="cvxpylayers")
        for batch in (1, 3):
            s = make_scores(batch, n, k, lam, reg, seed=10 * n + 2 * i + batch)
            g = torch.randn(batch, n, dtype=DT, generator=torch.Generator().manual_seed(n + i + batch))
            w_ex, grad_ex = exact_and_vjp(exact, s, g)
            w_ref, grad_ref = exact_and_vjp(ref, s, g)
            assert w_ref.dtype == DT and w_ref.shape == (batch, n)
            # the reference solves the same program
            assert torch.allclose(w_ref.sum(-1), torch.full((batch,), float(k), dtype=DT), atol=1e-6)
            worst_w = max(worst_w, (w_ex - w_ref).abs().max().item())
            worst_g = max(worst_g, (grad_ex - grad_ref).abs().max().item())
            assert (w_ex - w_ref).abs().max().item() < CMP_TOL, (k, batch)
            assert (grad_ex - grad_ref).abs().max().item() < CMP_TOL, (k, batch)
    assert worst_w < CMP_TOL and worst_g < CMP_TOL


def test_cvxpylayers_backend_dtype_shape_nograd():
    layer = SubsetSelection(k=2, reg="quadratic", lam=0.5, backend="cvxpylayers")
    s32 = torch.tensor([0.3, -1.2, 0.9, 0.1, 0.5], dtype=torch.float32)
    with torch.no_grad():  # solve-only path of diffcp (no derivative arguments)
        w = layer(s32)
    assert w.dtype == torch.float32 and w.shape == (5,)
    w_exact = select_subset(s32.double(), 2, lam=0.5)
    assert (w.double() - w_exact).abs().max().item() < 1e-6
    assert 5 in layer._layers and len(layer._layers) == 1  # program cached per n
    layer(s32.unsqueeze(0).repeat(2, 1))
    assert len(layer._layers) == 1
    empty = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)  # an empty batch never reaches cvxpy
    w0 = layer(empty)
    assert w0.shape == (0, 5) and w0.requires_grad and len(layer._layers) == 1
    assert layer.solver_args == DEFAULT_SOLVER_ARGS["quadratic"]


def test_solver_args_merge():
    entropy = SubsetSelection(k=1, reg="entropy", backend="cvxpylayers")
    assert entropy.solver_args["solve_method"] == "Clarabel"
    # another solver: the default solver's own settings are dropped, mode is kept
    scs_args = {"solve_method": "SCS", "eps_abs": 1e-9, "eps_rel": 1e-9}
    scs = SubsetSelection(k=1, reg="entropy", backend="cvxpylayers", solver_args=scs_args)
    assert scs.solver_args == {**scs_args, "mode": "lsmr"}
    dense = SubsetSelection(k=1, backend="cvxpylayers", solver_args={"mode": "dense"})
    assert dense.solver_args == {**DEFAULT_SOLVER_ARGS["quadratic"], "mode": "dense"}
    s = torch.tensor([0.2, -0.4, 1.1, 0.6], dtype=DT, requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5, 0.3], dtype=DT)
    for layer in (scs, dense):
        w, grad = exact_and_vjp(layer, s, g)
        w_ex, grad_ex = exact_and_vjp(SubsetSelection(k=1, reg=layer.reg), s, g)
        assert (w - w_ex).abs().max().item() < CMP_TOL and (grad - grad_ex).abs().max().item() < CMP_TOL


# ---------------------------------------------------------------------------
# constraints, shapes, dtypes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("reg", REGS)
def test_constraints_float64(reg):
    g = torch.Generator().manual_seed(5)
    for n, k, lam, scale in [(50, 7, 0.1, 1.0), (50, 49.5, 2.0, 3.0), (200, 0.3, 1e-3, 10.0), (3, 1, 10.0, 1.0)]:
        s = torch.randn(4, n, generator=g, dtype=DT) * scale + 1e3
        w = select_subset(s, k, reg=reg, lam=lam)
        assert w.shape == s.shape and w.dtype == DT
        assert (w.sum(-1) - k).abs().max().item() < 1e-8
        assert w.min().item() >= 0.0 and w.max().item() <= 1.0
        # invariant to a common shift of the scores, monotone in the scores
        w2 = select_subset(s - 1e3, k, reg=reg, lam=lam)
        assert (w - w2).abs().max().item() < 1e-8
        order = s.argsort(-1)
        ws = w.gather(-1, order)
        assert (ws[:, 1:] - ws[:, :-1]).min().item() >= -1e-12


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    kfrac=st.floats(0.01, 0.99),
    lam=st.floats(1e-3, 1e2),
    scale=st.floats(1e-3, 1e3),
    reg=st.sampled_from(REGS),
    seed=st.integers(0, 2**16),
)
def test_constraints_property(n, kfrac, lam, scale, reg, seed):
    k = kfrac * n
    s = torch.randn(2, n, generator=torch.Generator().manual_seed(seed), dtype=DT) * scale
    w = select_subset(s, k, reg=reg, lam=lam)
    assert torch.isfinite(w).all()
    assert (w.sum(-1) - k).abs().max().item() < 1e-8 * max(1.0, k)
    assert w.min().item() >= 0.0 and w.max().item() <= 1.0


def test_shapes_fraction_and_dtypes():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(12, generator=g, dtype=DT)
    w1 = SubsetSelection(k=3)(s)
    assert w1.shape == (12,)
    assert torch.equal(w1, select_subset(s.unsqueeze(0), 3)[0])
    # fraction: k = fraction * n, non-integer allowed
    layer = SubsetSelection(fraction=0.3, reg="entropy", lam=0.2)
    wf = layer(s)
    assert abs(wf.sum().item() - 3.6) < 1e-10
    assert layer.budget(12) == pytest.approx(3.6)
    # leading dims are batch dims
    s3 = torch.randn(2, 3, 12, generator=g, dtype=DT)
    w3 = SubsetSelection(k=4, lam=0.5)(s3)
    assert w3.shape == (2, 3, 12)
    assert torch.allclose(w3.reshape(6, 12), select_subset(s3.reshape(6, 12), 4, lam=0.5), atol=0)
    # float32 in -> float32 out, close to the float64 answer
    for reg in REGS:
        s64 = torch.randn(5, 40, generator=g, dtype=DT)
        w64 = select_subset(s64, 10, reg=reg, lam=0.5)
        s32 = s64.float().requires_grad_(True)
        w32 = select_subset(s32, 10, reg=reg, lam=0.5)
        assert w32.dtype == torch.float32
        assert (w32.double() - w64).abs().max().item() < 1e-5
        assert (w32.double().sum(-1) - 10).abs().max().item() < 1e-4
        w32.sum().backward()
        assert s32.grad.dtype == torch.float32 and s32.grad.abs().max().item() < 1e-5
    # half precision is computed in float32 and cast back
    wh = select_subset(torch.randn(3, 8, generator=g).half(), 2)
    assert wh.dtype == torch.float16 and abs(wh.float().sum(-1) - 2).max().item() < 1e-2
    # empty batch
    assert select_subset(torch.zeros(0, 6, dtype=DT), 2).shape == (0, 6)
    # n = 1: the only feasible point is w = k
    assert select_subset(torch.tensor([3.0], dtype=DT), 0.25).item() == pytest.approx(0.25, abs=1e-15)


def test_small_lam_approaches_hard_topk_and_large_lam_uniform():
    s = torch.tensor([[0.9, -0.2, 1.7, 0.4, 2.5, -1.0]], dtype=DT)
    topk = torch.zeros_like(s).scatter_(-1, s.topk(2).indices, 1.0)
    for reg in REGS:
        assert (select_subset(s, 2, reg=reg, lam=1e-4) - topk).abs().max().item() < 1e-6
        assert (select_subset(s, 2, reg=reg, lam=1e4) - 2 / 6).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(7)
    for reg in REGS:
        for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            s = torch.randn(8, 300, generator=g, dtype=dt)
            w_cpu = select_subset(s, 30, reg=reg, lam=0.3)
            sc = s.cuda().requires_grad_(True)
            w_gpu = select_subset(sc, 30, reg=reg, lam=0.3)
            assert w_gpu.device.type == "cuda" and w_gpu.dtype == dt
            assert (w_gpu.cpu() - w_cpu).abs().max().item() < tol
            w_gpu.sum().backward()
            assert sc.grad.device.type == "cuda"


# ---------------------------------------------------------------------------
# KKT and independent solvers on tiny problems
# ---------------------------------------------------------------------------
def breakpoint_solution(s, k, lam):
    """Quadratic case by enumerating breakpoints: f(tau) = sum clip((s - tau)/2lam, 0, 1)
    is piecewise linear and non-increasing; find the segment holding k and interpolate."""
    s = np.asarray(s, dtype=np.float64)
    f = lambda t: np.clip((s - t) / (2 * lam), 0, 1).sum()  # noqa: E731
    bps = np.sort(np.concatenate([s, s - 2 * lam]))
    vals = np.array([f(t) for t in bps])  # non-increasing
    j = np.nonzero(vals >= k)[0].max()  # f(bps[j]) >= k > f(bps[j+1])
    t0, t1, f0, f1 = bps[j], bps[j + 1], vals[j], vals[j + 1]
    tau = t0 if f0 == f1 else t0 + (f0 - k) * (t1 - t0) / (f0 - f1)
    return np.clip((s - tau) / (2 * lam), 0, 1)


def test_quadratic_kkt_and_bruteforce():
    from scipy.optimize import minimize

    cases = [
        ([0.3, -1.2, 0.9, 0.1, 0.5, 2.0], 2.0, 0.4),
        ([1.0, 1.0, 0.2, -0.3, 0.7, 0.7], 2.5, 0.25),  # ties
        ([5.0, 0.0, -1.0, 0.5], 1.0, 0.1),  # one item at the upper bound, rest zero
        ([0.1, 0.2, 0.3, 0.4, 0.5], 4.2, 1.5),
    ]
    for s_list, k, lam in cases:
        s = torch.tensor(s_list, dtype=DT)
        w = select_subset(s, k, lam=lam).numpy()
        sn = s.numpy()
        # KKT: a tau with  s_i - 2 lam w_i = tau on the free set,  s_i <= tau where w_i = 0,
        # s_i - 2 lam >= tau where w_i = 1;  primal feasibility
        assert abs(w.sum() - k) < 1e-12 and w.min() >= 0 and w.max() <= 1
        free = (w > 1e-12) & (w < 1 - 1e-12)
        if free.any():
            taus = sn[free] - 2 * lam * w[free]
            assert np.ptp(taus) < 1e-12
            tau = taus.mean()
            assert np.all(sn[w <= 1e-12] <= tau + 1e-12)
            assert np.all(sn[w >= 1 - 1e-12] - 2 * lam >= tau - 1e-12)
        else:  # all at bounds: any tau in [max s_zero, min s_one - 2 lam] certifies
            assert sn[w <= 1e-12].max() <= (sn[w >= 1 - 1e-12] - 2 * lam).min() + 1e-12
        # independent exact method
        assert np.abs(w - breakpoint_solution(sn, k, lam)).max() < 1e-12
        # generic constrained optimiser on  min lam ||w||^2 - s.w
        res = minimize(
            lambda v, lam=lam, sn=sn: lam * v @ v - sn @ v,
            np.full(len(sn), k / len(sn)),
            jac=lambda v, lam=lam, sn=sn: 2 * lam * v - sn,
            bounds=[(0, 1)] * len(sn),
            constraints=[{"type": "eq", "fun": lambda v, k=k: v.sum() - k, "jac": lambda v: np.ones_like(v)}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 500},
        )
        assert res.success
        assert np.abs(w - res.x).max() < 1e-6


def test_entropy_stationarity():
    s = torch.tensor([[0.3, -1.2, 0.9, 0.1, 0.5, 2.0], [1.0, 1.0, 0.2, -0.3, 0.7, 0.7]], dtype=DT)
    lam, k = 0.3, 2.2
    w = select_subset(s, k, reg="entropy", lam=lam)
    assert (w.sum(-1) - k).abs().max().item() < 1e-12
    assert ((w > 0) & (w < 1)).all()
    # s_i - lam * logit(w_i) is the same tau for every i
    tau = s - lam * torch.logit(w)
    assert (tau.max(-1).values - tau.min(-1).values).max().item() < 1e-10


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
def test_bad_k_rejected():
    with pytest.raises(ValueError, match=r"SubsetSelection: k=5 must be in \(0, n=4\)"):
        SubsetSelection(k=5)(torch.zeros(4))
    with pytest.raises(ValueError, match=r"SubsetSelection: k=4 must be in \(0, n=4\)"):
        SubsetSelection(k=4)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"SubsetSelection: k=4 must be in \(0, n=4\)"):
        SubsetSelection(k=4, backend="cvxpylayers")(torch.zeros(4))
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"SubsetSelection: k={bad!r} must be in \(0, n\)"):
            SubsetSelection(k=bad)
    with pytest.raises(TypeError, match="SubsetSelection: k must be a real number"):
        SubsetSelection(k="3")
    with pytest.raises(ValueError, match=r"SubsetSelection: fraction=1.0 must be in \(0, 1\)"):
        SubsetSelection(fraction=1.0)
    with pytest.raises(ValueError, match=r"SubsetSelection: fraction=0 must be in \(0, 1\)"):
        SubsetSelection(fraction=0)
    with pytest.raises(ValueError, match="exactly one of k= or fraction="):
        SubsetSelection(k=2, fraction=0.5)
    with pytest.raises(ValueError, match="exactly one of k= or fraction="):
        SubsetSelection()
    with pytest.raises(ValueError, match=r"select_subset: k=0.0 must be in \(0, n=3\)"):
        select_subset(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match=r"select_subset: k=3 must be in \(0, n=3\)"):
        select_subset(torch.zeros(3), 3)


def test_bad_lam_reg_backend_scores_rejected():
    for bad in (0, -0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=rf"SubsetSelection: lam={bad!r} must be a finite number > 0"):
            SubsetSelection(k=1, lam=bad)
    with pytest.raises(ValueError, match=r"select_subset: lam=0 must be a finite number > 0"):
        select_subset(torch.zeros(3), 1, lam=0)
    with pytest.raises(ValueError, match=r"SubsetSelection: reg='l1' is not one of 'quadratic', 'entropy'"):
        SubsetSelection(k=1, reg="l1")
    with pytest.raises(ValueError, match=r"select_subset: reg='l2' is not one of"):
        select_subset(torch.zeros(3), 1, reg="l2")
    with pytest.raises(ValueError, match=r"SubsetSelection: backend='scs' is not one of 'exact', 'cvxpylayers'"):
        SubsetSelection(k=1, backend="scs")
    with pytest.raises(ValueError, match="solver_args only applies to backend='cvxpylayers'"):
        SubsetSelection(k=1, solver_args={"eps_abs": 1e-6})
    with pytest.raises(ValueError, match="scores contain NaN or inf"):
        select_subset(torch.tensor([0.0, float("nan"), 1.0]), 1)
    with pytest.raises(TypeError, match="floating-point"):
        SubsetSelection(k=1)(torch.arange(3))
    with pytest.raises(ValueError, match="0-d tensor"):
        select_subset(torch.tensor(1.0), 1)


def test_fraction_below_one_item_is_a_valid_budget():
    """fraction * n may be under 1 (0 < k < n is the only bound): 0.1 of 5 items selects 0.5 of an item."""
    w = SubsetSelection(fraction=0.1)(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=DT))
    assert w.sum().item() == pytest.approx(0.5, abs=1e-12) and int(w.argmax()) == 4


def test_one_element_tensor_k_and_lam_are_numbers():
    """A 0-d (or one-element) tensor k / lam is read as its number; a longer tensor is refused by shape."""
    s = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=DT)
    expect = select_subset(s, 2.0, lam=0.5)
    assert torch.equal(select_subset(s, torch.tensor(2.0), lam=torch.tensor([0.5])), expect)
    assert torch.equal(SubsetSelection(k=torch.tensor(2))(s), SubsetSelection(k=2)(s))
    with pytest.raises(TypeError, match=r"select_subset: k must be a number, got a tensor of shape \(2,\)"):
        select_subset(s, torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------------------
# benchmark helper (tiny smoke run)
# ---------------------------------------------------------------------------
def test_benchmark_layer_smoke():
    rows = benchmark_layer(ns=(8,), batches=(1, 2), reps=1)
    assert [(r["n"], r["batch"]) for r in rows] == [(8, 1), (8, 2)]
    for r in rows:
        assert r["skipped"] is None and r["exact_s"] > 0 and r["cvxpylayers_s"] > 0
        assert r["ratio"] == pytest.approx(r["cvxpylayers_s"] / r["exact_s"])
        assert r["max_abs_diff_w"] < CMP_TOL and r["max_abs_diff_grad"] < CMP_TOL


# ---------------------------------------------------------------------------
# fixed-step solve: no host synchronisation inside, one convergence test at the end
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fixed_steps_suffice(reg, dtype):
    """On typical problems (unit-scale scores, lam 0.05..5, any k) every row has converged after the fixed
    number of steps, so the fallback loop (and its per-chunk host syncs) never runs."""
    import valuekit.ops.selection as sel

    g = torch.Generator().manual_seed(11)
    for n, lam in [(1024, 0.05), (1024, 0.5), (257, 5.0), (64, 0.2)]:
        for k in (1.0, n / 4, n / 4 + 0.3, n - 1.5):
            s = torch.randn(32, n, generator=g, dtype=DT).to(dtype)
            lo, hi, tau = sel._bracket(s, k, lam, reg)
            # the order-statistic bracket really brackets the root
            f_lo, _ = sel._residual(s, lo, k, lam, reg)
            f_hi, _ = sel._residual(s, hi, k, lam, reg)
            assert (f_lo >= -1e-6).all() and (f_hi <= 1e-6).all()
            tau, *_, done = sel._rtsafe(s, k, lam, reg, tau, lo, hi, hi - lo, sel._FIXED_ITERS[reg])
            x = s - tau.unsqueeze(-1)
            lo, hi, _ = sel._bracket(x, k, lam, reg)
            t0 = torch.zeros_like(tau).clamp(min=lo, max=hi)
            *_, done = sel._rtsafe(x, k, lam, reg, t0, lo, hi, hi - lo, sel._FIXED_ITERS[reg])
            assert bool(done.all()), (n, lam, k)


def test_unconverged_rows_warn(monkeypatch):
    """Too few steps and no fallback budget: the solve says so (RuntimeWarning) instead of returning silently."""
    import valuekit.ops.selection as sel

    s = torch.randn(4, 300, generator=torch.Generator().manual_seed(1), dtype=DT)
    monkeypatch.setattr(sel, "_FIXED_ITERS", {"quadratic": 0, "entropy": 0})
    monkeypatch.setattr(sel, "_MAX_ITER", 0)
    with pytest.warns(RuntimeWarning, match=r"did not converge in 0 steps for \d of 4 rows"):
        sel._solve_threshold(s, 30.3, 0.5, "entropy")
    # with the normal budget the same problem converges without a warning and meets the constraint
    monkeypatch.undo()
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        w = select_subset(s, 30.3, reg="entropy", lam=0.5)
    assert (w.sum(-1) - 30.3).abs().max().item() < 1e-8


def test_solve_keeps_callers_thread_count():
    import valuekit.ops.selection as sel

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        s = torch.randn(3, 50, dtype=DT, requires_grad=True)
        seen = []
        real, real_fast = sel._solve_threshold, sel._quadratic_fast
        sel._solve_threshold = lambda *a, **kw: seen.append(("iterative", torch.get_num_threads())) or real(*a, **kw)
        sel._quadratic_fast = lambda *a: seen.append(("sorted", torch.get_num_threads())) or real_fast(*a)
        try:
            select_subset(s, 5.0).sum().backward()
            select_subset(s, 5.0, reg="entropy").sum().backward()
        finally:
            sel._solve_threshold, sel._quadratic_fast = real, real_fast
        # the solves themselves ran on one thread (the quadratic sort; both stages of the iterative solve)
        assert seen == [("sorted", 1), ("iterative", 1), ("iterative", 1)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("reg", REGS)
def test_polished_threshold_meets_the_budget_to_rounding(reg):
    """After the final Newton polish sum(w) = k to a few ulps of n numbers (float64), on 100 random problems;
    a polish step of the wrong sign leaves ~1e-12 for the entropy regulariser."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(100):
        n = int(torch.randint(3, 60, (1,), generator=g))
        k = float(torch.rand(1, generator=g) * (n - 1) + 0.5)
        lam = float(torch.rand(1, generator=g) * 2 + 0.05)
        s = torch.randn(n, generator=g, dtype=DT) * 3
        w = select_subset(s, k, lam=lam, reg=reg)
        worst = max(worst, abs(w.sum().item() - k) / (n * torch.finfo(DT).eps))
    assert worst <= 4.0


def test_sorted_quadratic_threshold_equals_the_iterative_solve(monkeypatch):
    """The one-sort quadratic solve (the default path) gives the iterative solver's weights, ties and
    large offsets included; when it cannot meet sum(w) = k it hands over to the iterative solve."""
    import valuekit.ops.selection as sel

    g = torch.Generator().manual_seed(5)
    cases = []
    for n, k in [(5, 2.5), (64, 32.0), (257, 0.7), (1024, 256.0), (9, 8.999)]:
        for lam in (1e-3, 0.5, 20.0):
            for off in (0.0, 1e4):
                s = torch.randn(6, n, generator=g, dtype=DT) * 3 + off
                s[0, : n // 2] = s[0, 0]  # ties
                cases.append((s, k, lam))
    fast = [sel._quadratic_fast(s, k, lam) for s, k, lam in cases]
    assert all(w is not None for w in fast)  # float64: the fast path is taken every time
    monkeypatch.setattr(sel, "_quadratic_fast", lambda *a: None)
    for w, (s, k, lam) in zip(fast, cases):
        ref = select_subset(s, k, lam=lam)
        assert (w - ref).abs().max().item() < 1e-9, (s.shape, k, lam)
        assert (w.sum(-1) - k).abs().max().item() < 1e-9
    monkeypatch.undo()
    # float32, scores of magnitude 100 against lam 1e-3: the sort cannot resolve tau, the iterative solve does
    s = (torch.randn(4, 7, generator=g, dtype=DT) * 3 + 100).float()
    assert sel._quadratic_fast(s, 1e-3, 1e-3) is None
    w = select_subset(s, 1e-3, lam=1e-3)
    assert (w.double() - select_subset(s.double(), 1e-3, lam=1e-3)).abs().max().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numpy_sorted_threshold_equals_the_torch_one(dtype):
    """The CPU path (numpy) and the device path (torch) of the one-sort solve give the same weights and hand
    over to the iterative solve on the same inputs."""
    from valuekit.ops.quadratic_threshold import _quadratic_fast_numpy, _quadratic_fast_torch

    g = torch.Generator().manual_seed(11)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for n, k in [(5, 2.5), (64, 32.0), (257, 0.7), (9, 8.999)]:
        for lam in (1e-3, 0.5, 20.0):
            s = (torch.randn(3, n, generator=g, dtype=torch.float64) * 3).to(dtype)
            s[0, : n // 2] = s[0, 0]  # ties
            a, b = _quadratic_fast_numpy(s.numpy(), k, lam), _quadratic_fast_torch(s, k, lam)
            assert (a is None) == (b is None), (n, k, lam)
            if a is not None:
                assert a.dtype == s.numpy().dtype
                assert np.abs(a - b.numpy()).max() < tol * max(1.0, k), (n, k, lam)
    big = (torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 100).float()
    assert _quadratic_fast_numpy(big.numpy(), 1e-3, 1e-3) is None and _quadratic_fast_torch(big, 1e-3, 1e-3) is None


def test_selection_without_a_graph_equals_the_differentiable_one():
    s = torch.randn(4, 64, generator=torch.Generator().manual_seed(3), dtype=DT, requires_grad=True)
    w = select_subset(s, 16.0, lam=0.5)
    with torch.no_grad():
        w0 = select_subset(s, 16.0, lam=0.5)
    assert w.requires_grad and not w0.requires_grad and torch.equal(w.detach(), w0)


def test_large_quadratic_inputs_take_the_iterative_solve(monkeypatch):
    """Beyond _SORT_MAX scores the two sorts cost more than the fixed-step solve (reports/speed.md): not used."""
    import valuekit.ops.selection as sel

    calls = []
    real = sel._quadratic_fast
    monkeypatch.setattr(sel, "_quadratic_fast", lambda *a: calls.append(a[0].numel()) or real(*a))
    s = torch.randn(32, 1024, generator=torch.Generator().manual_seed(2), dtype=DT)
    w = select_subset(s, 256.0, lam=0.5)
    select_subset(s[:16], 256.0, lam=0.5)
    assert calls == [16 * 1024] and (w.sum(-1) - 256.0).abs().max().item() < 1e-9
