"""Differentiable convex subset selection.

Given scores ``s`` (one row per problem, ``n`` items per row) and a budget ``k``,
:class:`SubsetSelection` returns soft selection weights ``w`` in ``[0, 1]^n`` with
``sum(w) == k`` per row, the solution of the regularised relaxed subset program

    maximise_w   s . w  -  lam * R(w)
    subject to   0 <= w <= 1,   sum(w) = k

with ``R(w) = ||w||^2`` (``reg="quadratic"``) or the negative binary entropy
``R(w) = sum_i w_i log w_i + (1 - w_i) log(1 - w_i)`` (``reg="entropy"``).

This is a relaxed top-k, the layer valuekit's HOST-CP uses by default; it is not the paper's
representativeness program (that one is ``valuekit.ops.representatives``, ``--set representatives=true``),
and reports/papers.md measures both. Paper: S. Das, A. Singh,
S. Chatterjee, S. Bhattacharya and S. Bhattacharya, "Finding High-Value Training
Data Subset through Differentiable Convex Programming", ECML-PKDD 2021 (LNCS 12976,
doi:10.1007/978-3-030-86520-7_41).  The regulariser is what makes the layer useful
for learning: without it the program is a linear programme whose solution sits on a
vertex of the feasible polytope (a hard top-k), which is piecewise constant in ``s``,
so its gradient with respect to the scores is zero almost everywhere.  With
``lam > 0`` the solution moves smoothly with ``s`` and the gradients carry
information; larger ``lam`` gives smoother (flatter) weights.

Two backends:

* ``"exact"`` -- closed form.  The KKT conditions give
  ``w_i = clip((s_i - tau) / (2 lam), 0, 1)`` (quadratic) or
  ``w_i = sigmoid((s_i - tau) / lam)`` (entropy) with one scalar threshold ``tau``
  per row chosen so that ``sum(w) = k``.  Quadratic, up to ``_SORT_MAX`` scores: ``tau``
  by sorting the breakpoints (`valuekit.ops.quadratic_threshold`; numpy on the CPU), one Newton step on the free set.
  Entropy, larger inputs, and any row that misses ``sum(w) = k`` to rounding: a fixed
  number of batched, safeguarded Newton/bisection steps inside an order-statistic
  bracket, no host synchronisation inside the loop, convergence tested once at the
  end (bounded fallback + RuntimeWarning), then a re-centred second solve.  On CPU
  the solve runs on one intra-op thread (``_one_cpu_thread``).  The backward pass
  is analytic (implicit function theorem) -- see :func:`select_subset`.
* ``"cvxpylayers"`` -- the same program written in cvxpy (DPP, built once per
  ``n`` and cached) and differentiated by cvxpylayers/diffcp.  Slow; it is the
  reference implementation the exact backend is tested against.

``k`` and ``lam`` are constants of the layer: gradients flow to ``s`` only.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
from torch import nn

from valuekit.ops.quadratic_threshold import _quadratic_fast

__all__ = [
    "SubsetSelection",
    "select_subset",
    "REGULARISERS",
    "BACKENDS",
    "DEFAULT_SOLVER_ARGS",
]

REGULARISERS = ("quadratic", "entropy")
BACKENDS = ("exact", "cvxpylayers")

#: Default keyword arguments for the cvxpylayers backend, per regulariser (cvxpylayers
#: 1.2.0 solves through diffcp; these keys go to ``diffcp.solve_and_derivative_batch``
#: and on to the solver).  Chosen by measurement against the exact backend:
#: quadratic -> SCS with eps 1e-9 (~1e-9 in ``w``; Clarabel only reaches ~1e-6 on
#: this SOC-reformulated program); entropy -> Clarabel with tolerances 1e-12 (SCS
#: stalls near ~1e-5 when some ``w_i`` are ~1e-6, at the exp-cone boundary).
#: ``mode="lsmr"`` (scipy LSMR, tolerances 1e-10..1e-12) gives derivatives accurate to
#: ~1e-7 at a fraction of the cost of ``mode="dense"``; diffcp's default ``"lsqr"``
#: is only good to ~1e-5.
DEFAULT_SOLVER_ARGS: dict[str, dict[str, Any]] = {
    "quadratic": {
        "solve_method": "SCS",
        "eps_abs": 1e-9,
        "eps_rel": 1e-9,
        "max_iters": 100_000,
        "mode": "lsmr",
    },
    "entropy": {
        "solve_method": "Clarabel",
        "tol_gap_abs": 1e-12,
        "tol_gap_rel": 1e-12,
        "tol_feas": 1e-12,
        "tol_ktratio": 1e-10,
        "mode": "lsmr",
    },
}

# keys that only diffcp's solve_and_derivative understands (its solve-only path hands
# everything to the solver, which rejects them), passed per call when grads are needed
_DERIVATIVE_KEYS = ("mode", "n_jobs_backward", "derivative_kwargs")
_MAX_ITER = 100  # Newton/bisection steps at most for the threshold (the fallback path; typically unused)
# steps run without host synchronisation before convergence is tested once; chosen by measurement
# (test_fixed_steps_suffice): from the order-statistic bracket of _bracket, typical rows need 2-5
_FIXED_ITERS = {"quadratic": 6, "entropy": 8}
_SORT_MAX = 16384  # the quadratic one-sort solve up to this many scores; the two sorts cost more beyond (measured)
_NUMPY_COPY_WARNING = r"__array__ implementation doesn't accept a copy keyword"


# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------
def _as_real(value: Any, name: str, who: str) -> int | float:
    """Turn a Python/numpy/0-d torch number into int or float; TypeError otherwise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{who}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_reg(reg: Any, who: str) -> str:
    if not isinstance(reg, str) or reg not in REGULARISERS:
        raise ValueError(f"{who}: reg={reg!r} is not one of {', '.join(map(repr, REGULARISERS))}")
    return reg


