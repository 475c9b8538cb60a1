"""Everything a method sees: the batch it gets, the record it returns, the context and its small kit
(global-batch reductions, dev loss, chunked scoring in eval mode). The contract a method satisfies is
`valuekit.training.method.Method`.
"""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from valuekit.config import TrainConfig
from valuekit.data.memory import trim_heap
from valuekit.models.builtin import build_model
from valuekit.models.user import build_user_model, is_builtin
from valuekit.ops.losses import per_example_loss
from valuekit.ops.modes import eval_mode
from valuekit.training import distributed as dist_


@dataclass
class Batch:
    """A training mini-batch on the device; `idx` are row numbers in the training table."""

    step: int
    idx: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    source: torch.Tensor | None = None  # source codes into TrainContext.sources


@dataclass
class StepRecord:
    """What one method step reports; per-example tensors have the batch's length."""

    loss: torch.Tensor
    weight: torch.Tensor | None = None
    reward: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    scorer_loss: float | None = None  # a learned scorer's own training loss (dds, multidds)
    meta_loss: float | None = None  # the dev loss a meta step minimised (lrdi, hostcp)
    # source -> (prob, count) or (prob, count, reward, reward_se), logged to sources/
    sources: dict[str, tuple] | None = None
    margin: torch.Tensor | None = None  # assigned-label logit - largest other logit (signals.margins), for AUM




