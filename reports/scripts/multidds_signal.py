"""Signal-to-noise of multidds's per-source rewards on real targets (reports/multidds.md, section "signal").

One run per target with the scorer frozen at uniform (scorer_lr=0, so every variant sees the same rows) and the
dev gradient refreshed every 2 steps. Every step's per-source gradient sums feed extra reward accumulators for
each variant: dot / cosine x all parameters / encoder only x window of K steps. Per window: each source's reward
and standard error (RewardAccumulator.finish). a1 blending is applied afterwards over the windows.

Usage: python reports/scripts/multidds_signal.py --data /tmp/mdds/data --targets ast,br,bs --steps 240 \
    --out /tmp/mdds/signal.json
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from valuekit.datasets import load_text_pairs
from valuekit.models import build_model
from valuekit.trainers import multidds
from valuekit.trainers.base import TrainConfig, train

WINDOWS = (2, 4, 8, 16)
A1S = (0.05, 0.5, 0.8)
PROBE_BATCHES = (2, 4)


class ProbeProbe:
    """--mode probe: extra accumulators fed by the probe batches of each scorer update (reward_from=probe,
    probe_batches=4): for 2 and 4 batches per source x all / encoder parameters."""

    def __init__(self, S, P, enc_cols, add):
        self._add = add
        self.accs = {(nb, cols): multidds.RewardAccumulator(S, P, torch.device("cpu"), c)
                     for nb in PROBE_BATCHES for cols, c in (("all", None), ("encoder", enc_cols))}
        self.seen = np.zeros(S, dtype=int)
        self.S = S
        self.update = 0
        self.out = []

    def add(self, present, gsums, counts, d):
        s = int(present[0])
        for (nb, cols), acc in self.accs.items():
            if self.seen[s] < nb:
                self._add(acc, present, gsums, counts, d)
        self.seen[s] += 1
        if (self.seen == max(PROBE_BATCHES)).all():  # every source probed: the update is complete
            self.update += 1
            for (nb, cols), acc in self.accs.items():
                for kind in ("dot", "cosine"):
                    r, se = acc.finish(kind)
                    self.out.append((nb, cols, kind, self.update, r.numpy().copy(), se.numpy().copy()))
                acc.reset()
            self.seen[:] = 0


class Probe:
    """Extra accumulators fed by every RewardAccumulator.add of the trainer (there is one per process)."""

    def __init__(self, S, P, enc_cols, add):
        self._add = add  # the unpatched RewardAccumulator.add
        self.accs = {(k, cols): multidds.RewardAccumulator(S, P, torch.device("cpu"), c)
                     for k in WINDOWS for cols, c in (("all", None), ("encoder", enc_cols))}
        self.step = 0
        self.out = []  # (K, params, kind, window index, r[S], se[S])

    def add(self, present, gsums, counts, d):
        self.step += 1
        for (k, cols), acc in self.accs.items():
            self._add(acc, present, gsums, counts, d)
            if self.step % k == 0:
                for kind in ("dot", "cosine"):
                    r, se = acc.finish(kind)
                    self.out.append((k, cols, kind, self.step // k, r.numpy().copy(), se.numpy().copy()))
                acc.reset()


def blend(rs, ses, a1):
    """a1 blending over windows, as Trainer.update_scorer does (NaN = source not seen in the window)."""
    r_prev = np.full(rs.shape[1], np.nan)
    s_prev = np.full(rs.shape[1], np.nan)
    out_r, out_s = [], []
    for r, se in zip(rs, ses):
        seen = ~np.isnan(r)
        fresh = seen & np.isnan(r_prev)
        br = np.where(fresh, r, a1 * np.nan_to_num(r_prev) + (1 - a1) * r)
        bs = np.where(fresh, se, np.sqrt((a1 * np.nan_to_num(s_prev)) ** 2 + ((1 - a1) * se) ** 2))
        r_prev = np.where(seen, br, r_prev)
        s_prev = np.where(seen, bs, s_prev)
        out_r.append(r_prev.copy())
        out_s.append(s_prev.copy())
    return np.array(out_r), np.array(out_s)


def summarise(rs, ses, sources, target, related, unrelated, skip=0.25):
    """Per window after the first `skip` of training: separation z of related vs unrelated mean reward, share of
    windows where every related source is above every unrelated one, and the target's z against the others."""
    n = len(rs)
    rs, ses = rs[int(n * skip):], ses[int(n * skip):]
    idx = {s: i for i, s in enumerate(sources)}
    R = [idx[s] for s in related]
    U = [idx[s] for s in unrelated]
    T = idx[target]
    O = [i for i in range(len(sources)) if i != T]
    z_sep, order, z_tgt, snr = [], [], [], []
    for r, se in zip(rs, ses):
        if np.isnan(r[R + U]).any():
            continue
        se = np.nan_to_num(se, nan=np.nanmax(se))
        diff = r[R].mean() - r[U].mean()
        var = (se[R] ** 2).sum() / len(R) ** 2 + (se[U] ** 2).sum() / len(U) ** 2
        z_sep.append(diff / np.sqrt(var))
        order.append(r[R].min() > r[U].max())
        snr.append(np.median(np.abs(r[R + U]) / np.maximum(se[R + U], 1e-30)))
        if not np.isnan(r[T]):
            ot = [i for i in O if not np.isnan(r[i])]
            z_tgt.append((r[T] - r[ot].mean()) / np.sqrt(se[T] ** 2 + (se[ot] ** 2).sum() / len(ot) ** 2))
    mean_r = np.nanmean(rs, 0)
    return {"windows": len(z_sep), "median_z_related_vs_unrelated": float(np.median(z_sep)),
            "share_windows_order_ok": float(np.mean(order)), "median_z_target_vs_others": float(np.median(z_tgt)),
            "median_abs_r_over_se": float(np.median(snr)),
            "mean_reward": {s: float(mean_r[i]) for s, i in idx.items()},
            "order_of_mean_ok": bool(mean_r[R].min() > mean_r[U].max()),
            "target_mean_rank": int((mean_r > mean_r[T]).sum()) + 1}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--targets", default="ast,br,bs")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="/tmp/mdds/signal-runs")
    ap.add_argument("--mode", default="train", choices=["train", "probe"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    for target in args.targets.split(","):
        folder = Path(args.data) / target
        meta = json.loads(__import__("pyarrow.parquet", fromlist=["x"]).read_schema(folder / "train.parquet")
                          .metadata[b"valuekit.dataset"])
        tr = load_text_pairs(folder / "train.parquet", max_len=64)
        dev = load_text_pairs(folder / "dev.parquet", max_len=64, name="dev")
        m = build_model("seq2seq", in_features=64, num_classes=259, hidden=128)
        params = [p for p in m.parameters() if p.requires_grad]
        names = [n for n, p in m.named_parameters() if p.requires_grad]
        cols, start = [], 0
        for n, p in zip(names, params):
            if n.split(".")[0] in ("src_emb", "encoder"):
                cols.append(torch.arange(start, start + p.numel()))
            start += p.numel()
        orig = multidds.RewardAccumulator.add
        probe = (Probe if args.mode == "train" else ProbeProbe)(len(tr.sources), start, torch.cat(cols), orig)
        mc = ({"scorer_lr": 0.0, "update_every": 64, "reward_from": "train"} if args.mode == "train" else
              {"scorer_lr": 0.0, "update_every": 256, "probe_batches": max(PROBE_BATCHES), "probe_size": 16})

        def add(self, present, gsums, counts, d, _orig=orig):
            _orig(self, present, gsums, counts, d)
            probe.add(present, gsums, counts, d)

        multidds.RewardAccumulator.add = add
        t0 = time.process_time()
        try:
            run = train(tr, dev, out=Path(args.runs) / f"{target}-{args.mode}-s{args.seed}",
                        config=TrainConfig(method="multidds", model="seq2seq", steps=args.steps, batch_size=32,
                                           lr=3e-3, seed=args.seed, eval_every=10_000, progress=False,
                                           device="cpu", log_steps=False),
                        method_config=mc)
        finally:
            multidds.RewardAccumulator.add = orig
        cpu = time.process_time() - t0
        print(target, "cpu_s", round(cpu, 1), run.meta.get("final_metrics"), flush=True)
        for k in (WINDOWS if args.mode == "train" else PROBE_BATCHES):
            for cols in ("all", "encoder"):
                for kind in ("dot", "cosine"):
                    rows = [(r, se) for kk, c, kd, _, r, se in probe.out if kk == k and c == cols and kd == kind]
                    rs, ses = np.array([r for r, _ in rows]), np.array([s for _, s in rows])
                    for a1 in A1S:
                        br, bs = blend(rs, ses, a1)
                        summ = summarise(br, bs, tr.sources, target, meta["related"], meta["unrelated"])
                        results.append({"target": target, "mode": args.mode,
                                        ("K_steps" if args.mode == "train" else "probe_batches"): k, "params": cols, "reward": kind, "a1": a1,
                                        "cpu_s": round(cpu, 1), **summ})
        Path(args.out).write_text(json.dumps(results, indent=1))
    df = pd.DataFrame(results).drop(columns=["mean_reward"])
    print(df.to_string())


if __name__ == "__main__":
    main()
