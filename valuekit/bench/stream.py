"""`valuekit bench stream`: a user's BatchNorm ResNet on PNG-bytes images, step time per method and the peak
resident memory of a child process per method and number of rows (streamed and decoded); and the child
processes' shared pieces (`run_child`, `child_tables`, `rows_file`, `status_mib`) that `valuekit bench epoch`
uses too.
"""

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

from valuekit.bench.common import header, small_resnet, stem, write

STREAM_METHODS = ("uniform", "dds", "hostcp", "lrdi", "l2rw", "mwnet", "bads")


def _stream_data(folder: Path, quick: bool) -> tuple[Path, str]:
    """PNG-bytes tables ({bytes, path} layout): full Fashion-MNIST with 60,000 training rows, or digits when quick."""
    from valuekit.data.bundled import prepare

    if quick:
        prepare("digits", folder, image_format="png", seed=0)
        return folder, "bundled digits as PNG bytes (1,338 training rows, 8x8)"
    # 70,000 images: 9,900 test, 100 dev (10 a class), 60,000 train
    prepare("fashion-mnist", folder, image_format="png", test_fraction=9900 / 70000, seed=0)
    return (
        folder,
        "Fashion-MNIST as PNG bytes (`valuekit data prepare fashion-mnist --format png`): 60,000 training rows, 28x28",
    )


def _stream_child(data: str, method: str, rows: int, steps: int, batch_size: int, stream: bool) -> dict:
    """One measured run in this (child) process: load the first `rows` training rows, train `steps` steps of
    `method` on small_resnet, report load time, the loop's own step times, RSS after loading and peak RSS."""
    from valuekit.config import TrainConfig
    from valuekit.training.loop import run_training

    t0 = time.perf_counter()
    tr, dv = child_tables(data, rows, stream=stream)
    load_s, rss_loaded = time.perf_counter() - t0, status_mib("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(method=method, steps=steps, batch_size=batch_size, device="cpu", progress=False,
                          eval_every=steps, checkpoint_every=steps, log_every=steps)
        run = run_training(tr, dv, out=Path(tmp) / "run", config=cfg, model=small_resnet)
        t = run.metrics()["step_time"].to_numpy()
        values = run.values()
    peak = status_mib("VmHWM")
    from valuekit.training.loop import make_trainer

    trainer, _, ctx = make_trainer(tr, dv, cfg, model=small_resnet)  # a fresh one: its per-row state at this N
    return {"method": method, "rows": rows, "stream": stream, "load_s": load_s, "rss_after_load_mib": rss_loaded,
            "peak_rss_mib": peak, "per_row_state_mib": per_row_state_bytes([trainer, ctx.signals, ctx], rows) / 2**20,
            "median_step_s": float(np.median(t[min(2, len(t) - 1):])), "values_rows": int(len(values))}


def per_row_state_bytes(objects, rows: int) -> int:
    """Bytes of the per-row statistics held by `objects`: every tensor or array among their attributes (and in
    lists/dicts of them) whose first dimension is the number of rows (or rows + 1: offsets), or an object's
    `window` (a ring of the last epochs' batches, e.g. LRDI's weights: its size is proportional to the rows),
    each counted once; the loaded table's own ids/labels/offsets are the context's."""
    import torch

    seen, total = set(), 0

    def add(v, window=None):
        nonlocal total
        if isinstance(v, (list, tuple)):
            for u in v:
                add(u)
        elif isinstance(v, dict):
            for u in v.values():
                add(u)
        elif isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim >= 1 and v.shape[0] in (rows, rows + 1, window):
            key = v.data_ptr() if isinstance(v, torch.Tensor) else v.__array_interface__["data"][0]
            if key not in seen:
                seen.add(key)
                total += v.nbytes if isinstance(v, np.ndarray) else v.element_size() * v.nelement()
        elif hasattr(v, "offsets") and hasattr(v, "shape"):  # streamed rows: their offsets (the bytes are on disk)
            add(v.offsets)

    for obj in objects:
        window = getattr(obj, "window", None)
        for v in vars(obj).values():
            add(v, window if isinstance(window, int) else None)
    return total


