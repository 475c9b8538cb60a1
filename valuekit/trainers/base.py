"""The one training loop that drives every method, and the pieces methods share.

A method is one module in `valuekit.trainers` with a `Config` dataclass (documented
defaults) and a `Trainer` class built as `Trainer(ctx, cfg)` that satisfies the
`Trainer` protocol below. The loop owns the device, sampling, progress bar,
evaluation, checkpointing and the run log; methods only implement `step()`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from valuekit import distributed as dist_
from valuekit.datasets import ValueDataset
from valuekit.config import METHODS, TrainConfig, available_methods  # noqa: F401  (re-exported)
from valuekit.errors import InputError, RunDirError, TrainingDiverged
from valuekit.lm import is_lm
from valuekit.models import MODELS, build_model, feature_stats
from valuekit.runlog import RUN_JSON, RunWriter, acquire_lock, mean_one, rank_by_value, read_run

CHECKPOINT = "checkpoint.pt"


# ---------------------------------------------------------------- what methods see


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
    scorer_loss: float | None = None
    sources: dict[str, tuple[float, int]] | None = None  # source -> (prob, count), logged to sources/


@runtime_checkable
class Trainer(Protocol):
    model: torch.nn.Module

    def step(self, batch: Batch) -> StepRecord: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def values(self) -> dict[str, Any]:
        """Final per-example values: `value` (higher = more valuable) and optional `value_std`,
        `weight` and extra columns, each an array over the training table's rows."""
        ...


@dataclass
class TrainContext:
    """Everything a method may use: trainer-visible data on the device, config, seeded generator."""

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
    rank: int = 0  # this process's rank under torchrun (0 for one process)
    world_size: int = 1  # processes taking part; each step's global batch is batch_size x world_size rows

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def global_batch_size(self) -> int:
        """Rows per step over all ranks (= config.batch_size for one process)."""
        return self.config.batch_size * self.world_size

    # ---- synchronisation (valuekit.distributed); every helper is a no-op for one process, and every rank
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

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of a per-example tensor, concatenated in global-batch order (detached)."""
        return dist_.gather(tensor, world_size=self.world_size)

    def dev_total(self, size: int) -> int:
        """Rows in the global dev batch that `sample_dev(size)` shards (size, or the whole dev set)."""
        return min(size, len(self.dev_y))

    def build_model(self, name: str | None = None, *, out_features: int | None = None) -> torch.nn.Module:
        """The configured model (or `name`) for this data, initialised from the run's generator."""
        model = build_model(
            name or self.config.model, in_features=self.x.shape[1], num_classes=out_features or self.num_classes,
            image_shape=self.image_shape, hidden=self.config.hidden, mean=self.mean, std=self.std,
            generator=self.generator,
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
        the same global batch of `size` rows and returns its own contiguous slice (`dev_total(size)` rows in all)."""
        m = len(self.dev_y)
        if size >= m:
            x, y = self.dev_x, self.dev_y
        else:
            idx = torch.randperm(m, generator=self.generator)[:size].to(self.device)
            x, y = self.dev_x[idx], self.dev_y[idx]
        if self.world_size > 1:
            x = torch.tensor_split(x, self.world_size)[self.rank]
            y = torch.tensor_split(y, self.world_size)[self.rank]
        return x, y


def per_example_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example. Sequence targets (logits (N, V, L), y (N, L), e.g. valuekit.lm): the mean
    token NLL over the positions whose target is not -100 (for instruction tables: the response tokens)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, y, reduction="none")
    tok = F.cross_entropy(logits, y, reduction="none", ignore_index=-100)  # (N, L), 0 where ignored
    return tok.sum(1) / (y != -100).sum(1).clamp_min(1)


# ---------------------------------------------------------------- options


def load_method(name: str):
    """(module, Config overrides) for a method name; InputError naming the known methods otherwise."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose from {', '.join(available_methods())}")
    module, overrides = METHODS[name]
    try:
        return importlib.import_module(module), overrides
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise InputError(f"method {name!r} is not available in this version of valuekit") from None
        raise


def _convert(key: str, text: str, default):
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
            v = float(text)
            return v
        if isinstance(default, tuple):
            inner = type(default[0]) if default else str
            return tuple(inner(t) for t in text.split(",") if t)
        return text
    except ValueError:
        raise InputError(f"--set {key}={text}: expected {kind.__name__} (default {default!r})") from None


