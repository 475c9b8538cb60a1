"""`valuekit bench value`: which definition of a learned method's `value` column ranks flipped rows best, chosen on
one half of the data sets and reported on the other half.

Every candidate is computed from the run's own values.parquet (no retraining): the plain -mean_loss, aum and
-last_loss, their rank averages over the whole table and within each (assigned) class, and the method's learned
column. For each run the bench measures AUROC and F1@k (k = number of flipped rows; low value = suspect) of each
candidate against the hidden `is_noisy` of the prepared training table.

Protocol (fixed before any held-out number is read): the candidate with the highest mean AUROC over the choice
sets (`CHOICE`; each set weighted equally: the mean over its noise settings x seeds x methods first) is the pick;
it is then reported on the held-out sets (`HELD_OUT`) against the same runs' -mean_loss, PASS when its mean AUROC
on a set is >= that of -mean_loss - `TOLERANCE`.

Runs are read from one or more roots laid out ROOT/DATASET/SETTING/SEED/ with the prepared tables in data/ and
one run per method in runs/METHOD (this bench) or clean/runs/METHOD (`valuekit bench outcome`). Missing cells of
the requested grid are trained into the first root (`train_cell`: prepare, then each method without early
stopping, one evaluation at the end, no per-step log), or skipped with `report_only`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.bench.outcome import SETTING_DOC, SETTINGS
from valuekit.bench.quality import LEARNED  # each method's learned column
from valuekit.runs.layout import RUN_JSON, VALUES

CHOICE = ("digits", "breast-cancer", "wine", "iris", "segment")
HELD_OUT = ("mnist5k", "fashion-mnist", "phishing", "banana", "penguins", "seattle-weather")
METHODS = ("dds", "mwnet")
TOLERANCE = 0.005
STEPS = 300
MAX_TRAIN = {"mnist5k": 2000, "fashion-mnist": 2000}  # the 784-pixel sets capped to keep the grid's CPU time small
PREPARE_KW = {"fashion-mnist": {"test_fraction": 0.05}}  # 70,000 rows: a small test split (test is not used here)
QUICK = {"datasets": ("wine", "iris"), "settings": ("sym30", "pair40"), "seeds": (0,), "steps": 30,
         "methods": ("dds",)}


# ---------------------------------------------------------------- candidates (numpy)


def candidates(vals: pd.DataFrame, labels, learned: str | None) -> dict[str, np.ndarray]:
    """Candidate values (higher = more valuable) from one run's values columns; `labels` the assigned labels.

    "class rank" = mean of the within-class percentile ranks (signals.rank_average), "global rank" = the same
    with one class for the whole table; both leave a row's NaN signals out of its mean."""
    from valuekit.training.signals import class_percentile, rank_average

    labels = np.asarray(labels)
    one = np.zeros(len(labels), dtype=np.int64)
    nl, aum, nll = -vals.mean_loss.to_numpy(float), vals.aum.to_numpy(float), -vals.last_loss.to_numpy(float)
    out = {
        "-mean_loss": nl,
        "aum": aum,
        "-last_loss": nll,
        "global rank(-mean_loss, aum)": rank_average([nl, aum], one),
        "class rank(-mean_loss, aum)": rank_average([nl, aum], labels),
        "class rank(-mean_loss)": class_percentile(nl, labels),
        "global rank(-mean_loss, -last_loss)": rank_average([nl, nll], one),
        "global rank(-mean_loss, aum, -last_loss)": rank_average([nl, aum, nll], one),
        "mean(global, class rank(-mean_loss, aum))": 0.5 * (rank_average([nl, aum], one)
                                                          + rank_average([nl, aum], labels)),
    }
    if learned is not None and learned in vals:
        lv = vals[learned].to_numpy(float)
        out["learned"] = lv
        out["global rank(-mean_loss, aum, learned)"] = rank_average([nl, aum, lv], one)
    return out


EARLIER = "class rank(-mean_loss, aum)"  # the value before this study (reports/quality.md)
BASELINE = "-mean_loss"


