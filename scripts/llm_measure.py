"""Issue 21 measurements (reports/llm.md): LM data selection on the prepared instruction set.

  python scripts/llm_measure.py value  --data DIR --seed S --steps K --out OUT   # uniform / bads / bads per-task
  python scripts/llm_measure.py subset --data DIR --seed S --steps K --out OUT   # fine-tune on top-50 % vs random 50 %
  python scripts/llm_measure.py timing --data DIR --steps K --out OUT            # interleaved step times
  python scripts/llm_measure.py padding --data DIR --out OUT                      # padding share per batch

Model: a 2-layer GPT-2 built from a config with random weights (hf-config:), byte-level tokenizer.
Every result is appended as one JSON line to OUT.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from valuekit.config import TrainConfig
from valuekit.instructions import load_instructions, score_instructions, task_table
from valuekit.trainers.base import Batch, make_trainer, train

MAX_LEN = 128
BADS = dict(precondition=True, lr_theta=1e-3, rho_theta=1.0, rho_w=100.0, temperature=0.01, burn_in=100)


def auroc(noisy: np.ndarray, score: np.ndarray) -> float:
    """P(score of a noisy row > score of a clean row), ties count half (Mann-Whitney)."""
    from scipy.stats import rankdata

    r = rankdata(score)
    n1, n0 = noisy.sum(), (~noisy).sum()
    return float((r[noisy].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def gpt_config(folder: Path) -> str:
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=259, n_positions=MAX_LEN, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    return f"hf-config:{folder}"


def cfg(method, model, steps, seed, lr=3e-3):
    return TrainConfig(method=method, model=model, steps=steps, batch_size=16, lr=lr, seed=seed, device="cpu",
                       eval_every=max(steps // 4, 1), log_every=100, checkpoint_every=10**6, progress=False,
                       eval_batch_size=128)


def value_runs(a, model, tr, dv, table):
    for name, method, mc in [("uniform", "uniform", {}), ("bads", "bads", BADS),
                             ("bads-per-task", "bads", {**BADS, "per_source": True})]:
        if a.methods and name not in a.methods.split(","):
            continue
        out = Path(a.work) / f"{name}-s{a.seed}"
        t = time.time()
        r = train(tr, dv, out=out, config=cfg(method, model, a.steps, a.seed), method_config=mc)
        scored = score_instructions(table, out)
        tasks = task_table(scored)
        noisy = scored.is_noisy.to_numpy()
        real = scored.task != "junk"
        rec = {"kind": "value", "method": name, "seed": a.seed, "steps": a.steps, "seconds": time.time() - t,
               "dev_loss": r.meta["final_metrics"].get("dev_loss"),
               "auroc_all_junk": auroc(noisy, -scored.value.to_numpy()),
               "auroc_junk_rows_in_real_tasks": auroc(noisy[real], -scored.value.to_numpy()[real]),
               "task_mean_value": dict(zip(tasks.task, tasks.mean_value.round(5))),
               "junk_task_rank": int(tasks.set_index("task").loc["junk", "rank"]), "n_tasks": len(tasks)}
        print(json.dumps(rec), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


def subset_runs(a, model, tr, dv, table):
    """Fine-tune (uniform) on half the rows chosen from the BADS run of the same seed, vs a random half."""
    run = Path(a.work) / f"bads-s{a.seed}"
    top = score_instructions(table, run, keep_fraction=0.5, per_task=True)
    glob = score_instructions(table, run, keep_fraction=0.5)
    rng = np.random.default_rng(100 + a.seed)
    rand = np.zeros(len(table), bool)
    rand[rng.choice(len(table), len(table) // 2, replace=False)] = True
    for name, keep in [("bads-per-task-top50", top.selected.to_numpy()), ("bads-top50", glob.selected.to_numpy()),
                       ("random50", rand)]:
        sub = table[keep].reset_index(drop=True)
        d = load_instructions(sub, max_len=MAX_LEN)
        out = Path(a.work) / f"ft-{name}-s{a.seed}"
        r = train(d, dv, out=out, config=cfg("uniform", model, a.steps, a.seed))
        rec = {"kind": "subset", "subset": name, "seed": a.seed, "steps": a.steps, "rows": int(keep.sum()),
               "junk_rows_kept": int(sub.is_noisy.sum()), "dev_loss": r.meta["final_metrics"].get("dev_loss")}
        print(json.dumps(rec), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


def timing(a, model, tr, dv):
    """Median step time of uniform and BADS, steps interleaved in one process (OMP_NUM_THREADS=1)."""
    trainers = {}
    for name, method, mc in [("uniform", "uniform", {}), ("bads", "bads", BADS),
                             ("bads-per-task", "bads", {**BADS, "per_source": True})]:
        trainers[name] = make_trainer(tr, dv, cfg(method, model, a.steps, 0), mc)
    times = {k: [] for k in trainers}
    for step in range(1, a.steps + 1):
        for name, (trainer, sampler, ctx) in trainers.items():
            idx = sampler.next(16)
            b = Batch(step=step, idx=idx, x=ctx.x[idx], y=ctx.y[idx], source=ctx.source[idx])
            t = time.perf_counter()
            trainer.step(b)
            times[name].append(time.perf_counter() - t)
    med = {k: float(np.median(v[5:])) for k, v in times.items()}
    rec = {"kind": "timing", "steps": a.steps, "median_step_s": med,
           "bads_over_uniform": med["bads"] / med["uniform"],
           "bads_per_task_over_uniform": med["bads-per-task"] / med["uniform"]}
    print(json.dumps(rec), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def padding(a):
    """Share of padded token positions per batch of 16: random batches (trimmed to their longest row) vs
    length buckets, and with no trimming at all."""
    from valuekit.lm import LengthBucketSampler, token_lengths

    L = token_lengths(load_instructions(Path(a.data) / "train.parquet", max_len=MAX_LEN).x)
    rec = {"kind": "padding", "max_len": MAX_LEN, "no_trim": 1 - L.float().mean().item() / MAX_LEN}
    for name, sampler in [("random_trimmed", None),
                          ("length_buckets", LengthBucketSampler(L, torch.Generator().manual_seed(a.seed)))]:
        g = torch.Generator().manual_seed(a.seed)
        shares = []
        for _ in range(2000):
            i = torch.randperm(len(L), generator=g)[:16] if sampler is None else sampler.next(16)
            shares.append(1 - L[i].sum().item() / (16 * L[i].max().item()))
        rec[name] = float(np.mean(shares))
    print(json.dumps(rec), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def summarize(a):
    """Markdown tables from the JSON lines in --out."""
    recs = [json.loads(line) for line in open(a.out)]
    val = pd.DataFrame([r for r in recs if r["kind"] == "value"])
    if len(val):
        print("| method | seed | steps | dev loss | AUROC junk rows (all) | AUROC junk rows in real tasks | junk task rank (1 = best) | lowest-valued task |")
        print("|---|---|---|---|---|---|---|---|")
        for r in val.sort_values(["method", "seed"]).itertuples():
            low = min(r.task_mean_value, key=r.task_mean_value.get)
            print(f"| {r.method} | {r.seed} | {r.steps} | {r.dev_loss:.3f} | {r.auroc_all_junk:.3f} | "
                  f"{r.auroc_junk_rows_in_real_tasks:.3f} | {r.junk_task_rank} of {r.n_tasks} | {low} |")
        print()
    sub = pd.DataFrame([r for r in recs if r["kind"] == "subset"])
    if len(sub):
        print("| subset (fine-tuned with uniform) | seed | rows | junk rows kept | dev loss |")
        print("|---|---|---|---|---|")
        for r in sub.sort_values(["seed", "subset"]).itertuples():
            print(f"| {r.subset} | {r.seed} | {r.rows} | {r.junk_rows_kept} | {r.dev_loss:.4f} |")
        print()
    for r in recs:
        if r["kind"] in ("timing", "padding"):
            print(json.dumps(r))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["value", "subset", "timing", "padding", "summarize"])
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/llm_runs")
    p.add_argument("--methods", default="", help="value: comma-separated subset of uniform,bads,bads-per-task")
    a = p.parse_args()
    if a.what == "padding":
        return padding(a)
    if a.what == "summarize":
        return summarize(a)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    model = gpt_config(Path(a.work) / f"gpt2-tiny-{a.what}-s{a.seed}")  # one folder per process: no write race
    table = pd.read_parquet(Path(a.data) / "train.parquet")
    tr = load_instructions(table, max_len=MAX_LEN)
    dv = load_instructions(Path(a.data) / "dev.parquet", max_len=MAX_LEN)
    if a.what == "value":
        value_runs(a, model, tr, dv, table)
    elif a.what == "subset":
        subset_runs(a, model, tr, dv, table)
    else:
        timing(a, model, tr, dv)


if __name__ == "__main__":
    main()
