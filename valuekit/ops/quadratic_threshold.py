"""The quadratic subset program's exact threshold by one sort (the default path of `valuekit.ops.selection`).

For w_i = clip((s_i - tau) / (2 lam), 0, 1) with sum(w) = k, the left side is piecewise linear in tau, so tau
is found exactly among the 2n breakpoints; one Newton step on the free set then meets the budget to rounding.
On the CPU it runs in numpy (dispatch of ~25 small torch kernels cost more than the arithmetic).
"""

from __future__ import annotations

import numpy as np
import torch


def _sorted_threshold(s: torch.Tensor, k: float, lam: float) -> torch.Tensor:
    """Quadratic case: the exact tau with sum_i clip((s_i - tau) / c, 0, 1) = k, c = 2 lam, by sorting.

    c f(p) = G(p) - G(p + c) with G(p) = sum_i max(s_i - p, 0) = S_j - j p (j = #{s_i > p}, S_j the sum of
    the j largest scores): piecewise linear, so f is evaluated at its 2n breakpoints {s_i, s_i - c} and
    interpolated where it crosses k (~20 kernels; the iterative solve took ~250: 8 ms at n = 64).
    """
    c, n = 2.0 * lam, s.shape[-1]
    v = s.sort(-1).values
    pts, order = torch.cat([v, v - c], -1).sort(-1)
    top = torch.cat([torch.zeros_like(v[..., :1]), v.flip(-1).cumsum(-1)], -1)  # top[:, j] = S_j
    from_v = order < n  # #{s_i > p}, #{s_i - c > p} from the merged order (a tie adds s_i - p = 0 either way)
    j1 = n - from_v.cumsum(-1)
    j2 = n - (~from_v).cumsum(-1)
    f = (top.gather(-1, j1) - j1 * pts - top.gather(-1, j2) + j2 * (pts + c)) / c
    i = ((f >= k).sum(-1, keepdim=True) - 1).clamp(0, 2 * n - 2)  # f is non-increasing along pts
    p0, p1, f0, f1 = pts.gather(-1, i), pts.gather(-1, i + 1), f.gather(-1, i), f.gather(-1, i + 1)
    step = torch.where(f0 > f1, (f0 - k) / torch.where(f0 > f1, f0 - f1, torch.ones_like(f0)), torch.zeros_like(f0))
    return (p0 + step.clamp(0, 1) * (p1 - p0)).squeeze(-1)


def _quadratic_fast(s: torch.Tensor, k: float, lam: float) -> torch.Tensor | None:
    """Weights from the sorted threshold, re-centred and polished by one Newton step on the free set
    (exact once the active set is right); None when a row misses sum(w) = k (then the iterative solve runs).
    On the CPU the same steps run in numpy: ~25 torch kernels on a batch of 64 cost ~0.3 ms of dispatch, a
    third of a small model's training step (reports/speed.md, HOST-CP on the MLP)."""
    if s.device.type == "cpu":
        w = _quadratic_fast_numpy(s.detach().numpy(), k, lam)
        return None if w is None else torch.from_numpy(w)
    return _quadratic_fast_torch(s, k, lam)


def _quadratic_fast_numpy(s: np.ndarray, k: float, lam: float) -> np.ndarray | None:
    """_quadratic_fast_torch in numpy for (rows, n) scores, step for step (float32 stays float32); gathers by
    flat index and clips by maximum/minimum, which cost a few microseconds where take_along_axis / clip cost ~10."""
    m, n = s.shape
    c = s.dtype.type(2.0 * lam)
    v = np.sort(s, -1)
    both = np.concatenate([v, v - c], -1)
    order = np.argsort(both, -1, kind="stable")
    pts = both.ravel()[order + (np.arange(m) * (2 * n))[:, None]]
    top = np.zeros((m, n + 1), dtype=s.dtype)  # top[:, j] = S_j, the sum of the j largest scores
    np.cumsum(v[:, ::-1], -1, out=top[:, 1:])
    from_v = order < n
    j1 = n - np.cumsum(from_v, -1)
    j2 = n - np.cumsum(~from_v, -1)
    flat, row = top.ravel(), (np.arange(m) * (n + 1))[:, None]
    f = (flat[j1 + row] - j1 * pts - flat[j2 + row] + j2 * (pts + c)) / c
    i = np.minimum(np.maximum((f >= k).sum(-1) - 1, 0), 2 * n - 2)
    r = np.arange(m)
    p0, p1, f0, f1 = pts[r, i], pts[r, i + 1], f[r, i], f[r, i + 1]
    gap = f0 - f1
    step = np.minimum(np.maximum(np.where(gap > 0, (f0 - k) / np.where(gap > 0, gap, 1), 0), 0), 1)
    x = s - (p0 + step.astype(s.dtype) * (p1 - p0))[:, None]
    nf = ((x > 0) & (x < c)).sum(-1, keepdims=True)
    excess = np.minimum(np.maximum(x / c, 0), 1).sum(-1, keepdims=True) - k
    w = np.minimum(np.maximum((x - (c * excess / np.maximum(nf, 1)).astype(s.dtype) * (nf > 0)) / c, 0), 1)
    tol = 2.0 * n * np.finfo(s.dtype).eps * max(1.0, k) ** 0.5
    return w if bool((np.abs(w.sum(-1) - k) <= tol).all()) else None


def _quadratic_fast_torch(s: torch.Tensor, k: float, lam: float) -> torch.Tensor | None:
    """_quadratic_fast on the scores' own device (~25 kernels; one host sync, the final budget check)."""
    c = 2.0 * lam
    x = s - _sorted_threshold(s, k, lam).unsqueeze(-1)
    free = (x > 0) & (x < c)
    nf = free.sum(-1, keepdim=True)
    excess = (x / c).clamp(0.0, 1.0).sum(-1, keepdim=True) - k
    w = ((x - torch.where(nf > 0, c * excess / nf.clamp(min=1), torch.zeros_like(excess))) / c).clamp(0.0, 1.0)
    tol = 2.0 * s.shape[-1] * torch.finfo(s.dtype).eps * max(1.0, k) ** 0.5
    return w if bool(((w.sum(-1) - k).abs() <= tol).all()) else None
