"""One MLflow run per diagnosis (experiment `diagnose` by default), so models compare side by side.

What a run holds (names are stable: `lossfloor dashboard --experiment diagnose` reads them):

  params    model, model_kind, data, j_star (or estimator), holdout, prediction, process, seed, n_samples,
            device, precision, ema, dataset_fingerprint (the caller's), sigma_min, sigma_max, n_sigma
  metrics   per σ, step = σ index (ascending σ): sigma, loss_x0, loss_stderr, j_star_x0, gap_x0, rel_gap
            (+ loss_holdout_x0, generalisation_gap with held-out data)
            totals: total_reference/loss, total_reference/gap, total_reference/rel_gap, and total_own/...
            when the model's own weighting is known
  tags      lossfloor.kind=diagnose, lossfloor.model, dataset_fingerprint
  artifacts diag.parquet (the table as written by `write_diagnosis`), diag.html (the figure as an offline
            page, drawn by the caller: `lossfloor.jobs.diagnose`)
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lossfloor.diagnose.measure import HOLDOUT_COLUMNS, Diagnosis, read_diagnosis, write_diagnosis
from lossfloor.errors import InputError
from lossfloor.tracking.artifacts import _client, _download, _search
from lossfloor.tracking.runs import start_run

KIND = "diagnose"
TABLE_FILE = "diag.parquet"
FIGURE_FILE = "diag.html"
SERIES = ("sigma", "loss_x0", "loss_stderr", "j_star_x0", "gap_x0", "rel_gap", *HOLDOUT_COLUMNS[::2])


def log_diagnosis(d: Diagnosis, figure_html: str | None, *, params: Mapping[str, object],
                  experiment: str = "diagnose", run_name: str | None = None, tracking_uri: str | None = None) -> str:
    """Log one diagnosis as its own run (module docstring), with its figure's page when given; returns the
    run id."""
    sigmas = d.column("sigma")
    row = d.rows()[0]
    with start_run(experiment=experiment, run_name=run_name, tracking_uri=tracking_uri,
                   tags={"lossfloor.kind": KIND, "lossfloor.model": row["model"],
                         "dataset_fingerprint": row["dataset_fingerprint"]}) as run:
        run.log_params({**params, "sigma_min": float(sigmas.min()), "sigma_max": float(sigmas.max()),
                        "n_sigma": len(sigmas)})
        run.log_series({name: d.column(name) for name in SERIES if name in d.table.column_names})
        scalars = {}
        for key, total in d.totals.items():
            for name, value in (total or {}).items():
                if value is not None:
                    scalars[f"total_{key}/{name}"] = value
        run.log_metrics(scalars)
        with tempfile.TemporaryDirectory(prefix="lossfloor-mlflow-") as tmp:
            write_diagnosis(d, Path(tmp) / TABLE_FILE)
            run.log_artifact(Path(tmp) / TABLE_FILE)
        if figure_html is not None:
            run.log_html(figure_html, FIGURE_FILE)
    return run.run_id


@dataclass(frozen=True)
class DiagnosedRun:
    """One diagnosis run read back: its id, name and table."""

    run_id: str
    name: str
    diagnosis: Diagnosis


def _diagnose_runs(c, experiment: str) -> list:
    exp = c.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        return []
    runs = _search(c, [exp.experiment_id], f"tags.`lossfloor.kind` = '{KIND}'")
    return [r for r in runs if r.info.status == "FINISHED"]


def has_diagnoses(experiment: str, *, tracking_uri: str | None = None) -> bool:
    """True if `experiment` holds finished diagnosis runs (what `lossfloor dashboard` draws for it)."""
    return bool(_diagnose_runs(_client(tracking_uri), experiment))


def read_diagnoses(experiment: str = "diagnose", *, tracking_uri: str | None = None) -> list[DiagnosedRun]:
    """Every finished diagnosis run of `experiment` with its table, oldest first; the newest run of a
    run name only (a model diagnosed again replaces its older diagnosis)."""
    c = _client(tracking_uri)
    runs = _diagnose_runs(c, experiment)
    if not runs:
        raise InputError(f"--experiment {experiment!r}: no finished diagnosis runs (tag lossfloor.kind={KIND}) in "
                         f"{c.tracking_uri}; log some with `lossfloor diagnose --mlflow`")
    out, seen = [], set()
    with tempfile.TemporaryDirectory(prefix="lossfloor-diagnose-") as tmp:
        for run in runs:  # newest first
            name = run.info.run_name or run.info.run_id
            if name in seen:
                continue
            seen.add(name)
            out.append(DiagnosedRun(run.info.run_id, name, read_diagnosis(_download(c, run, TABLE_FILE, Path(tmp)))))
    return out[::-1]


__all__ = ["FIGURE_FILE", "KIND", "TABLE_FILE", "DiagnosedRun", "has_diagnoses", "log_diagnosis", "read_diagnoses"]
