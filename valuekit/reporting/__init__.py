"""One self-contained HTML report for one or more run directories.

`write_report(run_dirs, out)` renders the sections of the report (run summary, training
curves, weight distributions, class balance, source usage, rewards, mislabel audit,
subset value) into a single HTML file: figures are inlined as base64 PNG, the style sheet
is inline, nothing is fetched from the network, so the file opens offline.

An output folder of `valuekit clean` (it holds clean.json) stands for the runs of the model it handed over, and
adds a first section: every candidate's accuracies, the pick, why, and what was handed over.

A section appears when its data exists (class balance for runs with steps, source usage
for runs with sources/, subset curves for runs with subset_value.parquet); when data or
an optional analysis module is missing, or a section fails, the report says so in place
instead of failing whole. Step logs are aggregated with pyarrow (valuekit.analysis.curves),
never loaded whole into pandas.
"""

from __future__ import annotations

import datetime as _dt
import importlib
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.analysis.instruction_audit import has_no_classes, is_causal_lm
from valuekit.errors import InputError, ValueKitError
from valuekit.runs.atomic import write_atomic
from valuekit.runs.layout import RUN_JSON, SUBSET_VALUE
from valuekit.runs.paths import refuse_existing

TEMPLATE = "report.html"
TOP_K = 20


class _Section:
    def __init__(self, id: str, number: int, title: str, intro: str = ""):
        self.id, self.number, self.title, self.intro = id, number, title, intro
        self.figures: list[dict] = []  # {id, alt, src, caption}
        self.tables: list[dict] = []  # {id, caption, header, rows, html_cells}
        self.notes: list[str] = []  # what the reader should know (a yellow box)
        self.errors: list[str] = []  # what failed and is not shown (the same box, class "note error")

    def figure(self, id: str, alt: str, fig, caption: str = "") -> None:
        from valuekit.reporting.figures import data_uri

        self.figures.append({"id": id, "alt": alt, "src": data_uri(fig), "caption": caption})


def _optional(module: str):
    """Import valuekit.analysis.<module> if this installation has it, else None."""
    try:
        return importlib.import_module(f"valuekit.analysis.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"valuekit.analysis.{module}":
            return None
        raise


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}g}" if np.isfinite(v) else "–"
    return str(v)


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    s = float(seconds)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _guard(section: _Section, what: str):
    """Context manager: an exception inside becomes a visible error note in the section."""
    class _G:
        def __enter__(self):
            return self

        def __exit__(self, typ, exc, tb):
            if exc is None:
                return False
            if isinstance(exc, Exception):
                section.errors.append(f"{what}: not shown ({type(exc).__name__}: {exc})")
                return True
            return False

    return _G()


# ---------------------------------------------------------------- sections


def clean_members(path) -> tuple[dict, list[Path]] | None:
    """For an output folder of `valuekit clean` (clean.json beside no run.json): its record and the run directories
    of the model it handed over (the ensemble's members, refitted unless the clean was run without refit); None for
    anything else."""
    import json

    folder = Path(path) if isinstance(path, (str, Path)) else None
    if folder is None or not (folder / "clean.json").is_file() or (folder / RUN_JSON).exists():
        return None
    try:
        record = json.loads((folder / "clean.json").read_text())
    except ValueError as exc:
        raise InputError(f"{folder / 'clean.json'}: not readable as JSON ({exc})") from None
    missing = [k for k in ("pick", "why", "dev_rows", "candidates") if not isinstance(record, dict) or k not in record]
    if missing:
        raise InputError(f"{folder / 'clean.json'}: not a record of valuekit clean (no {missing[0]!r})")
    ens = record.get("ensemble") or {}
    if ens.get("runs"):
        return record, [folder / r for r in ens["runs"]]
    # a clean.json written before ensembles: the pick's refit, or its own run
    pick = next(c for c in record["candidates"] if c["picked"])
    return record, [Path((record.get("refit") or {}).get("run_dir") or pick["run_dir"])]


