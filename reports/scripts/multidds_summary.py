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
    ap.add_argument("--figures", default=None, help="folder for multidds_usage_<target>.png (seed 0 dds runs)")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.targets)]
    df = pd.DataFrame(rows)
    dds = df[df.variant == "dds"]
    if args.figures:
        figures(dds, args.figures)
    snr({(r.target, r.seed): (r.run, r.related, r.unrelated) for r in dds.itertuples()})
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


def figures(dds, folder):
    """Usage curves of each target's first dds run: p(S) over steps (top), reward +- 1 s.e. (bottom)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from valuekit.analysis.usage import plot_source_probs, plot_source_rewards, source_rewards, source_usage

    for target, g in dds.groupby("target", sort=False):
        r = g.sort_values("seed").iloc[0]
        fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        plot_source_probs(source_usage(r.run), ax=a, highlight=[target],
                          title=f"{target}, seed {r.seed}: related {','.join(r.related)}; unrelated {','.join(r.unrelated)}")
        plot_source_rewards(source_rewards(r.run, max_points=20), ax=b)
        a.set_xlabel("")
        fig.tight_layout()
        out = Path(folder) / f"multidds_usage_{target}.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        print(f"wrote {out}")


def snr(runs_by_target):
    """Per DDS run, from its sources/ log: per scorer update, z of the related-minus-unrelated mean reward and of
    the target against the others (as multidds_signal.summarise), medians over the updates after the first 25 %."""
    from valuekit.analysis.usage import source_rewards

    print("\n| target | seed | updates | median z related - unrelated | share of updates with every related > "
          "every unrelated | median z target - others | median abs(r) / se |")
    print("|---|---|---|---|---|---|---|")
    for (target, seed), (path, rel, unrel) in runs_by_target.items():
        r = source_rewards(path)
        wide = r.pivot(index="step", columns="source", values="reward")
        se = r.pivot(index="step", columns="source", values="reward_se")
        wide, se = wide.iloc[len(wide) // 4:], se.iloc[len(se) // 4:]
        others = [c for c in wide.columns if c != target]
        diff = wide[rel].mean(axis=1) - wide[unrel].mean(axis=1)
        var = (se[rel] ** 2).sum(axis=1) / len(rel) ** 2 + (se[unrel] ** 2).sum(axis=1) / len(unrel) ** 2
        zt = (wide[target] - wide[others].mean(axis=1)) / np.sqrt(se[target] ** 2 + (se[others] ** 2).sum(axis=1) / len(others) ** 2)
        order = (wide[rel].min(axis=1) > wide[unrel].max(axis=1)).mean()
        ratio = (wide.abs() / se).stack().median()
        print(f"| {target} | {seed} | {len(wide)} | {np.median(diff / np.sqrt(var)):.2f} | {order:.2f} | "
              f"{np.median(zt):.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
