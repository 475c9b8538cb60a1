"""valuekit data: list and prepare the bundled real data sets."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("data", help="list or prepare bundled real data sets", description=__doc__)
    dsub = p.add_subparsers(dest="data_command", required=True)
    pl = dsub.add_parser("list", help="show the data sets that can be prepared")
    pl.set_defaults(func=run_list)
    pg = dsub.add_parser("languages", help="languages of the multilingual data set (Django catalogs) and their sizes")
    pg.set_defaults(func=run_languages)
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
    pp.add_argument("--related", default=None,
                    help="multilingual: comma-separated languages related to the target (recorded as a group; "
                         "with --unrelated replaces --sources)")
    pp.add_argument("--unrelated", default=None, help="multilingual: comma-separated unrelated languages")
    pp.add_argument("--test-size", type=int, default=60, help="multilingual: test groups (default 60)")
    pp.set_defaults(func=run_prepare)


def run_list(args) -> int:
    from valuekit.datasets import DATASETS

    for name, (_, desc) in DATASETS.items():
        print(f"{name:15s} {desc}")
    print(f"{'multilingual':15s} Django translation catalogs as a multi-way parallel X->English table "
          f"(target ast + 10 source languages; needs django)")
    return 0


def run_languages(args) -> int:
    from valuekit.multilingual import RELATED, language_sizes

    for lang, n in language_sizes().items():
        rel = RELATED.get(lang)
        print(f"{lang:8s} {n:5d} messages" + (f"   known relatives: {','.join(rel)}" if rel else ""))
    return 0


def run_prepare(args) -> int:
    from valuekit.datasets import prepare

    if args.name == "multilingual":
        from valuekit.multilingual import DEFAULT_SOURCES, prepare_multilingual

        from valuekit.errors import InputError

        def split(text):
            return tuple(s.strip() for s in text.split(",") if s.strip()) if text else ()

        if args.sources and (args.related or args.unrelated):
            raise InputError("--sources: leave it out with --related/--unrelated (their union is the sources)")
        sources = split(args.sources) or DEFAULT_SOURCES
        paths = prepare_multilingual(args.out, target=args.target, sources=sources, related=split(args.related),
                                     unrelated=split(args.unrelated), seed=args.seed,
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