def status_mib(key: str) -> float:
    """This process's /proc/self/status field in MiB (VmHWM: its own peak, where ru_maxrss is inherited over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))


def child_tables(data, rows: int, *, stream: bool):
    """(train, dev) of a benchmark child on one thread: DATA/train-{rows}.parquet (`rows_file`, written by the
    parent) loaded as a user's file is, and the dev set."""
    import torch

    from valuekit.data.tables import load_table

    torch.set_num_threads(1)
    tr = load_table(Path(data) / f"train-{rows}.parquet", stream=stream, name="train")
    return tr, load_table(Path(data) / "dev.parquet", like=tr, name="dev")


def rows_file(data: Path, rows: int) -> Path:
    """DATA/train-{rows}.parquet: the first `rows` rows of DATA/train.parquet in row groups of 4,096 (written once).
    A child reads its own file of exactly N rows, so its memory is that of N rows, not of the whole file's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(data) / f"train-{rows}.parquet"
    if not path.exists():
        table = pq.read_table(Path(data) / "train.parquet").take(pa.array(np.arange(rows)))
        pq.write_table(table, path, row_group_size=4096)
    return path


def run_child(module: str, func: str, args: tuple, what: str) -> dict:
    """`module.func(*args)` in a fresh one-thread Python process; its JSON result (RuntimeError naming `what`)."""
    code = f"import json\nfrom {module} import {func}\nprint(json.dumps({func}(*{args!r})))\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({what}): {res.stderr.strip()[-400:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _stream_measure(data: Path, method: str, rows: int, steps: int, batch_size: int, stream: bool) -> dict:
    rows_file(data, rows)
    return run_child("valuekit.bench.stream", "_stream_child", (str(data), method, rows, steps, batch_size, stream),
                     f"stream, {method}, {rows} rows")


def bench_stream(out: Path, *, command: str, device: str = "cpu", quick: bool = False, methods=None,
                 batch_size: int = 64) -> Path:
    """A user's BatchNorm ResNet (a factory) on PNG-bytes images: step time per method (interleaved in one
    process, streamed rows decoded in each step), and per method and number of rows the peak resident memory
    of a child process that loads the table and trains a few steps, streamed and (uniform) fully decoded."""
    from valuekit.data.tables import arrow_image_type, load_table

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
        frame = pq.read_table(data / "train.parquet").to_pandas(types_mapper=arrow_image_type)
        tr = load_table(frame, stream=True, name="train")
        dv = load_table(data / "dev.parquet", like=tr, name="dev")
        del frame
        from valuekit.bench.speed import step_times

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
    lines = header("Stream: a user's BatchNorm ResNet on PNG bytes, time and peak memory vs N", command, device) + [
        f"Data: {described}. Model: `valuekit.bench.common.small_resnet`, passed to `run_training(model=...)` as a "
        f"user's",
        f"factory (3 residual blocks with BatchNorm, linear head). Batch {batch_size}; CPU, one thread per process.",
        "",
        f"Step time: every method in one process on all {sizes[-1]:,} rows (streamed: each step decodes its 64",
        f"PNG rows), {rounds} timed rounds after {warmup} warm-up, methods interleaved step by step; median.",
        "Epoch time is **derived** (ceil(N / batch) x that median step time), not a timed full epoch.",
        "Memory: peak resident set (VmHWM) of a child process that loads the first N rows and trains",
        f"{steps} steps with the full loop (run directory, values of every row); `after load` is its RSS once the",
        "table is loaded. `streamed`: images kept encoded (`--stream yes`: a Parquet file's bytes in a temporary",
        "file, read per batch); `decoded`: all pixels in memory. `per-row state`: the bytes of the method's per-row",
        "statistics and the table's per-row arrays (ids, labels, offsets; "
        "`valuekit.bench.stream.per_row_state_bytes`),",
        "the memory that may grow with N.",
        "",
        "| method | N | rows | step (s, interleaved) | epoch (min, derived) | load (s) | RSS after load (MiB) | "
        "peak RSS (MiB) | per-row state (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in frame.itertuples():  # step time was measured on streamed rows only
        step = f"{r.interleaved_step_s:.3f} | {r.epoch_min_derived:.1f}" if r.stream else "- | -"
        lines.append(
            f"| {r.method} | {r.rows:,} | {'streamed' if r.stream else 'decoded'} | {step} | "
            f"{r.load_s:.1f} | {r.rss_after_load_mib:.0f} | {r.peak_rss_mib:.0f} | {r.per_row_state_mib:.1f} |"
        )
    return write(out, stem("stream", device), lines, frame)

# ---------------------------------------------------------------- scale
