"""Pieces of multi-source DDS (valuekit.methods.multidds) that need no trainer: the scorer's log-probabilities
and REINFORCE objective, the TCS character n-gram similarity, and the per-source reward accumulator (mean and
standard error of the gradient-alignment reward), and the sampler that draws rows through the scorer. Each is tested
against a hand computation in
tests/test_multidds.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from valuekit.methods.multidds import Trainer as MultiSourceDDS

# ---------------------------------------------------------------- scorer maths (pure functions, tested by hand)


def source_log_probs(psi: torch.Tensor, avail: torch.Tensor, sampling: str) -> torch.Tensor:
    """log p(S | y) for every (target row of psi, source): masked log-softmax (categorical) or log sigmoid
    (bernoulli); -inf where the source is not available."""
    if sampling == "categorical":
        logp = torch.log_softmax(psi.masked_fill(~avail, float("-inf")), dim=-1)
    else:
        logp = F.logsigmoid(psi)
    return logp.masked_fill(~avail, float("-inf"))


def reinforce_loss(psi: torch.Tensor, avail: torch.Tensor, rewards: torch.Tensor, sampling: str) -> torch.Tensor:
    """Minus the Algorithm 2 objective for the sampled targets' scorer rows `psi` (T, S):
    -(1/T) sum_t sum_{S available for t} r(S) log p(S | t). Its gradient step is the REINFORCE update."""
    logp = source_log_probs(psi, avail, sampling)
    term = torch.where(avail, rewards.unsqueeze(0) * logp, torch.zeros_like(logp))
    return -term.sum(1).mean()


def char_ngram_similarity(texts: dict[str, list[str]], target: list[str], *, n: int = 3) -> dict[str, float]:
    """TCS similarity: Jaccard overlap between each source's and the target's character n-gram sets
    (the paper's heuristic prior ranks languages by such lexical similarity)."""

    def grams(rows):
        out = set()
        for t in rows:
            t = f" {t.lower()} "
            out.update(t[i: i + n] for i in range(max(len(t) - n + 1, 0)))
        return out

    tg = grams(target)
    sims = {}
    for s, rows in texts.items():
        g = grams(rows)
        sims[s] = len(g & tg) / max(len(g | tg), 1)
    return sims


# ---------------------------------------------------------------- reward estimate


class RewardAccumulator:
    """Per-source sums over one scorer interval, for the reward and its standard error.

    `add(present, gsums, counts, d)` takes one step's per-source gradient sums (m, P) over `counts` rows and the
    dev gradient d current at that step; the step's sample is q = <gsum / count, d>, weighted by its rows.
    `finish(kind)` returns (reward, se) per source (NaN where unseen): the weighted mean of the q's and the
    standard error of a weighted mean (ratio estimator, m / (m - 1) small-sample factor; NaN with one step),
    for `kind="cosine"` both divided by |mean row gradient| x mean |d|. `cols` restricts both vectors to some
    parameter coordinates (reward_params=encoder).
    """

    def __init__(self, num_sources: int, num_params: int, device, cols: torch.Tensor | None = None):
        self.cols = cols
        width = num_params if cols is None else len(cols)
        self.gsum = torch.zeros(num_sources, width, device=device)
        self.stats = torch.zeros(7, num_sources, dtype=torch.float64)  # w, wq, w2, w2q, w2q2, steps, w|d|

    def add(self, present: torch.Tensor, gsums: torch.Tensor, counts: torch.Tensor, d: torch.Tensor) -> None:
        if self.cols is not None:
            gsums, d = gsums[:, self.cols], d[self.cols]
        self.gsum[present] += gsums
        w = counts.double().cpu()
        q = (gsums @ d).double().cpu() / w
        dn = d.norm().double().cpu().expand_as(w)
        self.stats[:, present.cpu()] += torch.stack([w, w * q, w * w, w * w * q, w * w * q * q, torch.ones_like(w),
                                                     w * dn])

    def finish(self, kind: str = "dot") -> tuple[torch.Tensor, torch.Tensor]:
        w, wq, w2, w2q, w2q2, m, wdn = self.stats
        seen = w > 0
        r = torch.where(seen, wq / w.clamp_min(1e-300), torch.nan)
        ss = (w2q2 - 2 * r * w2q + r * r * w2).clamp_min(0)
        se = torch.where(m > 1, (m / (m - 1).clamp_min(1) * ss).sqrt() / w.clamp_min(1e-300), torch.nan)
        if kind == "cosine":
            gnorm = (self.gsum.double().cpu().norm(dim=1) / w.clamp_min(1e-300))
            scale = (gnorm * wdn / w.clamp_min(1e-300)).clamp_min(1e-30)
            r, se = r / scale, se / scale
        return r, torch.where(seen, se, torch.nan)

    def reset(self) -> None:
        self.gsum.zero_()
        self.stats.zero_()

    def state_dict(self) -> dict:
        return {"gsum": self.gsum, "stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        self.gsum.copy_(state["gsum"])
        self.stats.copy_(state["stats"])


# ---------------------------------------------------------------- sampler


class SourceSampler:
    """Draws a target uniformly, then a source from the trainer's p(S | y), then a row of (y, S)
    (`target_sampling="source"`: a source from p(S), then a row of that source).

    bernoulli: each available source of the target is kept with probability sigmoid(psi) and one of the
    kept ones is taken uniformly (all available ones when none is kept). Stateless: its randomness is the
    run's generator, whose state the loop checkpoints.
    """

    def __init__(self, trainer: MultiSourceDDS):
        self.t = trainer

    def next(self, size: int) -> torch.Tensor:
        t, g = self.t, self.t.ctx.generator
        u = torch.rand(size, generator=g, dtype=torch.float64)
        if t.cfg.target_sampling == "source":
            with torch.no_grad():
                probs = torch.softmax(t.psi[0].masked_fill(t.src_count == 0, float("-inf")), 0).double()
            src = torch.multinomial(probs, size, replacement=True, generator=g)
            pick = t.src_start[src] + (u * t.src_count[src]).long().clamp_max(t.src_count[src] - 1)
            return t.src_order[pick]
        keys = torch.multinomial(t.key_prob, size, replacement=True, generator=g)
        avail = t.avail[keys]
        with torch.no_grad():
            if t.cfg.sampling == "categorical":
                probs = source_log_probs(t.rows_psi(keys), avail, "categorical").exp()
            else:
                keep = (torch.rand(avail.shape, generator=g) < torch.sigmoid(t.rows_psi(keys))) & avail
                probs = torch.where(keep.any(1, keepdim=True), keep, avail).double()
        src = torch.multinomial(probs, 1, generator=g).squeeze(1)
        cell = keys * t.num_sources + src
        pick = t.cell_start[cell] + (u * t.cell_count[cell]).long().clamp_max(t.cell_count[cell] - 1)
        return t.cell_order[pick]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