def _check_backend(backend: Any, who: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{who}: backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    return backend


def _check_lam(lam: Any, who: str) -> float:
    lam = _as_real(lam, "lam", who)
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"{who}: lam={lam!r} must be a finite number > 0")
    return float(lam)


def _check_k(k: Any, n: int | None, who: str) -> int | float:
    """k must satisfy 0 < k < n (n=None: only k > 0 and finite can be checked yet)."""
    k = _as_real(k, "k", who)
    if n is None:
        if not (math.isfinite(k) and k > 0):
            raise ValueError(f"{who}: k={k!r} must be in (0, n) (0 < k < n, n = number of items per row)")
    elif not (math.isfinite(k) and 0 < k < n):
        raise ValueError(f"{who}: k={k!r} must be in (0, n={n})")
    return k


def _check_fraction(fraction: Any, who: str) -> float:
    fraction = _as_real(fraction, "fraction", who)
    if not (math.isfinite(fraction) and 0 < fraction < 1):
        raise ValueError(f"{who}: fraction={fraction!r} must be in (0, 1)")
    return float(fraction)


def _check_scores(s: Any, who: str) -> torch.Tensor:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{who}: scores must be a torch.Tensor, got {type(s).__name__}")
    if not s.is_floating_point():
        raise TypeError(f"{who}: scores must be a floating-point tensor, got dtype {s.dtype}")
    if s.dim() < 1:
        raise ValueError(f"{who}: scores must have shape (n,) or (batch, n), got a 0-d tensor")
    if s.numel() and not bool(torch.isfinite(s).all()):
        raise ValueError(f"{who}: scores contain NaN or inf")
    return s


# ---------------------------------------------------------------------------
# exact backend
# ---------------------------------------------------------------------------
def _residual(s: torch.Tensor, tau: torch.Tensor, k: float, lam: float, reg: str):
    """f(tau) = sum_i w_i(tau) - k and its (generalised) slope -f'(tau) >= 0, per row."""
    z = s - tau.unsqueeze(-1)
    if reg == "quadratic":
        two_lam = 2.0 * lam
        w = (z / two_lam).clamp(0.0, 1.0)
        df = ((z > 0) & (z < two_lam)).sum(-1).to(s.dtype) / two_lam
    else:
        w = torch.sigmoid(z / lam)
        df = (w * (1.0 - w)).sum(-1) / lam
    return w.sum(-1) - k, df