def parse_overrides(pairs: list[str], method_cls, loop_cfg: TrainConfig | None = None) -> tuple[dict, dict]:
    """Split `key=value` strings into method and loop settings, typed by each field's default."""
    method_fields = {f.name: f for f in dataclasses.fields(method_cls)}
    loop_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    method_vals, loop_vals = {}, {}
    defaults_m = method_cls()
    defaults_l = loop_cfg or TrainConfig()
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise InputError(f"--set {pair!r}: expected key=value")
        if key in method_fields:
            method_vals[key] = _convert(key, text, getattr(defaults_m, key))
        elif key in loop_fields:
            loop_vals[key] = _convert(key, text, getattr(defaults_l, key))
        else:
            known = ", ".join(sorted(method_fields)) or "(none)"
            raise InputError(f"--set {key}: unknown setting for this method; method settings: {known}")
    return method_vals, loop_vals


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available on this machine (use --device cpu or auto)")
        return torch.device(name)
    raise InputError(f"--device {name!r}: use auto, cpu or cuda")


def validate_config(cfg: TrainConfig) -> None:
    if cfg.model not in MODELS and not is_lm(cfg.model):
        raise InputError(f"--model {cfg.model!r}: choose from {', '.join(MODELS)}")
    if cfg.optimizer not in ("adam", "sgd"):
        raise InputError(f"optimizer {cfg.optimizer!r}: use adam or sgd")
    for name in ("steps", "batch_size", "eval_every", "log_every", "checkpoint_every", "hidden"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= 1")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise InputError(f"--lr {cfg.lr}: must be a positive number")


# ---------------------------------------------------------------- sampling


class RandomSampler:
    """Endless shuffled passes over the rows; a batch may straddle two passes."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g = n, generator
        self.perm = torch.randperm(n, generator=generator)
        self.cursor = 0

    def next(self, size: int) -> torch.Tensor:
        out = []
        while size > 0:
            if self.cursor >= self.n:
                self.perm, self.cursor = torch.randperm(self.n, generator=self.g), 0
            take = self.perm[self.cursor: self.cursor + size]
            self.cursor += len(take)
            size -= len(take)
            out.append(take)
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.cursor = state["perm"], int(state["cursor"])


def default_sampler(ctx: TrainContext):
    """RandomSampler; for causal-LM token tables, length-bucketed batches (valuekit.lm.LengthBucketSampler)."""
    if is_lm(ctx.config.model):
        from valuekit.lm import LengthBucketSampler, token_lengths

        return LengthBucketSampler(token_lengths(ctx.x), ctx.generator)
    return RandomSampler(ctx.n, ctx.generator)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    scored = 0  # accuracy denominator: rows, or scored tokens for sequence targets
    for i in range(0, len(y), batch_size):
        logits, yb = model(x[i: i + batch_size]), y[i: i + batch_size]
        loss += per_example_loss(logits, yb).sum().item()
        correct += (logits.argmax(1) == yb).sum().item()
        scored += yb.numel() if yb.dim() == 1 else int((yb != -100).sum())
    model.train(was_training)
    return loss / len(y), correct / max(scored, 1)


# ---------------------------------------------------------------- the loop


def _versions() -> dict:
    import pyarrow

    from valuekit import __version__

    return {
        "valuekit": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "pandas": pd.__version__, "pyarrow": pyarrow.__version__,
        "cuda": torch.version.cuda,
    }


def _identity(meta: dict) -> dict:
    """The parts of run.json that a resumed run must share with the original (compared as JSON, so that
    tuples in a fresh config equal the lists read back from run.json)."""
    loop = {k: v for k, v in meta["config"].items() if k not in ("steps", "progress", "device", "log_steps")}
    ident = {
        "method": meta["method"], "config": loop, "method_config": meta["method_config"],
        "data": {k: (v or {}).get("fingerprint") for k, v in meta["data"].items()},
        "world_size": meta.get("world_size", 1),  # the global batch and the rank folders of steps/ depend on it
    }
    return json.loads(json.dumps(ident, default=str))


def _to_device(data: ValueDataset, device) -> tuple[torch.Tensor, torch.Tensor]:
    return data.x.to(device), data.y.to(device)


def build_context(view: ValueDataset, dev_data: ValueDataset, config: TrainConfig, device: torch.device,
                  *, rank: int = 0, world_size: int = 1) -> TrainContext:
    """Move trainer-visible data to the device and seed the run's generator (no run directory involved)."""
    generator = torch.Generator().manual_seed(config.seed)
    x, y = _to_device(view, device)
    dev_x, dev_y = _to_device(dev_data, device)
    codes = {s: i for i, s in enumerate(view.sources)}
    source = dev_source = None
    if view.source is not None:
        source = torch.tensor([codes[s] for s in view.source], device=device)
        if dev_data.source is not None:
            dev_source = torch.tensor([codes.get(s, -1) for s in dev_data.source], device=device)
    mean, std = feature_stats(view.x, view.image_shape)
    return TrainContext(
        config=config, device=device, generator=generator, x=x, y=y, ids=view.ids, num_classes=view.num_classes,
        classes=view.classes, dev_x=dev_x, dev_y=dev_y, source=source, sources=view.sources, dev_source=dev_source,
        image_shape=view.image_shape, mean=mean.to(device), std=std.to(device),
        group=None if view.group is None else torch.as_tensor(view.group, dtype=torch.int64),
        rank=rank, world_size=world_size,
    )


def make_trainer(train_data: ValueDataset, dev_data: ValueDataset, config: TrainConfig,
                 method_config: dict | None = None):
    """(trainer, sampler, ctx) for `config.method` without a run directory: for benchmarks and notebooks."""
    module, overrides = load_method(config.method)
    mcfg = module.Config(**{**overrides, **(method_config or {})})
    ctx = build_context(train_data.trainer_view(), dev_data, config, resolve_device(config.device))
    trainer = module.Trainer(ctx, mcfg)
    return trainer, getattr(trainer, "sampler", None) or default_sampler(ctx), ctx


def train(
    train_data: ValueDataset,
    dev_data: ValueDataset,
    test_data: ValueDataset | None = None,
    *,
    out,
    config: TrainConfig | None = None,
    method_config: dict | None = None,
    resume: bool = False,
    hooks: list | None = None,
    name: str | None = None,
):
    """Train `config.method` on `train_data`, log to the run directory `out`, return the opened Run.

    `hooks` are objects with any of `on_step_end(step, batch, record, trainer)` and
    `on_eval(step, metrics)`; they see everything the loop sees (used by benchmarks).

    Under torchrun (WORLD_SIZE > 1) every process calls this with the same arguments: the process group
    is started here unless the caller did (gloo on CPU, nccl on CUDA with device cuda:LOCAL_RANK), each
    step's global batch of batch_size x world_size rows is split over the ranks (valuekit.distributed),
    rank 0 takes the lock and writes run.json, metrics/, sources/, values.parquet and checkpoints, and
    every rank writes its own steps/rank-R/part-*.parquet. `on_step_end` hooks run on every rank (with
    that rank's slice of the batch), `on_eval` hooks and evaluation on rank 0 only.
    """
    config = config or TrainConfig()
    validate_config(config)
    module, overrides = load_method(config.method)
    mcfg_values = {**overrides, **(method_config or {})}
    unknown = set(mcfg_values) - {f.name for f in dataclasses.fields(module.Config)}
    if unknown:
        raise InputError(f"unknown setting {sorted(unknown)[0]!r} for method {config.method!r}")
    mcfg = module.Config(**mcfg_values)
    if hasattr(mcfg, "validate"):
        mcfg.validate()
    device = resolve_device(config.device)
    info = dist_.env_info()
    if info.enabled and not getattr(module, "DISTRIBUTED", False):
        # a method declares DISTRIBUTED = True once its extra state is synchronised across ranks
        raise InputError(f"method {config.method!r} does not run under torchrun yet (its state is not synchronised "
                         f"across processes); run it in one process")
    if info.enabled and device.type == "cuda":
        if config.device not in ("auto", "cuda"):
            raise InputError(f"--device {config.device}: under torchrun each process uses cuda:LOCAL_RANK; "
                             f"use --device auto or cuda")
        if info.local_rank >= torch.cuda.device_count():
            raise InputError(f"local rank {info.local_rank}: this node has {torch.cuda.device_count()} GPU(s); start "
                             f"at most that many processes per node (or use --device cpu)")
        device = torch.device("cuda", info.local_rank)
    if config.model == "seq2seq" and config.method != "multidds":
        raise InputError(f"--model seq2seq: translation tables are trained with --method multidds, not {config.method!r}")
    if is_lm(config.model):
        from valuekit.lm import check_lm

        if train_data.y.dim() != 2:
            raise InputError(f"--model {config.model}: needs an instruction table (prompt, response columns)")
        check_lm(config.model, vocab=train_data.num_classes, max_len=train_data.x.shape[1])
    if config.model == "cnn" and train_data.image_shape is None:
        raise InputError(f"{train_data.path or 'train'}: --model cnn needs image-shaped features (a list column with an image shape)")
    out = Path(out)
    for d in (train_data, dev_data, test_data):
        if d is not None and d.path and out.resolve() == Path(d.path).resolve():
            raise InputError(f"--out {out}: is an input table; choose another run directory")

    view = train_data.trainer_view()  # trainers never see is_noisy / clean_label
    data_meta = {"train": view.describe(), "dev": dev_data.describe(), "test": test_data.describe() if test_data else None}
    meta = {
        "name": name or out.name, "method": config.method, "config": dataclasses.asdict(config),
        "method_config": dataclasses.asdict(mcfg), "seed": config.seed, "data": data_meta,
        "classes": view.classes, "sources": view.sources, "id_type": view.id_type,
        "image_shape": list(view.image_shape) if view.image_shape else None, "feature_cols": view.feature_cols,
        "label_col_codes": "label column in steps/ holds class codes into `classes`",
        "device": str(device), "host": platform.node(), "versions": _versions(), "status": "running",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps_done": 0,
        "world_size": info.world_size, "global_batch_size": config.batch_size * info.world_size,
    }
    started_group = dist_.init(info, device)
    try:
        return _train(train_data, dev_data, test_data, view=view, out=out, config=config, module=module, mcfg=mcfg,
                      meta=meta, resume=resume, hooks=hooks, device=device, info=info)
    finally:
        dist_.shutdown(started_group)


def _prepare_dir(out: Path, meta: dict, resume: bool):
    """(lock, checkpoint state or None) for a fresh or resumed run directory; run by rank 0 only."""

    ckpt_path = out / CHECKPOINT
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        # The lock comes first: a second process on this directory stops before reading or writing anything.
        lock = acquire_lock(out)
    except RunDirError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    state = None
    try:
        if resume:
            old = read_run(out)
            if _identity(old.meta) != _identity(meta):
                diff = [k for k in _identity(meta) if _identity(meta)[k] != _identity(old.meta)[k]]
                raise RunDirError(f"{out}: --resume with different {', '.join(diff)} than the run was made with")
            if ckpt_path.exists():
                state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            meta["run_id"], meta["started_at"] = old.meta.get("run_id"), old.meta.get("started_at")
        elif (out / RUN_JSON).exists():
            raise RunDirError(f"{out}: already holds a run; use --resume to continue it or choose another --out")
    except BaseException:
        lock.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return lock, state


def _train(train_data, dev_data, test_data, *, view, out: Path, config: TrainConfig, module, mcfg, meta: dict,
           resume: bool, hooks, device: torch.device, info: dist_.DistInfo):
    world, rank, main = info.world_size, info.rank, info.is_main
    ckpt_path = out / CHECKPOINT
    lock = state = None
    if world > 1:
        # Rank 0 alone takes the lock and checks the directory, then tells the others how it went.
        status = {"error": None}
        if main:
            try:
                lock, state = _prepare_dir(out, meta, resume)
                meta.setdefault("run_id", f"{int(time.time() * 1000):x}-{os.getpid()}")
            except BaseException as exc:
                status["error"] = (type(exc).__name__, str(exc))
                dist_.broadcast_object(status, world_size=world)
                raise
            status.update(run_id=meta["run_id"], started_at=meta["started_at"], has_state=state is not None)
        status = dist_.broadcast_object(status, world_size=world)
        if not main:
            if status["error"]:
                kind, msg = status["error"]
                raise {"RunDirError": RunDirError, "InputError": InputError}.get(kind, RuntimeError)(msg)
            meta["run_id"], meta["started_at"] = status["run_id"], status["started_at"]
            if status["has_state"]:  # the run directory is on a filesystem every node sees
                state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    else:
        lock, state = _prepare_dir(out, meta, resume)

    ctx = build_context(view, dev_data, config, device, rank=rank, world_size=world)
    generator = ctx.generator
    trainer = module.Trainer(ctx, mcfg)
    sampler = getattr(trainer, "sampler", None) or default_sampler(ctx)
    x, y, source, dev_x, dev_y = ctx.x, ctx.y, ctx.source, ctx.dev_x, ctx.dev_y
    test_xy = _to_device(test_data, device) if test_data is not None and main else None

    start_step, elapsed_before = 0, 0.0
    writer = RunWriter(out, meta=meta, id_type=view.id_type, lock=lock,
                       resume_parts=state["parts"] if state else ({} if resume else None), rank=rank, world_size=world)
    if state:
        trainer.load_state_dict(state["trainer"])
        sampler.load_state_dict(state["sampler"])
        generator.set_state(state["generator"])
        start_step, elapsed_before = int(state["step"]), float(state["elapsed"])

    ids_np = view.ids
    labels_np = view.y.numpy().astype(np.int32) if view.y.dim() == 1 else None  # 2-D y (text): null label
    source_np = view.source
    hooks = hooks or []
    t0 = time.perf_counter()
    B = config.batch_size
    stop_agreed = False  # all ranks saw that some rank was asked to stop (torchrun)

    def save_checkpoint(step: int) -> None:
        writer.flush()
        trainer_state = trainer.state_dict()  # every rank: a method may gather here
        if world > 1:
            # Replicas must agree, so rank 0's state is everyone's (and the step parts were closed in step).
            fp = dist_.fingerprint([trainer_state, sampler.state_dict(), generator.get_state(),
                                    writer.part_counts()["steps"]])
            every = dist_.gather(fp[None].to(device), world_size=world).cpu()
            if not all(torch.equal(every[0], r) for r in every[1:]):
                raise RuntimeError(f"step {step}: the ranks' trainer states differ; this is a valuekit bug in "
                                   f"method {config.method!r}'s synchronisation (the checkpoint would be wrong)")
        if main:
            blob = {
                "step": step, "trainer": trainer_state, "sampler": sampler.state_dict(),
                "generator": generator.get_state(), "parts": writer.part_counts(),
                "elapsed": elapsed_before + time.perf_counter() - t0,
            }
            tmp = out / f".{CHECKPOINT}.tmp"
            torch.save(blob, tmp)
            tmp.replace(ckpt_path)
            writer.write_meta(steps_done=step)

    def evaluation(step: int) -> dict:
        m = {}
        # a trainer may define evaluate(x, y) -> (loss, acc), e.g. translation (acc columns then hold chrF/100)
        ev = getattr(trainer, "evaluate", None) or (lambda ex, ey: evaluate(trainer.model, ex, ey, config.eval_batch_size))
        m["dev_loss"], m["dev_acc"] = ev(dev_x, dev_y)
        if test_xy is not None:
            m["test_loss"], m["test_acc"] = ev(*test_xy)
        for h in hooks:
            if hasattr(h, "on_eval"):
                h.on_eval(step, m)
        return m

    bar = None
    if config.progress and main:
        from tqdm.auto import tqdm

        # disable=None: shown on a terminal, silent in pipes and CI logs.
        bar = tqdm(total=config.steps, initial=start_step, desc=config.method, unit="step", disable=None)
    # Ctrl-C / SIGTERM ask the loop to stop at the next step boundary, so the checkpoint never holds half a
    # step; a second signal stops at once and resume then starts from the last periodic checkpoint.
    stop_requested: list[int] = []

    def _request_stop(signum, frame):
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _request_stop)
        except ValueError:  # not the main thread: keep Python's default behaviour
            pass
    step = done_step = start_step
    last_metrics: dict = {}
    try:
        while step < config.steps:
            if stop_agreed or (stop_requested and world == 1):
                raise KeyboardInterrupt
            step += 1
            if world > 1:  # the same global batch on every rank (shared generator), each takes its slice
                idx_cpu = sampler.next(B * world)[rank * B: (rank + 1) * B]
            else:
                idx_cpu = sampler.next(B)
            idx = idx_cpu.to(device)
            batch = Batch(step=step, idx=idx, x=x[idx], y=y[idx], source=None if source is None else source[idx])
            ts = time.perf_counter()
            rec = trainer.step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_time = time.perf_counter() - ts

            loss_np = rec.loss.detach().float().cpu().numpy()
            weight_np = None if rec.weight is None else rec.weight.detach().float().cpu().numpy()
            idx_np = idx_cpu.numpy()
            if config.log_steps:
                writer.steps.add(
                    step=step, example_id=ids_np[idx_np], label=None if labels_np is None else labels_np[idx_np],
                    source=None if source_np is None else source_np[idx_np], weight=weight_np,
                    reward=None if rec.reward is None else rec.reward.detach().float().cpu().numpy(),
                    loss=loss_np, selected=None if rec.selected is None else rec.selected.detach().cpu().numpy(),
                )
            bad = not np.isfinite(loss_np).all() or (weight_np is not None and not np.isfinite(weight_np).all())
            train_loss = float(np.mean(loss_np))
            train_acc = None if rec.correct is None else float(rec.correct.float().mean())
            if world > 1:
                # one collective per step: global train loss/accuracy, and whether any rank diverged or was
                # asked to stop (so that all ranks stop at the same step)
                agg = torch.tensor([float(np.sum(loss_np, dtype=np.float64)), len(loss_np),
                                    0.0 if rec.correct is None else float(rec.correct.float().sum()),
                                    float(bad), float(bool(stop_requested))], dtype=torch.float64, device=device)
                dist_.all_reduce_([agg], world_size=world)
                agg = agg.tolist()
                train_loss = agg[0] / agg[1]
                train_acc = None if rec.correct is None else agg[2] / agg[1]
                bad_anywhere, stop_agreed = agg[3] > 0, agg[4] > 0
            else:
                bad_anywhere = bad
            metrics = {"step": step, "train_loss": train_loss, "step_time": step_time,
                       "wall_time": elapsed_before + time.perf_counter() - t0, "scorer_loss": rec.scorer_loss}
            if train_acc is not None:
                metrics["train_acc"] = train_acc
            if main and not bad_anywhere and (step % config.eval_every == 0 or step == config.steps):
                metrics.update(evaluation(step))
                last_metrics = metrics
            if main:
                writer.metrics.add(**metrics)
                if rec.sources:
                    for s, (p, c) in rec.sources.items():
                        writer.sources.add(step=step, source=s, prob=p, count=c)
            if bad_anywhere:
                what = "loss" if not bad or not np.isfinite(loss_np).all() else "weights"
                writer.close("failed", steps_done=step, error=f"non-finite {what} at step {step}",
                             finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                raise TrainingDiverged(
                    f"step {step}: training {what} became NaN/inf; stopped. Everything up to this step is in {out} "
                    f"(try a smaller --lr)"
                )
            done_step = step  # the step is logged: hooks and interrupts from here on see a whole step
            for h in hooks:
                if hasattr(h, "on_step_end"):
                    h.on_step_end(step, batch, rec, trainer)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{metrics['train_loss']:.3f}",
                                    dev_acc=f"{last_metrics.get('dev_acc', float('nan')):.3f}")
            if step % config.checkpoint_every == 0:
                save_checkpoint(step)
            elif step % config.log_every == 0:
                writer.flush()
    except KeyboardInterrupt:
        # under torchrun only a stop all ranks agreed on is checkpointed (the others are mid-step or gone)
        if done_step == step and (world == 1 or stop_agreed):  # stopped between steps: everything is consistent
            save_checkpoint(step)
        writer.close("interrupted", steps_done=done_step, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if bar is not None:
            bar.close()
        raise
    except TrainingDiverged:
        if bar is not None:
            bar.close()
        raise
    except BaseException as exc:
        writer.close("failed", steps_done=step, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if bar is not None:
        bar.close()
    save_checkpoint(step)
    values = trainer.values()  # every rank: a method may gather here
    if main:
        writer.write_values(finalize_values(values, ids_np))
    writer.close(
        "completed", steps_done=step, duration_s=elapsed_before + time.perf_counter() - t0,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), final_metrics=_clean(last_metrics),
    )
    dist_.barrier(world_size=world)  # run.json is final before any rank returns
    return read_run(out)


def _clean(m: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}


def _to_numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().double().cpu().numpy()
    return np.asarray(v, dtype=np.float64)


def finalize_values(values: dict, ids: np.ndarray) -> pd.DataFrame:
    """values.parquet rows: weight normalised to mean 1, rank 1 = highest value (NaN values rank last)."""
    n = len(ids)
    value = _to_numpy(values["value"])
    std = values.get("value_std")
    weight = values.get("weight")
    weight = np.ones(n) if weight is None else mean_one(_to_numpy(weight))
    frame = pd.DataFrame({
        "example_id": ids, "value": value, "value_std": np.full(n, np.nan) if std is None else _to_numpy(std),
        "weight": weight, "rank": rank_by_value(value),
    })
    for k, v in values.items():
        if k not in ("value", "value_std", "weight"):
            frame[k] = _to_numpy(v)
    return frame
