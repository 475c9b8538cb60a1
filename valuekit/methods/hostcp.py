"""HOST-CP: online subset selection through a differentiable convex program (Das et al., "Finding
High-Value Training Data Subset through Differentiable Convex Programming", ECML-PKDD 2021,
arXiv 2104.13794).

Per mini-batch (the paper's alternating minimisation, one batch at a time):

1. the selection model scores each example, s_i = h(u_i) . E[y_i] + b[y_i], with u_i the input
   features (``selector_input="features"``) or the main model's detached penultimate features
   (``"embedding"``: the input of the model's last nn.Linear, or of ``feature_layer``, read with a forward hook);
2. the convex layer turns the scores into a relaxed subset w in [0, 1]^B with sum(w) = k = fraction*B. By
   default this is a top-k relaxation, ``valuekit.ops.selection.SubsetSelection`` (max s.w - lam R(w), exact
   closed-form backend), NOT the paper's program; with ``representatives=True`` it is the paper's
   representativeness program (``valuekit.ops.representatives``: new/old representatives, bounded memory).
   reports/papers.md measured both on digits, mnist5k and Fashion-MNIST (3 seeds): the paper's program keeps more
   classes in a small top subset and retrains better subsets at every fraction (+1 to +51 points), but its own
   trained model is worse (mnist5k 78.9 vs 88.2 %, Fashion-MNIST 71.0 vs 75.2 %) at 5-6x the time, and both
   subsets trail random ones; the default stays the
   top-k relaxation for its cost and its model, and it is named so everywhere;
3. model step on the selection-weighted loss  L_w(theta) = sum_i w_i l_i(theta) / k  (w detached);
4. selector step through a one-step look-ahead: theta'(w) = theta - eta grad L_w(theta) (an SGD step
   with ``lookahead_lr`` = eta, written with ``torch.func.functional_call``, no model copy), and
   phi <- Adam step on L_dev(theta'(w(phi))).  Since theta' is linear in w,
       dL_dev/dw_i = -(eta / k) grad L_dev(theta') . grad l_i(theta)
   exactly; ``meta_grad="ghost"``/``"exact"`` computes these dot products with
   ``valuekit.ops.gradients.per_example_dots`` and back-propagates them through the layer and the
   selector; ``"fused"`` (default) reads them off the model step's own pass: each Linear/Conv2d
   layer's input a_i and output gradient (w_i / k) dl_i/dout_i are recorded, so
   (w_i / k) grad l_i . v = <output gradient_i, layer_v(a_i)> and dividing by w_i / k recovers the dot
   (rows with w_i = 0 get 0: the layer's Jacobian is zero there anyway -- quadratic: not in the free
   set; entropy: w_i (1 - w_i) = 0); ``meta_grad="autograd"`` differentiates the look-ahead directly
   (create_graph, second order; the reference the tests compare with finite differences).

Log per step: ``weight`` = w_i (sums to k per batch), ``selected`` = w_i > ``threshold``,
``reward`` = -dL_dev/dw_i on steps with a selector update (dot-product modes).

values.parquet: ``value`` = the loop's in-run value (percentile rank of -mean_loss, see
``valuekit.training.signals.in_run_value``); ``selection_weight`` = mean of w_i over the steps example i was in the
batch ("how strongly it was selected over the run"; NaN if never sampled), ``value_std`` its std, ``weight`` = the
same mean (normalised by the loop), ``selected_rate`` = fraction of its visits with w_i > threshold, ``score`` =
the final selector's score s_i (eval mode, no layer). run.json's ``column_docs`` says the same per run.

Cost (docs/history/hostcp.md, 2-core CPU, digits MLP): a uniform step ~0.9 ms; HOST-CP ~2.0 ms per step
on average with ``update_every=4`` (selector step ~3.2 ms, other steps ~1.4 ms).  ``representatives=True``
solves a cvxpylayers QP with B^2 + B*rep_max_old + B variables every step: ~40 ms per step at B = 16,
~140 ms at B = 32, plus ~1-2 s to build the program per batch size; use it on small runs only.

Under torchrun (valuekit.training.distributed) the mini-batch of the steps above is the global batch: every
rank's selector scores its own rows, the scores are summed into the global vector with a
differentiable all-reduce, every rank solves the same convex program over the global batch (k =
fraction x global batch) and keeps its slice of w; model gradients, the dev gradient of the
look-ahead and the selector gradients are all-reduced (each rank differentiates its share of the
global objectives), and the w statistics record the whole global batch. The run equals a
1-process run with the global batch. ``representatives=True`` is synchronised the same way, but its
iterative solver (SCS, tolerance 1e-6) turns the 1e-7 summation-order differences into weight
differences of ~3e-3 after one step and up to ~0.2 after four (digits, batch 32), so it matches a
1-process run only statistically.

BatchNorm: the look-ahead's forwards (the dev batch at theta', and with ``meta_grad="autograd"`` the
training batch at theta) and the selector's feature forward (``"embedding"``) run in training mode
(batch statistics) under `valuekit.ops.modes.no_running_stats_update`: only the model step's forward
updates the running mean/variance, and no dev row reaches the evaluated or exported model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.func import functional_call

from valuekit.config import setting
from valuekit.methods.scorers import LabelMLP, label_mlp
from valuekit.models.features import feature_dim, feature_module, features_and_logits, has_batchnorm
from valuekit.ops.gradients import LayerTape, per_example_dots
from valuekit.ops.losses import per_example_loss
from valuekit.ops.modes import no_running_stats_update
from valuekit.ops.selection import BACKENDS, REGULARISERS, SubsetSelection
from valuekit.training.context import Batch, StepRecord, TrainContext
from valuekit.training.method import Method, MethodValues, register
from valuekit.training.options import check_fields
from valuekit.training.signals import margins

SELECTOR_INPUTS = ("features", "embedding")
META_GRADS = ("fused", "ghost", "exact", "autograd")


@dataclass
class Config:
    """HOST-CP settings (defaults: data/digits-noisy20, MLP, batch 64, Adam 1e-3; see docs/history/hostcp.md)."""

    fraction: float = setting(0.5, gt=0, lt=1)  # k = fraction * batch size: the selection budget per mini-batch
    reg: str = setting("quadratic", choices=REGULARISERS)  # regulariser of the subset program: quadratic | entropy
    lam: float = setting(0.5, gt=0)  # its strength (> 0; larger = flatter weights, informative gradients)
    backend: str = setting("exact", choices=BACKENDS)  # exact (closed form) | cvxpylayers (reference, slow)
    # features: MLP over the inputs | embedding: over the model's detached features (hook)
    selector_input: str = setting("features", choices=SELECTOR_INPUTS)
    selector_hidden: int = setting(64, ge=1)  # hidden width of the selection model
    # Adam learning rate of the selection model (0 freezes it: uniform weights)
    selector_lr: float = setting(1e-3, ge=0)
    lookahead_lr: float = setting(0.1, gt=0)  # eta of the virtual SGD step theta' = theta - eta grad L_w
    dev_batch_size: int = setting(64, ge=1)  # dev examples per selector step (whole dev set if larger)
    # selector step every k model steps (4: ~1.5x a uniform step; 1: ~3.5x, see report)
    update_every: int = setting(4, ge=1)
    # fused: the dot products from the model step's own forward/backward (Linear/Conv2d models, no extra pass) |
    # ghost | exact: valuekit.ops.gradients.per_example_dots (one extra pass) | autograd: second order (reference)
    meta_grad: str = setting("fused", choices=META_GRADS)
    threshold: float = setting(0.5, gt=0, lt=1)  # w_i > threshold is logged as selected
    # selector_input=embedding reads the input of this layer (forward hook); "" = the model's last nn.Linear
    feature_layer: str = ""
    # the paper's representativeness program (cvxpylayers, 5-6x slower) instead of the default top-k relaxation
    representatives: bool = False
    rep_alpha: float = setting(1.0, gt=0)  # weight of the representation cost against the scores
    rep_ridge: float = setting(0.1, gt=0)  # ridge term of the representativeness program
    rep_capacity: int = setting(512, ge=1)  # memory of previously selected points
    rep_max_old: int = setting(16, ge=0)  # old candidates per batch (nearest neighbours from the memory)

    def validate(self) -> None:
        check_fields(self)

Selector = LabelMLP  # s(u, y) = h(u) . E[y] + b[y] (valuekit.methods.scorers)


@register("hostcp", config=Config)
class Trainer(Method):
    distributed = True  # every reduction goes through the ctx kit: synchronised under torchrun

    def __init__(self, ctx: TrainContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.model = ctx.build_model()
        self.opt = ctx.make_optimizer(self.model.parameters())
        if cfg.selector_input == "features":
            width, mean, std = ctx.x.shape[1], ctx.mean, ctx.std
        else:
            self.feature_layer = feature_module(self.model, cfg.feature_layer)
            width = feature_dim(self.model, self.feature_layer, ctx.x[:2])
            mean = std = None  # penultimate features are already on the model's scale
        self.selector = label_mlp(width, ctx.num_classes, cfg.selector_hidden, mean=mean, std=std,
                                  generator=ctx.generator, device=ctx.device)
        # Adam whatever the loop's optimizer: the meta-gradient's scale changes a lot over training
        self.selector_opt = torch.optim.Adam(self.selector.parameters(), lr=cfg.selector_lr, foreach=True)
        if cfg.representatives:
            from valuekit.ops.representatives import RepresentativeSelection

            self.layer = RepresentativeSelection(fraction=cfg.fraction, alpha=cfg.rep_alpha, ridge=cfg.rep_ridge,
                                                 capacity=cfg.rep_capacity, max_old=cfg.rep_max_old)
        else:
            self.layer = SubsetSelection(fraction=cfg.fraction, reg=cfg.reg, lam=cfg.lam, backend=cfg.backend)
        z = lambda: torch.zeros(ctx.n, dtype=torch.float64, device=ctx.device)  # noqa: E731
        self.w_sum, self.w_sq, self.count, self.sel_count = z(), z(), z(), z()
        self.steps_taken = 0
        self.tape = None
        # BatchNorm in training mode makes a row's loss depend on the other rows: the tape's split of the batch
        # gradient into rows is then not grad l_i, so the dots come from one forward-mode pass instead ("exact")
        self.dots_method = cfg.meta_grad
        if cfg.meta_grad == "fused" and has_batchnorm(self.model):
            self.dots_method = "exact"
        if self.dots_method == "fused":
            try:
                self.tape = LayerTape(self.model)
            except NotImplementedError:  # layers other than Linear/Conv2d (a user's model): exact dots instead
                self.tape, self.dots_method = None, "exact"

    # -------------------------------------------------------- pieces

    def _selector_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.selector_input == "features":
            return x
        with torch.no_grad(), no_running_stats_update(self.model):  # the model step's forward updates them
            return features_and_logits(self.model, x, self.feature_layer)[0]

    def _weights(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Relaxed subset weights; under torchrun of the whole global batch (rank 0's rows first)."""
        s = self._global(self.selector(u, y))
        if self.cfg.representatives:
            feats = u if self.cfg.selector_input == "embedding" else (u - self.ctx.mean) / self.ctx.std
            return self.layer(s, self.ctx.gather(feats.detach()))[0]
        return self.layer.solve(s)  # the selector's own scores: no validation pass (a host sync every step)

    def _global(self, s: torch.Tensor) -> torch.Tensor:
        """Every rank's scores in global-batch order, differentiable in this rank's (zeros elsewhere, summed)."""
        ctx = self.ctx
        if not ctx.distributed:
            return s
        zero = torch.zeros_like(s).detach()
        return ctx.all_sum(torch.cat([s if r == ctx.rank else zero for r in range(ctx.world_size)]))

    def meta_gradient(self, x, y, w, dev_x, dev_y, grads: dict[str, torch.Tensor], *, k: float | None = None,
                      dev_total: int | None = None) -> tuple[torch.Tensor, float]:
        """dL_dev(theta'(w))/dw (B,) by the dot-product identity of the module docstring, and L_dev(theta').

        ``grads`` = grad L_w(theta) at the current parameters (what the model step computed); with
        ``meta_grad="fused"`` the tape must hold that step's forward/backward. Under torchrun ``k`` is the
        global budget, ``grads`` the all-reduced gradient and the dev gradient is all-reduced here."""
        eta, k = self.cfg.lookahead_lr, float(w.detach().sum()) if k is None else k
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        ahead = {n: (p - eta * grads[n]).requires_grad_(True) for n, p in params.items()}
        with no_running_stats_update(self.model):  # BatchNorm: the dev rows' statistics, running ones untouched
            dev_loss = self.ctx.dev_loss(functional_call(self.model, ahead, (dev_x,)), dev_y, dev_total)
        v = list(torch.autograd.grad(dev_loss, list(ahead.values())))
        dev_loss = dev_loss.detach().reshape(1)
        self.ctx.all_reduce_([*v, dev_loss])
        v = dict(zip(ahead, v))
        if self.cfg.meta_grad == "fused" and self.tape is not None:
            scaled = self.tape.dots(v, w.shape[0]).to(w.dtype)  # (w_i / k) grad l_i . v
            wd = w.detach()
            dots = torch.where(wd > 0, scaled / torch.where(wd > 0, wd, torch.ones_like(wd)) * k,
                               torch.zeros_like(wd))
        else:
            method = self.dots_method if self.cfg.meta_grad == "fused" else self.cfg.meta_grad
            dots = per_example_dots(self.model, x, y, v, method=method, params=params).to(w.dtype)
        return -(eta / k) * dots, float(dev_loss.detach())

    def lookahead_dev_loss(self, x, y, w, dev_x, dev_y, *, k: float | None = None,
                           dev_total: int | None = None) -> torch.Tensor:
        """L_dev(theta - eta grad_theta sum_i w_i l_i(theta) / k), differentiable in w (second order).
        Under torchrun the inner gradient is summed over ranks in the graph and the result is this rank's share."""
        eta, k = self.cfg.lookahead_lr, float(w.detach().sum()) if k is None else k
        with no_running_stats_update(self.model):  # BatchNorm: batch statistics, running ones untouched
            with torch.enable_grad():  # the inner gradient is needed even when evaluating without grad
                params = {n: p.detach().requires_grad_(True) for n, p in self.model.named_parameters()}
                losses = per_example_loss(functional_call(self.model, params, (x,)), y)
                g = torch.autograd.grad((w * losses).sum() / k, list(params.values()), create_graph=w.requires_grad)
                g = self.ctx.all_sum_list(g)
            ahead = {n: p - eta * gi for (n, p), gi in zip(params.items(), g)}
            return self.ctx.dev_loss(functional_call(self.model, ahead, (dev_x,)), dev_y, dev_total)

    # -------------------------------------------------------- the step

    def step(self, batch: Batch) -> StepRecord:
        cfg, ctx = self.cfg, self.ctx
        x, y = batch.x, batch.y
        self.model.train()
        update = cfg.selector_lr > 0 and self.steps_taken % cfg.update_every == 0
        self.steps_taken += 1
        u = self._selector_input(x)
        with torch.set_grad_enabled(update):
            w_all = self._weights(u, y)
        k = float(w_all.detach().sum())  # the (global) budget
        w = ctx.local_slice(w_all, len(y))

        taping = update and self.tape is not None
        with self.tape if taping else contextlib.nullcontext():
            logits = self.model(x)
        losses = per_example_loss(logits, y)
        self.opt.zero_grad(set_to_none=True)
        ((w.detach() * losses).sum() / k).backward()
        # torchrun: each rank's loss is its share of sum_i w_i l_i / k over the global batch
        if ctx.distributed:
            ctx.all_reduce_([p.grad for p in self.model.parameters() if p.grad is not None])

        reward, meta_loss = None, None
        if update:
            dev_x, dev_y = ctx.sample_dev(cfg.dev_batch_size)
            dev_total = ctx.dev_total(cfg.dev_batch_size)
            self.selector_opt.zero_grad(set_to_none=True)
            if cfg.meta_grad == "autograd":
                dev_loss = self.lookahead_dev_loss(x, y, w, dev_x, dev_y, k=k, dev_total=dev_total)
                dev_loss.backward(inputs=list(self.selector.parameters()))
                meta_loss = dev_loss.detach().reshape(1)
                ctx.all_reduce_([meta_loss])
                meta_loss = float(meta_loss)
            else:
                grads = {n: p.grad for n, p in self.model.named_parameters()}
                dw, meta_loss = self.meta_gradient(x, y, w, dev_x, dev_y, grads, k=k, dev_total=dev_total)
                w.backward(dw, inputs=list(self.selector.parameters()))
                reward = -dw
            # the ranks' shares of the dev objective sum to it: sum their selector gradients
            ctx.all_reduce_([q.grad for q in self.selector.parameters() if q.grad is not None])
            self.selector_opt.step()
        self.opt.step()

        wd = w.detach()
        # every rank records the whole global batch, so the replicas (and checkpoints) stay identical
        w_all, idx_all = w_all.detach(), ctx.gather(batch.idx)
        if cfg.representatives:
            keep = w_all > cfg.threshold
            feats = u if cfg.selector_input == "embedding" else (u - self.ctx.mean) / self.ctx.std
            self.layer.remember(ctx.gather(feats)[keep], idx_all[keep])
        sel = wd > cfg.threshold
        w64 = w_all.double()
        self.w_sum.index_add_(0, idx_all, w64)
        self.w_sq.index_add_(0, idx_all, w64 * w64)
        self.count.index_add_(0, idx_all, torch.ones_like(w64))
        self.sel_count.index_add_(0, idx_all, (w_all > cfg.threshold).double())
        return StepRecord(loss=losses.detach(), weight=wd, reward=reward, selected=sel,
                          correct=logits.argmax(1) == y, meta_loss=meta_loss, margin=margins(logits, y))

    # -------------------------------------------------------- state and values

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                 "selector": self.selector.state_dict(), "selector_opt": self.selector_opt.state_dict(),
                 "w_sum": self.w_sum, "w_sq": self.w_sq, "count": self.count, "sel_count": self.sel_count,
                 "t": self.steps_taken}
        if self.cfg.representatives:
            state["memory"] = self.layer.state_dict_memory()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.selector.load_state_dict(state["selector"])
        self.selector_opt.load_state_dict(state["selector_opt"])
        for key in ("w_sum", "w_sq", "count", "sel_count"):
            getattr(self, key).copy_(state[key])
        self.steps_taken = int(state["t"])  # checkpoint key kept: older runs resume
        if self.cfg.representatives:
            self.layer.load_state_dict_memory(state["memory"])

    @torch.no_grad()
    def scores(self, batch_size: int = 4096) -> torch.Tensor:
        """The trained selector's score s_i of every training row (eval mode)."""
        return self.ctx.score_rows(lambda x, y: self.selector(self._selector_input(x), y), self.model,
                                   chunk=batch_size)

    def values(self) -> MethodValues:
        """value = percentile rank of the run's -mean_loss over the table (signals.in_run_value; the
        selection weight ranked worse, docs/benchmarks.md); selection_weight = mean w_i over the steps row i
        was seen (NaN if never; the raw learned quantity), value_std its std; weight = that mean (normalised by the
        loop); selected_rate = fraction of visits with w_i > threshold; score = the final selector's score."""
        count = self.count.clamp_min(1)
        mean = self.w_sum / count
        var = (self.w_sq / count - mean * mean).clamp_min(0)
        unseen = self.count == 0
        nan = torch.full_like(mean, float("nan"))
        sel_w = torch.where(unseen, nan, mean)
        return MethodValues(learned=sel_w, columns={
            "selection_weight": sel_w, "value_std": torch.where(unseen, nan, var.sqrt()),
            "weight": torch.where(unseen, torch.zeros_like(mean), mean),
            "selected_rate": torch.where(unseen, nan, self.sel_count / count), "score": self.scores().double()},
            doc={"learned": "selection_weight: the row's mean relaxed selection weight w_i over the steps it was seen, "
                            + ("from the paper's representativeness program (representatives=True)"
                               if self.cfg.representatives else
                               "from the top-k relaxation (the default layer, not the paper's representativeness "
                               "program)"),
                 "value_std": "std of the row's selection weight w_i over the steps it was seen",
                 "weight": "the row's mean selection weight (0 if never seen), normalised to mean 1"})
