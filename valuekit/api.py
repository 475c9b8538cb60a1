"""`valuekit.train`: the one-call Python entry point.

    run = valuekit.train("train.parquet", dev="dev.parquet", model=my_module, method="dds",
                         steps=500, device="auto", out="runs/dds")

Tables may be paths, DataFrames or ValueDatasets; `model` an nn.Module, a factory
`f(num_classes=, input_shape=)`, a built-in name or a `pkg.mod:factory` / `torchvision:NAME` spec.
Other keyword settings are the loop's (TrainConfig fields: batch_size, lr, seed, ...) or the method's
(its Config fields, e.g. scorer_lr for dds). The older form
`train(train_ds, dev_ds, test_ds, out=..., config=TrainConfig(...), method_config={...})` works unchanged.
"""

from __future__ import annotations

import dataclasses
from os import PathLike
from typing import Any

from valuekit.config import TrainConfig
from valuekit.errors import InputError, held_warnings


def _table(source, name: str, like=None, table_kw: dict | None = None, *, arg: str | None = None):
    """`source` loaded as the `name` table; a DataFrame is named in messages by its argument (`arg`, default name)."""
    from valuekit.data.tables import ValueDataset, load_table

    if source is None or isinstance(source, ValueDataset):
        return source
    kw = dict(table_kw or {})
    if like is not None:  # the training table's choices; a dev/test table has no weights
        kw.pop("feature_cols", None), kw.pop("image_shape", None), kw.pop("weight_col", None)
    return load_table(source, name=name, like=like, where=f"{name} table (argument `{arg or name}`)", **kw)


@held_warnings()  # warnings while the input is checked wait until it passes: a refused input raises alone
def train(
    train,
    dev=None,
    test=None,
    *,
    out,
    model=None,
    method: str | None = None,
    steps: int | None = None,
    device: str | None = None,
    config: TrainConfig | None = None,
    method_config: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    hooks: list | None = None,
    name: str | None = None,
    table_kw: dict | None = None,
    tokenizer=None,
    text_col: str = "text",
    max_len: int = 256,
    weight_col: str | None = None,
    **settings,
):
    """Train `method` on the `train` table with the trusted `dev` table, log to the run directory `out` and
    return the opened Run (valuekit.runs.reader.Run). `table_kw` goes to `load_table` (id_col, label_col, ...).
    `tokenizer` (a local tokenizer folder, or an object with `encode(text) -> ids`) turns the string column
    `text_col` of every table into token ids (cut to `max_len`) for a text model; run.json records it.
    `weight_col` names a column of fixed per-row loss weights in `train` (e.g. `valuekit score`'s `weight`; rescaled
    to mean 1; uniform only): each row's loss is multiplied by its weight (`valuekit.methods.uniform`).
    `epochs=E` instead of `steps` trains ceil(E x rows / batch_size) steps; `early_stopping=True` keeps the model
    of the best dev accuracy (`run.best_model_path`; see `valuekit.training.loop.train`).
    An `out` that already holds a run is refused unless `resume=True` (continue it) or `overwrite=True`
    (replace it; said on stderr), so a notebook cell can be run again with `overwrite=True`."""
    from valuekit.training.loop import run_training
    from valuekit.training.method import method_spec

    for arg, value in (("train", train), ("dev", dev)):
        if value is None:
            raise InputError(
                f"valuekit.train: {arg} is None; give a table (a path, a DataFrame or a ValueDataset)"
                + (" (dev=...: the small trusted dev table)" if arg == "dev" else "")
                + (
                    "; early_stopping chooses the model by it"
                    if arg == "dev" and settings.get("early_stopping")
                    else ""
                )
            )
    if steps is not None and settings.get("epochs") is not None:
        raise InputError(f"valuekit.train: steps={steps} and epochs={settings['epochs']}: give one of them")
    config = config or TrainConfig()
    loop_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given: dict[str, Any] = {k: v for k, v in (("method", method), ("steps", steps), ("device", device))
                             if v is not None}
    if isinstance(model, str):
        given["model"], model = model, None
    config = dataclasses.replace(config, **given, **{k: v for k, v in settings.items() if k in loop_fields})
    method_fields = {f.name for f in dataclasses.fields(method_spec(config.method).Config)}
    extra = {k: v for k, v in settings.items() if k not in loop_fields}
    unknown = sorted(set(extra) - method_fields)
    if unknown:
        raise InputError(
            f"valuekit.train: unknown setting {unknown[0]!r} (loop settings: {', '.join(sorted(loop_fields))}; "
            f"{config.method} settings: {', '.join(sorted(method_fields)) or '(none)'})"
        )
    if dataclasses.is_dataclass(method_config):  # a method Config instance (the older form)
        method_config = dataclasses.replace(method_config, **extra) if extra else method_config
    else:
        method_config = {**(method_config or {}), **extra}
    if tokenizer is not None:
        if isinstance(tokenizer, (str, PathLike)):
            from valuekit.data.text import get_tokenizer

            tokenizer = get_tokenizer(str(tokenizer))
        elif not callable(getattr(tokenizer, "encode", None)):
            raise InputError(f"valuekit.train: tokenizer={tokenizer!r} is neither a folder nor has encode(text)")
        if max_len < 1:
            raise InputError(f"valuekit.train: max_len={max_len}: must be >= 1")
        table_kw = {**(table_kw or {}), "tokenizer": tokenizer, "text_col": text_col, "max_len": max_len}
    if weight_col is not None:
        from valuekit.data.tables import ValueDataset

        if isinstance(train, ValueDataset):
            raise InputError("valuekit.train: weight_col= reads a column of a table; a loaded ValueDataset carries "
                             "its weights from load_table(..., weight_col=...)")
        table_kw = {**(table_kw or {}), "weight_col": weight_col}
    train_ds = _table(train, "train", table_kw=table_kw)
    dev_ds = _table(dev, "dev", like=train_ds, table_kw=table_kw)
    test_ds = _table(test, "test", like=train_ds, table_kw=table_kw)
    return run_training(train_ds, dev_ds, test_ds, out=out, config=config, method_config=method_config, resume=resume,
                      hooks=hooks, name=name, model=model, overwrite=overwrite)


