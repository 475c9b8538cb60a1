"""`valuekit bench llm-memory`: peak resident memory of a causal-LM run against the number of rows.

Data: the prepared instruction set (`valuekit data prepare instructions`, 10 % junk rows and a junk task), its
training rows repeated with fresh ids to N rows (Parquet, row groups of 4,096). Each (layout, method, N) is a
child process on one thread that loads the file through `load_instructions` (the command line's path), trains
`steps` steps of the `bench llm` GPT-2 (`hf-config:`, random weights) with the full loop (run directory, step log,
one dev evaluation, values of every row), and reports its RSS after loading and its peak (VmHWM). Layouts
(valuekit.data.token_rows): "streamed" keeps the token ids in a temporary file (`--stream yes`), "packed" in memory
(`--stream no`; `auto`, the default, is packed up to 64 MiB of tokens); "dense" turns the loaded rows into the
two (N, max_len) tensors tables were held as before (float32 inputs, int64 targets): the baseline, measured in
the same run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.bench.stream import per_row_state_bytes, run_child, status_mib
from valuekit.bench.suites_llm import BATCH, DATA, MAX_LEN, gpt_config
from valuekit.bench.suites_text import TextSuite, md_table

SIZES = (10_000, 50_000)
METHODS = ("uniform", "bads", "dds")
LAYOUTS = ("streamed", "packed", "dense")


def instruction_rows_file(folder: Path, rows: int) -> Path:
    """FOLDER/train-{rows}.parquet: FOLDER/train.parquet's rows repeated in order to `rows` rows, ids 0..rows-1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / f"train-{rows}.parquet"
    if not path.exists():
        base = pq.read_table(folder / "train.parquet")
        table = base.take(pa.array(np.arange(rows) % base.num_rows))
        table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(np.arange(rows, dtype=np.int64)))
        pq.write_table(table, path, row_group_size=4096)
    return path


def llm_memory_child(folder: str, model: str, method: str, rows: int, steps: int, layout: str) -> dict:
    """One measured run in this (child) process; see the module docstring."""
    import torch

    from valuekit.bench.suites_llm import _config
    from valuekit.data.instructions import load_instructions
    from valuekit.training.loop import make_trainer, run_training

    torch.set_num_threads(1)
    tr = load_instructions(Path(folder) / f"train-{rows}.parquet", max_len=MAX_LEN, stream=layout == "streamed")
    dv = load_instructions(Path(folder) / "dev.parquet", max_len=MAX_LEN, name="dev")
    table_mib = tr.x.resident_bytes() / 2**20
    if layout == "dense":
        tr.x, tr.y = torch.from_numpy(tr.x.numpy()), torch.from_numpy(tr.y.numpy())
        table_mib = (tr.x.nbytes + tr.y.nbytes) / 2**20
    rss_loaded = status_mib("VmRSS")
    cfg = _config(method, model, steps, 0, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        run = run_training(tr, dv, out=Path(tmp) / "run", config=cfg)
        values = run.values()
    peak = status_mib("VmHWM")
    trainer, _, ctx = make_trainer(tr, dv, cfg)  # a fresh one: the method's per-row state at this N
    return {"layout": layout, "method": method, "rows": rows, "steps": steps, "table_mib": table_mib,
            "rss_after_load_mib": rss_loaded, "peak_rss_mib": peak, "values_rows": int(len(values)),
            "per_row_state_mib": per_row_state_bytes([trainer, ctx.signals], rows) / 2**20}


def run_llm_memory(out: Path, *, command: str, device: str = "cpu", quick: bool = False, seeds=None, steps=None,
                   datasets=None, methods=None, runs_dir=None, report_only=False) -> Path:
    """Peak RSS per (layout, method, N) in child processes; OUT/llm-memory.md and .csv."""
    from valuekit.bench.common import header, write
    from valuekit.bench.suites_text import work_folder
    from valuekit.data.instructions import prepare_instructions

    sizes, steps = ((500, 2_500), steps or 5) if quick else (SIZES, steps or 50)
    methods = list(methods or (("uniform",) if quick else METHODS))
    with work_folder(runs_dir, "llm-memory") as folder:
        if not (folder / "train.parquet").exists():
            prepare_instructions(folder, **DATA, seed=0)
        model = gpt_config(folder / "gpt2-tiny")
        rows = []
        for n in sizes:
            instruction_rows_file(folder, n)
            for method in methods:
                for layout in LAYOUTS:
                    rows.append(
                        run_child(
                            "valuekit.bench.llm_memory",
                            "llm_memory_child",
                            (str(folder), model, method, n, steps, layout),
                            f"llm-memory {layout} {method} {n}",
                        )
                    )
        base = len(pd.read_parquet(folder / "train.parquet", columns=["id"]))
    frame = pd.DataFrame(rows)
    lo, hi = min(sizes), max(sizes)
    lines = header("Causal-LM runs: peak resident memory against the number of instruction rows", command, device) + [
        f"Data: the prepared instruction set ({DATA}; {base:,} training rows) repeated to N rows with fresh ids. "
        f"Model: "
        f"`bench llm`'s GPT-2 (`hf-config:`, random weights), --max-len {MAX_LEN}, batch {BATCH}, {steps} steps, one "
        "child process (one thread) per line below; peak = the child's VmHWM; table = the memory of the loaded rows' "
        "token ids in memory; per-row state = the method's per-row statistics.",
        "",
    ]
    lines += md_table(
        [
            "layout",
            "method",
            "N",
            "table (MiB)",
            "RSS after load (MiB)",
            "peak RSS (MiB)",
            "per-row state (MiB)",
            "rows valued",
        ],
        [
            [
                r.layout,
                r.method,
                f"{r.rows:,}",
                f"{r.table_mib:.1f}",
                f"{r.rss_after_load_mib:.0f}",
                f"{r.peak_rss_mib:.0f}",
                f"{r.per_row_state_mib:.2f}",
                f"{r.values_rows:,}",
            ]
            for r in frame.itertuples()
        ],
    ) + [""]
    growth = []
    for (layout, method), g in frame.groupby(["layout", "method"], sort=False):
        a, b = g[g.rows == lo].iloc[0], g[g.rows == hi].iloc[0]
        growth.append([layout, method, f"{b.peak_rss_mib - a.peak_rss_mib:+.0f}", f"{b.table_mib - a.table_mib:+.1f}",
                       f"{b.per_row_state_mib - a.per_row_state_mib:+.1f}"])
    lines += [f"Growth from {lo:,} to {hi:,} rows (MiB):", ""]
    lines += md_table(["layout", "method", "peak RSS", "table", "per-row state"], growth) + [""]
    return write(out, "llm-memory", lines, frame)


__all__ = ["run_llm_memory", "llm_memory_child", "instruction_rows_file"]


SUITES = (TextSuite("llm-memory", "LM runs: peak memory against the number of instruction rows (10k / 50k)",
                    run_llm_memory, ("instructions",), ("uniform", "bads", "dds")),)
