"""BADS (Bayesian data point selection by SGLD) on the paper's scenarios with our data.

Run: python reports/scripts/bads.py   (writes reports/bads.md, reports/bads_noise.png,
reports/bads_balance.png; about 10 minutes on a 2-core CPU). `--render-only` re-writes bads.md from
the numbers cached in $TMPDIR/valuekit-bads-report by the last full run; `--timing-only` re-measures
the step times alone (when the shared machine was busy) and re-renders.

Scenarios (each prepared with `valuekit data prepare`, dev = 10 clean rows per class, balanced):
  mnist-imb10      mnist5k --imbalance 10
  mnist-noise40    mnist5k --noise 0.4
  fashion-noise40  fashion-mnist --max-train 5000 --test-fraction 0.05 --noise 0.4
Methods: uniform (Adam, the project's baseline), bads (defaults), bads with noise_every=4 (cheaper
noise), bads with weight_net=True, and "sgld-fixed-w" (bads with lr_w = 1e-12: the same SGLD
sampler with every weight frozen at init_weight) to tell the effect of the weights apart from the
effect of the sampler.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from valuekit.analysis.balance import class_balance, plot_class_balance  # noqa: E402
from valuekit.datasets import load_table, prepare  # noqa: E402
from valuekit.models import feature_stats  # noqa: E402
from valuekit.trainers import bads, uniform  # noqa: E402
from valuekit.trainers.base import Batch, RandomSampler, TrainConfig, TrainContext, train  # noqa: E402

REPORTS = Path(__file__).resolve().parents[1]
STEPS, BATCH, SEEDS = 1500, 64, (0, 1)
SCENARIOS = {
    "mnist-imb10": ("mnist5k", {"imbalance": 10}),
    "mnist-noise40": ("mnist5k", {"noise": 0.4}),
    "fashion-noise40": ("fashion-mnist", {"noise": 0.4, "max_train": 5000, "test_fraction": 0.05}),
}
METHODS = {
    "uniform": ("uniform", {}),
    "bads": ("bads", {}),
    "bads noise_every=4": ("bads", {"noise_every": 4}),
    "bads weight_net": ("bads", {"weight_net": True}),
    "sgld-fixed-w": ("bads", {"lr_w": 1e-12}),
}
TIMING_STEPS, TIMING_WARMUP = 1100, 100


def run_all(tmp: Path) -> tuple[pd.DataFrame, dict]:
    rows, keep = [], {}
    for scen, (name, opts) in SCENARIOS.items():
        paths = prepare(name, tmp / scen, seed=0, **opts)
        tr = load_table(paths["train"])
        dev = load_table(paths["dev"], like=tr, name="dev")
        test = load_table(paths["test"], like=tr, name="test")
        noisy = None if tr.is_noisy is None or not np.asarray(tr.is_noisy).any() else np.asarray(tr.is_noisy)
        for seed in SEEDS:
            for label, (method, mc) in METHODS.items():
                cfg = TrainConfig(method=method, model="mlp", steps=STEPS, batch_size=BATCH, seed=seed, device="cpu",
                                  progress=False, eval_every=STEPS // 5, checkpoint_every=STEPS, log_every=500)
                t0 = time.perf_counter()
                run = train(tr, dev, test, out=tmp / f"run-{scen}-{label}-{seed}", config=cfg, method_config=mc)
                wall = time.perf_counter() - t0
                v = run.values().set_index("example_id").loc[tr.ids]
                bal = class_balance(run)
                row = {"scenario": scen, "method": label, "seed": seed, "n_train": len(tr),
                       "test_acc": run.meta["final_metrics"]["test_acc"], "wall_s": wall,
                       "kl_mass_dev": bal.attrs["kl_scorer_dev"], "kl_train_dev": bal.attrs["kl_empirical_dev"]}
                if noisy is not None and label != "sgld-fixed-w":  # all w equal there: nothing to rank
                    value = v["value"].to_numpy()
                    row["auroc"] = roc_auc_score(~noisy, value)  # higher value = clean
                    if "ci_high" in v:
                        clean_median = np.median(value[~noisy])
                        row["w_clean"], row["w_noisy"] = value[~noisy].mean(), value[noisy].mean()
                        row["noisy_ci_below"] = float(np.mean(v["ci_high"].to_numpy()[noisy] < clean_median))
                        row["clean_ci_below"] = float(np.mean(v["ci_high"].to_numpy()[~noisy] < clean_median))
                if "ci_high" in v:
                    ok = (v["ci_low"] <= v["value"]) & (v["value"] <= v["ci_high"])
                    row["ci_contains_mean"] = float(ok[v["ci_low"].notna()].mean())
                    row["samples_per_row"] = float(v["samples"].mean())
                rows.append(row)
                print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
                if seed == SEEDS[0] and label == "bads":
                    keep[scen] = {"values": v.reset_index(), "noisy": noisy, "balance": bal,
                                  "y": tr.y.numpy(), "classes": tr.classes}
                if seed == SEEDS[0] and scen == "mnist-imb10" and label == "uniform":
                    keep["imb-uniform-balance"] = bal
    return pd.DataFrame(rows), keep


def timing(tmp: Path) -> tuple[pd.DataFrame, dict]:
    """Per-step time of uniform and bads variants, interleaved step by step in this one process."""
    paths = prepare("mnist5k", tmp / "timing", noise=0.4, seed=0)
    tr = load_table(paths["train"])
    dev = load_table(paths["dev"], like=tr, name="dev")
    view = tr.trainer_view()
    mean, std = feature_stats(view.x, view.image_shape)

    def ctx():
        return TrainContext(config=TrainConfig(model="mlp", batch_size=BATCH), device=torch.device("cpu"),
                            generator=torch.Generator().manual_seed(0), x=view.x, y=view.y, ids=view.ids,
                            num_classes=view.num_classes, classes=view.classes, dev_x=dev.x, dev_y=dev.y,
                            image_shape=view.image_shape, mean=mean, std=std)

    variants = {
        "uniform (Adam)": lambda c: uniform.Trainer(c, uniform.Config()),
        "bads (defaults, noise_every=1)": lambda c: bads.Trainer(c, bads.Config()),
        "bads noise_every=4": lambda c: bads.Trainer(c, bads.Config(noise_every=4)),
        "bads temperature=0 (no noise)": lambda c: bads.Trainer(c, bads.Config(temperature=0.0)),
    }
    state = {}
    for name, make in variants.items():
        c = ctx()
        state[name] = (make(c), c, RandomSampler(c.n, c.generator), [])
    order = list(state.values())
    for step in range(1, TIMING_STEPS + 1):
        for trainer, c, sampler, times in (order if step % 2 else order[::-1]):  # alternate who goes first
            idx = sampler.next(BATCH)
            batch = Batch(step=step, idx=idx, x=c.x[idx], y=c.y[idx])
            t0 = time.perf_counter()
            trainer.step(batch)
            if step > TIMING_WARMUP:
                times.append(time.perf_counter() - t0)
    base = state["uniform (Adam)"][3]
    rows = []
    for name, (trainer, _, _, times) in state.items():
        sd = trainer.state_dict()
        nbytes = _tensor_bytes(sd)
        rows.append({"variant": name, "median_ms": 1e3 * np.median(times), "mean_ms": 1e3 * _trimmed(times),
                     "ratio_median": np.median(times) / np.median(base), "ratio_mean": _trimmed(times) / _trimmed(base),
                     "state_MB": nbytes / 2**20})
    info = {"n": len(tr), "params": sum(p.numel() for p in state["uniform (Adam)"][0].model.parameters())}
    return pd.DataFrame(rows), info


MEMORY_CODE = """
import resource, sys, torch
torch.set_num_threads(1)
from valuekit.datasets import load_table
from valuekit.models import feature_stats
from valuekit.trainers.base import Batch, RandomSampler, TrainConfig, TrainContext
from valuekit.trainers import bads, uniform
d, which, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
tr = load_table(d + '/train.parquet'); dev = load_table(d + '/dev.parquet', like=tr, name='dev')
view = tr.trainer_view(); mean, std = feature_stats(view.x, view.image_shape)
c = TrainContext(config=TrainConfig(), device=torch.device('cpu'), generator=torch.Generator().manual_seed(0),
                 x=view.x, y=view.y, ids=view.ids, num_classes=view.num_classes, classes=view.classes,
                 dev_x=dev.x, dev_y=dev.y, image_shape=view.image_shape, mean=mean, std=std)
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])
before = rss()
t = uniform.Trainer(c, uniform.Config()) if which == 'uniform' else bads.Trainer(c, bads.Config())
smp = RandomSampler(c.n, c.generator)
for s in range(1, steps + 1):
    idx = smp.next(64)
    t.step(Batch(step=s, idx=idx, x=c.x[idx], y=c.y[idx]))
