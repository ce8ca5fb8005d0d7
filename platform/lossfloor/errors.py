"""The one exception type for bad user input, and the argument parser whose usage errors are one line."""

import argparse
import sys


class InputError(ValueError):
    """Bad input from a user: a file, flag or config field. The message names it and what was expected.

    The CLI turns it into one line on stderr and exit code 2; the Python API lets it propagate.
    field: the Python-API name (a config field or argument, e.g. `subset_size`) the message starts with;
    a command line or study says it as its flag (`flag_message`: `--subset-size`).
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field

    def flag_message(self) -> str:
        """The message as the command line says it: its field as the flag of the same name (subset_size:
        --subset-size). The one mapping of API names to flags, applied where a command or study prints."""
        text = str(self)
        if self.field is None or not text.startswith(self.field):
            return text
        return "--" + self.field.replace("_", "-") + text[len(self.field):]


class JStarNotBelowLoss(InputError):
    """J* is not below the smallest loss of a curve: the gap-corrected power law J - J* cannot be fitted
    (the loss reached its floor within evaluation noise, or J* is of other data)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `PROG: error: MESSAGE (see PROG --help)`, and exit 2
    (argparse's own prints the whole usage first: 15 lines for a study)."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)

