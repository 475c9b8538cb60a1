"""DDS benchmarks for reports/dds.md: class balance under imbalance, label noise, step-time overhead.

    python reports/scripts/dds.py                 # everything (about 10 min on a 2-core CPU)
    python reports/scripts/dds.py --only speed    # one part: balance | noise | speed

`step_time_ratio(...)` is reusable (e.g. by `valuekit bench speed`): it times uniform and DDS
trainers side by side in one process, interleaved step by step, warm-up excluded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / "reports"
CACHE = Path("/tmp/valuekit-dds-report")


# ---------------------------------------------------------------- speed


def make_context(train_data, dev_data, config, *, device="cpu"):
    """The TrainContext that `train()` builds (valuekit.trainers.base.build_context), without a run directory."""
    from valuekit.trainers.base import build_context, resolve_device

    return build_context(train_data.trainer_view(), dev_data, config, resolve_device(device))


def step_time_ratio(train_data, dev_data, *, model="mlp", batch_size=64, variants=None, steps=150, warmup=20,
                    device="cpu", seed=0) -> dict:
    """Median step time of each DDS variant divided by uniform's, at equal batch size.

    All trainers live in one process and take turns step by step on the same batches (so machine
    load drifts hit them alike); the first `warmup` steps are not timed. `variants` maps a label to
    a dds Config dict (default: one per reward method). Returns {"uniform_ms": .., label: {"ms", "ratio"}}.
    """
    from valuekit.trainers import dds, uniform
    from valuekit.trainers.base import Batch, TrainConfig

    variants = variants or {m: {"reward_method": m, "update_every": 1} for m in ("exact", "taylor", "ghost", "fused")}
    cfg = TrainConfig(model=model, batch_size=batch_size, seed=seed, progress=False)
    trainers = {"uniform": uniform.Trainer(make_context(train_data, dev_data, cfg, device=device), uniform.Config())}
    for label, mc in variants.items():
        # warm-up 0 inside DDS: every timed step is a full Algorithm-1 step
        trainers[label] = dds.Trainer(make_context(train_data, dev_data, cfg, device=device),
                                      dds.Config(**{"scorer_warmup": 0, **mc}))
    g = torch.Generator().manual_seed(seed)
    times = {k: [] for k in trainers}
    cpu = {k: [] for k in trainers}  # thread CPU time: immune to preemption on a shared machine (CPU runs only)
    n = len(train_data.y)
    for s in range(warmup + steps):
        idx = torch.randperm(n, generator=g)[:batch_size]
        order = list(trainers)
        order = order[s % len(order):] + order[: s % len(order)]  # rotate who goes first
        for k in order:
            tr = trainers[k]
            dev = tr.ctx.device
            b = Batch(step=s + 1, idx=idx.to(dev), x=tr.ctx.x[idx.to(dev)], y=tr.ctx.y[idx.to(dev)])
            t0, c0 = time.perf_counter(), time.thread_time()
            tr.step(b)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if s >= warmup:
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.thread_time() - c0)
    def p10(ts):
        return float(np.percentile(ts, 10))

    base, base10, base_mean = statistics.median(times["uniform"]), p10(times["uniform"]), statistics.fmean(times["uniform"])
    out = {"uniform_ms": base * 1e3, "uniform_p10_ms": base10 * 1e3, "uniform_mean_ms": base_mean * 1e3}
    cbase, cbase_mean = statistics.median(cpu["uniform"]), statistics.fmean(cpu["uniform"])
    out.update(uniform_cpu_ms=cbase * 1e3, uniform_cpu_mean_ms=cbase_mean * 1e3)
    for k in variants:
        med, mean = statistics.median(times[k]), statistics.fmean(times[k])
        cmed, cmean = statistics.median(cpu[k]), statistics.fmean(cpu[k])
        out[k] = {"ms": med * 1e3, "ratio": med / base, "p10_ms": p10(times[k]) * 1e3, "p10_ratio": p10(times[k]) / base10,
                  "mean_ms": mean * 1e3, "mean_ratio": mean / base_mean,
                  "cpu_ms": cmed * 1e3, "cpu_ratio": cmed / cbase, "cpu_mean_ratio": cmean / cbase_mean}
    return out


# ---------------------------------------------------------------- data and runs


def prepared(name, **kw) -> Path:
    from valuekit.datasets import prepare

    tag = name + "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
    out = CACHE / "data" / tag
    if not (out / "test.parquet").exists():
        prepare(name, out, **kw)
    return out


def tables(folder: Path):
    from valuekit.datasets import load_table

    tr = load_table(folder / "train.parquet", name="train")
    return tr, load_table(folder / "dev.parquet", like=tr, name="dev"), load_table(folder / "test.parquet", like=tr, name="test")


def run(folder: Path, method: str, *, steps: int, seed: int = 0, model="mlp", mcfg=None, tag=""):
    from valuekit.trainers.base import TrainConfig, train

    tr, dv, te = tables(folder)
    out = CACHE / "runs" / f"{folder.name}-{method}{tag}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(method=method, model=model, steps=steps, seed=seed, eval_every=steps, log_every=200,
                      checkpoint_every=10**9, progress=False)
    return train(tr, dv, te, out=out, config=cfg, method_config=mcfg or {}), tr


def auroc(score_clean, is_noisy) -> float:
    """P(value of a random clean row > value of a random noisy row) (ties count 1/2)."""
    from scipy.stats import rankdata

    r = rankdata(score_clean)
    pos = ~is_noisy
    n1, n0 = pos.sum(), is_noisy.sum()
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# ---------------------------------------------------------------- experiments


def exp_balance(steps: dict) -> tuple[list[str], list]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from valuekit.analysis.balance import (class_balance, class_balance_over_steps, kl, plot_class_balance,
                                           plot_class_balance_over_steps)

    lines = ["| data (imbalance 10, balanced dev) | variant | steps | KL(dev ‖ scorer mass) | KL(dev ‖ batch-weight mass, last 5% of steps) "
             "| KL(dev ‖ empirical) | test acc | test acc uniform |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name in ("digits", "mnist5k"):
        folder = prepared(name, imbalance=10.0)
        u, _ = run(folder, "uniform", steps=steps[name])
        for variant, mc in (("DDS (defaults)", {}), ("DDS + class_balance prior", {"prior": "class_balance"})):
            tag = "" if not mc else "-prior"
            r, _ = run(folder, "dds", steps=steps[name], mcfg=mc, tag=tag)
            cb = class_balance(r)
            over = class_balance_over_steps(r, bins=20)
            last = over[over["step"] == over["step"].max()].set_index("class")["mass"].reindex(cb["class"]).fillna(0)
            kl_last = kl(cb["dev"].to_numpy(), last.to_numpy())
            lines.append(f"| {name} | {variant} | {steps[name]} | {cb.attrs['kl_scorer_dev']:.4f} | {kl_last:.4f} | "
                         f"{cb.attrs['kl_empirical_dev']:.4f} | {r.meta['final_metrics']['test_acc']:.4f} | "
                         f"{u.meta['final_metrics']['test_acc']:.4f} |")
            print(lines[-1], flush=True)
            fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
            plot_class_balance(cb, ax=axes[0])
            plot_class_balance_over_steps(over, ax=axes[1])
            axes[0].set_title(f"{name}, imbalance 10, {variant}: " + axes[0].get_title(), fontsize=8)
            fig.tight_layout()
            fig.savefig(REPORTS / f"dds_balance_{name}{tag.replace('-', '_')}.png", dpi=100)
            plt.close(fig)
            rows.append({"data": name, "variant": variant, **cb.attrs, "kl_last_bin": kl_last,
                         "table": cb.round(4).to_dict("records")})
    return lines, rows


def exp_noise(steps: dict, seeds=(0, 1)) -> tuple[list[str], list]:
    lines = ["| data | flips | seed | AUROC of DDS value (clean > noisy) | mean weight noisy / clean (DDS) | test acc DDS "
             "| test acc uniform | reference: AUROC of uniform's value (-mean loss) |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name in ("digits", "mnist5k"):
        for noise in (0.2, 0.4):
            folder = prepared(name, noise=noise)
            for seed in seeds:
                r, tr = run(folder, "dds", steps=steps[name], seed=seed)
                u, _ = run(folder, "uniform", steps=steps[name], seed=seed)
                v = r.values().set_index("example_id").loc[tr.ids]
                a = auroc(v["value"].to_numpy(), tr.is_noisy)
                vu = u.values().set_index("example_id").loc[tr.ids]["value"].to_numpy()
                au = auroc(np.nan_to_num(vu, nan=-np.inf), tr.is_noisy)
                wn, wc = v["weight"][tr.is_noisy].mean(), v["weight"][~tr.is_noisy].mean()
                ta, tu = r.meta["final_metrics"]["test_acc"], u.meta["final_metrics"]["test_acc"]
                lines.append(f"| {name} | {noise:.0%} | {seed} | {a:.3f} | {wn:.3f} / {wc:.3f} | {ta:.4f} | {tu:.4f} | {au:.3f} |")
                rows.append({"data": name, "noise": noise, "seed": seed, "auroc": a, "auroc_uniform": au, "w_noisy": wn, "w_clean": wc,
                             "test_dds": ta, "test_uniform": tu})
                print(lines[-1], flush=True)
    return lines, rows


def exp_speed(steps=300, warmup=30) -> tuple[list[str], list]:
    folder = ROOT / "data" / "digits-noisy20"
    tr, dv, _ = tables(folder)
    lines = ["| model | reward, scorer update every k | uniform ms (wall median / CPU median) | DDS ms (wall / CPU median) "
             "| **DDS / uniform, wall median** | wall p10 ratio | **CPU-time median ratio** | CPU-time mean ratio (amortised over k) |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    variants = {f"{m}, k=1": {"reward_method": m, "update_every": 1} for m in ("exact", "taylor", "ghost", "fused")}
    variants["exact, k=4"] = {"reward_method": "exact", "update_every": 4}
    variants["fused, k=2"] = {"reward_method": "fused", "update_every": 2}
    variants["fused, k=4"] = {"reward_method": "fused", "update_every": 4}
    for model in ("mlp", "cnn"):
        res = step_time_ratio(tr, dv, model=model, batch_size=64, variants=variants, steps=steps, warmup=warmup)
        for k in variants:
            lines.append(f"| {model} | {k} | {res['uniform_ms']:.2f} / {res['uniform_cpu_ms']:.2f} | {res[k]['ms']:.2f} / "
                         f"{res[k]['cpu_ms']:.2f} | {res[k]['ratio']:.2f}x | {res[k]['p10_ratio']:.2f}x | "
                         f"{res[k]['cpu_ratio']:.2f}x | {res[k]['cpu_mean_ratio']:.2f}x |")
        rows.append({"model": model, **res})
        print("\n".join(lines[-len(variants):]), flush=True)
    return lines, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("balance", "noise", "speed"), action="append")
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    parts = args.only or ["balance", "noise", "speed"]
    results_path = CACHE / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    steps = {"digits": 800, "mnist5k": 1000}
    t0 = time.time()
    if "balance" in parts:
        results["balance"] = exp_balance(steps)
    if "noise" in parts:
        results["noise"] = exp_noise(steps, seeds=tuple(range(args.seeds)))
    if "speed" in parts:
        results["speed"] = exp_speed()
    results.setdefault("elapsed", {})
    for k in parts:
        results["elapsed"][k] = round(time.time() - t0, 1)
    CACHE.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1, default=float))
    write_markdown(results)
    return 0


START, END = "<!-- results:start (written by reports/scripts/dds.py) -->", "<!-- results:end -->"


def write_markdown(results: dict) -> None:
    """Replace the generated block of reports/dds.md with the tables of `results`."""
    titles = {"balance": "### (a) class balance, imbalance 10, balanced dev",
              "noise": "### (b) symmetric label flips",
              "speed": "### (c) step time, DDS / uniform, batch 64, digits (8x8), one process, interleaved"}
    block = [START]
    for k in ("balance", "noise", "speed"):
        if k in results:
            block += ["", titles[k], "", *results[k][0]]
    block += ["", f"elapsed seconds per part (cumulative in one invocation): {results.get('elapsed', {})}", END]
    md = REPORTS / "dds.md"
    text = md.read_text() if md.exists() else f"# DDS\n\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    md.write_text(head + "\n".join(block) + tail)
    print("\n".join(block))


if __name__ == "__main__":
    sys.exit(main())