def _clean_section(folder: Path, record: dict, names: list[str]) -> _Section:
    """`valuekit clean`'s choice: each candidate's half-A accuracy (its early stopping), judged accuracy with its
    bootstrap spread, test accuracy, and which candidates make the handed-over model."""
    judged = "both dev halves, cross-fitted" if record.get("cross_fit") else "half B"
    sec = _Section("clean", 1, "valuekit clean: the candidates and the model handed over",
                   f"{folder}: every candidate was early-stopped on half A of the dev table "
                   f"({record['dev_rows']['half_a']} rows) and judged on {judged} "
                   f"({record['dev_rows']['half_b']} rows in half B); the spread is the standard deviation over "
                   "bootstrap resamples of the judged rows.")
    rows = []
    for c in record["candidates"]:
        role = "pick" if c["picked"] else "averaged with the pick" if c.get("member") else ""
        rows.append([c["candidate"], _fmt(c["rows"]), _fmt(c["dev_a_acc"]),
                     f"{_fmt(c.get('judged_acc', c['dev_b_acc']))} ± {_fmt(c.get('judged_std', c['dev_b_std']))}",
                     _fmt(c.get("test_acc")), role])
    sec.tables.append({"id": "clean-candidates", "caption": f"Candidates of {folder}, simplest first (ties go to "
                       "the simpler pipeline).", "header": ["candidate", "rows", "dev A (early stopping)",
                                                           f"judged accuracy ({judged}) ± spread", "test", "role"],
                       "rows": rows})
    sec.notes.append(f"Pick: {record['pick']}: {record['why']}.")
    ens = record.get("ensemble") or {}
    members = ens.get("members") or [record["pick"]]
    test = "" if record.get("test_acc") is None else f"; test accuracy {_fmt(record['test_acc'])}"
    alone = record.get("test_acc_pick")
    alone_text = "" if alone is None or len(members) < 2 else f" (the pick alone {_fmt(alone)})"
    sec.notes.append(f"Handed over: {' and '.join(members)}"
                     + (", the mean of their probabilities" if len(members) > 1 else "")
                     + f"{test}{alone_text}. The sections below show its runs: {', '.join(names)}.")
    return sec


def _summary(runs, names) -> _Section:
    sec = _Section("summary", 1, "Run summary", "One column per run.")
    rows = []

    def row(label, fn):
        rows.append([label] + [fn(r) for r in runs])

    def cfg(r, k):
        return r.meta.get("config", {}).get(k)

    def train_data(r):
        d = (r.meta.get("data") or {}).get("train") or {}
        return f"{d.get('path') or d.get('name', '?')} ({d.get('n_rows', '?')} rows)"

    def final(r, k):
        return _fmt((r.meta.get("final_metrics") or {}).get(k))

    row("method", lambda r: r.method)
    row("status", lambda r: r.meta.get("status", "?"))
    row("training data", train_data)
    row("dev data", lambda r: str((((r.meta.get("data") or {}).get("dev")) or {}).get("path") or "–"))
    lm = [is_causal_lm(r) for r in runs]
    text = [has_no_classes(r) for r in runs]  # their `classes` are a token vocabulary
    row("classes" if not any(text) else "vocabulary (tokens)" if all(text) else "classes / vocabulary",
        lambda r: str(len(r.meta.get("classes") or [])) + (" tokens" if has_no_classes(r) and not all(text) else ""))
    row("sources" if not any(lm) else "tasks" if all(lm) else "sources / tasks",
        lambda r: ", ".join(r.meta.get("sources") or []) or "–")
    row("model", lambda r: str(cfg(r, "model")) + ("" if cfg(r, "model") == "linear"
                                                    else f" (hidden {cfg(r, 'hidden')})"))
    row("steps", lambda r: f"{r.meta.get('steps_done', '?')} / {cfg(r, 'steps')}")
    row("batch size · lr · optimizer", lambda r: f"{cfg(r, 'batch_size')} · {cfg(r, 'lr')} · {cfg(r, 'optimizer')}")
    row("seed", lambda r: str(r.meta.get("seed")))
    row("value means", lambda r: r.column_docs.get("value", "–"))
    row("value_std means", lambda r: r.column_docs.get("value_std", "–"))
    row("method settings",
        lambda r: ", ".join(f"{k}={v}" for k, v in (r.meta.get("method_config") or {}).items()) or "–")
    row("duration", lambda r: _duration(r.meta.get("duration_s")))
    row("device · host", lambda r: f"{r.meta.get('device', '?')} · {r.meta.get('host', '?')}")
    row("started", lambda r: str(r.meta.get("started_at", "–")))
    for k in ("dev_acc", "dev_loss", "test_acc", "test_loss", "train_loss"):
        # chrF/100 for translation, next-token accuracy for a causal LM
        metric = ("next-token accuracy" if all(lm) else "acc" if runs[0].acc_metric == "accuracy"
                  else runs[0].acc_metric)
        row(f"final {k.replace('_', ' ').replace('acc', metric)}", lambda r, k=k: final(r, k))
    if any(r.meta.get("best_step") is not None for r in runs):  # early stopping: the model in best.pt
        row("best step · dev acc · test acc", lambda r: "–" if r.meta.get("best_step") is None else
            f"{r.meta['best_step']} · " + " · ".join(_fmt((r.meta.get("best_metrics") or {}).get(k))
                                                    for k in ("dev_acc", "test_acc")))
    row("valuekit · torch", lambda r: f"{(r.meta.get('versions') or {}).get('valuekit', '?')} · "
                                      f"{(r.meta.get('versions') or {}).get('torch', '?')}")
    sec.tables.append({"id": "run-summary", "caption": "", "header": ["", *names], "rows": rows})
    return sec