t.values()
print(before, rss())
"""


def memory(tmp: Path) -> dict:
    """Resident memory (MB) of a fresh process after loading fashion-noise40, and after building the trainer,
    running 300 steps and computing values() (one process per method)."""
    import os
    import subprocess

    paths = prepare("fashion-mnist", tmp / "memory", noise=0.4, max_train=5000, test_fraction=0.05, seed=0)
    folder = str(Path(paths["train"]).parent)
    out = {}
    for which in ("uniform", "bads"):
        r = subprocess.run([sys.executable, "-c", MEMORY_CODE, folder, which, "300"], capture_output=True, text=True,
                           check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        before, after = map(int, r.stdout.strip().splitlines()[-1].split())  # KiB
        out[f"{which}_before"], out[f"{which}_after"] = before / 1024, after / 1024
    return out


def _trimmed(times) -> float:
    """Mean of the middle 80% of step times (the shared machine adds rare long stalls)."""
    t = np.sort(np.asarray(times))
    cut = len(t) // 10
    return float(t[cut: len(t) - cut].mean())


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def plots(keep: dict) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, scen in enumerate(("mnist-noise40", "fashion-noise40")):
        v, noisy = keep[scen]["values"], keep[scen]["noisy"]
        ax = axes[0, col]
        bins = np.linspace(0, 1, 41)
        ax.hist(v["value"][~noisy], bins=bins, alpha=0.6, label="clean", density=True)
        ax.hist(v["value"][noisy], bins=bins, alpha=0.6, label="flipped", density=True)
        ax.set_title(f"{scen}: posterior mean of w (seed 0)", fontsize=9)
        ax.set_xlabel("posterior mean weight")
        ax.legend(fontsize=8)
        ax = axes[1, col]
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(len(v), 200, replace=False))
        sub = v.iloc[pick].assign(noisy=noisy[pick]).sort_values("value").reset_index(drop=True)
        for is_noisy, color in ((False, "C0"), (True, "C1")):
            s = sub[sub["noisy"] == is_noisy]
            ax.errorbar(s.index, s["value"], yerr=[s["value"] - s["ci_low"], s["ci_high"] - s["value"]], fmt=".",
                        ms=3, lw=0.6, color=color, label="flipped" if is_noisy else "clean")
        ax.axhline(np.median(v["value"][~noisy]), color="k", lw=0.8, ls="--", label="clean median")
        ax.set_title(f"{scen}: 90% credible intervals, 200 random rows", fontsize=9)
        ax.set_xlabel("rows sorted by posterior mean")
        ax.set_ylabel("w")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(REPORTS / "bads_noise.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    plot_class_balance(keep["mnist-imb10"]["balance"], ax=axes[0])
    axes[0].set_title("mnist-imb10, bads (seed 0): " + axes[0].get_title(), fontsize=8)
    v = keep["mnist-imb10"]["values"]
    y = keep["mnist-imb10"]["y"]
    per_class = pd.Series(v["value"].to_numpy()).groupby(y).mean()
    axes[1].bar(per_class.index, per_class.to_numpy())
    axes[1].set_xlabel("class (train rows: 10x more of class 0 than of class 9)")
    axes[1].set_ylabel("mean posterior weight")
    axes[1].set_title("mnist-imb10: mean posterior w per class", fontsize=9)
    fig.tight_layout()
    fig.savefig(REPORTS / "bads_balance.png", dpi=110)
    plt.close(fig)


def fmt(x, nd=3):
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def write_report(res: pd.DataFrame, tim: pd.DataFrame, info: dict, bal: pd.DataFrame, wall: float) -> str:
    cfg = bads.Config()
    agg = res.groupby(["scenario", "method"], sort=False).agg(["mean", "std"])

    def cell(scen, method, col, nd=3):
        if col not in res or (scen, method) not in agg.index or np.isnan(agg.loc[(scen, method), (col, "mean")]):
            return "—"
        m, s = agg.loc[(scen, method), (col, "mean")], agg.loc[(scen, method), (col, "std")]
        return f"{m:.{nd}f} ± {s:.{nd}f}"

    L = [
        "# BADS: Bayesian data point selection by SGLD",
        "",
        "Method: Xu, Kim, Lee, Martinez, Hospedales, *A Bayesian Approach to Data Point Selection*, NeurIPS 2024",
        "(arXiv 2411.03768); implementation `valuekit/trainers/bads.py` (its docstring states the log posterior,",
        "the dropped normaliser and the update).",
        "",
        f"Command: `python reports/scripts/bads.py` (total wall time {wall / 60:.1f} min); the step-time table was then",
        "re-measured alone with `python reports/scripts/bads.py --timing-only`: during the full run the machine was",
        "overloaded (load average ~8 on 2 cores, with this task's own tests running alongside) and the timing came out",
        "at 3.3x median for bads vs uniform, which is noise; a first re-run gave 1.25x median / 1.42x trimmed mean,",
        "the second (shown below) 1.25x / 1.24x.",
        f"Machine: {platform.machine()} CPU shared with other jobs (2 cores), `torch.set_num_threads(1)`,",
        f"torch {torch.__version__}. **No GPU in this session**: all times are CPU times; nothing here was run on CUDA.",
        "",
        "## Setup (what was reduced)",
        "",
        f"- Data: `valuekit data prepare mnist5k --imbalance 10`, `valuekit data prepare mnist5k --noise 0.4`,",
        "  `valuekit data prepare fashion-mnist --max-train 5000 --test-fraction 0.05 --noise 0.4` (seed 0;",
        "  dev = 10 clean rows per class, i.e. a balanced meta set of 100 rows). Train sizes: "
        + ", ".join(f"{s} {int(res[res.scenario == s].n_train.iloc[0])}" for s in SCENARIOS) + ".",
        f"- Model: mlp (2 x 128 hidden), batch {BATCH}, **{STEPS} steps, {len(SEEDS)} seeds** ({', '.join(map(str, SEEDS))}):",
        "  reduced from the paper's long runs to keep the whole report under ~15 min of shared CPU.",
        "  Seeds vary model init, sampling and noise; the data split is fixed (seed 0).",
        "- uniform: the project baseline (Adam, lr 1e-3). bads: defaults of `bads.Config` "
        f"(lr_theta={cfg.lr_theta}, lr_w={cfg.lr_w}, temperature={cfg.temperature}, rho_theta={cfg.rho_theta},",
        f"  rho_w={cfg.rho_w}, beta={cfg.beta}, prior_precision={cfg.prior_precision}, dev_batch_size={cfg.dev_batch_size},",
        f"  init_weight={cfg.init_weight}, burn_in={cfg.burn_in}, reservoir S={cfg.reservoir}, 90% intervals).",
        "  The defaults were picked on mnist-noise40 (seed 0, 1000 steps) from 5 settings of lr_w / rho_theta /",
        "  temperature / rho_w, so mnist-noise40 is not a held-out scenario; the other two used the same defaults.",
        "- sgld-fixed-w: bads with lr_w = 1e-12, i.e. the same SGLD sampler and meta term with every w frozen at",
        f"  {cfg.init_weight}: it separates \"what the weights do\" from \"what the sampler and the meta term do\".",
        "- Accuracy is the final test accuracy at the last step (no checkpoint selection).",
        "",
        "## Results (mean ± std over seeds)",
        "",
        "| scenario | method | test acc | AUROC value vs clean | KL(dev ‖ class mass) | mean w clean / flipped |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for scen in SCENARIOS:
        for method in METHODS:
            wcol = "—"
            if "w_clean" in res and (scen, method) in agg.index and not np.isnan(agg.loc[(scen, method), ("w_clean", "mean")]):
                wcol = f"{agg.loc[(scen, method), ('w_clean', 'mean')]:.3f} / {agg.loc[(scen, method), ('w_noisy', 'mean')]:.3f}"
            L.append(f"| {scen} | {method} | {cell(scen, method, 'test_acc')} | {cell(scen, method, 'auroc')} | "
                     f"{cell(scen, method, 'kl_mass_dev')} | {wcol} |")
    L += [
        "",
        "AUROC: of the value column against the hidden `is_noisy` (clean = positive; 0.5 = chance). For uniform the",
        "value is minus the mean training loss (the small-loss signal); for bads it is the posterior mean of w_i; for",
        "sgld-fixed-w every w is the same, so it has no ranking (—). Class mass: `valuekit.analysis.balance.",
        "class_balance(run)` (share of the final values.parquet weights per class); KL(dev ‖ empirical train) is "
        + f"{res[res.scenario == 'mnist-imb10'].kl_train_dev.iloc[0]:.3f} on mnist-imb10 and ≈ 0 on the noisy sets.",
        "",
        "Per-seed rows:",
        "",
        "| scenario | method | seed | test acc | AUROC | KL(dev‖mass) | noisy CI wholly below clean median | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in res.iterrows():
        L.append(f"| {r.scenario} | {r.method} | {r.seed} | {r.test_acc:.3f} | {fmt(r.get('auroc'))} | {r.kl_mass_dev:.3f} | "
                 f"{fmt(r.get('noisy_ci_below'))} | {r.wall_s:.0f} |")

    L += [
        "",
        "### Class imbalance (mnist-imb10): class mass vs dev distribution (bads, seed 0)",
        "",
        "| class | train share | bads weight mass | dev share |",
        "| --- | --- | --- | --- |",
    ]
    L += [f"| {r['class']} | {r.empirical:.3f} | {r.scorer_mass:.3f} | {r.dev:.3f} |" for _, r in bal.iterrows()]
    b_imb = res[(res.scenario == "mnist-imb10")]
    L += [
        "",
        f"KL(dev ‖ bads mass) = {b_imb[b_imb.method == 'bads'].kl_mass_dev.mean():.3f} vs KL(dev ‖ train) = "
        f"{b_imb.kl_train_dev.iloc[0]:.3f} (mean over seeds). Figure: `reports/bads_balance.png`.",
        "",
        "![class balance](bads_balance.png)",
        "",
        "### Calibration of the credible intervals (label noise)",
        "",
        "Fraction of flipped rows whose whole 90% interval [ci_low, ci_high] lies below the median posterior mean of",
        "the clean rows, and (as the false-alarm counterpart) the same fraction among clean rows:",
        "",
        "| scenario | flipped rows: CI wholly below clean median | clean rows: CI wholly below clean median | rows with ci_low ≤ value ≤ ci_high | samples per row |",
        "| --- | --- | --- | --- | --- |",
    ]
    for scen in ("mnist-noise40", "fashion-noise40"):
        L.append(f"| {scen} | {cell(scen, 'bads', 'noisy_ci_below')} | {cell(scen, 'bads', 'clean_ci_below')} | "
                 f"{cell(scen, 'bads', 'ci_contains_mean')} | {cell(scen, 'bads', 'samples_per_row', 1)} |")
    L += [
        "",
        f"Intervals are the 5%/95% quantiles of the last S = {cfg.reservoir} samples of w_i (a sample is taken each time the",
        "row is in a batch after burn-in), so with ~20 samples per row they are coarse; value is the Welford mean over",
        "all samples after burn-in.",
        "",
        "![noise](bads_noise.png)",
        "",
        "## Cost: step time and memory",
        "",
        f"Interleaved in one process (step by step, alternating which method goes first; mnist-noise40, n = {int(info['n'])},",
        f"mlp with {int(info['params']):,} parameters, batch {BATCH}; {TIMING_STEPS - TIMING_WARMUP} timed steps after "
        f"{TIMING_WARMUP} warm-up; CPU, 1 thread; trimmed mean = mean of the middle 80% of step times;",
        f"1-min load average {float(info['load_before_timing']):.1f} before / {float(info['load_after_timing']):.1f} after "
        "on the 2-core machine, so other jobs were running):",
        "",
        "| variant | median ms/step | trimmed mean ms/step | ratio to uniform (median) | ratio (trimmed mean) | trainer state MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in tim.iterrows():
        L.append(f"| {r.variant} | {r.median_ms:.3f} | {r.mean_ms:.3f} | {r.ratio_median:.2f} | {r.ratio_mean:.2f} | {r.state_MB:.2f} |")
    L += [
        "",
        "Trainer state = every tensor in `state_dict()` (model, and for uniform Adam's two moment buffers and its",
        f"loss statistics; for bads the weight logits u, the Welford count/mean/M2 and the N x {cfg.reservoir} reservoir:",
        f"4 + 3*8 + {cfg.reservoir}*4 = {4 + 24 + 4 * cfg.reservoir} bytes per training row, no optimizer state).",
        "",
        "Resident memory (VmRSS) of a fresh process per method that loads fashion-noise40 (5,000 x 784 rows), then",
        "builds the trainer, runs 300 steps and computes values(): uniform "
        f"{info['rss_uniform_before']:.0f} → {info['rss_uniform_after']:.0f} MB (+{info['rss_uniform_after'] - info['rss_uniform_before']:.0f}), "
        f"bads {info['rss_bads_before']:.0f} → {info['rss_bads_after']:.0f} MB (+{info['rss_bads_after'] - info['rss_bads_before']:.0f}).",
        "Both are dominated by Python + torch + the data; no GPU memory was measured (no GPU in this session).",
        "",
        "## Reading the numbers",
        "",
    ]
    return "\n".join(L)


# Written after reading the measured tables above (the numbers quoted here are from the run of 2026-11-21,
# CPU, 2 seeds x 1500 steps); re-check them if you re-run with other settings.
NOTES = """
- **Label noise (40 % flips): BADS helps a lot here.** Final test accuracy 0.863 vs 0.625 (uniform) on
  mnist-noise40 and 0.824 vs 0.703 on fashion-noise40. Uniform with Adam memorises the flipped labels by step
  1500 (we report the last step, no early stopping, which is what hurts it). Most of the gain comes from the
  weights, not from the sampler: sgld-fixed-w (same SGLD, same meta term, weights frozen) gets 0.680 / 0.754.
  The posterior mean of w separates flipped from clean rows (AUROC 0.991 / 0.982, a little above the
  small-loss signal of uniform, 0.982 / 0.978): mean w 0.62 clean vs 0.11 flipped.
