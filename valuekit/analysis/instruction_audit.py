"""The audit of causal-LM runs on an instruction table (prompt, response, task): suspect rows and tasks.

The same label_score, rank and flag rule as `valuekit.analysis.mislabel.audit` (its module docstring), with the
row's task and excerpts of its prompt and response in place of given and predicted labels, which an instruction
table does not have; `task_summary` aggregates it per task, where a junk task shows as low score and weight.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from valuekit.analysis.scores import (
    _aligned,
    _pct_rank,
    _plain,
    fraction_split,
    label_score,
    mean_pct_rank,
    open_runs,
    run_columns,
    signal_columns,
    table_path,
    two_means_split,
)
from valuekit.errors import InputError


def is_causal_lm(run) -> bool:
    """A causal language model trained on an instruction table (--model causal-lm, hf:DIR, hf-config:DIR): its
    `classes` are the token vocabulary, its `sources` the tasks, and steps/ hold no class label."""
    model = str((run.meta.get("config") or {}).get("model") or "")
    return model == "causal-lm" or model.startswith(("hf:", "hf-config:"))


def is_text_pairs(run) -> bool:
    """A translation run (--model seq2seq on a table of source/target sentences): its `classes` are the byte
    vocabulary, its `sources` the languages, and steps/ hold no class label."""
    return str((run.meta.get("config") or {}).get("model") or "") == "seq2seq"


def has_no_classes(run) -> bool:
    """A run on text whose rows have no class label (an instruction table or translation pairs)."""
    return is_causal_lm(run) or is_text_pairs(run)


# The translation audit's columns, named after the table's (load_text_pairs' defaults), in place of the instruction
# audit's task, prompt and response.
PAIR_COLUMNS = {"task": "source", "prompt": "src_text", "response": "tgt_text"}

EXCERPT = 80  # characters of a prompt / response kept in the audit of an instruction table


def _excerpt(text) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= EXCERPT else t[: EXCERPT - 1] + "…"


def instruction_audit(run_dirs, data=None, *, flag_fraction: float | None = None, id_col: str = "id",
                      task_col: str = "task") -> pd.DataFrame:
    """The audit of causal-LM runs on an instruction table: one row per (prompt, response), sorted from most to
    least suspicious by the same label_score, rank and flag rule as `audit` (module docstring), with `task`, prompt
    and response excerpts (whitespace folded, cut at EXCERPT characters) instead of given/predicted labels, which an
    instruction table does not have. `audit` calls it for such runs, and for translation runs (`is_text_pairs`),
    whose audit has the columns of PAIR_COLUMNS instead: the row's source language and its sentence pair."""
    from valuekit.data.instructions import read_instructions

    if flag_fraction is not None and not 0.0 <= flag_fraction <= 1.0:
        raise InputError(f"flag_fraction={flag_fraction}: must be between 0 and 1",
                         cli=f"--flag-fraction {flag_fraction}: must be between 0 and 1")
    runs = open_runs(run_dirs)
    names = run_columns(runs)
    df, path = read_instructions(data if data is not None else table_path(runs[0]), name="train")
    where = path or "training table (argument `data`)"
    pairs = is_text_pairs(runs[0])
    if pairs:
        task_col, prompt_col, response_col = PAIR_COLUMNS["task"], PAIR_COLUMNS["prompt"], PAIR_COLUMNS["response"]
    else:
        prompt_col, response_col = (runs[0].meta.get("feature_cols") or ["prompt", "response"])[:2]
    for col in (id_col, prompt_col, response_col):
        if col not in df.columns:
            raise InputError(f"{where}: missing column {col!r} (columns: {list(df.columns)[:12]})")
    ids = df[id_col].to_numpy()
    ids = ids.astype(np.int64) if ids.dtype.kind in "iu" else df[id_col].astype(str).to_numpy(dtype=object)
    index = pd.Index(ids)
    if index.has_duplicates:
        raise InputError(f"{where}: column {id_col!r} has duplicate id {_plain(index[index.duplicated()][0])!r}")
    frame = pd.DataFrame({"id": ids})
    if task_col in df.columns:
        frame["task"] = df[task_col].astype(str).to_numpy(dtype=object)
    frame["prompt"] = [_excerpt(t) for t in df[prompt_col]]
    frame["response"] = [_excerpt(t) for t in df[response_col]]
    value_cols, signals = [], []
    for run, name in zip(runs, names):
        v = _aligned(run, ids, index, name)
        frame[f"value_{name}"] = v["value"].to_numpy(dtype=np.float64)
        frame[f"value_pct_{name}"] = _pct_rank(frame[f"value_{name}"].to_numpy())
        frame[f"weight_{name}"] = v["weight"].to_numpy(dtype=np.float64)
        value_cols.append(f"value_{name}")
        signals += list(signal_columns(v).values())
    score = label_score(np.stack(signals, 1))
    frame["label_score"] = score
    order = np.lexsort((mean_pct_rank(frame[value_cols].to_numpy()), score))
    rank = np.empty(len(score), dtype=np.int64)
    rank[order] = np.arange(1, len(score) + 1)
    if flag_fraction is None:
        frame["is_label_issue"], rule = two_means_split(score), "two-means split of label_score"
    else:
        frame["is_label_issue"] = fraction_split(rank, flag_fraction)
        rule = f"lowest {flag_fraction:g} of label_score"
    frame["rank"] = rank
    if "is_noisy" in df.columns:
        frame["is_noisy"] = df["is_noisy"].to_numpy().astype(bool)
    head = ["id", *(["task"] if "task" in frame else []), "prompt", "response"]
    cols = [*head, *[f"value_pct_{n}" for n in names], "label_score", "is_label_issue", "rank", *value_cols,
            *[f"weight_{n}" for n in names]]
    frame = frame[cols + [c for c in frame.columns if c not in cols]].sort_values("rank", ignore_index=True)
    if pairs:
        frame = frame.rename(columns=PAIR_COLUMNS)
    frame.attrs.update({
        "runs": [str(r.path) for r in runs], "run_names": names, "methods": [r.method for r in runs],
        "flag_rule": rule, "cv_stand_in": None, "kind": "translation" if pairs else "instructions", "classes": None,
        "baselines_skipped": [], "group_col": "source" if pairs else "task",
        "text_cols": [PAIR_COLUMNS["prompt"], PAIR_COLUMNS["response"]] if pairs else ["prompt", "response"],
        "predict_note": f"{'translation pairs have' if pairs else 'an instruction table has'} no class label to "
                        "predict",
    })
    return frame