def _training(runs, names) -> _Section:
    from valuekit.analysis import curves
    from valuekit.reporting import figures

    sec = _Section("training", 2, "Training curves",
                   "Training loss/accuracy is the per-step mini-batch mean, averaged over step bins; dev (dashed) "
                   "and test (dotted) are evaluated every eval_every steps.")
    with _guard(sec, "training curves"):
        data = {n: curves.training_curves(r, max_points=150) for r, n in zip(runs, names)}
        data = {n: c for n, c in data.items() if len(c)}
        best = {n: r.meta.get("best_step") for r, n in zip(runs, names)}
        if data:
            sec.figure("fig-training-curves", "Training and dev loss and accuracy by step",
                       figures.plot_training_curves(data, best))
        else:
            sec.notes.append("no metrics logged yet")
        for r, n in zip(runs, names):  # early-stopped runs: the step whose model is in best.pt
            if best[n] is not None:
                m = r.meta.get("best_metrics") or {}
                stopped = " (stopped early)" if r.meta.get("stopped_early") else ""
                sec.notes.append(f"{n}: best step {best[n]} (dev acc {_fmt(m.get('dev_acc'))}, test acc "
                                 f"{_fmt(m.get('test_acc'))}; its model is best.pt), last step "
                                 f"{r.meta.get('steps_done', '?')}{stopped}")
    return sec


def _starved_notes(name: str, values: pd.DataFrame, labels: pd.Series, fraction: float = 0.5) -> list[str]:
    """Warnings for classes that a global top-`fraction` selection by value keeps at under half their share."""
    from valuekit.export.scoring import select_top, starved_classes

    cls = pd.Series(values["example_id"].to_numpy()).map(labels)
    ok = cls.notna().to_numpy()
    if not ok.any():
        return []
    v = values["value"].to_numpy(dtype=np.float64)[ok]
    keep = select_top(v, int(round(fraction * len(v))))
    return [f"{name}: keeping the top {fraction:.0%} by value (valuekit score --keep-fraction {fraction:g}) keeps "
            f"class {c['label']!r} at {c['share_ratio']:.2f}x its share ({c['kept']} of {c['rows']} rows), under "
            f"half; add --per-class to keep every class at its share"
            for c in starved_classes(keep, cls.to_numpy()[ok]).to_dict("records")]


