"""HOST-CP's representativeness program as a differentiable layer (cvxpylayers), with a bounded memory.

Das et al., "Finding High-Value Training Data Subset through Differentiable Convex Programming"
(ECML-PKDD 2021, arXiv 2104.13794) select, online, a subset of each incoming mini-batch that is both
*valuable* (scores s from the selection model) and *representative*: every incoming point must be
represented either by a newly selected point of the batch or by a point selected earlier (kept in a
memory).  Our reading of that program, for a batch of B points with features f_1..f_B and m old
candidates o_1..o_m from the memory::

    minimise_{Zn, Zo, t}   <Dn, Zn> + <Do, Zo> - s . t + (ridge / 2) (||Zn||^2 + ||Zo||^2 + ||t||^2)
    subject to             Zn >= 0, Zo >= 0,  Zn 1 + Zo 1 = 1        (each point fully represented)
                           Zn_ij <= t_j                              (only selected points represent)
                           0 <= t <= 1,  sum(t) = k                  (budget on new representatives)

Dn_ij = alpha * ||f_i - f_j||^2 / scale (incoming i represented by new point j; Dn_ii = 0) and
Do_il = alpha * ||f_i - o_l||^2 / scale (by old point l), ``scale`` = mean of the positive entries of
Dn (so alpha sets the weight of representativeness against the scores whatever the feature scale).
``t`` (the soft selection of new representatives, sum k) is the layer's output used as example
weights; ``Zn``, ``Zo`` are the assignments.  A point well represented by the memory costs nothing to
leave out, so the budget goes to valuable points that cover what the memory does not.

The ridge term (``ridge > 0``) makes the program strictly convex, so the solution is unique and moves
smoothly with s (without it the program is a linear programme, vertex solutions, gradients ~0 almost
everywhere; cvxpylayers issue #127).  Everything is differentiated by cvxpylayers/diffcp; gradients
flow to s and, if the features require grad, to them through Dn/Do.

Memory (:class:`RepresentativeMemory`): a ring buffer of at most ``capacity`` previously selected
feature vectors (oldest evicted first).  For each batch the ``n_neighbors`` nearest memory points of
every incoming point (scikit-learn ``NearestNeighbors``, exact, Euclidean) form the old candidates;
their union, nearest first, capped at ``max_old``, padded with unusable slots (cost ``pad_cost``) so
that the program has a fixed size per batch size B and is built (canonicalised) once per B.

Cost: the program has B^2 + B*max_old + B variables and B^2 coupling constraints.  Measured on a
shared 2-core CPU (max_old = 16, default solver args; docs/history/hostcp.md): inside HOST-CP on digits
~40 ms per step at B = 16 and ~140 ms at B = 32 (the exact layer: ~3 ms), plus ~1-2 s to build the
program once per B; alone with random 10-d features ~0.8 s at B = 32 and ~3 s at B = 64 per
forward+backward.  Tens to thousands of times slower than the closed-form
:class:`valuekit.ops.selection.SubsetSelection`; it is an option, not the default.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["RepresentativeSelection", "RepresentativeMemory", "DEFAULT_SOLVER_ARGS"]

#: SCS on the QP with diffcp's default "lsqr" derivative (~1e-5 accurate).  Measured on this 2-core
#: CPU: B = 64, max_old = 16: "lsqr" ~3 s per forward+backward, "lsmr" (~1e-7 accurate) ~120 s;
#: pass {"mode": "lsmr", "eps_abs": 1e-10, "eps_rel": 1e-10} for reference-accuracy gradients (tests).
DEFAULT_SOLVER_ARGS: dict[str, Any] = {"solve_method": "SCS", "eps_abs": 1e-6, "eps_rel": 1e-6,
                                       "max_iters": 50_000, "mode": "lsqr"}
_DERIVATIVE_KEYS = ("mode", "n_jobs_backward", "derivative_kwargs")
_NUMPY_COPY_WARNING = r"__array__ implementation doesn't accept a copy keyword"


class RepresentativeMemory:
    """Bounded FIFO memory of previously selected feature vectors, queried by nearest neighbours."""

    def __init__(self, capacity: int = 512, *, n_neighbors: int = 2):
        if capacity < 1 or n_neighbors < 1:
            raise ValueError(f"RepresentativeMemory: capacity={capacity} and n_neighbors={n_neighbors} must be >= 1")
        self.capacity, self.n_neighbors = int(capacity), int(n_neighbors)
        self.feats: torch.Tensor | None = None  # (capacity, D), allocated on the first add
        self.rows = torch.full((self.capacity,), -1, dtype=torch.int64)  # training-row index, -1 = unknown
        self.count, self.ptr = 0, 0
        self._nn = None  # fitted sklearn NearestNeighbors, reset on every add

    def __len__(self) -> int:
        return self.count

    def add(self, feats: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Append feature rows (detached, stored on CPU); the oldest are overwritten when full."""
        feats = feats.detach().to("cpu")
        if len(feats) == 0:
            return
        if self.feats is None:
            self.feats = torch.zeros(self.capacity, feats.shape[1], dtype=feats.dtype)
        rows = torch.full((len(feats),), -1, dtype=torch.int64) if rows is None else rows.detach().to("cpu")
        for f, r in zip(feats[-self.capacity:], rows[-self.capacity:]):
            self.feats[self.ptr] = f
            self.rows[self.ptr] = r
            self.ptr = (self.ptr + 1) % self.capacity
            self.count = min(self.count + 1, self.capacity)
        self._nn = None

    def stored(self) -> torch.Tensor:
        """The stored feature vectors (count, D), oldest first."""
        if self.feats is None:
            return torch.zeros(0, 0)
        if self.count < self.capacity:
            return self.feats[: self.count]
        return torch.cat([self.feats[self.ptr:], self.feats[: self.ptr]])

    def candidates(self, queries: torch.Tensor, max_old: int) -> torch.Tensor:
        """Indices into :meth:`stored` of the old candidates for a batch: the union of each query's
        ``n_neighbors`` nearest stored points, ordered by distance, at most ``max_old``."""
        if self.count == 0 or max_old == 0:
            return torch.zeros(0, dtype=torch.int64)
        from sklearn.neighbors import NearestNeighbors

        if self._nn is None:
            self._nn = NearestNeighbors(n_neighbors=min(self.n_neighbors, self.count), algorithm="brute")
            self._nn.fit(self.stored().double().numpy())
        dist, idx = self._nn.kneighbors(queries.detach().to("cpu").double().numpy())
        order = np.argsort(dist.ravel(), kind="stable")
        _, first = np.unique(idx.ravel()[order], return_index=True)
        picked = idx.ravel()[order][np.sort(first)]  # unique, nearest first
        return torch.from_numpy(picked[:max_old].astype(np.int64))

    def state_dict(self) -> dict:
        return {"feats": self.feats if self.feats is not None else torch.zeros(0, 0), "rows": self.rows.clone(),
                "count": self.count, "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        self.feats = state["feats"].clone() if state["feats"].numel() else None
        self.rows = state["rows"].clone()
        self.count, self.ptr = int(state["count"]), int(state["ptr"])
        self._nn = None


def _build_program(B: int, m: int, k: float, ridge: float, solver_args: dict):
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    s = cp.Parameter(B)
    Dn = cp.Parameter((B, B))
    Do = cp.Parameter((B, m))
    t = cp.Variable(B)
    Zn = cp.Variable((B, B))
    Zo = cp.Variable((B, m))
    objective = (cp.sum(cp.multiply(Dn, Zn)) + cp.sum(cp.multiply(Do, Zo)) - s @ t
                 + ridge / 2 * (cp.sum_squares(Zn) + cp.sum_squares(Zo) + cp.sum_squares(t)))
    constraints = [Zn >= 0, Zo >= 0, cp.sum(Zn, axis=1) + cp.sum(Zo, axis=1) == 1,
                   Zn <= np.ones((B, 1)) @ cp.reshape(t, (1, B), order="C"),
                   t >= 0, t <= 1, cp.sum(t) == k]
    problem = cp.Problem(cp.Minimize(objective), constraints)
    assert problem.is_dpp()
    solve_args = {key: v for key, v in solver_args.items() if key not in _DERIVATIVE_KEYS}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NUMPY_COPY_WARNING)
        return CvxpyLayer(problem, parameters=[s, Dn, Do], variables=[t, Zn, Zo], solver_args=solve_args)


