"""MLflow runs of a schedule sweep (lossfloor.jobs.sweep), logged by the driver from the sweep's folder
after the trials have ended (Tune trials never write to the tracking store).

    parent_id = log_sweep(outcome, params={"data": "bundled:digits", ...}, space_file="space.yaml")

Layout (names are stable):

  parent    run name `sweep-<folder name>`, tags lossfloor.kind=sweep, lossfloor.objective
            params  the caller's params (preset, data, trials, search, scheduler, ...), space (JSON),
                    best.trial_id and best.<field> for each field of the best configuration
            metrics baseline_objective, best_objective, gain (baseline - best; > 0: the sweep beat EDM2),
                    relative_gain, n_trials, n_finished, n_stopped_early, n_errors
            artifacts results.parquet, objective_history.parquet, best.json, the space file,
                    parallel_coordinates.html and objective_vs_images.html (plotly.js embedded)
  children  one per trial, the baseline included (tag mlflow.parentRunId = the parent's id):
            tags lossfloor.kind=sweep-trial, lossfloor.trial_id, lossfloor.baseline (true/false),
                 lossfloor.status (finished | stopped | error)
            params schedule and the trial's fields
            metrics objective at each evaluation (step = training images), final_objective, n_img,
                    stopped_early (0/1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from lossfloor.tracking.runs import start_run

EXPERIMENT = "schedule-sweep"
ARTIFACTS = ("results.parquet", "objective_history.parquet", "best.json", "parallel_coordinates.html",
             "objective_vs_images.html")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parent_metrics(best: dict) -> dict[str, float]:
    """The parent run's scalar metrics from best.json (missing values are left out)."""
    m = {
        "baseline_objective": (best.get("baseline") or {}).get("objective"),
        "best_objective": (best.get("best") or {}).get("objective"),
        "gain": best.get("gain"), "relative_gain": best.get("relative_gain"),
        "n_trials": best.get("trials"), "n_finished": best.get("finished"),
        "n_stopped_early": best.get("stopped_early"), "n_errors": best.get("errors"),
    }
    return {k: float(v) for k, v in m.items() if _finite(v)}


def log_trial(parent_run_id: str, row: dict, history: list, fields, *, experiment: str,
              tracking_uri: str | None) -> str:
    """One child run for one trial (module docstring)."""
    tags = {"lossfloor.kind": "sweep-trial", "lossfloor.trial_id": row["trial_id"],
            "lossfloor.baseline": str(bool(row["is_baseline"])).lower(), "lossfloor.status": row["status"]}
    name = f"baseline-{row['trial_id']}" if row["is_baseline"] else row["trial_id"]
    with start_run(experiment=experiment, run_name=name, parent_run_id=parent_run_id, tags=tags,
                   tracking_uri=tracking_uri) as child:
        params = {"schedule": row["schedule"], "trial_id": row["trial_id"]}
        if not row["is_baseline"]:
            params.update({k: row.get(k) for k in fields})
        child.log_params(params)
        if history:
            child.log_series({"objective": [v for _, v in history]}, steps=[n for n, _ in history])
        final = {"n_img": row["n_img"], "stopped_early": float(bool(row["stopped_early"]))}
        if _finite(row.get("objective")):
            final["final_objective"] = row["objective"]
        child.log_metrics(final)
        if row.get("error"):
            child.set_tags({"lossfloor.error": row["error"]})
    return child.run_id


def log_sweep(outcome, *, params: Mapping[str, object] | None = None, space_file=None,
              experiment: str = EXPERIMENT, tracking_uri: str | None = None, run_name: str | None = None) -> str:
    """The parent run and one child per trial of a finished sweep; returns the parent's run id."""
    best, out = outcome.best, Path(outcome.out)
    tags = {"lossfloor.kind": "sweep", "lossfloor.objective": best.get("objective"), "out_dir": str(out)}
    with start_run(experiment=experiment, run_name=run_name or f"sweep-{out.name}", tags=tags,
                   tracking_uri=tracking_uri) as parent:
        fields = list((best.get("sweep") or {}).get("space") or {})
        p = dict(params or {})
        p["space"] = (best.get("sweep") or {}).get("space")
        if best.get("best"):
            p["best.trial_id"] = best["best"]["trial_id"]
            p.update({f"best.{k}": v for k, v in best["best"]["config"].items()})
        parent.log_params(p)
        parent.log_metrics(parent_metrics(best))
        for row in outcome.rows:
            log_trial(parent.run_id, row, outcome.histories.get(row["trial_id"], []), fields, experiment=experiment,
                      tracking_uri=tracking_uri)
        for name in ARTIFACTS:
            if (out / name).is_file():
                parent.log_artifact(out / name)
        if space_file is not None and Path(space_file).is_file():
            parent.log_artifact(space_file)
    return parent.run_id


__all__ = ["ARTIFACTS", "EXPERIMENT", "log_sweep", "log_trial", "parent_metrics"]
