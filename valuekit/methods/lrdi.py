"""Learning to reweight with deep interactions (LRDI), with L2RW and Meta-Weight-Net as special cases.

LRDI (Fan, Xia, Wu et al., "Learning to Reweight with Deep Interactions", AAAI 2021, arXiv 2007.04649):
a teacher network maps each training example's *student internal state* (the detached hidden
features: the input of the student's last nn.Linear, or of `feature_layer`, read with a forward hook) plus surface
signals (loss, probability of the given label, margin,
training progress, label embedding) to a weight ``w_i = sigmoid(teacher(s_i))`` (optionally divided
by the batch mean). The teacher is trained by meta-gradients (the paper's Algorithm 1):

1. K virtual momentum-SGD steps (or steps of the loop's own optimizer, `lookahead`, below) of the student on
   the weighted batch loss
   ``L(θ, ψ) = mean_i w_i(ψ) ℓ_i(θ)``, kept in the autograd graph with
   `torch.func.functional_call` (no model copies):  ``b_{k+1} = μ b_k + ∇θ L(θ_k, ψ)``,
   ``θ_{k+1} = θ_k − α b_{k+1}``, ``b_0 = 0``;
2. dev loss ``J(θ_K(ψ))`` on a clean dev batch, differentiated w.r.t. ψ only (teacher inputs are
   detached from the student) and one teacher optimizer (Adam) step;
3. the real student step with the updated teacher's (detached) weights and the loop's optimizer.

For one virtual step (the default) the meta-gradient is computed without a double backward
(``meta_grad="auto"``): θ' = θ − α ∇θ L gives ∂J(θ')/∂w_i = −α/B ∇ℓ_i(θ)·∇J(θ'), and those B dot
products come from the student's own forward/backward (`gradients.LayerTape`, as DDS's fused rewards),
or from one forward-mode pass when BatchNorm makes the rows interact; the teacher's gradient is then one
backward of w. Same numbers as the second-order autograd path (``meta_grad="autograd"``, used for K > 1).

Variants sharing this code (`variant` in Config; the method registry maps the names):

* ``mwnet`` — Meta-Weight-Net (Shu et al., NeurIPS 2019, Alg. 1): the same loop with the teacher
  reading the per-example loss only.
* ``l2rw`` — Learning to Reweight (Ren et al., ICML 2018, Alg. 1): no teacher. Per-example ε_i = 0
  enter the virtual loss ``Σ_i ε_i ℓ_i``; ``g_i = ∂J(θ_K)/∂ε_i`` at ε = 0 (line 7-9),
  ``w̃_i = max(−g_i, 0)``, ``w_i = w̃_i / Σ_j w̃_j`` (line 10-11). We log ``B·w_i`` (batch mean 1, or
  all 0 when every w̃ is 0) and take the real step on ``mean_i B·w_i ℓ_i`` (= Ren's ``Σ_i w_i ℓ_i``).
  The logged `reward` is the raw meta-gradient with the sign flipped, ``−g_i`` (before clipping and
  normalising), so that, as in every valuekit log, higher reward = more useful.

By default (``lookahead="sgd"``) the virtual steps use their own momentum-SGD (`virtual_lr`, `virtual_momentum`,
fresh zero momentum buffer each meta step), whatever the loop's optimizer is: the meta-gradient needs a
differentiable update rule, and the papers use the student's SGD step there. With the loop's default Adam at lr 1e-3
that is a step the real one never takes; ``lookahead="optimizer"`` replaces it by the loop optimizer's own update
from its current state (Adam: θ' = θ − lr m̂'/(sqrt(v̂') + eps), m' and v' the real moments updated by the weighted
gradient, step t + 1; `Trainer._virtual_step`), so θ_1 is where the real step would go with those weights (tested
against finite differences of real torch.optim steps). The fused path then dots ∇ℓ_i with u = ∂J(θ')/∂g (Adam is
elementwise, so u = diag(∂θ'/∂g) ∇J(θ')) instead of −α ∇J(θ'). Measured against the sgd look-ahead in
reports/lrdi-lookahead.md. The K virtual steps all use the same batch and the weights computed once at θ_0.

Under torchrun (valuekit.training.distributed) the batch of every equation above is the global batch: the
virtual-step gradient is summed over ranks inside the autograd graph (an all-reduce whose backward
is an all-reduce), the dev loss J is the mean over the ranks' slices of one global dev batch, the
batch-mean normalisation of the weights (and L2RW's Σ_j w̃_j) runs over all ranks' rows, and the
meta-gradients w.r.t. the teacher and the student's gradients are all-reduced. L2RW's ∂J/∂ε_i stays
with the rank that holds row i. The result equals a 1-process run with the global batch.

BatchNorm: the virtual steps' forwards and the dev forward run in training mode (batch statistics,
the objective the meta-gradient differentiates) under `valuekit.ops.modes.no_running_stats_update`, so the
running mean/variance are updated only by the real step's forward of the training batch; no dev row
reaches the evaluated or exported model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from valuekit.config import setting
from valuekit.errors import setting_error
from valuekit.models.features import feature_dim, feature_module, features_and_logits, has_batchnorm
from valuekit.ops.gradients import LayerTape, per_example_dots, second_order
from valuekit.ops.losses import per_example_loss
from valuekit.ops.modes import no_running_stats_update
from valuekit.training.context import Batch, StepRecord, TrainContext
from valuekit.training.method import Method, MethodValues, register
from valuekit.training.options import check_fields
from valuekit.training.signals import margins

VARIANTS = ("lrdi", "mwnet", "l2rw")
TEACHER_INPUTS = ("features", "loss", "prob", "margin", "progress", "label")


@dataclass
class Config:
    """Settings of LRDI / Meta-Weight-Net / L2RW (the student's lr, optimizer, batch size are the loop's)."""

    variant: str = setting("lrdi", choices=VARIANTS)  # lrdi | mwnet (teacher reads the loss only) | l2rw (no teacher)
    # teacher signals for lrdi, comma-separated (a str, not a tuple, so that run.json round-trips it for
    # --resume): features (detached student hidden state), loss, prob (softmax prob of the given label),
    # margin (that prob minus the largest other class prob), progress (step / steps), label (learned
    # embedding). mwnet always uses "loss".
    teacher_inputs: str = ",".join(TEACHER_INPUTS)
    teacher_hidden: int = setting(100, ge=1)  # hidden width of the teacher MLP (Meta-Weight-Net uses 100)
    label_dim: int = setting(8, ge=1)  # size of the teacher's label embedding
    teacher_lr: float = setting(1e-3, gt=0)  # Adam learning rate of the teacher
    teacher_weight_decay: float = setting(1e-4, ge=0)
    normalize: bool = True  # divide the sigmoid weights by their batch mean (mean 1) for lrdi/mwnet
    unroll: int = setting(1, ge=1, le=5)  # K virtual student steps in the meta step (1..5)
    virtual_lr: float = setting(0.1, gt=0)  # lr α of the virtual momentum-SGD steps (not the real optimizer's lr)
    # μ of the virtual steps (irrelevant for K=1: the buffer starts at 0)
    virtual_momentum: float = setting(0.9, ge=0, lt=1)
    # lrdi/mwnet: take the real step with the weights of the virtual step (the teacher *before* its update)
    # and reuse the virtual step's gradient, saving one backward pass. The papers (MW-Net Alg. 1 line 8,
    # Fan et al. Alg. 1) recompute the weights with the updated teacher, hence the default False.
    reuse_gradient: bool = False
    # dev rows per meta step; 0 = the loop's batch size (as L2RW/MW-Net); at most all
    dev_batch_size: int = setting(0, ge=0)
    # lrdi/mwnet: meta step (teacher update) every this many steps; the steps between use the current
    # teacher's weights at about the cost of a uniform step. l2rw needs its meta-gradient every step.
    # The `mwnet` method sets 4 (valuekit.config.METHODS: same accuracy and AUROC as 1 on 27 runs, while LRDI lost
    # 0.6-1.2 test-accuracy points at 4: reports/suite-lrdi-meta-every.md); 1 = the papers' every step.
    meta_every: int = setting(1, ge=1)
    # value_std window: the issue asks for the std over the last epoch's weights, but with shuffled
    # passes an example is seen about once per epoch (std undefined), so the default window is the
    # last 3 epochs; std_epochs=1 gives exactly the last epoch.
    std_epochs: int = setting(3, ge=1)
    # the student's internal state the teacher reads: the input of this layer (a name from the model's
    # named_modules(), read with a forward hook); "" = the input of the model's last nn.Linear
    feature_layer: str = ""
    # how the meta-gradient is computed: autograd (second-order: backward through the virtual step kept in the
    # graph, any unroll) | fused (unroll 1 only: dJ/dw_i = -α/B ∇ℓ_i(θ)·∇J(θ') from per-example dot products —
    # from the student's own forward/backward (gradients.LayerTape, as DDS's fused rewards), or one forward-mode
    # pass when BatchNorm makes rows interact — then one backward through the teacher; no double backward; the
    # same numbers as autograd) | auto: fused when unroll is 1
    meta_grad: str = setting("auto", choices=("auto", "autograd", "fused"))
    # lrdi/mwnet: effective-sample-size floor of the batch weights, ESS = (sum w)^2 / (B sum w^2): when the teacher's
    # weights fall under it they are shrunk towards their batch mean until ESS = floor (0 = off). With the
    # per-row standardised hidden state (Teacher) alone the median ESS was 0.25-0.28 at 40 % flips
    # (docs/history/lrdi.md).
    ess_floor: float = setting(0.3, ge=0, lt=1)
    # the virtual steps' update rule: sgd (momentum-SGD at virtual_lr / virtual_momentum from a zero buffer, the
    # papers' rule) | optimizer (the loop's own optimizer as its real step will apply it, from its current state:
    # Adam with its moments m, v, step count, betas, eps, lr and weight decay, θ' = θ − lr m̂'/(sqrt(v̂') + eps)
    # with m', v' updated by the weighted gradient; SGD with its lr, momentum buffer and weight decay), so the
    # meta-gradient is taken at the point the real step moves to; virtual_lr and virtual_momentum are then unused
    lookahead: str = setting("sgd", choices=("sgd", "optimizer"))

    def validate(self) -> None:
        check_fields(self)
        chosen = self._chosen()
        bad = [s for s in chosen if s not in TEACHER_INPUTS]
        if bad or not chosen or len(set(chosen)) != len(chosen):
            raise setting_error(f"teacher_inputs={self.teacher_inputs}: choose one or more (no repeats) of "
                             f"{','.join(TEACHER_INPUTS)}")
        if self.variant == "mwnet" and chosen not in (TEACHER_INPUTS, ("loss",)):
            raise setting_error(f"teacher_inputs={self.teacher_inputs}: mwnet's teacher reads the loss only; "
                             f"use variant=lrdi to choose inputs")
        if self.meta_grad == "fused" and self.unroll != 1:
            raise setting_error(f"meta_grad=fused needs unroll 1 (got {self.unroll}); use meta_grad=autograd")
        if self.variant == "l2rw" and self.meta_every != 1:
            raise setting_error(f"meta_every={self.meta_every}: l2rw needs its meta-gradient every step; use 1")

    def _chosen(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.teacher_inputs.split(",") if s.strip())

    def inputs(self) -> tuple[str, ...]:
        """The teacher's signals, in order."""
        return ("loss",) if self.variant == "mwnet" else self._chosen()