class RepresentativeSelection(nn.Module):
    """Scores s (B,) and features f (B, D) of one batch -> (t, Zn, Zo), the program of the module docstring.

    Args (keyword-only):
        k / fraction: budget on new representatives (exactly one; ``k = fraction * B``, ``1 <= k < B``).
        alpha: weight of the representation cost relative to the scores.
        ridge: strength of the ridge term (> 0; makes the gradients informative).
        capacity, n_neighbors, max_old: memory size, neighbours per incoming point, old candidates per batch.
        pad_cost: cost of the padding slots (never used when it exceeds every real cost).
        solver_args: merged over ``DEFAULT_SOLVER_ARGS`` (cvxpylayers/diffcp keys).

    ``forward`` does not change the memory; call :meth:`remember` with the points to keep.
    Any batch size B >= 2 works (a program is built and cached per B, e.g. a partial last batch).
    """

    def __init__(self, *, k: float | None = None, fraction: float | None = None, alpha: float = 1.0,
                 ridge: float = 0.1, capacity: int = 512, n_neighbors: int = 2, max_old: int = 16,
                 pad_cost: float = 100.0, solver_args: dict | None = None):
        super().__init__()
        who = "RepresentativeSelection"
        if (k is None) == (fraction is None):
            raise ValueError(f"{who}: give exactly one of k= or fraction= (got k={k!r}, fraction={fraction!r})")
        if fraction is not None and not 0 < fraction < 1:
            raise ValueError(f"{who}: fraction={fraction!r} must be in (0, 1)")
        if k is not None and not (math.isfinite(k) and k >= 1):
            raise ValueError(f"{who}: k={k!r} must be >= 1")
        for name, v in (("alpha", alpha), ("ridge", ridge), ("pad_cost", pad_cost)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{who}: {name}={v!r} must be a finite number > 0")
        if max_old < 0:
            raise ValueError(f"{who}: max_old={max_old!r} must be >= 0")
        self.k, self.fraction = k, fraction
        self.alpha, self.ridge, self.max_old, self.pad_cost = float(alpha), float(ridge), int(max_old), float(pad_cost)
        self.solver_args = {**DEFAULT_SOLVER_ARGS, **(solver_args or {})}
        self.memory = RepresentativeMemory(capacity, n_neighbors=n_neighbors)
        self._layers: dict[tuple[int, float], Any] = {}

    def budget(self, B: int) -> float:
        k = self.k if self.k is not None else self.fraction * B
        k = max(float(k), 1.0)  # every point must be representable when the memory is empty
        if not k < B:
            raise ValueError(f"RepresentativeSelection: budget k={k} must be < batch size {B}")
        return k

    def costs(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Dn, Do, old) for a batch: scaled squared distances to the batch and to the old candidates
        (padded to max_old columns with pad_cost), and the candidates' indices into memory.stored()."""
        f = feats.to(torch.float64)
        Dn = torch.cdist(f, f).pow(2)
        pos = Dn[Dn > 0]
        scale = pos.mean() if len(pos) else torch.ones((), dtype=f.dtype)
        old = self.memory.candidates(feats, self.max_old)
        Do = torch.full((len(f), self.max_old), self.pad_cost, dtype=f.dtype, device=f.device)
        if len(old):
            o = self.memory.stored()[old].to(device=f.device, dtype=f.dtype)
            Do = torch.cat([self.alpha * torch.cdist(f, o).pow(2) / scale, Do[:, len(old):]], dim=1)
        return self.alpha * Dn / scale, Do, old

    def forward(self, s: torch.Tensor, feats: torch.Tensor):
        B = s.shape[-1]
        if s.dim() != 1 or feats.dim() != 2 or feats.shape[0] != B:
            raise ValueError(f"RepresentativeSelection: scores (B,) and features (B, D) expected, got "
                             f"{tuple(s.shape)} and {tuple(feats.shape)}")
        k = self.budget(B)
        key = (B, k)
        if key not in self._layers:
            self._layers[key] = _build_program(B, self.max_old, k, self.ridge, self.solver_args)
        Dn, Do, _ = self.costs(feats)
        per_call = {}
        if torch.is_grad_enabled() and (s.requires_grad or feats.requires_grad):
            per_call = {key_: v for key_, v in self.solver_args.items() if key_ in _DERIVATIVE_KEYS}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NUMPY_COPY_WARNING)
            t, Zn, Zo = self._layers[key](s.to(device="cpu", dtype=torch.float64), Dn.cpu(), Do.cpu(),
                                          solver_args=per_call)
        # solver round-off: keep the weights inside [0, 1] (values are off by ~eps only)
        t = t.clamp(0.0, 1.0)
        return t.to(dtype=s.dtype, device=s.device), Zn, Zo

    def remember(self, feats: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Add selected points to the memory."""
        self.memory.add(feats, rows)

    def state_dict_memory(self) -> dict:
        return self.memory.state_dict()

    def load_state_dict_memory(self, state: dict) -> None:
        self.memory.load_state_dict(state)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_layers"] = {}
        return state
