"""The one exception type for bad user input, and the argument parser whose usage errors are one line."""

import argparse
import sys


class InputError(ValueError):
    """Bad input from a user: a file, flag or config field. The message names it and what was expected.

    The CLI turns it into one line on stderr and exit code 2; the Python API lets it propagate.
    """


class JStarNotBelowLoss(InputError):
    """J* is not below the smallest loss of a curve: the gap-corrected power law J - J* cannot be fitted
    (the loss reached its floor within evaluation noise, or J* is of other data)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `PROG: error: MESSAGE (see PROG --help)`, and exit 2
    (argparse's own prints the whole usage first: 15 lines for a study)."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)

