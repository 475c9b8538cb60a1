"""`valuekit bench llm`: data selection for causal-LM fine-tuning on the prepared instruction set.

Data: `valuekit data prepare instructions` (Django catalogs: one "Translate from X to English" task per
language, a junk task with random responses, 10 % junk rows in the real tasks, flagged `is_noisy` and never
shown to a method). Model: a 2-layer GPT-2 built from a config with random weights (`hf-config:`), byte-level
tokenizer. Per seed:
* value runs: uniform (value = minus the mean training loss, the small-loss baseline), BADS per example and
  BADS per task (`per_source=true`); AUROC of low value against junk rows, the junk task's rank by mean value;
* subset runs: uniform fine-tuning on the top half by the per-example BADS value (global and per task), on the
  top half by the per-task BADS run's task weights (whole tasks), on the top half of every task by DDS's mean
  reward and on two random halves; dev loss at the end and early-stopped, and the held-out test loss at the
  early-stopping step (the halves were chosen with the dev set's help);
and once: the step time of each method, interleaved in one process, and the share of padded positions in a
batch with and without length buckets.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.bench.suites_text import Records, TextSuite, completed, fresh, md_table, mean_sd, work_folder

MAX_LEN = 128
BATCH = 16
DATA = {"noise": 0.1, "max_per_task": 200, "dev_size": 100, "test_size": 100}  # prepare_instructions options
# the instruction sets (`--datasets`): the default one, six other languages with another junk language, and the
# default languages with swapped responses (fluent English of another message) as the junk
DATASETS = {
    "instructions": {},
    "instructions-langs": {"tasks": ("it", "nl", "pl", "tr", "ko", "uk"), "junk_task": "hu"},
    "instructions-swap": {"junk_kind": "swap"},
}
GPT = {"n_layer": 2, "n_embd": 64, "n_head": 4}
# Adam's lr for uniform, DDS, multi-source DDS and the fine-tuned halves (BADS moves theta with its own lr_theta).
# at 1e-3 (3e-3 was never tuned) uniform's dev loss and its small-loss AUROC were better on two sets
# (instructions 0.958-0.962 vs 0.858, instructions-langs 0.952-0.960 vs 0.846; reports/llm.md), so the trivial
# baseline the learned values must beat is no longer a weakly trained run
LR = 1e-3
# how these were set: reports/llm.md "Set-up"; dev_batch_size 8 / dev_every 4 (2 dev rows a step on average, the
# same meta-term expectation) bring the mean step to ~1.1x uniform's (measured in reports/llm.md)
BADS = {"precondition": True, "lr_theta": 1e-3, "rho_theta": 1.0, "rho_w": 100.0, "temperature": 0.01,
        "burn_in": 100, "dev_batch_size": 8, "dev_every": 4}
ARMS = {"uniform": ("uniform", {}), "bads": ("bads", BADS), "bads-per-task": ("bads", {**BADS, "per_source": True}),
        "dds": ("dds", {}), "multidds": ("multidds", {}),  # DDS / multi-source DDS at their defaults
        # LoRA adapters of rank LORA on the model the seed's uniform run left (saved as an hf: folder, `_base_model`)
        "uniform-lora": ("uniform", {}), "bads-lora": ("bads", BADS), "dds-lora": ("dds", {})}
# timed next to the BADS arm, never a value run: the settings before dev_every, a dev batch of 16 every step
TIMED_ONLY = {"bads-dev-every-step": ("bads", {**BADS, "dev_batch_size": 16, "dev_every": 1})}
DEFAULT_ARMS = ("uniform", "bads", "bads-per-task", "dds", "multidds")
LORA = 8
# halves: the top half of every task by BADS's per-example value; the top half overall by it; the top half by the
# per-task BADS run's task weights (whole tasks, highest weight first; the last task cut in row order); the top half
# of every task by DDS's mean reward (`valuekit score --per-task --rank-by mean_reward`); random, and a second random
# draw (how often one random half beats another: the noise the other comparisons sit in)
SUBSETS = ("bads-per-task-top50", "bads-top50", "bads-task-weights-top50", "dds-reward-per-task-top50", "random50",
           "random50-b")


def gpt_config(folder: Path) -> str:
    """hf-config:FOLDER of the suite's GPT-2. Each file is replaced atomically: processes sharing --runs-dir write it
    while others read it to build their models (a reader once got a half-written config.json)."""
    import tempfile

    from transformers import GPT2Config

    from valuekit.runs.atomic import commit

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".gpt2-") as tmp:
        GPT2Config(**GPT, vocab_size=259, n_positions=MAX_LEN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                   bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            commit(f, folder / f.name)
    return f"hf-config:{folder}"


def _config(method: str, model: str, steps: int, seed: int, device: str, lora: int = 0):
    from valuekit.config import TrainConfig

    return TrainConfig(method=method, model=model, steps=steps, batch_size=BATCH, lr=LR, seed=seed,
                       device=device, eval_every=max(steps // 4, 1), log_every=100, checkpoint_every=10**9,
                       progress=False, eval_batch_size=128, lora=lora)


def _base_model(gpt: str, uniform_run: Path, folder: Path) -> str:
    """hf:FOLDER holding the model at the end of a uniform run (its checkpoint), for the LoRA arms."""
    import torch

    from valuekit.models.lm import build_lm
    from valuekit.runs.layout import CHECKPOINT

    if not (folder / "config.json").exists():
        model = build_lm(gpt, vocab=259, max_len=MAX_LEN)
        model.load_state_dict(torch.load(uniform_run / CHECKPOINT, weights_only=True)["trainer"]["model"])
        model.inner.save_pretrained(folder)
    return f"hf:{folder}"


def _value_run(arm: str, data, out: Path, seed: int, steps: int, device: str) -> dict:
    from valuekit.analysis.mislabel import detection_metrics
    from valuekit.export.instructions import score_instructions, task_table
    from valuekit.training.loop import run_training

    table, model, tr, dv, _ = data
    method, settings = ARMS[arm]
    lora = LORA if arm.endswith("-lora") else 0
    if lora:
        model = _base_model(model, out.parent / _run_name("uniform", data[4], seed, steps),
                            out.parent / _run_name("base", data[4], seed, steps))
    t0 = time.perf_counter()
    run = completed(run_training(tr, dv, out=fresh(out), config=_config(method, model, steps, seed, device, lora),
                          method_config=settings))
    seconds = time.perf_counter() - t0
    scored = score_instructions(table, out)
    tasks = task_table(scored).set_index("task")
    noisy, value, real = scored.is_noisy.to_numpy(bool), scored.value.to_numpy(), (scored.task != "junk").to_numpy()
    signals = run.values().set_index("example_id").loc[scored["id"]]  # the run's own loss signals, same rows
    loss_auroc = {f"auroc_{c}": detection_metrics(-signals[c].to_numpy(), noisy)["auroc"]
                  for c in ("mean_loss", "last_loss") if c in signals}
    if "posterior_mean" in signals:  # BADS's learned quantity, whatever `value` is
        loss_auroc["auroc_posterior_mean"] = detection_metrics(signals["posterior_mean"].to_numpy(), noisy)["auroc"]
    return {"kind": "value", "arm": arm, "seed": seed, "steps": steps, "seconds": seconds, "dataset": data[4],
            "dev_loss": run.meta["final_metrics"].get("dev_loss"),
            "auroc_all_junk": detection_metrics(value, noisy)["auroc"], **loss_auroc,
            "auroc_junk_in_real_tasks": detection_metrics(value[real], noisy[real])["auroc"],
            "junk_task_rank": int(tasks.loc["junk", "rank"]), "n_tasks": len(tasks),
            "lowest_task": str(tasks["mean_value"].idxmin()), "run": str(out)}


def _subset_runs(data, folder: Path, seed: int, steps: int, device: str, rec: Records) -> None:
    """Uniform fine-tuning on half the rows, chosen from the same seed's BADS runs (per example, per task), its DDS
    run (mean reward, per task) or at random; dev and held-out test loss at every evaluation."""
    from valuekit.data.instructions import load_instructions
    from valuekit.export.instructions import score_instructions
    from valuekit.training.loop import run_training

    table, model, tr, dv, dataset = data
    # the test strings are held out of training and of the dev set the methods learn from: the honest check of a half
    # chosen with the dev set's help (DDS's rewards, BADS's dev term)
    te = load_instructions(_data_folder(folder, dataset) / "test.parquet", max_len=MAX_LEN, name="test")
    bads = rec.get(kind="value", arm="bads", seed=seed, steps=steps, dataset=dataset)["run"]
    per_task = rec.get(kind="value", arm="bads-per-task", seed=seed, steps=steps, dataset=dataset)
    random_half = {}
    for name, offset in (("random50", 100), ("random50-b", 200)):
        random_half[name] = np.zeros(len(table), bool)
        random_half[name][np.random.default_rng(offset + seed).choice(len(table), len(table) // 2, replace=False)] = (
            True
        )
    keep = {"bads-per-task-top50": lambda: score_instructions(table, bads, keep_fraction=0.5, per_task=True).selected,
            "bads-top50": lambda: score_instructions(table, bads, keep_fraction=0.5).selected,
            "random50": lambda: random_half["random50"], "random50-b": lambda: random_half["random50-b"]}
    if per_task is not None:  # the task-weight half needs that seed's per-task run
        keep["bads-task-weights-top50"] = lambda: score_instructions(table, per_task["run"], keep_fraction=0.5).selected
    dds = rec.get(kind="value", arm="dds", seed=seed, steps=steps, dataset=dataset)
    if dds is not None:
        keep["dds-reward-per-task-top50"] = lambda: (
            score_instructions(table, dds["run"], keep_fraction=0.5, per_task=True, rank_by="mean_reward").selected
        )
    for name in SUBSETS:
        if name not in keep or rec.has(kind="subset", arm=name, seed=seed, steps=steps, dataset=dataset):
            continue
        mask = np.asarray(keep[name](), bool)
        sub = table[mask].reset_index(drop=True)
        run = completed(run_training(load_instructions(sub, max_len=MAX_LEN), dv, te,
                              out=fresh(folder / _run_name(f"ft-{name}", dataset, seed, steps)),
                              config=_config("uniform", model, steps, seed, device)))
        rec.add(
            {
                "kind": "subset",
                "arm": name,
                "seed": seed,
                "steps": steps,
                "dataset": dataset,
                "rows": int(mask.sum()),
                "junk_rows_kept": int(sub.is_noisy.sum()),
                "dev_loss": run.meta["final_metrics"].get("dev_loss"),
                "best_dev_loss": best_dev_loss(run),
                "test_loss": run.meta["final_metrics"].get("test_loss"),
                "early_test_loss": early_stopped_test_loss(run),
            }
        )


def best_dev_loss(run) -> float:
    """The lowest of a run's dev evaluations (every steps/4): the fine-tuned model early-stopped on dev."""
    dev = run.metrics()["dev_loss"].dropna()
    return float(dev.min()) if len(dev) else float("nan")


