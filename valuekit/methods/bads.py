"""BADS: Bayesian data point selection by stochastic-gradient Langevin dynamics.

Xu, Kim, Lee, Martinez, Hospedales, "A Bayesian Approach to Data Point Selection", NeurIPS 2024
(arXiv 2411.03768). Instance weights w in [0,1]^N and network parameters theta are sampled
*jointly* from one posterior (the paper's graphical model, Fig. 1: w -> theta <- D_train,
theta -> D_meta), so there is no inner/outer loop: one step costs about one SGD step.

The log posterior this module samples (everything up to an additive constant)::

    log pi(theta, w) = log p(theta)                                  Gaussian, precision `prior_precision`
                     + log p(w)                                      sparsity prior, see below
                     - rho_theta * sum_{i<=N} w_i * l_i(theta)       weighted ("power") train likelihood
                     - sum_{j<=M} l^m_j(theta)                       meta (dev) likelihood
    log p(w)         = -(rho_w * N / 2) * (mean(w) - beta)^2         on [0,1]^N

with l = cross-entropy. On a mini-batch B of train rows and B' of dev rows the two likelihood
sums are estimated without bias by (N/|B|) sum_B and (M/|B'|) sum_B' -- those are the terms the
theta drift uses. With `dev_every` = k the meta sum is estimated by k (M/|B'|) sum_B' on every k-th step and
by 0 on the others: unbiased over any k consecutive steps, at 1/k of the dev rows' cost.

Likelihood / normaliser: the training term is the *unnormalised* weighted likelihood
prod_i p(y_i | x_i, theta)^(rho_theta w_i), i.e. p(theta | w, D_train) without its normaliser
Z(w) = integral p(theta) prod_i p(y_i|x_i,theta)^(rho_theta w_i) dtheta. Keeping Z(w) would add
+rho_theta * E_{theta ~ p(theta|w,D_train)}[l_i] to the w_i gradient, an expectation under a second
posterior that needs its own chain -- the nested cost BADS exists to avoid. Dropping Z(w) is what
makes the update "SGD-like", and it makes the formula above a proper joint density over
(theta, w) (w is bounded, theta has a Gaussian prior) that SGLD targets (up to step-size bias).
Consequence: the w_i gradient is -rho_theta * l_i(theta) - rho_w * (mean(w) - beta), so examples
the meta-informed model keeps getting wrong lose weight, and the sparsity prior sets how much
weight is kept in total (beta = target mean weight, rho_w = how hard it pulls). The meta set acts
on w only through theta. This is a loss signal, not a class-balancing one: under class imbalance
the rare classes' higher loss lowers their weight (measured in docs/history/bads.md; with the sampler
targeting pi^(1/T) exactly, far more so: mean weight 0.02-0.04 on the two rarest digits vs 0.86 on the most
frequent at 10x imbalance, reports/bads-sampler.md).

Update (the paper's SGLD step: Langevin dynamics on the joint log posterior with mini-batch gradients, as in
Welling & Teh 2011, eq. 4), with temperature T (T = 1: the posterior above; T < 1: a "cold" posterior
pi^(1/T); T = 0: plain gradient ascent)::

    theta <- theta + lr_theta * g_theta / N + sqrt(2 * lr_theta * T / N) * eps
    u_B   <- u_B   + lr_w * g_u            + sqrt(2 * lr_w * T) * eps'         (batch rows only)
    phi   <- phi   + lr_phi * g_phi / N    + sqrt(2 * lr_phi * T / N) * eps''  (weight_net only)

    g_u = d log pi / d w * w (1 - w) + T (1 - 2 w)                             (see "Weights in [0,1]")

g_theta is the gradient of the mini-batch estimate of log pi; dividing by N puts lr_theta on the
scale of an SGD learning rate on the mean loss (the Langevin step is eta = 2 lr_theta / N).
With `noise_every = k > 1` theta's noise is added every k-th step with k times the variance
(drift/diffusion splitting; see Config).
Only the batch's weights move (random-scan Langevin over the coordinates of w): coordinate i is
updated when i is in the batch, with the exact partial derivative of log pi -- w_i enters
log pi only through its own likelihood term and mean(w), so that derivative needs no N/B
scaling. All noise is drawn on the CPU from the run's generator (ctx.generator) and then moved
to the device, so runs match across devices and resume exactly.

Weights in [0,1]: by default w = sigmoid(u) with u an unconstrained N-vector (a tensor, not a
network); a sigmoid (rather than clipping) keeps every step inside (0,1) without putting probability
atoms on the boundary. The chain targets the tempered posterior pi(theta, w)^(1/T) with w on (0,1)
(uniform base measure, as the density above is written). Derivation: the density of u that makes w
follow q(w) = pi(w)^(1/T) is q(w(u)) |dw/du| = pi(w(u))^(1/T) w(1-w), i.e. log q_u = (1/T) log pi + log w(1-w).
A Langevin step u <- u + eta * dV/du + sqrt(2 eta T) * eps samples exp(V / T) (as eta -> 0), so
V must be T log q_u = log pi + T log w(1-w), and the drift (per unit eta) is
    d/du [log pi(w(u)) + T log w(1-w)] = (d log pi / d w) w (1-w) + T (1 - 2 w),
the change-of-variables term scaled by T like everything else in the drift (at T = 1 the usual log-Jacobian,
at T = 0 none: gradient ascent on log pi). Left unscaled, the chain would sample
pi^(1/T) (w(1-w))^(1/T - 1): at T = 0.1 an extra Beta(10, 10)-like pull of every weight towards 0.5.
The samples follow pi^(1/T) up to SGLD's step-size bias and the mini-batch noise of theta's drift
(tests/test_bads.py checks the weight step against the analytic density). The per-source weights use the same
step (`langevin_logit_step`). The weight network uses the same squashing but samples its parameters phi,
so no change-of-variables term enters there (the density is stated over phi).

Weight network (the paper's alternative to per-row weights: a small net with H hidden units, mean(w) in the
prior averaged over the last S_avg batches): `weight_net=True` computes w_i = sigmoid(f_phi([a_i, onehot(y_i)]))
with a one-hidden-layer MLP f_phi (Gaussian prior on phi, precision `prior_precision`), a_i = the row's current
loss l_i(theta) as a number (`weight_inputs="loss"`, default) or its standardised features x_i ("features").
The log posterior is the one above with w = w(phi); the paper's abstract does not say what the net reads.
With the loss as input, w_i depends on theta too; the net reads l_i as data (no gradient flows from w into
theta's drift), so theta's drift omits the terms through w(l(theta)) and the joint chain is an approximation,
not an exact sampler of one stated density (phi's drift is exact given theta).
Every step moves phi and so all weights; mean(w) in the prior is estimated from the last `s_avg` batches (the
full mean would need a pass over all N rows per step). d log pi / d phi = (N/|B|) sum_B (d log pi / d w_i)
dw_i/dphi - prior_precision phi. On the features the net did not separate flipped from clean rows (AUROC of
the posterior mean 0.50-0.54 on digits with 20 % flips; reports/bads-sampler.md): learning which (x, y)
pairs disagree is learning a second classifier from a weak signal dominated by the common level of all
weights. On the loss it needs one monotone direction (plus a level per class), and ranks them (AUROC 0.994-0.998).
So with the net, as with per-row weights, w is a (class-dependent) transform of the loss: the signal
d log pi / d w_i = -rho_theta l_i - rho_w (mean(w) - beta) has no other row-specific term.

Posterior summaries: after `burn_in` steps, every time a row is in the batch its current w_i is
one posterior sample. Per row we keep a running mean/variance (Welford, tensors) and the last
`reservoir` samples in an N x S ring buffer, from which the 5%/95% quantiles are taken.
values(): value = the in-run signal value (signals.in_run_value: percentile rank of -mean_loss);
posterior_mean = the sample mean of w (a near-monotone transform of the loss: Spearman with -mean_loss is
reported in reports/quality.md), value_std = the samples' std, ci_low / ci_high = their 5 %/95 % quantiles.
These are NOT calibrated posterior intervals: by default the chain is tempered (T = 0.1, a cold posterior
pi^(1/T), which shrinks the spread by about sqrt(T)), the samples are consecutive and correlated, and a row
has only ~`reservoir` of them (about one per epoch); read them as the spread of a cold chain.
Logged per step: weight = w_i used in the step, reward = d log pi / d w_i (the gradient signal).

Per-source weights (`per_source=True`, the paper's per-task optimisation for instruction sets): one
u_t per source t, w_i = sigmoid(u_{t(i)}). Same log pi; its exact partial derivative in w_t is
-rho_theta sum_{i in t} l_i - rho_w n_t (mean(w) - beta) with n_t the source's row count, estimated
without bias by (N/|B|) sum_{i in B, t(i)=t} dlogpi/dw_i. The Langevin step of u_t is preconditioned by
|B| / (N n_t) (a constant per coordinate, so the target is unchanged): u_t += eps_t g_t +
sqrt(2 eps_t T) xi with eps_t = lr_w |B| / (N n_t). g_t is about n_t times a row's gradient and u_t moves
at every step where a row's u_i moves once per pass (|B|/N of the steps), so over one pass u_t moves as
far as one u_i does in its one visit: the per-row and per-task chains share lr_w. (A step of lr_w / n_t,
N/|B| times larger, saturated every w_t within ~20 steps, before the model had learnt anything:
reports/llm.md.) Every step logs each source's current w_t
to sources/ (step, source, prob = w_t, count = its rows in the batch): the per-task table.

Under torchrun (valuekit.training.distributed) B and B' are the global batches: each rank computes the drift
of its rows (its share of the N/|B| and M/|B'| sums; the shares' gradients are summed over ranks,
then the prior is added once), the gradient for a row's weight is computed by the rank that holds
the row, and every rank then applies the Langevin update of the whole global batch's weights (all-
gathered) with noise drawn from the shared generator -- as is theta's noise -- so all replicas stay
identical and the chain equals a 1-process chain with the global batch.

BatchNorm: a model with batch-norm layers gets separate training and dev forwards (a joint one would
normalise the training rows with dev statistics); the dev forward runs in training mode (its own batch
statistics) under `valuekit.ops.modes.no_running_stats_update`, so the running mean/variance see only the
training rows and the evaluated and exported model has never seen a dev row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from valuekit.config import setting
from valuekit.errors import InputError, setting_error
from valuekit.ops.losses import per_example_loss
from valuekit.ops.modes import no_running_stats_update
from valuekit.training.context import Batch, StepRecord, TrainContext
from valuekit.training.method import Method, MethodValues, register
from valuekit.training.options import check_fields
from valuekit.training.signals import margins

QUANTILE_ROWS = 4096  # values(): the reservoir's quantiles are taken this many rows at a time


@dataclass
class Config:
    """BADS hyper-parameters. In brackets: the paper's Table 3 name of the setting that plays the same
    role (its sigma, a noise std, is our temperature); the exact parametrisation is the one stated
    in the module docstring.

    lr_theta:   SGLD step size for theta on the mean-loss scale [eta]; the loop's --lr (an Adam
                rate for other methods) is not used.
    lr_w:       SGLD step size for the weight logits u (tensor form).
    lr_phi:     SGLD step size for the weight net's parameters phi, on the mean-loss scale like
                lr_theta (phi moves every row's weight at once, so it needs a far smaller step).
    temperature: noise scale T; 1 = the stated posterior, <1 cold posterior, 0 = no noise
                (plain joint gradient ascent).
    rho_theta:  impact constant of the training likelihood [rho_theta]: power on
                prod_i p(y_i|x_i,theta)^(w_i); also how strongly a high loss lowers w_i.
    rho_w:      impact constant (strength) of the sparsity prior on mean(w) [rho_w].
    beta:       sparsity level: the prior's target mean weight [beta].
    prior_precision: precision of the Gaussian prior on theta (and phi); 0 = flat.
    dev_batch_size: meta (dev) rows per step [B']; the meta term is scaled by M/B'.
    dev_every:  k; the meta term is estimated on every k-th step only, scaled by k M/B' (and left out of the
                other steps): still an unbiased estimate of the meta likelihood's gradient over the k steps, so
                the chain targets the same posterior with a noisier drift, at 1/k of the dev rows' forward and
                backward cost (most of BADS's cost over an SGD step: a separate small dev forward on BatchNorm
                models, a dev batch as long as the training batch on causal LMs). The paper's Algorithm is k = 1;
                k = 1, 4 and 8 gave the same test accuracy and AUROC on digits / mnist5k / fashion-mnist with 20 %
                and 40 % flips and 10x imbalance, 3 seeds each (reports/suite-bads-dev-every.md), so the default
                is 8.
    init_weight: every w_i starts here (weight_net: the net's output bias starts at its logit).
    burn_in:    steps before samples of w are collected.
    reservoir:  S, samples kept per row (ring buffer of the latest S) for the credible interval.
    ci:         central credible interval mass; 0.9 gives the 5%/95% quantiles.
    weight_net: weights from a small MLP over [a, onehot(y)] instead of a per-row tensor (module docstring).
    weight_inputs: what the weight net reads as a: "loss" (the row's current loss l_i(theta)) or "features"
                (the standardised x; measured not to rank flipped rows: reports/bads-sampler.md).
    weight_hidden: hidden width of that MLP.
    s_avg:      averaging window (steps) for mean(w) in the prior when weight_net=True [S_avg].
    per_source: one weight per source/task (the table's source column, e.g. an instruction set's `task`)
                instead of one per row: the paper's per-task optimisation. w_i = w_{t(i)}; see "Per-source
                weights" in the module docstring. Every row's value is then its task's posterior mean.
    precondition: pSGLD for theta (Li, Chen, Carlson, Carin, AAAI 2016): an RMSprop preconditioner G on
                the drift and the noise variance (the Gamma correction term is dropped, as in that paper's
                practical algorithm); lr_theta is then an RMSprop rate (~1e-3). For Transformers, where plain
                SGLD at a stable step barely moves in a few hundred steps (measured in reports/llm.md).
    rms_decay:  pSGLD's running-average decay of the squared gradient.
    rms_eps:    pSGLD's lambda: G <= 1 / rms_eps, which bounds the noise on parameters with tiny gradients.
    noise_every: k; theta's (and phi's) Gaussian noise is added every k steps with k times the
                variance: the same Brownian motion in a drift/diffusion splitting. k = 1 is plain
                SGLD; k > 1 saves the cost of drawing one normal per parameter per step, which on a
                CPU generator is most of BADS's overhead over an SGD step. w's noise is every step.
    """

    lr_theta: float = setting(0.05, gt=0)
    lr_w: float = setting(1.0, gt=0)
    lr_phi: float = setting(0.001, gt=0)
    temperature: float = setting(0.1, ge=0)
    rho_theta: float = setting(3.0, ge=0)
    rho_w: float = setting(10.0, ge=0)
    beta: float = setting(0.6, gt=0, lt=1)
    prior_precision: float = setting(1.0, ge=0)
    dev_batch_size: int = setting(16, ge=1)
    dev_every: int = setting(8, ge=1)
    init_weight: float = setting(0.6, gt=0, lt=1)
    burn_in: int = setting(200, ge=0)
    reservoir: int = setting(32, ge=1)
    ci: float = setting(0.9, gt=0, lt=1)
    weight_net: bool = False
    weight_inputs: str = setting("loss", choices=("loss", "features"))
    weight_hidden: int = setting(32, ge=1)
    s_avg: int = setting(20, ge=1)
    noise_every: int = setting(1, ge=1)
    per_source: bool = False
    precondition: bool = False
    rms_decay: float = setting(0.99, ge=0, lt=1)
    rms_eps: float = setting(1e-3, gt=0)

    def validate(self) -> None:
        check_fields(self)


class WeightNet(nn.Module):
    """w = sigmoid(MLP([a, onehot(y)])): one weight per example, from a = its current loss l_i(theta) (a number,
    inputs="loss") or a = its standardised features x (inputs="features")."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, mean, std, init_weight: float,
                 generator: torch.Generator, inputs: str = "loss"):
        super().__init__()
        self.num_classes, self.inputs = num_classes, inputs
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        width = 1 if inputs == "loss" else in_features
        self.net = nn.Sequential(nn.Linear(width + num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        for m in self.net:
            if isinstance(m, nn.Linear):
                bound = 1 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound, generator=generator)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.net[2].bias.fill_(math.log(init_weight / (1 - init_weight)))

    def forward(self, x, y, loss=None):
        a = loss.detach().to(x.dtype)[:, None] if self.inputs == "loss" else (x - self.mean) / self.std
        z = torch.cat([a, nn.functional.one_hot(y, self.num_classes).to(x.dtype)], 1)
        return torch.sigmoid(self.net(z).squeeze(1))


def _noise(like: list[torch.Tensor], scale: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Independent N(0, scale^2) for each tensor, drawn on CPU from `generator` in one call."""
    total = sum(t.numel() for t in like)
    flat = torch.randn(total, generator=generator, dtype=like[0].dtype).mul_(scale)
    out, at = [], 0
    for t in like:
        out.append(flat[at: at + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype, non_blocking=True))
        at += t.numel()
    return out


def weight_reward(losses: torch.Tensor, wbar, rho_theta: float, rho_w: float, beta: float) -> torch.Tensor:
    """d log pi / d w_i of a row with loss l_i (module docstring): -rho_theta l_i - rho_w (mean(w) - beta)."""
    return -rho_theta * losses - rho_w * (wbar - beta).to(losses.dtype)  # wbar: a float64 tensor


def logit_drift(dlogpi_dw: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """Drift of the logit u = logit(w) whose Langevin chain at temperature T samples w ~ pi(w)^(1/T) on (0, 1):
    d/du [log pi(w(u)) + T log w(1-w)] = dlogpi_dw * w (1 - w) + T (1 - 2 w) (derivation: module docstring,
    "Weights in [0,1]")."""
    return dlogpi_dw * w * (1 - w) + temperature * (1 - 2 * w)


def langevin_logit_step(u: torch.Tensor, dlogpi_dw: torch.Tensor, step, temperature: float,
                        noise: torch.Tensor | None) -> torch.Tensor:
    """One Langevin step of the weight logits: u + step * logit_drift + sqrt(2 step T) * noise, with `noise` a
    standard normal draw of u's shape (None when T = 0) and `step` a number or a per-coordinate tensor (a
    constant preconditioner: the target is unchanged). Used for the per-row and the per-source weights."""
    new = u + step * logit_drift(dlogpi_dw, torch.sigmoid(u), temperature)
    if temperature > 0:
        new = new + noise * (2 * step * temperature) ** 0.5
    return new


def _first_occurrence(idx: torch.Tensor) -> torch.Tensor:
    """Mask of the first appearance of each row (a batch straddling two passes may repeat a row)."""
    uniq, inv = torch.unique(idx, return_inverse=True)
    if len(uniq) == len(idx):
        return torch.ones(len(idx), dtype=torch.bool, device=idx.device)
    pos = torch.arange(len(idx), device=idx.device)
    first = torch.full((len(uniq),), len(idx), device=idx.device).scatter_reduce_(0, inv, pos, "amin")
    mask = torch.zeros(len(idx), dtype=torch.bool, device=idx.device)
    mask[first] = True
    return mask


@register("bads", config=Config)
class Trainer(Method):
    distributed = True  # every reduction goes through the ctx kit: synchronised under torchrun

    def __init__(self, ctx: TrainContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.model = ctx.build_model()
        # theta = the trainable parameters (with LoRA adapters, --lora, the frozen base weights are not sampled)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        n, dev = ctx.n, ctx.device
        self.n, self.m = n, len(ctx.dev_y)
        logit = math.log(cfg.init_weight / (1 - cfg.init_weight))
        self.weight_net = None
        if cfg.weight_net:
            mean = ctx.mean if ctx.mean is not None else torch.zeros(ctx.x.shape[1])
            std = ctx.std if ctx.std is not None else torch.ones(ctx.x.shape[1])
            self.weight_net = WeightNet(ctx.x.shape[1], ctx.num_classes, cfg.weight_hidden, mean.cpu(), std.cpu(),
                                        cfg.init_weight, ctx.generator, cfg.weight_inputs).to(dev)
            # mean(w) estimate for the prior: batch means of the last s_avg steps (NaN = empty slot).
            self.window = torch.full((cfg.s_avg,), float("nan"), dtype=torch.float64, device=dev)
        # u: unconstrained weight logits, w = sigmoid(u). With a weight net it caches the latest logits
        # (used only for the final values of rows never summarised).
        self.rms = [torch.zeros_like(p) for p in self.params] if cfg.precondition else None
        self.task_u = None
        if cfg.per_source:
            if ctx.source is None or not ctx.sources:
                raise setting_error("per_source=true: the training table has no source/task column")
            if cfg.weight_net:
                raise InputError("bads: per_source and weight_net exclude each other")
            S = len(ctx.sources)
            self.task_n = torch.bincount(ctx.source, minlength=S).double()
            self.task_u = torch.full((S,), logit, dtype=torch.float32, device=dev)
            self.task_count = torch.zeros(S, dtype=torch.float64, device=dev)
            self.task_mean = torch.zeros(S, dtype=torch.float64, device=dev)
            self.task_m2 = torch.zeros(S, dtype=torch.float64, device=dev)
        self.u = torch.full((n,), logit, dtype=torch.float32, device=dev)
        self.wsum = torch.sigmoid(self.u).double().sum()  # kept exactly in step with u
        zeros = lambda: torch.zeros(n, dtype=torch.float64, device=dev)  # noqa: E731
        self.count, self.mean, self.m2 = zeros(), zeros(), zeros()
        self.samples = torch.full((n, cfg.reservoir), float("nan"), dtype=torch.float32, device=dev)
        self.steps_taken = 0
        # one forward of train + dev rows together saves a call on small models; not with BatchNorm (the dev rows
        # would enter the train rows' batch statistics) nor for causal LMs (the batch is trimmed to its longest
        # row, so random-length dev rows would pad the length-bucketed train rows)
        from valuekit.models.features import has_batchnorm
        from valuekit.models.lm import is_lm

        self.joint_forward = not is_lm(ctx.config.model) and not has_batchnorm(self.model)

    # ------------------------------------------------------------ the log posterior's gradient

    def _weights(self, batch: Batch, losses: torch.Tensor | None = None) -> torch.Tensor | None:
        """The batch rows' weights; None for a weight net on the loss until the rows' `losses` are known."""
        if self.weight_net is not None:
            if self.weight_net.inputs == "loss" and losses is None:
                return None
            return self.weight_net(batch.x, batch.y, losses)
        if self.task_u is not None:
            return torch.sigmoid(self.task_u[batch.source])
        return torch.sigmoid(self.u[batch.idx])

    def _batch_mean(self, w_batch: torch.Tensor) -> torch.Tensor:
        """Mean of the weights of the (global) batch."""
        return self.ctx.global_mean(w_batch.detach().double())

    def _mean_weight(self, w_batch: torch.Tensor) -> torch.Tensor:
        if self.task_u is not None:
            return (self.task_n * torch.sigmoid(self.task_u.double())).sum() / self.n
        if self.weight_net is None:
            return self.wsum / self.n
        window = self.window.clone()
        window[self.steps_taken % self.cfg.s_avg] = self._batch_mean(w_batch)
        return window.nanmean()

    def drift(self, batch: Batch, dev_x: torch.Tensor | None, dev_y: torch.Tensor | None, *,
              dev_total: int | None = None):
        """Gradients of the mini-batch estimate of log pi at the current state (dev_x None: without the meta term;
        with one, the meta term is scaled by dev_every: see Config).

        Returns (theta grads list, weight-variable grad, w, per-example losses, dlogpi/dw, logits):
        the weight-variable grad is the drift of u for the tensor form (batch rows; d/du of log pi + T times the
        sigmoid's log-Jacobian: `logit_drift`) or a list over the weight net's parameters.
        """
        cfg, params = self.cfg, self.params
        b = len(batch.y)
        b_all = self.ctx.global_rows(b) if self.ctx.distributed else b
        w = self._weights(batch)
        if dev_x is None:  # a step without the meta term (dev_every > 1)
            logits, dev_logits = self.model(batch.x), None
        elif self.joint_forward:
            logits_all = self.model(torch.cat([batch.x, dev_x]))
            logits, dev_logits = logits_all[:b], logits_all[b:]
        else:  # BatchNorm: the dev rows normalised by their own statistics, the running ones left to the batch's
            logits = self.model(batch.x)
            with no_running_stats_update(self.model):
                dev_logits = self.model(dev_x)
        losses = per_example_loss(logits, batch.y)
        if w is None:  # weight net on the loss: reads this forward's losses (as a number, no gradient to theta)
            w = self._weights(batch, losses.detach())
        # log pi estimate as a function of theta (w held fixed): unbiased N/B and M/B' scaling.
        log_lik = -(cfg.rho_theta * self.n / b_all) * (w.detach() * losses).sum()
        if dev_logits is not None:
            # torchrun: the M/|B'| scaling uses the global dev batch (this rank's share of the sum)
            bm_all = (dev_total or self.ctx.global_rows(len(dev_y))) if self.ctx.distributed else len(dev_y)
            log_lik = log_lik - (cfg.dev_every * self.m / bm_all) * per_example_loss(dev_logits, dev_y).sum()
        g_theta = list(torch.autograd.grad(log_lik, params))
        self.ctx.all_reduce_(g_theta)  # torchrun: sum of the ranks' shares, before the prior (added once)
        if cfg.prior_precision > 0:
            torch._foreach_add_(g_theta, [p.detach() for p in params], alpha=-cfg.prior_precision)
        wbar = self._mean_weight(w)
        # exact d log pi / d w_i for a batch row: own likelihood term + sparsity prior.
        dw = weight_reward(losses.detach(), wbar, cfg.rho_theta, cfg.rho_w, cfg.beta)
        if self.weight_net is None:
            # chain rule + the log-Jacobian of w = sigmoid(u), scaled by T like the rest (module docstring)
            g_u = logit_drift(dw, w.detach(), cfg.temperature)
        else:
            phi = list(self.weight_net.parameters())
            # d/dphi of the mini-batch estimate (N/B) sum_B [ -rho_theta w_i l_i - rho_w (wbar-beta) w_i ]
            g_u = list(torch.autograd.grad((self.n / b_all) * (dw.detach() * w).sum(), phi))
            self.ctx.all_reduce_(g_u)
            if cfg.prior_precision > 0:
                torch._foreach_add_(g_u, [p.detach() for p in phi], alpha=-cfg.prior_precision)
        return g_theta, g_u, w.detach(), losses.detach(), dw, logits.detach()

    # ------------------------------------------------------------ one SGLD step

    def step(self, batch: Batch) -> StepRecord:
        cfg, gen = self.cfg, self.ctx.generator
        self.model.train()
        ctx = self.ctx
        dev_x = dev_y = None
        if self.steps_taken % cfg.dev_every == 0:
            dev_x, dev_y = ctx.sample_dev(cfg.dev_batch_size)
        g_theta, g_u, w, losses, dw, logits = self.drift(batch, dev_x, dev_y,
                                                         dev_total=ctx.dev_total(cfg.dev_batch_size))
        params = self.params
        T = cfg.temperature
        with torch.no_grad():
            step_t = cfg.lr_theta / self.n
            k = cfg.noise_every
            diffuse = T > 0 and (self.steps_taken + 1) % k == 0
            if cfg.precondition:
                # pSGLD: G = 1 / (eps + sqrt(V)), V = running mean of (g / N)^2; drift lr G g / N, noise var 2 lr T G /
                # N
                sq = [(g / self.n).square() for g in g_theta]
                torch._foreach_mul_(self.rms, cfg.rms_decay)
                torch._foreach_add_(self.rms, sq, alpha=1 - cfg.rms_decay)
                G = [1.0 / (v.sqrt() + cfg.rms_eps) for v in self.rms]
                torch._foreach_add_(params, torch._foreach_mul(g_theta, G), alpha=step_t)
                if diffuse:
                    eps = _noise(params, 1.0, gen)
                    torch._foreach_add_(params, [e * (2 * k * step_t * T * s).sqrt() for e, s in zip(eps, G)])
            else:
                torch._foreach_add_(params, g_theta, alpha=step_t)
                # Brownian increment over the last `noise_every` steps at once (k = 1: plain SGLD).
                if diffuse:
                    torch._foreach_add_(params, _noise(params, math.sqrt(2 * k * step_t * T), gen))
            if self.task_u is not None:
                # (N/B) sum over the batch rows of each source of dlogpi/dw_i, then the chain rule to u_t
                src_all, dw_all = ctx.gather(batch.source), ctx.gather(dw)
                S = len(self.task_u)
                g_w = torch.zeros(S, dtype=torch.float64, device=dw.device).index_add_(
                    0, src_all, dw_all.double()) * (self.n / len(src_all))
                step_u = cfg.lr_w * len(src_all) / (self.n * self.task_n)
                u_old = self.task_u.double()
                u_new = langevin_logit_step(u_old, g_w, step_u, T, _noise([u_old], 1.0, gen)[0] if T > 0 else None)
                self.task_u.copy_(u_new.float())
                rows, w_new = batch.idx[:0], w[:0]  # per-row summaries are not used in this mode
            elif self.weight_net is None:
                # torchrun: every rank updates the whole global batch's weights (same noise), from the
                # gradients each row's rank computed
                idx_all, dw_all, w_all = ctx.gather(batch.idx), ctx.gather(dw), ctx.gather(w)
                keep = _first_occurrence(idx_all)
                rows = idx_all[keep]
                u_old = self.u[rows]
                u_new = langevin_logit_step(u_old, dw_all[keep].to(u_old.dtype), cfg.lr_w, T,
                                            _noise([u_old], 1.0, gen)[0] if T > 0 else None)
                w_new = torch.sigmoid(u_new)
                self.wsum += (w_new.double() - w_all[keep].double()).sum()
                self.u[rows] = u_new
            else:
                phi = list(self.weight_net.parameters())
                step_w = cfg.lr_phi / self.n
                torch._foreach_add_(phi, g_u, alpha=step_w)
                if diffuse:
                    torch._foreach_add_(phi, _noise(phi, math.sqrt(2 * k * step_w * T), gen))
                self.window[self.steps_taken % cfg.s_avg] = self._batch_mean(w)
                if not ctx.distributed:
                    keep = _first_occurrence(batch.idx)
                    rows = batch.idx[keep]
                    w_new = self.weight_net(batch.x[keep], batch.y[keep], losses[keep])
                else:
                    idx_all, w_all = ctx.gather(batch.idx), ctx.gather(self.weight_net(batch.x, batch.y, losses))
                    keep = _first_occurrence(idx_all)
                    rows, w_new = idx_all[keep], w_all[keep]
                self.u[rows] = torch.logit(w_new.clamp(1e-6, 1 - 1e-6)).float()
            self.steps_taken += 1
            if self.steps_taken > cfg.burn_in:
                if self.task_u is not None:
                    self._collect_tasks()
                else:
                    self._collect(rows, w_new)
        return StepRecord(loss=losses, weight=w, reward=dw, correct=logits.argmax(1) == batch.y,
                          margin=margins(logits, batch.y), sources=self._source_log(batch, w))

    def _source_log(self, batch: Batch, w: torch.Tensor) -> dict | None:
        """per_source: each source's current w_t and its rows in the batch, for sources/ (the per-task table)."""
        if self.task_u is None:
            return None
        count = torch.bincount(batch.source, minlength=len(self.ctx.sources)).tolist()
        prob = torch.sigmoid(self.task_u.double()).tolist()
        return {s: (prob[t], count[t]) for t, s in enumerate(self.ctx.sources)}

    def _collect_tasks(self) -> None:
        """Welford update of each source's posterior mean/variance of w_t (one sample per step)."""
        x = torch.sigmoid(self.task_u.double())
        self.task_count += 1
        delta = x - self.task_mean
        self.task_mean += delta / self.task_count
        self.task_m2 += delta * (x - self.task_mean)

    def _collect(self, rows: torch.Tensor, w_new: torch.Tensor) -> None:
        """Welford update of the per-row mean/variance and the ring buffer of the latest samples."""
        x = w_new.double()
        c = self.count[rows] + 1
        delta = x - self.mean[rows]
        mean = self.mean[rows] + delta / c
        self.m2[rows] += delta * (x - mean)
        self.mean[rows] = mean
        self.count[rows] = c
        slot = ((c - 1) % self.cfg.reservoir).long()
        self.samples[rows, slot] = w_new.float()

    # ------------------------------------------------------------ checkpoints and results

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "u": self.u, "wsum": self.wsum, "count": self.count,
                 "mean": self.mean, "m2": self.m2, "samples": self.samples, "steps_done": self.steps_taken}
        if self.weight_net is not None:
            state["weight_net"] = self.weight_net.state_dict()
            state["window"] = self.window
        if self.rms is not None:
            state["rms"] = self.rms
        if self.task_u is not None:
            state.update(task_u=self.task_u, task_count=self.task_count, task_mean=self.task_mean,
                         task_m2=self.task_m2)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for k in ("u", "count", "mean", "m2", "samples"):
            getattr(self, k).copy_(state[k])
        self.wsum = state["wsum"].to(self.wsum)
        self.steps_taken = int(state["steps_done"])  # checkpoint key kept: older runs resume
        if self.weight_net is not None:
            self.weight_net.load_state_dict(state["weight_net"])
            self.window.copy_(state["window"])
        if self.rms is not None:
            for v, saved in zip(self.rms, state["rms"]):
                v.copy_(saved)
        if self.task_u is not None:
            for k in ("task_u", "task_count", "task_mean", "task_m2"):
                getattr(self, k).copy_(state[k])

    def values(self) -> MethodValues:
        """value = signals.in_run_value (module docstring); posterior_mean = mean of the samples of w_i; value_std =
        their std; ci_low/ci_high = quantiles of the latest `reservoir` samples of the tempered chain (a cold
        chain's spread, not a calibrated posterior interval); samples = how many samples the row has. Rows with no
        sample after
        burn-in: value = current w, std/CI NaN."""
        cfg = self.cfg
        if self.task_u is not None:
            src = self.ctx.source
            seen = self.task_count > 0
            mean = torch.where(seen, self.task_mean, torch.sigmoid(self.task_u.double()))
            var = self.task_m2 / (self.task_count - 1).clamp_min(1)
            std = torch.where(self.task_count > 1, var.sqrt(), torch.full_like(var, float("nan")))
            return MethodValues(value=mean[src], columns={"value_std": std[src], "weight": mean[src],
                                                          "samples": self.task_count[src]},
                                doc={"value": "the posterior mean weight of the row's task (SGLD samples)",
                                     "value_std": "std of the task weight's samples", "weight": "the task's weight"})
        seen = self.count > 0
        current = torch.sigmoid(self.u.double())
        value = torch.where(seen, self.mean, current)
        var = self.m2 / (self.count - 1).clamp_min(1)
        std = torch.where(self.count > 1, var.sqrt(), torch.full_like(var, float("nan")))
        lo_q, hi_q = (1 - cfg.ci) / 2, 1 - (1 - cfg.ci) / 2
        q = torch.tensor([lo_q, hi_q], dtype=torch.float64, device=self.samples.device)
        # (2, N); NaN rows stay NaN. In row chunks: nanquantile's float64 copies and sort of all N x S samples at
        # once were a 30-40 MiB transient peak at 60k rows
        quant = torch.cat([torch.nanquantile(self.samples[i: i + QUANTILE_ROWS].double(), q, dim=1)
                           for i in range(0, len(self.samples), QUANTILE_ROWS)], dim=1)
        return MethodValues(learned=value, columns={"posterior_mean": value, "value_std": std, "weight": value,
                                                    "ci_low": quant[0], "ci_high": quant[1], "samples": self.count},
                            doc={"learned": "posterior_mean: the mean of the SGLD samples of the row's weight w_i",
                                 "value_std": "std of the SGLD samples of w_i",
                                 "weight": "posterior_mean, normalised to mean 1"})