def _bracket(s: torch.Tensor, k: float, lam: float, reg: str):
    """(lo, hi, initial tau) per row with f(lo) >= 0 >= f(hi), from order statistics (no sort).

    With j = ceil(k) and s_(j) the j-th largest score: at tau = s_(j) at most j - 1 < k items have
    w > 0 in the quadratic case, each <= 1, so f <= 0; at tau = s_(j) - 2 lam the top j items have w = 1,
    so f >= 0: a bracket of width 2 lam.  Entropy, with m = floor(k) + 1 <= n: at tau = s_(m) - lam log(m /
    (m - k)) the top m items have w >= m / (2m - k), so f >= m^2 / (2m - k) - k = (m - k)^2 / (2m - k) >= 0;
    at tau = s_(j) + lam log((1 - q) / q), q = (k - j + 1) / (n - j + 1), the top j - 1 items give < j - 1
    and the other n - j + 1 items <= q each, so f < 0.  The closed-form bracket of all items (every w at
    its bound / at k / n) is intersected with it.  The initial tau is the bracket's midpoint.
    """
    n = s.shape[-1]
    j = math.ceil(k)
    s_j = s.kthvalue(n - j + 1, -1).values
    if reg == "quadratic":
        lo = torch.maximum(s_j - 2.0 * lam, s.amin(-1) - 2.0 * lam)
        hi = s_j
    else:
        m = math.floor(k) + 1
        s_m = s_j if m == j else s.kthvalue(n - m + 1, -1).values
        q = (k - j + 1) / (n - j + 1)
        c = lam * math.log(k / (n - k))  # lam * logit(k / n): every w_i >= k/n at min s - c
        lo = torch.maximum(s_m - lam * math.log(m / (m - k)), s.amin(-1) - c)
        hi = torch.minimum(s_j + lam * math.log((1 - q) / q), s.amax(-1) - c)
    return lo, hi, 0.5 * (lo + hi)


def _rtsafe(s, k, lam, reg, tau, lo, hi, dx_old, iters: int):
    """`iters` safeguarded Newton/bisection steps on all rows at once, no host synchronisation.

    Each step takes the Newton step when it stays inside the bracket and shrinks it fast enough
    (Numerical Recipes' rtsafe rule), bisection otherwise; rows that have converged stay put.
    Returns (tau, lo, hi, dx_old, done) with `done` the per-row convergence test at the returned tau.
    """
    finfo = torch.finfo(s.dtype)
    xtol = (1e-12 if s.dtype == torch.float64 else 1e-6) * lam
    # |sum(w) - k| at the rounding level of a sum of n weights also stops a row: the error of every w_i
    # is then below it too (|dw_i| <= |f| for both regularisers), and no tau in this dtype does better
    ftol = 2.0 * s.shape[-1] * finfo.eps
    for it in range(iters + 1):
        f, df = _residual(s, tau, k, lam, reg)
        lo = torch.where(f > 0, tau, lo)
        hi = torch.where(f < 0, tau, hi)
        has_slope = df > 0
        step = f / torch.where(has_slope, df, torch.ones_like(df))
        width = hi - lo
        done = (
            (f.abs() <= ftol)
            | (has_slope & (step.abs() <= xtol))
            | (width <= xtol)
            | (width <= 4 * finfo.eps * torch.maximum(lo.abs(), hi.abs()))
        )
        if it == iters:
            break
        newton = tau + step
        # non-strict: the order-statistic bracket can end exactly on the solution (f = 0 there)
        use_newton = has_slope & (newton >= lo) & (newton <= hi) & ((2 * f).abs() <= (dx_old * df).abs())
        new_tau = torch.where(use_newton, newton, 0.5 * (lo + hi))
        dx_old = torch.where(done, dx_old, (new_tau - tau).abs())
        tau = torch.where(done, tau, new_tau)
    return tau, lo, hi, dx_old, done


