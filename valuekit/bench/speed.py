"""`valuekit bench speed`: step time of each method next to uniform on the same model, batch and data, with
a breakdown, peak memory, the step log's cost, the subset layer under load and the thread table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.bench.common import SPEED_METHODS, bench_tables, header, logging_overhead, markdown_table, stem, write
from valuekit.bench.layer import layer_under_load

#: the models of `bench speed`: name -> (image side, batch size)
SPEED_MODELS = {"mlp": (8, 64), "cnn": (8, 64), "resnet": (28, 128)}
#: timed resnet steps per repetition: a multiple of 4, so dds (scorer every 4th step) and multidds (scorer every
#: 2nd step at batch 128) have the same share of update steps in every window (5 made their medians flip)
RESNET_STEPS = 16
TOY_STEPS = 40  # timed mlp/cnn steps per repetition
#: the speed targets' ratios (model, method) -> most step time / uniform's
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


def _log_like_loop(writer, view, step: int, idx_cpu, rec, log_every: int = 200) -> None:
    """The per-step logging work of the training loop (trainers/base.py) for one StepRecord."""
    idx_np = idx_cpu.numpy()
    loss_np = rec.loss.detach().float().cpu().numpy()
    weight_np = None if rec.weight is None else rec.weight.detach().float().cpu().numpy()
    writer.steps.add(step=step, rows=idx_np, weight=weight_np,
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
    from valuekit.training.method import method_spec
    from valuekit.training.options import parse_overrides

    name, _, rest = spec.partition("[")
    if not rest:
        return name, {}
    method_vals, _ = parse_overrides([kv for kv in rest.rstrip("]").split(";") if kv], method_spec(name).Config)
    return name, method_vals


#: earlier settings timed next to the defaults, so that the speed table shows before -> after in one run
BEFORE = {"lrdi": "lrdi[meta_grad=autograd]", "l2rw": "l2rw[meta_grad=autograd]", "mwnet": "mwnet[meta_every=1]",
          "multidds": "multidds[update_every=256]", "bads": "bads[dev_every=1]"}


def step_times(train_data, dev_data, *, methods, model: str, batch_size: int, steps: int, warmup: int,
               device: str = "cpu", seed: int = 0, reps: int = 1, breakdown: bool = False):
    """Seconds per step of each method, interleaved round by round in one process, warm-up excluded.

    Returns {method: array of shape (reps, steps)}; with `breakdown` also {method: {section: array}} where
    the sections are `meta`, `reward` (SECTIONS) and `logging` (the loop's per-step log work, timed apart
    from the step, into a real run directory)."""
    from valuekit.config import TrainConfig
    from valuekit.runs.writer import RunWriter
    from valuekit.training.context import Batch
    from valuekit.training.loop import make_trainer

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
            writers[m] = RunWriter(Path(tmp.name) / m, meta={"method": m}, id_type=train_data.id_type,
                                   rows={"example_id": train_data.ids, "label": train_data.y.numpy().astype(np.int32),
                                         "source": train_data.source})
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
        "from valuekit.bench.common import bench_tables, step_times\n"
        f"tr, dv = bench_tables({str(data_dir) if data_dir else None!r}, side={side})\n"
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

def thread_table(tr_small, dv_small, tr_big, dv_big, *, steps: int, threads: int) -> list[dict]:
    """Uniform's median step of each bench model at 1 thread and at `threads` (torch's default), interleaved."""
    import torch

    rows = []
    before = torch.get_num_threads()
    try:
        for model, (side, bs) in SPEED_MODELS.items():
            tr, dv = (tr_big, dv_big) if side != 8 else (tr_small, dv_small)
            from valuekit.config import TrainConfig
            from valuekit.training.context import Batch
            from valuekit.training.loop import make_trainer

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


def _speed_rows(tables: dict, *, models, methods, data_dir, quick: bool, reps: int, device: str,
                memory: bool) -> tuple[list[dict], list[dict]]:
    """Per (model, method): the step-time row and the breakdown row of `bench speed`."""
    rows, breakdown_rows = [], []
    for model in models:
        side, batch_size = SPEED_MODELS[model]
        if side not in tables:
            tables[side] = bench_tables(data_dir, side=side)
        tr, dv = tables[side]
        if quick:
            steps, warmup = 12, 3
        else:
            steps, warmup = (RESNET_STEPS, 2) if side != 8 else (TOY_STEPS, 5)
        before = (
            []
            if quick
            else [BEFORE[m] for m in methods if m in BEFORE and (side == 8 or m in ("lrdi", "multidds", "bads"))]
        )
        times, parts = step_times(tr, dv, methods=["uniform", *methods, *before], model=model, batch_size=batch_size,
                                  steps=steps, warmup=warmup, device=device, reps=reps, breakdown=True)
        rep_med = {m: np.median(t, axis=1) for m, t in times.items()}  # (reps,)
        base = float(np.median(rep_med["uniform"]))
        base_mean = float(np.mean(times["uniform"]))
        for m, t in times.items():
            med = float(np.median(rep_med[m]))
            rep_ratio = rep_med[m] / rep_med["uniform"]
            rows.append(
                {
                    "model": model,
                    "batch": batch_size,
                    "method": m,
                    "median_step_ms": 1e3 * med,
                    "p90_step_ms": 1e3 * float(np.quantile(t, 0.9)),
                    "ratio_vs_uniform": med / base,
                    "ratio_min": float(rep_ratio.min()),
                    "ratio_max": float(rep_ratio.max()),
                    "mean_step_ms": 1e3 * float(np.mean(t)),
                    "mean_ratio_vs_uniform": float(np.mean(t)) / base_mean,
                    "steps_per_s": 1.0 / med,
                    "steps_timed": int(t.size),
                    "reps": reps,
                    "peak_mem_mib": float("nan")
                    if quick or not memory or "[" in m or side != 8
                    else _peak_memory(m, model, batch_size, 10 if side != 8 else 30, device, data_dir, side),
                }
            )
            meta = 1e3 * float(np.median(parts[m]["meta"]))
            reward = 1e3 * float(np.median(parts[m]["reward"]))
            logging = 1e3 * float(np.median(parts[m]["logging"]))
            total = 1e3 * float(np.median(t))
            breakdown_rows.append({"model": model, "method": m, "step_ms": total,
                                   "model_and_rest_ms": total - meta - reward, "meta_ms": meta,
                                   "reward_ms": reward, "logging_ms": logging,
                                   "logging_pct_of_step": 100 * logging / total})
    return rows, breakdown_rows


def _speed_intro(command: str, device: str, *, quick: bool, reps: int, load_before: float,
                 load_after: float) -> list[str]:
    """Header and the paragraph that says what was measured and how."""
    mem_kind = "CUDA max allocated" if device.startswith("cuda") else "peak RSS of a child process (1 thread)"
    return header("Speed: step time of each method relative to uniform", command, device) + [
        f"Load average (1 min) of the machine: {load_before:.1f} before, {load_after:.1f} after the step timings "
        f"(other processes share these cores, so absolute times are noisy; ratios are interleaved).",
        "",
        "Data: bundled digits-noisy20 (1,338 rows, 8x8) with 3 sources; mlp and cnn at batch 64 on 8x8, resnet",
        "(a small residual CNN with BatchNorm, `valuekit.models.builtin.resnet_body`, random init) at batch 128 on the",
        f"same images resized to 28x28. {reps} repetition(s) of interleaved timed steps per model (mlp/cnn: "
        f"{TOY_STEPS if not quick else 12} steps, resnet: {RESNET_STEPS if not quick else 12}",
        "steps per repetition, after warm-up), methods interleaved step by step in one process (the order rotates",
        "every round). Median step = median over repetitions of each repetition's median; ratio = that / uniform's;",
        f"min-max = the range of the per-repetition ratios. Memory: {mem_kind} (resnet: not measured; "
        f"`memory=False`, the default, skips it: one child process per method costs minutes on a loaded machine).",
        "Mean-step ratio = the mean of all timed steps / uniform's: what a run pays, scorer-update steps included",
        "(the issue's targets are stated on the median).",
        "",
        "| model | method | median step (ms) | ratio vs uniform | ratio min-max | p90 (ms) | steps/s | peak memory "
        "(MiB) | mean-step ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]


def _speed_tables(rows: list[dict], breakdown_rows: list[dict], log: dict) -> list[str]:
    """The step-time table, the breakdown table and the step-log paragraph."""
    lines = []
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['median_step_ms']:.2f} | {r['ratio_vs_uniform']:.2f}x | "
                     f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['p90_step_ms']:.2f} | {r['steps_per_s']:.0f} | "
                     f"{r['peak_mem_mib']:.0f} | {r['mean_ratio_vs_uniform']:.2f}x |")
    lines += [
        "",
        "### Breakdown (median ms per step)",
        "",
        "meta = the method's meta/scorer/teacher work (dds: scorer forward + its optimizer step; hostcp: look-ahead",
        "meta-gradient + selector step; lrdi/mwnet/l2rw: the meta-gradient (virtual step, dev loss, backward to",
        "the teacher, which includes the one student forward they share with the real step) + teacher step;",
        "multidds: scorer update); reward = per-example/per-source reward work (dds: fused dots; hostcp: selector",
        "+ convex subset layer; multidds: per-source gradients, which also give the model's gradient); model and",
        "rest = step - meta - reward; logging = the loop's per-step log work for that step (numpy copies + handing",
        "the arrays to the background part writer), timed after the step.",
        "",
        "| model | method | step | model and rest | meta | reward | logging | logging % of step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in breakdown_rows:
        lines.append(f"| {b['model']} | {b['method']} | {b['step_ms']:.2f} | {b['model_and_rest_ms']:.2f} | "
                     f"{b['meta_ms']:.2f} | {b['reward_ms']:.2f} | {b['logging_ms']:.3f} | "
                     f"{b['logging_pct_of_step']:.1f} % |")
    lines += [
        "",
        "### Per-example step log",
        "",
        f"Whole uniform runs (`valuekit.training.loop.train`, mlp, batch 64, {log['steps']} steps, "
        f"{log['repeats']} interleaved repeats): the median of each repeat's logged / unlogged wall time "
        f"(the two runs back to back) **{100 * log['overhead_paired']:.1f} %**, of their process CPU time "
        f"{100 * log['cpu_overhead_paired']:.1f} %; fastest run with the step log {log['with_log_s']:.2f} s, "
        f"without {log['without_log_s']:.2f} s: {100 * log['overhead']:.1f} % (medians "
        f"{log['with_log_median_s']:.2f} / {log['without_log_median_s']:.2f} s: "
        f"{100 * log['overhead_median']:.1f} %)"
        + (
            f"; with the old synchronous writer {log['with_sync_log_s']:.2f} s ({100 * log['sync_overhead']:.1f} %)"
            if "sync_overhead" in log
            else ""
        )
        + ". The step log's own CPU time (the loop's `add` calls and "
        f"the writer thread, `time.thread_time`) is {100 * log['log_cpu_share']:.1f} % of a logged run's wall "
        f"time (median). All runs (s): {log['all']}.",
    ]
    return lines


def _speed_checks(frame: pd.DataFrame, log: dict, layer: list[dict]) -> list[dict]:
    """Issue 20's targets, each with the measured value and pass/FAIL."""
    checks = []
    for (model, m), limit in TARGETS.items():
        hit = frame[(frame.model == model) & (frame.method == m)]
        if len(hit):
            r = hit.iloc[0]
            checks.append({"target": f"{model} {m} <= {limit}x uniform", "measured": f"{r.ratio_vs_uniform:.2f}x "
                           f"(reps {r.ratio_min:.2f}-{r.ratio_max:.2f}; mean step {r.mean_ratio_vs_uniform:.2f}x)",
                           "result": "pass" if r.ratio_vs_uniform <= limit else "FAIL"})
    checks.append(
        {
            "target": "per-example step log <= 3 % of a uniform run (mlp)",
            "measured": f"{100 * log['overhead_paired']:.1f} % (median of {log['repeats']} back-to-back pairs; "
            f"fastest runs {100 * log['overhead']:.1f} %, medians {100 * log['overhead_median']:.1f} %, "
            f"process CPU time {100 * log['cpu_overhead_paired']:.1f} %; own CPU "
            f"{100 * log['log_cpu_share']:.1f} %)",
            "result": "pass" if log["overhead_paired"] <= 0.03 else "FAIL",
        }
    )
    if layer:
        loaded = [r for r in layer if r["setting"].startswith("loaded, default")][0]
        checks.append({"target": "subset layer n=1024 batch 32 under load, default threads <= 2x its 1-thread time",
                       "measured": f"{loaded['vs_loaded_1_thread']:.2f}x ({loaded['median_ms']:.1f} ms)",
                       "result": "pass" if loaded["vs_loaded_1_thread"] <= 2 else "FAIL"})
    return checks