def _weights(runs, names, labels: dict, noisy: dict) -> _Section:
    from valuekit.analysis import curves
    from valuekit.reporting import figures

    sec = _Section("weights", 3, "Weight distributions",
                   "Final per-example weights from values.parquet (normalised to mean 1). When a run's weights are "
                   "all equal (uniform), its value is shown instead (uniform: minus the mean training loss).")
    series, by_class, split, what = {}, {}, {}, {}
    finished = [(r, n) for r, n in zip(runs, names) if r.values() is not None]
    if not finished:
        sec.notes.append("no run has values.parquet yet (finish or resume the runs)")
        return sec
    for r, n in finished:
        if r.values().attrs.get("partial"):
            sec.notes.append(f"{n}: the run did not finish; its values here are aggregates of the step log so far "
                             f"(mean logged weight, or minus the mean loss) — resume it for the final values")
    for r, n in finished:
        v = r.values()
        w = v["weight"].to_numpy(dtype=np.float64)
        use_weight = np.nanstd(w) > 1e-9
        col = "weight" if use_weight else "value"
        what[n] = "final weight" if use_weight else "value (weights all 1)"
        series[n] = (v[col].to_numpy(dtype=np.float64), what[n])
        ids = v["example_id"].to_numpy()
        lab = labels.get(n)
        if lab is not None:
            by_class[n] = pd.DataFrame({"v": v[col].to_numpy(dtype=np.float64),
                                        "class": pd.Series(ids).map(lab).to_numpy()}).dropna(subset=["class"])
            sec.notes += _starved_notes(n, v, lab)
        if noisy.get(n) is not None:
            split[n] = pd.DataFrame({"v": v[col].to_numpy(dtype=np.float64),
                                     "noisy": pd.Series(ids).map(noisy[n]).fillna(False).to_numpy(dtype=bool)})
    with _guard(sec, "weight histogram"):
        sec.figure("fig-weight-hist", "Histogram of final weights", figures.plot_histograms(series))
    with _guard(sec, "weights per class"):
        if by_class:
            classes = [str(c) for c in finished[0][0].meta.get("classes") or []] or None
            sec.figure("fig-weight-class", "Final weights per class", figures.plot_by_class(by_class, what, classes))
    with _guard(sec, "weights by is_noisy"):
        if split:
            sec.figure("fig-weight-noisy", "Final weights of clean vs noisy examples",
                       figures.plot_split_noisy(split, what),
                       "is_noisy comes from the table and is used for evaluation only.")
    with _guard(sec, "weight trajectories"):
        traj, ylab, tags = {}, {}, {}
        for r, n in finished:
            v = r.values().sort_values("rank")
            v = v[np.isfinite(v["value"])]
            pick = list(v["example_id"].head(3)) + list(v["example_id"].tail(3))
            tags[n] = {**{e: "(high value)" for e in pick[:3]}, **{e: "(low value)" for e in pick[3:]}}
            t = curves.trajectories(r, pick, column="weight")
            col = "weight"
            if not len(t) or t["value"].std() < 1e-9:
                t, col = curves.trajectories(r, pick, column="loss"), "loss (weights not logged / constant)"
            if len(t):
                traj[n], ylab[n] = t, col
        if traj:
            sec.figure("fig-weight-traj", "Weight trajectories of a few examples",
                       figures.plot_trajectories(traj, ylab, tags),
                       "The three most and three least valuable examples of each run, at each step they were sampled.")
    return sec


