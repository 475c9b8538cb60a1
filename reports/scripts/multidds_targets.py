"""multidds on several real low-resource targets (reports/multidds.md, section "targets").

For every target folder (valuekit data prepare multilingual --target T --related ... --unrelated ...) and seed:
  dds        multidds with its defaults
  uniform    the scorer fixed at psi = 0 (scorer_iters=0): targets uniform, sources uniform among those available
  retrained  a fresh model trained with the dds run's final p(S) fixed (init=tcs, prior=<final probs>,
             scorer_iters=0): the paper's "retrained" variant
  tcs+dds    multidds started from the TCS prior (init=tcs)
Each run: byte GRU seq2seq, hidden 128, batch 32, Adam lr 3e-3, --steps steps; dev and test chrF at the end.
Results go to --out (JSON lines, appended, so several workers can share the list of jobs by --worker i/n).

Usage: python reports/scripts/multidds_targets.py --data /tmp/mdds/data --targets ast,br,bs --seeds 0,1,2 \
    --steps 300 --runs /tmp/mdds/runs --out /tmp/mdds/targets.jsonl --worker 0/2
"""
import argparse
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from valuekit.datasets import load_text_pairs
from valuekit.runlog import read_run
from valuekit.trainers.base import TrainConfig, train

VARIANTS = ("dds", "uniform", "retrained", "tcs+dds")


def method_config(variant, runs, target, seed):
    if variant == "dds":
        return {}
    if variant == "uniform":
        return {"scorer_iters": 0}
    if variant == "tcs+dds":
        return {"init": "tcs"}
    dds = Path(runs) / f"{target}-dds-s{seed}"
    t = read_run(dds).source_table()
    prior = ",".join(f"{s}={p:.6g}" for s, p in zip(t.source, t.prob))
    return {"init": "tcs", "prior": prior, "scorer_iters": 0}


def run_one(args, target, seed, variant):
    folder = Path(args.data) / target
    meta = json.loads(pq.read_schema(folder / "train.parquet").metadata[b"valuekit.dataset"])
    tr = load_text_pairs(folder / "train.parquet", max_len=64)
    dev = load_text_pairs(folder / "dev.parquet", max_len=64, name="dev")
    test = load_text_pairs(folder / "test.parquet", max_len=64, name="test")
    out = Path(args.runs) / f"{target}-{variant}-s{seed}"
    mc = method_config(variant, args.runs, target, seed)
    t0, c0 = time.perf_counter(), time.process_time()
    run = train(tr, dev, test, out=out, config=TrainConfig(
        method="multidds", model="seq2seq", steps=args.steps, batch_size=32, lr=3e-3, seed=seed,
        eval_every=args.steps, log_every=100, checkpoint_every=10_000, progress=False, device="cpu"),
        method_config=mc)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    fm = run.meta["final_metrics"]
    st = run.source_table()
    drawn = dict(zip(st.source, st.drawn / st.drawn.sum()))
    probs = dict(zip(st.source, st.prob))
    rec = {"target": target, "seed": seed, "variant": variant, "steps": args.steps, "cpu_s": round(cpu, 1),
           "wall_s": round(wall, 1), "dev_chrf": 100 * fm["dev_acc"], "test_chrf": 100 * fm["test_acc"],
           "dev_loss": fm["dev_loss"], "test_loss": fm["test_loss"], "prob": probs, "drawn_share": drawn,
           "uniform_prob": dict(zip(st.source, st.uniform_prob)),
           "mean_reward": dict(zip(st.source, st.mean_reward)), "reward_se": dict(zip(st.source, st.reward_se)),
           "related": meta["related"], "unrelated": meta["unrelated"], "method_config": mc, "run": str(out)}
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(target, seed, variant, f"cpu {cpu:.0f}s dev chrF {rec['dev_chrf']:.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--targets", default="ast,br,bs")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--worker", default="0/1", help="i/n: run every n-th job starting at i")
    args = ap.parse_args()
    torch.set_num_threads(1)
    i, n = map(int, args.worker.split("/"))
    variants = args.variants.split(",")
    # all dds runs first (the retrained variant reads them), then the others, seed by seed
    jobs = [(t, int(s), v) for v in variants for s in args.seeds.split(",") for t in args.targets.split(",")]
    done = set()
    if Path(args.out).exists():
        for line in Path(args.out).read_text().splitlines():
            r = json.loads(line)
            done.add((r["target"], r["seed"], r["variant"]))
    for k, job in enumerate(jobs):
        if k % n != i or job in done:
            continue
        if job[2] == "retrained":
            while not (Path(args.runs) / f"{job[0]}-dds-s{job[1]}" / "sources.parquet").exists():
                time.sleep(10)  # the other worker is still training the dds run this one retrains from
        run_one(args, *job)


if __name__ == "__main__":
    main()
