"""Errors valuekit raises for bad input; the CLI turns them into one line and exit code 2."""


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
