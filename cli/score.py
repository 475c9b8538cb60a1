"""valuekit score: write TABLE back with weight, value, value_std, rank (and selected) from a run.

With --method instead of --run, trains first (into OUT's name + '.run/') and then exports.
"""

from __future__ import annotations

from pathlib import Path

from valuekit.cli.common import add_table_options, add_train_options, load_tables, train_config


def add_parser(sub):
    p = sub.add_parser("score", help="export a weighted or pruned copy of a table", description=__doc__)
    p.add_argument("table", help="table to score (.parquet or .csv); its ids must be in the run")
    p.add_argument("-o", "--out", required=True, help="output .parquet or .csv")
    p.add_argument("--run", default=None, help="run directory to take values from")
    p.add_argument("--run-dir", default=None, help="with --method: where to write the run (default: OUT.run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (default: refuse); with --method also the run that --run-dir "
                        "(default: OUT.run) already holds")
    sel = p.add_argument_group("selection (at most one)")
    sel.add_argument("--keep-fraction", type=float, default=None, help="select the top fraction by value")
    sel.add_argument("--top-k", type=int, default=None, help="select the K most valuable rows")
    sel.add_argument("--drop-fraction", type=float, default=None, help="drop the lowest fraction by value")
    sel.add_argument("--min-weight", type=float, default=None, help="select rows with weight >= W")
    sel.add_argument("--per-class", action="store_true",
                     help="apply --keep-fraction/--top-k/--drop-fraction inside every class of --label-col "
                          "(stratified: each class keeps its share)")
    sel.add_argument("--subset-only", action="store_true", help="write only the selected rows")
    sel.add_argument("--per-task", action="store_true",
                     help="instruction tables: --keep-fraction within each task (the column --source-col names; "
                          "in instruction tables its default is task)")
    sel.add_argument("--rank-by", default="value", metavar="COLUMN",
                     help="rank and select by this numeric column of the run's values.parquet instead of value "
                          "(e.g. mean_reward: DDS's gradient alignment with the dev set)")
    p.add_argument("--drop-columns", default=None, metavar="COL,...",
                   help="leave these columns out of the output (e.g. an image column a .csv cannot hold)")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="rows per streamed batch (default: 131072); memory is ~50 bytes per row plus fixed buffers")
    add_train_options(p, dev_required=False)
    add_table_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from valuekit.errors import InputError
    from valuekit.export.scoring import DEFAULT_BATCH_ROWS, Selection, write_scored
    from valuekit.runs.paths import check_output

    if (args.run is None) == (args.method is None):
        raise InputError("give exactly one of --run RUN_DIR or --method METHOD (to train first)")
    inputs = [args.table, args.dev, args.test]
    runs = [args.run] if args.run else []
    out = Path(args.out)
    instr = _instruction_export(args, out)
    check_output(args.out, suffixes=(".parquet", ".pq", ".csv") + ((".jsonl",) if instr else ()), inputs=inputs,
                 runs=runs, overwrite=args.overwrite)
    if instr:
        from valuekit.export.instructions import tasks_path
        from valuekit.runs.paths import refuse_existing

        refuse_existing(tasks_path(out), overwrite=args.overwrite, of=args.out)
    selection = Selection(keep_fraction=args.keep_fraction, top_k=args.top_k, drop_fraction=args.drop_fraction,
                          min_weight=args.min_weight, subset_only=args.subset_only, per_class=args.per_class).check()
    if args.batch_rows is not None and args.batch_rows < 1:
        raise InputError(f"--batch-rows {args.batch_rows}: must be an integer >= 1")
    if args.method is None and args.run_dir is not None:
        raise InputError("--run-dir is where --method writes its run; with --run it is not used (leave it out)")
    run_dir = args.run
    if args.method is not None:
        from valuekit.api import train

        if not args.dev:
            raise InputError("--method needs --dev DEV (the small trusted table)")
        cfg, method_cfg = train_config(args)
        data, dev, test = load_tables(args, args.table)
        run_dir = Path(args.run_dir or out.with_name(out.name + ".run"))
        # Check where the run goes before spending time on training.
        check_output(run_dir, option="--run-dir", kind="run", inputs=[*inputs, args.out])
        from valuekit.runs.layout import RUN_JSON

        if (run_dir / RUN_JSON).exists() and not args.overwrite:
            raise InputError(f"--run-dir {run_dir}: already holds a run; use --overwrite to train it again, "
                             f"--run {run_dir} (without --method) to score with it, or choose another --run-dir")
        if run_dir.resolve() == out.resolve() or out.resolve().is_relative_to(run_dir.resolve()):
            raise InputError(f"-o {args.out}: lies in the run directory {run_dir}; write the table elsewhere")
        r = train(data, dev, test, out=run_dir, config=cfg, method_config=method_cfg, overwrite=args.overwrite)
        fm = r.meta.get("final_metrics", {})
        acc = ", ".join(f"{k}={fm[k]:.4f}" for k in ("dev_acc", "test_acc") if fm.get(k) is not None)
        print(f"trained {args.method}: {run_dir} ({acc})")
    if instr:
        from valuekit.export.instructions import export_instructions

        task_col = "task" if args.source_col == "source" else args.source_col
        path, tasks = export_instructions(args.table, run_dir, out, id_col=args.id_col, task_col=task_col,
                                          keep_fraction=args.keep_fraction, per_task=args.per_task,
                                          rank_by=args.rank_by,
                                          subset_only=args.subset_only, overwrite=args.overwrite)
        print(f"scored instruction table: {path}")
        if tasks is not None:
            print(f"per-task table: {tasks_path(path)}")
            print(tasks.to_string(index=False))
        _warn_unranked(run_dir, args.rank_by)
        return 0
    batch_rows = DEFAULT_BATCH_ROWS if args.batch_rows is None else args.batch_rows
    summary = write_scored(args.table, run_dir, out, selection=selection, id_col=args.id_col, batch_rows=batch_rows,
                           progress=True, label_col=args.label_col, rank_by=args.rank_by,
                           drop_columns=args.drop_columns, overwrite=args.overwrite)
    sel = "" if summary.selected is None else f", {summary.selected} selected"
    print(f"scored table: {summary.path} ({summary.rows_out} of {summary.rows_in} rows{sel})")
    _say_what_value_is(run_dir)
    _warn_unranked(run_dir, args.rank_by)
    for c in summary.starved or []:
        print(f"warning: class {c['label']!r} keeps {c['kept']} of {c['rows']} rows, {c['share_ratio']:.2f}x its share "
              f"(under half); --per-class keeps every class at its share")
    return 0


