"""Errors valuekit raises for bad input; the CLI turns them into one line and exit code 2.

`held_warnings()` keeps back what the checks of the user's input would print before that line (Python warnings
such as Pillow's, a library's own log such as transformers', valuekit's notes), so a refusal is the one line."""

import logging
import re
import sys
import warnings
from contextlib import contextmanager


class ValueKitError(Exception):
    """A problem with what the user gave valuekit (a file, a column, an option).

    The message speaks of the library's arguments (`overwrite=True`); `cli`, when given, is the same
    message in terms of the command line's flags (`--overwrite`), which the CLI prints instead."""

    def __init__(self, *args, cli: str | None = None):
        super().__init__(*args)
        self.cli = cli


class InputError(ValueKitError, ValueError):
    """An input table or option is malformed; the message names the file, column and value."""


class RunDirError(ValueKitError):
    """A run directory is missing, locked, from another schema version or does not match the request."""


class TrainingDiverged(ValueKitError):
    """Loss or weights became NaN/inf; the message names the step."""


class TrainingFailed(ValueKitError):
    """An error during training (a model's forward that raises, a write that fails); run.json says failed."""


# a flag in a CLI message, then the space before its value (`--image-size H,W`) or, for a switch used as a
# subject (`--per-class needs`), the space before the next word
_FLAG = re.compile(r"--([a-z][a-z-]*)(?:( )(?=[A-Z\d'\"]|\(\d)|(?=( )[a-z]))?")


def refusal(cli_message: str) -> InputError:
    """An InputError from a message written in the CLI's terms: the library's text names arguments instead of
    flags (`--id-col NAME` -> `id_col=NAME`, `--image-size H,W` -> `image_size=H,W`, `--per-class needs` ->
    `per_class=True needs`)."""

    def argument(m) -> str:
        name = m.group(1).replace("-", "_")
        return f"{name}=True" if m.group(3) else f"{name}="

    return InputError(_FLAG.sub(argument, cli_message), cli=cli_message)


def setting_error(message: str) -> InputError:
    """A refused method or loop setting. `message` speaks of `name=value`, as `valuekit.train(name=value)` takes
    it; the CLI prints it after `--set`, the flag that passes settings."""
    return InputError(message, cli=f"--set {message}")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text (its type name when it has none)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def unreadable(path, what: str | BaseException) -> InputError:
    """`InputError("RUN/file: unreadable (why)")` for a damaged run file."""
    why = first_line(what) if isinstance(what, BaseException) else what
    return InputError(f"{path}: unreadable ({why})")


class _Hold:
    """What the checks said while a hold is on: `said` holds one callable per message that shows it."""

    def __init__(self):
        self.said: list = []
        self.loggers: dict = {}  # name -> (its handlers, its propagate) while held
        self.showwarning = warnings.showwarning

        def keep(message, category, filename, lineno, file=None, line=None):
            self.said.append(lambda: self.showwarning(message, category, filename, lineno, file, line))

        self.keep = keep


_hold: _Hold | None = None


@contextmanager
def held_warnings():
    """Inside, messages about the input are held: Python warnings, the records of loggers named to `hold_log` and
    lines given to `say`. They are shown when the checks pass (`release_warnings()`, which the training loop calls
    once the run directory is prepared, or at the end of the block) and dropped when the block raises, so that a
    refusal is one line and an accepted input still shows every warning once. An inner hold is the outer one."""
    global _hold
    if _hold is not None:
        yield
        return
    hold = _hold = _Hold()
    warnings.showwarning = hold.keep
    try:
        yield
    except BaseException:
        hold.said.clear()
        raise
    finally:
        _release(hold)


def release_warnings() -> None:
    """Show what the current hold kept and stop holding (the input's checks passed)."""
    if _hold is not None:
        _release(_hold)


def _release(hold: _Hold) -> None:
    global _hold
    if _hold is not hold:
        return
    _hold = None
    if warnings.showwarning is hold.keep:
        warnings.showwarning = hold.showwarning
    for name, (handlers, propagate) in hold.loggers.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = handlers, propagate
    said, hold.said = hold.said, []
    for show in said:
        show()


def hold_log(name: str) -> None:
    """Hold the records of the `logging` logger `name` too, while a hold is on (a library with its own handlers,
    as transformers; call it after importing the library, which sets them up)."""
    hold = _hold
    if hold is None or name in hold.loggers:
        return
    logger = logging.getLogger(name)
    hold.loggers[name] = (logger.handlers[:], logger.propagate)

    class Keep(logging.Handler):
        def emit(self, record):
            hold.said.append(lambda: logger.callHandlers(record))

    logger.handlers, logger.propagate = [Keep()], False


def say(line: str) -> None:
    """One line on stderr about input that is accepted (a warning, a note); held while a hold is on."""
    if _hold is None:
        print(line, file=sys.stderr)
    else:
        _hold.said.append(lambda: print(line, file=sys.stderr))
