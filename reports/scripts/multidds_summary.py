"""Markdown tables for reports/multidds.md from multidds_targets.py's JSON lines (and the signal JSON).

Usage: python reports/scripts/multidds_summary.py --targets /tmp/mdds/targets.jsonl
"""
import argparse
import json

import numpy as np
import pandas as pd


def ms(values, digits=3):
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.{digits}f} (n=1)"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", required=True)
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.targets)]
    df = pd.DataFrame(rows)
    for target, g in df.groupby("target", sort=False):
        rel, unrel = g.iloc[0]["related"], g.iloc[0]["unrelated"]
        print(f"\n### Target `{target}` (related: {', '.join(rel)}; unrelated: {', '.join(unrel)})\n")
        print("| variant | seeds | dev chrF | test chrF | dev loss | CPU s / run |")
        print("|---|---|---|---|---|---|")
        for v, gv in g.groupby("variant", sort=False):
            print(f"| {v} | {','.join(str(s) for s in sorted(gv.seed))} | {ms(gv.dev_chrf, 2)} | "
                  f"{ms(gv.test_chrf, 2)} | {ms(gv.dev_loss)} | {ms(gv.cpu_s, 0)} |")
        for v in ("dds", "tcs+dds"):
            gv = g[g.variant == v]
            if not len(gv):
                continue
            srcs = [target] + list(rel) + list(unrel)
            print(f"\n{v}: final p(S) per seed (uniform scorer: {gv.iloc[0]['uniform_prob'][target]:.3f} each), "
                  "mean reward ± s.e. (seed 0)\n")
            print("| source | group | " + " | ".join(f"seed {s}" for s in gv.seed) + " | mean ± sd | reward (seed "
                  f"{gv.seed.iloc[0]}) |")
            print("|---|---|" + "---|" * (len(gv) + 2))
            for s in srcs:
                grp = "target" if s == target else ("related" if s in rel else "unrelated")
                ps = [r[s] for r in gv.prob]
                r0 = gv.iloc[0]
                print(f"| {s} | {grp} | " + " | ".join(f"{p:.3f}" for p in ps) + f" | {ms(ps)} | "
                      f"{r0.mean_reward[s]:.4g} ± {r0.reward_se[s]:.2g} |")
            print("\nCriteria per seed:\n")
            print("| seed | min p(related) | max p(unrelated) | every related > every unrelated | p(target) | "
                  "target >= uniform share | target's drawn share (uniform run) |")
            print("|---|---|---|---|---|---|---|")
            for _, r in gv.iterrows():
                mr, mu = min(r.prob[s] for s in rel), max(r.prob[s] for s in unrel)
                uni = g[(g.variant == "uniform") & (g.seed == r.seed)]
                ushare = f"{r.drawn_share[target]:.3f} ({uni.iloc[0].drawn_share[target]:.3f})" if len(uni) else \
                    f"{r.drawn_share[target]:.3f}"
                print(f"| {r.seed} | {mr:.3f} | {mu:.3f} | {'yes' if mr > mu else 'NO'} | {r.prob[target]:.3f} | "
                      f"{'yes' if r.prob[target] >= r.uniform_prob[target] else 'NO'} | {ushare} |")


if __name__ == "__main__":
    main()