def _balance(runs, names) -> _Section | None:
    from valuekit.reporting import figures

    sec = _Section("balance", 4, "Class balance",
                   "Weight mass per class (from each run's final weights: a scorer's or teacher's where the method "
                   "learns one, all 1 for uniform) vs the empirical training frequency vs the dev frequency, at "
                   "the end of training and over steps.")
    mod = _optional("balance")
    if mod is None:
        sec.notes.append("valuekit.analysis.balance is not in this installation")
        return sec
    with_steps = [(r, n) for r, n in zip(runs, names) if r.dataset("steps") is not None and not has_no_classes(r)]
    if not with_steps and all(has_no_classes(r) for r in runs):
        return None  # instruction tables have no classes: the tasks section shows their weights instead
    if not with_steps:
        sec.notes.append("no run has a step log")
        return sec
    with _guard(sec, "class balance"):
        frames = [(n, mod.class_balance(r)) for r, n in with_steps]
        fig, axes = figures.run_panels(len(frames))
        for ax, (n, f) in zip(axes, frames):
            mod.plot_class_balance(f, ax=ax)
            ax.set_title(f"{n}\n{ax.get_title()}", fontsize=9)
        fig.tight_layout()
        sec.figure("fig-class-balance", "Class mass: the run's weights vs empirical vs dev", fig)
    with _guard(sec, "class balance over steps"):
        frames = [(n, mod.class_balance_over_steps(r)) for r, n in with_steps]
        fig, axes = figures.run_panels(len(frames))
        for ax, (n, f) in zip(axes, frames):
            mod.plot_class_balance_over_steps(f, ax=ax)
            ax.set_title(f"{n}: {ax.get_title()}", fontsize=9)
            figures.step_axis(ax)
        fig.tight_layout()
        sec.figure("fig-class-balance-steps", "Class weight mass over training steps", fig)
    return sec


def _usage(runs, names) -> _Section | None:
    from valuekit.reporting import figures

    # a causal LM's per-task weights (BADS per_source) are in the tasks section; its multidds scorer stays here
    multi = [(r, n) for r, n in zip(runs, names) if r.dataset("sources") is not None
             and (not is_causal_lm(r) or r.method == "multidds")]
    if not multi:
        return None
    sec = _Section("usage", 5, "Source usage", "Share of each source (language, domain, annotator) by training step.")
    mod = _optional("usage")
    if mod is None:
        sec.notes.append("valuekit.analysis.usage is not in this installation")
        return sec
    with _guard(sec, "source usage"):
        frames = [(n, mod.source_usage(r)) for r, n in multi]
        fig, axes = figures.run_panels(len(frames))
        for ax, (n, f) in zip(axes, frames):
            mod.plot_source_usage(f, ax=ax)
            ax.set_title(n, fontsize=9)
            figures.step_axis(ax)
        fig.tight_layout()
        sec.figure("fig-source-usage", "Source usage over training steps", fig)
    with _guard(sec, "source probabilities and rewards"):
        if hasattr(mod, "source_rewards"):
            _usage_curves(sec, mod, multi)
    return sec


def _usage_curves(sec: _Section, mod, multi) -> None:
    """Per run: the scorer's probability of each source over steps (top) and each source's reward with
    +-1 standard error bars (bottom), then the run's sources.parquet as a table."""
    import matplotlib.pyplot as plt

    from valuekit.reporting import figures

    panels = [(r, n, mod.source_usage(r), mod.source_rewards(r, max_points=25)) for r, n in multi]
    panels = [p for p in panels if len(p[3])]
    if not panels:
        sec.notes.append("no run logged per-source rewards (fixed scorer or an older run): no reward curves")
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(5.2 * len(panels), 6.0), squeeze=False, sharex="col")
    for j, (r, n, probs, rewards) in enumerate(panels):
        table = r.source_table()
        target = [] if table is None else table.loc[table["is_target"], "source"].tolist()
        mod.plot_source_probs(probs, ax=axes[0, j], title=n, highlight=target)
        mod.plot_source_rewards(rewards, ax=axes[1, j])
        axes[0, j].set_xlabel("")
        figures.step_axis(axes[1, j])
    fig.tight_layout()
    sec.figure("fig-source-probs", "Scorer probability of each source and its reward (+-1 s.e.) over steps", fig,
               "Top: p(source) of the scorer at each update. Bottom: the reward of each source at the scorer "
               "updates (binned to at most 25 points; error bars: +-1 standard error).")
    for r, n, _, _ in panels:
        t = r.source_table()
        if t is None:
            continue
        t = t.sort_values("prob", ascending=False)
        rows = [[row.source + (" (target)" if row.is_target else ""), _fmt(row.prob), _fmt(row.uniform_prob),
                 f"{_fmt(row.mean_reward)} ± {_fmt(row.reward_se)}", _fmt(int(row.rows)), _fmt(int(row.drawn))]
                for row in t.itertuples()]
        sec.tables.append({"id": f"sources-{n}", "caption": f"{n}: final scorer probability per source "
                           "(sources.parquet), against the uniform scorer's, and the mean reward over the updates "
                           "+- its standard error.", "header": ["source", "prob", "uniform prob", "mean reward",
                                                                 "rows", "rows drawn"], "rows": rows})


