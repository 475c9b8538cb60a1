"""What the benchmarks share: the machine line, the report header and writer, markdown tables, the bundled
bench tables, a small BatchNorm ResNet used as a user's model, and the step-log overhead measurement."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.runs.atomic import write_text_atomic
from valuekit.runs.layout import RUN_JSON, VALUES

BUNDLED = Path(__file__).resolve().parents[2] / "data" / "digits-noisy20"


SPEED_METHODS = ("dds", "hostcp", "lrdi", "l2rw", "mwnet", "bads", "multidds")


def machine_line(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        return f"GPU {name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return (f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, no GPU used")


def header(title: str, command: str, device: str) -> list[str]:
    return [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine_line(device)}; "
            f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]


def stem(kind: str, device: str) -> str:
    """File name of a benchmark's outputs: GPU results sit next to CPU ones instead of replacing them."""
    return f"{kind}-gpu" if device.startswith("cuda") else kind


def write(out: Path, kind: str, lines: list[str], frame: pd.DataFrame) -> Path:
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


def bench_tables(data_dir: Path | None = None, *, sources: int = 3, side: int = 8):
    """The bundled noisy digits with a `source` column (id mod `sources`) so multi-source methods run too;
    `side` != 8 resizes the 8x8 images (bilinear) to side x side, e.g. 28 for the resnet-style model."""
    from valuekit.data.tables import load_table

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


def small_resnet(num_classes: int, input_shape) -> torch.nn.Module:  # noqa: F821
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

    from valuekit.runs.atomic import write_json_atomic
    from valuekit.runs.layout import METRICS_SCHEMA, SCHEMA_VERSION, steps_schema, values_schema

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
        cols = [
            pa.array(np.repeat(s + 1, batch)),
            pa.array(ex),
            pa.array(labels[ex].astype(np.int32)),
            pa.nulls(m, pa.string()),
            pa.array(w.astype(np.float32)),
            pa.array(rng.normal(size=m).astype(np.float32)),
            pa.array(rng.exponential(size=m).astype(np.float32)),
            pa.nulls(m, pa.bool_()),
        ]
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
        from valuekit.runs.parts import PartWriter

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
        from valuekit.runs.parts import AsyncPartWriter

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
    import valuekit.runs.writer as runlog
    from valuekit.config import TrainConfig
    from valuekit.data.tables import load_table
    from valuekit.training.loop import run_training

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
                    run_training(tr, dv, out=Path(tmp) / f"r{r}-{kind}", config=cfg)
                    times[kind].append(time.perf_counter() - t0)
                    cpu[kind].append(time.process_time() - c0)
                finally:
                    runlog.AsyncPartWriter = saved
                if kind == "log":
                    shares.append(meter.cpu_s() / times[kind][-1])
    on, off = float(np.min(times["log"])), float(np.min(times["nolog"]))
    out = {
        "steps": steps,
        "with_log_s": on,
        "without_log_s": off,
        "overhead": on / off - 1.0,
        "with_log_median_s": float(np.median(times["log"])),
        "without_log_median_s": float(np.median(times["nolog"])),
        "log_cpu_share": float(np.median(shares)),
        "repeats": repeats,
        "runs_s": times,
        "all": {k: [round(t, 3) for t in v] for k, v in times.items()},
    }
    out["overhead_median"] = out["with_log_median_s"] / out["without_log_median_s"] - 1.0
    out["overhead_paired"] = float(np.median(np.divide(times["log"], times["nolog"]))) - 1.0
    out["cpu_overhead_paired"] = float(np.median(np.divide(cpu["log"], cpu["nolog"]))) - 1.0
    out["cpu_s"] = cpu
    if sync_writer:
        out["with_sync_log_s"] = float(np.min(times["synclog"]))
        out["sync_overhead"] = out["with_sync_log_s"] / off - 1.0
    return out