class Teacher(nn.Module):
    """MLP from the chosen per-example signals to one weight logit (sigmoid applied by the caller)."""

    def __init__(self, inputs, *, feat_dim: int, num_classes: int, hidden: int, label_dim: int,
                 generator: torch.Generator):
        super().__init__()
        self.inputs = tuple(inputs)
        width = sum(feat_dim if s == "features" else label_dim if s == "label" else 1 for s in self.inputs)
        self.label = nn.Embedding(num_classes, label_dim) if "label" in self.inputs else None
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        for m in self.net:
            if isinstance(m, nn.Linear):  # PyTorch's default init, drawn from the run's generator
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(m.weight.shape[1])
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        if self.label is not None:
            nn.init.normal_(self.label.weight, generator=generator)

    def forward(self, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        # the hidden state is standardised per row (LayerNorm without learned scale): its norm grows ~10x over
        # training, which otherwise drives the teacher's weights to collapse (docs/history/lrdi.md)
        parts = [self.label(signals["label"]) if s == "label" else
                 F.layer_norm(signals[s], signals[s].shape[1:]) if s == "features" else signals[s]
                 for s in self.inputs]
        return self.net(torch.cat(parts, 1)).squeeze(1)


def _safe_sqrt(t: torch.Tensor) -> torch.Tensor:
    """sqrt(t) whose gradient is 0 where t = 0 (instead of inf·0 = NaN): Adam's second moment of a coordinate whose
    gradient has been exactly 0 so far (a dead unit); its update m / (sqrt(v) + eps) is then 0 whatever v does."""
    pos = t > 0
    return torch.where(pos, torch.where(pos, t, torch.ones_like(t)).sqrt(), torch.zeros_like(t))


def student_signals(feats: torch.Tensor, logits: torch.Tensor, losses: torch.Tensor, y: torch.Tensor,
                    progress: float) -> dict[str, torch.Tensor]:
    """Detached teacher inputs of a batch (Fan et al. §3: internal state + surface signals)."""
    feats, logits, losses = feats.detach(), logits.detach(), losses.detach()
    probs = logits.softmax(1)
    p_y = probs.gather(1, y[:, None])
    other = probs.scatter(1, y[:, None], -1.0).max(1, keepdim=True).values
    return {
        "features": feats, "loss": losses[:, None], "prob": p_y, "margin": p_y - other,
        "progress": torch.full_like(p_y, progress), "label": y,
    }


@register("lrdi", config=Config)
@register("l2rw", config=Config, variant="l2rw")
# Meta-Weight-Net's teacher steps every 4th step: same test accuracy and AUROC as every step on 3 data sets x
# 3 settings x 3 seeds (reports/suite-lrdi-meta-every.md); LRDI lost 0.6-1.2 points there, so it keeps 1
@register("mwnet", config=Config, variant="mwnet", meta_every=4)
class Trainer(Method):
    distributed = True  # every reduction goes through the ctx kit: synchronised under torchrun

    def __init__(self, ctx: TrainContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.model = ctx.build_model()
        self.opt = ctx.make_optimizer(self.model.parameters())
        self.teacher = self.teacher_opt = None
        self.feature_layer = feature_module(self.model, cfg.feature_layer)
        if cfg.variant != "l2rw":
            feat_dim = feature_dim(self.model, self.feature_layer, ctx.x[:2]) if "features" in cfg.inputs() else 0
            self.teacher = Teacher(cfg.inputs(), feat_dim=feat_dim, num_classes=ctx.num_classes,
                                   hidden=cfg.teacher_hidden, label_dim=cfg.label_dim,
                                   generator=ctx.generator).to(ctx.device)
            self.teacher_opt = torch.optim.Adam(self.teacher.parameters(), lr=cfg.teacher_lr,
                                                weight_decay=cfg.teacher_weight_decay, foreach=True)
        # fused meta-gradient: per-example dots from the tape (rows independent), or, when rows interact through
        # BatchNorm batch statistics (the tape would split the batch gradient into rows differently from
        # ∇ℓ_i), from one forward-mode pass along ∇J(θ') (gradients.per_example_dots "exact"; still no
        # double backward)
        self.tape, self.dots_by = None, None
        if cfg.meta_grad != "autograd" and cfg.unroll == 1:
            if has_batchnorm(self.model):
                self.dots_by = "jvp"
            else:
                try:
                    self.tape, self.dots_by = LayerTape(self.model), "tape"
                except NotImplementedError:
                    self.dots_by = "jvp"
        n, b, dev = ctx.n, ctx.global_batch_size, ctx.device  # every rank records the whole global batch
        # fixed-size buffers: memory does not grow with steps
        self.window = max(1, math.ceil(cfg.std_epochs * n / b))
        self.ring_idx = torch.full((self.window, b), -1, dtype=torch.long, device=dev)
        self.ring_w = torch.zeros((self.window, b), dtype=torch.float64, device=dev)
        zeros = lambda: torch.zeros(n, dtype=torch.float64, device=dev)  # noqa: E731
        self.w_sum, self.w_count, self.r_sum = zeros(), zeros(), zeros()
        self.steps_taken = 0

    # ------------------------------------------------------------ pieces

    def progress(self, step: int) -> float:
        return step / self.ctx.config.steps

    def weights(self, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher weights sigmoid(teacher(s)), shrunk towards their batch mean when their effective sample size
        is under `ess_floor`, divided by the batch mean when `normalize`."""
        w = torch.sigmoid(self.teacher(signals))
        ctx = self.ctx
        mean = w.mean() if not ctx.distributed else ctx.all_sum(w.sum()) / ctx.global_rows(len(w))  # global batch
        if self.cfg.ess_floor > 0:
            w = self._ess_floor(w, mean)
        return w / mean if self.cfg.normalize else w

    def _ess_floor(self, w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """w' = mean + c (w - mean) with the largest c <= 1 such that ESS(w') = (sum w')^2 / (B sum w'^2) >= floor.
        With r = w / mean, ESS = 1 / mean(r^2) and mean(r'^2) = 1 + c^2 (mean(r^2) - 1), so
        c = sqrt((1/floor - 1) / (mean(r^2) - 1)). c is computed from detached weights (a data-dependent step size
        of the shrinkage); the batch mean, and so the weights' scale, is unchanged."""
        r2 = ((w / mean) ** 2).detach()
        stats = torch.stack([r2.sum(), torch.tensor(float(len(w)), dtype=r2.dtype, device=r2.device)])
        self.ctx.all_reduce_([stats])  # torchrun: over the global batch
        m2 = stats[0] / stats[1]
        limit = 1.0 / self.cfg.ess_floor - 1.0
        if float(m2) - 1.0 <= limit:
            return w
        c = torch.sqrt(limit / (m2 - 1.0)).to(w.dtype)
        return mean + c * (w - mean)

    def dev_loss_after_unroll(self, losses0: torch.Tensor, w: torch.Tensor, x, y, dev_x, dev_y,
                              *, reduce: str = "mean", dev_total: int | None = None
                              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """J(θ_K): dev loss after K virtual steps (`_virtual_step`) on Σ/mean_i w_i ℓ_i, differentiable in w;
        also the first virtual gradient ∇θ L(θ_0) (in the graph).

        `losses0` are ℓ_i(θ_0) computed with the module's own parameters (reused, so step 1 needs no
        extra forward); later steps run the student functionally at θ_k.

        Under torchrun the virtual steps use the global batch's gradient, and the returned J is this rank's
        share (its dev rows' loss sum / `dev_total`, the global dev batch size); `first` stays local.
        """
        with no_running_stats_update(self.model):  # BatchNorm: batch statistics, running ones untouched
            return self._unroll(losses0, w, x, y, dev_x, dev_y, reduce=reduce, dev_total=dev_total)

    def _virtual_state(self) -> list[dict] | None:
        """What the virtual steps start from: None for the sgd look-ahead (a zero momentum buffer); for the
        optimizer look-ahead, per parameter, the loop optimizer's param group and its current state (Adam: m, v,
        step count; SGD: momentum buffer), read without copying (the virtual steps never write to them)."""
        if self.cfg.lookahead == "sgd":
            return None
        groups = {id(p): g for g in self.opt.param_groups for p in g["params"]}
        out = []
        for p in self.model.parameters():
            st = self.opt.state.get(p, {})
            out.append({"group": groups[id(p)], "m": st.get("exp_avg"), "v": st.get("exp_avg_sq"),
                        "step": float(st["step"]) if "step" in st else 0.0, "buf": st.get("momentum_buffer")})
        return out

    def _virtual_step(self, theta: dict, grads, state):
        """One virtual student step θ_{k+1}(θ_k, g_k) from the gradient g_k of the (global) weighted batch loss,
        built from differentiable ops (the graph runs through g_k to the weights); returns (θ_{k+1}, state).

        sgd: b_{k+1} = μ b_k + g_k (b_1 = g_0), θ_{k+1} = θ_k − α b_{k+1} (Fan et al. Alg. 1; MW-Net eq. 4).
        optimizer, Adam (Kingma & Ba Alg. 1, as torch.optim.Adam computes it): g ← g + λθ (L2 weight decay),
        t ← t + 1, m ← β1 m + (1 − β1) g, v ← β2 v + (1 − β2) g², θ ← θ − (lr / (1 − β1^t)) m /
        (sqrt(v) / sqrt(1 − β2^t) + eps). optimizer, SGD (torch.optim.SGD): d = g + λθ, b ← μ b + (1 − dampening) d
        (b ← d on its first step), θ ← θ − lr b (Nesterov: θ ← θ − lr (d + μ b))."""
        c = self.cfg
        if c.lookahead == "sgd":
            mu = c.virtual_momentum
            buf = list(grads) if state is None else [torch.add(g, b, alpha=mu) for b, g in zip(state, grads)]
            return {name: torch.add(t, b, alpha=-c.virtual_lr) for (name, t), b in zip(theta.items(), buf)}, buf
        adam = self.ctx.config.optimizer != "sgd"
        new_theta, new_state = {}, []
        for (name, t), g, st in zip(theta.items(), grads, state):
            grp = st["group"]
            lr, wd = grp["lr"], grp["weight_decay"]
            if adam:
                beta1, beta2 = grp["betas"]
                if wd and grp.get("decoupled_weight_decay", False):  # AdamW
                    t = t * (1 - lr * wd)
                elif wd:
                    g = g + wd * t
                step = st["step"] + 1
                m = (1 - beta1) * g if st["m"] is None else beta1 * st["m"] + (1 - beta1) * g
                v = (1 - beta2) * g * g if st["v"] is None else beta2 * st["v"] + (1 - beta2) * g * g
                denom = _safe_sqrt(v) / math.sqrt(1 - beta2**step) + grp["eps"]
                new_theta[name] = t - (lr / (1 - beta1**step)) * m / denom
                new_state.append({**st, "m": m, "v": v, "step": step})
            else:
                d = g + wd * t if wd else g
                mu = grp["momentum"]
                if mu:
                    buf = d if st["buf"] is None else mu * st["buf"] + (1 - grp["dampening"]) * d
                    d = d + mu * buf if grp["nesterov"] else buf
                    st = {**st, "buf": buf}
                new_theta[name] = t - lr * d
                new_state.append(st)
        return new_theta, new_state

    def _unroll(self, losses0, w, x, y, dev_x, dev_y, *, reduce: str, dev_total: int | None):
        c, world = self.cfg, self.ctx.world_size
        theta = dict(self.model.named_parameters())
        state, first = self._virtual_state(), None
        for k in range(c.unroll):
            if k == 0:
                losses = losses0
            else:
                losses = per_example_loss(functional_call(self.model, theta, (x,)), y)
            total = (w * losses).sum() if reduce == "sum" else (w * losses).mean()
            grads = torch.autograd.grad(total, list(theta.values()), create_graph=True)
            first = first or grads
            if world > 1:  # the global batch's gradient, differentiable (sum; the mean of equal slices' means)
                grads = self.ctx.all_sum_list(grads)
                if reduce != "sum":
                    grads = [g / world for g in grads]
            theta, state = self._virtual_step(theta, grads, state)
        dev_logits = functional_call(self.model, theta, (dev_x,))
        if world == 1:
            return F.cross_entropy(dev_logits, dev_y), first
        return per_example_loss(dev_logits, dev_y).sum() / (dev_total or len(dev_y) * world), first

    def meta_gradient(self, x, y, dev_x, dev_y, *, progress: float, dev_total: int | None = None) -> dict:
        """One forward of the student and the meta-gradient (Fan et al. Alg. 1 lines 4-7; Ren et al. lines 4-9).

        Returns `losses` (with graph, for the real step), `signals`, `dev_loss`, and `grads`: the
        gradient of J(θ_K) w.r.t. the teacher's parameters (lrdi/mwnet) or w.r.t. ε (l2rw, shape (B,)).
        Nothing is updated.
        """
        if self.dots_by is not None:
            return self._fused_meta_gradient(x, y, dev_x, dev_y, progress=progress, dev_total=dev_total)
        feats, logits = features_and_logits(self.model, x, self.feature_layer)
        losses = per_example_loss(logits, y)
        signals = student_signals(feats, logits, losses, y, progress)
        if self.teacher is None:
            eps = torch.zeros_like(losses, requires_grad=True)
            dev_loss, first = self.dev_loss_after_unroll(losses, eps, x, y, dev_x, dev_y, reduce="sum",
                                                         dev_total=dev_total)
            grads = torch.autograd.grad(dev_loss, eps, retain_graph=True)[0]  # torchrun: already global J's
        else:
            w = self.weights(signals)
            dev_loss, first = self.dev_loss_after_unroll(losses, w, x, y, dev_x, dev_y, dev_total=dev_total)
            grads = list(torch.autograd.grad(dev_loss, list(self.teacher.parameters()), retain_graph=True))
            self.ctx.all_reduce_(grads)  # torchrun: the ranks' shares of J sum to J
        if self.ctx.distributed:
            dev_loss = dev_loss.detach().reshape(1)
            self.ctx.all_reduce_([dev_loss])
            dev_loss = dev_loss[0]
        return {"losses": losses, "logits": logits, "signals": signals, "dev_loss": dev_loss.detach(), "grads": grads,
                "weights": None if self.teacher is None else w.detach(), "student_grads": [g.detach() for g in first]}

    def _fused_meta_gradient(self, x, y, dev_x, dev_y, *, progress: float, dev_total: int | None) -> dict:
        """meta_gradient for one virtual step without second-order autograd (Config.meta_grad).

        θ' = θ − α ∇θ L with L the (global) batch's mean of w_i ℓ_i (L2RW: Σ ε_i ℓ_i at ε = 0, so θ' = θ),
        hence ∂J(θ')/∂w_i = −α/B ∇ℓ_i(θ)·∇J(θ') (L2RW: −α ∇ℓ_i·∇J, Ren et al. eq. 12).  The dot products come
        from the layer inputs and output gradients recorded during the student's backward of L (LayerTape);
        with the optimizer look-ahead θ' = U(θ, g) the same dots are taken with u = ∂J(θ')/∂g in place of −α∇J(θ');
        the teacher's gradient is then one backward of w with those values as output gradients.  Returns
        what meta_gradient returns; falls back to the second-order path if a weight underflowed to 0."""
        c, ctx, world = self.cfg, self.ctx, self.ctx.world_size
        with self.tape if self.tape is not None else contextlib.nullcontext():
            feats, logits = features_and_logits(self.model, x, self.feature_layer)
        losses = per_example_loss(logits, y)
        signals = student_signals(feats, logits, losses, y, progress)
        names = [n for n, _ in self.model.named_parameters()]
        params = list(self.model.parameters())
        B = len(y)
        w = None
        if self.teacher is None:
            row_w = torch.ones_like(losses)
            total = losses.sum()  # the tape needs a backward with non-zero row weights; ε = 0 leaves θ' = θ
        else:
            w = self.weights(signals)
            row_w = w.detach()
            if self.tape is not None and not bool((row_w > 1e-30).all()):  # the division below would lose them
                self.tape.records = []
                return self._second_order(x, y, dev_x, dev_y, progress=progress, dev_total=dev_total)
            total = (row_w * losses).mean()
        # l2rw: θ' = θ, so this gradient only feeds the tape; with forward-mode dots it is not needed at all
        need_first = self.teacher is not None or self.tape is not None
        first = list(torch.autograd.grad(total, params, retain_graph=True)) if need_first else []
        if self.teacher is not None and world > 1:  # the global batch's mean gradient
            ctx.all_reduce_(first)
            first = [g / world for g in first]
        if c.lookahead == "optimizer":
            # θ' = U(θ, g) with U the real optimizer's elementwise update: ∂J/∂w_i = ∇ℓ_i · u / B with
            # u = ∂J(θ')/∂g (= diag(∂U/∂g) ∇J(θ')), taken by autograd through U from g as a leaf (l2rw: g = 0)
            g0 = [(torch.zeros_like(p) if self.teacher is None else g).detach().requires_grad_()
                  for p, g in zip(params, first or params)]
            theta, _ = self._virtual_step({n: p.detach() for n, p in zip(names, params)}, g0, self._virtual_state())
            leaves, scale = g0, 1.0
        elif self.teacher is None:
            theta = {n: p.detach().requires_grad_() for n, p in zip(names, params)}
            leaves, scale = list(theta.values()), -c.virtual_lr  # θ' = θ − α g: ∂J/∂g = −α ∇J(θ')
        else:
            theta = {n: (p.detach() - c.virtual_lr * g).requires_grad_() for n, p, g in zip(names, params, first)}
            leaves, scale = list(theta.values()), -c.virtual_lr
        with no_running_stats_update(self.model):  # BatchNorm: the dev rows' statistics, running ones untouched
            dev_logits = functional_call(self.model, theta, (dev_x,))
        if world == 1:
            dev_loss = F.cross_entropy(dev_logits, dev_y)
        else:
            dev_loss = per_example_loss(dev_logits, dev_y).sum() / (dev_total or len(dev_y) * world)
        v = list(torch.autograd.grad(dev_loss, leaves))
        ctx.all_reduce_(v)  # torchrun: the ranks' shares of J sum to J, so their gradients sum to ∂J/∂(leaves)
        if self.tape is not None:
            # dots_i = (∂total/∂ℓ_i) ∇ℓ_i·∇J(θ'): row_w_i / B times the dot (lrdi), the dot itself (l2rw)
            dots = self.tape.dots(dict(zip(names, v)), B)
            if self.teacher is not None:
                dots = dots * (B / row_w)
        else:  # ∇ℓ_i·∇J(θ') by forward mode at θ, the batch's own statistics, buffers untouched
            dots = per_example_dots(self.model, x, y, dict(zip(names, v)), method="exact")
        if self.teacher is None:
            grads = scale * dots
        else:
            dj_dw = scale * dots / (B * world)
            grads = list(torch.autograd.grad(w, list(self.teacher.parameters()), grad_outputs=dj_dw.to(w.dtype),
                                             retain_graph=True))
            ctx.all_reduce_(grads)  # torchrun: the ranks' shares of J sum to J
        dev_loss = dev_loss.detach()
        if world > 1:
            dev_loss = dev_loss.reshape(1)
            ctx.all_reduce_([dev_loss])
            dev_loss = dev_loss[0]
        return {"losses": losses, "logits": logits, "signals": signals, "dev_loss": dev_loss, "grads": grads,
                "weights": None if w is None else row_w, "student_grads": [g.detach() for g in first]}

    def _second_order(self, x, y, dev_x, dev_y, *, progress: float, dev_total: int | None) -> dict:
        dots_by, self.dots_by = self.dots_by, None
        try:  # the fused path's forward already updated the BatchNorm statistics: this second one must not
            with no_running_stats_update(self.model):
                return self.meta_gradient(x, y, dev_x, dev_y, progress=progress, dev_total=dev_total)
        finally:
            self.dots_by = dots_by

    def _plain(self, x, y, progress: float) -> dict:
        """Forward and teacher inputs only, for the steps between meta steps."""
        feats, logits = features_and_logits(self.model, x, self.feature_layer)
        losses = per_example_loss(logits, y)
        return {"losses": losses, "logits": logits, "signals": student_signals(feats, logits, losses, y, progress),
                "dev_loss": None, "grads": None}

    # ------------------------------------------------------------ the step

    def step(self, batch: Batch) -> StepRecord:
        self.model.train()
        progress = self.progress(batch.step)
        if self.teacher is not None and (batch.step - 1) % self.cfg.meta_every != 0:
            meta = self._plain(batch.x, batch.y, progress)
        else:
            dev_size = self.cfg.dev_batch_size or self.ctx.global_rows(len(batch.y))
            dev_x, dev_y = self.ctx.sample_dev(dev_size)
            with second_order():  # double backward through attention (a user's model)
                meta = self.meta_gradient(batch.x, batch.y, dev_x, dev_y, progress=progress,
                                          dev_total=self.ctx.dev_total(dev_size))
        losses, dev_loss = meta["losses"], meta["dev_loss"]
        reward = None
        if meta["grads"] is None:
            with torch.no_grad():
                w = self.weights(meta["signals"])
        elif self.teacher is None:
            reward = -meta["grads"]
            w = reward.clamp_min(0)
            total = w.sum().reshape(1)
            self.ctx.all_reduce_([total])  # torchrun: normalise over the global batch
            total = total[0]
            w = w * (self.ctx.global_rows(len(w)) / total) if total > 0 else torch.zeros_like(w)
        else:
            self.teacher.train()
            self.teacher_opt.zero_grad(set_to_none=True)
            for p, g in zip(self.teacher.parameters(), meta["grads"]):
                p.grad = g
            self.teacher_opt.step()
            if self.cfg.reuse_gradient:
                w = meta["weights"]
            else:
                with torch.no_grad():  # the real step uses the updated teacher (Alg. 1 line 8)
                    w = self.weights(meta["signals"])
        w = w.detach()
        self.opt.zero_grad(set_to_none=True)
        if self.cfg.reuse_gradient and meta["grads"] is not None and self.teacher is not None:
            for p, g in zip(self.model.parameters(), meta["student_grads"]):  # = ∇θ mean_i w_i ℓ_i at θ_0
                p.grad = g
        else:
            (w * losses).mean().backward()
        self.ctx.sync_grads_(self.model.parameters())
        self.opt.step()
        correct = meta["logits"].detach().argmax(1) == batch.y
        margin = margins(meta["logits"], batch.y)
        del meta

        # every rank records the whole global batch, so the replicas (and checkpoints) stay identical
        idx, wd = self.ctx.gather(batch.idx), self.ctx.gather(w.double())
        self.w_sum.index_add_(0, idx, wd)
        self.w_count.index_add_(0, idx, torch.ones_like(wd))
        if reward is not None:
            self.r_sum.index_add_(0, idx, self.ctx.gather(reward.detach().double()))
        slot = (batch.step - 1) % self.window
        self.ring_idx[slot].fill_(-1)
        self.ring_idx[slot, : len(wd)] = idx
        self.ring_w[slot, : len(wd)] = wd
        self.steps_taken = batch.step
        return StepRecord(loss=losses.detach(), weight=w, reward=None if reward is None else reward.detach(),
                          correct=correct, meta_loss=None if dev_loss is None else float(dev_loss), margin=margin)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "ring_idx": self.ring_idx,
                 "ring_w": self.ring_w, "w_sum": self.w_sum, "w_count": self.w_count, "r_sum": self.r_sum,
                 "last_step": self.steps_taken}
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
            state["teacher_opt"] = self.teacher_opt.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
            self.teacher_opt.load_state_dict(state["teacher_opt"])
        for k in ("ring_idx", "ring_w", "w_sum", "w_count", "r_sum"):
            getattr(self, k).copy_(state[k])
        self.steps_taken = int(state["last_step"])  # checkpoint key kept: older runs resume

    @torch.no_grad()
    def teacher_weights(
        self, x: torch.Tensor, y: torch.Tensor, *, progress: float, chunk: int | None = None
    ) -> torch.Tensor:
        """Raw sigmoid teacher weights of rows (x, y), student and teacher in eval mode, `chunk` rows at a time
        (default: the loop's eval_batch_size, which bounds the end-of-run peak memory on a large model)."""
        def weight(xb, yb):
            feats, logits = features_and_logits(self.model, xb, self.feature_layer)
            return torch.sigmoid(
                self.teacher(student_signals(feats, logits, per_example_loss(logits, yb), yb, progress))
            )

        return self.ctx.score_rows(weight, self.model, self.teacher, x=x, y=y, chunk=chunk)

    def values(self) -> MethodValues:
        """value: signals.in_run_value (percentile rank of the run's -mean_loss, reports/value-choice.md; the
        teacher weight and the mean weight ranked worse, docs/benchmarks.md). teacher_weight (lrdi/mwnet): the final
        teacher's weight of every row (eval mode, progress of the last step), divided by its mean over all rows
        when `normalize`; weight = teacher_weight, or for l2rw the row's mean logged weight (0 if never sampled).
        value_std: std (ddof 0) of the row's logged weights in the last `std_epochs` epochs (NaN when seen fewer
        than 2 times there). mean_weight / mean_reward / times_seen come from the loop's signal accumulator."""
        n, dev = self.ctx.n, self.ctx.device
        seen = self.w_count > 0
        nan = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
        mean_w = torch.where(seen, self.w_sum / self.w_count.clamp_min(1), nan)
        valid = self.ring_idx >= 0
        idx, w = self.ring_idx[valid], self.ring_w[valid]
        cnt = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, idx, torch.ones_like(w))
        s1 = torch.zeros_like(cnt).index_add_(0, idx, w)
        s2 = torch.zeros_like(cnt).index_add_(0, idx, w * w)
        m = s1 / cnt.clamp_min(1)
        std = torch.where(cnt >= 2, (s2 / cnt.clamp_min(1) - m * m).clamp_min(0).sqrt(), nan)
        out = {"value_std": std}
        doc_std = f"std of the row's logged weights in the last {self.cfg.std_epochs} epochs"
        if self.teacher is None:
            out["weight"] = torch.nan_to_num(mean_w, nan=0.0)
            return MethodValues(learned=mean_w, columns=out, doc={
                "learned": "the row's mean meta-learned example weight over the steps it was seen (L2RW)",
                "value_std": doc_std, "weight": "the row's mean logged weight (0 if never seen), normalised"})
        v = self.teacher_weights(self.ctx.x, self.ctx.y, progress=self.progress(self.steps_taken)).double()
        if self.cfg.normalize:
            v = v / v.mean()
        out["teacher_weight"] = v
        out["weight"] = v
        return MethodValues(learned=v, columns=out, doc={
            "learned": "teacher_weight: the final teacher's weight of the row", "value_std": doc_std,
            "weight": "teacher_weight, normalised to mean 1"})
