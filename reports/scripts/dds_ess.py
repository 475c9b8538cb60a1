"""DDS reweighting under class imbalance: entropy bonus (old default) vs ESS floor (new default) vs the paper.

For digits with imbalance 10 (valuekit.datasets.prepare(..., imbalance=10)), per seed and setting: the
rare-class boost = mean logged batch weight (after the scorer warm-up) of the rarest class / that of the most
frequent class, the median and 5th-percentile batch ESS = (sum w)^2 / (B sum w^2), and test accuracy.

usage: python reports/scripts/dds_ess.py OUT.json [--steps 800] [--seeds 0,1]
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from valuekit.datasets import load_table, prepare
from valuekit.trainers.base import TrainConfig, train

SETTINGS = {
    "entropy 0.5 + ema (old default)": {"entropy_weight": 0.5, "reward_norm": "ema", "ess_floor": 0.0},
    "ESS floor 0.3 + scale (new default)": {},
    "paper (none, no bonus, no floor)": {"entropy_weight": 0.0, "reward_norm": "none", "ess_floor": 0.0},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--data", default="digits")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in a.seeds.split(",")]:
            paths = prepare(a.data, Path(tmp) / f"d{seed}", seed=seed, imbalance=10.0)
            tr = load_table(paths["train"])
            dv, te = load_table(paths["dev"], like=tr, name="dev"), load_table(paths["test"], like=tr, name="test")
            counts = np.bincount(tr.y.numpy())
            rare, common = int(counts.argmin()), int(counts.argmax())
            for name, over in SETTINGS.items():
                cfg = TrainConfig(method="dds", steps=a.steps, seed=seed, device="cpu", progress=False,
                                  eval_every=a.steps, checkpoint_every=a.steps)
                run = train(tr, dv, te, out=Path(tmp) / f"{seed}-{len(rows)}", config=cfg, method_config=over)
                st = run.steps(["step", "label", "weight"]).to_pandas()
                post = st[st.step > 100]
                by = post.groupby("label").weight.mean()
                g = st.assign(w2=st.weight ** 2).groupby("step").agg(s=("weight", "sum"), s2=("w2", "sum"),
                                                                     b=("weight", "size"))
                ess = (g.s ** 2 / (g.b * g.s2)).to_numpy()
                rows.append({"seed": seed, "setting": name, "rare_class": rare, "rare_count": int(counts[rare]),
                             "common_count": int(counts[common]), "boost": float(by[rare] / by[common]),
                             "ess_median": float(np.median(ess)), "ess_p5": float(np.quantile(ess, 0.05)),
                             "test_acc": run.meta["final_metrics"].get("test_acc")})
                print(rows[-1], flush=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
