"""Instruction tables scored per task: a run's values joined to the instruction table, the per-task table,
and `valuekit score` for language-model runs (`--per-task`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.data.instructions import INSTRUCTION_SUFFIXES, read_instructions, write_instructions
from valuekit.errors import InputError


def task_table(scored: pd.DataFrame, *, task_col: str = "task") -> pd.DataFrame:
    """Per-task summary of a scored instruction table (columns weight, value from `score_instructions`):
    task, rows, mean_weight, mean_value, rank (1 = the task with the highest mean value)."""
    g = scored.groupby(task_col, sort=True)
    out = pd.DataFrame({"rows": g.size(), "mean_weight": g["weight"].mean(), "mean_value": g["value"].mean()})
    out["rank"] = out["mean_value"].rank(ascending=False, method="min", na_option="bottom").astype("int64")
    return out.reset_index().rename(columns={task_col: "task"}).sort_values("rank").reset_index(drop=True)


def score_instructions(table, run_dir, *, id_col: str = "id", task_col: str = "task",
                       keep_fraction: float | None = None, per_task: bool = False,
                       rank_by: str = "value") -> pd.DataFrame:
    """The instruction table with every column kept plus the run's weight (mean 1), value, value_std, rank
    and, with keep_fraction, `selected`: the top fraction by rank overall, or within each task
    (`per_task=True`: every task keeps round(fraction x its rows), at least one). `rank` orders by value, or
    by the run's `rank_by` column (e.g. DDS's `mean_reward`)."""
    from valuekit.export.scoring import score

    df, path = read_instructions(table, name="table")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise InputError(f"keep_fraction={keep_fraction}: must be in (0, 1]",
                         cli=f"--keep-fraction {keep_fraction}: must be in (0, 1]")
    if per_task and task_col not in df.columns:
        where = path or "table (argument `table`)"
        raise InputError(f"{where}: per_task=True needs a {task_col!r} column (choose it with task_col=)",
                         cli=f"{where}: --per-task needs a {task_col!r} column (choose it with --source-col)")
    if per_task and keep_fraction is None:
        raise InputError("per_task=True needs keep_fraction=", cli="--per-task needs --keep-fraction")
    res = score(df, run_dir, id_col=id_col, keep_fraction=None if per_task else keep_fraction, rank_by=rank_by)
    if per_task:
        order = res.groupby(task_col)["rank"].rank(method="first")
        size = res.groupby(task_col)[task_col].transform("size")
        res["selected"] = order <= np.maximum(1, np.floor(keep_fraction * size + 0.5))
    return res


def tasks_path(out) -> Path:
    """Where `export_instructions` writes the per-task table next to `out`: `<out stem>.tasks.csv`."""
    out = Path(out)
    return out.with_name(out.stem + ".tasks.csv")


def export_instructions(table, run_dir, out, *, subset_only: bool = False, overwrite: bool = False,
                        **kw) -> tuple[str, pd.DataFrame]:
    """Write `score_instructions(...)` to `out` (.parquet/.jsonl/.csv) and the per-task table to
    `tasks_path(out)`; returns (path, per-task table). Existing files are refused unless `overwrite=True`."""
    from valuekit.runs.paths import refuse_existing

    out = Path(out)
    if out.suffix.lower() not in INSTRUCTION_SUFFIXES:
        raise InputError(f"-o {out}: output must end in {', '.join(INSTRUCTION_SUFFIXES)}")
    if not isinstance(table, pd.DataFrame) and out.resolve() == Path(table).resolve():
        raise InputError(f"-o {out}: is the input table; valuekit never overwrites its input")
    refuse_existing(out, overwrite=overwrite)
    refuse_existing(tasks_path(out), overwrite=overwrite, of=str(out))
    res = score_instructions(table, run_dir, **kw)
    task_col = kw.get("task_col", "task")
    tasks = task_table(res, task_col=task_col) if task_col in res.columns else None
    if tasks is not None and "selected" in res.columns:
        kept = res.groupby(task_col)["selected"].sum()
        tasks["kept"] = tasks["task"].map(kept).astype("int64")
    if subset_only and "selected" in res.columns:
        res = res[res["selected"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_instructions(res, out)
    if tasks is not None:
        tasks.to_csv(tasks_path(out), index=False)
    return str(out), tasks
