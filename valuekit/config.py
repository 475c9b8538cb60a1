"""Settings of the training loop and the method registry, importable without torch (the CLI builds its
parsers from these, and `valuekit audit`/`report` never need torch)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

# method name -> the module that registers it (valuekit.training.method.register, with the name's Config overrides).
# Modules are imported only when used, so the command line lists methods without importing torch.
METHODS: dict[str, str] = {
    "uniform": "valuekit.methods.uniform",
    "dds": "valuekit.methods.dds",
    "multidds": "valuekit.methods.multidds",
    "hostcp": "valuekit.methods.hostcp",
    "lrdi": "valuekit.methods.lrdi",
    "l2rw": "valuekit.methods.lrdi",
    "mwnet": "valuekit.methods.lrdi",
    "bads": "valuekit.methods.bads",
}


#: seeds are in [0, 2^63): what torch.Generator.manual_seed and numpy's generators both take
SEED_LIMIT = 2**63


def check_seed(value, *, where: str = "--seed") -> int:
    """A seed in [0, 2^63), or InputError naming `where`."""
    from valuekit.errors import InputError

    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise InputError(f"{where} {value}: must be a whole number in [0, 2^63)")
    return value


def setting(default, *, ge=None, gt=None, le=None, lt=None, choices=None, finite: bool | None = None,
            kind: type | None = None):
    """A Config field with its allowed values declared next to the default; `valuekit.training.options.check`
    is the one validator that reads them (floats must also be finite unless finite=False). `kind` types
    `--set` strings of a field whose default is None (int, float)."""
    rules = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if kind is not None:
        rules["kind"] = kind
    if choices is not None:
        rules["choices"] = tuple(choices)
    rules["finite"] = (isinstance(default, float) or kind is float) if finite is None else finite
    return field(default=default, metadata={"valuekit": rules})


def available_methods() -> list[str]:
    """Method names whose module is present in this installation."""
    return [m for m, mod in METHODS.items() if importlib.util.find_spec(mod) is not None]


@dataclass
class TrainConfig:
    """Settings of the training loop shared by every method."""

    method: str = "uniform"
    model: str = "mlp"  # linear | mlp | cnn | seq2seq, or a user's model: pkg.mod:factory, torchvision:NAME, timm:NAME
    steps: int = setting(500, ge=1)
    # training length in passes over the training table instead of `steps`: steps = ceil(epochs x rows / global
    # batch), global batch = batch_size x processes (valuekit.training.early_stopping.schedule); None: `steps` as given
    epochs: float | None = setting(None, gt=0, kind=float)
    batch_size: int = setting(64, ge=1)
    lr: float = setting(1e-3, gt=0)  # model learning rate
    optimizer: str = setting("adam", choices=("adam", "sgd"))  # sgd uses `momentum`
    momentum: float = 0.9
    weight_decay: float = 0.0
    hidden: int = setting(128, ge=1)  # hidden width of mlp/cnn
    seed: int = setting(0, ge=0, lt=SEED_LIMIT)  # a torch.Generator seed (numpy takes it too)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    # steps between dev/test evaluations; None: steps // 20 (at least 1), about 20 evaluations per run
    eval_every: int | None = setting(None, ge=1, kind=int)
    # keep the model of the evaluation with the best dev accuracy (ties: the lower dev loss, then the earlier
    # step) in best.pt beside checkpoint.pt, and its step and metrics in run.json (best_step, best_metrics)
    early_stopping: bool = False
    # with early_stopping: stop after this many evaluations in a row without a better dev accuracy; 0: never
    patience: int = setting(0, ge=0)
    # steps between closed Parquet parts (each part costs the writer thread a fixed ~1-3 ms)
    log_every: int = setting(200, ge=1)
    checkpoint_every: int = setting(200, ge=1)  # steps between checkpoints (parts are flushed then too)
    # rows per chunk of dev/test evaluation and of the end-of-run scores of every row: it bounds the peak memory
    # (LRDI on a Fashion-MNIST ResNet: 618-632 MiB at 256 against 949-976 MiB at 2048, the same values)
    eval_batch_size: int = setting(256, ge=1)
    log_steps: bool = True  # per-example rows in steps/ (off: metrics and values only, for huge runs)
    progress: bool = True
    # fp32 | bf16 | fp16: each step under torch.autocast (fp16 also with a gradient scaler; valuekit.training.precision)
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))
    # causal LMs (hf:DIR, hf-config:DIR): LoRA adapters of this rank on the model's attention/MLP projections
    # (peft, `pip install 'valuekit[lora]'`); the base weights are frozen, so every method's gradients, rewards and
    # dot products are the adapters'. 0: full fine-tuning (valuekit.models.lm.add_lora)
    lora: int = setting(0, ge=0)
    # causal LMs: keep only each Transformer block's input and recompute its activations in the backward
    # (non-reentrant torch.utils.checkpoint; transformers' gradient_checkpointing_enable for hf models): less
    # activation memory for one more block forward per step, the same gradients and values
    gradient_checkpointing: bool = False
    # streamed image tables (load_table(stream=...)): worker processes decoding the next batch while a step
    # trains; 0 decodes in the training process (valuekit.data.streaming)
    data_workers: int = setting(0, ge=0)
    # image tables: train-time augmentation of each batch (random crop with 4-pixel zero padding and/or
    # left-right flip; valuekit.data.images.augment), drawn from its own generator (seed + 1); evaluation is never
    # augmented
    augment: str = setting("none", choices=("none", "flip", "crop", "crop+flip"))