def early_stopped_test_loss(run) -> float:
    """The test loss at the evaluation with the lowest dev loss (early stopping on dev, judged on test)."""
    m = run.metrics()
    m = m[m["dev_loss"].notna() & m["test_loss"].notna()] if "test_loss" in m else m.iloc[:0]
    return float(m["test_loss"].loc[m["dev_loss"].idxmin()]) if len(m) else float("nan")


def _timing(data, steps: int, device: str, arms) -> dict:
    """Median step time per arm, steps interleaved in one process (after 5 warm-up steps)."""
    from valuekit.training.context import Batch
    from valuekit.training.loop import make_trainer

    table, model, tr, dv, _ = data
    spec = {**ARMS, **TIMED_ONLY}
    trainers = {
        a: make_trainer(
            tr, dv, _config(spec[a][0], model, steps, 0, device, LORA if a.endswith("-lora") else 0), spec[a][1]
        )
        for a in arms
    }  # (LoRA arms time the adapters on the random-weight model)
    times = {a: [] for a in trainers}
    for step in range(1, steps + 1):
        for a, (trainer, sampler, ctx) in trainers.items():
            idx = sampler.next(BATCH)
            b = Batch(step=step, idx=idx, x=ctx.x[idx], y=ctx.y[idx], source=ctx.source[idx])
            t = time.perf_counter()
            trainer.step(b)
            times[a].append(time.perf_counter() - t)
    warm = min(5, steps - 1)
    # the mean is what a run pays when steps differ in cost (BADS with dev_every > 1 runs its dev rows on some steps)
    return {"kind": "timing", "steps": steps, **{f"step_s_{a}": float(np.median(v[warm:])) for a, v in times.items()},
            **{f"mean_step_s_{a}": float(np.mean(v[warm:])) for a, v in times.items()}}