def _solve_threshold(
    s: torch.Tensor, k: float, lam: float, reg: str, tau0: torch.Tensor | None = None,
    iters: int | None = None, check: bool = True,
) -> torch.Tensor:
    """Per-row threshold tau with sum_i w_i(tau) = k; s is (B, n), returns (B,).

    sum_i w_i(tau) is non-increasing in tau, and a bracket [lo, hi] with f(lo) >= 0 >= f(hi) is
    known in closed form.  A fixed number of vectorised safeguarded Newton/bisection steps
    (:func:`_rtsafe`, ``iters``, default ``_FIXED_ITERS[reg]``) runs without any host
    synchronisation; convergence (Newton step or bracket below ``tol * lam``, tol 1e-12 in float64,
    1e-6 in float32, which bounds the error in w by ~tol) is tested once at the end (``check``).
    Rows that have not converged then get more steps, tested every ``_FIXED_ITERS`` steps, up to
    ``_MAX_ITER``; a RuntimeWarning names what is left if that is not enough.  A final Newton step
    polishes tau (exact on the active set for the quadratic regulariser).  ``tau0`` overrides the
    initial guess.
    """
    lo, hi, tau = _bracket(s, k, lam, reg)
    if tau0 is not None:
        tau = tau0.clamp(min=lo, max=hi)
    iters = _FIXED_ITERS[reg] if iters is None else iters
    tau, lo, hi, dx_old, done = _rtsafe(s, k, lam, reg, tau, lo, hi, hi - lo, iters)
    if check and s.shape[0] and not bool(done.all()):  # the one host synchronisation of a solve
        used = iters
        while used < _MAX_ITER:
            tau, lo, hi, dx_old, done = _rtsafe(s, k, lam, reg, tau, lo, hi, dx_old, _FIXED_ITERS[reg])
            used += _FIXED_ITERS[reg]
            if bool(done.all()):
                break
        else:
            f, _ = _residual(s, tau, k, lam, reg)
            warnings.warn(
                f"select_subset: the threshold did not converge in {_MAX_ITER} steps for "
                f"{int((~done).sum())} of {s.shape[0]} rows (max |sum(w) - k| = {f.abs().max().item():.3g}); "
                f"the weights of those rows are approximate",
                RuntimeWarning, stacklevel=4,
            )
    # polish: one more Newton step where it stays inside the bracket
    f, df = _residual(s, tau, k, lam, reg)
    has_slope = df > 0
    newton = tau + f / torch.where(has_slope, df, torch.ones_like(df))
    ok = has_slope & (newton >= lo) & (newton <= hi)
    return torch.where(ok, newton, tau)


def _weights(s: torch.Tensor, tau: torch.Tensor, lam: float, reg: str) -> torch.Tensor:
    z = s - tau.unsqueeze(-1)
    if reg == "quadratic":
        return (z / (2.0 * lam)).clamp(0.0, 1.0)
    return torch.sigmoid(z / lam)


def _select_vjp(w: torch.Tensor, g: torch.Tensor, lam: float, reg: str) -> torch.Tensor:
    """Vector-Jacobian product g^T dw/ds (implicit function theorem), rows independent.

    quadratic: on the free set F = {0 < w_i < 1}, dw_F/ds_F = (I - 1 1^T/|F|)/(2 lam),
    zero elsewhere, so grad_F = (g_F - mean_F g)/(2 lam) and 0 off F.
    entropy: with d_i = w_i (1 - w_i)/lam, dw/ds = diag(d) - d d^T / sum(d), so
    grad = d * (g - (d . g)/sum(d)).
    Written with differentiable ops on (w, g) so double backward works.
    """
    if reg == "quadratic":
        free = ((w > 0) & (w < 1)).to(g.dtype)
        count = free.sum(-1, keepdim=True).clamp(min=1.0)
        g_free = g * free
        mean = g_free.sum(-1, keepdim=True) / count
        return (g_free - mean * free) / (2.0 * lam)
    d = w * (1.0 - w) / lam
    total = d.sum(-1, keepdim=True).clamp(min=torch.finfo(d.dtype).tiny)
    return d * (g - (d * g).sum(-1, keepdim=True) / total)


class _one_cpu_thread:
    """Run a CPU solve on one intra-op thread, restoring the caller's count after.

    The solve is many small kernels on (batch, n) tensors.  With several OpenMP threads every reduction is a
    parallel region whose threads wait for each other; on a loaded machine each region then costs a time slice
    (190 ms instead of 2.7 ms per forward+backward, reports/speed.md).  One thread is never slower here.
    """

    def __init__(self, tensor: torch.Tensor):
        self.threads = torch.get_num_threads() if tensor.device.type == "cpu" else 1

    def __enter__(self):
        if self.threads > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.threads > 1:
            torch.set_num_threads(self.threads)


