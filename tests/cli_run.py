"""Running `lossfloor` in-process in a test: (exit code, stdout, stderr)."""

from lossfloor.cli import main


def cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
