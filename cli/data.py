"""valuekit data: list and prepare the real data sets (train/dev/test Parquet files).

Two are bundled, already prepared, in this repository's data/ folder: data/digits-noisy20
(`valuekit data prepare digits --noise 0.2 --seed 0 -o data/digits-noisy20`) and data/multilingual.
The others are prepared on this machine from a package or files (`valuekit data list` says which).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

MULTILINGUAL = "multilingual"
INSTRUCTIONS = "instructions"
BUNDLED = {"digits": "data/digits-noisy20 (20 % of the labels flipped)", MULTILINGUAL: "data/multilingual"}


def add_parser(sub):
    p = sub.add_parser("data", help="list or prepare bundled real data sets", description=__doc__)
    dsub = p.add_subparsers(dest="data_command", required=True)
    pl = dsub.add_parser("list", help="show the data sets, which are bundled and what preparing each needs")
    pl.set_defaults(func=run_list)
    pg = dsub.add_parser("languages", help="languages of the multilingual data set (Django catalogs) and their sizes")
    pg.set_defaults(func=run_languages)
    pp = dsub.add_parser("prepare", help="write DIR/train.parquet, DIR/dev.parquet, DIR/test.parquet")
    pp.add_argument("name", help="data set name (valuekit data list)")
    pp.add_argument("-o", "--out", required=True, help="output folder (created if missing)")
    pp.add_argument("--overwrite", action="store_true",
                    help="replace train/dev/test files (and images/) already in the output folder (default: refuse)")
    pp.add_argument("--noise", type=float, default=0.0,
                    help="fraction of training labels to flip, in [0, 1) (default 0); train gets is_noisy")
    pp.add_argument("--noise-kind", default="symmetric", choices=["symmetric", "pair", "instance"],
                    help="symmetric: a flipped label becomes any other class; pair: class c becomes c+1 (mod C); "
                         "instance: rows a clean logistic regression is unsure of flip most often, each to the class "
                         "that model confuses it with (default symmetric)")
    pp.add_argument("--imbalance", type=float, default=1.0, metavar="R",
                    help="long-tailed train: class c keeps m R^(-c/(C-1)) rows, largest : smallest = R : 1, finite "
                         "and >= 1 (default 1: as the data set is)")
    pp.add_argument("--dev-size", type=int, default=None,
                    help="dev rows, class-balanced (default 10 per class; multilingual: 60 sentences)")
    pp.add_argument("--test-fraction", type=float, default=0.2, help="fraction of rows held out as test (default 0.2)")
    pp.add_argument("--max-train", type=int, default=None, help="subsample train to at most this many rows (>= 1)")
    pp.add_argument("--seed", type=int, default=0, help="seed of the split, subsampling and label flips (default 0)")
    pp.add_argument("--format", default=None, choices=["array", "png", "folder", "parquet", "jsonl", "csv"],
                    help="image sets: array (float list column 'pixels', default), png (column 'image' of PNG bytes in "
                         "the Hugging Face {bytes, path} layout) or folder (DIR/images/SPLIT/ID.png + a path column); "
                         "instructions: parquet (default), jsonl or csv")
    pp.add_argument("--from", dest="from_dir", default=None,
                    help="fashion-mnist: folder with the raw idx files (default: Debian's dataset-fashion-mnist)")
    pp.add_argument("--target", default="ast", help="multilingual: held-out target language (default ast)")
    pp.add_argument("--sources", default=None,
                    help="multilingual: comma-separated source languages (default es,gl,pt,ca,it,fr,ru,ja,de,fi)")
    pp.add_argument("--related", default=None,
                    help="multilingual: comma-separated languages related to the target (recorded as a group; "
                         "with --unrelated replaces --sources)")
    pp.add_argument("--unrelated", default=None, help="multilingual: comma-separated unrelated languages")
    pp.add_argument("--test-size", type=int, default=60,
                    help="multilingual / instructions: test sentence groups (default 60)")
    pp.add_argument("--tasks", default=None,
                    help="instructions: comma-separated languages, one task each (default es,fr,de,ru,ja,fi)")
    pp.add_argument("--junk-task", default="pt",
                    help="instructions: language added as task 'junk' with random responses ('none': no junk task)")
    pp.add_argument(
        "--max-per-task", type=int, default=None, help="instructions: at most this many train rows per task"
    )
    pp.add_argument("--junk-kind", default="random", help="instructions: what a junk row's response is: random (text "
                    "with English letter frequencies, default) or swap (the English response of another message)")
    pp.set_defaults(func=run_prepare)


def _needs(name: str) -> str:
    """What preparing `name` needs on this machine ('' when it can be prepared now)."""
    from valuekit.data.bundled import FASHION_DIR, PACKAGES

    if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
        package, extra = PACKAGES[name]
        return f"needs {package}: pip install 'valuekit[{extra}]'"
    if name == "fashion-mnist" and not Path(FASHION_DIR).is_dir():
        return "needs the raw files: apt-get install dataset-fashion-mnist, or --from DIR"
    if name in (MULTILINGUAL, INSTRUCTIONS) and importlib.util.find_spec("django") is None:
        return "needs django: pip install 'valuekit[multilingual]'"
    return ""


def names() -> list[str]:
    from valuekit.data.bundled import DATASETS

    return [*DATASETS, MULTILINGUAL, INSTRUCTIONS]


def run_list(args) -> int:
    from valuekit.data.bundled import DATASETS

    descs = {name: desc for name, (_, desc) in DATASETS.items()}
    descs[MULTILINGUAL] = ("Django translation catalogs as a multi-way parallel X->English table "
                           "(target ast + 10 source languages)")
    descs[INSTRUCTIONS] = ("Django translation catalogs as a multi-task instruction set (prompt, response, task; "
                           "a junk task and --noise junk rows for evaluation)")
    for name in names():
        needs = _needs(name)
        state = (
            f"bundled: {BUNDLED[name]}" if name in BUNDLED else ("prepare: ready" if not needs else f"prepare: {needs}")
        )
        print(f"{name:15s} {descs[name]}\n{'':15s} [{state}]")
    print("prepare any of them with: valuekit data prepare NAME -o DIR")
    return 0


def run_languages(args) -> int:
    from valuekit.data.multilingual import RELATED, language_sizes

    for lang, n in language_sizes().items():
        rel = RELATED.get(lang)
        print(f"{lang:8s} {n:5d} messages" + (f"   known relatives: {','.join(rel)}" if rel else ""))
    return 0


def written_names(name: str, fmt: str | None) -> list[str]:
    """What `prepare NAME` writes in its output folder (the files an existing folder must not hold)."""
    suffix = {"jsonl": ".jsonl", "csv": ".csv"}.get(fmt or "", ".parquet") if name == INSTRUCTIONS else ".parquet"
    names = [f"{split}{suffix}" for split in ("train", "dev", "test")]
    return names + (["images"] if fmt == "folder" else [])


def run_prepare(args) -> int:
    from valuekit.errors import InputError
    from valuekit.runs.paths import check_not_overwritten, check_output

    if args.name not in names():
        raise InputError(f"unknown dataset {args.name!r}; choose from {', '.join(names())} (valuekit data list)")
    for opt, value in (("--max-train", args.max_train), ("--dev-size", args.dev_size), ("--test-size", args.test_size)):
        if value is not None and value < 1:
            raise InputError(f"{opt} {value}: must be >= 1")
    from valuekit.config import check_seed

    check_seed(args.seed)
    if not math.isfinite(args.imbalance) or args.imbalance < 1:
        raise InputError(f"--imbalance {args.imbalance}: must be a finite number >= 1 "
                         f"(ratio of largest to smallest class)")
    formats = {INSTRUCTIONS: ("parquet", "jsonl", "csv"), MULTILINGUAL: ()}.get(args.name, ("array", "png", "folder"))
    if args.format is not None and args.format not in formats:
        raise InputError(f"--format {args.format}: {args.name} is written as "
                         + (", ".join(formats) if formats else "Parquet only (leave --format out)"))
    if args.name in (INSTRUCTIONS, MULTILINGUAL):  # their noise is junk rows; they have no classes to skew
        for opt, value, default in (
            ("--noise-kind", args.noise_kind, "symmetric"),
            ("--imbalance", args.imbalance, 1.0),
        ):
            if value != default:
                raise InputError(f"{opt} {value}: not available for {args.name} (label noise of the class data sets)")
    check_output(args.out, kind="dir", inputs=[args.from_dir])
    if args.from_dir is not None and Path(args.out).resolve() == Path(args.from_dir).resolve():
        raise InputError(f"-o {args.out}: is the --from folder; write the prepared tables elsewhere")
    if not args.overwrite:
        check_not_overwritten(args.out, written_names(args.name, args.format))
    if args.name == INSTRUCTIONS:
        from valuekit.data.instructions import DEFAULT_TASKS, prepare_instructions

        tasks = tuple(t for t in args.tasks.split(",") if t) if args.tasks else DEFAULT_TASKS
        junk = None if args.junk_task.lower() == "none" else args.junk_task
        paths = prepare_instructions(args.out, tasks=tasks, junk_task=junk, noise=args.noise,
                                     dev_size=args.dev_size or 100, test_size=args.test_size,
                                     max_per_task=args.max_per_task, fmt=args.format or "parquet", seed=args.seed,
                                     junk_kind=args.junk_kind)
        for split, path in paths.items():
            print(f"{split:5s} {path}")
        return 0
    if args.name == MULTILINGUAL:
        from valuekit.data.multilingual import DEFAULT_SOURCES, prepare_multilingual

        def langs(text):
            return tuple(s.strip() for s in text.split(",") if s.strip()) if text else ()

        if args.sources and (args.related or args.unrelated):
            raise InputError("--sources: leave it out with --related/--unrelated (their union is the sources)")
        sources = langs(args.sources) or DEFAULT_SOURCES
        paths = prepare_multilingual(args.out, target=args.target, sources=sources, related=langs(args.related),
                                     unrelated=langs(args.unrelated), seed=args.seed,
                                     dev_size=args.dev_size or 60, test_size=args.test_size)
        for split, path in paths.items():
            print(f"{split:5s} {path}")
        return 0
    from valuekit.data.bundled import prepare

    paths = prepare(args.name, args.out, noise=args.noise, noise_kind=args.noise_kind, imbalance=args.imbalance,
                    dev_size=args.dev_size, test_fraction=args.test_fraction, max_train=args.max_train,
                    seed=args.seed, from_dir=args.from_dir, image_format=args.format or "array")
    for split, path in paths.items():
        print(f"{split:5s} {path}")
    return 0
