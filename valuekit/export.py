"""Weighted and pruned copies of the user's table (`valuekit score`).

The output is the input table, every column, type and row order kept, plus `weight`
(mean 1 over the rows), `value`, `value_std`, `rank` and, when a selection rule is
given, `selected`. Rows are matched to the run's values by id.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from valuekit.errors import InputError
from valuekit.runlog import read_run

ADDED = ("weight", "value", "value_std", "rank", "selected")


def _read_input(table, id_col: str) -> tuple[pa.Table, str | None]:
    if isinstance(table, pd.DataFrame):
        return pa.Table.from_pandas(table, preserve_index=False), None
    path = Path(table)
    if not path.exists():
        raise InputError(f"{path}: no such file (table to score)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            t = pq.read_table(path)
        elif suffix == ".csv":
            t = pacsv.read_csv(path)
        else:
            raise InputError(f"{path}: score reads .parquet or .csv tables, not {suffix or '(no extension)'!r}")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read table ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return t, str(path)


def _selection(value: np.ndarray, weight: np.ndarray, *, keep_fraction, top_k, drop_fraction, min_weight):
    rules = [r for r in (keep_fraction, top_k, drop_fraction, min_weight) if r is not None]
    if not rules:
        return None
    if len(rules) > 1:
        raise InputError("give at most one of --keep-fraction, --top-k, --drop-fraction, --min-weight")
    n = len(value)
    order = np.lexsort((np.arange(n), -np.nan_to_num(value, nan=-np.inf)))
    if keep_fraction is not None:
        if not (0 < keep_fraction <= 1):
            raise InputError(f"--keep-fraction {keep_fraction}: must be in (0, 1]")
        k = max(1, int(math.floor(keep_fraction * n + 0.5)))
    elif top_k is not None:
        if not (1 <= top_k):
            raise InputError(f"--top-k {top_k}: must be >= 1")
        k = min(int(top_k), n)
    elif drop_fraction is not None:
        if not (0 <= drop_fraction < 1):
            raise InputError(f"--drop-fraction {drop_fraction}: must be in [0, 1)")
        k = n - int(math.floor(drop_fraction * n + 0.5))
    else:
        if not math.isfinite(min_weight):
            raise InputError(f"--min-weight {min_weight}: must be a finite number")
        return weight >= min_weight
    selected = np.zeros(n, dtype=bool)
    selected[order[:k]] = True
    return selected


def score(
    table,
    run_dir,
    *,
    out=None,
    id_col: str = "id",
    keep_fraction: float | None = None,
    top_k: int | None = None,
    drop_fraction: float | None = None,
    min_weight: float | None = None,
    subset_only: bool = False,
) -> pd.DataFrame | Path:
    """Join a run's values onto `table` by id; return a DataFrame, or write `out` (.parquet/.csv) and return its path."""
    run = read_run(run_dir)
    values = run.values()
    if values is None:
        raise InputError(f"{run.path}: run has no values.parquet (status {run.meta.get('status')!r}); finish it with --resume")
    t, in_path = _read_input(table, id_col)
    if out is not None:
        out = Path(out)
        if out.suffix.lower() not in (".parquet", ".pq", ".csv"):
            raise InputError(f"-o {out}: output must end in .parquet or .csv")
        if in_path and out.resolve() == Path(in_path).resolve():
            raise InputError(f"-o {out}: is the input table; valuekit never overwrites its input")
    if id_col not in t.column_names:
        raise InputError(f"{in_path or 'table'}: missing column {id_col!r} (choose another with --id-col)")
    clash = [c for c in ADDED if c in t.column_names]
    if clash:
        raise InputError(f"{in_path or 'table'}: already has column {clash[0]!r}, which score adds; rename it first")

    ids = t.column(id_col).to_pandas()
    vid = values["example_id"]
    if ids.dtype.kind in "iu" and vid.dtype.kind not in "iu" or ids.dtype.kind not in "iu" and vid.dtype.kind in "iu":
        ids, vid = ids.astype(str), vid.astype(str)
    pos = pd.Index(vid).get_indexer(ids)
    if (pos < 0).any():
        missing = ids[pos < 0]
        raise InputError(
            f"{in_path or 'table'}: {len(missing)} id(s) in column {id_col!r} are not in run {run.path} "
            f"(first: {', '.join(map(repr, missing.iloc[:5].tolist()))})"
        )
    value = values["value"].to_numpy()[pos]
    weight = values["weight"].to_numpy()[pos].astype(np.float64)
    weight = weight * (len(weight) / weight.sum()) if weight.sum() > 0 else np.ones(len(weight))
    order = np.lexsort((np.arange(len(value)), -np.nan_to_num(value, nan=-np.inf)))
    rank = np.empty(len(value), dtype=np.int64)
    rank[order] = np.arange(1, len(value) + 1)
    selected = _selection(value, weight, keep_fraction=keep_fraction, top_k=top_k,
                          drop_fraction=drop_fraction, min_weight=min_weight)
    if subset_only and selected is None:
        raise InputError("--subset-only needs a selection rule (--keep-fraction, --top-k, --drop-fraction or --min-weight)")

    t = t.append_column("weight", pa.array(weight, pa.float64()))
    t = t.append_column("value", pa.array(value, pa.float64()))
    t = t.append_column("value_std", pa.array(values["value_std"].to_numpy()[pos], pa.float64()))
    t = t.append_column("rank", pa.array(rank, pa.int64()))
    if selected is not None:
        t = t.append_column("selected", pa.array(selected))
        if subset_only:
            t = t.filter(pa.array(selected))
    if out is None:
        return t.to_pandas()
    _write_atomic(t, out)
    return out


def _write_atomic(t: pa.Table, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if out.suffix.lower() == ".csv":
            pacsv.write_csv(t, tmp)
        else:
            pq.write_table(t, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