def score_run(vals: pd.DataFrame, labels, noisy, learned: str | None) -> list[dict]:
    """[{candidate, auroc, f1_at_k}] of every candidate against `noisy` (rows aligned with `vals`)."""
    from valuekit.analysis.mislabel import detection_metrics
    from valuekit.bench.quality import _auroc

    rows = []
    for name, v in candidates(vals, labels, learned).items():
        v = np.where(np.isfinite(v), v, np.nanmedian(v))  # a row never seen: middling, as bench quality does
        rows.append({"candidate": name, "auroc": _auroc(v, noisy), "f1_at_k": detection_metrics(v, noisy)["f1_at_k"]})
    return rows


# ---------------------------------------------------------------- runs


def _run_dir(cell: Path, method: str) -> Path | None:
    for d in (cell / "runs" / method, cell / "clean" / "runs" / method):
        if (d / VALUES).exists():
            return d
    return None


def train_cell(name: str, setting: str, seed: int, cell: Path, *, methods, steps: int, device: str = "cpu",
               log=print) -> None:
    """Prepare DATASET with the setting's flips into CELL/data and train each missing method into CELL/runs/METHOD."""
    import valuekit
    from valuekit.data.bundled import prepare

    t0 = time.perf_counter()
    if not (cell / "data" / "train.parquet").exists():
        prepare(name, cell / "data", seed=seed, max_train=MAX_TRAIN.get(name), **PREPARE_KW.get(name, {}),
                **SETTINGS[setting])
    for m in methods:
        if _run_dir(cell, m) is None:
            valuekit.train(cell / "data" / "train.parquet", cell / "data" / "dev.parquet", out=cell / "runs" / m,
                           method=m, steps=steps, seed=seed, device=device, progress=False, eval_every=steps,
                           log_steps=False, overwrite=True)
    log(f"{name} {setting} seed {seed}: trained {', '.join(methods)} in {time.perf_counter() - t0:.0f}s")


def score_cell(name: str, setting: str, seed: int, cell: Path, *, methods) -> list[dict]:
    """Candidate rows of every method run found in CELL (none when the table or a run is missing)."""
    import json

    table = cell / "data" / "train.parquet"
    if not table.exists():
        return []
    df = pd.read_parquet(table, columns=["id", "label", "is_noisy"])
    noisy = df.is_noisy.to_numpy(dtype=bool)
    rows = []
    for m in methods:
        d = _run_dir(cell, m)
        meta = json.loads((d / RUN_JSON).read_text()) if d is not None else {}
        if meta.get("status") != "completed":
            continue
        vals = pd.read_parquet(d / VALUES).set_index("example_id").reindex(df.id.to_numpy())
        base = {"dataset": name, "setting": setting, "seed": seed, "method": m, "steps": meta.get("steps_done"),
                "made_by": "bench outcome" if d.parent.parent.name == "clean" else "bench value"}
        rows += [{**base, **r} for r in score_run(vals, df.label.to_numpy(), noisy, LEARNED.get(m))]
    return rows


# ---------------------------------------------------------------- choice and report


def choose(frame: pd.DataFrame, *, eligible=None) -> tuple[str, pd.DataFrame]:
    """(the pick, per-candidate table) on the choice rows: mean AUROC per set (over settings x seeds x methods),
    then the mean over sets; the highest wins. Only candidates measured in every choice run compete."""
    runs = frame.groupby(["dataset", "setting", "seed", "method"]).ngroups
    counts = frame.groupby("candidate").size()
    full = [c for c in counts.index if counts[c] == runs and (eligible is None or c in eligible)]
    per_set = frame.groupby(["candidate", "dataset"])[["auroc", "f1_at_k"]].mean()
    table = per_set.groupby("candidate").mean()
    table["worst set - (-mean_loss)"] = (per_set.auroc - per_set.auroc.xs(BASELINE, level="candidate")).groupby(
        "candidate").min()
    table = table.sort_values("auroc", ascending=False)
    return table.loc[full].auroc.idxmax(), table


