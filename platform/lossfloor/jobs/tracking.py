"""Where a job logs its MLflow run: the store, opened before any work, the experiment and the run name.

    tracking = open_tracking(args.mlflow, args.tracking_uri, experiment="optimal-loss")   # None: no run
    estimate_table(..., tracking=tracking)

A missing MLflow or a broken store (a corrupt database, a server that does not answer) is a setup error
found before the work starts, not after it (`lossfloor.tracking.check_store`). Jobs log on the driver
only: Ray workers never write to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

from lossfloor.errors import InputError


@dataclass(frozen=True, kw_only=True)
class Tracking:
    """An opened tracking store and the run a job logs into it."""

    uri: str
    experiment: str
    run_name: str | None = None


def open_tracking(mlflow: bool, tracking_uri: str | None, *, experiment: str,
                  run_name: str | None = None) -> Tracking | None:
    """The store of --tracking-uri (default $MLFLOW_TRACKING_URI, else ~/lossfloor/mlflow.db) opened now
    when `mlflow`; None without --mlflow, where a --tracking-uri is refused (it would be ignored)."""
    if not mlflow:
        if tracking_uri is not None:
            raise InputError("--tracking-uri: only with --mlflow")
        return None
    try:
        from lossfloor.tracking import check_store
    except ImportError as e:
        raise InputError(f"--mlflow: MLflow tracking is not available ({e})") from None
    return Tracking(uri=check_store(tracking_uri), experiment=experiment, run_name=run_name)


def ui_hint(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """How to see a run: the `mlflow ui` command for the store and the page to open (the runs table in
    MLflow's model-training view, `lossfloor.tracking.runs.ui_link`)."""
    from lossfloor.tracking.runs import ui_link

    return f"mlflow ui --backend-store-uri {uri}, then open {ui_link(experiment_id, run_id)}"


__all__ = ["Tracking", "open_tracking", "ui_hint"]