- **Intervals.** 97-98 % of flipped rows have their whole 90 % interval below the clean rows' median
  weight; 7.5 % (mnist) / 18 % (fashion) of clean rows do too (clean rows the model finds hard; we did not
  break them down further). Every row's posterior mean lies inside its
  interval for the tensor form. The intervals come from only ~17-21 samples per row (one per visit after
  burn-in), so their 5 % / 95 % ends are close to the sample min / max.
- **Class imbalance (mnist-imb10): BADS does not rebalance in this formulation.** Its class mass stays at
  the training distribution and moves slightly *away* from the balanced dev distribution
  (KL(dev || mass) 0.283 vs 0.257 for the raw training frequencies); the mean weight per class falls from
  0.56 (class 0, most frequent) to 0.47 (class 9, rarest). That is what the normaliser-free likelihood
  implies: d log pi / d w_i = -rho_theta l_i - rho_w (mean w - beta), and rare classes have the higher loss.
  The meta set reaches w only through theta. Test accuracy 0.859 vs 0.884 for uniform; sgld-fixed-w gets
  0.861, so the gap is the sampler (plain SGLD at T = 0.1, lr 0.05, against Adam), not the weights. The paper
  reports BADS up-weighting the rare class on its MNIST balancing task; we do not reproduce that here, and we
  did not tune bads for this scenario.
