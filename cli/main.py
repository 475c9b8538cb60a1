"""`valuekit` entry point: parse, call the library, print where results went.

Each sub-command lives in its own module with `add_parser(subparsers)` and `run(args) -> int`.
Bad input raises ValueKitError, printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from valuekit import __version__
from valuekit.errors import TrainingDiverged, ValueKitError

COMMANDS = ("train", "clean", "score", "audit", "report", "bench", "data")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit code 2 (argparse's own convention)
        self.exit(2, f"valuekit: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text) -> str:
    """Messages go out as one line: a multi-line library message (pyarrow's, say) is joined."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _os_error(exc: OSError) -> str:
    """An OSError the checks did not foresee (disk full, a file removed meanwhile) as one line."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or _one_line(exc) or type(exc).__name__}"


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
    # SIGTERM (kill, a scheduler's time limit) stops like Ctrl-C: temporaries are removed, training
    # checkpoints at a step boundary (the loop installs its own handler while it runs).
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        return int(args.func(args) or 0)
    except TrainingDiverged as exc:
        print(f"valuekit: error: {_one_line(exc)}", file=sys.stderr)
        return 3
    except ValueKitError as exc:
        print(f"valuekit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"valuekit: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("valuekit: interrupted; everything logged so far is kept (continue a training run with --resume)",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
