"""`valuekit` entry point: parse, call the library, print where results went.

Each sub-command lives in its own module with `add_parser(subparsers)` and `run(args) -> int`.
Bad input raises ValueKitError, printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from valuekit import __version__
from valuekit.errors import TrainingDiverged, ValueKitError

COMMANDS = ("train", "score", "audit", "report", "bench", "data")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit code 2 (argparse's own convention)
        self.exit(2, f"valuekit: error: {message} (see valuekit {self.prog.split(' ', 1)[-1]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="valuekit", description="Learn what each training example is worth while the model trains.")
    parser.add_argument("--version", action="version", version=f"valuekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"valuekit.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"valuekit.cli.{name}":
                continue  # command not in this version
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TrainingDiverged as exc:
        print(f"valuekit: error: {exc}", file=sys.stderr)
        return 3
    except ValueKitError as exc:
        print(f"valuekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("valuekit: interrupted; everything logged so far is kept (continue a training run with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