def _f(v, digits: int = 3) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _label(c: str, pick: str, runner_up: str | None = None) -> str:
    tags = [t for t, ok in (("pick", c == pick), ("earlier value", c == EARLIER), ("runner-up", c == runner_up)) if ok]
    return c + (f" ({', '.join(tags)})" if tags else "")


def held_out_table(frame: pd.DataFrame, pick: str, also=()) -> tuple[list[str], dict[str, bool]]:
    """Markdown rows (set x setting x method: mean AUROC over seeds of the pick, -mean_loss, the earlier value and
    `also`) and PASS per set (the pick's mean AUROC over all its runs >= that of -mean_loss - TOLERANCE)."""
    cols = list(dict.fromkeys([pick, BASELINE, EARLIER, *also]))
    piv = frame[frame.candidate.isin(cols)].pivot_table(index=["dataset", "setting", "method", "seed"],
                                                        columns="candidate", values="auroc")
    lines = ["| set | setting | method | seeds | " + " | ".join(_label(c, pick, *also[:1]) for c in cols)
             + " | pick - (-mean_loss) |", "|" + " --- |" * (len(cols) + 5)]
    verdict = {}
    for ds, g in piv.groupby(level="dataset", sort=False):
        for (st, m), h in g.groupby(level=["setting", "method"], sort=False):
            lines.append(f"| {ds} | {st} | {m} | {len(h)} | " + " | ".join(_f(h[c].mean()) for c in cols)
                         + f" | {h[pick].mean() - h[BASELINE].mean():+.4f} |")
        d = g[pick].mean() - g[BASELINE].mean()
        verdict[ds] = bool(d >= -TOLERANCE)
        bold = [f"**{_f(g[c].mean())}**" if c in (pick, BASELINE) else _f(g[c].mean()) for c in cols]
        lines.append(f"| **{ds}** | all | all | {g.index.get_level_values('seed').nunique()} | " + " | ".join(bold)
                     + f" | **{d:+.4f} {'PASS' if verdict[ds] else 'FAIL'}** |")
    return lines, verdict


