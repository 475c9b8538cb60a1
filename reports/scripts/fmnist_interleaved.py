"""Step time per method on Fashion-MNIST PNG bytes (streamed) with the ResNet-style model of fmnist_stream.py,
all methods in ONE process, steps interleaved (round r runs one step of every method), medians: the ratios
to uniform are robust to other load on the machine, the absolute times are not.

    PYTHONPATH=reports/scripts OMP_NUM_THREADS=1 python reports/scripts/fmnist_interleaved.py /tmp/fmnist_png \
        --rows 60000 --rounds 15

Each timed step includes drawing the batch and decoding its PNG rows (the streamed path, no workers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fmnist_stream import resnet

METHODS = ("uniform", "dds", "hostcp", "lrdi", "l2rw", "mwnet", "bads")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--rows", type=int, default=60000)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    import pyarrow.parquet as pq

    from valuekit.config import TrainConfig
    from valuekit.datasets import _arrow_image_type, load_table
    from valuekit.trainers.base import Batch, make_trainer

    frame = pq.read_table(Path(a.data) / "train.parquet").slice(0, a.rows).to_pandas(types_mapper=_arrow_image_type)
    train = load_table(frame, stream=True, name="train")
    del frame
    dev = load_table(Path(a.data) / "dev.parquet", like=train, name="dev")
    steps_per_epoch = -(-a.rows // a.batch_size)
    runs = {}
    for m in METHODS:
        cfg = TrainConfig(method=m, steps=steps_per_epoch, batch_size=a.batch_size, device="cpu", progress=False)
        trainer, sampler, ctx = make_trainer(train, dev, cfg, model=resnet)
        runs[m] = [trainer, sampler, ctx, 0, []]

    def one(m):
        trainer, sampler, ctx, step, times = runs[m]
        t0 = time.perf_counter()
        idx = sampler.next(a.batch_size)
        batch = Batch(step=step + 1, idx=idx, x=ctx.x[idx], y=ctx.y[idx])
        trainer.step(batch)
        runs[m][3] = step + 1
        return time.perf_counter() - t0

    for r in range(a.warmup + a.rounds):
        for m in METHODS:
            t = one(m)
            if r >= a.warmup:
                runs[m][4].append(t)
    for m in METHODS:
        med = statistics.median(runs[m][4])
        print(json.dumps({"method": m, "rows": a.rows, "rounds": a.rounds, "median_step_s": round(med, 4),
                          "steps_per_s": round(1 / med, 3),
                          "ratio_to_uniform": round(med / statistics.median(runs["uniform"][4]), 2),
                          "derived_epoch_min": round(steps_per_epoch * med / 60, 1)}), flush=True)


if __name__ == "__main__":
    main()
