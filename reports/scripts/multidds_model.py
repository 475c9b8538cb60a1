"""Translation model comparison for multidds runs: GRU vs byte Transformer at equal CPU budget.

Uniform sampling over every training row of data/multilingual (target ast), batch 32, Adam; dev chrF of
greedy translations at fixed step counts, with the CPU seconds (time.process_time) spent training.
Usage: python reports/scripts/multidds_model.py --steps 600 --out /tmp/mdds/model.json
"""
import argparse
import json
import time
from pathlib import Path

import torch

from valuekit.datasets import load_text_pairs
from valuekit.models import build_model, decode_bytes
from valuekit.multilingual import chrf
from valuekit.translation import ByteTransformer, init_transformer_

DATA = Path(__file__).resolve().parents[2] / "data" / "multilingual"


def dev_chrf(model, dev):
    model.eval()
    hyps = decode_bytes(model.translate(dev.x, max_len=dev.y.shape[1]))
    model.train()
    with torch.no_grad():
        loss = model.per_example_loss(dev.x, dev.y).mean().item()
    return chrf(hyps, decode_bytes(dev.y)), loss


def run(name, make, lr, steps, tr, dev, seed, evals):
    g = torch.Generator().manual_seed(seed)
    model = make(g)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    out, t_cpu = [], 0.0
    for step in range(1, steps + 1):
        t0 = time.process_time()
        idx = torch.randint(0, len(tr.y), (32,), generator=g)
        loss = model.per_example_loss(tr.x[idx], tr.y[idx]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t_cpu += time.process_time() - t0
        if step in evals:
            c, dl = dev_chrf(model, dev)
            out.append({"model": name, "lr": lr, "seed": seed, "step": step, "cpu_s": round(t_cpu, 1),
                        "dev_chrf": round(c, 2), "dev_loss": round(dl, 3)})
            print(json.dumps(out[-1]), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tr = load_text_pairs(DATA / "train.parquet", max_len=64)
    dev = load_text_pairs(DATA / "dev.parquet", max_len=64, name="dev")
    evals = {s for s in (150, 300, 450, 600, 900, 1200) if s <= args.steps}
    params = {"num_classes": 259, "in_features": 64}
    variants = [
        ("gru-h128", lambda g: build_model("seq2seq", hidden=128, generator=g, **params), 3e-3),
        ("tf-d128-l2", lambda g: _tf(g, 128, 2), 1e-3),
        ("tf-d128-l2", lambda g: _tf(g, 128, 2), 3e-3),
    ]
    rows = []
    for name, make, lr in variants:
        rows += run(name, make, lr, args.steps, tr, dev, args.seed, evals)
        Path(args.out).write_text(json.dumps(rows, indent=1))


def _tf(g, dim, layers):
    m = ByteTransformer(dim=dim, layers=layers)
    init_transformer_(m, g)
    return m


if __name__ == "__main__":
    main()
