"""Where a model's features are: its last linear layer, whether it has BatchNorm, and a forward that
returns the input of a chosen layer with the logits (LRDI's teacher and HOST-CP's selector read it)."""

from __future__ import annotations

import torch
from torch import nn

from valuekit.ops.modes import eval_mode


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the last nn.Linear in registration order (the usual classifier head)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer; name the feature layer explicitly")
    return found[-1]


def has_batchnorm(model) -> bool:
    """Whether any submodule is a batch-norm layer (its batch statistics couple the rows of a batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def feature_module(model: nn.Module, layer: str = "") -> nn.Module:
    """The module whose *input* is the model's feature vector: `layer` by name (from named_modules; a
    name without the `net.` prefix of a wrapped user model is accepted), or the last nn.Linear."""
    from valuekit.errors import InputError, setting_error

    if not layer:
        try:
            return last_linear(model)[1]
        except ValueError as exc:
            raise InputError(
                f"{exc} (choose one with feature_layer=NAME)", cli=f"{exc} (--set feature_layer=NAME)"
            ) from None
    mods = dict(model.named_modules())
    for cand in (layer, f"net.{layer}"):
        if cand in mods:
            return mods[cand]
    raise setting_error(f"feature_layer={layer}: no such layer; layers: {', '.join(n for n in mods if n)[:300]}")


def features_and_logits(model: nn.Module, x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of `model`; returns (input of `layer` flattened to (N, -1), logits). The features keep their
    graph (callers detach them where the paper's teacher reads a detached state)."""
    box = []
    handle = layer.register_forward_pre_hook(lambda mod, args: box.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"the feature layer {type(layer).__name__} was not called in the forward pass")
    feats = box[-1]
    return feats.reshape(feats.shape[0], -1), logits


def feature_dim(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> int:
    """Width of the features `features_and_logits` returns (an nn.Linear's in_features, else one probe
    forward in eval mode without grad, which leaves batch-norm statistics untouched)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    with eval_mode(model, no_grad=True):
        return features_and_logits(model, x[:2], layer)[0].shape[1]
