"""The one exception type for bad user input."""


class InputError(ValueError):
    """Bad input from a user: a file, flag or config field. The message names it and what was expected.

    The CLI turns it into one line on stderr and exit code 2; the Python API lets it propagate.
    """


class JStarNotBelowLoss(InputError):
    """J* is not below the smallest loss of a curve: the gap-corrected power law J - J* cannot be fitted
    (the loss reached its floor within evaluation noise, or J* is of other data)."""
