"""DDS over sources: Wang et al., "Optimizing Data Usage via Differentiable Rewards", ICML 2020, Algorithm 2.

A scorer p(S | y; psi) chooses, for each sampled target y, which source S (language, domain,
annotator...) provides the training row. "Target" means the label y for a classification table, or
the English sentence id (`group`) for a multi-way parallel translation table. The available sources
of y are the sources having a row for y.

Algorithm 2, as implemented here:

* line 4 (load data with psi): the trainer's own `sampler` draws a target (by its row frequency),
  then a source S ~ p(S | y) among the available ones, then a row of (y, S) uniformly;
* lines 6-8: one model step on the batch mean loss; for every source present in the batch its mean
  gradient updates the moving average g[S] <- a1 * g[S] + a2 * grad_S. The per-source gradients come
  from ONE batched backward of the per-source loss sums (`torch.autograd.grad(is_grads_batched=True)`,
  a vmap over one-hot cotangents), or one backward per source present (`grad_method="loop"`: through
  the shared batch graph; `"split"`: a forward and backward of each source's own rows); never a
  per-example loop. The training gradient is their sum / batch size, so no extra backward is needed;
* lines 10-12: every `update_every` training examples, the reward of each source is
  r(S) = cos(g[S], g_dev) (or the dot product) with g_dev the dev gradient at the current model (the
  dev set is the target domain: dev rows of the target source when the dev table has sources), and
  psi takes `scorer_iters` REINFORCE steps  psi <- psi + lr * mean_y sum_{S available for y} r(S)
  grad_psi log p(S | y; psi) over `scorer_batch` sampled targets.

`init`: `uniform` (psi = 0), `tcs` (target-conditioned sampling: psi = log q(S), a similarity prior;
for feature tables the cosine between each source's class-conditional feature means and the dev
set's, for byte-text tables the character n-gram overlap with the target's text, or an explicit
`prior="es=0.4,gl=0.3,..."`), `target` (most mass on the target source).

values(): value = log p(S_i | y_i) of each training row under the final scorer; weight = p(S_i | y_i)
(the loop normalises weights to mean 1).

Under torchrun (valuekit.distributed) the sampler draws the global batch on every rank (shared
generator) and each rank trains on its slice; the per-source gradient sums and row counts are
all-reduced before the moving averages g[S] are updated (so g[S] is the global batch's mean gradient
of source S and the model step its mean gradient), usage counts are summed over ranks, and the dev
gradient and REINFORCE steps on psi are computed identically on every rank. Replicas stay identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from valuekit.config import setting
from valuekit.errors import InputError
from valuekit.trainers.api import Batch, StepRecord, TrainContext, per_example_loss
from valuekit.trainers.options import check_fields

DISTRIBUTED = True  # synchronised under torchrun (valuekit.distributed)

SAMPLING = ("categorical", "bernoulli")
INITS = ("uniform", "tcs", "target")


@dataclass
class Config:
    """Algorithm 2 settings (defaults from the paper where it gives them)."""

    sampling: str = setting("categorical", choices=SAMPLING)  # categorical: S ~ softmax over available sources | bernoulli: keep S w.p. sigmoid
    init: str = setting("uniform", choices=INITS)  # uniform | tcs (similarity prior) | target (mass on the target source)
    prior: str = ""  # explicit TCS prior "src=weight,...", used by init=tcs instead of the computed one
    tcs_temperature: float = setting(0.1, gt=0)  # q(S) = softmax(similarity / T) for the computed TCS prior
    target_mass: float = setting(0.9, gt=0, lt=1)  # init=target: p(target source | y) where it is available
    target_source: str = ""  # the dev set's source; "" = the single source of the dev table, if any
    conditional: bool = True  # psi is a (targets x sources) table; False: one logit vector shared by all targets
    reward: str = setting("cosine", choices=("cosine", "dot"))  # cosine | dot between g[S] and the dev gradient
    a1: float = 0.5  # gradient EMA decay, g[S] <- a1 * g[S] + a2 * grad
    a2: float = 1.0
    update_every: int = setting(640, ge=1)  # K: training examples between scorer updates
    scorer_iters: int = setting(1, ge=0)  # E: REINFORCE iterations per update; 0 = fixed scorer (uniform / TCS-only baselines)
    scorer_batch: int = setting(64, ge=1)  # targets sampled per REINFORCE iteration
    scorer_lr: float = setting(0.05, ge=0)
    scorer_optimizer: str = setting("adam", choices=("adam", "sgd"))  # adam | sgd (plain gradient ascent, as written in the paper)
    dev_batch_size: int = setting(256, ge=1)  # dev rows for g_dev (all when the dev set is smaller)
    grad_method: str = setting("auto", choices=("auto", "batched", "loop", "split"))  # batched (one vmapped backward) | loop (one backward per source present)
    # | split (forward + backward per source on its own rows) | auto: split for seq2seq and conv models, else batched

    def validate(self) -> None:
        check_fields(self)
        parse_prior(self.prior)


def parse_prior(text: str) -> dict[str, float]:
    """"es=0.4,gl=0.3" -> {"es": 0.4, "gl": 0.3}; InputError naming the bad item."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, val = item.partition("=")
        try:
            w = float(val)
        except ValueError:
            w = -1.0
        if not sep or not name or not (w >= 0 and math.isfinite(w)):
            raise InputError(f"multidds setting prior: item {item!r} is not source=weight with weight >= 0")
        out[name] = w
    return out


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


