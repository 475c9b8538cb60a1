"""The one training loop that drives every method.

`train()` is the public edge (options resolved and validated by `valuekit.training.options`); `_train`
is a straight sequence: prepare the run directory -> build context, trainer and sampler -> step, log,
evaluate, checkpoint -> finalise. What a method sees lives in `valuekit.training.context`, the run directory
in `valuekit.runs.layout`, the torchrun handshakes in `valuekit.training.distributed`. The names methods and tests
import from here (Batch, StepRecord, TrainContext, per_example_loss, ...) are re-exported.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from valuekit.config import TrainConfig
from valuekit.data.images import augment
from valuekit.data.memory import TRIM_SECONDS, fix_mmap_threshold, trim_heap
from valuekit.data.streaming import RowStream
from valuekit.data.tables import ValueDataset
from valuekit.errors import (
    InputError,
    RunDirError,
    TrainingDiverged,
    TrainingFailed,
    first_line,
    refusal,
    release_warnings,
    unreadable,
)
from valuekit.models.builtin import feature_stats
from valuekit.models.user import build_user_model, check_model_spec, is_builtin
from valuekit.ranking import mean_one, rank_by_value
from valuekit.runs.layout import CHECKPOINT, RUN_JSON
from valuekit.runs.reader import read_run
from valuekit.runs.writer import RunWriter
from valuekit.training import distributed as dist_
from valuekit.training.checkpoint import load_checkpoint, save_checkpoint
from valuekit.training.context import Batch, StepRecord, TrainContext
from valuekit.training.early_stopping import BestModel, eval_interval, schedule
from valuekit.training.hooks import Hook, as_hooks
from valuekit.training.method import MethodValues
from valuekit.training.options import resolve, resolve_device
from valuekit.training.precision import autocast, grad_scaler, peak_memory_mb, reset_peak
from valuekit.training.rundir import prepare_run
from valuekit.training.signals import SignalAccumulator, in_run_value, in_run_value_doc


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _versions() -> dict:
    import pyarrow

    from valuekit import __version__

    return {
        "valuekit": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "pandas": pd.__version__, "pyarrow": pyarrow.__version__,
        "cuda": torch.version.cuda,
    }


def _to_device(data: ValueDataset, device) -> tuple[torch.Tensor, torch.Tensor]:
    return data.x.to(device), data.y.to(device)


def build_context(view: ValueDataset, dev_data: ValueDataset, config: TrainConfig, device: torch.device,
                  *, rank: int = 0, world_size: int = 1, model_factory=None) -> TrainContext:
    """Move trainer-visible data to the device and seed the run's generator (no run directory involved).
    Streamed image rows (valuekit.data.images.ImageRows) stay encoded on the host; the dev set is decoded once."""
    generator = torch.Generator().manual_seed(config.seed)
    x, y = _to_device(view, device)
    dev_x, dev_y = _to_device(dev_data, device)
    if not isinstance(dev_x, torch.Tensor):  # streamed images, packed tokens: the dev set is small and used whole
        dev_x = dev_x[:]
    if not isinstance(dev_y, torch.Tensor):
        dev_y = dev_y[:]
    codes = {s: i for i, s in enumerate(view.sources)}
    source = dev_source = None
    if view.source is not None:
        source = torch.tensor([codes[s] for s in view.source], device=device)
        if dev_data.source is not None:
            dev_source = torch.tensor([codes.get(s, -1) for s in dev_data.source], device=device)
    mean, std = feature_stats(view.x, view.image_shape)
    from valuekit.models.lm import is_lm, token_lengths

    dev_order = torch.argsort(token_lengths(dev_x.cpu()), stable=True) if is_lm(config.model) else None
    return TrainContext(
        config=config, device=device, generator=generator, x=x, y=y, ids=view.ids, num_classes=view.num_classes,
        classes=view.classes, dev_x=dev_x, dev_y=dev_y, source=source, sources=view.sources, dev_source=dev_source,
        image_shape=view.image_shape, mean=mean.to(device), std=std.to(device),
        group=None if view.group is None else torch.as_tensor(view.group, dtype=torch.int64),
        row_weight=None if view.weight is None else torch.as_tensor(view.weight, dtype=torch.float32, device=device),
        rank=rank, world_size=world_size, model_factory=model_factory, scaler=grad_scaler(device, config.precision),
        dev_order=dev_order,
        signals=SignalAccumulator(len(y), device=device, gather=lambda t: dist_.gather(t, world_size=world_size)),
    )


def make_trainer(train_data: ValueDataset, dev_data: ValueDataset, config: TrainConfig,
                 method_config=None, *, model=None):
    """(trainer, sampler, ctx) for `config.method` without a run directory: for benchmarks and notebooks.
    Options go through the same `options.resolve` as `train()`; `model` as in `train()`."""
    config, mcfg, spec = resolve(config, method_config)
    config, factory = _resolve_model(config, model, train_data)
    config = schedule(config, len(train_data))
    ctx = build_context(train_data.trainer_view(), dev_data, config, resolve_device(config.device),
                        model_factory=factory)
    trainer, sampler = spec.build(ctx, mcfg)
    return trainer, sampler, ctx


def _resolve_model(config: TrainConfig, model, data: ValueDataset, *others: ValueDataset | None):
    """(config with the model described as text, factory or None): a user's model is imported/resolved once here
    and built on two rows to check that it gives one logit per class, before anything is written."""
    from valuekit.models.user import check_output, describe_model, resolve_factory

    if model is not None:
        check_model_spec(model)
        config = dataclasses.replace(config, model=describe_model(model))
    spec = config.model if model is None else model
    if is_builtin(spec):
        return config, None
    factory = resolve_factory(spec)
    shape = tuple(data.image_shape) if data.image_shape else (data.x.shape[1],)
    probe = build_user_model(spec, num_classes=data.num_classes, input_shape=shape,
                             generator=torch.Generator().manual_seed(config.seed), factory=factory)
    check_output(
        probe, data.x[:2], data.num_classes, config.model, tables=[d for d in (data, *others) if d is not None]
    )
    return config, factory


def run_training(
    train_data: ValueDataset,
    dev_data: ValueDataset,
    test_data: ValueDataset | None = None,
    *,
    out,
    config: TrainConfig | None = None,
    method_config=None,
    resume: bool = False,
    hooks: list | None = None,
    name: str | None = None,
    model=None,
    overwrite: bool = False,
):
    """Train `config.method` on `train_data`, log to the run directory `out`, return the opened Run.

    `overwrite=True` replaces a run that `out` already holds (said on stderr); without it such an `out` is refused.

    `model` (optional) is a user's model: an nn.Module (each build is a deep copy of it), a factory
    `f(num_classes=, input_shape=)`, or a spec string; it replaces `config.model` (run.json records its name).

    `method_config` is a dict of method settings or the method's Config. `hooks` are `training.hooks.Hook`
    objects (or objects with `on_step_end(step, batch, record, trainer)` and/or `on_eval(step, metrics)`,
    checked once by `as_hooks`); they see everything the loop sees (used by benchmarks).

    Under torchrun (WORLD_SIZE > 1) every process calls this with the same arguments: the process group
    is started here unless the caller did (gloo on CPU, nccl on CUDA with device cuda:LOCAL_RANK), each
    step's global batch of batch_size x world_size rows is split over the ranks (valuekit.training.distributed),
    rank 0 takes the lock and writes run.json, metrics/, sources/, values.parquet and checkpoints, and
    every rank writes its own steps/rank-R/part-*.parquet. `on_step_end` hooks run on every rank (with
    that rank's slice of the batch), `on_eval` hooks and evaluation on rank 0 only.

    `config.epochs` replaces `config.steps` and evaluations come every `eval_interval(config)` steps
    (valuekit.training.early_stopping). `config.early_stopping` keeps the model of the best dev accuracy in
    OUT/best.pt and `best_step`, `best_metrics` in run.json; `config.patience` > 0 stops after that many
    evaluations without a better one.
    """
    if resume and overwrite:
        raise InputError("resume=True and overwrite=True: choose one", cli="--resume and --overwrite: choose one")
    hooks = as_hooks(hooks)
    config, mcfg, spec = resolve(config, method_config)
    config, factory = _resolve_model(config, model, train_data, dev_data, test_data)
    from valuekit.models.lm import is_lm

    fix_mmap_threshold(causal_lm=is_lm(config.model))  # $VALUEKIT_MALLOC (valuekit.data.memory)
    if config.precision == "fp16" and not spec.cls.fp16:
        why = f"method {config.method!r} does not use the gradient scaler fp16 needs"
        raise InputError(f"precision='fp16': {why}; use precision='bf16'",
                         cli=f"--precision fp16: {why}; use --precision bf16")
    device, info = _placement(config, spec)
    if info.is_main:  # the CLI's rule for --out (no '', no file, no non-empty folder that is not a run)
        from valuekit.runs.paths import check_output

        check_output(out, option="out", kind="run",
                     inputs=[d.path for d in (train_data, dev_data, test_data) if d is not None and d.path])
    out = Path(out)
    _check_inputs(config, out, train_data, dev_data, test_data)
    config = schedule(config, len(train_data), info.world_size)
    view = train_data.trainer_view()  # trainers never see is_noisy / clean_label
    meta = {
        "name": name or out.name, "method": config.method, "config": dataclasses.asdict(config),
        "method_config": dataclasses.asdict(mcfg), "seed": config.seed,
        "data": {"train": view.describe(), "dev": dev_data.describe(),
                 "test": test_data.describe() if test_data else None},
        "classes": view.classes, "sources": view.sources, "id_type": view.id_type,
        "image_shape": list(view.image_shape) if view.image_shape else None, "feature_cols": view.feature_cols,
        "label_col_codes": "label column in steps/ holds class codes into `classes`",
        # what the metrics' *_acc columns hold: translation models are scored by corpus chrF / 100
        "acc_metric": "chrF/100" if config.model == "seq2seq" else "accuracy",
        "device": str(device), "host": platform.node(), "versions": _versions(), "status": "running",
        "started_at": _now(), "steps_done": 0,
        "world_size": info.world_size, "global_batch_size": config.batch_size * info.world_size,
        "eval_every": eval_interval(config),  # the interval used (config.eval_every None: steps // 20)
    }
    started_group = dist_.init(info, device)
    try:
        return _train(view, dev_data, test_data, out=out, config=config, spec=spec, mcfg=mcfg, meta=meta,
                      resume=resume, hooks=hooks, device=device, info=info, model_factory=factory,
                      overwrite=overwrite)
    finally:
        dist_.shutdown(started_group)


def _placement(config: TrainConfig, spec) -> tuple[torch.device, dist_.DistInfo]:
    """The device and the torchrun placement, refusing combinations that cannot run."""
    device = resolve_device(config.device)
    info = dist_.env_info()
    if info.enabled and not spec.distributed:
        # a method declares DISTRIBUTED = True once its extra state is synchronised across ranks
        raise InputError(f"method {config.method!r} does not run under torchrun yet (its state is not synchronised "
                         f"across processes); run it in one process")
    if info.enabled and device.type == "cuda":
        if config.device not in ("auto", "cuda"):
            raise InputError(f"device={config.device!r}: under torchrun each process uses cuda:LOCAL_RANK; "
                             f"use 'auto' or 'cuda'", cli=f"--device {config.device}: under torchrun each process "
                                                           f"uses cuda:LOCAL_RANK; use --device auto or cuda")
        if info.local_rank >= torch.cuda.device_count():
            raise refusal(f"local rank {info.local_rank}: this node has {torch.cuda.device_count()} GPU(s); start "
                             f"at most that many processes per node (or use --device cpu)")
        device = torch.device("cuda", info.local_rank)
    return device, info


LM_METHODS = ("uniform", "bads", "dds", "multidds")  # the methods that train a causal LM on instruction rows


def _check_inputs(config: TrainConfig, out: Path, train_data, dev_data, test_data) -> None:
    if config.early_stopping and (dev_data is None or len(dev_data) == 0):
        raise InputError("early_stopping: needs a dev table (the best model is chosen by dev accuracy)")
    if config.model == "seq2seq" and config.method != "multidds":
        raise InputError(
            f"model='seq2seq': translation tables are trained with method='multidds', not {config.method!r}",
            cli=f"--model seq2seq: translation tables are trained with --method multidds, not {config.method!r}"
        )
    where = train_data.path or train_data.where or "train"
    if config.augment != "none" and train_data.image_shape is None:
        raise InputError(f"{where}: augment={config.augment!r} needs an image table",
                         cli=f"{where}: --set augment={config.augment} needs an image table")
    from valuekit.models.lm import check_lm, is_lm

    if is_lm(config.model):
        if train_data.y.dim() != 2:
            raise InputError(f"model={config.model!r}: needs an instruction table (prompt, response columns)",
                             cli=f"--model {config.model}: needs an instruction table (prompt, response columns)")
        check_lm(config.model, vocab=train_data.num_classes, max_len=train_data.x.shape[1], lora=config.lora)
        if config.method not in LM_METHODS:  # their teacher / selector reads a class label and class probabilities
            raise InputError(f"method={config.method!r}: not available for causal-LM instruction tables; use "
                             f"{', '.join(LM_METHODS)}", cli=f"--method {config.method}: not available for causal-LM "
                                                             f"instruction tables; use {', '.join(LM_METHODS)}")
    elif config.lora:
        why = "LoRA adapters are for causal LMs"
        raise InputError(
            f"lora={config.lora}: {why} (model='hf:DIR' or 'hf-config:DIR'), not model={config.model!r}",
            cli=f"--lora {config.lora}: {why} (--model hf:DIR or hf-config:DIR), not --model {config.model}")
    elif config.gradient_checkpointing:
        lms = "for causal LMs (causal-lm, hf:DIR, hf-config:DIR)"
        raise InputError(f"gradient_checkpointing=True: {lms}, not model={config.model!r}",
                         cli=f"--gradient-checkpointing: {lms}, not --model {config.model}")
    if config.model == "cnn" and train_data.image_shape is None:
        raise InputError(f"{where}: model='cnn' needs image-shaped features (a list column with an image shape)",
                         cli=f"{where}: --model cnn needs image-shaped features (a list column with an image shape)")
    for d in (train_data, dev_data, test_data):
        if d is not None and d.path and out.resolve() == Path(d.path).resolve():
            raise InputError(f"out={str(out)!r}: is an input table; choose another run directory",
                             cli=f"--out {out}: is an input table; choose another run directory")


def _prepare(out: Path, meta: dict, resume: bool, info: dist_.DistInfo, overwrite: bool = False):
    """(lock, checkpoint state): rank 0 takes the lock and checks the directory, then tells the others."""

    def decide():
        lock, state = prepare_run(out, meta, resume, overwrite)
        shared = {"run_id": meta["run_id"], "started_at": meta["started_at"], "has_state": state is not None}
        return (lock, state), shared

    local, shared = dist_.rank0_decides(
        decide, info=info, errors={"RunDirError": RunDirError, "InputError": InputError}
    )
    if info.is_main:
        return local
    meta["run_id"], meta["started_at"] = shared["run_id"], shared["started_at"]
    # the run directory is on a filesystem every node sees
    return None, load_checkpoint(out, training=True) if shared["has_state"] else None


def _train(view, dev_data, test_data, *, out: Path, config: TrainConfig, spec, mcfg, meta: dict, resume: bool,
           hooks: list[Hook], device: torch.device, info: dist_.DistInfo, model_factory=None, overwrite: bool = False):
    # the trainer is built before the run directory is touched: a setting it refuses (a feature layer that is not
    # there, a source column a method needs) leaves no run skeleton or lock behind
    ctx = build_context(view, dev_data, config, device, rank=info.rank, world_size=info.world_size,  # build
                        model_factory=model_factory)
    trainer, sampler = spec.build(ctx, mcfg)
    lock, state = _prepare(out, meta, resume, info, overwrite)                        # prepare
    if state:
        _check_state(trainer, sampler, ctx, state, out=out, lock=lock, method=config.method)
    release_warnings()  # the input passed every check: the warnings held while checking it are shown now
    labels = view.y.numpy().astype(np.int32) if view.y.dim() == 1 else None  # 2-D y (text): null label
    writer = RunWriter(out, meta=meta, id_type=view.id_type, lock=lock, rank=info.rank, world_size=info.world_size,
                       resume_parts=state["parts"] if state else ({} if resume else None),
                       rows={"example_id": view.ids, "label": labels, "source": view.source})
    test_xy = _to_device(test_data, device) if test_data is not None and info.is_main else None
    loop = _Loop(view, ctx, trainer, sampler, writer, spec=spec, out=out, hooks=hooks, info=info, test_xy=test_xy)
    if state:
        loop.restore(state)
    with _StopSignals() as stop, _Progress(config, loop.step, info) as bar:
        try:
            while loop.step < config.steps and not loop.stopped_early:                # step / log / eval / ckpt
                if loop.stop_agreed or (stop.requested and not info.enabled):
                    raise KeyboardInterrupt
                loop.run_step(stop.requested, bar)
        except KeyboardInterrupt:
            loop.interrupted()
            raise
        except (TrainingDiverged, TrainingFailed):
            raise
        except BaseException as exc:
            _failed(writer, loop.step, exc, config=config, out=out)
        finally:
            loop.close_stream()
    try:
        return loop.finish()                                                          # finalise
    except (TrainingDiverged, TrainingFailed, KeyboardInterrupt):
        raise
    except BaseException as exc:
        _failed(writer, loop.step, exc, config=config, out=out)


def _failed(writer: RunWriter, step: int, exc: BaseException, *, config: TrainConfig, out: Path):
    """Mark the run failed (run.json: status, the reason in one line) and raise TrainingFailed saying so."""
    reason = f"{type(exc).__name__}: {first_line(exc)}"
    where = getattr(exc, "filename", None)
    if where and str(where) not in reason:  # an OSError (a full disk) names its file
        reason = f"{where}: {reason}"
    try:
        writer.close("failed", steps_done=step, error=reason, finished_at=_now())
    except Exception as close_exc:  # the disk that failed the write may fail run.json too
        reason += f" (and marking the run failed: {first_line(close_exc)})"
    if not isinstance(exc, Exception):
        raise exc
    said = f"{reason}; {out / RUN_JSON} says failed"
    raise TrainingFailed(f"step {step}: training failed (model={config.model!r}): {said}",
                         cli=f"step {step}: training failed (--model {config.model}): {said}") from exc


def _check_state(trainer, sampler, ctx, state: dict, *, out: Path, lock, method: str) -> None:
    """Load the checkpoint into the fresh trainer before the writer touches the directory (it drops parts newer
    than the checkpoint): a checkpoint that does not fit this method stops here, the run as it was, no lock left."""
    try:
        trainer.load_state_dict(state["trainer"])
        sampler.load_state_dict(state["sampler"])
        ctx.generator.set_state(state["generator"])
    except Exception as exc:
        if lock is not None:
            lock.unlink(missing_ok=True)
        raise unreadable(out / CHECKPOINT, f"does not fit method {method!r}: {type(exc).__name__}: "
                         f"{first_line(exc)[:120]}") from None


class _StopSignals:
    """Ctrl-C / SIGTERM ask the loop to stop at the next step boundary, so the checkpoint never holds half a
    step; a second signal stops at once and resume then starts from the last periodic checkpoint."""

    def __enter__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: keep Python's default behaviour
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


class _Progress:
    """Progress on rank 0 when config.progress: a tqdm bar on a terminal; in pipes, CI logs and under nohup a
    line every 10 % of the steps or 30 s (valuekit.training.progress)."""

    def __init__(self, config: TrainConfig, start: int, info: dist_.DistInfo):
        self.bar = None
        if config.progress and info.is_main:
            from valuekit.training.progress import Progress

            self.bar = Progress(total=config.steps, initial=start, desc=config.method)

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


class _Loop:
    """The loop's state between steps and the four things it does: one step, evaluation, checkpoint, finish."""

    def __init__(self, view, ctx: TrainContext, trainer, sampler, writer: RunWriter, *, spec, out: Path,
                 hooks: list[Hook], info: dist_.DistInfo, test_xy):
        self.ctx, self.trainer, self.sampler, self.writer, self.spec = ctx, trainer, sampler, writer, spec
        self.config, self.out, self.hooks, self.info, self.test_xy = ctx.config, out, hooks, info, test_xy
        self.ids = view.ids
        self.step = self.done = 0  # last step started / last step fully logged
        self.elapsed_before, self.t0 = 0.0, time.perf_counter()
        self.trimmed_at = self.t0  # last time freed heap went back to the OS (valuekit.data.memory)
        self.stop_agreed = False  # all ranks saw that some rank was asked to stop (torchrun)
        self.last_metrics: dict = {}
        # streamed images: each batch's rows decoded on the host, the likely next batch by background workers
        self.stream = RowStream(ctx.x, ctx.device, ctx.config.data_workers) if hasattr(ctx.x, "encoded") else None
        self.augment_generator = torch.Generator().manual_seed(ctx.config.seed + 1)  # augmentation only
        self.eval_every = eval_interval(ctx.config)
        self.best = BestModel(out, ctx.config.patience) if ctx.config.early_stopping else None  # rank 0 fills it
        self.stopped_early = False

    def close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()

    def restore(self, state: dict) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.sampler.load_state_dict(state["sampler"])
        self.ctx.generator.set_state(state["generator"])
        if "augment_generator" in state:
            self.augment_generator.set_state(state["augment_generator"])
        self.ctx.signals.load_state_dict(state.get("signals", {}))
        self.step = self.done = int(state["step"])
        self.elapsed_before = float(state["elapsed"])
        if self.best is not None:
            self.best.load_state_dict(state["best"], write=self.info.is_main)
            self.stopped_early = self.best.spent

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def next_batch(self, step: int) -> tuple[Batch, torch.Tensor]:
        B, world, ctx = self.config.batch_size, self.info.world_size, self.ctx
        # the same global batch on every rank (shared generator), each takes its slice
        part = slice(self.info.rank * B, (self.info.rank + 1) * B)
        idx_cpu = self.sampler.next(B * world)[part]
        idx = idx_cpu.to(ctx.device, non_blocking=True)
        src = None if ctx.source is None else ctx.source[idx]
        if self.stream is None:
            x = ctx.x[idx]
        else:
            x = self.stream.get(idx_cpu)
            self.stream.predict(self.sampler, B * world, part if world > 1 else None)  # decoded while this step runs
        if self.config.augment != "none":
            x = augment(x, ctx.image_shape, self.config.augment, self.augment_generator, total=B * world, part=part)
        return Batch(step=step, idx=idx, x=x, y=ctx.y[idx], source=src), idx_cpu

    def run_step(self, stop_requested: bool, bar) -> None:
        self.step = step = self.step + 1
        batch, idx_cpu = self.next_batch(step)
        ts = time.perf_counter()
        reset_peak(self.ctx.device)
        with autocast(self.ctx.device, self.config.precision):
            rec = self.trainer.step(batch)
        self.ctx.signals.record(batch, rec)  # per-example in-run signals of every method (signals.py)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        metrics, bad, diverged = self.log_step(step, idx_cpu, rec, time.perf_counter() - ts, stop_requested)
        evaluates = not diverged and (step % self.eval_every == 0 or step == self.config.steps)
        if self.info.is_main and evaluates:
            metrics.update(self.evaluation(step))
            self.last_metrics = metrics
            if self.best is not None:
                self.best.observe(step, metrics, self.trainer.model)
        if evaluates and self.config.patience:  # rank 0 evaluated; every rank stops at the same step
            spent = float(self.info.is_main and self.best.spent)
            self.stopped_early = dist_.agree([spent], device=self.ctx.device, world_size=self.info.world_size)[0] > 0
        if self.info.is_main:
            self.writer.metrics.add(**metrics)
            for s, vals in (rec.sources or {}).items():
                self.writer.sources.add(
                    step=step, source=s, **dict(zip(("prob", "count", "reward", "reward_se"), vals))
                )
        if diverged:
            self.writer.close("failed", steps_done=step, error=f"non-finite {bad} at step {step}", finished_at=_now())
            said = f"step {step}: training {bad} became NaN/inf; stopped. Everything up to this step is in {self.out}"
            raise TrainingDiverged(f"{said} (try a smaller lr)", cli=f"{said} (try a smaller --lr)")
        self.done = step  # the step is logged: hooks and interrupts from here on see a whole step
        for h in self.hooks:
            h.on_step_end(step, batch, rec, self.trainer)
        if bar is not None:
            if step % 10 == 0 or step == 1:
                dev_acc = self.last_metrics.get("dev_acc")  # none before the first evaluation (never "nan")
                bar.set_postfix(loss=f"{metrics['train_loss']:.3f}",
                                dev_acc=None if dev_acc is None else f"{dev_acc:.3f}")
            bar.update(1)
        if step % self.config.checkpoint_every == 0:
            self.save_checkpoint(step)
        elif step % self.config.log_every == 0:
            self.writer.flush()
        if time.perf_counter() - self.trimmed_at > TRIM_SECONDS:
            trim_heap()  # glibc keeps freed step buffers: resident memory crept ~60 MiB over an epoch without this
            self.trimmed_at = time.perf_counter()

    def log_step(self, step: int, idx_cpu, rec: StepRecord, step_time: float, stop_requested: bool):
        """(metrics row, what went non-finite or None, whether any rank diverged); adds this rank's steps/ rows."""
        loss = rec.loss.detach().float().cpu().numpy()
        weight = None if rec.weight is None else rec.weight.detach().float().cpu().numpy()
        rows = idx_cpu.numpy()
        if self.config.log_steps:
            self.writer.steps.add(  # example_id, label and source are looked up from `rows` by the writer thread
                step=step, rows=rows, weight=weight,
                reward=None if rec.reward is None else rec.reward.detach().float().cpu().numpy(),
                loss=loss, selected=None if rec.selected is None else rec.selected.detach().cpu().numpy(),
            )
        # (the per-example statistics accumulator of every run is fed here, from `rows` and `rec`)
        bad_loss = not np.isfinite(loss).all()
        bad = "loss" if bad_loss else "weights" if weight is not None and not np.isfinite(weight).all() else None
        correct = 0.0 if rec.correct is None else float(rec.correct.float().sum())
        # one collective per step: global train loss/accuracy, and whether any rank diverged or was asked to
        # stop (so that all ranks stop at the same step)
        total, n, correct, any_bad, any_stop = dist_.agree(
            [float(np.sum(loss, dtype=np.float64)), len(loss), correct, float(bad is not None), float(stop_requested)],
            device=self.ctx.device, world_size=self.info.world_size)
        if self.info.enabled:
            train_loss = total / n
            self.stop_agreed = any_stop > 0
        else:
            train_loss = float(np.mean(loss))  # as one process always computed it (float32 mean)
        metrics = {"step": step, "train_loss": train_loss, "step_time": step_time, "wall_time": self.elapsed(),
                   "scorer_loss": rec.scorer_loss, "meta_loss": rec.meta_loss,
                   "cuda_mem_mb": peak_memory_mb(self.ctx.device)}
        if rec.correct is not None:
            metrics["train_acc"] = correct / n if self.info.enabled else float(rec.correct.float().mean())
        return metrics, bad or "loss", any_bad > 0

    def evaluation(self, step: int) -> dict:
        # a method may define its own evaluate(x, y) -> (loss, metric), e.g. translation (acc columns hold chrF/100)
        ev = self.trainer.evaluate
        m = {}
        m["dev_loss"], m["dev_acc"] = ev(self.ctx.dev_x, self.ctx.dev_y)
        if self.test_xy is not None:
            m["test_loss"], m["test_acc"] = ev(*self.test_xy)
        for h in self.hooks:
            h.on_eval(step, m)
        return m

    def save_checkpoint(self, step: int) -> None:
        self.writer.flush()
        trainer_state = self.trainer.state_dict()  # every rank: a method may gather here
        # Replicas must agree, so rank 0's state is everyone's (and the step parts were closed in step).
        if not dist_.replicas_agree([trainer_state, self.sampler.state_dict(), self.ctx.generator.get_state(),
                                     self.writer.part_counts()["steps"]],
                                    device=self.ctx.device, world_size=self.info.world_size):
            raise RuntimeError(f"step {step}: the ranks' trainer states differ; this is a valuekit bug in "
                               f"method {self.config.method!r}'s synchronisation (the checkpoint would be wrong)")
        if self.info.is_main:
            blob = {
                "step": step, "trainer": trainer_state, "sampler": self.sampler.state_dict(),
                "generator": self.ctx.generator.get_state(), "parts": self.writer.part_counts(),
                "elapsed": self.elapsed(), "signals": self.ctx.signals.state_dict(),
                "augment_generator": self.augment_generator.get_state(),
            }
            if self.best is not None:
                self.best.save()  # best.pt first: a checkpoint never names a best model that is not on disk
                blob["best"] = self.best.state_dict()
            save_checkpoint(self.out, blob)
            self.writer.write_meta(steps_done=step, **self.best_meta())

    def best_meta(self) -> dict:
        return {} if self.best is None else self.best.meta(self.stopped_early)

    def interrupted(self) -> None:
        # under torchrun only a stop all ranks agreed on is checkpointed (the others are mid-step or gone)
        if self.done == self.step and (not self.info.enabled or self.stop_agreed):
            self.save_checkpoint(self.step)  # stopped between steps: everything is consistent
        self.writer.close("interrupted", steps_done=self.done, finished_at=_now())

    def finish(self):
        self.save_checkpoint(self.step)
        own = self.trainer.values()  # every rank: a method may gather here
        if self.info.is_main:
            value = own.value if own.value is not None else in_run_value(self.ctx, own.learned)
            columns = {**self.ctx.signals.columns(), "value": value, **own.columns}
            self.writer.write_values(finalize_values(columns, self.ids), docs=column_docs(self.ctx, own))
            sources = self.trainer.source_table()
            if sources is not None:  # multi-source methods: one row per source
                self.writer.write_source_table(sources)
        self.writer.close("completed", steps_done=self.step, duration_s=self.elapsed(), finished_at=_now(),
                          final_metrics=_clean(self.last_metrics), **self.best_meta())
        dist_.barrier(world_size=self.info.world_size)  # run.json is final before any rank returns
        return read_run(self.out)


def column_docs(ctx: TrainContext, own: MethodValues) -> dict[str, str]:
    """What value, value_std and weight (and the learned quantity) mean for this run, one sentence each."""
    docs = dict(own.doc)
    if own.value is None:
        docs["value"] = in_run_value_doc(ctx, docs.get("learned", "(not described)"))
    docs.setdefault("value_std", "not defined for this method (NaN)")
    docs.setdefault("weight", "1 for every row")
    return docs


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