def evaluate(table, run, *, train, state: dict | None = None) -> dict:
    """The model of a finished run on `table`: {"correct": per-row bool array, "acc", "loss"} (mean cross-entropy),
    "probs" (rows x classes softmax probabilities, float64, columns in the training table's class order) and "labels"
    (the rows' class codes in that order),
    computed as the loop's evaluation does. The model is the run's best-dev one (best.pt) unless `state` (a state
    dict) is given; `train` is the run's training table (path, DataFrame or ValueDataset), which fixes the class
    codes and the feature columns. Built-in models only (the run's `config.model` is a name)."""
    import torch

    from valuekit.ops.modes import eval_mode
    from valuekit.runs.reader import open_run
    from valuekit.training.context import evaluate as evaluate_model
    from valuekit.training.loop import make_trainer

    run = open_run(run)
    if state is None:
        if run.best_model_path is None:
            raise InputError(f"{run.path}: no best.pt (train with early_stopping=True)")
        state = torch.load(run.best_model_path, map_location="cpu", weights_only=True)["model"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = {k: v for k, v in run.meta["config"].items() if k in fields}
    # the same architecture as a plain classifier on the CPU: every method's best.pt holds the classifier's state
    config = TrainConfig(**{**cfg, "method": "uniform", "device": "cpu", "progress": False, "steps": 1, "epochs": None,
                            "early_stopping": False})
    train_ds = _table(train, "train")
    data = _table(table, "dev", like=train_ds, arg="table")
    trainer, _, ctx = make_trainer(train_ds, data, config)
    model = trainer.model
    model.load_state_dict(state)
    loss, acc = evaluate_model(model, ctx.dev_x, ctx.dev_y)
    with eval_mode(model, no_grad=True):
        logits = torch.cat([model(ctx.dev_x[i: i + 2048]) for i in range(0, len(ctx.dev_y), 2048)])
    pred = logits.argmax(1)
    return {"correct": (pred == ctx.dev_y).cpu().numpy().astype(bool), "acc": float(acc), "loss": float(loss),
            "probs": torch.softmax(logits.double(), 1).cpu().numpy(), "labels": ctx.dev_y.cpu().numpy(),
            "rows": len(ctx.dev_y)}
