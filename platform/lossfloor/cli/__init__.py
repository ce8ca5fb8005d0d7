"""`lossfloor` command line. Each sub-command lives in its own module with `register(subparsers)`.

Bad input (an `InputError`, or argparse's own usage errors) exits with code 2 and one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lossfloor.errors import ArgumentParser, InputError

# Sub-command modules, each defining `register(subparsers)`; imported lazily so `lossfloor --help`
# stays fast and a command's heavy imports (ray, mlflow) load only when it runs.
DESCRIPTION = ("The optimal loss J*(sigma) of diffusion models (Xu et al.): estimate it, train with it, diagnose "
               "a model's gap to it, and fit scaling laws to the loss above it.")
COMMANDS = [
    "lossfloor.cli.estimate",
    "lossfloor.cli.fit",
    "lossfloor.cli.model_info",
    "lossfloor.cli.data",
    "lossfloor.cli.dashboard",
    "lossfloor.cli.train",
    "lossfloor.cli.sweep",
    "lossfloor.cli.diagnose",
    "lossfloor.cli.evaluate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="lossfloor", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        sys.stderr.write(f"lossfloor {args.command}: error: {e.flag_message()}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("lossfloor: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
