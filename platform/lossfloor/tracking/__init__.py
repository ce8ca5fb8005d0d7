"""A thin MLflow adapter: the core never imports mlflow, this package does.

    run_id = log_estimate(table, params={"data": "bundled:digits", "engine": "local"})

    with start_run(experiment="optimal-loss", run_name="survey") as parent:     # ends FINISHED/FAILED
        log_estimate(table, params={...}, parent_run_id=parent.run_id)          # a nested child run
        parent.log_metrics({"sigma_star.digits": 0.05})

Where runs go: `tracking_uri=` argument, else MLFLOW_TRACKING_URI, else sqlite:///~/lossfloor/mlflow.db
(`$LOSSFLOOR_HOME/mlflow.db`); `check_store` opens it before any work (see `lossfloor.tracking.runs`).
"""

from lossfloor.tracking.estimate import EXPERIMENT, log_estimate, log_jstar, table_params
from lossfloor.tracking.runs import (
    PARENT_RUN_TAG,
    TrackedRun,
    check_store,
    client,
    default_tracking_uri,
    experiment_id,
    start_run,
    tracking_uri,
)
from lossfloor.tracking.train import log_training

__all__ = [
    "EXPERIMENT",
    "PARENT_RUN_TAG",
    "TrackedRun",
    "check_store",
    "client",
    "default_tracking_uri",
    "experiment_id",
    "log_estimate",
    "log_jstar",
    "log_training",
    "start_run",
    "table_params",
    "tracking_uri",
]