def _solve(s: torch.Tensor, k: float, lam: float, reg: str) -> torch.Tensor:
    """The weights of every row of a 2-D s (no graph)."""
    # Iterative path in two stages: tau1 on the raw scores, then re-centre (x = s - tau1 has only
    # the rounding error of one subtraction, relative to |x|) and solve for the small correction
    # from 0, which makes w and sum(w) accurate to the dtype's precision even when |tau| >> lam.
    with _one_cpu_thread(s):
        w = _quadratic_fast(s, k, lam) if reg == "quadratic" and 0 < s.numel() <= _SORT_MAX else None
        if w is None:
            tau = _solve_threshold(s, k, lam, reg, check=False)
            x = s - tau.unsqueeze(-1)
            tau = _solve_threshold(x, k, lam, reg, tau0=torch.zeros_like(tau))
            w = _weights(x, tau, lam, reg)
    return w


class _SelectSubset(torch.autograd.Function):
    """w = argmax s.w - lam R(w) s.t. 0<=w<=1, sum w = k, rows of a 2-D s; analytic backward."""

    @staticmethod
    def forward(ctx, s, k, lam, reg):
        w = _solve(s, k, lam, reg)
        ctx.lam, ctx.reg = lam, reg
        ctx.save_for_backward(w)
        return w

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            with _one_cpu_thread(g):
                grad = _select_vjp(w, g, ctx.lam, ctx.reg)
        return grad, None, None, None


def select_subset(s: torch.Tensor, k: float, *, reg: str = "quadratic", lam: float = 1.0) -> torch.Tensor:
    """Soft top-``k`` selection weights by the closed-form ("exact") solver.

    Solves, independently for every row of ``s`` (shape ``(..., n)``, any ``n >= 1``)::

        w = argmax_w  s . w - lam * R(w)   s.t.  0 <= w <= 1,  sum(w) = k

    with ``R(w) = ||w||^2`` for ``reg="quadratic"`` (sparse: entries far from the
    threshold are exactly 0 or 1) or ``R(w) = sum w log w + (1 - w) log(1 - w)`` for
    ``reg="entropy"`` (dense: every entry strictly inside (0, 1)).  This is the relaxed
    subset program of Das et al., ECML-PKDD 2021 (HOST-CP); see the module docstring.

    Args:
        s: floating-point scores of shape ``(n,)``, ``(batch, n)`` or ``(..., n)``;
            float16/bfloat16 are computed in float32 and cast back.
        k: budget, a real number with ``0 < k < n`` (need not be an integer).
        reg: ``"quadratic"`` or ``"entropy"``.
        lam: regularisation strength, finite and ``> 0``.

    Returns:
        ``w`` with the shape, dtype and device of ``s``; ``sum(w, -1) == k`` up to
        rounding (~1e-12 relative in float64).  Differentiable with respect to ``s``
        through an analytic backward (``k`` and ``lam`` are constants).  At the kinks
        of the quadratic case (some ``s_i - tau`` exactly 0 or ``2 lam``) the
        one-sided derivative that treats that item as not free is returned.

    Raises:
        ValueError: bad ``k``, ``lam``, ``reg`` or non-finite scores.
        TypeError: non-tensor or non-floating-point scores, non-numeric ``k``/``lam``.
    """
    who = "select_subset"
    s = _check_scores(s, who)
    reg = _check_reg(reg, who)
    lam = _check_lam(lam, who)
    n = s.shape[-1]
    k = float(_check_k(k, n, who))
    return _select_exact(s, k, lam, reg)


def _select_exact(s: torch.Tensor, k: float, lam: float, reg: str) -> torch.Tensor:
    """select_subset without validation (k, lam already floats, 0 < k < n)."""
    shape, dtype = s.shape, s.dtype
    x = s if dtype in (torch.float32, torch.float64) else s.float()
    rows = x.reshape(-1, shape[-1])
    if torch.is_grad_enabled() and rows.requires_grad:
        w = _SelectSubset.apply(rows, k, lam, reg)
    else:  # no graph wanted (HOST-CP's steps without a selector update): skip the autograd.Function's cost
        w = _solve(rows, k, lam, reg)
    return w.reshape(shape).to(dtype)


