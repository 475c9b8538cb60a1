"""`valuekit bench`: how fast and how good each method is, next to the baselines, in one re-runnable command.

Each benchmark writes `<kind>.md` (the exact command line at the top), `<kind>.csv` with the raw
numbers and a PNG figure into the output folder. Numbers are measured when the command runs;
nothing is copied in by hand.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.errors import InputError
from valuekit.runlog import RUN_JSON, VALUES, write_text_atomic

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "digits-noisy20"
SPEED_METHODS = ("dds", "hostcp", "lrdi", "l2rw", "mwnet", "bads", "multidds")


def machine_line(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        return f"GPU {name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return (f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, no GPU used")


def _header(title: str, command: str, device: str) -> list[str]:
    return [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine_line(device)}; "
            f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]


def _stem(kind: str, device: str) -> str:
    """File name of a benchmark's outputs: GPU results sit next to CPU ones instead of replacing them."""
    return f"{kind}-gpu" if device.startswith("cuda") else kind


def _write(out: Path, kind: str, lines: list[str], frame: pd.DataFrame) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / f"{kind}.csv", index=False)
    md = out / f"{kind}.md"
    write_text_atomic("\n".join(lines) + "\n", md)
    return md


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> list[str]:
    """Rows of a markdown table; floats to `digits` significant digits."""
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "nan" if not np.isfinite(v) else f"{v:.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return lines


def _bench_tables(data_dir: Path | None = None, *, sources: int = 3, side: int = 8):
    """The bundled noisy digits with a `source` column (id mod `sources`) so multi-source methods run too;
    `side` != 8 resizes the 8x8 images (bilinear) to side x side, e.g. 28 for the resnet-style model."""
    from valuekit.datasets import load_table

    folder = Path(data_dir or BUNDLED)
    train_df = pd.read_parquet(folder / "train.parquet")
    dev_df = pd.read_parquet(folder / "dev.parquet")
    for df in (train_df, dev_df):
        df["source"] = "s" + (df["id"] % sources).astype(str)
    if side != 8:
        import torch
        import torch.nn.functional as F

        for df in (train_df, dev_df):
            x = torch.tensor(np.stack(df["pixels"].to_numpy()).astype(np.float32)).reshape(-1, 1, 8, 8)
            big = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False).reshape(len(df), -1)
            df["pixels"] = list(big.numpy())
    shape = (1, side, side)
    tr = load_table(train_df, image_shape=shape, name="train")
    return tr, load_table(dev_df, like=tr, name="dev")


# ---------------------------------------------------------------- speed

#: the models of `bench speed`: name -> (image side, batch size)
SPEED_MODELS = {"mlp": (8, 64), "cnn": (8, 64), "resnet": (28, 128)}
#: timed resnet steps per repetition (kept small: a shared 2-core machine gives this process a fraction of a core)
RESNET_STEPS = 5
TOY_STEPS = 40  # timed mlp/cnn steps per repetition
#: issue 20's "done when" ratios (model, method) -> most step time / uniform's
TARGETS = {("resnet", "dds"): 1.3, ("resnet", "bads"): 1.1, ("resnet", "hostcp"): 1.4, ("resnet", "multidds"): 1.6,
           ("resnet", "l2rw"): 2.0, ("resnet", "mwnet"): 2.0, ("resnet", "lrdi"): 2.2, ("mlp", "lrdi"): 2.5,
           ("mlp", "hostcp"): 1.5}
#: parts of a method's step timed separately (attributes of its trainer, wrapped in the bench process only)
SECTIONS = {
    "dds": {"meta": ("scorer.forward", "scorer_opt.step"), "reward": ("tape.dots",)},
    "hostcp": {"meta": ("meta_gradient", "lookahead_dev_loss", "selector_opt.step"), "reward": ("_weights",)},
    "lrdi": {"meta": ("meta_gradient", "teacher_opt.step")},
    "mwnet": {"meta": ("meta_gradient", "teacher_opt.step")},
    "l2rw": {"meta": ("meta_gradient",)},
    "multidds": {"meta": ("update_scorer",), "reward": ("_source_grads", "_split_grads")},
}


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Sections:
    """Wall time spent inside chosen methods of a trainer (outermost call only), per section name."""

    def __init__(self, device):
        self.device, self.depth = device, 0
        self.t: dict[str, float] = {}

    def wrap(self, trainer, sections: dict[str, tuple[str, ...]]) -> None:
        for name, paths in sections.items():
            for path in paths:
                *parents, attr = path.split(".")
                obj = trainer
                for part in parents:
                    obj = getattr(obj, part, None)
                fn = None if obj is None else getattr(obj, attr, None)
                if fn is not None:
                    setattr(obj, attr, self._timed(fn, name))

    def _timed(self, fn, name):
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            _sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
                self.depth -= 1
        return timed

    def take(self) -> dict[str, float]:
        out, self.t = self.t, {}
        return out


def _log_like_loop(writer, view, step: int, idx_cpu, rec, log_every: int = 50) -> None:
    """The per-step logging work of the training loop (trainers/base.py) for one StepRecord."""
    idx_np = idx_cpu.numpy()
    loss_np = rec.loss.detach().float().cpu().numpy()
    weight_np = None if rec.weight is None else rec.weight.detach().float().cpu().numpy()
    writer.steps.add(step=step, example_id=view.ids[idx_np], label=view.y.numpy()[idx_np].astype(np.int32),
                     source=None if view.source is None else view.source[idx_np], weight=weight_np,
                     reward=None if rec.reward is None else rec.reward.detach().float().cpu().numpy(),
                     loss=loss_np, selected=None if rec.selected is None else rec.selected.detach().cpu().numpy())
    bool(np.isfinite(loss_np).all())
    writer.metrics.add(step=step, train_loss=float(np.mean(loss_np)), step_time=0.0, wall_time=0.0,
                       scorer_loss=rec.scorer_loss,
                       train_acc=None if rec.correct is None else float(rec.correct.float().mean()))
    if step % log_every == 0:
        writer.flush()


