"""Settings of the training loop and the method registry, importable without torch (the CLI builds its
parsers from these, and `valuekit audit`/`report` never need torch)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

# method name -> (module, Config overrides). Modules are imported only when used.
METHODS: dict[str, tuple[str, dict]] = {
    "uniform": ("valuekit.trainers.uniform", {}),
    "dds": ("valuekit.trainers.dds", {}),
    "multidds": ("valuekit.trainers.multidds", {}),
    "hostcp": ("valuekit.trainers.hostcp", {}),
    "lrdi": ("valuekit.trainers.lrdi", {}),
    "l2rw": ("valuekit.trainers.lrdi", {"variant": "l2rw"}),
    "mwnet": ("valuekit.trainers.lrdi", {"variant": "mwnet"}),
    "bads": ("valuekit.trainers.bads", {}),
}

def available_methods() -> list[str]:
    """Method names whose module is present in this installation."""
    return [m for m, (mod, _) in METHODS.items() if importlib.util.find_spec(mod) is not None]


@dataclass
class TrainConfig:
    """Settings of the training loop shared by every method."""

    method: str = "uniform"
    model: str = "mlp"  # linear | mlp | cnn
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3  # model learning rate
    optimizer: str = "adam"  # adam | sgd (sgd uses `momentum`)
    momentum: float = 0.9
    weight_decay: float = 0.0
    hidden: int = 128  # hidden width of mlp/cnn
    seed: int = 0
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    eval_every: int = 50  # steps between dev/test evaluations
    log_every: int = 50  # steps between closed Parquet parts
    checkpoint_every: int = 200  # steps between checkpoints (parts are flushed then too)
    eval_batch_size: int = 2048
    log_steps: bool = True  # per-example rows in steps/ (off: metrics and values only, for huge runs)
    progress: bool = True
    # fp32 | bf16 | fp16: each step under torch.autocast (fp16 also with a gradient scaler; valuekit.precision)
    precision: str = "fp32"
    # streamed image tables (load_table(stream=...)): worker processes decoding the next batch while a step
    # trains; 0 decodes in the training process (valuekit.streaming)
    data_workers: int = 0
