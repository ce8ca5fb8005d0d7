"""What every study shares: finding the `lossfloor` package, logging, and the output/tracking flags.

A study runs as `python studies/NAME.py` from the repository root, or as a Ray job
(`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python studies/NAME.py`)
where the job's runtime environment ships the package (`py_modules: [platform/lossfloor]`). When
neither an installed nor a shipped package is importable, `platform/` of this checkout is put on
sys.path (`platform/` is the source root, never a package).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS_DIR_ENV = "LOSSFLOOR_RUNS_DIR"  # where studies write by default (cluster/runtime_env.yaml sets it)


def ensure_lossfloor() -> None:
    """Make `import lossfloor` work: installed, shipped by Ray, or this checkout's platform/."""
    try:
        import lossfloor
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT / "platform"))
        import lossfloor  # noqa: F401


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def default_out(study: str) -> Path:
    """runs/STUDY, under $LOSSFLOOR_RUNS_DIR when set (a Ray job's working directory is a temporary copy)."""
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs") / study


def add_output_args(p: argparse.ArgumentParser, study: str, experiment: str) -> None:
    """--out, --tracking-uri, --experiment, --verbose."""
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {default_out(study)}; ${RUNS_DIR_ENV}/{study} when that is set)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///~/lossfloor/mlflow.db)")
    p.add_argument("--experiment", default=experiment, help=f"MLflow experiment (default {experiment})")
    p.add_argument("--verbose", action="store_true", help="debug logging")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A study's argument parser: a usage error is one line and exit 2."""
    from lossfloor.errors import ArgumentParser

    return ArgumentParser(prog=prog, description=description)


def run_study(name: str, parse_args, run, argv: list[str] | None = None) -> int:
    """A study's `main`: parse, set up logging, run; bad input ends as one line on stderr and exit code 2.
    On every exit path a Ray this process started is shut down (its daemons would outlive the study)."""
    import signal
    import threading

    from lossfloor.errors import InputError

    args = parse_args(argv)
    setup_logging(args.verbose)
    if threading.current_thread() is threading.main_thread():
        # `ray job stop` and schedulers send SIGTERM: end as an exception, so open MLflow runs are marked
        # KILLED (not left RUNNING), stage folders stay resumable and the Ray started here is shut down
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run(args)
    except InputError as e:
        print(f"{name}: {e.flag_message()}", file=sys.stderr)
        return 2
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