def _rewards(runs, names) -> _Section:
    from valuekit.analysis import curves
    from valuekit.reporting import figures

    sec = _Section("rewards", 6, "Rewards and per-example losses over time",
                   "Mean, median and quantile bands per step bin, aggregated with pyarrow over the step log.")
    rewards, losses = {}, {}
    with _guard(sec, "step log"):
        for r, n in zip(runs, names):
            both = curves.step_quantiles_many(r, ["reward", "loss"])  # one scan of the log per run
            if both["reward"] is not None:
                rewards[n] = both["reward"]
            if both["loss"] is not None:
                losses[n] = both["loss"]
    with _guard(sec, "rewards"):
        if rewards:
            sec.figure("fig-rewards", "Reward quantiles per step", figures.plot_quantile_bands(rewards, "reward"))
        else:
            sec.notes.append("no run logs a reward (e.g. uniform); per-example losses are shown below")
    with _guard(sec, "loss quantiles"):
        if losses:
            sec.figure("fig-loss-quantiles", "Per-example training loss quantiles per step",
                       figures.plot_quantile_bands(losses, "per-example loss"))
    return sec


def _audit(runs, names, data, baselines, top_k) -> tuple[_Section, pd.DataFrame | None, dict | None]:
    from valuekit.analysis import mislabel
    from valuekit.reporting import figures

    sec = _Section(
        "audit",
        7,
        "Mislabel audit",
        "label_score averages the runs' values, each rescaled between its 1st and 99th percentile (lower = more "
        "likely mislabelled); flags come from "
        "a two-means split of label_score, never from is_noisy, which only scores the audit.",
    )
    finished = [r for r in runs if r.finished]
    if not finished:
        sec.notes.append("no run has values.parquet yet")
        return sec, None, None
    try:
        frame = mislabel.audit(finished, data=data, baselines=baselines)
    except ValueKitError as exc:
        sec.errors.append(f"audit not available: {exc}")
        return sec, None, None
    summary = mislabel.audit_summary(frame)
    if frame.attrs.get("kind") in ("instructions", "translation"):
        from valuekit.reporting.instructions import instruction_suspects

        instruction_suspects(sec, frame, summary, top_k)
        _audit_metrics(sec, frame, summary)
        return sec, frame, None
    table = None
    try:
        table = mislabel.training_table(finished[0], data)
    except ValueKitError as exc:
        sec.errors.append(f"training table not read: {exc}")
    shape = table["image_shape"] if table else None
    if table is not None and shape is None and finished[0].meta.get("image_shape"):
        sec.notes.append(f"image thumbnails: not shown ({table.get('features_note') or 'no image column'})")
    rows_of = {}
    if shape is not None:
        assert table is not None  # the image shape comes from the table
        rows_of = {i: k for k, i in enumerate(table["ids"].tolist())}
    pct_cols = mislabel.value_columns(frame, pct=True)  # every method on one scale in the table
    header = ["rank", "id"] + (["image"] if shape else []) + ["given", "predicted", "label_score", "flagged"]
    header += [c for c in pct_cols] + (["is_noisy"] if "is_noisy" in frame.columns else [])
    rows = []
    for rec in frame.head(top_k).to_dict("records"):
        cells: list[dict[str, str | None]] = [{"text": str(rec["rank"])}, {"text": str(rec["id"])}]
        if shape and table is not None:
            k = rows_of.get(rec["id"])
            cells.append({"img": figures.thumbnail_uri(table["x"][k], shape) if k is not None else None,
                          "alt": f"image of id {rec['id']}"})
        pred = None if pd.isna(rec["predicted_label"]) else str(rec["predicted_label"])
        cells += [{"text": str(rec["given_label"])},
                  {"text": pred or "–",
                   "cls": "diff" if pred is not None and pred != str(rec["given_label"]) else ""},
                  {"text": _fmt(rec["label_score"])}, {"text": _fmt(bool(rec["is_label_issue"]))}]
        cells += [{"text": _fmt(rec[c], 3)} for c in pct_cols]
        if "is_noisy" in frame.columns:
            cells.append({"text": _fmt(bool(rec["is_noisy"])), "cls": "noisy" if rec["is_noisy"] else ""})
        rows.append(cells)
    predicted = frame.attrs.get("cv_stand_in") or f"not computed: {frame.attrs.get('predict_note')}"
    sec.tables.append({"id": "suspects", "caption": f"Top {min(top_k, len(frame))} suspects (of {len(frame)} examples; "
                       f"{summary['n_flagged']} flagged by {summary.get('flag_rule')}). predicted = out-of-sample "
                       f"prediction ({predicted}).",
                       "header": header, "rows": rows, "cells": True})
    _audit_metrics(sec, frame, summary)
    return sec, frame, table