def _variant(spec: str) -> tuple[str, dict]:
    """'lrdi[meta_grad=autograd]' -> ('lrdi', {'meta_grad': 'autograd'}) (values typed by the method's Config)."""
    from valuekit.trainers.base import load_method, parse_overrides

    name, _, rest = spec.partition("[")
    if not rest:
        return name, {}
    module, _ = load_method(name)
    method_vals, _ = parse_overrides([kv for kv in rest.rstrip("]").split(";") if kv], module.Config)
    return name, method_vals


#: earlier settings timed next to the defaults, so that the speed table shows before -> after in one run
BEFORE = {"lrdi": "lrdi[meta_grad=autograd]", "l2rw": "l2rw[meta_grad=autograd]", "mwnet": "mwnet[meta_grad=autograd]",
          "multidds": "multidds[grad_method=batched]"}


def step_times(train_data, dev_data, *, methods, model: str, batch_size: int, steps: int, warmup: int,
               device: str = "cpu", seed: int = 0, reps: int = 1, breakdown: bool = False):
    """Seconds per step of each method, interleaved round by round in one process, warm-up excluded.

    Returns {method: array of shape (reps, steps)}; with `breakdown` also {method: {section: array}} where
    the sections are `meta`, `reward` (SECTIONS) and `logging` (the loop's per-step log work, timed apart
    from the step, into a real run directory)."""
    from valuekit.runlog import RunWriter
    from valuekit.trainers.base import Batch, TrainConfig, make_trainer

    runners, timers, writers = {}, {}, {}
    tmp = tempfile.TemporaryDirectory()
    for m in methods:
        name, overrides = _variant(m)
        # `model`: a built-in name, or a user's factory / module (train(model=...))
        model_name, model_obj = (model, None) if isinstance(model, str) else ("mlp", model)
        cfg = TrainConfig(method=name, model=model_name, batch_size=batch_size, steps=reps * steps + warmup,
                          seed=seed, device=device, progress=False)
        runners[m] = make_trainer(train_data, dev_data, cfg, overrides, model=model_obj)
        if breakdown:
            timers[m] = _Sections(runners[m][2].device)
            timers[m].wrap(runners[m][0], SECTIONS.get(name, {}))
            writers[m] = RunWriter(Path(tmp.name) / m, meta={"method": m}, id_type=train_data.id_type)
    times = {m: np.zeros((reps, steps)) for m in methods}
    parts = {m: {k: np.zeros((reps, steps)) for k in ("meta", "reward", "logging")} for m in methods}
    order = list(methods)
    try:
        for i in range(warmup + reps * steps):
            order = order[1:] + order[:1]  # rotate so no method always runs right after another
            r, j = divmod(i - warmup, steps)
            for m in order:
                trainer, sampler, ctx = runners[m]
                idx_cpu = sampler.next(batch_size)
                idx = idx_cpu.to(ctx.device)
                batch = Batch(step=i + 1, idx=idx, x=ctx.x[idx], y=ctx.y[idx],
                              source=None if ctx.source is None else ctx.source[idx])
                _sync(ctx.device)
                t0 = time.perf_counter()
                rec = trainer.step(batch)
                _sync(ctx.device)
                dt = time.perf_counter() - t0
                if breakdown:
                    sec = timers[m].take()
                    t1 = time.perf_counter()
                    _log_like_loop(writers[m], train_data, i + 1, idx_cpu, rec)
                    log_dt = time.perf_counter() - t1
                if i >= warmup:
                    times[m][r, j] = dt
                    if breakdown:
                        parts[m]["meta"][r, j] = sec.get("meta", 0.0)
                        parts[m]["reward"][r, j] = sec.get("reward", 0.0)
                        parts[m]["logging"][r, j] = log_dt
    finally:
        for w in writers.values():
            w.close("completed")
        tmp.cleanup()
    return (times, parts) if breakdown else {m: t.reshape(-1) for m, t in times.items()}


def _peak_memory(method: str, model: str, batch_size: int, steps: int, device: str, data_dir, side: int = 8) -> float:
    """Peak memory in MiB of `steps` steps of one method: CUDA max allocated, or a child process's peak RSS."""
    code = (
        "import sys, json, resource, torch\n"
        "torch.set_num_threads(1)\n"
        "from valuekit.bench import _bench_tables, step_times\n"
        f"tr, dv = _bench_tables({str(data_dir) if data_dir else None!r}, side={side})\n"
        f"dev = {device!r}\n"
        "if dev.startswith('cuda'): torch.cuda.reset_peak_memory_stats()\n"
        f"step_times(tr, dv, methods=[{method!r}], model={model!r}, batch_size={batch_size}, steps={steps}, "
        f"warmup=0, device=dev)\n"
        "peak = torch.cuda.max_memory_allocated() / 2**20 if dev.startswith('cuda') else "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps(peak))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return float("nan")
    return float(json.loads(res.stdout.strip().splitlines()[-1]))