def _padding(tr, seed: int = 0, batches: int = 2000) -> dict:
    """Share of padded token positions in a batch: every row padded to MAX_LEN, random batches trimmed to their
    longest row, and length buckets (valuekit.training.samplers.LengthBucketSampler, what LM runs use)."""
    import torch

    from valuekit.models.lm import token_lengths
    from valuekit.training.samplers import LengthBucketSampler

    lengths = token_lengths(tr.x)
    row = {"kind": "padding", "no_trim": 1 - lengths.float().mean().item() / MAX_LEN}
    for name, sampler in (("random_trimmed", None), ("length_buckets", LengthBucketSampler(
            lengths, torch.Generator().manual_seed(seed)))):
        g = torch.Generator().manual_seed(seed)
        shares = []
        for _ in range(batches):
            i = torch.randperm(len(lengths), generator=g)[:BATCH] if sampler is None else sampler.next(BATCH)
            shares.append(1 - lengths[i].sum().item() / (BATCH * lengths[i].max().item()))
        row[name] = float(np.mean(shares))
    return row


def _run_name(arm: str, dataset: str, seed: int, steps: int) -> str:
    return f"{arm}-s{seed}-{steps}" if dataset == "instructions" else f"{arm}-{dataset}-s{seed}-{steps}"


def _data_folder(folder: Path, dataset: str) -> Path:
    return folder / ("data" if dataset == "instructions" else f"data-{dataset}")


