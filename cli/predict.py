"""valuekit predict: the model `valuekit clean` handed over, on a table: every row's predicted class and class
probabilities (the mean of the refitted members' probabilities in OUT/ensemble.pt; valuekit.predict).
"""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("predict", help="predict with the model `valuekit clean` handed over", description=__doc__)
    p.add_argument("table", metavar="TABLE", help="rows to predict (.parquet or .csv): the id and feature columns "
                                                  "of the training table; a label column is not read")
    p.add_argument("--clean", required=True, metavar="DIR", help="output folder of `valuekit clean` (its -o)")
    p.add_argument("--train", required=True, help="the training table given to `valuekit clean` (fixes the classes "
                                                  "and the feature columns)")
    p.add_argument("-o", "--out", required=True, help="output .parquet or .csv: id, prediction, prob_<class>")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
    p.add_argument("--id-col", default="id", help="id column (default: id)")
    p.add_argument("--label-col", default="label", help="label column of the training table (default: label)")
    p.set_defaults(func=run)


def run(args) -> int:
    from valuekit.pipeline import predict
    from valuekit.runs.paths import check_output

    out = check_output(args.out, suffixes=(".parquet", ".pq", ".csv"), inputs=[args.table, args.train],
                       runs=[args.clean], overwrite=args.overwrite)
    result = predict(args.table, args.clean, train=args.train, id_col=args.id_col, label_col=args.label_col)
    if out.suffix.lower() == ".csv":
        result.to_csv(out, index=False)
    else:
        result.to_parquet(out, index=False)
    counts = result.prediction.value_counts()
    print(f"{len(result)} rows -> {out} (predicted: "
          + ", ".join(f"{c} {n}" for c, n in counts.head(8).items()) + (", ..." if len(counts) > 8 else "") + ")")
    return 0
