"""How long the loop trains and which model it keeps: `--epochs`, the evaluation interval, early stopping.

`BestModel` is the loop's early-stopping state (rank 0 only evaluates, so only rank 0 holds a model): the
evaluation with the best dev accuracy so far, its metrics and a CPU copy of the model, and how many evaluations
have passed without a better one. The copy goes into checkpoint.pt and best.pt together at each checkpoint
(best.pt first), so a resumed run continues with the best model that belongs to its checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from valuekit.config import TrainConfig
from valuekit.runs.layout import BEST
from valuekit.training.checkpoint import save_checkpoint

METRICS = ("dev_acc", "dev_loss", "test_acc", "test_loss")


def schedule(config: TrainConfig, rows: int, world_size: int = 1) -> TrainConfig:
    """`config` with `steps` = ceil(epochs x rows / (batch_size x world_size)) when `epochs` is set (a step takes
    batch_size rows on each of the world_size processes), unchanged otherwise."""
    if config.epochs is None:
        return config
    return dataclasses.replace(config, steps=max(1, math.ceil(config.epochs * rows / (config.batch_size * world_size))))


def eval_interval(config: TrainConfig) -> int:
    """Steps between evaluations: `eval_every`, or steps // 20 (at least 1) when it is None: about 20 per run."""
    return config.eval_every or max(1, config.steps // 20)


def _finite(m: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}


class BestModel:
    """The best evaluation so far by dev accuracy; equal accuracy: the lower dev loss wins, and with an equal
    loss too the earlier evaluation stays."""

    def __init__(self, out: Path, patience: int):
        self.out, self.patience = Path(out), patience
        self.step: int | None = None
        self.metrics: dict = {}
        self.model: dict = {}
        self.since = 0  # evaluations since the best one
        self.on_disk: int | None = None  # step of the model in best.pt

    def observe(self, step: int, metrics: dict, model) -> bool:
        """Count this evaluation; keep `model`'s state (a CPU copy) if it is the best so far. True if kept."""
        acc, loss = metrics["dev_acc"], metrics["dev_loss"]
        best = self.metrics
        better = math.isfinite(acc) and (self.step is None or acc > best["dev_acc"]
                                         or (acc == best["dev_acc"] and loss < best["dev_loss"]))
        if not better:
            self.since += 1
            return False
        self.step, self.since = step, 0
        self.metrics = {k: float(metrics[k]) for k in METRICS if k in metrics}
        self.model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    @property
    def spent(self) -> bool:
        """Patience is used up: `patience` evaluations in a row without a better dev accuracy."""
        return bool(self.patience) and self.since >= self.patience

    def save(self) -> None:
        """Write best.pt when the best model changed since it was last written."""
        if self.step is not None and self.step != self.on_disk:
            save_checkpoint(self.out, {"step": self.step, **self.metrics, "model": self.model}, BEST)
            self.on_disk = self.step

    def state_dict(self) -> dict:
        return {"since": self.since, "step": self.step, "metrics": self.metrics, "model": self.model}

    def load_state_dict(self, state: dict, *, write: bool) -> None:
        """Continue from a checkpoint's entry; `write` (rank 0) puts its model back in best.pt (a run killed
        between writing best.pt and checkpoint.pt left a later one there)."""
        self.since, self.step = int(state["since"]), state["step"]
        self.metrics, self.model = dict(state["metrics"]), state["model"]
        self.on_disk = None
        if write:
            self.save()

    def meta(self, stopped_early: bool) -> dict:
        """run.json's entries: best_step, best_metrics (dev/test accuracy and loss), stopped_early."""
        return {"best_step": self.step, "best_metrics": _finite(self.metrics) if self.step is not None else None,
                "stopped_early": stopped_early}
