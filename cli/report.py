"""valuekit report: one self-contained HTML file (inline figures, no network) for one or more runs."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("report", help="self-contained HTML report of one or more runs", description=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories (shown side by side), or a `valuekit clean` output folder (its candidates, "
                        "pick and the runs of the model it handed over)")
    p.add_argument("-o", "--out", required=True, help="output REPORT.html")
    p.add_argument("--data", default=None,
                   help="training table for the audit section (default: data.train.path in the first run.json)")
    p.add_argument("--baselines", action="store_true",
                   help="add the small-loss and cleanlab baselines to the mislabel audit section")
    p.add_argument("--top-k", type=int, default=20, help="rows of the top-suspects table (default: 20)")
    p.add_argument("--title", default=None, help="page title (default: the run names)")
    p.add_argument("--overwrite", action="store_true", help="replace REPORT.html if it exists (default: refuse)")
    p.set_defaults(func=run)


def run(args) -> int:
    from valuekit.cli.audit import run_tables

    from valuekit.errors import InputError
    from valuekit.reporting import clean_members, write_report
    from valuekit.runs.paths import check_output
    from valuekit.runs.reader import read_run

    check_output(args.out, suffixes=(".html", ".htm"), inputs=[args.data], runs=args.runs)
    runs = [m for r in args.runs for m in ((clean_members(r) or (None, [r]))[1])]
    inputs = [args.data] + [p for r in runs for p in run_tables(read_run(r))]
    check_output(args.out, suffixes=(".html", ".htm"), inputs=inputs, runs=[*args.runs, *runs],
                 overwrite=args.overwrite)
    if args.top_k < 1:
        raise InputError(f"--top-k {args.top_k}: must be at least 1")
    path = write_report(args.runs, args.out, data=args.data, baselines=args.baselines, top_k=args.top_k,
                        title=args.title, overwrite=args.overwrite)
    print(f"report: {path}")
    return 0
