"""Plain empirical risk minimisation: every example weighted 1. The baseline every method is measured against.

With a weighted table (`valuekit.train(..., weight_col=...)`, weights w rescaled to mean 1) it minimises the
weighted empirical risk instead: the batch loss is (1/B) sum_i w_i l_i, an unbiased estimate of
(1/N) sum_i w_i l_i over the table (the fixed-weight form of the reweighted risk of L2RW, Ren et al. 2018, eq. 2).
This is how `valuekit clean` retrains on a learned method's exported weights.

Its value is the "small-loss" signal: minus the example's mean training loss over the steps
it was seen (examples the model keeps getting wrong, often mislabelled ones, rank last).

Under torchrun the model gradients are averaged over ranks and every rank adds the whole global
batch's losses to its accumulators (all-gather), so all replicas hold the same state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from valuekit.ops.losses import per_example_loss
from valuekit.training.context import Batch, StepRecord, TrainContext
from valuekit.training.method import Method, MethodValues, register
from valuekit.training.signals import margins


def batch_loss(losses: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The loss a step backpropagates: mean(losses), or mean(weight * losses) for fixed per-row weights."""
    return losses.mean() if weight is None else (weight * losses).mean()


@dataclass
class Config:
    """uniform has no hyper-parameters beyond the loop's (model, lr, batch size, optimizer)."""


@register("uniform", config=Config)
class Trainer(Method):
    distributed = True  # every reduction goes through the ctx kit: synchronised under torchrun
    fp16 = True  # the model step goes through ctx.scale / ctx.optimizer_step (valuekit.training.precision)
    row_weights = True  # a weighted table's fixed weights multiply the losses (ctx.row_weight)

    def __init__(self, ctx: TrainContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.model = ctx.build_model()
        self.opt = ctx.make_optimizer(self.model.parameters())
        zeros = lambda: torch.zeros(ctx.n, dtype=torch.float64, device=ctx.device)  # noqa: E731
        self.loss_sum, self.loss_sq, self.count = zeros(), zeros(), zeros()

    def step(self, batch: Batch) -> StepRecord:
        self.model.train()
        logits = self.model(batch.x)
        losses = per_example_loss(logits, batch.y)
        w = None if self.ctx.row_weight is None else self.ctx.row_weight[batch.idx]
        self.opt.zero_grad(set_to_none=True)
        self.ctx.scale(batch_loss(losses, w)).backward()
        self.ctx.sync_grads_(self.model.parameters())  # torchrun: gradient of the global batch's mean loss
        self.ctx.optimizer_step(self.opt)
        # every rank accumulates the whole global batch, so the replicas (and checkpoints) stay identical
        idx, seen = self.ctx.gather(batch.idx), self.ctx.gather(losses.detach().double())
        self.loss_sum.index_add_(0, idx, seen)
        self.loss_sq.index_add_(0, idx, seen * seen)
        self.count.index_add_(0, idx, torch.ones_like(seen))
        return StepRecord(loss=losses.detach(), weight=None if w is None else w.detach(),
                          correct=logits.argmax(1) == batch.y, margin=margins(logits, batch.y))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "loss_sum": self.loss_sum, "loss_sq": self.loss_sq, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        for k in ("loss_sum", "loss_sq", "count"):
            getattr(self, k).copy_(state[k])

    def values(self) -> MethodValues:
        """value = -mean training loss over the run (NaN for never-sampled rows); value_std = its std."""
        count = self.count.clamp_min(1)
        mean = self.loss_sum / count
        var = (self.loss_sq / count - mean * mean).clamp_min(0)
        unseen = self.count == 0
        nan = torch.full_like(mean, float("nan"))
        return MethodValues(
            value=torch.where(unseen, nan, -mean),
            columns={"value_std": torch.where(unseen, nan, var.sqrt())},
            doc={
                "value": "minus the row's mean training loss over the run (NaN if never sampled)",
                "value_std": "std of the row's training loss over the steps it was seen",
            },
        )