def _busy_child(threads: int):
    """A process that keeps `threads` cores busy with matrix products until it is killed."""
    code = ("import torch\n"
            f"torch.set_num_threads({threads})\n"
            "a = torch.randn(384, 384)\n"
            "while True:\n"
            "    a = torch.tanh(a @ a)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # let it start and load the cores
    return proc


def layer_under_load(*, n: int = 1024, batch: int = 32, reps: int = 15, reg: str = "quadratic",
                     default_threads: int | None = None) -> list[dict]:
    """Forward+backward of the exact subset layer at (batch, n), median over `reps`, while a busy child
    process loads every core: at torch's default thread count (`default_threads`, what a user gets
    without setting anything) and at 1 thread, interleaved; also without the layer's one-thread guard
    (the old behaviour) and at 1 thread with no extra load. Restores the thread count."""
    import torch

    import valuekit.selection as sel

    cores = default_threads or os.cpu_count() or 1
    layer = sel.SubsetSelection(fraction=0.25, reg=reg, lam=0.5)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(batch, n, generator=g, dtype=torch.float64)
    up = torch.randn(batch, n, generator=g, dtype=torch.float64)

    def once() -> float:
        x = s.clone().requires_grad_(True)
        t0 = time.perf_counter()
        layer(x).backward(up)
        return time.perf_counter() - t0

    class _NoGuard:
        def __init__(self, tensor):
            pass

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            pass

    def timed(threads: int, guard: bool = True) -> float:
        torch.set_num_threads(threads)
        saved = sel._one_cpu_thread
        if not guard:
            sel._one_cpu_thread = _NoGuard
        try:
            return once()
        finally:
            sel._one_cpu_thread = saved

    before = torch.get_num_threads()
    rows = []
    try:
        for _ in range(3):
            timed(1)
        idle = [timed(1) for _ in range(reps)]
        child = _busy_child(cores)
        try:
            res = {"default": [], "one": [], "noguard": []}
            for _ in range(reps):
                res["default"].append(timed(cores))
                res["one"].append(timed(1))
                res["noguard"].append(timed(cores, guard=False))
        finally:
            child.kill()
            child.wait()
    finally:
        torch.set_num_threads(before)
    one = float(np.median(res["one"]))
    for name, what, t in (("idle, 1 thread", "no extra load", idle),
                          (f"loaded, 1 thread", "busy child on every core", res["one"]),
                          (f"loaded, default ({cores} threads)", "busy child on every core", res["default"]),
                          (f"loaded, {cores} threads, no one-thread guard (before)", "busy child on every core",
                           res["noguard"])):
        med = float(np.median(t))
        rows.append({"setting": name, "load": what, "n": n, "batch": batch, "reg": reg,
                     "median_ms": 1e3 * med, "vs_loaded_1_thread": med / one, "reps": len(t)})
    return rows


def thread_table(tr_small, dv_small, tr_big, dv_big, *, steps: int, threads: int) -> list[dict]:
    """Uniform's median step of each bench model at 1 thread and at `threads` (torch's default), interleaved."""
    import torch

    rows = []
    before = torch.get_num_threads()
    try:
        for model, (side, bs) in SPEED_MODELS.items():
            tr, dv = (tr_big, dv_big) if side != 8 else (tr_small, dv_small)
            from valuekit.trainers.base import Batch, TrainConfig, make_trainer

            trainer, sampler, ctx = make_trainer(tr, dv, TrainConfig(method="uniform", model=model, batch_size=bs,
                                                                     steps=10**6, progress=False, device="cpu"))
            t = {1: [], threads: []}
            n_steps = steps if side == 8 else max(2, steps // 4)
            for i in range(2 * n_steps + 2):
                th = 1 if i % 2 == 0 else threads
                torch.set_num_threads(th)
                idx = sampler.next(bs)
                t0 = time.perf_counter()
                trainer.step(Batch(step=i + 1, idx=idx, x=ctx.x[idx], y=ctx.y[idx], source=None))
                if i >= 2:
                    t[th].append(time.perf_counter() - t0)
            rows.append({"model": model, "batch": bs, "ms_1_thread": 1e3 * float(np.median(t[1])),
                         f"ms_{threads}_threads": 1e3 * float(np.median(t[threads])),
                         "ratio": float(np.median(t[threads]) / np.median(t[1]))})
    finally:
        torch.set_num_threads(before)
    return rows


def bench_speed(out: Path, *, command: str, device: str = "cpu", quick: bool = False, methods=None,
                models=None, data_dir=None, reps: int | None = None, memory: bool = False) -> Path:
    """Median step time of each method / uniform on the same model, batch and data, with a breakdown, plus
    peak memory, the step log's cost, the subset layer under load and the thread table."""
    import torch

    from valuekit.trainers.base import available_methods

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = set(available_methods())
    methods = [m for m in (methods or SPEED_METHODS) if m in have]
    models = list(models or (("mlp",) if quick else SPEED_MODELS))
    reps = reps or (1 if quick else 3)
    torch_default = int(os.environ.get("VALUEKIT_BENCH_DEFAULT_THREADS", 0)) or (os.cpu_count() or 1)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    tables = {}
    rows, breakdown_rows = [], []
    for model in models:
        side, batch_size = SPEED_MODELS[model]
        if side not in tables:
            tables[side] = _bench_tables(data_dir, side=side)
        tr, dv = tables[side]
        if quick:
            steps, warmup = 12, 3
        else:
            steps, warmup = (RESNET_STEPS, 2) if side != 8 else (TOY_STEPS, 5)
        before = [] if quick else [BEFORE[m] for m in methods if m in BEFORE and (side == 8 or m in ("lrdi", "multidds"))]
        times, parts = step_times(tr, dv, methods=["uniform", *methods, *before], model=model, batch_size=batch_size,
                                  steps=steps, warmup=warmup, device=device, reps=reps, breakdown=True)
        rep_med = {m: np.median(t, axis=1) for m, t in times.items()}  # (reps,)
        base = float(np.median(rep_med["uniform"]))
        for m, t in times.items():
            med = float(np.median(rep_med[m]))
            rep_ratio = rep_med[m] / rep_med["uniform"]
            rows.append({
                "model": model, "batch": batch_size, "method": m, "median_step_ms": 1e3 * med,
                "p90_step_ms": 1e3 * float(np.quantile(t, 0.9)), "ratio_vs_uniform": med / base,
                "ratio_min": float(rep_ratio.min()), "ratio_max": float(rep_ratio.max()),
                "steps_per_s": 1.0 / med, "steps_timed": int(t.size), "reps": reps,
                "peak_mem_mib": float("nan") if quick or not memory or "[" in m or side != 8 else _peak_memory(m, model, batch_size,
                                                                                      10 if side != 8 else 30,
                                                                                      device, data_dir, side),
            })
            meta = 1e3 * float(np.median(parts[m]["meta"]))
            reward = 1e3 * float(np.median(parts[m]["reward"]))
            logging = 1e3 * float(np.median(parts[m]["logging"]))
            total = 1e3 * float(np.median(t))
            breakdown_rows.append({"model": model, "method": m, "step_ms": total,
                                   "model_and_rest_ms": total - meta - reward, "meta_ms": meta,
                                   "reward_ms": reward, "logging_ms": logging,
                                   "logging_pct_of_step": 100 * logging / total})
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    frame = pd.DataFrame(rows)
    log = logging_overhead(steps=200 if quick else 600, repeats=1 if quick else 3, device=device,
                           sync_writer=not quick)
    layer = layer_under_load(reps=3 if quick else 9, default_threads=torch_default) if device == "cpu" else []
    threads = [] if quick or device != "cpu" else thread_table(*tables.get(8, _bench_tables(data_dir)),
                                                                 *tables.get(28, _bench_tables(data_dir, side=28)),
                                                                 steps=6, threads=torch_default)
    mem_kind = "CUDA max allocated" if device.startswith("cuda") else "peak RSS of a child process (1 thread)"
    lines = _header("Speed: step time of each method relative to uniform", command, device) + [
        f"Load average (1 min) of the machine: {load_before:.1f} before, {load_after:.1f} after the step timings "
        f"(other processes share these cores, so absolute times are noisy; ratios are interleaved).", "",
        "Data: bundled digits-noisy20 (1,338 rows, 8x8) with 3 sources; mlp and cnn at batch 64 on 8x8, resnet",
        "(a small residual CNN with BatchNorm, `valuekit.models.resnet_body`, random init) at batch 128 on the",
        f"same images resized to 28x28. {reps} repetition(s) of interleaved timed steps per model (mlp/cnn: "
        f"{TOY_STEPS if not quick else 12} steps, resnet: {RESNET_STEPS if not quick else 12}",
        "steps per repetition, after warm-up), methods interleaved step by step in one process (the order rotates",
        "every round). Median step = median over repetitions of each repetition's median; ratio = that / uniform's;",
        f"min-max = the range of the per-repetition ratios. Memory: {mem_kind} (resnet: not measured; "
        f"`memory=False`, the default, skips it: one child process per method costs minutes on a loaded machine).",
        "", "| model | method | median step (ms) | ratio vs uniform | ratio min-max | p90 (ms) | steps/s | peak memory (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['median_step_ms']:.2f} | {r['ratio_vs_uniform']:.2f}x | "
                     f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['p90_step_ms']:.2f} | {r['steps_per_s']:.0f} | "
                     f"{r['peak_mem_mib']:.0f} |")
    lines += ["", "### Breakdown (median ms per step)", "",
              "meta = the method's meta/scorer/teacher work (dds: scorer forward + its optimizer step; hostcp: look-ahead",
              "meta-gradient + selector step; lrdi/mwnet/l2rw: the meta-gradient (virtual step, dev loss, backward to",
              "the teacher, which includes the one student forward they share with the real step) + teacher step;",
              "multidds: scorer update); reward = per-example/per-source reward work (dds: fused dots; hostcp: selector",
              "+ convex subset layer; multidds: per-source gradients, which also give the model's gradient); model and",
              "rest = step - meta - reward; logging = the loop's per-step log work for that step (numpy copies + handing",
              "the arrays to the background part writer), timed after the step.", "",
              "| model | method | step | model and rest | meta | reward | logging | logging % of step |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b in breakdown_rows:
        lines.append(f"| {b['model']} | {b['method']} | {b['step_ms']:.2f} | {b['model_and_rest_ms']:.2f} | "
                     f"{b['meta_ms']:.2f} | {b['reward_ms']:.2f} | {b['logging_ms']:.3f} | "
                     f"{b['logging_pct_of_step']:.1f} % |")
    lines += ["", "### Per-example step log", "",
              f"Whole uniform runs (`valuekit.trainers.base.train`, mlp, batch 64, {log['steps']} steps, "
              f"{log['repeats']} interleaved repeats, median): with the step log {log['with_log_s']:.2f} s, without "
              f"{log['without_log_s']:.2f} s: **{100 * log['overhead']:.1f} %**"
              + (f"; with the old synchronous writer {log['with_sync_log_s']:.2f} s ({100 * log['sync_overhead']:.1f} %)"
                 if "sync_overhead" in log else "") + f". All runs (s): {log['all']}."]
    checks = []
    for (model, m), limit in TARGETS.items():
        hit = frame[(frame.model == model) & (frame.method == m)]
        if len(hit):
            r = hit.iloc[0]
            checks.append({"target": f"{model} {m} <= {limit}x uniform", "measured": f"{r.ratio_vs_uniform:.2f}x "
                           f"(reps {r.ratio_min:.2f}-{r.ratio_max:.2f})",
                           "result": "pass" if r.ratio_vs_uniform <= limit else "FAIL"})
    checks.append({"target": "per-example step log <= 3 % of a uniform run (mlp)",
                   "measured": f"{100 * log['overhead']:.1f} %", "result": "pass" if log["overhead"] <= 0.03 else "FAIL"})
    if layer:
        loaded = [r for r in layer if r["setting"].startswith("loaded, default")][0]
        checks.append({"target": "subset layer n=1024 batch 32 under load, default threads <= 2x its 1-thread time",
                       "measured": f"{loaded['vs_loaded_1_thread']:.2f}x ({loaded['median_ms']:.1f} ms)",
                       "result": "pass" if loaded["vs_loaded_1_thread"] <= 2 else "FAIL"})
    lines += ["", "### Targets (issue 20, CPU)", "", *markdown_table(pd.DataFrame(checks))]
    if layer:
        lines += ["", "### Subset layer under load", "",
                  "Exact `SubsetSelection` (quadratic, lam 0.5, k = n/4), forward + backward at n=1024, batch 32, float64;",
                  f"a child process runs matrix products on {torch_default} threads meanwhile. 'default' is torch's",
                  "thread count a user gets without setting anything; the layer itself solves on one thread",
                  "(`selection._one_cpu_thread`); the last row switches that guard off (the behaviour before).", "",
                  *markdown_table(pd.DataFrame(layer))]
    if threads:
        lines += ["", "### Threads (uniform step, the valuekit default thread policy's evidence)", "",
                  *markdown_table(pd.DataFrame(threads))]
    lines += ["", "### What the speed work changed (issue 20) and what it does to results", "",
              "- lrdi/l2rw/mwnet, one virtual step (the default): `meta_grad=auto` computes the meta-gradient as",
              "  dJ/dw_i = -a/B grad l_i(theta) . grad J(theta') from per-example dot products (the student's own",
              "  forward/backward via `gradients.LayerTape`, or one forward-mode pass when BatchNorm makes rows interact)",
              "  and one backward through the teacher, instead of a double backward through the virtual step. Same",
              "  numbers as the second-order path (tests: equal to float64 rounding, and to central finite differences);",
              "  rows `lrdi[meta_grad=autograd]` etc. time the old path in the same run.",
              "- multidds: per-source gradients by sub-batch (`grad_method=split`) for conv models (`auto`); for",
              "  all-Linear models the vmapped backward stays. Same math without BatchNorm; with BatchNorm each source's",
              "  rows are normalised with their own statistics. `multidds[grad_method=batched]` times the old path.",
              "- Step log: the three logs are written by a background thread (`runlog.AsyncPartWriter`), one Arrow",
              "  conversion per part instead of per step; same files and part numbers (test_speed.py).",
              "- Subset layer: fixed number of vectorised Newton/bisection steps inside an order-statistic bracket, one",
              "  convergence test per solve (bounded fallback + RuntimeWarning), solved on one CPU thread.",
              "- Threads: `--threads N` / `VALUEKIT_THREADS`; default 1 thread for linear/mlp/cnn, idle cores otherwise.",
              "- Unchanged amortisations (already opt-out defaults before this work): dds and hostcp update their",
              "  scorer/selector every 4th step (`update_every`), bads evaluates the dev likelihood every step (its",
              "  cost is the dev rows' forward/backward, (B + B_dev) / B by the algorithm).",
              "- Not measured: CUDA (no GPU in this session; `valuekit bench speed --device cuda` writes speed-gpu.md)."]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / max(1, len(models))
    for j, model in enumerate(models):
        sub = frame[(frame.model == model) & (frame.method != "uniform")]
        ax.bar(np.arange(len(sub)) + width * j, sub.ratio_vs_uniform, width=width, label=model)
        ax.set_xticks(np.arange(len(sub)) + width * (len(models) - 1) / 2, sub.method)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("step time / uniform")
    ax.legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{_stem('speed', device)}.png", dpi=110)
    plt.close(fig)
    lines += ["", f"![speed]({_stem('speed', device)}.png)"]
    frame.attrs = {}
    extra = {"breakdown": pd.DataFrame(breakdown_rows), "layer_under_load": pd.DataFrame(layer),
             "threads": pd.DataFrame(threads)}
    for name, f in extra.items():
        if len(f):
            f.to_csv(out / f"{_stem('speed', device)}_{name}.csv", index=False)
    return _write(out, _stem("speed", device), lines, frame)


# ---------------------------------------------------------------- stream (a user's ResNet on PNG bytes)


def _resnet_block(cin: int, cout: int, stride: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.skip(x) + self.bn2(self.conv2(h)))

    return Block()


def small_resnet(num_classes: int, input_shape) -> "torch.nn.Module":  # noqa: F821
    """The kind of model a user brings (given as a factory): conv(16)-BN-ReLU, residual blocks 16 -> 32 (stride 2)
    -> 64 (stride 2) with BatchNorm, global average pool, linear head."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        _resnet_block(16, 16, 1), _resnet_block(16, 32, 2), _resnet_block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


STREAM_METHODS = ("uniform", "dds", "hostcp", "lrdi", "l2rw", "mwnet", "bads")


def _stream_data(folder: Path, quick: bool) -> tuple[Path, str]:
    """PNG-bytes tables ({bytes, path} layout): full Fashion-MNIST with 60,000 training rows, or digits when quick."""
    from valuekit.datasets import prepare

    if quick:
        prepare("digits", folder, image_format="png", seed=0)
        return folder, "bundled digits as PNG bytes (1,338 training rows, 8x8)"
    # 70,000 images: 9,900 test, 100 dev (10 a class), 60,000 train
    prepare("fashion-mnist", folder, image_format="png", test_fraction=9900 / 70000, seed=0)
    return folder, "Fashion-MNIST as PNG bytes (`valuekit data prepare fashion-mnist --format png`): 60,000 training rows, 28x28"


def _stream_child(data: str, method: str, rows: int, steps: int, batch_size: int, stream: bool) -> dict:
    """One measured run in this (child) process: load the first `rows` training rows, train `steps` steps of
    `method` on small_resnet, report load time, the loop's own step times, RSS after loading and peak RSS."""
    import pyarrow.parquet as pq
    import torch

    from valuekit.datasets import _arrow_image_type, load_table
    from valuekit.trainers.base import TrainConfig, train

    torch.set_num_threads(1)

    def rss(key: str = "VmRSS") -> float:
        # VmHWM (this process's peak) rather than ru_maxrss, which a child inherits from its parent across exec
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))

    t0 = time.perf_counter()
    frame = pq.read_table(Path(data) / "train.parquet").slice(0, rows).to_pandas(types_mapper=_arrow_image_type)
    tr = load_table(frame, stream=stream, name="train")
    del frame
    dv = load_table(Path(data) / "dev.parquet", like=tr, name="dev")
    load_s, rss_loaded = time.perf_counter() - t0, rss()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(method=method, steps=steps, batch_size=batch_size, device="cpu", progress=False,
                          eval_every=steps, checkpoint_every=steps, log_every=steps)
        run = train(tr, dv, out=Path(tmp) / "run", config=cfg, model=small_resnet)
        t = run.metrics()["step_time"].to_numpy()
        values = run.values()
    return {"method": method, "rows": rows, "stream": stream, "load_s": load_s, "rss_after_load_mib": rss_loaded,
            "peak_rss_mib": rss("VmHWM"),
            "median_step_s": float(np.median(t[min(2, len(t) - 1):])), "values_rows": int(len(values))}