def write_report(out: Path, frame: pd.DataFrame, *, command: str, steps: int, roots) -> Path:
    from valuekit.bench.common import header, write

    choice = frame[frame.dataset.isin(CHOICE)]
    held = frame[frame.dataset.isin(HELD_OUT)]
    lines = header("Value choice: which in-run value ranks flipped rows best, chosen on some sets, judged on others",
                   command, "cpu")
    cover = [f"{ds}: {g.setting.nunique()} settings x {g.seed.nunique()} seeds x {', '.join(sorted(g.method.unique()))}"
             f" ({'/'.join(str(s) for s in sorted(g.steps.dropna().unique()))} steps; "
             f"{', '.join(sorted(g.made_by.unique()))}; {', '.join(sorted(g.root.unique()))})"
             for ds, g in frame.groupby("dataset", sort=False)]
    lines += [f"Runs read from {', '.join(str(r) for r in roots)}. \"bench value\" cells (runs/METHOD) were trained by "
              f"this bench's `train_cell`: {steps} steps, the whole dev set, no early stopping, one evaluation; "
              "\"bench outcome\" cells (clean/runs/METHOD) are the candidate runs of `valuekit bench outcome` "
              "(`valuekit.clean`: half A of the dev set, the best-dev checkpoint kept; values over every step).",
              "Settings: " + "; ".join(f"{k} = {v}" for k, v in SETTING_DOC.items()) + ".",
              "Coverage: " + "; ".join(cover) + ".", "",
              f"Rule (fixed before reading held-out numbers): on the choice sets {', '.join(CHOICE)}, the candidate",
              "with the highest mean AUROC (per set: the mean over its settings x seeds x methods; then the mean over",
              f"sets) is the pick. Held out: {', '.join(HELD_OUT)}; PASS when the pick's mean AUROC on a set is",
              f">= that of the same runs' -mean_loss - {TOLERANCE}.", ""]
    if choice.empty:
        lines += ["No choice-set runs found."]
        return write(out, "value-choice", lines, frame)
    pick, table = choose(choice)
    lines += ["## Choice sets", "", "| candidate | mean AUROC | mean F1@k | worst set: AUROC - that of -mean_loss |",
              "| --- | --- | --- | --- |"]
    runner_up = next(c for c in table.index if c != pick)
    lines += [f"| {_label(c, pick)} | {_f(r.auroc)} | {_f(r.f1_at_k)} | {r['worst set - (-mean_loss)']:+.4f} |"
              for c, r in table.iterrows()]
    cols = list(dict.fromkeys([pick, BASELINE, EARLIER, runner_up]))
    per = choice[choice.candidate.isin(cols)].pivot_table(index=["dataset", "setting"], columns="candidate",
                                                          values="auroc")
    lines += ["", "Per choice set and setting (mean AUROC over seeds x methods):", "",
              "| set | setting | " + " | ".join(_label(c, pick, runner_up) for c in cols) + " |",
              "|" + " --- |" * (len(cols) + 2)]
    lines += [f"| {ds} | {st} | " + " | ".join(_f(r[c]) for c in cols) + " |" for (ds, st), r in per.iterrows()]
    lines += ["", f"## Held-out sets: {pick} against -mean_loss", ""]
    if pick == BASELINE:
        lines += ["The pick is -mean_loss itself, so the criterion holds by construction; the table shows what the",
                  "earlier value and the runner-up would have given.", ""]
    if held.empty:
        lines += ["No held-out runs found."]
    else:
        rows, verdict = held_out_table(held, pick, also=(runner_up,))
        lines += rows + ["", "Verdict: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in verdict.items())
                         + (f"; held-out sets without runs: {', '.join(s for s in HELD_OUT if s not in verdict)}"
                            if len(verdict) < len(HELD_OUT) else "") + "."]
        allc = held.groupby("candidate")[["auroc", "f1_at_k"]].mean().sort_values("auroc", ascending=False)
        lines += ["", "Every candidate on the held-out sets (for the record; not used for the choice):", "",
                  "| candidate | mean AUROC | mean F1@k |", "| --- | --- | --- |"]
        lines += [f"| {c} | {_f(r.auroc)} | {_f(r.f1_at_k)} |" for c, r in allc.iterrows()]
    return write(out, "value-choice", lines, frame)


def bench_value(out: Path, *, command: str, device: str = "cpu", quick: bool = False, datasets=None, seeds=None,
                methods=None, steps: int | None = None, settings=None, runs_dir=None, report_only: bool = False,
                log=print) -> Path:
    """Score every cell of the grid found under the roots in `runs_dir` (comma-separated; missing cells trained
    into the first, a temporary folder when None; with `report_only` skipped) and write OUT/value-choice.md and
    value-choice.csv."""
    import tempfile

    d = QUICK if quick else {}
    datasets = tuple(datasets or d.get("datasets", CHOICE + HELD_OUT))
    settings = tuple(settings or d.get("settings", tuple(SETTINGS)))
    seeds = tuple(seeds if seeds is not None else d.get("seeds", (0, 1, 2)))
    methods = tuple(methods or d.get("methods", METHODS))
    steps = steps or d.get("steps", STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        roots = [Path(r) for r in (runs_dir.split(",") if runs_dir else [tmp])]
        rows = []
        for seed in seeds:  # seeds outermost: a stopped grid leaves whole seeds
            for name in datasets:
                for setting in settings:
                    found = [r / name / setting / str(seed) for r in roots]
                    cell = next((c for c in found if all(_run_dir(c, m) for m in methods)), None)
                    if cell is None and report_only:
                        continue
                    if cell is None:
                        cell = found[0]
                        train_cell(name, setting, seed, cell, methods=methods, steps=steps, device=device, log=log)
                    rows += [{**r, "root": str(cell.parents[2])} for r in score_cell(name, setting, seed, cell,
                                                                                     methods=methods)]
        frame = pd.DataFrame(rows)
        return write_report(Path(out), frame, command=command, steps=steps, roots=[r for r in roots if str(r) != tmp])
