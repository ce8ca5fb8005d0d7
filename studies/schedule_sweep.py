"""Sweep of the optimal-loss schedule (Xu et al. 2026, §4) with Ray Tune: the paper sets the truncation
w_max and the Gaussian focus (mu, varsigma) by hand; this study searches them (or any OptimalLossSchedule
field of the space file) and reports the gain over the EDM2 baseline at the same budget.

    python studies/schedule_sweep.py                         # bundled digits, tiny model, 8 trials, minutes
    python studies/schedule_sweep.py --dry-run
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python studies/schedule_sweep.py --preset img512-xs --data /shared/img512-latents.zip \\
        --j-star /shared/jstar.parquet --images 20000000 --trials 32 --search optuna --gpus-per-worker 1

Everything runs through the job behind `lossfloor sweep` (lossfloor.jobs.sweep): the same flags, the
same outputs (--out, default runs/schedule_sweep, $LOSSFLOOR_RUNS_DIR/schedule_sweep when set:
results.parquet, best.json, parallel_coordinates.html, objective_vs_images.html, tune/), and a rerun with
the same arguments resumes an interrupted sweep. Unlike the command, the study logs to MLflow by default
(--no-mlflow to skip): a parent run with the best configuration and the gain, one child per trial.
Inside a Ray job (RAY_ADDRESS set) the trials run on the job's cluster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # _common, also when imported by tests
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_out, ensure_lossfloor, parser, run_study

ensure_lossfloor()


STUDY = "schedule_sweep"
# A laptop-sized default on the bundled digits: 16k images per trial (~1 min on one core), 8 evaluations
LAPTOP_BUDGET = {"images": 16384, "batch": 128, "warmup": 2048}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lossfloor.jobs.sweep import add_sweep_args

    p = parser(
        prog=STUDY,
        description="Ray Tune sweep of the optimal-loss schedule's w_max, focus (mu, varsigma), ... against the "
        "EDM2 baseline; ASHA stops weak trials early; MLflow parent run with one child per trial.",
    )
    add_sweep_args(p, data="bundled:digits", trials=8, out=str(default_out(STUDY)), address_env="RAY_ADDRESS")
    p.set_defaults(**LAPTOP_BUDGET)
    p.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True,
                   help="log the sweep to MLflow (default on)")
    p.add_argument("--experiment", dest="mlflow_experiment", default="schedule-sweep",
                   help="MLflow experiment (default schedule-sweep)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///~/lossfloor/mlflow.db)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from lossfloor.jobs.sweep import run

    return run_study(STUDY, parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
