"""valuekit audit: rank training examples by how likely their label is wrong, from one or more runs.

Writes the audit table (one row per example, most suspicious first) and AUDIT.summary.json
next to it, and prints the summary. Flags come from a two-means split of label_score (or
--flag-fraction), never from the table's is_noisy column, which only scores the audit.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("audit", help="mislabel audit table from one or more runs", description=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories trained on the same table")
    p.add_argument("-o", "--out", required=True, help="output AUDIT.parquet or AUDIT.csv")
    p.add_argument("--data", default=None, help="training table (default: data.train.path in the first run.json)")
    p.add_argument("--flag-fraction", type=float, default=None,
                   help="flag this fraction of lowest label_score (default: two-means split of label_score)")
    p.add_argument("--baselines", action="store_true",
                   help="add the uniform run's small-loss value and cleanlab confident learning (if installed)")
    p.add_argument("--no-predict", dest="predict", action="store_false",
                   help="skip the cross-validated predicted_label (faster on large tables)")
    p.add_argument("--cv-folds", type=int, default=5, help="folds for out-of-sample predictions (default: 5)")
    p.add_argument("--cv-max-train", type=int, default=2000,
                   help="at most this many training rows per fold (a fixed budget; default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-validation (default: 0)")
    p.add_argument("--id-col", default="id", help="id column of the table (default: id)")
    p.add_argument("--label-col", default="label", help="label column of the table (default: label)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace AUDIT and AUDIT.summary.json if they exist (default: refuse)")
    p.set_defaults(func=run)


def run_tables(run) -> list[str]:
    """The tables named in run.json (data.train/dev/test.path): inputs, never an output."""
    data = run.meta.get("data") or {}
    out = []
    for split in ("train", "dev", "test"):
        d = data.get(split) if isinstance(data, dict) else None
        path = d.get("path") if isinstance(d, dict) else None
        if isinstance(path, str) and path:
            out.append(path)
    return out


def summary_path(out: Path) -> Path:
    """AUDIT.parquet -> AUDIT.summary.json (valuekit.analysis.mislabel.summary_path)."""
    from valuekit.analysis.mislabel import summary_path

    return summary_path(out)


def format_summary(s: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"examples: {s['n']}   flagged: {s['n_flagged']} ({s.get('flag_rule')})"]
    if "n_noisy" in s:
        lines.append(f"truly noisy (is_noisy): {s['n_noisy']}   flagged precision {f(s['flagged_precision'])} "
                     f"recall {f(s['flagged_recall'])}")
        lines.append(f"{'score':<28} {'auroc':>7} {'auprc':>7} {'p@k':>7} {'r@k':>7} {'f1@k':>7} {'2means':>7}")
        rows = {"label_score": s, **s.get("scores", {})}
        for name, m in rows.items():
            lines.append(f"{name:<28} " + " ".join(f"{f(m.get(k)):>7}" for k in
                         ("auroc", "auprc", "precision_at_k", "recall_at_k", "f1_at_k", "two_means_f1")))
    for pair, rho in s.get("spearman", {}).items():
        lines.append(f"spearman {pair}: {f(rho)}")
    for note in s.get("baselines_skipped", []):
        lines.append(f"baseline skipped: {note}")
    return "\n".join(lines)


def run(args) -> int:
    from valuekit.analysis.mislabel import audit, write_audit
    from valuekit.errors import InputError
    from valuekit.runs.paths import check_output, refuse_existing
    from valuekit.runs.reader import read_run

    out = Path(args.out)
    check_output(args.out, suffixes=(".parquet", ".pq", ".csv"), inputs=[args.data], runs=args.runs)
    # the runs' training tables are inputs too (never an output)
    inputs = [args.data] + [p for r in args.runs for p in run_tables(read_run(r))]
    check_output(args.out, suffixes=(".parquet", ".pq", ".csv"), inputs=inputs, runs=args.runs,
                 overwrite=args.overwrite)
    check_output(summary_path(out), inputs=inputs, runs=args.runs)
    refuse_existing(summary_path(out), overwrite=args.overwrite, of=args.out)
    if args.flag_fraction is not None and not 0.0 <= args.flag_fraction <= 1.0:
        raise InputError(f"--flag-fraction {args.flag_fraction}: must be between 0 and 1")
    if args.cv_folds < 2:
        raise InputError(f"--cv-folds {args.cv_folds}: need at least 2")
    if args.cv_max_train < 10:
        raise InputError(f"--cv-max-train {args.cv_max_train}: need at least 10")
    from valuekit.config import check_seed

    check_seed(args.seed)
    frame = audit(args.runs, data=args.data, flag_fraction=args.flag_fraction, baselines=args.baselines,
                  predict=args.predict, cv_folds=args.cv_folds, cv_max_train=args.cv_max_train, seed=args.seed,
                  id_col=args.id_col, label_col=args.label_col)
    summary = write_audit(frame, out)
    spath = summary_path(out)
    print(format_summary(summary))
    print(f"audit table: {out}\nsummary: {spath}")
    return 0
