"""DDS over sources: Wang et al., "Optimizing Data Usage via Differentiable Rewards", ICML 2020, Algorithm 2.

A scorer p(S | y; psi) chooses, for each sampled target y, which source S (language, domain,
annotator...) provides the training row. "Target" means the label y for a classification table, or
the English sentence id (`group`) for a multi-way parallel translation table. The available sources
of y are the sources having a row for y.

Algorithm 2, as implemented here:

* line 4 (load data with psi): the trainer's own `sampler` draws a target uniformly (the paper: "assume a
  uniform distribution over the target sentence"), then a source S ~ p(S | y) among the sources having a
  row for y, then a row of (y, S) uniformly. `target_sampling="source"` is the official multiDDS code's
  language-level sampling instead: S ~ p(S), then a row of S uniformly;
* lines 6-8: one model step on the batch mean loss (one plain backward);
* the reward samples (`reward_from="probe"`, default, as the official multiDDS code): at each scorer update,
  every `update_every` training examples, the dev gradient d at the current model (the target domain: dev rows
  of the target source when the dev table has sources) and, for every source, `probe_batches` fresh batches of
  `probe_size` rows drawn uniformly from its rows; each batch's mean row gradient G gives a sample
  q = <G, d>. The reward of S is the mean of its samples with their standard error (`reward="cosine"` divides
  both by |mean gradient of S| |d|), so the rare target source gets as many rows as any other;
* `reward_from="train"` (Algorithm 2 lines 6-8 as written): the per-source gradient sums of every training
  batch (ONE batched backward of the per-source loss sums, `torch.autograd.grad(is_grads_batched=True)`, or one
  backward per source present, `grad_method="loop"`, or a forward and backward of each source's own rows,
  `"split"`; never a per-example loop; the training gradient is their sum / batch size) are dotted with the
  dev gradient of the previous update, q_t(S) = <G_t(S), d>, and the reward over the interval is the
  row-weighted mean of the q_t (= <mean row gradient of S, d>, the gradient average g[S]) with its standard
  error. The dev gradient lags the training gradients by at most `update_every` examples;
* `a1` blends each update's estimate with the previous one (r <- a1 r_old + (1 - a1) r_new; the official code
  keeps a0 = 0.05 of the old gradient). `reward_params="encoder"` takes the dot product over the source-side
  parameters only (embedding and encoder of a translation model). reports/multidds.md measures these choices;
* lines 10-12: psi takes `scorer_iters` REINFORCE steps  psi <- psi + lr * sum_S r(S) grad_psi log p(S)
  (the shared scorer, `conditional=False`: one logit per source, as the official multiDDS "base" data actor)
  or, with `conditional=True`, mean_y sum_{S available for y} r(S) grad_psi log p(S | y) over `scorer_batch`
  sampled targets. The reward does not depend on y, so a conditional scorer has nothing target-specific to
  learn from it; it is kept for priors (init=tcs) that differ per target.

`init`: `uniform` (psi = 0), `tcs` (target-conditioned sampling: psi = log q(S), a similarity prior;
for feature tables the cosine between each source's class-conditional feature means and the dev
set's, for byte-text tables the character n-gram overlap with the target's text, or an explicit
`prior="es=0.4,gl=0.3,..."`), `target` (most mass on the target source).

values(): value = log(p / p_uniform) for the row's source: log softmax(psi)_S + log(number of sources) for
the shared scorer, log p(S | y) + log(number of sources available for y) for the conditional one (log p
alone would rank a row highest whenever its target has a single source), log(2 sigmoid(psi)) for bernoulli;
weight = exp(value) (the loop normalises weights to mean 1); `scorer_logit` = psi of the row.
source_table(): one row per source (written to sources.parquet): final prob, centred logit, mean reward
and its standard error over the scorer updates, rows in the table and rows drawn.

Under torchrun (valuekit.training.distributed) the sampler draws the global batch on every rank (shared
generator) and each rank trains on its slice; the model gradient is averaged over ranks; with
reward_from=train the per-source gradient sums and row counts are all-reduced before they feed the reward
(so a source's sample is the global batch's mean gradient of that source); usage counts are summed over
ranks; the probe batches, the dev gradient and the REINFORCE steps on psi are computed identically on every
rank (same generator, same weights). Replicas stay identical. BatchNorm: the dev gradient runs in eval mode, the
probe batches under `valuekit.ops.modes.no_running_stats_update`: only model steps update the running statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from valuekit.config import setting
from valuekit.errors import InputError, refusal

# scorer maths, TCS similarity, reward accumulator and sampler live in source_scoring (re-exported here)
from valuekit.methods.source_scoring import (
    RewardAccumulator,
    SourceSampler,
    char_ngram_similarity,
    reinforce_loss,
    source_log_probs,
)
from valuekit.models.lm import is_lm
from valuekit.ops.losses import per_example_loss
from valuekit.ops.modes import eval_mode, no_running_stats_update
from valuekit.training.context import Batch, StepRecord, TrainContext
from valuekit.training.method import Method, MethodValues, register
from valuekit.training.options import check_fields

SAMPLING = ("categorical", "bernoulli")
INITS = ("uniform", "tcs", "target")


@dataclass
class Config:
    """Algorithm 2 settings. Paper / official multiDDS code where they give one; reward, a1, scorer_lr by the reward
    signal-to-noise measurements in reports/multidds.md; update_every by reports/suite-multidds-update-every.md."""

    # categorical: S ~ softmax over available sources | bernoulli: keep S w.p. sigmoid
    sampling: str = setting("categorical", choices=SAMPLING)
    # uniform | tcs (similarity prior) | target (mass on the target source)
    init: str = setting("uniform", choices=INITS)
    prior: str = ""  # explicit TCS prior "src=weight,...", used by init=tcs instead of the computed one
    tcs_temperature: float = setting(0.1, gt=0)  # q(S) = softmax(similarity / T) for the computed TCS prior
    target_mass: float = setting(0.9, gt=0, lt=1)  # init=target: p(target source | y) where it is available
    target_source: str = ""  # the dev set's source; "" = the single source of the dev table, if any
    conditional: bool = False  # True: psi is a (targets x sources) table; False: one logit vector for all targets
    # uniform: y ~ U(targets), S ~ p(S | y) (paper) | source: S ~ p(S) (official)
    target_sampling: str = setting("uniform", choices=("uniform", "source"))
    # probe: fresh batches per source at each update (official multiDDS) | train
    reward_from: str = setting("probe", choices=("probe", "train"))
    # (the training batches' per-source gradients between updates, Algorithm 2 lines 6-8)
    # reward_from=probe: batches per source per update (>= 2 gives a standard error)
    probe_batches: int = setting(2, ge=1)
    probe_size: int = setting(32, ge=1)  # reward_from=probe: rows per probe batch
    # dot | cosine between the source's gradient average and the dev gradient
    reward: str = setting("dot", choices=("dot", "cosine"))
    # all | encoder (source-side parameters of a translation model)
    reward_params: str = setting("all", choices=("all", "encoder"))
    # weight of the previous reward estimate, r <- a1 r_old + (1 - a1) r_new (official: 0.05)
    a1: float = setting(0.05, ge=0, lt=1)
    update_every: int = setting(1024, ge=1)  # K: training examples between scorer updates (reports/multidds.md)
    # E: REINFORCE iterations per update; 0 = fixed scorer (uniform / TCS-only baselines)
    scorer_iters: int = setting(1, ge=0)
    scorer_batch: int = setting(64, ge=1)  # targets sampled per REINFORCE iteration (conditional scorer only)
    scorer_lr: float = setting(0.05, ge=0)
    # adam | sgd (plain gradient ascent, as written in the paper)
    scorer_optimizer: str = setting("adam", choices=("adam", "sgd"))
    dev_batch_size: int = setting(256, ge=1)  # dev rows for the dev gradient (all when the dev set is smaller)
    # batched (one vmapped backward) | loop (one backward per source present)
    grad_method: str = setting("auto", choices=("auto", "batched", "loop", "split"))
    # | split (forward + backward per source on its own rows) | auto: split for seq2seq and conv models, else batched

    def validate(self) -> None:
        check_fields(self)
        if self.target_sampling == "source" and (self.conditional or self.sampling != "categorical"):
            raise InputError(f"multidds setting target_sampling={self.target_sampling!r}: source sampling needs "
                             "conditional=false and sampling=categorical")
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


# ---------------------------------------------------------------- trainer


@register("multidds", config=Config)
class Trainer(Method):
    distributed = True  # every reduction goes through the ctx kit: synchronised under torchrun

    def __init__(self, ctx: TrainContext, cfg: Config):
        if ctx.source is None or not ctx.sources:
            raise refusal("method multidds needs a training table with a 'source' column (--source-col)")
        self.ctx, self.cfg = ctx, cfg
        self.model = ctx.build_model()
        self.opt = ctx.make_optimizer(self.model.parameters())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.num_sources = S = len(ctx.sources)
        # vmap over a GRU falls back to a slow per-cotangent loop; per-source sub-batches are ~2x cheaper there.
        # Convolutions too: the vmapped backward costs ~2.8x a uniform step on the resnet-style model at batch
        # 128 against ~1.5x for sub-batches (reports/speed.md); for all-Linear models the two cost the same.
        # (With BatchNorm, sub-batches normalise with their own statistics.)
        lm = is_lm(ctx.config.model)  # causal-LM instruction tables: (N, L) token targets
        seq = getattr(self.model, "is_seq2seq", False) or lm
        conv = any(isinstance(m, torch.nn.Conv2d) for m in self.model.modules())
        self.grad_method = cfg.grad_method if cfg.grad_method != "auto" else ("split" if seq or conv else "batched")

        group = getattr(ctx, "group", None)  # translation tables: the English sentence is the target
        # the target a source is drawn for: the class, the English sentence, or one for all (instruction rows)
        key = (group if group is not None else torch.zeros(ctx.n, dtype=torch.long) if lm else ctx.y).cpu().long()
        self.row_key, self.row_src = key, ctx.source.cpu().long()
        self.num_keys = K = int(key.max()) + 1
        cell = key * S + self.row_src
        self.cell_order = torch.argsort(cell, stable=True)
        self.cell_count = torch.bincount(cell, minlength=K * S)
        self.cell_start = torch.cumsum(self.cell_count, 0) - self.cell_count
        self.avail = (self.cell_count > 0).view(K, S)
        has = (torch.bincount(key, minlength=K) > 0).double()
        self.key_prob = has / has.sum()  # targets are drawn uniformly (the paper's TCS assumption)
        self.src_order = torch.argsort(self.row_src, stable=True)
        self.src_count = torch.bincount(self.row_src, minlength=S)
        self.src_start = torch.cumsum(self.src_count, 0) - self.src_count

        self.target = self._target_source()
        dev_rows = None
        if ctx.dev_source is not None and self.target is not None:
            dev_rows = (ctx.dev_source == self.target).nonzero().squeeze(1)
        self.dev_rows = dev_rows if dev_rows is not None and len(dev_rows) else None

        self.psi = torch.nn.Parameter(self._init_psi())
        self.scorer_opt = (torch.optim.Adam([self.psi], lr=cfg.scorer_lr) if cfg.scorer_optimizer == "adam"
                           else torch.optim.SGD([self.psi], lr=cfg.scorer_lr))
        nparam = sum(p.numel() for p in self.params)
        self.acc = RewardAccumulator(S, nparam, ctx.device, self._reward_cols())
        self.d: torch.Tensor | None = None  # dev gradient at the last scorer update (the reward direction)
        self.rewards = torch.full((S,), float("nan"), dtype=torch.float64)  # blended reward per source
        self.reward_se = torch.full((S,), float("nan"), dtype=torch.float64)
        self.reward_log = torch.zeros(3, S, dtype=torch.float64)  # per source: updates, sum r, sum se^2
        self.usage = torch.zeros(S, dtype=torch.int64)  # rows drawn per source since the last scorer update
        self.drawn = torch.zeros(S, dtype=torch.int64)  # rows drawn per source over the run
        self.updated = torch.zeros(S, dtype=torch.bool)
        self.rows_seen = 0
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

    def _reward_cols(self) -> torch.Tensor | None:
        """Flattened coordinates of the parameters the reward's dot product runs over (None = all)."""
        if self.cfg.reward_params == "all":
            return None
        named = dict((id(p), n) for n, p in self.model.named_parameters())
        cols, start = [], 0
        for p in self.params:
            if named[id(p)].split(".")[0] in ("src_emb", "encoder"):
                cols.append(torch.arange(start, start + p.numel()))
            start += p.numel()
        if not cols:
            raise InputError("multidds setting reward_params=encoder: the model has no src_emb/encoder parameters "
                             "(a translation model's source side); use reward_params=all")
        return torch.cat(cols).to(self.ctx.device)

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
                raise InputError(
                    f"multidds setting prior: unknown source {sorted(unknown)[0]!r} (sources {ctx.sources})"
                )
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
        """Mean dev-batch gradient at the current model, flattened (g[S_dev] of Algorithm 2); dropout off, so
        the reward direction carries no dropout noise."""
        dev_x, dev_y = self._dev_data()
        m = len(dev_y)
        if self.cfg.dev_batch_size < m:
            idx = torch.randperm(m, generator=self.ctx.generator)[: self.cfg.dev_batch_size].to(self.ctx.device)
            dev_x, dev_y = dev_x[idx], dev_y[idx]
        with eval_mode(self.model), torch.enable_grad():
            loss = self._losses(dev_x, dev_y).mean()
            grads = torch.autograd.grad(loss, self.params, materialize_grads=True)
        return torch.cat([g.reshape(-1) for g in grads]).detach()

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
        from_train = self.cfg.scorer_iters > 0 and self.cfg.reward_from == "train"
        if from_train and self.d is None:
            self.d = self.dev_gradient()  # the first interval's reward direction: the dev gradient at theta_0
        if from_train and self.grad_method == "split":
            losses, correct, grads = self._split_grads(batch, present)
        else:
            losses, correct = self._forward(batch.x, batch.y)
            if not from_train:
                return self._plain_step(batch, losses, correct)
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
            gsums = torch.cat([gs.reshape(len(present), -1) for gs in grads], 1)
            self.acc.add(present, gsums, counts, self.d)

        src_cpu = src.cpu()
        used = self._global_usage(src_cpu)
        self.usage += used
        self.drawn += used
        before = self.rows_seen // self.cfg.update_every
        self.rows_seen += B
        scorer_loss, log = None, batch.step == 1
        if self.rows_seen // self.cfg.update_every > before:
            scorer_loss = self.update_scorer()
            log = True
        sources = self.source_summary(with_reward=scorer_loss is not None) if log else None
        if log:
            self.usage.zero_()
        reward = self.rewards[src_cpu].float().to(losses.device)
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

    def _plain_step(self, batch: Batch, losses: torch.Tensor, correct) -> StepRecord:
        """One plain backward on the batch: the model step when the rewards come from probe batches, or a
        fixed scorer (scorer_iters=0; init=uniform: uniform targets and sources; init=tcs: TCS alone)."""
        self.opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        self.ctx.sync_grads_(self.params)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        used = self._global_usage(batch.source.cpu())
        self.usage += used
        self.drawn += used
        before = self.rows_seen // self.cfg.update_every
        self.rows_seen += self.ctx.global_rows(len(losses))
        sources, scorer_loss = None, None
        if self.rows_seen // self.cfg.update_every > before and self.cfg.scorer_iters > 0:
            scorer_loss = self.update_scorer()
        if batch.step == 1 or self.rows_seen // self.cfg.update_every > before:
            sources = self.source_summary(with_reward=scorer_loss is not None)
            self.usage.zero_()
        reward = None if self.cfg.scorer_iters == 0 else self.rewards[batch.source.cpu()].float().to(losses.device)
        return StepRecord(loss=losses.detach(), reward=reward, scorer_loss=scorer_loss, sources=sources,
                          correct=correct)

    def probe(self) -> None:
        """reward_from=probe: the dev gradient at the current model, then `probe_batches` batches of
        `probe_size` rows drawn uniformly from each source's rows, each batch's gradient sum fed to the reward
        accumulator (the official multiDDS code takes one such batch per language at each update)."""
        self.d = self.dev_gradient()
        g, cfg = self.ctx.generator, self.cfg
        was = self.model.training
        self.model.train()
        with no_running_stats_update(self.model):  # BatchNorm: probe rows measure; only model steps update
            for s in range(self.num_sources):
                n = int(self.src_count[s])
                if n == 0:
                    continue
                for _ in range(cfg.probe_batches):
                    u = torch.rand(min(cfg.probe_size, n), generator=g, dtype=torch.float64)
                    rows = self.src_order[self.src_start[s] + (u * n).long().clamp_max(n - 1)].to(self.ctx.device)
                    losses, _ = self._forward(self.ctx.x[rows], self.ctx.y[rows])
                    grads = torch.autograd.grad(losses.sum(), self.params, materialize_grads=True)
                    gsum = torch.cat([x.reshape(-1) for x in grads]).unsqueeze(0)
                    self.acc.add(torch.tensor([s], device=self.ctx.device), gsum,
                                 torch.tensor([float(len(rows))], device=self.ctx.device), self.d)
        self.model.train(was)

    def interval_rewards(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This interval's per-source reward and standard error (NaN for sources not drawn in it)."""
        return self.acc.finish(self.cfg.reward)

    def update_scorer(self) -> float:
        """Algorithm 2 lines 10-12: the rewards (probe batches at the current model, or the training interval's;
        blended with the previous ones by a1), then E REINFORCE steps on psi, then (reward_from=train) the dev
        gradient for the next interval."""
        if self.cfg.reward_from == "probe":
            self.probe()
        r, se = self.interval_rewards()
        self.acc.reset()
        seen = ~torch.isnan(r)
        a1 = self.cfg.a1
        fresh = seen & torch.isnan(self.rewards)
        old_r, old_se = self.rewards.nan_to_num(0.0), self.reward_se.nan_to_num(0.0)
        blend_r = torch.where(fresh, r, a1 * old_r + (1 - a1) * r)
        blend_se = torch.where(fresh, se, torch.sqrt((a1 * old_se) ** 2 + ((1 - a1) * se) ** 2))
        self.updated = seen  # which sources this update observed (the others keep their reward, logged as NaN)
        self.rewards = torch.where(seen, blend_r, self.rewards)
        self.reward_se = torch.where(seen, blend_se, self.reward_se)
        self.reward_log[0] += seen.double()
        self.reward_log[1] += torch.where(seen, self.rewards, 0.0)
        self.reward_log[2] += torch.where(seen, self.reward_se.nan_to_num(0.0) ** 2, 0.0)
        rewards = torch.nan_to_num(self.rewards, nan=0.0).float()
        last = float("nan")
        shared = not self.cfg.conditional and self.cfg.sampling == "categorical"
        for _ in range(self.cfg.scorer_iters):
            if shared:  # the official multiDDS "base" actor: -sum_S r(S) log softmax(psi)_S
                loss = reinforce_loss(self.psi, torch.ones_like(self.psi, dtype=torch.bool), rewards, "categorical")
            else:
                keys = torch.multinomial(self.key_prob, self.cfg.scorer_batch, replacement=True,
                                         generator=self.ctx.generator)
                loss = reinforce_loss(self.rows_psi(keys), self.avail[keys], rewards, self.cfg.sampling)
            self.scorer_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.scorer_opt.step()
            last = loss.item()
        if self.cfg.reward_from == "train":
            self.d = self.dev_gradient()
        return last

    @torch.no_grad()
    def mean_probs(self) -> torch.Tensor:
        """The scorer's probability of each source: softmax(psi) for the shared categorical scorer, else the
        mean over targets (uniform) of p(S | y), 0 where S is unavailable."""
        if not self.cfg.conditional and self.cfg.sampling == "categorical":
            return torch.softmax(self.psi[0].double(), 0)
        rows = self.psi if self.cfg.conditional else self.psi.expand(self.num_keys, -1)
        p = source_log_probs(rows, self.avail, self.cfg.sampling).exp()
        return (self.key_prob.unsqueeze(1) * p.double()).sum(0)

    def source_summary(self, with_reward: bool = False) -> dict[str, tuple]:
        """source -> (prob, rows drawn since the last log, reward, reward_se) for sources/ (reward NaN when
        no scorer update happened at this step or it did not observe the source)."""
        probs = self.mean_probs()
        nan = float("nan")
        upd = self.updated if with_reward else torch.zeros(self.num_sources, dtype=torch.bool)
        return {s: (float(probs[i]), int(self.usage[i]), float(self.rewards[i]) if upd[i] else nan,
                    float(self.reward_se[i]) if upd[i] else nan) for i, s in enumerate(self.ctx.sources)}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(mean loss, accuracy) for classifiers, exactly as the loop's own evaluation; for translation
        models (mean per-example token loss, corpus chrF / 100 of greedy translations against y)."""
        from valuekit.training.context import evaluate

        bs = self.ctx.config.eval_batch_size
        if not getattr(self.model, "is_seq2seq", False):
            return evaluate(self.model, x, y, bs)
        from valuekit.data.multilingual import chrf
        from valuekit.models.builtin import decode_bytes

        loss, hyps = 0.0, []
        with eval_mode(self.model, no_grad=True):
            for i in range(0, len(y), bs):
                loss += self.model.per_example_loss(x[i: i + bs], y[i: i + bs]).sum().item()
                hyps += decode_bytes(self.model.translate(x[i: i + bs], max_len=y.shape[1]).cpu())
        return loss / len(y), chrf(hyps, decode_bytes(y.cpu())) / 100

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "psi": self.psi.detach().clone(),
                "scorer_opt": self.scorer_opt.state_dict(), "acc": self.acc.state_dict(), "d": self.d,
                "rewards": self.rewards, "reward_se": self.reward_se, "reward_log": self.reward_log,
                "usage": self.usage, "drawn": self.drawn, "seen": self.rows_seen}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        with torch.no_grad():
            self.psi.copy_(state["psi"])
        self.scorer_opt.load_state_dict(state["scorer_opt"])
        self.acc.load_state_dict(state["acc"])
        self.d = None if state["d"] is None else state["d"].to(self.ctx.device)
        self.rewards = state["rewards"].clone()
        self.reward_se = state["reward_se"].clone()
        self.reward_log.copy_(state["reward_log"])
        self.usage.copy_(state["usage"])
        self.drawn.copy_(state["drawn"])
        self.rows_seen = int(state["seen"])  # checkpoint key kept: older runs resume

    @torch.no_grad()
    def _log_ratio(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log(p / p_uniform), psi) of every (target row of psi, source): see the module docstring."""
        cfg = self.cfg
        if cfg.sampling == "bernoulli":
            rows = self.psi if cfg.conditional else self.psi.expand(self.num_keys, -1)
            return F.logsigmoid(rows.double()) + math.log(2.0), rows
        if not cfg.conditional:
            return torch.log_softmax(self.psi.double(), 1) + math.log(self.num_sources), self.psi
        logp = source_log_probs(self.psi.double(), self.avail, "categorical")
        return logp + torch.log(self.avail.sum(1, keepdim=True).clamp_min(1).double()), self.psi

    @torch.no_grad()
    def values(self) -> MethodValues:
        """value = log(p(S_i | y_i) / p_uniform) of each row's source under the final scorer (unconfounded by
        how many sources translate the target); weight = exp(value); scorer_logit = psi of the row."""
        ratio, psi = self._log_ratio()
        key = self.row_key if ratio.shape[0] > 1 else torch.zeros_like(self.row_key)
        value = ratio[key, self.row_src]
        return MethodValues(
            value=value,
            columns={"weight": value.exp(), "scorer_logit": psi[key, self.row_src].double()},
            doc={
                "value": "log(p(source | target) / p_uniform) of the row's source under the final "
                "scorer (DDS Algorithm 2)",
                "weight": "exp(value), normalised to mean 1",
            },
        )

    @torch.no_grad()
    def source_table(self) -> pd.DataFrame:
        """One row per source: final prob (as in sources/), centred logit, uniform prob, mean reward over the
        scorer updates and its standard error (from the per-update standard errors), rows and rows drawn."""
        S = self.num_sources
        probs = self.mean_probs()
        if not self.cfg.conditional:
            logit = self.psi[0].double()
        else:  # mean over the targets where the source is available
            logit = (self.psi.double() * self.avail).sum(0) / self.avail.sum(0).clamp_min(1)
        logit = logit - logit.mean()
        saved = self.psi.detach().clone()
        self.psi.zero_()
        uniform = self.mean_probs()  # what a uniform scorer (psi = 0) gives
        self.psi.copy_(saved)
        n, rsum, se2 = self.reward_log
        mean_r = torch.where(n > 0, rsum / n.clamp_min(1), torch.nan)
        se = torch.where(n > 0, se2.sqrt() / n.clamp_min(1), torch.nan)
        return pd.DataFrame({
            "source": list(self.ctx.sources), "prob": probs.numpy(), "logit": logit.detach().numpy(),
            "uniform_prob": uniform.numpy(), "mean_reward": mean_r.numpy(), "reward_se": se.numpy(),
            "updates": n.long().numpy(), "rows": self.src_count.numpy(), "drawn": self.drawn.numpy(),
            "is_target": [i == self.target for i in range(S)],
        })