def _stream_measure(data: Path, method: str, rows: int, steps: int, batch_size: int, stream: bool) -> dict:
    code = ("import json, sys\nfrom pathlib import Path\nfrom valuekit.bench import _stream_child\n"
            f"print(json.dumps(_stream_child({str(data)!r}, {method!r}, {rows}, {steps}, {batch_size}, {stream})))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"stream benchmark child failed ({method}, {rows} rows): {res.stderr.strip()[-400:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_stream(out: Path, *, command: str, device: str = "cpu", quick: bool = False, methods=None,
                 batch_size: int = 64) -> Path:
    """A user's BatchNorm ResNet (a factory) on PNG-bytes images: step time per method (interleaved in one
    process, streamed rows decoded in each step), and per method and number of rows the peak resident memory
    of a child process that loads the table and trains a few steps, streamed and (uniform) fully decoded."""
    from valuekit.datasets import _arrow_image_type, load_table

    methods = list(methods or (("uniform", "dds") if quick else STREAM_METHODS))
    if "uniform" not in methods:
        methods = ["uniform", *methods]
    with tempfile.TemporaryDirectory() as tmp:
        data, described = _stream_data(Path(tmp) / "data", quick)
        import pyarrow.parquet as pq

        n_all = pq.read_metadata(data / "train.parquet").num_rows
        sizes = [300, n_all] if quick else [10_000, 30_000, 60_000]
        steps, rounds, warmup = (3, 3, 1) if quick else (6, 8, 2)
        # step time: every method in one process, interleaved, on the largest table, streamed
        frame = pq.read_table(data / "train.parquet").to_pandas(types_mapper=_arrow_image_type)
        tr = load_table(frame, stream=True, name="train")
        dv = load_table(data / "dev.parquet", like=tr, name="dev")
        del frame
        times = step_times(tr, dv, methods=methods, model=small_resnet, batch_size=batch_size, steps=rounds,
                           warmup=warmup, device="cpu")
        del tr
        rows = []
        for n in sizes:
            for m in ["uniform"] if quick or n not in (sizes[0], sizes[-1]) else methods:
                rows.append(_stream_measure(data, m, n, steps, batch_size, True))
            rows.append(_stream_measure(data, "uniform", n, steps, batch_size, False))
    frame = pd.DataFrame(rows)
    med = {m: float(np.median(t)) for m, t in times.items()}
    frame["interleaved_step_s"] = frame.method.map(med)
    frame["epoch_min_derived"] = np.ceil(frame.rows / batch_size) * frame.interleaved_step_s / 60
    lines = _header("Stream: a user's BatchNorm ResNet on PNG bytes, time and peak memory vs N", command, device) + [
        f"Data: {described}. Model: `valuekit.bench.small_resnet`, passed to `train(model=...)` as a user's",
        f"factory (3 residual blocks with BatchNorm, linear head). Batch {batch_size}; CPU, one thread per process.",
        "",
        f"Step time: every method in one process on all {sizes[-1]:,} rows (streamed: each step decodes its 64",
        f"PNG rows), {rounds} timed rounds after {warmup} warm-up, methods interleaved step by step; median.",
        "Epoch time is **derived** (ceil(N / batch) x that median step time), not a timed full epoch.",
        f"Memory: peak resident set (VmHWM) of a child process that loads the first N rows and trains",
        f"{steps} steps with the full loop (run directory, values of every row); `after load` is its RSS once the",
        "table is loaded. `streamed`: images kept encoded (`--stream yes`); `decoded`: all pixels in memory.",
        "", "| method | N | rows | step (s, interleaved) | epoch (min, derived) | load (s) | RSS after load (MiB) | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in frame.itertuples():  # step time was measured on streamed rows only
        step = f"{r.interleaved_step_s:.3f} | {r.epoch_min_derived:.1f}" if r.stream else "- | -"
        lines.append(f"| {r.method} | {r.rows:,} | {'streamed' if r.stream else 'decoded'} | {step} | "
                     f"{r.load_s:.1f} | {r.rss_after_load_mib:.0f} | {r.peak_rss_mib:.0f} |")
    return _write(out, _stem("stream", device), lines, frame)


# ---------------------------------------------------------------- layer


def bench_layer(out: Path, *, command: str, device: str = "cpu", quick: bool = False) -> Path:
    """Subset-selection layer: exact backend vs cvxpylayers, forward+backward time and max differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from valuekit.selection import benchmark_layer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if quick:
            rows = benchmark_layer(ns=(64,), batches=(1, 4), reps=1, device=device)
        else:
            rows = benchmark_layer(ns=(64, 256, 1024), batches=(1, 32), reps=3, device=device)
    finally:
        torch.set_num_threads(threads)
    frame = pd.DataFrame(rows)
    lines = _header("Subset-selection layer: exact backend vs cvxpylayers", command, device) + [
        "Forward + backward of `SubsetSelection` (quadratic regulariser, float64, 1 torch thread), median over",
        "repetitions; ratio = cvxpylayers time / exact time; differences are max abs over solutions and over",
        "vector-Jacobian products with a random upstream gradient.", "",
        *markdown_table(frame),
    ]
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3))
    for b, sub in frame.groupby("batch"):
        ax.plot(sub["n"], sub["ratio"], marker="o", label=f"batch {b}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("cvxpylayers / exact time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{_stem('layer', device)}.png", dpi=110)
    plt.close(fig)
    lines += ["", f"![layer]({_stem('layer', device)}.png)"]
    return _write(out, _stem("layer", device), lines, frame)


# ---------------------------------------------------------------- scale


def synthetic_step_log(run_dir: Path, *, rows: int, n: int = 20000, batch: int = 64, seed: int = 0) -> Path:
    """A run directory with `rows` step rows written with the run-log schemas (no training), plus its table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from valuekit.runlog import METRICS_SCHEMA, SCHEMA_VERSION, steps_schema, values_schema, write_json_atomic

    rng = np.random.default_rng(seed)
    run_dir = Path(run_dir)
    for sub in ("steps", "metrics"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, 10, n)
    noisy = rng.random(n) < 0.2
    table = pd.DataFrame({"id": np.arange(n), "label": labels.astype(str), "is_noisy": noisy})
    for j in range(8):
        table[f"f{j}"] = rng.normal(size=n).astype(np.float32)
    table_path = run_dir.parent / f"{run_dir.name}-table.parquet"
    table.to_parquet(table_path, index=False)
    meta = {b"valuekit.schema_version": str(SCHEMA_VERSION).encode(), b"valuekit.run_id": b"synthetic"}
    steps = rows // batch
    per_part = max(1, 1_000_000 // batch)
    for part, s0 in enumerate(range(0, steps, per_part)):
        s = np.arange(s0, min(steps, s0 + per_part))
        m = len(s) * batch
        ex = rng.integers(0, n, m)
        w = np.where(noisy[ex], 0.5, 1.2) + rng.normal(0, 0.2, m)
        cols = [pa.array(np.repeat(s + 1, batch)), pa.array(ex), pa.array(labels[ex].astype(np.int32)),
                pa.nulls(m, pa.string()), pa.array(w.astype(np.float32)), pa.array(rng.normal(size=m).astype(np.float32)),
                pa.array(rng.exponential(size=m).astype(np.float32)), pa.nulls(m, pa.bool_())]
        t = pa.Table.from_arrays(cols, schema=steps_schema("int64").with_metadata(meta))
        pq.write_table(t, run_dir / "steps" / f"part-{part:05d}.parquet")
    ms = np.arange(1, steps + 1)
    mt = pa.table({"step": ms, "train_loss": np.exp(-ms / steps), "train_acc": 1 - np.exp(-ms / steps),
                   "dev_loss": np.where(ms % 100 == 0, np.exp(-ms / steps), np.nan),
                   "dev_acc": np.where(ms % 100 == 0, 1 - np.exp(-ms / steps), np.nan),
                   "test_loss": np.full(steps, np.nan), "test_acc": np.full(steps, np.nan),
                   "scorer_loss": np.full(steps, np.nan), "meta_loss": np.full(steps, np.nan),
                   "step_time": np.full(steps, 1e-3), "wall_time": ms * 1e-3,
                   "cuda_mem_mb": np.full(steps, np.nan)},
                  schema=METRICS_SCHEMA)
    pq.write_table(mt, run_dir / "metrics" / "part-00000.parquet")
    value = np.where(noisy, -1.0, 1.0) + rng.normal(0, 0.5, n)
    order = np.argsort(-value, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    vt = pa.table({"example_id": np.arange(n), "value": value, "value_std": np.abs(rng.normal(size=n)),
                   "weight": np.ones(n), "rank": rank}, schema=values_schema("int64"))
    pq.write_table(vt, run_dir / VALUES)
    write_json_atomic({
        "schema_version": SCHEMA_VERSION, "name": run_dir.name, "method": "uniform", "status": "completed",
        "config": {"model": "mlp", "steps": steps, "batch_size": batch}, "method_config": {}, "seed": seed,
        "data": {"train": {"path": str(table_path), "n_rows": n}, "dev": None, "test": None},
        "classes": [str(c) for c in range(10)], "sources": [], "id_type": "int64", "image_shape": None,
        "steps_done": steps, "device": "cpu", "run_id": "synthetic",
    }, run_dir / RUN_JSON)
    return table_path


def _run_measured(cmd: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB, return code) of a child process."""
    code = ("import resource, subprocess, sys, time, json\n"
            "t0 = time.perf_counter()\n"
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode\n"
            "dt = time.perf_counter() - t0\n"
            "print(json.dumps([dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc]))\n")
    res = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True)
    dt, rss, rc = json.loads(res.stdout.strip().splitlines()[-1])
    return dt, rss, rc


class _SyncPartWriter:
    """The synchronous writer used before AsyncPartWriter (Arrow conversion per step, parts written in the
    loop), for the before/after row of the step-log cost."""

    def __init__(self, *args, **kwargs):
        from valuekit.runlog import PartWriter

        self._w = PartWriter(*args)

    def __getattr__(self, name):
        return getattr(self._w, name)

    def sync(self):
        pass

    def close(self):
        self._w.flush()


def logging_overhead(*, steps: int, repeats: int, device: str = "cpu", sync_writer: bool = False) -> dict:
    """Median wall time of a uniform run with and without the per-example step log (interleaved repeats);
    `sync_writer` also times runs with the old synchronous part writer (`with_sync_log_s`)."""
    import valuekit.runlog as runlog
    from valuekit.datasets import load_table
    from valuekit.trainers.base import TrainConfig, train

    tr = load_table(BUNDLED / "train.parquet")
    dv = load_table(BUNDLED / "dev.parquet", like=tr, name="dev")
    kinds = ("log", "nolog", "synclog") if sync_writer else ("log", "nolog")
    times = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for kind in kinds:
                cfg = TrainConfig(steps=steps, batch_size=64, device=device, progress=False, eval_every=steps,
                                  log_steps=kind != "nolog")
                saved = runlog.AsyncPartWriter
                if kind == "synclog":
                    runlog.AsyncPartWriter = _SyncPartWriter
                try:
                    t0 = time.perf_counter()
                    train(tr, dv, out=Path(tmp) / f"r{r}-{kind}", config=cfg)
                    times[kind].append(time.perf_counter() - t0)
                finally:
                    runlog.AsyncPartWriter = saved
    on, off = float(np.median(times["log"])), float(np.median(times["nolog"]))
    out = {"steps": steps, "with_log_s": on, "without_log_s": off, "overhead": on / off - 1.0,
           "repeats": repeats, "all": {k: [round(t, 3) for t in v] for k, v in times.items()}}
    if sync_writer:
        out["with_sync_log_s"] = float(np.median(times["synclog"]))
        out["sync_overhead"] = out["with_sync_log_s"] / off - 1.0
    return out


def bench_scale(out: Path, *, command: str, device: str = "cpu", quick: bool = False) -> Path:
    """Logging overhead, report time/memory on a big synthetic step log, score export rows/s."""
    log = logging_overhead(steps=200 if quick else 2000, repeats=1 if quick else 3, device=device)
    report_rows = 200_000 if quick else 10_000_000
    export_rows = 100_000 if quick else 10_000_000
    rows = [{"what": "uniform run, per-example step log on vs off", "size": f"{log['steps']} steps x 64",
             "seconds": log["with_log_s"], "peak_rss_mib": float("nan"),
             "note": f"off: {log['without_log_s']:.2f} s, overhead {100 * log['overhead']:.1f} %"}]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = tmp / "big"
        synthetic_step_log(run_dir, rows=report_rows)
        dt, rss, rc = _run_measured([sys.executable, "-m", "valuekit.cli", "report", str(run_dir), "-o",
                                     str(tmp / "report.html")])
        rows.append({"what": "valuekit report on a synthetic run", "size": f"{report_rows:,} step rows",
                     "seconds": dt, "peak_rss_mib": rss, "note": "ok" if rc == 0 else f"exit code {rc}"})
        table = tmp / "wide.parquet"
        _synthetic_wide_table(table, export_rows, cols=50)
        vdir = tmp / "values-run"
        _values_only_run(vdir, export_rows)
        dt, rss, rc = _run_measured([sys.executable, "-m", "valuekit.cli", "score", str(table), "--run", str(vdir),
                                     "-o", str(tmp / "scored.parquet"), "--keep-fraction", "0.5"])
        rows.append({"what": "valuekit score (streaming export)", "size": f"{export_rows:,} rows x 50 columns",
                     "seconds": dt, "peak_rss_mib": rss,
                     "note": (f"{export_rows / dt:,.0f} rows/s" if rc == 0 else f"exit code {rc}")})
    frame = pd.DataFrame(rows)
    lines = _header("Scale: logging overhead, report and export on large inputs", command, device) + [
        "Report and export are timed as child processes (wall time including Python start-up; peak RSS from",
        "getrusage of the children). Report target: <= 20 s and <= 1.5 GB on 10M step rows.", "",
        "| what | size | seconds | peak RSS (MiB) | note |", "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['what']} | {r['size']} | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} | {r['note']} |" for r in rows]
    return _write(out, _stem("scale", device), lines, frame)


def _synthetic_wide_table(path: Path, rows: int, *, cols: int, chunk: int = 500_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.int64())] + [(f"c{j}", pa.float32()) for j in range(cols - 1)])
    with pq.ParquetWriter(path, schema) as w:
        for s in range(0, rows, chunk):
            m = min(chunk, rows - s)
            arrays = [pa.array(np.arange(s, s + m))] + [pa.array(rng.random(m, dtype=np.float32)) for _ in range(cols - 1)]
            w.write_table(pa.Table.from_arrays(arrays, schema=schema))


def _values_only_run(run_dir: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from valuekit.runlog import SCHEMA_VERSION, values_schema, write_json_atomic

    run_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    value = rng.normal(size=rows)
    rank = np.empty(rows, dtype=np.int64)
    rank[np.argsort(-value, kind="stable")] = np.arange(1, rows + 1)
    pq.write_table(pa.table({"example_id": np.arange(rows), "value": value, "value_std": np.zeros(rows),
                             "weight": np.ones(rows), "rank": rank}, schema=values_schema("int64")),
                   run_dir / VALUES)
    write_json_atomic({"schema_version": SCHEMA_VERSION, "name": run_dir.name, "method": "uniform",
                       "status": "completed", "id_type": "int64", "data": {}, "config": {}}, run_dir / RUN_JSON)


# ---------------------------------------------------------------- quality


def bench_quality(out: Path, **kw) -> Path:
    """Values worth trusting: every method vs its own run's signals, the subset test and the peers
    (valuekit.quality)."""
    from valuekit.quality import bench_quality as run

    return run(out, **kw)


# ---------------------------------------------------------------- entry


KINDS = ("speed", "layer", "quality", "scale", "stream")


def run_bench(kind: str, out, *, device: str = "auto", quick: bool = False, argv: list[str] | None = None,
              seeds: str | None = None, steps: int | None = None, datasets: str | None = None,
              methods: str | None = None, settings: str | None = None, runs_dir: str | None = None) -> Path:
    """Run one benchmark or study suite (valuekit.suites) and return the markdown file it wrote (list options
    are comma-separated strings)."""
    from valuekit.suites import SUITES, run_suite
    from valuekit.trainers.base import resolve_device

    if kind not in KINDS and kind not in SUITES:
        raise InputError(f"unknown benchmark {kind!r}; choose from {', '.join([*KINDS, *SUITES])}")
    dev = str(resolve_device(device))
    command = "valuekit bench " + " ".join(shlex.quote(a) for a in (argv or [kind] + (["--quick"] if quick else [])))
    out = Path(out)
    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip()) if text else None  # noqa: E731
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps}: must be >= 1")
    try:
        seed_list = tuple(int(s) for s in split(seeds)) if seeds else None
    except ValueError:
        raise InputError(f"--seeds {seeds!r}: expected integers like 0,1,2") from None
    if kind in SUITES:
        return run_suite(kind, out, command=command, device=dev, quick=quick, seeds=seed_list, steps=steps,
                         datasets=split(datasets))
    if kind == "speed":
        return bench_speed(out, command=command, device=dev, quick=quick, methods=split(methods))
    if kind == "layer":
        return bench_layer(out, command=command, device=dev, quick=quick)
    if kind == "scale":
        return bench_scale(out, command=command, device=dev, quick=quick)
    if kind == "stream":
        return bench_stream(out, command=command, device=dev, quick=quick, methods=split(methods))
    from valuekit.quality import SETTINGS

    bad = [s for s in split(settings) or () if s not in SETTINGS]
    if bad:
        raise InputError(f"--settings {bad[0]!r}: choose from {', '.join(SETTINGS)}")
    return bench_quality(out, command=command, device=dev, quick=quick, datasets=split(datasets), seeds=seed_list,
                         methods=split(methods), steps=steps, settings=split(settings), runs_dir=runs_dir)


def write_index(out: Path) -> Path:
    """OUT/BENCHMARKS.md: the latest benchmark files found in OUT, CPU ones and GPU ones (never edited by hand)."""
    out = Path(out)
    lines = ["# Benchmarks", "", "Generated by `valuekit bench`; each section is the latest run of that benchmark",
             "(its own command line, machine and date are in the section). Do not edit numbers here by hand:",
             "re-run the command instead.", ""]
    for kind in KINDS:
        for suffix, title in (("", "CPU"), ("-gpu", "GPU")):
            md = out / f"{kind}{suffix}.md"
            if md.exists():
                body = md.read_text().splitlines()
                lines += [f"## {kind} ({title})", "", *[f"#{line}" if line.startswith("#") else line for line in body[1:]], ""]
    if not any((out / f"{k}-gpu.md").exists() for k in KINDS):
        lines += ["## GPU", "", "No GPU results yet: `valuekit bench all --device cuda -o reports/` on a CUDA machine",
                  "writes them (this project's CI has no GPU).", ""]
    path = out / "BENCHMARKS.md"
    write_text_atomic("\n".join(lines) + "\n", path)
    return path
