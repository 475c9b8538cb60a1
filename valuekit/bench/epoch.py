"""`valuekit bench epoch`: one timed training epoch per method and table size, a user's ResNet on PNG bytes.

Each (method, N) is a child process (one thread) that loads the first N rows of the Fashion-MNIST PNG-bytes table
streamed (images stay encoded; each step decodes its batch), trains exactly ceil(N / batch) steps (one pass) with
the full loop (run directory, step log, one dev evaluation and checkpoint at the end, values of every row), and
reports the epoch's wall time, steps/s and its peak resident memory. Finished measurements are appended to
OUT/epoch.jsonl and skipped by the next call, so the methods can be split over processes (`--methods`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.bench.common import header, small_resnet, stem, write
from valuekit.bench.stream import STREAM_METHODS, _stream_data, child_tables, rows_file, run_child, status_mib

SIZES = (10_000, 30_000, 60_000)
RECORDS = "epoch.jsonl"


def epoch_child(data: str, method: str, rows: int, batch_size: int, steps: int | None = None) -> dict:
    """One timed epoch in this (child) process; see the module docstring. `steps`: train that many steps instead
    (several passes over a small table: memory at the same number of steps as a larger table's epoch)."""
    from valuekit.config import TrainConfig
    from valuekit.training.loop import run_training

    tr, dv = child_tables(data, rows, stream=True)
    steps = steps or math.ceil(rows / batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(method=method, steps=steps, batch_size=batch_size, device="cpu", progress=False,
                          eval_every=steps, checkpoint_every=steps)
        t0 = time.perf_counter()
        run = run_training(tr, dv, out=Path(tmp) / "run", config=cfg, model=small_resnet)
        wall = time.perf_counter() - t0
        step_s = run.metrics()["step_time"].to_numpy()
        values = run.values()
    return {"method": method, "rows": rows, "batch_size": batch_size, "steps": steps, "epoch_s": wall,
            "steps_s_sum": float(step_s.sum()), "median_step_s": float(np.median(step_s)),
            "steps_per_s": steps / float(step_s.sum()), "peak_rss_mib": status_mib("VmHWM"),
            "values_rows": int(len(values)), "rows_valued": int(values["value"].notna().sum())}


def _measure(data: Path, method: str, rows: int, batch_size: int, steps: int | None = None) -> dict:
    rows_file(data, rows)
    return run_child("valuekit.bench.epoch", "epoch_child", (str(data), method, rows, batch_size, steps),
                     f"epoch, {method}, {rows} rows")


def same_steps(out: Path, *, methods, rows: int = 10_000, like: int = 60_000, batch_size: int = 64) -> Path:
    """OUT/same-steps.jsonl: each method trained on the first `rows` rows for as many steps as one epoch of `like`
    rows takes, in a child process as `bench epoch`'s: its peak RSS against the epoch of `like` rows separates
    growth with the number of rows from growth with the number of steps."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "same-steps.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        data, _ = _stream_data(Path(tmp) / "data", False)
        for m in methods:
            _append(path, {**_measure(data, m, rows, batch_size, math.ceil(like / batch_size)), "like_rows": like})
    return path


def _append(path: Path, rec: dict) -> None:
    """`rec` with the load before it and the time, as one JSON line (one short append: processes may share the file)."""
    rec = {**rec, "load_before": round(os.getloadavg()[0], 1),
           "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _load_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bench_epoch(out: Path, *, command: str, device: str = "cpu", quick: bool = False, methods=None,
                batch_size: int = 64) -> Path:
    """Timed epochs (module docstring); writes epoch.md / epoch.csv from every record in OUT/epoch.jsonl."""
    methods = list(methods or (("uniform", "dds") if quick else STREAM_METHODS))
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / RECORDS
    with tempfile.TemporaryDirectory() as tmp:
        data, described = _stream_data(Path(tmp) / "data", quick)
        sizes = (300, 1338) if quick else SIZES
        for n in sorted(sizes, key=lambda k: -k if k == max(sizes) else k):  # the full table first
            for m in methods:
                done = {(r["method"], r["rows"], r["batch_size"]) for r in _load_records(records_path)}
                if (m, n, batch_size) in done:
                    continue
                _append(records_path, _measure(data, m, n, batch_size))
    frame = pd.DataFrame([r for r in _load_records(records_path) if r["rows"] in sizes])
    frame = frame.drop_duplicates(["method", "rows", "batch_size"], keep="last")
    order = {m: i for i, m in enumerate(STREAM_METHODS)}
    frame = frame.sort_values(["rows", "method"], key=lambda c: c.map(order).fillna(len(order)) if c.name == "method"
                              else c)
    uni = frame[frame.method == "uniform"].set_index("rows").epoch_s
    frame["ratio_vs_uniform"] = frame.epoch_s / frame.rows.map(uni)
    lines = header(
        "Epoch: time per epoch and peak memory vs N (one timed epoch per method, a user's BatchNorm "
        "ResNet on PNG bytes)",
        command,
        device,
    ) + [
        f"Data: {described}. Model: `valuekit.bench.common.small_resnet` as a user's factory (BatchNorm residual",
        f"blocks, linear head); batch {batch_size}; rows streamed (PNG decoded in each step); one thread per process.",
        "",
        "Each row is one child process that trains exactly ceil(N / batch) steps (one pass over the first N rows)",
        "with the full loop: run directory, per-step log, one dev evaluation and checkpoint at the end, and the",
        "values of every row (streamed scoring). `epoch` = wall time of that `run_training()` call (timed, not "
        "derived);",
        "`steps/s` = steps / the sum of the loop's step times; peak RSS = the child's VmHWM. Measurements are",
        f"appended to `{RECORDS}` (date and 1-minute load average before each) and a later call skips them.",
        "",
        "Time per epoch and peak memory vs N:",
        "",
        "| method | N | steps | epoch (min) | ratio vs uniform | steps/s | median step (s) | peak RSS (MiB) | rows "
        "valued | load before |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in frame.itertuples():
        lines.append(f"| {r.method} | {r.rows:,} | {r.steps} | {r.epoch_s / 60:.2f} | {r.ratio_vs_uniform:.2f}x | "
                     f"{r.steps_per_s:.2f} | {r.median_step_s:.3f} | {r.peak_rss_mib:.0f} | {r.rows_valued:,} | "
                     f"{r.load_before} |")
    return write(out, stem("epoch", device), lines, frame)