def _audit_metrics(sec: _Section, frame: pd.DataFrame, summary: dict) -> None:
    from valuekit.analysis import mislabel
    from valuekit.reporting import figures

    value_cols = mislabel.value_columns(frame)
    if "is_noisy" in frame.columns:
        y = frame["is_noisy"].to_numpy(dtype=bool)
        scores = ["label_score", *value_cols, *[c for c in mislabel.BASELINE_COLUMNS if c in frame.columns]]
        with _guard(sec, "discovery curve"):
            # a baseline identical to a run's value (uniform small loss) would draw the same line twice
            scores = [c for i, c in enumerate(scores)
                      if not any(frame[c].equals(frame[d]) for d in scores[:i])]
            curves_ = {c: mislabel.discovery_curve(frame[c].to_numpy(), y) for c in scores}
            sec.figure("fig-discovery", "Discovery curve: fraction of noisy labels found vs fraction inspected",
                       figures.plot_discovery(curves_),
                       "Examples inspected from the lowest score up; random = inspecting in random order, optimal = "
                       "every inspected example is noisy until all are found.")
        keys = ["auroc", "auprc", "precision_at_k", "recall_at_k", "f1_at_k", "two_means_f1"]
        metric_rows = [["label_score", *[_fmt(summary.get(k)) for k in keys]]]
        for c, m in summary.get("scores", {}).items():
            metric_rows.append([c, *[_fmt(m.get(k)) for k in keys]])
        sec.tables.append({"id": "audit-metrics", "caption": f"Detection of the {summary['n_noisy']} truly noisy "
                           f"labels (is_noisy; k = {summary['n_noisy']}). Flagged: precision "
                           f"{_fmt(summary.get('flagged_precision'))}, recall {_fmt(summary.get('flagged_recall'))}.",
                           "header": ["score", "AUROC", "AUPRC", "precision@k", "recall@k", "F1@k", "two-means F1"],
                           "rows": metric_rows})
    else:
        sec.notes.append("the training table has no is_noisy column: no discovery curve or detection metrics")
    if summary.get("spearman"):
        sec.tables.append({"id": "audit-agreement", "caption": "Agreement between runs (Spearman rank correlation "
                           "of their values).", "header": ["runs", "Spearman"],
                           "rows": [[k, _fmt(v)] for k, v in summary["spearman"].items()]})
    for note in summary.get("baselines_skipped", []):
        sec.notes.append(f"baseline skipped: {note}")


def _subsets(runs, names) -> _Section | None:
    from valuekit.reporting import figures

    have = [(r, n) for r, n in zip(runs, names) if (r.path / SUBSET_VALUE).exists()]
    if not have:
        return None
    sec = _Section("subsets", 8, "Subset value",
                   "Test accuracy of a model trained on the most valuable fraction of the data vs a random subset "
                   "of the same size.")
    mod = _optional("subsets")
    if mod is None:
        sec.notes.append("valuekit.analysis.subsets is not in this installation")
        return sec
    with _guard(sec, "subset value curves"):
        fig, axes = figures.run_panels(len(have))
        for ax, (r, n) in zip(axes, have):
            mod.plot_subset_value(pd.read_parquet(r.path / SUBSET_VALUE), ax=ax)
            ax.set_title(n, fontsize=9)
        fig.tight_layout()
        sec.figure("fig-subset-value", "Subset value curves", fig)
    return sec


