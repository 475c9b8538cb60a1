"""Callbacks into the training loop: the `Hook` contract and the one place where user objects are checked
against it."""

from __future__ import annotations

from valuekit.errors import InputError


class Hook:
    """A callback the loop calls after every logged step and after every evaluation. Subclass it and override
    what you need; both methods do nothing by default.

    `on_step_end(step, batch, record, trainer)` runs on every rank with that rank's slice of the batch and the
    method's StepRecord; `on_eval(step, metrics)` runs on rank 0 with the evaluation's metrics dict (dev_loss,
    dev_acc, test_loss, test_acc), which a hook may extend.
    """

    def on_step_end(self, step, batch, record, trainer) -> None:
        pass

    def on_eval(self, step: int, metrics: dict) -> None:
        pass


class _Callbacks(Hook):
    """A plain object with `on_step_end` and/or `on_eval` methods, seen through the Hook contract."""

    def __init__(self, obj):
        self._step = getattr(obj, "on_step_end", None)
        self._eval = getattr(obj, "on_eval", None)

    def on_step_end(self, step, batch, record, trainer) -> None:
        if self._step is not None:
            self._step(step, batch, record, trainer)

    def on_eval(self, step: int, metrics: dict) -> None:
        if self._eval is not None:
            self._eval(step, metrics)


def as_hooks(hooks) -> list[Hook]:
    """The `hooks` argument as a list of Hook: Hook instances as they are; an object with a callable
    `on_step_end` or `on_eval` behind the contract; anything else refused, naming its position."""
    if hooks is None:
        return []
    if isinstance(hooks, (str, bytes)) or not hasattr(hooks, "__iter__"):
        raise InputError(f"hooks={hooks!r}: expected a list of Hook objects")
    out: list[Hook] = []
    for i, h in enumerate(hooks):
        if isinstance(h, Hook):
            out.append(h)
        elif callable(getattr(h, "on_step_end", None)) or callable(getattr(h, "on_eval", None)):
            out.append(_Callbacks(h))
        else:
            raise InputError(f"hooks[{i}]: {type(h).__name__} is not a valuekit Hook (it defines neither "
                             f"on_step_end(step, batch, record, trainer) nor on_eval(step, metrics))")
    return out
