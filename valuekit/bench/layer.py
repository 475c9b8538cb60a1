"""Micro-benchmarks of building blocks: the subset-selection layer (`valuekit bench layer`, and under load
for `bench speed`) and the per-example gradient dot methods."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from valuekit.bench.common import header, markdown_table, stem, write
from valuekit.ops.gradients import DOT_METHODS, LossFn, VectorLike, mean_gradient, per_example_dots
from valuekit.ops.losses import per_example_loss
from valuekit.ops.selection import SubsetSelection


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

    import valuekit.ops.selection as sel

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
                          ("loaded, 1 thread", "busy child on every core", res["one"]),
                          (f"loaded, default ({cores} threads)", "busy child on every core", res["default"]),
                          (f"loaded, {cores} threads, no one-thread guard (before)", "busy child on every core",
                           res["noguard"])):
        med = float(np.median(t))
        rows.append({"setting": name, "load": what, "n": n, "batch": batch, "reg": reg,
                     "median_ms": 1e3 * med, "vs_loaded_1_thread": med / one, "reps": len(t)})
    return rows


def bench_layer(out: Path, *, command: str, device: str = "cpu", quick: bool = False) -> Path:
    """Subset-selection layer: exact backend vs cvxpylayers, forward+backward time and max differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    lines = header("Subset-selection layer: exact backend vs cvxpylayers", command, device) + [
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
    fig.savefig(out / f"{stem('layer', device)}.png", dpi=110)
    plt.close(fig)
    lines += ["", f"![layer]({stem('layer', device)}.png)"]
    return write(out, stem("layer", device), lines, frame)


# ---------------------------------------------------------------------------
def benchmark_layer(
    ns=(64, 256, 1024),
    batches=(1, 32),
    reps: int = 3,
    device: str = "cpu",
    *,
    reg: str = "quadratic",
    lam: float = 0.5,
    fraction: float = 0.25,
    max_seconds: float = 60.0,
    seed: int = 0,
) -> list[dict]:
    """Time forward+backward of the cvxpylayers and exact backends; compare their results.

    For each (n, batch): float64 scores ~ N(0, 1) on ``device``, ``k = fraction * n``,
    a random upstream gradient; the time of ``w = layer(s); w.backward(g)`` is the
    median over ``reps`` runs (the cvxpy problem is built/canonicalised before timing;
    the exact backend gets one untimed warm-up run).  If one cvxpylayers run takes
    longer than ``max_seconds`` it is not repeated, and the configurations with both a
    larger-or-equal n and batch are skipped (``skipped`` says why).

    Returns one dict per configuration: ``n``, ``batch``, ``reg``, ``device``,
    ``exact_s``, ``cvxpylayers_s`` (seconds, median), ``ratio``
    (cvxpylayers_s / exact_s), ``max_abs_diff_w``, ``max_abs_diff_grad``,
    ``cvxpylayers_reps``, ``skipped`` (None or a reason).
    """
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run(layer, s, g):
        sync()
        t0 = time.perf_counter()
        x = s.detach().clone().requires_grad_(True)
        w = layer(x)
        w.backward(g)
        sync()
        return time.perf_counter() - t0, w.detach(), x.grad.detach()

    rows: list[dict] = []
    too_slow: list[tuple[int, int]] = []
    gen = torch.Generator().manual_seed(seed)
    for n in ns:
        exact = SubsetSelection(fraction=fraction, reg=reg, lam=lam, backend="exact")
        ref = SubsetSelection(fraction=fraction, reg=reg, lam=lam, backend="cvxpylayers")
        for batch in batches:
            row: dict[str, Any] = {"n": n, "batch": batch, "reg": reg, "device": str(dev)}
            s = torch.randn(batch, n, generator=gen, dtype=torch.float64).to(dev)
            g = torch.randn(batch, n, generator=gen, dtype=torch.float64).to(dev)
            run(exact, s, g)  # warm-up
            ex = [run(exact, s, g) for _ in range(reps)]
            row["exact_s"] = statistics.median(t for t, _, _ in ex)
            _, w_ex, g_ex = ex[-1]
            slower_than = [c for c in too_slow if n >= c[0] and batch >= c[1]]
            if slower_than:
                row.update(cvxpylayers_s=None, ratio=None, max_abs_diff_w=None, max_abs_diff_grad=None,
                           cvxpylayers_reps=0,
                           skipped=f"not run: (n={slower_than[0][0]}, batch={slower_than[0][1]}) already took "
                                   f"over {max_seconds:g} s")
                rows.append(row)
                continue
            ref.cvxpy_layer(n)  # build + canonicalise outside the timing
            times = []
            for _ in range(reps):
                t, w_ref, g_ref = run(ref, s, g)
                times.append(t)
                if t > max_seconds:
                    too_slow.append((n, batch))
                    break
            row["cvxpylayers_s"] = statistics.median(times)
            row["ratio"] = row["cvxpylayers_s"] / row["exact_s"]
            row["max_abs_diff_w"] = (w_ref - w_ex).abs().max().item()
            row["max_abs_diff_grad"] = (g_ref - g_ex).abs().max().item()
            row["cvxpylayers_reps"] = len(times)
            row["skipped"] = (f"one cvxpylayers run took {times[-1]:.1f} s > {max_seconds:g} s; not repeated"
                              if times[-1] > max_seconds else None)
            rows.append(row)
    return rows


def time_dot_methods(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    reps: int = 20,
    loss_fn: LossFn | None = None,
    v: VectorLike | None = None,
    warmup: int = 2,
) -> dict[str, float]:
    """Median wall-clock seconds per call of each ``DOT_METHODS`` entry and of a
    plain ``forward + mean-loss backward`` (key ``"forward_backward"``).

    ``v`` defaults to the mean gradient on ``(x, y)``.  A method that raises
    ``NotImplementedError`` (ghost on unsupported layers) is reported as ``nan``.
    ``.grad`` fields and mode flags are restored afterwards.
    """
    loss_fn = loss_fn or per_example_loss
    if v is None:
        v = mean_gradient(model, x, y, loss_fn=loss_fn)

    def timeit(fn) -> float:
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    result: dict[str, float] = {}
    for m in DOT_METHODS:
        try:
            per_example_dots(model, x, y, v, method=m, loss_fn=loss_fn)
        except NotImplementedError:
            result[m] = float("nan")
            continue
        result[m] = timeit(lambda m=m: per_example_dots(model, x, y, v, method=m, loss_fn=loss_fn))

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]

    def fwd_bwd():
        for p in params:
            p.grad = None
        loss_fn(model(x), y).mean().backward()

    try:
        result["forward_backward"] = timeit(fwd_bwd)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return result