@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on (x, y), in eval mode."""
    loss, correct = 0.0, 0
    scored = 0  # accuracy denominator: rows, or scored tokens for sequence targets
    with eval_mode(model, no_grad=True):
        for i in range(0, len(y), batch_size):
            logits, yb = model(x[i: i + batch_size]), y[i: i + batch_size]
            loss += per_example_loss(logits, yb).sum().item()
            correct += (logits.argmax(1) == yb).sum().item()
            scored += yb.numel() if yb.dim() == 1 else int((yb != -100).sum())
    return loss / len(y), correct / max(scored, 1)


@dataclass
class TrainContext:
    """Everything a method may use: trainer-visible data on the device, config, seeded generator, and a
    small kit (global-batch reductions, dev loss, chunked scoring) that is the same for one process
    and for torchrun."""

    config: TrainConfig
    device: torch.device
    generator: torch.Generator  # CPU generator; draw on CPU then move, so runs match across devices
    x: torch.Tensor
    y: torch.Tensor
    ids: np.ndarray
    num_classes: int
    classes: list[str]
    dev_x: torch.Tensor
    dev_y: torch.Tensor
    source: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)
    dev_source: torch.Tensor | None = None
    image_shape: tuple[int, ...] | None = None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    group: torch.Tensor | None = None  # text-pair tables: target-sentence id per training row (CPU int64)
    # fixed per-row loss weights, mean 1, on the device (a table loaded with weight_col); only for methods that
    # declare Method.row_weights (MethodSpec.build refuses the others)
    row_weight: torch.Tensor | None = None
    rank: int = 0  # this process's rank under torchrun (0 for one process)
    world_size: int = 1  # processes taking part; each step's global batch is batch_size x world_size rows
    # a user's model: (num_classes, input_shape) -> nn.Module (valuekit.models.user.resolve_factory)
    model_factory: Any = None
    scaler: Any = None  # torch.amp.GradScaler under --precision fp16 (valuekit.training.precision), else None
    dev_order: torch.Tensor | None = None  # causal-LM tables: dev rows by token length (CPU), for sample_dev

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one row as a user's model receives it: the image shape, or (features,)."""
        return tuple(self.image_shape) if self.image_shape else (self.x.shape[1],)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: scaled under fp16 (see `optimizer_step`), unchanged otherwise."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        """opt.step(), through the fp16 gradient scaler when there is one (it skips steps with inf/NaN gradients)."""
        if self.scaler is None:
            opt.step()
        else:
            self.scaler.step(opt)
            self.scaler.update()
    signals: Any = None  # signals.SignalAccumulator the loop feeds every step; methods may read it in values()

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def global_batch_size(self) -> int:
        """Rows per step over all ranks (= config.batch_size for one process)."""
        return self.config.batch_size * self.world_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def global_rows(self, local: int) -> int:
        """Rows over all ranks when every rank holds `local` rows (= local for one process)."""
        return local * self.world_size

    # ---- synchronisation (valuekit.training.distributed); every helper is a no-op for one process, and every rank
    # must call them in the same order.

    def sync_grads_(self, params) -> None:
        """Average `.grad` of replicated parameters over ranks (what DDP does), before the optimizer step."""
        if self.world_size > 1:
            dist_.all_reduce_([p.grad for p in params if p.grad is not None], op="mean", world_size=self.world_size)

    def all_reduce_(self, tensors, *, op: str = "sum") -> None:
        """In-place sum/mean over ranks of tensors (not differentiable; one collective)."""
        dist_.all_reduce_(list(tensors), op=op, world_size=self.world_size)

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over ranks: each rank backpropagates its share of a global objective and then
        holds the whole objective's derivative for its own inputs (replicated parameters: sum their grads)."""
        return dist_.all_reduce_sum(tensor, world_size=self.world_size)

    def all_sum_list(self, tensors) -> list[torch.Tensor]:
        """Differentiable sum over ranks of several tensors, in one collective."""
        return dist_.all_reduce_sum_list(list(tensors), world_size=self.world_size)

    def all_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum over ranks (not differentiable)."""
        return dist_.all_reduce_max(tensor, world_size=self.world_size)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of a per-example tensor, concatenated in global-batch order (detached)."""
        return dist_.gather(tensor, world_size=self.world_size)

    def global_mean(self, v: torch.Tensor) -> torch.Tensor:
        """Mean of `v` over the global batch (every rank's rows; the plain mean for one process). Not
        differentiable under torchrun."""
        if self.world_size == 1:
            return v.mean()
        total = torch.stack([v.sum(), torch.tensor(float(len(v)), dtype=v.dtype, device=v.device)])
        self.all_reduce_([total])
        return total[0] / total[1]

    def mean_share(self, v: torch.Tensor, total: int | None = None) -> torch.Tensor:
        """This rank's share of a global mean: v.mean() for one process, else sum(v) / total (default
        len(v) x world_size); the shares of all ranks sum to the global mean (differentiable)."""
        if self.world_size == 1:
            return v.mean()
        return v.sum() / (total or len(v) * self.world_size)

    def dev_loss(self, logits: torch.Tensor, y: torch.Tensor, total: int | None = None) -> torch.Tensor:
        """Mean cross-entropy of a dev batch; under torchrun this rank's share (see `mean_share`)."""
        if self.world_size == 1:
            return F.cross_entropy(logits, y)
        return self.mean_share(per_example_loss(logits, y), total)

    def local_slice(self, v_all: torch.Tensor, local: int) -> torch.Tensor:
        """This rank's contiguous slice of a global-batch vector (the vector itself for one process)."""
        return v_all if self.world_size == 1 else v_all[self.rank * local: (self.rank + 1) * local]

    def dev_total(self, size: int) -> int:
        """Rows in the global dev batch that `sample_dev(size)` shards (size, or the whole dev set)."""
        return min(size, len(self.dev_y))

    # ---- building blocks

    def build_model(self, name: str | None = None, *, out_features: int | None = None) -> torch.nn.Module:
        """The configured model (or `name`) for this data, initialised from the run's generator."""
        spec = name or self.config.model
        if not is_builtin(spec):  # a user's model: pkg.mod:factory, torchvision:NAME, a factory or a module
            model = build_user_model(spec, num_classes=out_features or self.num_classes, input_shape=self.input_shape,
                                     generator=self.generator, factory=None if name else self.model_factory)
            return model.to(self.device)
        model = build_model(
            name or self.config.model, in_features=self.x.shape[1], num_classes=out_features or self.num_classes,
            image_shape=self.image_shape, hidden=self.config.hidden, mean=self.mean, std=self.std,
            generator=self.generator, lora=self.config.lora if name is None else 0,
            checkpointing=self.config.gradient_checkpointing and name is None,
        )
        return model.to(self.device)

    def make_optimizer(self, params, *, lr: float | None = None) -> torch.optim.Optimizer:
        c = self.config
        lr = c.lr if lr is None else lr
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return torch.optim.Adam(params, lr=lr, weight_decay=c.weight_decay)

    def sample_dev(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniform dev mini-batch (without replacement when size <= dev size). Under torchrun every rank draws
        the same global batch of `size` rows and returns its own contiguous slice (`dev_total(size)` rows in all).
        Causal-LM tables: `size` consecutive rows (cyclically) of the dev set sorted by length from a uniform
        start, so a batch is trimmed to similar lengths; every dev row is still drawn with probability size / M,
        so M / size times the batch's loss sum stays an unbiased estimate of the dev set's."""
        m = len(self.dev_y)
        if size >= m:
            x, y = self.dev_x, self.dev_y
        elif self.dev_order is not None:
            start = int(torch.randint(m, (1,), generator=self.generator))
            idx = self.dev_order[(start + torch.arange(size)) % m].to(self.device)
            x, y = self.dev_x[idx], self.dev_y[idx]
        else:
            idx = torch.randperm(m, generator=self.generator)[:size].to(self.device)
            x, y = self.dev_x[idx], self.dev_y[idx]
        if self.world_size > 1:
            x = torch.tensor_split(x, self.world_size)[self.rank]
            y = torch.tensor_split(y, self.world_size)[self.rank]
        return x, y

    def score_rows(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *modules: torch.nn.Module,
                   x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                   chunk: int | None = None) -> torch.Tensor:
        """fn(x_chunk, y_chunk) over the rows (default: the training rows) in chunks of `chunk` (default
        config.eval_batch_size), concatenated; `modules` in eval mode and without autograd meanwhile, each
        module's own train/eval mode restored afterwards."""
        x = self.x if x is None else x
        y = self.y if y is None else y
        chunk = chunk or self.config.eval_batch_size
        out = None
        with eval_mode(*modules, no_grad=True):
            # one preallocated result, and the heap trimmed after each chunk: otherwise the chunks' freed
            # activations fragment the heap and resident memory grows with the number of rows (valuekit.data.memory)
            for i in range(0, len(y), chunk):
                part = fn(x[i: i + chunk], y[i: i + chunk])
                if out is None:
                    out = part.new_empty((len(y), *part.shape[1:]))
                out[i: i + len(part)] = part
                del part
                trim_heap()
        return out


__all__ = ["Batch", "StepRecord", "TrainContext", "per_example_loss", "evaluate", "eval_mode"]
