"""The method contract the loop drives, and the registry that names methods.

A method is a subclass of `Method` in one module of `valuekit.methods`, registered where it is defined:

    @register("dds", config=Config)
    class Trainer(Method): ...

`register` checks the contract once, at import: a `Config` dataclass whose fields all have documented defaults
(bounds in field metadata, `valuekit.config.setting`; rules tying fields together in `Config.validate()`), a
concrete subclass of `Method`, and registry overrides that name Config fields. One class may be registered under
several names with different overrides (lrdi, l2rw and mwnet). The names and their modules are listed in
`valuekit.config.METHODS` so that the command line can list methods without importing torch; `method_spec`
imports the module, which registers its names.

Optional capabilities are declared on the class with defaults, never probed: `sampler` (a `Sampler` the method
draws its batches from; None: shuffled passes), `evaluate(x, y)` (dev/test loss and metric; default: mean
cross-entropy and accuracy of `self.model`), `source_table()` (multi-source methods: one row per source),
`distributed` (every reduction goes through the context's kit, so the method runs under torchrun), `fp16`
(the model step goes through the context's gradient scaler) and `row_weights` (the method multiplies each row's
training loss by the table's fixed weight, `TrainContext.row_weight`; a weighted table is refused for the others,
whose own weighting would silently override it).

`values()` returns a `MethodValues`: the method's own per-row columns, and either the learned quantity that the
loop's common `value` falls back to (`learned`) or the method's own `value` where the method defines what value
means (uniform's loss, multi-source DDS's source ratio, BADS's task weights). The loop computes `value` in one
place (`valuekit.training.signals.in_run_value`).
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from valuekit.config import METHODS, available_methods
from valuekit.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from valuekit.training.context import Batch, StepRecord, TrainContext
    from valuekit.training.samplers import Sampler


@dataclass
class MethodValues:
    """What `Method.values()` returns: arrays/tensors over the training table's rows.

    columns: the method's own columns of values.parquet (`value_std`, `weight` and method columns such as
    `scorer_logit`); `weight` is normalised to mean 1 by the loop. learned: the method's learned quantity, which
    the loop's in-run `value` falls back to where the run has no in-run signals. value: the method's own `value`
    (then the loop does not compute one). Exactly one of `learned` and `value` is given. doc: what `value` (when
    given), `learned`, `value_std` and `weight` mean for this method, in a sentence each; the loop writes them
    into values.parquet's metadata and run.json so that every output can say what its columns are."""

    columns: dict[str, Any] = field(default_factory=dict)
    learned: Any = None
    value: Any = None
    doc: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if (self.learned is None) == (self.value is None):
            raise TypeError("MethodValues needs exactly one of learned= and value=")
        if "value" in self.columns:
            raise TypeError("MethodValues: `value` is not a column; pass value= or learned=")


class Method(ABC):
    """One method: built as `cls(ctx, cfg)` with the run's `TrainContext` and the method's Config."""

    config_class: ClassVar[type]  # set by `register`
    distributed: ClassVar[bool] = False  # every reduction uses the ctx kit: runs under torchrun
    fp16: ClassVar[bool] = False  # the model step goes through ctx.scale / ctx.optimizer_step
    row_weights: ClassVar[bool] = False  # honours the table's fixed per-row loss weights (ctx.row_weight)
    sampler: Sampler | None = None  # set in __init__ to draw batches another way than shuffled passes
    model: torch.nn.Module
    ctx: TrainContext

    def __init__(self, ctx: TrainContext, cfg: Any) -> None:
        """Build the model, optimizers and per-row state from the run's context and the method's Config."""
        self.ctx, self.cfg = ctx, cfg

    @abstractmethod
    def step(self, batch: Batch) -> StepRecord:
        """Train on one batch; per-example losses and whatever the method learned about these rows."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything a resumed run needs (tensors, numbers, lists and dicts only: weights_only checkpoints)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    @abstractmethod
    def values(self) -> MethodValues:
        """The method's per-row columns at the end of the run (see `MethodValues`)."""

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(loss, metric) of the current model on a dev or test set; default: cross-entropy and accuracy."""
        from valuekit.training.context import evaluate

        return evaluate(self.model, x, y, self.ctx.config.eval_batch_size)

    def source_table(self) -> pd.DataFrame | None:
        """Multi-source methods: one row per source (`valuekit.runs.layout.SOURCE_TABLE_SCHEMA`); else None."""
        return None


@dataclass(frozen=True)
class MethodSpec:
    """A registered name: the class, its Config and the Config overrides of this name."""

    name: str
    cls: type[Method]
    overrides: dict

    @property
    def Config(self) -> type:  # noqa: N802 - the method's Config class
        return self.cls.config_class

    @property
    def distributed(self) -> bool:
        return self.cls.distributed

    def build(self, ctx: TrainContext, cfg) -> tuple[Method, Sampler]:
        """(method, sampler): the method's own `sampler` when it sets one, else shuffled passes."""
        from valuekit.training.samplers import default_sampler

        if ctx.row_weight is not None and not self.cls.row_weights:
            takes = ", ".join(sorted(n for n, s in REGISTRY.items() if s.cls.row_weights))
            raise InputError(f"method {self.name!r} learns its own weights and takes no fixed per-row weights "
                             f"(weight_col); methods that do: {takes}")
        method = self.cls(ctx, cfg)
        return method, method.sampler or default_sampler(ctx)


REGISTRY: dict[str, MethodSpec] = {}


def check_contract(name: str, cls, config, overrides: dict) -> None:
    """TypeError unless `cls` is a concrete Method and `config` a dataclass with defaults that has `overrides`."""
    if not dataclasses.is_dataclass(config) or not isinstance(config, type):
        raise TypeError(f"method {name!r}: config= needs a Config dataclass")
    missing = [f.name for f in dataclasses.fields(config)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TypeError(f"method {name!r}: Config fields {missing} need documented defaults")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"method {name!r}: {cls!r} is not a subclass of valuekit.training.method.Method")
    if cls.__abstractmethods__:
        raise TypeError(f"method {name!r}: {cls.__name__} lacks {', '.join(sorted(cls.__abstractmethods__))}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise TypeError(f"method {name!r}: registry overrides unknown Config fields {sorted(unknown)}")


def register(name: str, *, config: type, **overrides):
    """Class decorator: register `cls` as method `name` with its Config and Config overrides (checked)."""

    def deco(cls):
        check_contract(name, cls, config, overrides)
        cls.config_class = config
        REGISTRY[name] = MethodSpec(name=name, cls=cls, overrides=dict(overrides))
        return cls

    return deco


def method_spec(name: str) -> MethodSpec:
    """The method registered as `name` (its module imported on first use); InputError naming the known ones."""
    if name not in REGISTRY:
        if name not in METHODS:
            raise InputError(f"unknown method {name!r}; choose from {', '.join(available_methods())}")
        module = METHODS[name]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                raise InputError(f"method {name!r} is not available in this version of valuekit") from None
            raise
        if name not in REGISTRY:
            raise TypeError(f"method {name!r}: module {module} does not register it")
    return REGISTRY[name]