def _prepare(folder: Path, dataset: str = "instructions"):
    from valuekit.data.instructions import load_instructions, prepare_instructions

    paths = prepare_instructions(_data_folder(folder, dataset), **DATA, **DATASETS[dataset], seed=0)
    table = pd.read_parquet(paths["train"])
    return (table, gpt_config(folder / "gpt2-tiny"), load_instructions(table, max_len=MAX_LEN),
            load_instructions(paths["dev"], max_len=MAX_LEN, name="dev"), dataset)


def run_llm(out: Path, *, command: str, device: str = "cpu", quick: bool = False, seeds=None, steps=None,
            datasets=None, methods=None, runs_dir=None, report_only=False) -> Path:
    """Value runs for every (seed, arm), subset runs when bads ran, timing and padding; tables in OUT."""
    seeds, steps = list(seeds or (0, 1, 2)), steps or 300
    arms = [a for a in ARMS if (a in methods if methods else a in DEFAULT_ARMS)]
    if any(a.endswith("-lora") for a in arms) and "uniform" not in arms:
        arms = ["uniform", *arms]  # the LoRA arms start from the uniform run's model
    timing_steps = 120  # 115 timed steps: ~29 cycles of BADS's dev_every=4, so the mean step is what a run pays
    if quick:
        seeds, steps, timing_steps = seeds[:1], max(8, steps // 15), 8
    datasets = list(datasets or ("instructions",))
    with work_folder(runs_dir, "llm") as folder:
        rec = Records(folder, ("kind", "arm", "seed", "steps", "dataset"), report_only=report_only)
        first = None  # the first set's data: timing and padding use it
        for dataset in datasets:
            data = None if report_only else _prepare(folder, dataset)
            first = first or data
            for seed in seeds:
                for arm in arms:
                    if not rec.has(kind="value", arm=arm, seed=seed, steps=steps, dataset=dataset):
                        rec.add(
                            _value_run(arm, data, folder / _run_name(arm, dataset, seed, steps), seed, steps, device)
                        )
                if "bads" in arms and not report_only:
                    _subset_runs(data, folder, seed, steps, device, rec)
        if not rec.has(kind="timing", arm=None, seed=None, steps=timing_steps, dataset=None):
            timed = [*arms, *(TIMED_ONLY if "bads" in arms else ())]
            rec.add({**_timing(first, timing_steps, device, timed), "arm": None, "seed": None, "dataset": None})
        if not rec.has(kind="padding", arm=None, seed=None, steps=None, dataset=None):
            rec.add({**_padding(first[2]), "arm": None, "seed": None, "steps": None, "dataset": None})
        rows = [r for r in rec.rows if r["kind"] in ("timing", "padding")
                or (r["seed"] in seeds and r["steps"] == steps and r["arm"] in (*arms, *SUBSETS)
                    and r.get("dataset") in datasets)]
        rows = [r for r in rows if r["kind"] != "timing" or r["steps"] == timing_steps]
        n_rows = {d: len(pd.read_parquet(_data_folder(folder, d) / "train.parquet", columns=["id"])) for d in datasets}
        return _markdown(pd.DataFrame(rows), out, command, device, steps, n_rows)


def _markdown(frame: pd.DataFrame, out: Path, command: str, device: str, steps: int, n_rows: dict) -> Path:
    from valuekit.bench.common import header, write

    sets = "; ".join(f"{d}: {DATASETS[d] or 'the defaults'} ({n:,} training rows)" for d, n in n_rows.items())
    lines = header("Language-model data selection on the prepared instruction sets", command, device) + [
        f"Data: `valuekit data prepare instructions` with {DATA}, per set: {sets}. Model: `hf-config:` "
        f"GPT-2 {GPT}, {MAX_LEN} positions, random weights from the seed; byte tokenizer, --max-len {MAX_LEN}, "
        f"batch {BATCH}, {steps} steps, Adam lr {LR:g} (not BADS: its lr_theta); BADS settings {BADS}. AUROC ranks "
        f"low value as junk."
    ]
    if frame.arm.astype(str).str.endswith("-lora").any():
        lines += [
            f"LoRA arms (`*-lora`): `--lora {LORA}` (alpha {2 * LORA}, peft's GPT-2 default module `c_attn`) on the "
            f"model the same seed's uniform run ended with (saved as an `hf:` folder), {steps} more steps."
        ]
    lines += [""]
    val = frame[frame.kind == "value"].sort_values(["dataset", "arm", "seed"])
    lines += md_table(
        [
            "data set",
            "method",
            "seed",
            "dev loss",
            "AUROC junk rows (all)",
            "AUROC junk rows in real tasks",
            "junk task rank (1 = best)",
            "lowest-valued task",
        ],
        [
            [
                r.dataset,
                r.arm,
                int(r.seed),
                f"{r.dev_loss:.3f}",
                f"{r.auroc_all_junk:.3f}",
                f"{r.auroc_junk_in_real_tasks:.3f}",
                f"{int(r.junk_task_rank)} of {int(r.n_tasks)}",
                r.lowest_task,
            ]
            for r in val.itertuples()
        ],
    ) + [""]
    extra = ("auroc_posterior_mean", "auroc_mean_loss", "auroc_last_loss")
    lines += md_table(
        [
            "data set",
            "method",
            "seeds",
            "dev loss",
            "AUROC (all)",
            "AUROC (in real tasks)",
            "junk task lowest",
            "AUROC posterior mean (all)",
            "AUROC -mean_loss (all)",
            "AUROC -last_loss (all)",
        ],
        [
            [
                d,
                a,
                len(g),
                mean_sd(g.dev_loss),
                mean_sd(g.auroc_all_junk),
                mean_sd(g.auroc_junk_in_real_tasks),
                f"{int((g.junk_task_rank == g.n_tasks).sum())} of {len(g)}",
                *[mean_sd(g[c]) if c in g and g[c].notna().all() else "-" for c in extra],
            ]
            for (d, a), g in val.groupby(["dataset", "arm"], sort=False)
        ],
    ) + [
        "",
        "AUROC ranks a low value as junk; the last three columns rank the same run's BADS posterior mean of w, "
        "-mean_loss and -last_loss (the loss at each row's latest step) the same way.",
        "",
    ]
    sub = frame[frame.kind == "subset"]
    if len(sub):
        lines += [
            "Uniform fine-tuning on half the rows (from the same seed's per-example or per-task BADS run, its DDS "
            "run's "
            "mean reward, or random):",
            "",
        ]
        body = []
        for c in ("best_dev_loss", "early_test_loss"):
            if c not in sub:
                sub = sub.assign(**{c: np.nan})
        order = {name: i for i, name in enumerate(SUBSETS)}  # rows: data set, then the halves in SUBSETS' order
        sub = sub.assign(_o=sub.arm.map(order)).sort_values(["dataset", "_o", "seed"], kind="stable")
        for (d, a), g in sub.groupby(["dataset", "arm"], sort=False):
            rand = {
                arm: sub[(sub.arm == arm) & (sub.dataset == d)].set_index("seed") for arm in ("random50", "random50-b")
            }
            lower = {(c, arm): int(sum(getattr(r, c) < rand[arm][c].get(r.seed, np.nan) for r in g.itertuples()))
                     for c in ("dev_loss", "best_dev_loss", "early_test_loss") for arm in rand}
            both = lambda c, lower=lower, g=g: f"{lower[c, 'random50']} / {lower[c, 'random50-b']} of {len(g)}"  # noqa: E731
            body.append([d, a, len(g), int(g.rows.iloc[0]), "/".join(str(int(v)) for v in g.junk_rows_kept),
                         "/".join(f"{v:.3f}" for v in g.dev_loss), f"{lower['dev_loss', 'random50']} of {len(g)}",
                         "/".join(f"{v:.3f}" for v in g.best_dev_loss), both("best_dev_loss"),
                         "/".join(f"{v:.3f}" for v in g.early_test_loss), both("early_test_loss")])
        lines += md_table(
            [
                "data set",
                "subset",
                "seeds",
                "rows",
                "junk rows kept",
                "final dev loss per seed",
                "lower than random50",
                "best dev loss per seed (early-stopped)",
                "lower than random50 / random50-b (best dev)",
                "test loss at the best dev step per seed",
                "lower than random50 / random50-b (test)",
            ],
            body,
        ) + [
            "",
            "random50-b is a second random half (another draw): how often it beats random50 is the noise these "
            "comparisons sit in. The test strings are in neither the training nor the dev set; every method that "
            "chose a "
            "half saw the dev set (DDS's rewards, BADS's dev term), so the test column is the unbiased comparison.",
            "",
        ]
    for r in frame[frame.kind == "timing"].tail(1).to_dict("records"):  # the latest (resumed grids may hold more)
        base = r.get("step_s_uniform", np.nan)
        parts = [f"{a[7:]} {v:.3f} s ({v / base:.2f}x uniform)" for a, v in r.items()
                 if a.startswith("step_s_") and np.isfinite(v)]
        lines += [
            f"Step time (median, {int(r['steps'])} interleaved steps, first 5 dropped): " + ", ".join(parts) + ".",
            "",
        ]
        mbase = r.get("mean_step_s_uniform", np.nan)
        parts = [f"{a[12:]} {v:.3f} s ({v / mbase:.2f}x uniform)" for a, v in r.items()
                 if a.startswith("mean_step_s_") and np.isfinite(v)]
        if parts:  # what a run pays: BADS with dev_every > 1 runs its dev rows on every k-th step only
            lines += ["Step time (mean of the same steps): " + ", ".join(parts) + ".", ""]
    for r in frame[frame.kind == "padding"].tail(1).to_dict("records"):
        lines += [f"Padded share of a batch of {BATCH}: {r['no_trim']:.3f} padded to --max-len, "
                  f"{r['random_trimmed']:.3f} random batches trimmed to their longest row, {r['length_buckets']:.3f} "
                  "with length buckets.", ""]
    return write(out, "suite-llm", lines, frame.drop(columns=["run"], errors="ignore"))


SUITES = (TextSuite("llm", "LM data selection: uniform / BADS / BADS per task / DDS / multi-source DDS", run_llm,
                    tuple(DATASETS), tuple(ARMS)),)
