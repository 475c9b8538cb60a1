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

COMMANDS = ("train", "clean", "predict", "score", "audit", "report", "bench", "data")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit code 2 (argparse's own convention)
        self.exit(2, f"valuekit: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text) -> str:
    """Messages go out as one line: a multi-line library message (pyarrow's, say) is joined."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _as_flags(text: str) -> str:
    """A library message in terms of flags: `overwrite=True` -> `--overwrite` (messages that need more give their
    own command-line wording, ValueKitError.cli)."""
    import re

    return re.sub(r"\b([a-z][a-z_]*)=True\b", lambda m: "--" + m.group(1).replace("_", "-"), text)


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


class _OwnTemp:
    """A temporary folder this command owns and removes: torch's compiler cache (torch._dynamo makes
    $TMPDIR/torchinductor_USER at import) and, for --nproc, torchrun's torchelastic_* folders go there instead of
    being left in $TMPDIR. A cache folder the user chose (TORCHINDUCTOR_CACHE_DIR) is kept as it is."""

    def __enter__(self):
        import os
        import tempfile

        self.path, self.saved = None, {}
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
            return self
        self.path = tempfile.mkdtemp(prefix="valuekit-")
        self.saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "VALUEKIT_OWN_TMP")}
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(self.path, "torchinductor")
        os.environ["VALUEKIT_OWN_TMP"] = self.path  # where `train --nproc` points torchrun's TMPDIR
        return self

    def __exit__(self, *exc):
        import os
        import shutil

        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            for k, v in self.saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return False


def main(argv: list[str] | None = None) -> int:
    with _OwnTemp():
        return _main(argv)


def _main(argv: list[str] | None = None) -> int:
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
        print(f"valuekit: error: {_one_line(exc.cli or exc)}", file=sys.stderr)
        return 3
    except ValueKitError as exc:
        print(f"valuekit: error: {_one_line(exc.cli or _as_flags(str(exc)))}", file=sys.stderr)
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
