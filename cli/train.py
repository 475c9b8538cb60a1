"""valuekit train: train a model with a valuation method and write a run directory."""

from __future__ import annotations

from pathlib import Path

from valuekit.cli.common import add_table_options, add_train_options, load_tables, train_config


def add_parser(sub):
    p = sub.add_parser("train", help="train with a valuation method and log per-example weights to a run directory",
                       description=__doc__)
    p.add_argument("table", help="training table (.parquet, .csv, .npz)")
    add_train_options(p)
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_table_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from valuekit.trainers.base import train

    cfg, method_cfg = train_config(args)
    data, dev, test = load_tables(args, args.table)
    run_ = train(data, dev, test, out=Path(args.out), config=cfg, method_config=method_cfg, resume=args.resume)
    fm = run_.meta.get("final_metrics", {})
    acc = ", ".join(f"{k}={fm[k]:.4f}" for k in ("dev_acc", "test_acc") if fm.get(k) is not None)
    print(f"run directory: {run_.path}  ({run_.meta['steps_done']} steps, {acc})")
    print(f"  values:  {run_.path / 'values.parquet'}")
    print(f"  steps:   {run_.path / 'steps'}/part-*.parquet")
    print(f"  metrics: {run_.path / 'metrics'}/part-*.parquet")
    return 0
