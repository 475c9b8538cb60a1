"""Errors valuekit raises for bad input; the CLI turns them into one line and exit code 2."""


class ValueKitError(Exception):
    """A problem with what the user gave valuekit (a file, a column, an option)."""


class InputError(ValueKitError, ValueError):
    """An input table or option is malformed; the message names the file, column and value."""


class RunDirError(ValueKitError):
    """A run directory is missing, locked, from another schema version or does not match the request."""


class TrainingDiverged(ValueKitError):
    """Loss or weights became NaN/inf; the message names the step."""
