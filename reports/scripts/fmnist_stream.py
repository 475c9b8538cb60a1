"""Fashion-MNIST as PNG bytes with a ResNet-style model of the user's kind (`--model fmnist_stream:resnet`):
steps/s, peak resident memory and load time per method and per number of training rows.

One measurement per process (peak RSS is per process), printed as one JSON line:

    valuekit data prepare fashion-mnist -o /tmp/fmnist_png --format png --test-fraction 0.14142857142857143
    PYTHONPATH=reports/scripts OMP_NUM_THREADS=1 python reports/scripts/fmnist_stream.py /tmp/fmnist_png \
        --method uniform --rows 60000 --steps 40 --stream yes

`--steps 0` means one epoch (ceil(rows / batch) steps). steps/s is measured from the loop's own per-step
times in metrics/ (`step_time`, the method's step, excluding the first 5 warm-up steps); `wall_s` is the
whole training call (loading excluded) and includes evaluation, logging and the end-of-run values.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.skip(x) + self.bn2(self.conv2(h)))


class SmallResNet(nn.Module):
    """conv(16)-BN-ReLU, residual blocks 16 -> 32 (stride 2) -> 64 (stride 2), global average pool, linear."""

    def __init__(self, num_classes: int, channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))))


def resnet(num_classes, input_shape):
    return SmallResNet(num_classes, channels=input_shape[0])


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--method", default="uniform")
    p.add_argument("--rows", type=int, default=60000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--stream", default="yes", choices=["yes", "no"])
    p.add_argument("--workers", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    import pyarrow.parquet as pq

    import valuekit
    from valuekit.datasets import _arrow_image_type, load_table

    t0 = time.perf_counter()
    table = pq.read_table(Path(a.data) / "train.parquet").slice(0, a.rows)
    frame = table.to_pandas(types_mapper=_arrow_image_type)  # as load_table reads a Parquet file
    del table
    train = load_table(frame, stream=a.stream == "yes", name="train")
    del frame
    dev = load_table(Path(a.data) / "dev.parquet", like=train, name="dev")
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    steps = a.steps or math.ceil(a.rows / a.batch_size)
    extra = {"data_workers": a.workers} if a.workers else {}
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        run = valuekit.train(train, dev, model=resnet, method=a.method, steps=steps, batch_size=a.batch_size,
                             device="cpu", out=Path(tmp) / "run", progress=False, eval_every=max(steps, 1),
                             checkpoint_every=max(steps, 1), log_every=100, **extra)
        wall = time.perf_counter() - t1
        m = run.metrics()
        times = m["step_time"].to_numpy()[5:] if len(m) > 10 else m["step_time"].to_numpy()
        values = run.values()
        out = {
            "method": a.method, "rows": a.rows, "stream": a.stream, "workers": a.workers, "steps": steps,
            "batch_size": a.batch_size, "load_s": round(load_s, 2), "train_wall_s": round(wall, 2),
            "steps_per_s": round(1.0 / float(times.mean()), 3),
            "rss_after_load_mb": round(rss_loaded, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "values_rows": int(len(values)), "values_finite": int(values["value"].notna().sum()),
            "dev_acc": run.meta.get("final_metrics", {}).get("dev_acc"),
        }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
