"""One typed path from `--set key=value` strings and keyword arguments to (TrainConfig, method Config).

`resolve` is what `train()`, `make_trainer()` (benchmarks, notebooks) and the CLI all call: it looks the
method up in the registry (`valuekit.training.method.method_spec`), types `--set` strings by each field's default,
builds both configs and validates them with `check`, the one validator, which reads the bounds and
choices declared in field metadata (`valuekit.config.setting`) and then runs a Config's own `validate()`
for rules that tie several fields together. Every message has one shape: `OPTION: must be RULE`.
"""

from __future__ import annotations

import dataclasses
import math

from valuekit.config import TrainConfig
from valuekit.errors import InputError
from valuekit.training.method import method_spec

# loop settings that have their own command-line flag (the others are given with --set)
FLAGS = ("method", "model", "steps", "batch_size", "lr", "seed", "device", "precision", "epochs", "eval_every",
         "early_stopping", "patience")




def _convert(key: str, text: str, default, kind: type | None = None):
    """`text` typed like `default`; a field whose default is None is typed by its declared `kind`
    ("none" gives None back)."""
    if default is None and kind is not None:
        if text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise InputError(f"--set {key}={text}: expected {kind.__name__} or none (default None)") from None
    kind = type(default)
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            inner = type(default[0]) if default else str
            return tuple(inner(t) for t in text.split(",") if t)
        return text
    except ValueError:
        raise InputError(f"--set {key}={text}: expected {kind.__name__} (default {default!r})") from None


def parse_overrides(pairs, method_cls, loop_cfg: TrainConfig | None = None) -> tuple[dict, dict]:
    """Split `key=value` strings into method and loop settings, typed by each field's default."""
    method_fields = {f.name for f in dataclasses.fields(method_cls)}
    loop_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    method_vals, loop_vals = {}, {}
    defaults_m = method_cls()
    defaults_l = loop_cfg or TrainConfig()
    kinds = {f.name: f.metadata.get("valuekit", {}).get("kind") for f in dataclasses.fields(TrainConfig)}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise InputError(f"--set {pair!r}: expected key=value")
        if key in method_fields:
            method_vals[key] = _convert(key, text, getattr(defaults_m, key))
        elif key in loop_fields:
            loop_vals[key] = _convert(key, text, getattr(defaults_l, key), kinds.get(key))
        else:
            known = ", ".join(sorted(method_fields)) or "(none)"
            loop = ", ".join(sorted(k for k in loop_fields if k not in FLAGS))  # those with no flag of their own
            raise InputError(f"--set {key}: unknown setting; method settings: {known}; loop settings: {loop}")
    return method_vals, loop_vals


def option(name: str, value) -> str:
    """A setting as the Python API takes it (`steps=0`, `scorer='tree'`): what library messages name."""
    return f"{name}={value!r}"


def cli_option(name: str, value, *, loop: bool = False) -> str:
    """The same setting as the command line takes it: `--steps 0` for loop flags, `--set name=value` otherwise."""
    if loop and name in FLAGS:
        return (
            f"--{name.replace('_', '-')} {value!r}" if isinstance(value, str) else f"--{name.replace('_', '-')} {value}"
        )
    return f"--set {name}={value}"


def _rule_text(r: dict) -> str:
    lo = ("[", r["ge"]) if "ge" in r else ("(", r["gt"]) if "gt" in r else None
    hi = (r["le"], "]") if "le" in r else (r["lt"], ")") if "lt" in r else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f"{'<=' if hi[1] == ']' else '<'} {hi[0]}"
    return "finite"


def _wrong_type(v, default) -> str | None:
    """A number setting given as another type (steps='10', a float seed): said before any arithmetic on it."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return None
    import numbers

    if isinstance(default, int) and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
        return f"must be a whole number, not {type(v).__name__}"
    if isinstance(default, float) and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        return f"must be a number, not {type(v).__name__}"
    return None


def _violates(v, r: dict) -> str | None:
    if "choices" in r:
        return None if v in r["choices"] else f"choose from {', '.join(map(str, r['choices']))}"
    r = {k: x for k, x in r.items() if k != "kind"}
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    ok = not (r.get("finite") and not math.isfinite(v))
    ok = ok and ("ge" not in r or v >= r["ge"]) and ("gt" not in r or v > r["gt"])
    ok = ok and ("le" not in r or v <= r["le"]) and ("lt" not in r or v < r["lt"])
    if ok:
        return None
    return (
        "must be a finite number"
        if set(r) == {"finite"}
        else f"must be {'a finite number ' if r.get('finite') else ''}{_rule_text(r)}"
    )


def check_fields(cfg, *, loop: bool = False) -> None:
    """Every field's declared bounds/choices (field metadata from `valuekit.config.setting`)."""
    for f in dataclasses.fields(cfg):
        rules = f.metadata.get("valuekit")
        if rules:
            v = getattr(cfg, f.name)
            problem = _wrong_type(v, f.default) or _violates(v, rules)
            if problem:
                raise InputError(f"{option(f.name, v)}: {problem}",
                                 cli=f"{cli_option(f.name, v, loop=loop)}: {problem}")


def check(cfg) -> None:
    """The one validator of a method Config: declared bounds/choices, then its own `validate()` (rules
    that tie several fields together; a Config's validate() may itself start with check_fields)."""
    check_fields(cfg)
    own = getattr(cfg, "validate", None)
    if callable(own):
        own()


def check_loop(cfg: TrainConfig) -> None:
    from valuekit.models.user import check_model_spec

    check_model_spec(cfg.model)  # a built-in name, a causal LM or the form of a user's model (imported later, once)
    check_fields(cfg, loop=True)
    if cfg.patience and not cfg.early_stopping:
        why = "(it counts evaluations without a better dev accuracy)"
        raise InputError(f"patience={cfg.patience}: needs early_stopping=True {why}",
                         cli=f"--patience {cfg.patience}: needs --early-stopping {why}")


def resolve(config: TrainConfig | None = None, method_config=None, *, overrides=()):
    """(TrainConfig, method Config, api.Method): `method_config` is a dict of settings or a Config instance,
    `overrides` `key=value` strings (method or loop settings, typed by their defaults); both validated."""
    config = config or TrainConfig()
    spec = method_spec(config.method)
    method_vals, loop_vals = parse_overrides(list(overrides), spec.Config, config)
    if loop_vals:
        config = dataclasses.replace(config, **loop_vals)
    check_loop(config)
    if isinstance(method_config, spec.Config):
        mcfg = dataclasses.replace(method_config, **method_vals) if method_vals else method_config
    else:
        values = {**spec.overrides, **(method_config or {}), **method_vals}
        unknown = set(values) - {f.name for f in dataclasses.fields(spec.Config)}
        if unknown:
            raise InputError(f"unknown setting {sorted(unknown)[0]!r} for method {config.method!r}")
        mcfg = spec.Config(**values)
    check(mcfg)
    return config, mcfg, spec


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device={name!r}: no CUDA device is available on this machine (use 'cpu' or 'auto')",
                             cli=f"--device {name}: no CUDA device is available on this machine (use --device cpu "
                                 f"or auto)")
        return torch.device(name)
    raise InputError(f"device={name!r}: use 'auto', 'cpu' or 'cuda'", cli=f"--device {name!r}: use auto, cpu or cuda")


def validate_config(cfg: TrainConfig) -> None:
    """Kept for old callers: the loop settings' checks (see `check_loop`)."""
    check_loop(cfg)