# ---------------------------------------------------------------- entry point


def write_report(run_dirs, out, *, data=None, baselines: bool = False, top_k: int = TOP_K,
                 title: str | None = None, overwrite: bool = False) -> Path:
    """Render the HTML report of one or more run directories into the single file `out`; return its path.

    `data` (path or DataFrame) replaces the training table named in run.json (class names,
    is_noisy, image thumbnails); `baselines` adds the audit baselines (small loss, cleanlab).
    An existing `out` is refused unless `overwrite=True` (never replaced silently).
    """
    import jinja2

    from valuekit.analysis.scores import run_columns
    from valuekit.runs.reader import Run, read_run

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"-o {out}: the report is one HTML file; give a name ending in .html")
    if out.is_dir():
        raise InputError(f"-o {out}: is a directory; give a file name ending in .html")
    refuse_existing(out, overwrite=overwrite)
    if isinstance(run_dirs, (str, Path, Run)):
        run_dirs = [run_dirs]
    expanded, cleans = [], []
    for r in run_dirs:  # a clean folder stands for the runs of the model it handed over
        found = clean_members(r)
        if found is None:
            expanded.append(r)
            continue
        cleans.append((Path(r), found[0], len(expanded), len(found[1])))
        expanded += found[1]
    runs = [(r if isinstance(r, Run) else read_run(r)).check() for r in expanded]
    if not runs:
        raise InputError("no run directory given")
    names = run_columns(runs)
    if data is not None:  # a table the user names must be readable: refused here, before any figure is drawn
        from valuekit.analysis.mislabel import training_table

        training_table(runs[0], data)

    sections: list[_Section | None] = [_clean_section(folder, record, names[start: start + n])
                                       for folder, record, start, n in cleans]
    sections += [_summary(runs, names), _training(runs, names)]
    audit_sec, frame, table = _audit(runs, names, data, baselines, top_k)
    labels, noisy, label_notes = {}, {}, []
    classes_of = {n: [str(c) for c in r.meta.get("classes") or []] for r, n in zip(runs, names)}
    if table is not None:
        lab = pd.Series(np.asarray(table["classes"], dtype=object)[table["y"]], index=table["ids"])
        labels = {n: lab for n in names}
        if table["is_noisy"] is not None:
            noisy = {n: pd.Series(table["is_noisy"], index=table["ids"]) for n in names}
    else:
        from valuekit.runs.reader import example_labels

        for r, n in zip(runs, names):
            if has_no_classes(r):  # instruction rows and translation pairs have no class label
                continue
            try:
                el = example_labels(r)
                cl = classes_of[n]
                labels[n] = pd.Series([cl[c] if c < len(cl) else str(c) for c in el["label"]],
                                      index=el["example_id"].to_numpy())
            except Exception as exc:  # the weights section then shows no per-class panel, and says why
                label_notes.append(f"{n}: class labels unknown ({type(exc).__name__}: {exc})")
    weights = _weights(runs, names, labels, noisy)
    weights.errors += label_notes
    sections.append(weights)
    sections.append(_balance(runs, names))
    sections.append(_usage(runs, names))
    from valuekit.reporting.instructions import tasks_section

    sections.append(tasks_section(runs, names))
    sections.append(_rewards(runs, names))
    sections.append(audit_sec)
    sections.append(_subsets(runs, names))
    shown = [s for s in sections if s is not None]
    for number, s in enumerate(shown, 1):  # no gaps where a section is absent
        s.number = number

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.get_template(TEMPLATE).render(
        title=title or "valuekit report: " + ", ".join(names), runs=names, sections=shown,
        generated=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        version=__import__("valuekit").__version__,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:
        tmp.write_text(page, encoding="utf-8")

    return write_atomic(out, write)


__all__ = ["clean_members", "write_report"]