# ---------------------------------------------------------------------------
# cvxpylayers backend (reference)
# ---------------------------------------------------------------------------
def _merge_solver_args(reg: str, solver_args: dict[str, Any] | None) -> dict[str, Any]:
    """User solver_args over DEFAULT_SOLVER_ARGS[reg]; the default solver's own settings
    are dropped when the user picks another ``solve_method``."""
    defaults = DEFAULT_SOLVER_ARGS[reg]
    user = dict(solver_args or {})
    method = user.get("solve_method", defaults["solve_method"])
    if str(method).upper() == str(defaults["solve_method"]).upper():
        merged = dict(defaults)
    else:
        merged = {key: v for key, v in defaults.items() if key in _DERIVATIVE_KEYS}
    merged.update(user)
    return merged


def _build_cvxpy_layer(n: int, k: float, lam: float, reg: str, solver_args: dict[str, Any]):
    """The DPP program for one n as a cvxpylayers CvxpyLayer (parameter: s, variable: w)."""
    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer
    except ImportError as exc:  # pragma: no cover - both are package dependencies
        raise ImportError("SubsetSelection(backend='cvxpylayers') needs cvxpy and cvxpylayers") from exc
    w = cp.Variable(n)
    s = cp.Parameter(n)
    if reg == "quadratic":
        objective = cp.Maximize(s @ w - lam * cp.sum_squares(w))
        constraints = [w >= 0, w <= 1, cp.sum(w) == k]
    else:  # -R(w) = entr(w) + entr(1 - w)
        objective = cp.Maximize(s @ w + lam * cp.sum(cp.entr(w) + cp.entr(1 - w)))
        # 0 <= w <= 1 is the domain of entr(w) + entr(1 - w); stating the bounds again
        # as constraints makes Clarabel stop at "inaccurate" (~1e-5) on some instances
        constraints = [cp.sum(w) == k]
    problem = cp.Problem(objective, constraints)
    assert problem.is_dpp()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NUMPY_COPY_WARNING)
        solve_args = {key: v for key, v in solver_args.items() if key not in _DERIVATIVE_KEYS}
        return CvxpyLayer(problem, parameters=[s], variables=[w], solver_args=solve_args)


