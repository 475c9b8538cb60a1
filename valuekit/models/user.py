"""A user's model: a `pkg.mod:factory` spec, `torchvision:NAME`, `timm:NAME`, an `nn.Module` class or
factory, resolved once at the public edge, built on two rows to check one logit per class, and wrapped so that
it takes flat rows (`ShapedInput`)."""

from __future__ import annotations

import torch
from torch import nn

from valuekit.errors import InputError
from valuekit.models.builtin import MODELS, check_token_range
from valuekit.ops.modes import eval_mode

EXTRAS = {"torchvision": "vision", "timm": "timm"}  # model prefix -> pip extra that installs it


def _model_error(spec, message: str) -> InputError:
    """A refusal of the `model` argument: the library names the argument, the CLI the flag."""
    return InputError(f"model={str(spec)!r}: {message}", cli=f"--model {spec}: {message}")


def is_builtin(spec) -> bool:
    """A model valuekit builds itself: a built-in name or a causal LM (`causal-lm`, `hf-config:DIR`, `hf:DIR`)."""
    from valuekit.models.lm import is_lm

    return isinstance(spec, str) and (spec in MODELS or is_lm(spec))


def describe_model(spec) -> str:
    """The text run.json keeps for a model given as a name, `pkg.mod:factory`, a factory or a module."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, nn.Module):
        return f"python:{type(spec).__module__}.{type(spec).__qualname__}"
    return f"python:{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', repr(spec))}"


def check_model_spec(spec) -> None:
    """Validate the form of a model spec without importing anything (InputError otherwise)."""

    if isinstance(spec, nn.Module) or (callable(spec) and not isinstance(spec, str)):
        return
    if not isinstance(spec, str) or not spec:
        raise _model_error(spec, f"give a built-in name ({', '.join(MODELS)}, causal-lm), hf-config:DIR, "
                         f"hf:DIR, package.module:factory, torchvision:NAME or timm:NAME")
    if is_builtin(spec):
        return
    head, sep, tail = spec.partition(":")
    if not sep or not head or not tail:
        raise _model_error(spec, f"not a built-in model ({', '.join(MODELS)}, causal-lm); a transformers "
                         f"causal LM is hf-config:DIR or hf:DIR, a model of your own package.module:factory (or "
                         f"torchvision:NAME, timm:NAME)")


def _import_factory(spec: str):
    """`pkg.mod:attr` -> the callable, imported from the current directory / PYTHONPATH."""
    import importlib
    import sys


    modname, _, attr = spec.partition(":")
    if modname == "python":
        raise _model_error(spec, "names a Python object given to valuekit.train(model=...); pass that "
                         "object again from Python (the command line takes package.module:factory)")
    if "" not in sys.path and "." not in sys.path:  # the console script's sys.path lacks the working directory
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name and modname.startswith(exc.name):
            raise _model_error(spec, f"cannot import module {modname!r} (not in the current directory or "
                             f"on PYTHONPATH)") from None
        raise _model_error(spec, f"importing {modname!r} failed: {exc}") from None
    except Exception as exc:
        raise _model_error(spec, f"importing {modname!r} failed: {type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _model_error(spec, f"module {modname!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _model_error(spec, f"{attr!r} is not callable (expected factory(num_classes=, input_shape=))")
    return obj


class ShapedInput(nn.Module):
    """Feeds a user's network rows reshaped from the table's flat features to (N, *input_shape);
    `repeat_channels` > 1 copies a single-channel image to that many channels (RGB models on grey images)."""

    def __init__(self, net: nn.Module, input_shape, repeat_channels: int = 1):
        super().__init__()
        self.net = net
        self.input_shape = tuple(int(s) for s in input_shape)
        self.repeat_channels = int(repeat_channels)

    def forward(self, x):
        x = x.reshape(x.shape[0], *self.input_shape)
        if self.repeat_channels > 1:
            x = x.expand(-1, self.repeat_channels, *self.input_shape[1:])
        return self.net(x)


def _hub_model(spec: str, num_classes: int, input_shape) -> nn.Module:
    """torchvision:NAME / timm:NAME with random weights (nothing is downloaded)."""
    import importlib


    hub, _, name = spec.partition(":")
    try:
        lib = importlib.import_module(hub)
    except Exception as exc:  # not installed, or installed but broken beside this torch
        why = (
            "is not installed" if isinstance(exc, ModuleNotFoundError) else f"cannot be imported ({type(exc).__name__})"
        )
        raise _model_error(
            spec, f"{hub} {why}; install the extra: pip install 'valuekit[{EXTRAS[hub]}]'"
        ) from None
    chans = input_shape[0] if len(input_shape) == 3 else 1
    try:
        if hub == "torchvision":
            net = lib.models.get_model(name, weights=None, num_classes=num_classes)
        else:
            net = lib.create_model(name, pretrained=False, num_classes=num_classes, in_chans=chans)
    except Exception as exc:
        raise _model_error(spec, f"{hub} cannot build {name!r}: {type(exc).__name__}: {exc}") from None
    repeat = 1
    if hub == "torchvision" and chans == 1:  # torchvision classifiers take 3 channels
        first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
        repeat = first.in_channels if first is not None and first.in_channels > 1 else 1
    return ShapedInput(net, input_shape, repeat)


def resolve_factory(spec):
    """A callable (num_classes, input_shape) -> nn.Module for `spec`: `pkg.mod:factory` (imported once),
    `torchvision:NAME`, `timm:NAME`, a factory function, or an nn.Module (deep-copied at every build)."""
    import copy

    if isinstance(spec, nn.Module):
        return lambda num_classes, input_shape: copy.deepcopy(spec)
    if isinstance(spec, str):
        hub = spec.partition(":")[0]
        if hub in EXTRAS:
            return lambda num_classes, input_shape: _hub_model(spec, num_classes, input_shape)
        fn = _import_factory(spec)
    else:
        fn = spec
    return lambda num_classes, input_shape: fn(num_classes=num_classes, input_shape=tuple(input_shape))


def build_user_model(spec, *, num_classes: int, input_shape, generator: torch.Generator | None = None,
                     factory=None) -> nn.Module:
    """Build a user's model and wrap it so it takes the table's flat rows (ShapedInput).

    A factory's own random initialisation runs under a seed drawn from `generator`, inside
    `torch.random.fork_rng`, so runs are reproducible and the global RNG is left as it was.
    Raises InputError naming the factory when it raises or returns something other than an nn.Module.
    """
    name = describe_model(spec)
    factory = factory or resolve_factory(spec)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            net = factory(num_classes, tuple(input_shape))
        except InputError:
            raise
        except Exception as exc:
            raise _model_error(name, f"the factory raised {type(exc).__name__}: {exc}") from None
    if not isinstance(net, nn.Module):
        raise _model_error(name, f"the factory returned {type(net).__name__}, not a torch.nn.Module")
    if isinstance(net, ShapedInput):
        return net
    return ShapedInput(net, input_shape)


def check_output(model: nn.Module, x: torch.Tensor, num_classes: int, name: str, *, tables=()) -> None:
    """One forward on a few rows (eval mode, no grad, buffers restored): the output must be (rows, num_classes),
    floating and finite, and the model must have trainable parameters. An nn.Embedding that takes the rows
    themselves as ids (token-id tables) is found on that forward, and every table in `tables` is checked against its
    size before training (an id out of range would otherwise be an IndexError at the first step)."""

    if not any(p.requires_grad for p in model.parameters()):
        raise _model_error(name, "has no trainable parameters (nothing for the optimizer to train)")
    state = {k: b.clone() for k, b in model.named_buffers()}
    seen: list[tuple[nn.Embedding, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])) if args else None)
             for m in model.modules() if isinstance(m, nn.Embedding)]
    failure = None
    try:
        with eval_mode(model, no_grad=True):
            out = model(x)
    except Exception as exc:
        failure = exc
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(state[k])
    for emb, ids in seen:  # the embedding that looks up the rows' own values: check every table's range
        # the rows as the model cast them (ids.long() truncates 0.5 to 0: the range check then names the 0.5)
        if isinstance(ids, torch.Tensor) and ids.numel() == x.numel() \
                and torch.equal(ids.reshape(-1).cpu(), torch.as_tensor(x).reshape(-1).cpu().to(ids.dtype)):
            for table in tables:
                check_token_range(table, emb.num_embeddings, name)
            break
    if failure is not None:
        text = str(failure).strip()
        raise _model_error(name, f"forward on rows of shape {tuple(x.shape[1:])} failed: "
                         f"{type(failure).__name__}: {text.splitlines()[0] if text else ''}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _model_error(name, f"output has shape {got} for {x.shape[0]} rows; expected "
                         f"({x.shape[0]}, {num_classes}) (one logit per class)")
    if not out.is_floating_point():
        raise _model_error(name, f"output has dtype {str(out.dtype).removeprefix('torch.')}; expected "
                         f"floating-point logits")
    if not torch.isfinite(out).all():
        raise _model_error(name, f"output holds NaN or inf on the first {x.shape[0]} rows (logits must be "
                         f"finite)")