# ---------------------------------------------------------------- sampler


class SourceSampler:
    """Draws a target (by its share of rows), then a source from the trainer's p(S | y), then a row.

    bernoulli: each available source of the target is kept with probability sigmoid(psi) and one of the
    kept ones is taken uniformly (all available ones when none is kept). Stateless: its randomness is the
    run's generator, whose state the loop checkpoints.
    """

    def __init__(self, trainer: "Trainer"):
        self.t = trainer

    def next(self, size: int) -> torch.Tensor:
        t, g = self.t, self.t.ctx.generator
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
        u = torch.rand(size, generator=g, dtype=torch.float64)
        pick = t.cell_start[cell] + (u * t.cell_count[cell]).long().clamp_max(t.cell_count[cell] - 1)
        return t.cell_order[pick]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, ctx: TrainContext, cfg: Config):
        if ctx.source is None or not ctx.sources:
            raise InputError("method multidds needs a training table with a 'source' column (--source-col)")
        self.ctx, self.cfg = ctx, cfg
        self.model = ctx.build_model()
        self.opt = ctx.make_optimizer(self.model.parameters())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.num_sources = S = len(ctx.sources)
        # vmap over a GRU falls back to a slow per-cotangent loop; per-source sub-batches are ~2x cheaper there.
        # Convolutions too: the vmapped backward costs ~2.8x a uniform step on the resnet-style model at batch
        # 128 against ~1.5x for sub-batches (reports/speed.md); for all-Linear models the two cost the same.
        # (With BatchNorm, sub-batches normalise with their own statistics.)
        seq = getattr(self.model, "is_seq2seq", False)
        conv = any(isinstance(m, torch.nn.Conv2d) for m in self.model.modules())
        self.grad_method = cfg.grad_method if cfg.grad_method != "auto" else ("split" if seq or conv else "batched")

        group = getattr(ctx, "group", None)  # translation tables: the English sentence is the target
        key = (group if group is not None else ctx.y).cpu().long()
        self.row_key, self.row_src = key, ctx.source.cpu().long()
        self.num_keys = K = int(key.max()) + 1
        cell = key * S + self.row_src
        self.cell_order = torch.argsort(cell, stable=True)
        self.cell_count = torch.bincount(cell, minlength=K * S)
        self.cell_start = torch.cumsum(self.cell_count, 0) - self.cell_count
        self.avail = (self.cell_count > 0).view(K, S)
        self.key_prob = torch.bincount(key, minlength=K).double() / len(key)

        self.target = self._target_source()
        dev_rows = None
        if ctx.dev_source is not None and self.target is not None:
            dev_rows = (ctx.dev_source == self.target).nonzero().squeeze(1)
        self.dev_rows = dev_rows if dev_rows is not None and len(dev_rows) else None

        self.psi = torch.nn.Parameter(self._init_psi())
        self.scorer_opt = (torch.optim.Adam([self.psi], lr=cfg.scorer_lr) if cfg.scorer_optimizer == "adam"
                           else torch.optim.SGD([self.psi], lr=cfg.scorer_lr))
        nparam = sum(p.numel() for p in self.params)
        self.g = torch.zeros(S, nparam, device=ctx.device)  # g[S]: per-source gradient EMAs, flattened
        self.rewards = torch.full((S,), float("nan"))
        self.usage = torch.zeros(S, dtype=torch.int64)  # rows drawn per source since the last scorer update
        self.seen = 0
        self.sampler = SourceSampler(self)

    # ---- set-up helpers

    def _target_source(self) -> int | None:
        ctx, name = self.ctx, self.cfg.target_source
        if name:
            if name not in ctx.sources:
                raise InputError(f"multidds setting target_source={name!r}: not a training source {ctx.sources}")
            return ctx.sources.index(name)
        if ctx.dev_source is not None:
            codes = torch.unique(ctx.dev_source).tolist()
            if len(codes) == 1 and codes[0] >= 0:
                return int(codes[0])
        return None

    def rows_psi(self, keys: torch.Tensor) -> torch.Tensor:
        return self.psi[keys] if self.cfg.conditional else self.psi.expand(len(keys), -1)

    def _init_psi(self) -> torch.Tensor:
        cfg, S = self.cfg, self.num_sources
        rows = self.num_keys if cfg.conditional else 1
        psi = torch.zeros(rows, S)
        if cfg.init == "uniform":
            return psi
        if cfg.init == "target":
            if self.target is None:
                raise InputError("multidds init=target: set target_source (the dev table has no single source)")
            # p(target) = target_mass where available: logit gap log(m (n-1) / (1-m)) over n available sources
            n_av = (self.avail.sum(1) if cfg.conditional else self.avail.any(0).sum().view(1)).double()
            gap = torch.log(cfg.target_mass * (n_av - 1).clamp_min(1) / (1 - cfg.target_mass))
            psi[:, self.target] = gap.float()
            return psi
        q = self.tcs_prior()
        logq = torch.log(q.clamp_min(1e-6))
        if cfg.sampling == "bernoulli":
            logq = logq - logq.max()  # the most similar source starts at sigmoid(0) = 0.5
        return logq.float().expand(rows, S).clone()

    def tcs_prior(self) -> torch.Tensor:
        """q(S): the explicit prior, or softmax(similarity / T) of the computed TCS similarity."""
        ctx, cfg = self.ctx, self.cfg
        given = parse_prior(cfg.prior)
        if given:
            unknown = set(given) - set(ctx.sources)
            if unknown:
                raise InputError(f"multidds setting prior: unknown source {sorted(unknown)[0]!r} (sources {ctx.sources})")
            q = torch.tensor([given.get(s, 0.0) for s in ctx.sources], dtype=torch.float64)
            return q / q.sum() if q.sum() > 0 else torch.full_like(q, 1 / len(q))
        sim = torch.tensor(self.similarity(), dtype=torch.float64)
        return torch.softmax(sim / cfg.tcs_temperature, 0)

    def similarity(self) -> list[float]:
        """Per source: character 3-gram overlap with the dev text for byte-text tables (models with
        `decode_source`), else the mean cosine between its class-conditional feature means and the dev
        set's (centred at the dev mean) over the classes both have."""
        ctx = self.ctx
        dev_x, dev_y = self._dev_data()
        src = self.row_src.to(ctx.device)
        decode = getattr(self.model, "decode_source", None)
        if decode is not None:
            texts = {s: decode(ctx.x[src == i][:2000]) for i, s in enumerate(ctx.sources)}
            sims = char_ngram_similarity(texts, decode(dev_x[:2000]))
            return [sims[s] for s in ctx.sources]
        center = dev_x.mean(0)
        out = []
        for i in range(self.num_sources):
            mask = src == i
            xs, ys = ctx.x[mask], ctx.y[mask]
            cos = []
            for c in range(ctx.num_classes):
                a, b = xs[ys == c], dev_x[dev_y == c]
                if len(a) and len(b):
                    cos.append(F.cosine_similarity(a.mean(0) - center, b.mean(0) - center, dim=0).item())
            out.append(float(np.mean(cos)) if cos else 0.0)
        return out

    def _dev_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.ctx
        if self.dev_rows is None:
            return ctx.dev_x, ctx.dev_y
        return ctx.dev_x[self.dev_rows], ctx.dev_y[self.dev_rows]

    # ---- losses and gradients

    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        custom = getattr(self.model, "per_example_loss", None)
        return custom(x, y) if custom is not None else per_example_loss(self.model(x), y)

    def _source_grads(self, losses: torch.Tensor, src: torch.Tensor, present: torch.Tensor) -> list[torch.Tensor]:
        """Gradients of the per-source loss sums, each param stacked over the present sources (m, ...)."""
        onehot = (src.unsqueeze(0) == present.unsqueeze(1)).to(losses.dtype)  # (m, B)
        sums = onehot @ losses
        if self.grad_method == "batched" and len(present) > 1:
            eye = torch.eye(len(present), dtype=sums.dtype, device=sums.device)
            return list(torch.autograd.grad(sums, self.params, grad_outputs=eye, is_grads_batched=True,
                                            materialize_grads=True))
        per = [torch.autograd.grad(sums[j], self.params, retain_graph=j + 1 < len(present), materialize_grads=True)
               for j in range(len(present))]
        return [torch.stack(ps) for ps in zip(*per)]

    def dev_gradient(self) -> torch.Tensor:
        """Mean dev-batch gradient at the current model, flattened (g[S_dev] of Algorithm 2)."""
        dev_x, dev_y = self._dev_data()
        m = len(dev_y)
        if self.cfg.dev_batch_size < m:
            idx = torch.randperm(m, generator=self.ctx.generator)[: self.cfg.dev_batch_size].to(self.ctx.device)
            dev_x, dev_y = dev_x[idx], dev_y[idx]
        loss = self._losses(dev_x, dev_y).mean()
        grads = torch.autograd.grad(loss, self.params)
        return torch.cat([g.reshape(-1) for g in grads])

    def source_rewards(self, g_dev: torch.Tensor) -> torch.Tensor:
        """r(S) = cos(g[S], g_dev) (0 for a source never seen) or the dot product."""
        if self.cfg.reward == "dot":
            r = self.g @ g_dev
        else:
            r = F.cosine_similarity(self.g, g_dev.unsqueeze(0), dim=1, eps=1e-12)
        return r.detach().double().cpu().float()

    # ---- Algorithm 2

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if getattr(self.model, "per_example_loss", None) is not None:
            return self.model.per_example_loss(x, y), None
        logits = self.model(x)
        return per_example_loss(logits, y), logits.argmax(1) == y

    def _split_grads(self, batch: Batch, present: torch.Tensor):
        """grad_method=split: forward and backward each source's rows on their own (total work about one
        batch's; sequence models also trim each sub-batch to its own longest row)."""
        losses = torch.empty(len(batch.y), device=batch.y.device)
        correct = None
        per = []
        for s in present.tolist():
            rows = (batch.source == s).nonzero().squeeze(1)
            ls, cs = self._forward(batch.x[rows], batch.y[rows])
            losses[rows] = ls.detach().to(losses.dtype)
            if cs is not None:
                correct = torch.zeros(len(batch.y), dtype=torch.bool, device=cs.device) if correct is None else correct
                correct[rows] = cs
            per.append(torch.autograd.grad(ls.sum(), self.params, materialize_grads=True))
        return losses, correct, [torch.stack(ps) for ps in zip(*per)]

    def step(self, batch: Batch) -> StepRecord:
        self.model.train()
        src = batch.source
        present = torch.unique(src)
        if self.cfg.scorer_iters > 0 and self.grad_method == "split":
            losses, correct, grads = self._split_grads(batch, present)
        else:
            losses, correct = self._forward(batch.x, batch.y)
            if self.cfg.scorer_iters == 0:
                return self._fixed_step(batch, losses, correct)
            grads = self._source_grads(losses, src, present)
        B = len(losses)
        counts = torch.bincount(src, minlength=self.num_sources)[present].to(losses.dtype)
        if self.ctx.distributed:
            present, counts, grads, B = self._global_source_grads(present, counts, grads, B)
        for p, gs in zip(self.params, grads):
            p.grad = gs.sum(0) / B  # the batch-mean gradient, no extra backward
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            flat = torch.cat([gs.reshape(len(present), -1) for gs in grads], 1) / counts.unsqueeze(1)
            self.g[present] = self.cfg.a1 * self.g[present] + self.cfg.a2 * flat

        src_cpu = src.cpu()
        self.usage += self._global_usage(src_cpu)
        before = self.seen // self.cfg.update_every
        self.seen += B
        scorer_loss, log = None, batch.step == 1
        if self.seen // self.cfg.update_every > before:
            scorer_loss = self.update_scorer()
            log = True
        sources = self.source_summary() if log else None
        if log:
            self.usage.zero_()
        reward = self.rewards[src_cpu].to(losses.device)
        return StepRecord(loss=losses.detach(), reward=reward, scorer_loss=scorer_loss, sources=sources,
                          correct=correct)

    def _global_source_grads(self, present, counts, grads, B):
        """torchrun: the global batch's per-source gradient sums and row counts (all-reduced; sources absent
        from this rank's slice contribute zeros), as (present, counts, stacked grads, global batch size)."""
        S = self.num_sources
        full_counts = torch.zeros(S, dtype=counts.dtype, device=counts.device)
        full_counts[present] = counts
        fulls = []
        for gs in grads:
            f = torch.zeros((S, *gs.shape[1:]), dtype=gs.dtype, device=gs.device)
            f[present] = gs
            fulls.append(f)
        self.ctx.all_reduce_([full_counts, *fulls])
        present = (full_counts > 0).nonzero().squeeze(1)
        return present, full_counts[present], [f[present] for f in fulls], self.ctx.global_rows(B)

    def _global_usage(self, src_cpu: torch.Tensor) -> torch.Tensor:
        """Rows per source in the (global) batch."""
        used = torch.bincount(src_cpu, minlength=self.num_sources)
        self.ctx.all_reduce_([used])
        return used

    def _fixed_step(self, batch: Batch, losses: torch.Tensor, correct) -> StepRecord:
        """scorer_iters=0: a fixed scorer (init=uniform: uniform over the rows of a parallel table; init=tcs:
        TCS alone), so no per-source gradients are needed: one plain backward, usage still logged."""
        self.opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        self.ctx.sync_grads_(self.params)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.usage += self._global_usage(batch.source.cpu())
        before = self.seen // self.cfg.update_every
        self.seen += self.ctx.global_rows(len(losses))
        sources = None
        if batch.step == 1 or self.seen // self.cfg.update_every > before:
            sources = self.source_summary()
            self.usage.zero_()
        return StepRecord(loss=losses.detach(), sources=sources, correct=correct)

    def update_scorer(self) -> float:
        """Algorithm 2 lines 10-12: rewards from the gradient EMAs, then E REINFORCE steps on psi."""
        self.rewards = self.source_rewards(self.dev_gradient())
        rewards = torch.nan_to_num(self.rewards, nan=0.0)
        last = float("nan")
        for _ in range(self.cfg.scorer_iters):
            keys = torch.multinomial(self.key_prob, self.cfg.scorer_batch, replacement=True,
                                     generator=self.ctx.generator)
            loss = reinforce_loss(self.rows_psi(keys), self.avail[keys], rewards, self.cfg.sampling)
            self.scorer_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.scorer_opt.step()
            last = loss.item()
        return last

    @torch.no_grad()
    def mean_probs(self) -> torch.Tensor:
        """Mean over targets (by their row share) of p(S | y), 0 where S is unavailable."""
        rows = self.psi if self.cfg.conditional else self.psi.expand(self.num_keys, -1)
        p = source_log_probs(rows, self.avail, self.cfg.sampling).exp()
        return (self.key_prob.unsqueeze(1) * p.double()).sum(0)

    def source_summary(self) -> dict[str, tuple[float, int]]:
        probs = self.mean_probs()
        return {s: (float(probs[i]), int(self.usage[i])) for i, s in enumerate(self.ctx.sources)}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(mean loss, accuracy) for classifiers, exactly as the loop's own evaluation; for translation
        models (mean per-example token loss, corpus chrF / 100 of greedy translations against y)."""
        from valuekit.trainers.api import eval_mode, evaluate

        bs = self.ctx.config.eval_batch_size
        if not getattr(self.model, "is_seq2seq", False):
            return evaluate(self.model, x, y, bs)
        from valuekit.models import decode_bytes
        from valuekit.multilingual import chrf

        loss, hyps = 0.0, []
        with eval_mode(self.model):
            for i in range(0, len(y), bs):
                loss += self.model.per_example_loss(x[i: i + bs], y[i: i + bs]).sum().item()
                hyps += decode_bytes(self.model.translate(x[i: i + bs], max_len=y.shape[1]).cpu())
        return loss / len(y), chrf(hyps, decode_bytes(y.cpu())) / 100

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "psi": self.psi.detach().clone(),
                "scorer_opt": self.scorer_opt.state_dict(), "g": self.g, "rewards": self.rewards,
                "usage": self.usage, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        with torch.no_grad():
            self.psi.copy_(state["psi"])
        self.scorer_opt.load_state_dict(state["scorer_opt"])
        self.g.copy_(state["g"])
        self.rewards = state["rewards"].clone()
        self.usage.copy_(state["usage"])
        self.seen = int(state["seen"])

    @torch.no_grad()
    def values(self) -> dict:
        """value = log p(S_i | y_i) under the final scorer; weight = p(S_i | y_i)."""
        rows = self.psi if self.cfg.conditional else self.psi.expand(self.num_keys, -1)
        logp = source_log_probs(rows, self.avail, self.cfg.sampling)
        value = logp[self.row_key, self.row_src].double()
        return {"value": value, "weight": value.exp()}
