"""Same numbers before and after a refactor (docs/refactor_check.md): train every method with two source trees.

    git archive OLD | tar -x -C /tmp/a;  git archive NEW | tar -x -C /tmp/b
    python scripts/refactor_check.py /tmp/a /tmp/b [--methods uniform,dds,...] [--out /tmp/cmp]

Each tree trains each method in its own interpreter (PYTHONPATH=TREE) on data/digits-noisy20 (multidds: the
bundled digits with 3 sources), 60 steps, seed 1; then values.parquet, metrics (all but time columns) and the
steps/ rows are compared column by column. Prints a markdown table; exit 1 when something differs.
"""
import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

TRAIN = """
import sys
from pathlib import Path
try:  # the package layout by concern
    from valuekit.bench.common import bench_tables
    from valuekit.config import TrainConfig
    from valuekit.data.tables import load_table
    from valuekit.training.loop import run_training
except ImportError:  # the flat layout before it
    from valuekit.bench import _bench_tables as bench_tables
    from valuekit.datasets import load_table
    from valuekit.trainers.base import TrainConfig
    from valuekit.trainers.base import train as run_training
method, out, data = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if method == "multidds":
    tr, dv = bench_tables(data, sources=3); te = None
else:
    tr = load_table(data / "train.parquet"); dv = load_table(data / "dev.parquet", like=tr, name="dev")
    te = load_table(data / "test.parquet", like=tr, name="test")
cfg = TrainConfig(method=method, steps=60, batch_size=32, eval_every=20, log_every=20, checkpoint_every=30,
                  progress=False, device="cpu", seed=1)
run_training(tr, dv, te, out=out, config=cfg)
"""
TIME_COLS = {"step_time", "wall_time", "cuda_mem_mb"}


def frames(run: Path) -> dict[str, pd.DataFrame]:
    read = lambda p: pd.concat([pd.read_parquet(f) for f in sorted(p.glob("part-*.parquet"))], ignore_index=True)  # noqa: E731
    metrics = read(run / "metrics")
    return {"values": pd.read_parquet(run / "values.parquet"), "steps": read(run / "steps"),
            "metrics": metrics.drop(columns=[c for c in metrics if c in TIME_COLS])}


def compare(a: pd.DataFrame, b: pd.DataFrame) -> str:
    shared = [c for c in a.columns if c in b.columns]
    same = len(a) == len(b) and all(a[c].equals(b[c]) for c in shared)
    extra = sorted(set(a.columns) ^ set(b.columns))
    verdict = "bitwise equal"
    if not same:
        num = [c for c in shared if pd.api.types.is_numeric_dtype(a[c]) and not a[c].equals(b[c])]
        other = [c for c in shared if c not in num and not a[c].equals(b[c])]
        diff = max(((a[c] - b[c]).abs().max() for c in num), default=float("nan")) if len(a) == len(b) else float("nan")
        verdict = (
            f"DIFFERENT (max abs diff {diff:.2g} in {', '.join(num) or '-'}; other columns: {', '.join(other) or '-'})"
        )
    return verdict + (f" (columns in one only: {', '.join(extra)})" if extra else "")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("old"), ap.add_argument("new")
    ap.add_argument("--methods", default="uniform,dds,hostcp,lrdi,l2rw,mwnet,bads,multidds")
    ap.add_argument("--out", default="/tmp/refactor_check")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "digits-noisy20"))
    args = ap.parse_args()
    print(
        "| method | values.parquet (every column) | metrics (every column but time) | steps/ rows |\n| --- | --- | "
        "--- | --- |"
    )
    bad = False
    for m in args.methods.split(","):
        runs = []
        for tag, tree in (("old", args.old), ("new", args.new)):
            out = Path(args.out) / tag / m
            shutil.rmtree(out, ignore_errors=True)
            env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
            subprocess.run([sys.executable, "-c", TRAIN, m, str(out), args.data], env=env, check=True, cwd=tree)
            runs.append(frames(out))
        cells = [compare(runs[0][k], runs[1][k]) for k in ("values", "metrics", "steps")]
        bad |= any("DIFFERENT" in c for c in cells)
        print(f"| {m} | " + " | ".join(cells) + " |")
    return int(bad)


if __name__ == "__main__":
    sys.exit(main())
