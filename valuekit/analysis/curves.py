"""Curves over training steps from a run directory, aggregated with pyarrow on the Parquet parts.

The step log can hold tens of millions of rows (one per example per step it was seen), so
nothing here loads it whole into pandas: each function scans only the columns it needs,
bins steps inside the scan (a projected expression) and aggregates with pyarrow's
group_by; only the small aggregated result becomes a DataFrame.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from valuekit.errors import InputError
from valuekit.runs.reader import open_run

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
DIGEST_ROWS = 1_000_000  # quantiles of bigger logs come from every k-th row (means and counts use all rows)



def last_step(run) -> int:
    """Last logged step: run.json's steps_done, else the metrics log's largest step."""
    run = open_run(run)
    done = int(run.meta.get("steps_done") or 0)
    if done:
        return done
    d = run.dataset("metrics") or run.dataset("steps")
    if d is None:
        return 0
    m = pc.max(d.to_table(columns=["step"])["step"]).as_py()
    return int(m or 0)


def _bin_expr(last: int, bins: int) -> pc.Expression:
    # Integer arithmetic inside the scan: bin b in 0..bins-1 holds steps (b*last/bins, (b+1)*last/bins].
    b = pc.divide(pc.multiply(pc.subtract(pc.field("step").cast(pa.int64()), 1), bins), last)
    return pc.min_element_wise(pc.max_element_wise(b, 0), bins - 1)


def _bin_end(b: np.ndarray, last: int, bins: int) -> np.ndarray:
    """Last step of bin b: the largest s with (s - 1) * bins // last == b."""
    return ((b + 1) * last + bins - 1) // bins


def training_curves(run, *, max_points: int = 500) -> pd.DataFrame:
    """Columns step, train_loss, train_acc (mean over bins of at most max_points), and dev/test
    loss/accuracy at the evaluation steps (NaN elsewhere). One row per bin or evaluation step.
    """
    run = open_run(run)
    d = run.dataset("metrics")
    cols = ["step", "train_loss", "train_acc", "dev_loss", "dev_acc", "test_loss", "test_acc"]
    if d is None:
        return pd.DataFrame(columns=cols, dtype=np.float64)
    last = max(last_step(run), 1)
    bins = max(1, min(max_points, last))
    t = d.to_table(columns={"bin": _bin_expr(last, bins), "train_loss": pc.field("train_loss"),
                            "train_acc": pc.field("train_acc")})
    g = t.group_by("bin").aggregate([("train_loss", "mean"), ("train_acc", "mean")])
    train = pd.DataFrame({"step": _bin_end(g["bin"].to_numpy(), last, bins),
                          "train_loss": g["train_loss_mean"].to_numpy(zero_copy_only=False),
                          "train_acc": g["train_acc_mean"].to_numpy(zero_copy_only=False)})
    ev = d.to_table(columns=["step", "dev_loss", "dev_acc", "test_loss", "test_acc"],
                    filter=pc.field("dev_loss").is_valid() | pc.field("test_loss").is_valid()).to_pandas()
    frame = pd.concat([train, ev], ignore_index=True)
    frame = frame.groupby("step", as_index=False).first()  # a bin end that is also an eval step: one row
    return frame.reindex(columns=cols).astype(np.float64).sort_values("step", ignore_index=True)


def step_quantiles(run, column: str = "reward", *, bins: int = 200, q=QUANTILES) -> pd.DataFrame | None:
    """Per step bin: step (last step of the bin), mean, count and the quantiles q (columns q10, q25, ...)
    of a steps/ column (reward, loss or weight), via pyarrow's t-digest. None when the column was never logged.
    """
    return step_quantiles_many(run, [column], bins=bins, q=q)[column]


def step_quantiles_many(run, columns=("reward", "loss"), *, bins: int = 200, q=QUANTILES) -> dict:
    """`step_quantiles` of several steps/ columns from one scan of the log: {column: frame or None}."""
    run = open_run(run)
    columns = list(columns)
    for c in columns:
        if c not in ("reward", "loss", "weight"):
            raise InputError(f"step_quantiles: column {c!r} must be reward, loss or weight")
    d = run.dataset("steps")
    if d is None:
        return {c: None for c in columns}
    last = max(last_step(run), 1)
    bins = max(1, min(bins, last))
    t = d.to_table(columns={"bin": _bin_expr(last, bins), **{c: pc.field(c) for c in columns}})
    # mean, count and t-digest all skip nulls (steps where a method logs no reward)
    g = t.group_by("bin").aggregate([(c, a) for c in columns for a in ("mean", "count")]).sort_by("bin")
    if t.num_rows > DIGEST_ROWS:
        # A systematic sample of >= 1M rows (thousands per bin) pins the plotted quantiles down to
        # well under a pixel; the t-digest over every row would be most of this function's time.
        t = t.take(pa.array(np.arange(0, t.num_rows, -(-t.num_rows // DIGEST_ROWS))))
    dig = t.group_by("bin").aggregate([(c, "tdigest", pc.TDigestOptions(q=list(q))) for c in columns])
    dig = dig.sort_by("bin")
    del t
    out = {}
    for c in columns:
        count = g[f"{c}_count"].to_numpy()
        keep = count > 0
        if not keep.any():
            out[c] = None
            continue
        frame = pd.DataFrame({"step": _bin_end(g["bin"].to_numpy(), last, bins),
                              "mean": g[f"{c}_mean"].to_numpy(zero_copy_only=False), "count": count})
        by_bin = dict(zip(dig["bin"].to_pylist(), dig[f"{c}_tdigest"].to_pylist()))
        digest = np.array([by_bin.get(b) or [np.nan] * len(q) for b in g["bin"].to_pylist()], dtype=np.float64)
        for j, qq in enumerate(q):
            frame[f"q{int(round(qq * 100)):02d}"] = digest[:, j]
        out[c] = frame[keep].reset_index(drop=True)
    return out




def trajectories(run, ids, *, column: str = "weight") -> pd.DataFrame:
    """Columns example_id, step, value: the logged `column` of a few examples at every step they were seen
    (the scan filters on example_id, so only their rows leave Parquet)."""
    run = open_run(run)
    d = run.dataset("steps")
    ids = list(ids)
    if d is None or not ids:
        return pd.DataFrame({"example_id": [], "step": [], "value": []})
    id_type = d.schema.field("example_id").type
    t = d.to_table(columns=["example_id", "step", column],
                   filter=pc.field("example_id").isin(pa.array(ids, id_type)) & pc.field(column).is_valid())
    frame = t.to_pandas().rename(columns={column: "value"})
    return frame.sort_values(["example_id", "step"], ignore_index=True)


def visits(run) -> pd.DataFrame:
    """example_id -> number of times the example was sampled (rows in steps/)."""
    run = open_run(run)
    d = run.dataset("steps")
    if d is None:
        return pd.DataFrame({"example_id": [], "count": []})
    g = d.to_table(columns=["example_id"]).group_by("example_id").aggregate([([], "count_all")])
    return pd.DataFrame({"example_id": g["example_id"].to_numpy(zero_copy_only=False),
                         "count": g["count_all"].to_numpy()})