def _speed_layer_and_threads(layer: list[dict], threads: list[dict], torch_default: int) -> list[str]:
    """The subset-layer-under-load and thread tables (empty where not measured)."""
    lines = []
    if layer:
        lines += [
            "",
            "### Subset layer under load",
            "",
            "Exact `SubsetSelection` (quadratic, lam 0.5, k = n/4), forward + backward at n=1024, batch 32, float64;",
            f"a child process runs matrix products on {torch_default} threads meanwhile. 'default' is torch's",
            "thread count a user gets without setting anything; the layer itself solves on one thread",
            "(`selection._one_cpu_thread`); the last row switches that guard off (the behaviour before).",
            "",
            *markdown_table(pd.DataFrame(layer)),
        ]
    if threads:
        lines += ["", "### Threads (uniform step, the valuekit default thread policy's evidence)", "",
                  *markdown_table(pd.DataFrame(threads))]
    return lines


def _speed_notes() -> list[str]:
    """What the speed work changed and what it does to results (static text)."""
    return [
        "",
        "### What the speed work changed and what it does to results",
        "",
        "- lrdi/l2rw/mwnet, one virtual step (the default): `meta_grad=auto` computes the meta-gradient as",
        "  dJ/dw_i = -a/B grad l_i(theta) . grad J(theta') from per-example dot products (the student's own",
        "  forward/backward via `gradients.LayerTape`, or one forward-mode pass when BatchNorm makes rows interact)",
        "  and one backward through the teacher, instead of a double backward through the virtual step. Same",
        "  numbers as the second-order path (tests: equal to float64 rounding, and to central finite differences);",
        "  rows `lrdi[meta_grad=autograd]` etc. time the old path in the same run.",
        "- multidds: per-source gradients by sub-batch (`grad_method=split`) for conv models (`auto`); for",
        "  all-Linear models the vmapped backward stays. Same math without BatchNorm; with BatchNorm each source's",
        "  rows are normalised with their own statistics (`reward_from=train`; the default probe path draws its",
        "  own batches per source).",
        "- Step log: the three logs are written by a background thread (`runlog.AsyncPartWriter`), one Arrow",
        "  conversion per part instead of per step; same files and part numbers (test_speed.py). The loop hands",
        "  over each step's row numbers; the thread looks up example_id / label / source with one Arrow take",
        "  per part, and a part is closed every 200 steps (`log_every`, was 50).",
        "- Subset layer: fixed number of vectorised Newton/bisection steps inside an order-statistic bracket, one",
        "  convergence test per solve (bounded fallback + RuntimeWarning), solved on one CPU thread.",
        "- Threads: `--threads N` / `VALUEKIT_THREADS`; default 1 thread for linear/mlp/cnn, idle cores otherwise.",
        "- Amortisations (opt-out defaults): dds and hostcp update their scorer/selector every 4th step",
        "  (`update_every`); bads adds the dev likelihood every 8th step, scaled by 8 (`dev_every`; with BatchNorm,",
        "  and on causal-LM tables, train and dev rows go through the model in two forwards, not one); mwnet's",
        "  teacher takes its meta step every 4th step (`meta_every`); multidds updates its scorer (dev gradient",
        "  and probe batches) every 1024 training examples (`update_every`, was 256: `multidds[update_every=256]`);",
        "  each measured against the earlier setting in reports/suite-bads-dev-every.md,",
        "  reports/suite-lrdi-meta-every.md and reports/suite-multidds-update-every.md. lrdi and l2rw run every step.",
        "- Not measured: CUDA (no GPU in this session; `valuekit bench speed --device cuda` writes speed-gpu.md).",
    ]


