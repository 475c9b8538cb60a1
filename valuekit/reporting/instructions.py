"""The report's sections for causal-LM runs on instruction tables: task usage and weight, suspect rows and tasks."""

from __future__ import annotations

import pandas as pd

from valuekit.analysis.instruction_audit import EXCERPT, is_causal_lm
from valuekit.analysis.mislabel import task_summary
from valuekit.reporting import _fmt, _guard, _Section


def tasks_section(runs, names) -> _Section | None:
    """Instruction tables: each task's share of the rows drawn and the mean weight the method gave its rows, over
    the training steps (from steps/), and a per-task table with the final weights (values.parquet)."""
    import matplotlib.pyplot as plt

    from valuekit.analysis import usage
    from valuekit.reporting import figures

    lm = [(r, n) for r, n in zip(runs, names) if is_causal_lm(r) and r.dataset("steps") is not None]
    if not lm:
        return None
    sec = _Section("tasks", 5, "Task usage and weight",
                   "Instruction tables: each task's share of the rows drawn per step bin (top) and the mean training "
                   "weight of its rows (bottom; weights are 1 for uniform), from the step log.")
    with _guard(sec, "task usage"):
        frames = [(r, n, usage.task_weights(r)) for r, n in lm]
        frames = [f for f in frames if f[2] is not None]
        if not frames:
            sec.notes.append("the training table has no task column: no per-task usage")
            return sec
        fig, axes = plt.subplots(2, len(frames), figsize=(5.2 * len(frames), 6.0), squeeze=False, sharex="col")
        for j, (_r, n, f) in enumerate(frames):
            for task, g in f.groupby("source"):
                axes[0, j].plot(g["step"], g["share"], label=task)
                axes[1, j].plot(g["step"], g["weight"], label=task)
            axes[0, j].set_title(n, fontsize=9)
            axes[0, j].set_ylabel("share of rows drawn")
            axes[1, j].set_ylabel("mean weight")
            axes[0, j].legend(fontsize=7)
            figures.step_axis(axes[1, j])
        fig.tight_layout()
        sec.figure("fig-task-usage", "Share of rows drawn and mean weight of each task over training steps", fig)
    for r, n in lm:
        with _guard(sec, f"{n}: task table"):
            t = usage.task_table(r)
            if t is None:
                continue
            rows = [[row.task, _fmt(int(row.rows_seen)), _fmt(row.share_of_draws), _fmt(row.mean_weight_in_training),
                     _fmt(row.final_weight)] for row in t.itertuples()]
            sec.tables.append({"id": f"tasks-{n}", "caption": f"{n}: per task, the rows seen, their share of all "
                               "draws, their mean weight in training and their mean final weight (values.parquet; "
                               "mean 1 over the table).", "header": ["task", "rows seen", "share of draws",
                                                                     "mean weight in training", "final weight"],
                               "rows": rows})
    return sec


def instruction_suspects(sec: _Section, frame: pd.DataFrame, summary: dict, top_k: int) -> None:
    """The suspects of an instruction audit (task, prompt and response excerpts; escaped by the template) and the
    per-task table, where a junk task shows as low label_score and weight."""
    from valuekit.analysis import mislabel

    group = frame.attrs.get("group_col", "task")  # the source language of a translation audit
    prompt, response = frame.attrs.get("text_cols") or ["prompt", "response"]
    sec.title = "Suspect rows and tasks" if group == "task" else "Suspect pairs and sources"
    pct_cols = mislabel.value_columns(frame, pct=True)
    has_task = group in frame.columns
    header = ["rank", "id"] + ([group] if has_task else []) + [prompt, response, "label_score", "flagged"]
    header += pct_cols + (["is_noisy"] if "is_noisy" in frame.columns else [])
    rows = []
    for rec in frame.head(top_k).to_dict("records"):
        cells = [str(rec["rank"]), str(rec["id"])] + ([str(rec[group])] if has_task else [])
        cells += [rec[prompt], rec[response], _fmt(rec["label_score"]), _fmt(bool(rec["is_label_issue"]))]
        cells += [_fmt(rec[c], 3) for c in pct_cols]
        if "is_noisy" in frame.columns:
            cells.append(_fmt(bool(rec["is_noisy"])))
        rows.append(cells)
    sec.tables.append({"id": "suspects", "caption": f"Top {min(top_k, len(frame))} suspect rows (of {len(frame)}; "
                       f"{summary['n_flagged']} flagged by {summary.get('flag_rule')}). {prompt} and {response} are "
                       f"cut at {EXCERPT} characters.", "header": header, "rows": rows})
    tasks = task_summary(frame)
    if tasks is not None:
        cols = [c for c in tasks.columns if c != group]
        sec.tables.append({"id": "suspect-tasks", "caption": f"Per {group}, most suspicious first: rows, flagged "
                           "rows, mean label_score and each run's mean weight and value percentile.",
                           "header": [group, *cols],
                           "rows": [[str(rec[group]), *[_fmt(rec[c]) for c in cols]]
                                    for rec in tasks.to_dict("records")]})
