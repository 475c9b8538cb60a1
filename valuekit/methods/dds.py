"""DDS: Differentiable Data Selection (Wang et al., "Optimizing Data Usage via Differentiable Rewards",
ICML 2020, Algorithm 1).

A scorer network gives every example of a mini-batch a logit s_i = s(x_i, y_i; psi); the batch
weights are p = softmax(s) and the model is trained on sum_i p_i l_i (logged as weight B * p_i, so a
uniform scorer is plain training; Alg. 1 lines 6-7). After the model step the reward of example i is

    r_i = grad_theta l(x_i, y_i; theta_{t-1}) . d_theta,   d_theta = mean dev-batch gradient at theta_t

(lines 9-11; `valuekit.ops.gradients.per_example_dots` with params = theta_{t-1}, or by default the same
exact dots from the model step's own activations, `reward_method=fused`), and the scorer takes a
REINFORCE step psi <- psi + lr * (1/B) sum_i r_i grad_psi log p_i (lines 12-13), every
`update_every` steps. Two additions, neither in the paper: rewards are divided by a moving root mean
square (`reward_norm="scale"`; a positive factor, so the direction stays REINFORCE's, whereas
subtracting a baseline would not, since the batch is drawn uniformly rather than from p), and a
squared-hinge penalty keeps the effective sample size of p above `ess_floor` (p never collapses onto a
few rows, but is free above the floor). The paper's update is `reward_norm=none, ess_floor=0,
entropy_weight=0`.

Variants: retrained DDS (`init_scorer=RUN_DIR` starts from the scorer of an earlier run, the paper's
best variant) and DDS with a prior (`prior=class_balance` first fits the scorer to the
class-frequency-balancing heuristic, like the paper's TCS+DDS).

values.parquet: value = the percentile rank of the run's -mean_loss over the table
(`signals.in_run_value`, reports/value-choice.md; measured better than every scorer-based candidate,
docs/benchmarks.md); scorer_logit = the trained scorer's logit of each training example (eval mode), weight = its
softmax over the whole training set times N; the loop adds mean_reward (the mean in-run gradient alignment with the
dev set) and mean_weight.

Under torchrun (valuekit.training.distributed) the batch of Algorithm 1 is the global batch: p is a softmax
over all ranks' rows (a differentiable all-reduce of the partition function), the dev gradient
d_theta is averaged over the ranks' slices of one global dev batch, rewards are computed locally
for each rank's rows, the reward baseline/std use global means, and model and scorer gradients are
all-reduced, so the replicas stay identical and the run equals a 1-process run with the global batch.

BatchNorm: the dev forward (line 9) runs in training mode, so the dev batch is normalised by its own
statistics and d_theta is the gradient of the training-mode dev loss, but under
`valuekit.ops.modes.no_running_stats_update`: the running mean/variance are updated by the model step's
training rows only, and the evaluated and exported model has never seen a dev row.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from valuekit.config import setting
from valuekit.errors import setting_error
from valuekit.methods.scorers import LabelMLP, label_mlp, token_bag_scorer
from valuekit.models.features import has_batchnorm, last_linear
from valuekit.models.lm import without_checkpointing
from valuekit.ops.gradients import DOT_METHODS, LayerTape, per_example_dots
from valuekit.ops.losses import per_example_loss
from valuekit.ops.modes import no_running_stats_update
from valuekit.runs.layout import CHECKPOINT
from valuekit.training.checkpoint import load_checkpoint
from valuekit.training.context import Batch, StepRecord, TrainContext
from valuekit.training.method import Method, MethodValues, register
from valuekit.training.options import check_fields
from valuekit.training.signals import margins

SCORERS = ("mlp", "same")
REWARD_NORMS = ("none", "scale", "baseline", "ema")
PRIORS = ("none", "class_balance")
REWARD_METHODS = (*DOT_METHODS, "fused")


@dataclass
class Config:
    """DDS settings. Defaults were tuned on digits with 20%/40% label flips and with imbalance 10 (MLP, batch 64,
    Adam 1e-3, 600-800 steps, 1-2 seeds); the reasons are in docs/history/dds.md."""

    # mlp: MLP over input features + label embedding | same: the model's family, logit at the label
    scorer: str = setting("mlp", choices=SCORERS)
    scorer_hidden: int = setting(64, ge=1)  # hidden width of the mlp scorer
    scorer_lr: float = setting(1e-3, ge=0)  # Adam learning rate of the scorer (0 freezes it: uniform or loaded weights)
    reward_scale: float = setting(1.0, finite=True)  # rewards are multiplied by this before the REINFORCE step
    # scale: divide by a moving average of the reward's root mean square (no shift, so the update stays
    #   REINFORCE's direction up to a positive factor; the default) | none: raw rewards (the paper) |
    # baseline / ema: subtract a moving average of the mean reward (ema: and divide by a moving std). The batch is
    #   drawn uniformly, not from p, so a shift b adds b (1/B - p_j) to the gradient of logit s_j: these two bias
    #   the update towards uniform weights and are kept only to reproduce older runs.
    reward_norm: str = setting("scale", choices=REWARD_NORMS)
    # effective-sample-size floor of the batch weights, ESS(p) = 1 / (B sum_i p_i^2) in (0, 1]: the scorer loss gets
    # ess_weight * max(0, ess_floor - ESS)^2, which stops p collapsing onto a few rows (training then diverges) but,
    # unlike an entropy bonus, does not pull p back towards uniform while ESS is above the floor. 0 turns it off.
    ess_floor: float = setting(0.3, ge=0, le=1)
    ess_weight: float = setting(10.0, ge=0)
    # weight of an entropy bonus on p (not in Algorithm 1). It caps legitimate reweighting (rare-class boost 1.4-1.6x
    # vs 3.8x with the ESS floor under 10x imbalance, docs/history/dds.md), so the default is 0; the ESS floor replaces
    # it.
    # The paper's update is entropy_weight=0, ess_floor=0, reward_norm=none.
    entropy_weight: float = setting(0.0, ge=0)
    reward_momentum: float = setting(0.9, ge=0, lt=1)  # moving-average momentum of the baseline / std
    # scorer update (dev gradient + rewards) every k model steps; other steps log no reward
    update_every: int = setting(4, ge=1)
    # dev examples per reward (0 = the training batch size); whole dev set if larger
    dev_batch_size: int = setting(64, ge=0)
    # exact (one jvp at theta_{t-1}) | taylor (the paper's finite difference) | ghost (Linear/Conv only), all three
    # from valuekit.ops.gradients; fused: the same exact dots from the layer inputs and output gradients that the
    # model step's own forward/backward already computed (no extra pass; Linear/Conv2d models only)
    reward_method: str = setting("fused", choices=REWARD_METHODS)
    # first steps train the model with uniform weights while the scorer already learns
    scorer_warmup: int = setting(100, ge=0)
    init_scorer: str = ""  # run directory of an earlier DDS run: start from its trained scorer (retrained DDS)
    # none | class_balance: fit softmax(scorer) to weights ~ 1/freq(y) before DDS
    prior: str = setting("none", choices=PRIORS)
    prior_steps: int = setting(200, ge=0)  # scorer steps of the prior fit
    prior_lr: float = 1e-2  # Adam learning rate of the prior fit

    def validate(self) -> None:
        check_fields(self)
        if self.init_scorer:
            if not (Path(self.init_scorer) / CHECKPOINT).exists():
                raise setting_error(f"init_scorer={self.init_scorer}: no {CHECKPOINT} in that run directory")
            if self.prior != "none":
                raise setting_error("init_scorer and prior: use one of them (both initialise the scorer)")

# ---------------------------------------------------------------- scorers


MLPScorer = LabelMLP  # s(x, y) = h(x) . E[y] + b[y] (valuekit.methods.scorers)


class SameScorer(nn.Module):
    """The model's family with one output per class; the logit of (x, y) is the output at y."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, y):
        return self.net(x).gather(1, y[:, None]).squeeze(1)