def _speed_figure(out: Path, frame: pd.DataFrame, models, device: str) -> list[str]:
    """Bar chart of step time / uniform per model; returns the markdown line that shows it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(out / f"{stem('speed', device)}.png", dpi=110)
    plt.close(fig)
    return ["", f"![speed]({stem('speed', device)}.png)"]


def bench_speed(out: Path, *, command: str, device: str = "cpu", quick: bool = False, methods=None,
                models=None, data_dir=None, reps: int | None = None, memory: bool = False) -> Path:
    """Median step time of each method / uniform on the same model, batch and data, with a breakdown, plus
    peak memory, the step log's cost, the subset layer under load and the thread table."""
    from valuekit.config import available_methods

    have = set(available_methods())
    methods = [m for m in (methods or SPEED_METHODS) if m in have]
    models = list(models or (("mlp",) if quick else SPEED_MODELS))
    reps = reps or (1 if quick else 3)
    torch_default = int(os.environ.get("VALUEKIT_BENCH_DEFAULT_THREADS", 0)) or (os.cpu_count() or 1)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    tables = {}
    rows, breakdown_rows = _speed_rows(tables, models=models, methods=methods, data_dir=data_dir, quick=quick,
                                       reps=reps, device=device, memory=memory)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    frame = pd.DataFrame(rows)
    log = logging_overhead(steps=200 if quick else 2000, repeats=1 if quick else 15, device=device,
                           sync_writer=not quick)
    layer = layer_under_load(reps=3 if quick else 9, default_threads=torch_default) if device == "cpu" else []
    threads = [] if quick or device != "cpu" else thread_table(*tables.get(8, bench_tables(data_dir)),
                                                                 *tables.get(28, bench_tables(data_dir, side=28)),
                                                                 steps=6, threads=torch_default)
    lines = _speed_intro(command, device, quick=quick, reps=reps, load_before=load_before, load_after=load_after)
    lines += _speed_tables(rows, breakdown_rows, log)
    lines += ["", "### Targets (CPU)", "", *markdown_table(pd.DataFrame(_speed_checks(frame, log, layer)))]
    lines += _speed_layer_and_threads(layer, threads, torch_default)
    lines += _speed_notes()
    lines += _speed_figure(out, frame, models, device)
    frame.attrs = {}
    extra = {"breakdown": pd.DataFrame(breakdown_rows), "layer_under_load": pd.DataFrame(layer),
             "threads": pd.DataFrame(threads)}
    for name, f in extra.items():
        if len(f):
            f.to_csv(out / f"{stem('speed', device)}_{name}.csv", index=False)
    return write(out, stem("speed", device), lines, frame)