- **Cost.** One BADS step is one forward/backward over the train batch plus a dev batch of 16 (one
  concatenated pass), no second-order terms and no inner loop. With the defaults it is 1.25x (median) /
  1.24x (trimmed mean) of a uniform Adam step in the run shown (1.36-1.51x in development runs of a similar
  benchmark on the busier machine), so **the 1.2x target is missed with noise_every=1**. The excess is drawing
  118k Gaussian numbers per step from the CPU generator (temperature=0, i.e. no noise, runs at 0.90x). With
  noise_every=4 (the same Brownian motion added every 4th step with 4x the variance) the step costs
  0.97x / 1.01x and accuracy / AUROC do not
  change in these runs (0.865 / 0.991 on mnist-noise40, 0.818 / 0.982 on fashion). Memory: no optimizer
  state; 156 bytes per training row for the posterior summaries (0.6 MB at N = 3,900 with S = 32); process
  growth over 300 steps +18 MB vs +81 MB for uniform with Adam.
- **weight_net does not work yet.** With weights from a small MLP over [pixels, onehot(label)] the weights
  collapse to one common level (~0.10) and do not rank flipped rows (AUROC 0.50-0.51); accuracy 0.797 / 0.747
  is between uniform and the tensor form. The step moves every weight at once, and the common part of the
  signal (the mean loss against the prior's pull) dominates before the net learns anything row-specific.
  lr_phi in {0.001, 0.003, 0.01} and rho_w = 200 gave the same picture on mnist-noise40 (development runs,
  not in the tables). Its mean can also leave the last-32-sample interval (82-100 % of rows inside), because
  the net's weights drift over the run. Treat it as an unfinished option.
- **Not covered**: no GPU run (none in this session); 2 seeds and 1500 steps only; the defaults were chosen on
  mnist-noise40 (seed 0) from five settings, so that scenario is not held out; the data split is one seed.
"""

CACHE = Path(tempfile.gettempdir()) / "valuekit-bads-report"


def main() -> None:
    """Measure everything and write the report.

    `--render-only` re-writes bads.md from the numbers cached by the last full run;
    `--timing-only` re-measures only the step times (e.g. when the shared machine was busy) and re-renders.
    """
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    CACHE.mkdir(exist_ok=True)
    render_only, timing_only = "--render-only" in sys.argv, "--timing-only" in sys.argv
    if not render_only:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            load0 = os.getloadavg()[0]
            tim, info = timing(tmp)
            info["load_before_timing"], info["load_after_timing"] = load0, os.getloadavg()[0]
            print(tim.to_string(), info, flush=True)
            tim.to_csv(CACHE / "timing.csv", index=False)
            if timing_only:
                old = pd.read_csv(CACHE / "info.csv", index_col=0).iloc[:, 0].to_dict()
                info = {**old, **info}
            else:
                info.update({f"rss_{k}": v for k, v in memory(tmp).items()})
                res, keep = run_all(tmp)
                plots(keep)
                res.to_csv(CACHE / "rows.csv", index=False)
                keep["mnist-imb10"]["balance"].to_csv(CACHE / "balance.csv", index=False)
                info["wall"] = time.perf_counter() - t0
            pd.Series(info).to_csv(CACHE / "info.csv")
    res, tim = pd.read_csv(CACHE / "rows.csv"), pd.read_csv(CACHE / "timing.csv")
    info = pd.read_csv(CACHE / "info.csv", index_col=0).iloc[:, 0].to_dict()
    bal = pd.read_csv(CACHE / "balance.csv", dtype={"class": str})
    text = write_report(res, tim, info, bal, float(info["wall"]))
    (REPORTS / "bads.md").write_text(text + "\n" + NOTES.strip() + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
