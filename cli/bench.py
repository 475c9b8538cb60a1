"""valuekit bench: speed ratios, layer speed, quality against baselines, scale, and the study suites
(papers: each seed paper's own experiment at CPU scale, valuekit.bench.papers;
uniform, dds, dds-entropy, dds-ess, lrdi, lrdi-normalize, hostcp, bads, bads-dev-every, multidds: data x setting x
method x seeds,
see valuekit.bench.suites) and the text suites (multidds-targets, multidds-signal, multidds-model, llm: translation over
source languages and instruction-LM data selection, see valuekit.bench.suites_text; --datasets names their targets,
--methods their variants, --runs-dir keeps their runs and resumes); writes markdown, CSV and PNG.

Every run also rewrites OUT/BENCHMARKS.md, an index of the latest results found in OUT.
"""

from __future__ import annotations

from valuekit.cli.common import add_threads_option


def add_parser(sub):
    from valuekit.bench.suites import SUITES
    from valuekit.bench.suites_text import NAMES as TEXT_SUITES

    p = sub.add_parser("bench", help="benchmark the methods (speed, layer, quality, scale, study suites)",
                       description=__doc__)
    p.add_argument(
        "kind",
        nargs="+",
        choices=["speed", "layer", "quality", "scale", "stream", "epoch", "outcome", "value", "all", "papers", *SUITES,
                 *TEXT_SUITES],
        help="which benchmarks to run (all = speed, layer, quality, scale, stream, epoch; outcome = the pipelines of "
        "`valuekit clean` against cleanlab's; value = which in-run value ranks flipped rows best, chosen on some sets "
        "and judged on held-out ones; papers = each paper's own experiment at CPU scale; the others are "
        "study suites)",
    )
    p.add_argument("-o", "--out", default="reports", help="output folder (default: reports)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--quick", action="store_true", help="a reduced run (under 2 minutes on a CPU)")
    p.add_argument("--seeds", default=None, help="quality, suites: comma-separated seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, default=None, help="quality, suites: training steps per run (default 1500)")
    p.add_argument("--datasets", default=None, help="quality, suites: comma-separated data sets (default digits,"
                   "mnist5k, fashion-mnist when installed; a suite's own list)")
    p.add_argument("--methods", default=None, help="speed/quality: comma-separated methods (default: all); "
                   "text suites: their variants / arms")
    p.add_argument("--settings", default=None, help="quality: comma-separated settings noise20,noise40,imbalance10 "
                   "(default noise20,noise40); papers: its parts imbalance,pairflip,instance,features,hostcp,shift "
                   "(default all); "
                   "outcome, value: sym30,pair40,inst30,lt10+sym20 (default all)")
    p.add_argument("--runs-dir", default=None, help="quality, outcome, text suites: keep every run directory (and "
                   "partial results) here; text suites skip the runs already recorded there; value: comma-separated "
                   "roots read for recorded cells, missing cells trained into the first")
    p.add_argument("--report-only", action="store_true", help="text suites and value with --runs-dir: write the "
                   "tables from the runs recorded there, train nothing")
    add_threads_option(p)
    p.set_defaults(func=run)


def _check(args) -> None:
    """Every option is checked before the first benchmark starts (a typo must not cost a speed run)."""
    from valuekit.bench.main import registry
    from valuekit.bench.suites_text import NAMES as TEXT_NAMES
    from valuekit.config import available_methods
    from valuekit.data.bundled import DATASETS
    from valuekit.errors import InputError
    from valuekit.runs.paths import check_output
    from valuekit.training.options import resolve_device

    check_output(args.out, kind="dir")
    resolve_device(args.device)
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps {args.steps}: must be >= 1")
    items = {key: [t.strip() for t in (getattr(args, key) or "").split(",") if t.strip()]
             for key in ("seeds", "datasets", "methods")}
    for key in ("seeds", "datasets", "methods"):
        if getattr(args, key) is not None and not items[key]:
            raise InputError(f"--{key} {getattr(args, key)!r}: empty list")
    bad = [s for s in items["seeds"] if not s.lstrip("-").isdigit()]
    if bad:
        raise InputError(f"--seeds {args.seeds!r}: {bad[0]!r} is not an integer (expected e.g. 0,1,2)")
    from valuekit.config import check_seed

    for text in items["seeds"]:
        check_seed(int(text), where="--seeds")
    if args.report_only and (not args.runs_dir or any(k not in (*TEXT_NAMES, "value") for k in args.kind)):
        raise InputError(f"--report-only: only for the text suites ({', '.join(TEXT_NAMES)}) and value with "
                         "--runs-dir")
    known_data, known_methods = list(DATASETS), list(available_methods())
    text = [registry()[k] for k in args.kind if k in TEXT_NAMES]
    if text:  # a text suite names its own targets / variants; mixed with other kinds, either kind's names pass
        plain = any(k not in TEXT_NAMES for k in args.kind)
        known_data = [*(known_data if plain else []), *[d for s in text for d in s.data]]
        known_methods = [*(known_methods if plain else []), *[a for s in text for a in s.arms]]
    for key, known in (("datasets", known_data), ("methods", known_methods)):
        unknown = [t for t in items[key] if t not in known]
        if unknown:
            raise InputError(f"--{key}: unknown {key[:-1]} {unknown[0]!r}; choose from {', '.join(known)}")


def run(args) -> int:
    from pathlib import Path

    from valuekit.cli.common import apply_cli_threads

    from valuekit.bench.main import KINDS, run_bench, write_index

    apply_cli_threads(args)  # the benchmarks time small steps: 1 thread unless --threads / $VALUEKIT_THREADS

    _check(args)
    kinds = [k for k in KINDS if k != "outcome"] if "all" in args.kind else list(dict.fromkeys(args.kind))
    # the command line that reproduces this run, written at the top of every result file
    options = {"seeds": args.seeds, "steps": args.steps, "datasets": args.datasets, "methods": args.methods,
               "settings": args.settings, "runs_dir": args.runs_dir}
    flags = {"report_only": args.report_only}
    argv = [
        *args.kind,
        *(["--quick"] if args.quick else []),
        *(["--report-only"] if args.report_only else []),
        "--device",
        args.device,
        "-o",
        args.out,
        *(["--threads", str(args.threads)] if args.threads is not None else []),
    ]
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    for kind in kinds:
        md = run_bench(kind, Path(args.out), device=args.device, quick=args.quick, argv=argv, **options, **flags)
        print(f"{kind}: {md}")
    print(f"index: {write_index(Path(args.out))}")
    return 0
