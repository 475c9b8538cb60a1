"""valuekit data: list and prepare the bundled real data sets."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("data", help="list or prepare bundled real data sets", description=__doc__)
    dsub = p.add_subparsers(dest="data_command", required=True)
    pl = dsub.add_parser("list", help="show the data sets that can be prepared")
    pl.set_defaults(func=run_list)
    pp = dsub.add_parser("prepare", help="write DIR/train.parquet, DIR/dev.parquet, DIR/test.parquet")
    pp.add_argument("name", help="data set name (valuekit data list)")
    pp.add_argument("-o", "--out", required=True, help="output folder")
    pp.add_argument("--noise", type=float, default=0.0, help="fraction of training labels to flip (default 0)")
    pp.add_argument("--noise-kind", default="symmetric", choices=["symmetric", "pair"])
    pp.add_argument("--imbalance", type=float, default=1.0, help="largest/smallest class ratio in train (default 1)")
    pp.add_argument("--dev-size", type=int, default=None, help="dev rows, class-balanced (default 10 per class)")
    pp.add_argument("--test-fraction", type=float, default=0.2)
    pp.add_argument("--max-train", type=int, default=None, help="subsample train to at most this many rows")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--from", dest="from_dir", default=None, help="folder with the raw files (fashion-mnist)")
    pp.add_argument("--target", default="ast", help="multilingual: held-out target language (default ast)")
    pp.add_argument("--sources", default=None,
                    help="multilingual: comma-separated source languages (default es,gl,pt,ca,it,fr,ru,ja,de,fi)")
    pp.add_argument("--test-size", type=int, default=60, help="multilingual / instructions: test groups (default 60)")
    pp.add_argument("--tasks", default=None,
                    help="instructions: comma-separated languages, one task each (default es,fr,de,ru,ja,fi)")
    pp.add_argument("--junk-task", default="pt",
                    help="instructions: language added as task 'junk' with random responses ('none': no junk task)")
    pp.add_argument("--max-per-task", type=int, default=None, help="instructions: at most this many train rows per task")
    pp.add_argument("--format", default="parquet", choices=["parquet", "jsonl", "csv"],
                    help="instructions: file format of the splits (default parquet)")
    pp.set_defaults(func=run_prepare)


def run_list(args) -> int:
    from valuekit.datasets import DATASETS

    for name, (_, desc) in DATASETS.items():
        print(f"{name:15s} {desc}")
    print(f"{'instructions':15s} Django translation catalogs as a multi-task instruction set (prompt, response, task; "
          f"junk task and --noise junk rows for evaluation; needs django)")
    print(f"{'multilingual':15s} Django translation catalogs as a multi-way parallel X->English table "
          f"(target ast + 10 source languages; needs django)")
    return 0


def run_prepare(args) -> int:
    from valuekit.datasets import prepare

    if args.name == "instructions":
        from valuekit.instructions import DEFAULT_TASKS, prepare_instructions

        tasks = tuple(t for t in args.tasks.split(",") if t) if args.tasks else DEFAULT_TASKS
        junk = None if args.junk_task.lower() == "none" else args.junk_task
        paths = prepare_instructions(args.out, tasks=tasks, junk_task=junk, noise=args.noise,
                                     dev_size=args.dev_size or 100, test_size=args.test_size,
                                     max_per_task=args.max_per_task, fmt=args.format, seed=args.seed)
        for split, path in paths.items():
            print(f"{split:5s} {path}")
        return 0
    if args.name == "multilingual":
        from valuekit.multilingual import DEFAULT_SOURCES, prepare_multilingual

        sources = tuple(s for s in args.sources.split(",") if s) if args.sources else DEFAULT_SOURCES
        paths = prepare_multilingual(args.out, target=args.target, sources=sources, seed=args.seed,
                                     dev_size=args.dev_size or 60, test_size=args.test_size)
        for split, path in paths.items():
            print(f"{split:5s} {path}")
        return 0
    paths = prepare(args.name, args.out, noise=args.noise, noise_kind=args.noise_kind, imbalance=args.imbalance,
                    dev_size=args.dev_size, test_fraction=args.test_fraction, max_train=args.max_train,
                    seed=args.seed, from_dir=args.from_dir)
    for split, path in paths.items():
        print(f"{split:5s} {path}")
    return 0
