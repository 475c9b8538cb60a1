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


def _bench_tables(data_dir: Path | None = None, *, sources: int = 3):
    """The bundled noisy digits with a `source` column (id mod `sources`) so multi-source methods run too."""
    from valuekit.datasets import load_table

    folder = Path(data_dir or BUNDLED)
    train_df = pd.read_parquet(folder / "train.parquet")
    dev_df = pd.read_parquet(folder / "dev.parquet")
    train_df["source"] = "s" + (train_df["id"] % sources).astype(str)
    dev_df["source"] = "s" + (dev_df["id"] % sources).astype(str)
    train_df.attrs["image_shape"] = [1, 8, 8]
    tr = load_table(train_df, image_shape=(1, 8, 8), name="train")
    return tr, load_table(dev_df, like=tr, name="dev")


# ---------------------------------------------------------------- speed


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(train_data, dev_data, *, methods, model: str, batch_size: int, steps: int, warmup: int,
               device: str = "cpu", seed: int = 0) -> dict[str, np.ndarray]:
    """Seconds per step of each method, interleaved round by round in one process, warm-up excluded."""
    from valuekit.trainers.base import Batch, TrainConfig, make_trainer

    runners = {}
    for m in methods:
        cfg = TrainConfig(method=m, model=model, batch_size=batch_size, steps=steps + warmup, seed=seed,
                          device=device, progress=False)
        runners[m] = make_trainer(train_data, dev_data, cfg)
    times = {m: [] for m in methods}
    order = list(methods)
    for i in range(warmup + steps):
        order = order[1:] + order[:1]  # rotate so no method always runs right after another
        for m in order:
            trainer, sampler, ctx = runners[m]
            idx = sampler.next(batch_size).to(ctx.device)
            batch = Batch(step=i + 1, idx=idx, x=ctx.x[idx], y=ctx.y[idx],
                          source=None if ctx.source is None else ctx.source[idx])
            _sync(ctx.device)
            t0 = time.perf_counter()
            trainer.step(batch)
            _sync(ctx.device)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    return {m: np.asarray(t) for m, t in times.items()}


def _peak_memory(method: str, model: str, batch_size: int, steps: int, device: str, data_dir) -> float:
    """Peak memory in MiB of `steps` steps of one method: CUDA max allocated, or a child process's peak RSS."""
    code = (
        "import sys, json, resource, torch\n"
        "from valuekit.bench import _bench_tables, step_times\n"
        f"tr, dv = _bench_tables({str(data_dir) if data_dir else None!r})\n"
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


def bench_speed(out: Path, *, command: str, device: str = "cpu", quick: bool = False, methods=None,
                models=("mlp", "cnn"), batch_size: int = 64, data_dir=None) -> Path:
    """Median step time of each method / uniform on the same model, batch and data, plus peak memory."""
    from valuekit.trainers.base import available_methods

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = set(available_methods())
    methods = [m for m in (methods or SPEED_METHODS) if m in have]
    steps, warmup = (15, 3) if quick else (150, 20)
    if quick:
        models = models[:1]
    tr, dv = _bench_tables(data_dir)
    rows = []
    for model in models:
        times = step_times(tr, dv, methods=["uniform", *methods], model=model, batch_size=batch_size,
                           steps=steps, warmup=warmup, device=device)
        base = float(np.median(times["uniform"]))
        for m, t in times.items():
            med = float(np.median(t))
            rows.append({
                "model": model, "method": m, "median_step_ms": 1e3 * med, "p90_step_ms": 1e3 * float(np.quantile(t, 0.9)),
                "ratio_vs_uniform": med / base, "steps_per_s": 1.0 / med, "steps_timed": len(t),
                "peak_mem_mib": float("nan") if quick else _peak_memory(m, model, batch_size, 30, device, data_dir),
            })
    frame = pd.DataFrame(rows)
    mem_kind = "CUDA max allocated" if device.startswith("cuda") else "peak RSS of a child process running 30 steps"
    lines = _header("Speed: step time of each method relative to uniform", command, device) + [
        f"Data: bundled digits-noisy20 (1,338 rows, 8x8) with 3 sources; batch {batch_size}; {steps} timed steps",
        f"per method after {warmup} warm-up steps, methods interleaved step by step in one process (the order",
        f"rotates every round). Ratio = median step time / uniform's median. Memory: {mem_kind}.",
        "", "| model | method | median step (ms) | p90 (ms) | ratio vs uniform | steps/s | peak memory (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['median_step_ms']:.2f} | {r['p90_step_ms']:.2f} | "
                     f"{r['ratio_vs_uniform']:.2f}x | {r['steps_per_s']:.0f} | {r['peak_mem_mib']:.0f} |")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for j, model in enumerate(models):
        sub = frame[(frame.model == model) & (frame.method != "uniform")]
        ax.bar(np.arange(len(sub)) + 0.4 * j, sub.ratio_vs_uniform, width=0.4, label=model)
        ax.set_xticks(np.arange(len(sub)) + 0.2 * (len(models) - 1), sub.method)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("step time / uniform")
    ax.legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{_stem('speed', device)}.png", dpi=110)
    plt.close(fig)
    lines += ["", f"![speed]({_stem('speed', device)}.png)"]
    return _write(out, _stem("speed", device), lines, frame)


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
                   "step_time": np.full(steps, 1e-3), "wall_time": ms * 1e-3},
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


def logging_overhead(*, steps: int, repeats: int, device: str = "cpu") -> dict:
    """Median wall time of a uniform run with and without the per-example step log (interleaved repeats)."""
    from valuekit.datasets import load_table
    from valuekit.trainers.base import TrainConfig, train

    tr = load_table(BUNDLED / "train.parquet")
    dv = load_table(BUNDLED / "dev.parquet", like=tr, name="dev")
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for log in (True, False):
                cfg = TrainConfig(steps=steps, batch_size=64, device=device, progress=False, eval_every=steps,
                                  log_steps=log)
                t0 = time.perf_counter()
                train(tr, dv, out=Path(tmp) / f"r{r}-{log}", config=cfg)
                times[log].append(time.perf_counter() - t0)
    on, off = float(np.median(times[True])), float(np.median(times[False]))
    return {"steps": steps, "with_log_s": on, "without_log_s": off, "overhead": on / off - 1.0}


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


KINDS = ("speed", "layer", "quality", "scale")


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