def build_scorer(ctx: TrainContext, cfg: Config) -> nn.Module:
    """The scorer, initialised from the run's generator, with a zero output layer so p starts uniform."""
    from valuekit.models.lm import is_lm

    if is_lm(ctx.config.model):  # instruction rows: token ids in, no class label to read out
        if cfg.scorer == "same":
            raise setting_error("scorer=same: not for causal-LM instruction tables (the model predicts tokens, "
                             "not a score); use the default scorer (a token-bag MLP)")
        return token_bag_scorer(ctx.num_classes, cfg.scorer_hidden, generator=ctx.generator, device=ctx.device)
    if cfg.scorer == "same":
        scorer = SameScorer(ctx.build_model())
        last = last_linear(scorer.net)[1]  # the classifier head of a built-in or a user's model
    else:
        # zero label read-out: uniform p at step 0, DDS starts as plain training
        return label_mlp(ctx.x.shape[1], ctx.num_classes, cfg.scorer_hidden, mean=ctx.mean, std=ctx.std,
                         generator=ctx.generator, device=ctx.device)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    return scorer.to(ctx.device)


# ---------------------------------------------------------------- the method


@register("dds", config=Config)
class Trainer(Method):
    distributed = True  # every reduction goes through the ctx kit: synchronised under torchrun

    def __init__(self, ctx: TrainContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.model = ctx.build_model()
        # the trainable parameters only: with LoRA adapters (--lora) the frozen base weights are not theta
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.opt = ctx.make_optimizer(self.params)
        self.scorer = build_scorer(ctx, cfg)
        if cfg.init_scorer:
            self._load_scorer(Path(cfg.init_scorer))
        elif cfg.prior == "class_balance":
            self._fit_class_balance_prior()
        # Adam regardless of the loop's optimizer: REINFORCE gradients vary in scale by orders of magnitude.
        self.scorer_opt = torch.optim.Adam(self.scorer.parameters(), lr=cfg.scorer_lr, foreach=True)
        self.tape = None
        # BatchNorm in training mode: a row's loss depends on the other rows, and the tape's split of the batch
        # gradient into rows is not grad l_i; the step then takes the forward-mode ("exact") dots instead
        batchnorm = has_batchnorm(self.model)
        if cfg.reward_method == "fused" and not batchnorm:
            try:
                self.tape = LayerTape(self.model)
            except NotImplementedError:  # layers other than Linear/Conv2d (a user's model): exact dots instead
                self.tape = None
        self.steps_taken = 0  # DDS steps taken (loop steps), for warm-up and update_every
        self.r_mean = torch.zeros((), dtype=torch.float64, device=ctx.device)  # moving baseline
        self.r_var = torch.ones((), dtype=torch.float64, device=ctx.device)
        self.r_seen = 0

    # -------------------------------------------------------- initialisation variants

    def _load_scorer(self, run_dir: Path) -> None:
        """Retrained DDS: copy the scorer of an earlier DDS run (its last checkpoint)."""
        path = run_dir / CHECKPOINT
        state = load_checkpoint(run_dir)
        scorer_state = state.get("trainer", {}).get("scorer") if isinstance(state, dict) else None
        if scorer_state is None:
            raise setting_error(f"init_scorer={run_dir}: {path} holds no DDS scorer (was it a dds run?)")
        try:
            self.scorer.load_state_dict(scorer_state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise setting_error(
                f"init_scorer={run_dir}: its scorer does not fit this data/scorer setting ({first}); "
                f"use the same data, scorer and scorer_hidden as that run"
            ) from None

    def _fit_class_balance_prior(self) -> None:
        """Fit softmax(s) over random batches to q_i ~ 1/freq(y_i) by cross-entropy (the class-balancing heuristic)."""
        ctx, cfg = self.ctx, self.cfg
        freq = torch.bincount(ctx.y, minlength=ctx.num_classes).double()
        q_all = (1.0 / freq.clamp_min(1))[ctx.y].float()
        opt = torch.optim.Adam(self.scorer.parameters(), lr=cfg.prior_lr)
        size = min(ctx.global_batch_size, ctx.n)  # replicated on every rank (same generator, same rows)
        self.scorer.train()
        for _ in range(cfg.prior_steps):
            idx = torch.randperm(ctx.n, generator=ctx.generator)[:size].to(ctx.device)
            q = q_all[idx] / q_all[idx].sum()
            loss = -(q * torch.log_softmax(self.scorer(ctx.x[idx], ctx.y[idx]), 0)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    # -------------------------------------------------------- Algorithm 1

    def _normalise(self, r: torch.Tensor) -> torch.Tensor:
        """Reward scale (and, for the legacy baseline/ema options, a moving-average shift; see Config)."""
        ctx, cfg = self.ctx, self.cfg
        r = r.double()
        if cfg.reward_norm == "scale":
            mom = cfg.reward_momentum if self.r_seen > 0 else 0.0  # first batch sets the average
            self.r_var = mom * self.r_var + (1 - mom) * ctx.global_mean(r * r)  # mean square, no centring
            self.r_seen += 1
            return cfg.reward_scale * r / self.r_var.sqrt().clamp_min(1e-30)
        if cfg.reward_norm != "none":
            mom = cfg.reward_momentum if self.r_seen > 0 else 0.0  # first batch sets the averages
            self.r_mean = mom * self.r_mean + (1 - mom) * ctx.global_mean(r)
            self.r_var = mom * self.r_var + (1 - mom) * ctx.global_mean((r - self.r_mean) ** 2)
            self.r_seen += 1
            r = r - self.r_mean
            if cfg.reward_norm == "ema":
                r = r / self.r_var.sqrt().clamp_min(1e-12)
        return cfg.reward_scale * r

    def _log_softmax(self, s: torch.Tensor) -> torch.Tensor:
        """log p over the global batch (line 6); differentiable in every rank's logits."""
        ctx = self.ctx
        if not ctx.distributed:
            return torch.log_softmax(s, 0)
        m = ctx.all_max(s.detach().max())
        return s - m - torch.log(ctx.all_sum(torch.exp(s - m).sum()))

    def step(self, batch: Batch) -> StepRecord:
        ctx, cfg = self.ctx, self.cfg
        self.steps_taken += 1
        x, y = batch.x, batch.y
        B = len(y)
        self.model.train()
        self.scorer.train()
        update = cfg.scorer_lr > 0 and self.steps_taken % cfg.update_every == 0
        with torch.set_grad_enabled(update):
            s = self.scorer(x, y)
            log_p = self._log_softmax(s)  # line 6: p over the (global) batch
        if self.steps_taken <= cfg.scorer_warmup:
            w = torch.ones(B, dtype=log_p.dtype, device=log_p.device)
        else:
            w = ctx.global_rows(B) * log_p.detach().exp()  # (global B) * p_i, so uniform p is plain training

        # lines 6-7: model step on sum_i p_i l_i, keeping theta_{t-1} for the reward
        theta_prev = {n: p.detach().clone() for n, p in zip(self.names, self.params)} if update else None
        tape = self.tape if update else None
        with tape or contextlib.nullcontext():
            logits = self.model(x)
        losses = per_example_loss(logits, y)
        self.opt.zero_grad(set_to_none=True)
        (w.to(losses.dtype) * losses).mean().backward()
        ctx.sync_grads_(self.model.parameters())
        self.opt.step()

        reward = scorer_loss = None
        if update:
            # line 9: d_theta = mean dev-batch gradient at theta_t
            dev_size = cfg.dev_batch_size or ctx.global_rows(B)
            dev_x, dev_y = ctx.sample_dev(dev_size)
            with no_running_stats_update(self.model):  # BatchNorm: the dev rows' own statistics, no running update
                dev_losses = per_example_loss(self.model(dev_x), dev_y)
            # torchrun: each rank's share of the global dev mean, summed over ranks below
            dev_obj = ctx.mean_share(dev_losses, ctx.dev_total(dev_size))
            # plain autograd on the module: same numbers as gradients.mean_gradient, less torch.func overhead
            d = dict(zip(self.names, torch.autograd.grad(dev_obj, self.params)))
            ctx.all_reduce_(d.values())
            # line 11: r_i = grad l_i(theta_{t-1}) . d_theta
            if tape is not None and bool((w > 1e-30).all()):
                # the step's output gradients are (w_i / B) dl_i/dout_i: undo the weight per row
                reward = tape.dots(d, B) * (B / w.to(d[self.names[0]].dtype))
            else:  # fused with an underflowed weight: recompute at theta_{t-1}
                method = "exact" if cfg.reward_method == "fused" else cfg.reward_method
                with without_checkpointing(self.model):  # torch.func cannot run a checkpointed block
                    reward = per_example_dots(self.model, x, y, d, method=method, params=theta_prev,
                                              batch_stats="fixed")  # BatchNorm: no other row in r_i (gradients.py)
            # lines 12-13: psi <- psi + lr (1/B) sum_i r_i grad log p_i  (minimise the negative)
            r = self._normalise(reward)
            # torchrun: this rank's share of the global-batch loss; the shares' gradients are summed below
            loss_psi = -ctx.mean_share(r.to(log_p.dtype) * log_p)
            if cfg.entropy_weight > 0:  # minus the entropy sum_i p_i log p_i, scaled
                loss_psi = loss_psi + cfg.entropy_weight * (log_p.exp() * log_p).sum()  # this rank's rows
            if cfg.ess_floor > 0 and cfg.ess_weight > 0:  # squared hinge below the ESS floor
                sq = torch.exp(2 * log_p).sum()
                ess = 1.0 / (ctx.global_rows(B) * (ctx.all_sum(sq) if ctx.distributed else sq))
                # every rank computes the same global penalty; through all_sum each backpropagates it for its own
                # rows `world_size` times over, hence the division (the replicas' gradients are summed below)
                loss_psi = loss_psi + cfg.ess_weight * torch.relu(cfg.ess_floor - ess) ** 2 / ctx.world_size
            self.scorer_opt.zero_grad(set_to_none=True)
            loss_psi.backward()
            ctx.all_reduce_([q.grad for q in self.scorer.parameters()])
            self.scorer_opt.step()
            loss_psi = loss_psi.detach().reshape(1)
            ctx.all_reduce_([loss_psi])
            scorer_loss = float(loss_psi)
        return StepRecord(loss=losses.detach(), weight=w, reward=reward,
                          correct=logits.argmax(1) == y, scorer_loss=scorer_loss, margin=margins(logits, y))

    # -------------------------------------------------------- state and values

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(), "opt": self.opt.state_dict(),
            "scorer": self.scorer.state_dict(), "scorer_opt": self.scorer_opt.state_dict(),
            "t": self.steps_taken, "r_mean": self.r_mean, "r_var": self.r_var, "r_seen": self.r_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.scorer.load_state_dict(state["scorer"])
        self.scorer_opt.load_state_dict(state["scorer_opt"])
        self.steps_taken, self.r_seen = int(state["t"]), int(state["r_seen"])  # checkpoint key kept: older runs resume
        self.r_mean = state["r_mean"].to(self.ctx.device)
        self.r_var = state["r_var"].to(self.ctx.device)

    @torch.no_grad()
    def scores(self) -> torch.Tensor:
        """The scorer's logit of every training row, in eval mode, in chunks."""
        return self.ctx.score_rows(self.scorer, self.scorer)

    def values(self) -> MethodValues:
        """value = percentile rank of the run's -mean_loss (signals.in_run_value, reports/value-choice.md; the
        scorer logit, its class-standardised form, mean reward and mean weight all ranked worse, docs/benchmarks.md);
        scorer_logit = the trained scorer's logit (eval mode); scorer_logit_z = it
        standardised within class; weight = softmax of the logits over the whole training set x N; label = the
        class code (lets `valuekit.analysis.balance` work from values.parquet alone). Sequence targets have no label;
        value = the percentile rank of -last_loss on causal-LM instruction rows, the scorer logit on translation
        pairs."""
        from valuekit.training.signals import class_standardise

        s = self.scores().double()
        out = {"scorer_logit": s, "weight": torch.softmax(s, 0) * self.ctx.n}
        if self.ctx.y.dim() == 1:
            out["label"] = self.ctx.y.double()
            out["scorer_logit_z"] = class_standardise(s.cpu().numpy(), self.ctx.y.cpu().numpy())
        return MethodValues(learned=s, columns=out, doc={
            "learned": "the trained scorer's logit of the row (scorer_logit)",
            "weight": "softmax of the scorer logits over the training table, normalised to mean 1"})
