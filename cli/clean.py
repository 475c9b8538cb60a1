"""valuekit clean: from a noisy table and a trusted dev table to a better table and model, in one command.

Trains the candidate pipelines (early-stopped uniform, the learned methods, uniform retrained without the rows the
audit flags, uniform retrained on the best method's weights) with early stopping on one half of --dev, picks the
one with the best accuracy on the other half, refits it and the runner-up on the whole --dev (unless --no-refit),
and writes OUT/table.parquet (the pick's table), OUT/ensemble.pt (the two refitted models, averaged by
`valuekit predict`), OUT/model.pt (the pick's model alone), OUT/candidates.parquet, OUT/clean.json and OUT/runs/
(valuekit.clean).
"""

from __future__ import annotations


def add_parser(sub):
    from valuekit.config import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("clean", help="train candidate pipelines, pick one on held-out dev rows, write table + model",
                       description=__doc__)
    p.add_argument("table", metavar="TABLE", help="training table (.parquet or .csv) with id and label columns")
    p.add_argument("--dev", default=None, help="small trusted dev table (required; split in two halves)")
    p.add_argument("--test", default=None, help="optional test table: each candidate's test accuracy is reported")
    p.add_argument("--methods", default="auto", metavar="auto|LIST",
                   help="learned methods among the candidates, comma-separated (default: auto = dds,mwnet)")
    p.add_argument("--subset", action="store_true",
                   help="add subset+retrain: uniform on the top --keep-fraction rows by the best method's value")
    p.add_argument("--keep-fraction", type=float, default=0.5, help="for --subset (default: 0.5)")
    p.add_argument("--no-weighted", dest="weighted", action="store_false",
                   help="leave out weighted+retrain (uniform with each row's loss times the best method's weight)")
    p.add_argument("--no-refit", dest="refit", action="store_false",
                   help="hand over the pick's model early-stopped on half A of --dev instead of refitting the pick "
                        "on the whole dev table")
    p.add_argument("--cross-fit", action="store_true",
                   help="train every candidate again with the dev halves swapped and pick by the accuracy over both "
                        "halves (twice the training; steadier picks on small dev tables)")
    p.add_argument("--ensemble", type=int, default=2, metavar="K",
                   help="hand over the mean of the K best candidates by held-out dev accuracy, each refitted "
                        "(OUT/ensemble.pt, valuekit predict); 1: the pick alone (default: 2)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps of every candidate (default: {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"model learning rate (default: {d.lr})")
    p.add_argument("--model", default=d.model, help=f"built-in model: linear, mlp (default: {d.model})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the dev split and the runs (default: {d.seed})")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (default: auto)")
    p.add_argument("--id-col", default="id", help="id column (default: id)")
    p.add_argument("--label-col", default="label", help="label column (default: label)")
    p.add_argument("-o", "--out", required=True, help="output folder (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what an earlier clean wrote in OUT (its files and candidate runs; said on stderr)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from valuekit.errors import InputError
    from valuekit.pipeline import clean, format_summary

    if args.dev is None:
        raise InputError("--dev: a trusted dev table is required")
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps {args.steps}: must be >= 1")
    record = clean(args.table, args.dev, test=args.test, out=args.out, methods=args.methods, steps=args.steps,
                   seed=args.seed, subset=args.subset, keep_fraction=args.keep_fraction, weighted=args.weighted,
                   refit=args.refit, cross_fit=args.cross_fit, ensemble=args.ensemble, batch_size=args.batch_size,
                   lr=args.lr, model=args.model, device=args.device, id_col=args.id_col, label_col=args.label_col,
                   log=lambda m: print(m, file=sys.stderr), overwrite=args.overwrite)
    print(format_summary(record))
    return 0
