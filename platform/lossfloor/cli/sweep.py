"""`lossfloor sweep`: Ray Tune sweep of the optimal-loss schedule (w_max, the focus mu/varsigma, ...)
against the EDM2 baseline, with ASHA early stopping (`lossfloor.jobs.sweep`: flags, run and outputs)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="Ray Tune sweep of the optimal-loss schedule's fields vs the EDM2 baseline",
        description="Train one EDM2 baseline and N optimal-loss-schedule trials drawn from a search space with "
        "Ray Tune (ASHA stops weak trials early), and report the best configuration and its gain over EDM2.",
    )
    from lossfloor.jobs.sweep import add_sweep_args

    add_sweep_args(p)
    p.add_argument("--mlflow", action="store_true",
                   help="log a parent run (best config, gain, figures) with one child run per trial")
    p.add_argument("--mlflow-experiment", default="schedule-sweep", metavar="NAME",
                   help="MLflow experiment (default schedule-sweep)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///~/lossfloor/mlflow.db)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lossfloor.jobs.sweep import run as run_sweep

    return run_sweep(args)