def _warn_unranked(run_dir, column: str) -> None:
    """Rows without a value in the --rank-by column rank last, in row order: say how many, so a run too short to
    give most rows a reward (DDS computes them every update_every-th step, after scorer_warmup) is noticed."""
    import sys

    from valuekit.export.scoring import missing_in_column

    if column == "value":  # never-valued rows are the documented NaN-last case, no warning
        return
    missing, n = missing_in_column(run_dir, column)
    if missing:
        print(f"warning: --rank-by {column}: {missing:,} of {n:,} rows of the run have none (for mean_reward: never in "
              "a reward batch); they rank last, in row order", file=sys.stderr)


def _instruction_export(args, out: Path) -> bool:
    """Instruction tables (prompt + response columns), JSONL output or --per-task: the instruction export."""
    from valuekit.cli.common import _columns

    from valuekit.errors import InputError

    names = _columns(args.table)
    instr = args.per_task or out.suffix.lower() == ".jsonl" or ("prompt" in names and "response" in names)
    if instr and (args.top_k is not None or args.drop_fraction is not None or args.min_weight is not None
                  or args.per_class):
        raise InputError("instruction tables select with --keep-fraction (optionally --per-task)")
    return instr


def _say_what_value_is(run_dir) -> None:
    """One line each: what `value` and `weight` mean for the run's method (run.json's column_docs)."""
    from valuekit.runs.reader import read_run

    docs = read_run(run_dir).column_docs
    for column in ("value", "weight"):
        if docs.get(column):
            print(f"  {column}: {docs[column]}")
