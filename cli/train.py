"""valuekit train: train a model with a valuation method and write a run directory.

`--nproc N` runs N processes on this machine through PyTorch's launcher (`torchrun --standalone
--nproc_per_node N -m valuekit.cli train ...`); several nodes: start `torchrun ... -m valuekit.cli train
...` on each node yourself (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from valuekit.cli.common import add_table_options, add_train_options, load_tables, train_config

from valuekit.errors import InputError, held_warnings, release_warnings
from valuekit.runs.paths import check_output

_PARSER: argparse.ArgumentParser | None = None


def add_parser(sub):
    global _PARSER
    p = sub.add_parser("train", help="train with a valuation method and log per-example weights to a run directory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="training table (.parquet, .csv, .npz)")
    add_train_options(p)
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out already holds (said on stderr)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N processes on this machine (one per GPU, or CPU processes with gloo) via "
                        "torchrun; --batch-size is per process, so each step sees N x batch-size rows")
    add_table_options(p)
    p.set_defaults(func=run)
    _PARSER = p


def _argv(args) -> list[str]:
    """The command line of `args` again, without --nproc (options left at their default are omitted)."""
    out = ["train", args.table]
    for a in _PARSER._actions:
        if not a.option_strings or a.dest in ("help", "nproc"):
            continue
        v = getattr(args, a.dest, a.default)
        if v == a.default or v is None:
            continue
        opt = max(a.option_strings, key=len)
        if isinstance(a, argparse._StoreTrueAction):
            out.append(opt)
        elif isinstance(a, argparse._AppendAction):
            for item in v:
                out += [opt, str(item)]
        else:
            out += [opt, str(v)]
    return out


def _launch(args) -> int:
    """Re-run this command under torchrun with --nproc processes; its exit status is ours."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("--nproc: already running under torchrun; leave --nproc out (torchrun sets the processes)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "valuekit.cli", *_argv(args)]
    # torchrun gets its own session, so a signal meant for this command (Ctrl-C in a terminal, SIGTERM from a
    # scheduler to this pid or to its group) reaches it exactly once, forwarded here; torchrun passes it to every
    # rank, and the ranks agree on one step to stop at and checkpoint (a second signal would stop them at once)
    env = dict(os.environ)
    if os.environ.get("VALUEKIT_OWN_TMP"):  # torchrun's torchelastic_* folders go to this command's own temp dir
        env["TMPDIR"] = os.environ["VALUEKIT_OWN_TMP"]
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if got and code != 0:  # stopped by a signal: the exit status of an interrupted one-process run
        print("valuekit: interrupted; every rank stopped at the same step with a checkpoint (continue with --resume)",
              file=sys.stderr)
        return 130
    return code


@held_warnings()  # what the checks of the input would print waits until they pass: a refusal is one line
def run(args) -> int:
    from valuekit.api import train

    check_output(args.out, option="--out", kind="run", inputs=[args.table, args.dev, args.test])
    if args.nproc is not None and args.nproc < 1:
        raise InputError(f"--nproc {args.nproc}: must be >= 1")
    cfg, method_cfg = train_config(args)
    data, dev, test = load_tables(args, args.table)  # bad input fails here, before any process is started
    if args.nproc is not None and args.nproc > 1:
        del data, dev, test
        import torch

        from valuekit.training.options import resolve_device

        if cfg.device.startswith("cuda:"):  # what every rank would refuse (trainers.base._placement), said once
            raise InputError(f"--device {cfg.device}: with --nproc each process uses cuda:LOCAL_RANK; "
                             f"use --device auto or cuda")
        resolve_device(cfg.device)  # --device cuda on a machine without CUDA: one line, before any process starts
        gpus = torch.cuda.device_count() if cfg.device in ("auto", "cuda") else 0
        if gpus and args.nproc > gpus:
            raise InputError(f"--nproc {args.nproc}: this machine has {gpus} GPU(s), one process each; "
                             f"use --nproc {gpus} or --device cpu")
        if args.resume:  # another world size is refused here, before any process starts
            from valuekit.runs.reader import read_run
            from valuekit.training.rundir import check_world_size

            check_world_size(args.out, read_run(args.out).meta.get("world_size", 1), args.nproc)
        release_warnings()  # the checks here passed; the processes torchrun starts say their own
        return _launch(args)
    run_ = train(data, dev, test, out=Path(args.out), config=cfg, method_config=method_cfg, resume=args.resume,
                 overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    fm = run_.meta.get("final_metrics", {})
    # translation runs keep chrF / 100 in the accuracy columns
    label = {"dev_acc": "dev_chrf/100", "test_acc": "test_chrf/100"} if cfg.model == "seq2seq" else {}

    def accs(m):
        return ", ".join(f"{label.get(k, k)}={m[k]:.4f}" for k in ("dev_acc", "test_acc") if m.get(k) is not None)

    world = run_.meta.get("world_size", 1)
    print(f"run directory: {run_.path}  ({run_.meta['steps_done']} steps, {accs(fm)}"
          + (f", {world} processes" if world > 1 else "") + ")")
    if cfg.early_stopping:
        stopped = f" (stopped early: --patience {cfg.patience})" if run_.meta.get("stopped_early") else ""
        print(f"  last:    step {fm.get('step', run_.meta['steps_done'])}, {accs(fm)}  {run_.checkpoint_path}{stopped}")
        if run_.meta.get("best_step") is not None:
            print(
                f"  best:    step {run_.meta['best_step']}, {accs(run_.meta.get('best_metrics') or {})}  "
                f"{run_.best_model_path}"
            )
        else:
            print("  best:    none (no evaluation gave a finite dev accuracy)")
    print(f"  values:  {run_.values_path}")
    print(f"  steps:   {run_.path / 'steps'}/" + ("rank-*/" if world > 1 else "") + "part-*.parquet")
    print(f"  metrics: {run_.path / 'metrics'}/part-*.parquet")
    return 0