class SubsetSelection(nn.Module):
    """Differentiable soft subset selection: scores ``s`` -> weights ``w`` in [0, 1]^n, sum k.

    Solves per row ``max_w s.w - lam R(w)  s.t. 0 <= w <= 1, sum(w) = k`` (the relaxed
    subset program of Das et al., ECML-PKDD 2021, HOST-CP) with ``R(w) = ||w||^2``
    (``reg="quadratic"``) or the negative binary entropy (``reg="entropy"``).  The
    regulariser (``lam > 0``) is what makes the gradients informative: the bare linear
    programme has a vertex (hard top-k) solution whose gradient is zero almost
    everywhere.

    Args (keyword-only):
        k: budget per row, real, ``0 < k < n`` (checked again at forward against n).
        fraction: alternatively ``k = fraction * n``, ``0 < fraction < 1``.
            Give exactly one of ``k`` / ``fraction``.
        reg: ``"quadratic"`` or ``"entropy"``.
        lam: regularisation strength, finite, ``> 0``.
        backend: ``"exact"`` (closed form + analytic backward, see
            :func:`select_subset`; CPU/CUDA, float32/float64) or ``"cvxpylayers"``
            (reference: cvxpy program built once per n and cached, solved and
            differentiated by diffcp; runs on CPU in float64, the result is cast back
            to the input's dtype/device).
        solver_args: only for ``backend="cvxpylayers"``; merged over
            ``DEFAULT_SOLVER_ARGS[reg]`` (quadratic: SCS eps 1e-9; entropy: Clarabel
            tol 1e-12; LSMR derivative; the default solver's settings are dropped if
            another ``solve_method`` is given).  E.g.
            ``{"mode": "dense"}`` or ``{"solve_method": "Clarabel", "tol_gap_abs":
            1e-10}``.  ``mode``/``n_jobs_backward``/``derivative_kwargs`` are only
            passed when a gradient is needed.

    Input ``(n,)`` -> output ``(n,)``; ``(batch, n)`` -> ``(batch, n)`` (more leading
    dimensions are flattened into the batch and restored).  ``k``, ``fraction``,
    ``reg``, ``lam`` and ``backend`` are read-only after construction.
    """

    def __init__(
        self,
        *,
        k: float | None = None,
        fraction: float | None = None,
        reg: str = "quadratic",
        lam: float = 1.0,
        backend: str = "exact",
        solver_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        who = "SubsetSelection"
        if (k is None) == (fraction is None):
            raise ValueError(f"{who}: give exactly one of k= or fraction= (got k={k!r}, fraction={fraction!r})")
        self._k = None if k is None else _check_k(k, None, who)
        self._fraction = None if fraction is None else _check_fraction(fraction, who)
        self._reg = _check_reg(reg, who)
        self._lam = _check_lam(lam, who)
        self._backend = _check_backend(backend, who)
        if solver_args is not None:
            if self._backend != "cvxpylayers":
                raise ValueError(f"{who}: solver_args only applies to backend='cvxpylayers' (backend={backend!r})")
            if not isinstance(solver_args, dict):
                raise TypeError(f"{who}: solver_args must be a dict, got {type(solver_args).__name__}")
        self._solver_args = _merge_solver_args(self._reg, solver_args)
        # n -> CvxpyLayer; a plain dict so the layers stay out of state_dict/.to()
        self._layers: dict[int, Any] = {}

    k = property(lambda self: self._k, doc="Budget k, or None when fraction is used.")
    fraction = property(lambda self: self._fraction, doc="Budget as a fraction of n, or None.")
    reg = property(lambda self: self._reg, doc="Regulariser name.")
    lam = property(lambda self: self._lam, doc="Regularisation strength.")
    backend = property(lambda self: self._backend, doc="Backend name.")
    solver_args = property(lambda self: dict(self._solver_args), doc="cvxpylayers solver arguments (copy).")

    def __getstate__(self):
        # the cached cvxpy programs are rebuilt on demand; do not pickle/deepcopy them
        state = self.__dict__.copy()
        state["_layers"] = {}
        return state

    def budget(self, n: int) -> float:
        """The k used for rows of n items (validated: 0 < k < n)."""
        k = self._k if self._k is not None else self._fraction * n
        if self._fraction is not None and not 0 < k < n:
            raise ValueError(f"SubsetSelection: k={k!r} (fraction={self._fraction!r} of n={n}) must be in (0, n={n})")
        return float(_check_k(k, n, "SubsetSelection"))

    def cvxpy_layer(self, n: int):
        """The cached cvxpylayers layer for rows of n items (built on first use)."""
        layer = self._layers.get(n)
        if layer is None:
            layer = _build_cvxpy_layer(n, self.budget(n), self._lam, self._reg, self._solver_args)
            self._layers[n] = layer
        return layer

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.solve(_check_scores(s, "SubsetSelection"))

    def solve(self, s: torch.Tensor) -> torch.Tensor:
        """`forward` without the check of the scores, for a caller that made them (HOST-CP's selector): the
        check is a host sync every call."""
        n = s.shape[-1]
        k = self.budget(n)
        if self._backend == "exact":
            return _select_exact(s, k, self._lam, self._reg)
        shape = s.shape
        x = s.reshape(-1, n)
        if x.shape[0] == 0:
            return s.new_zeros(shape) + 0 * s  # keep the graph for empty batches
        layer = self.cvxpy_layer(n)
        x64 = x.to(device="cpu", dtype=torch.float64)
        per_call = {}
        if torch.is_grad_enabled() and x64.requires_grad:
            per_call = {key: v for key, v in self._solver_args.items() if key in _DERIVATIVE_KEYS}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NUMPY_COPY_WARNING)
            (w,) = layer(x64, solver_args=per_call)
        return w.reshape(shape).to(dtype=s.dtype, device=s.device)

    def extra_repr(self) -> str:
        budget = f"k={self._k!r}" if self._k is not None else f"fraction={self._fraction!r}"
        return f"{budget}, reg={self._reg!r}, lam={self._lam!r}, backend={self._backend!r}"
