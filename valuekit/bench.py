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


class _MeteredPartWriter:
    """AsyncPartWriter factory that keeps its writers, so a run's step-log work can be read afterwards: the
    loop thread's CPU time in `add` and the writer thread's own CPU time (`busy_s`)."""

    def __init__(self):
        from valuekit.runlog import AsyncPartWriter

        self.base, self.writers, self.add_s = AsyncPartWriter, [], 0.0

    def __call__(self, *args, **kwargs):
        w = self.base(*args, **kwargs)
        table = kwargs["table"] if "table" in kwargs else args[2]  # AsyncPartWriter(folder, schema, table, ...)
        if table == "steps":  # only the per-example step log is metered
            add, meter = w.add, self

            def timed_add(**columns):
                t0 = time.thread_time()
                add(**columns)
                meter.add_s += time.thread_time() - t0

            w.add = timed_add
            self.writers.append(w)
        return w

    def cpu_s(self) -> float:
        return self.add_s + sum(w.busy_s for w in self.writers)


def logging_overhead(*, steps: int, repeats: int, device: str = "cpu", sync_writer: bool = False) -> dict:
    """Wall time of a uniform run with and without the per-example step log (interleaved repeats): the fastest
    run of each kind (`overhead`: the runs least disturbed by other load on a shared machine), the medians
    (`overhead_median`) and the median of each repeat's own ratio (`overhead_paired`: the two runs of a repeat
    run back to back, so slow drifts of the machine's load cancel); the same paired median of the process's CPU
    time (`cpu_overhead_paired`); plus the step log's own CPU time in the logged runs (`log_cpu_share`: the
    loop's `add` calls and the writer thread, over the run's wall time). `sync_writer` also times the old
    synchronous part writer (`with_sync_log_s`)."""
    import valuekit.runlog as runlog
    from valuekit.datasets import load_table
    from valuekit.trainers.base import TrainConfig, train

    tr = load_table(BUNDLED / "train.parquet")
    dv = load_table(BUNDLED / "dev.parquet", like=tr, name="dev")
    kinds = ("log", "nolog", "synclog") if sync_writer else ("log", "nolog")
    times = {k: [] for k in kinds}
    cpu = {k: [] for k in kinds}
    shares = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for kind in kinds[r % 2:] + kinds[:r % 2]:  # alternate which kind runs first
                cfg = TrainConfig(steps=steps, batch_size=64, device=device, progress=False, eval_every=steps,
                                  log_steps=kind != "nolog")
                saved, meter = runlog.AsyncPartWriter, _MeteredPartWriter()
                runlog.AsyncPartWriter = _SyncPartWriter if kind == "synclog" else meter
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    train(tr, dv, out=Path(tmp) / f"r{r}-{kind}", config=cfg)
                    times[kind].append(time.perf_counter() - t0)
                    cpu[kind].append(time.process_time() - c0)
                finally:
                    runlog.AsyncPartWriter = saved
                if kind == "log":
                    shares.append(meter.cpu_s() / times[kind][-1])
    on, off = float(np.min(times["log"])), float(np.min(times["nolog"]))
    out = {"steps": steps, "with_log_s": on, "without_log_s": off, "overhead": on / off - 1.0,
           "with_log_median_s": float(np.median(times["log"])), "without_log_median_s": float(np.median(times["nolog"])),
           "log_cpu_share": float(np.median(shares)), "repeats": repeats,
           "runs_s": times, "all": {k: [round(t, 3) for t in v] for k, v in times.items()}}
    out["overhead_median"] = out["with_log_median_s"] / out["without_log_median_s"] - 1.0
    out["overhead_paired"] = float(np.median(np.divide(times["log"], times["nolog"]))) - 1.0
    out["cpu_overhead_paired"] = float(np.median(np.divide(cpu["log"], cpu["nolog"]))) - 1.0
    out["cpu_s"] = cpu
    if sync_writer:
        out["with_sync_log_s"] = float(np.min(times["synclog"]))
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


KINDS = ("speed", "layer", "quality", "scale", "stream", "epoch")


def run_bench(kind: str, out, *, device: str = "auto", quick: bool = False, argv: list[str] | None = None,
              seeds: str | None = None, steps: int | None = None, datasets: str | None = None,
              methods: str | None = None, settings: str | None = None, runs_dir: str | None = None,
              report_only: bool = False) -> Path:
    """Run one benchmark or study suite (valuekit.suites) and return the markdown file it wrote (list options
    are comma-separated strings)."""
    from valuekit.suites import SUITES, run_suite
    from valuekit.suites_text import NAMES as TEXT_SUITES
    from valuekit.trainers.base import resolve_device

    if kind not in KINDS and kind not in SUITES and kind not in TEXT_SUITES:
        raise InputError(f"unknown benchmark {kind!r}; choose from {', '.join([*KINDS, *SUITES, *TEXT_SUITES])}")
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
    if report_only and (kind not in TEXT_SUITES or not runs_dir):
        raise InputError(f"--report-only: only for the text suites ({', '.join(TEXT_SUITES)}) with --runs-dir")
    if kind in TEXT_SUITES:
        from valuekit.suites_text import registry

        return registry()[kind].run(out, command=command, device=dev, quick=quick, seeds=seed_list, steps=steps,
                                    datasets=split(datasets), methods=split(methods), runs_dir=runs_dir,
                                    report_only=report_only)
    if kind in SUITES:
        return run_suite(kind, out, command=command, device=dev, quick=quick, seeds=seed_list, steps=steps,
                         datasets=split(datasets))
    if kind == "speed":
        from valuekit.bench_speed import bench_speed

        return bench_speed(out, command=command, device=dev, quick=quick, methods=split(methods))
    if kind == "layer":
        from valuekit.bench_layer import bench_layer

        return bench_layer(out, command=command, device=dev, quick=quick)
    if kind == "scale":
        return bench_scale(out, command=command, device=dev, quick=quick)
    if kind == "stream":
        from valuekit.bench_stream import bench_stream

        return bench_stream(out, command=command, device=dev, quick=quick, methods=split(methods))
    if kind == "epoch":
        from valuekit.bench_epoch import bench_epoch

        return bench_epoch(out, command=command, device=dev, quick=quick, methods=split(methods))
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
