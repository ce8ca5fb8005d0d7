"""One MLflow run per J*(σ) estimate (experiment `optimal-loss` by default).

What a run holds (names are stable: dashboards and comparisons read them):

  params    estimator, target, subset_size (L), c (C), queries_per_sample (k), seed, n_queries,
            dataset_fingerprint, sigma_min, sigma_max, n_sigma, sigmas (JSON), sigma_star_threshold,
            conditional (the class-conditional floor Σ_c π_c J*_c) and then labels_fingerprint,
            plus the caller's `params` (data source, engine, ...)
  metrics   j_star, stderr, bias, ci_low,    one value per σ, step = σ index (ascending σ)
            ci_high, subset_size, sigma
            j_star_x0, ci_low_x0, ci_high_x0 the same in x0 units, when the table's target is not x0
            j_star_TARGET, stderr_TARGET     per σ, for each extra table (e.g. j_star_eps)
            sigma_star, total_variance, n_queries
  inputs    the data set (`tracking.datasets`: digest = the fingerprint's first 36 hex digits)
  tags      lossfloor.kind=estimate, target, dataset_fingerprint, sigma_star ("undefined" when J* is
            above the threshold on the whole grid)
  artifacts jstar.parquet (the table as written by `write_table`), jstar_TARGET.parquet per extra
            table, and jstar.html when given: the figure as an offline page, drawn by the caller
            (`lossfloor.jobs.record.record_estimate`: J*(σ) log-log, 95 % interval bars, σ* dashed)
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from lossfloor.floor import JStarTable, write_table
from lossfloor.tracking.datasets import log_dataset
from lossfloor.tracking.runs import TrackedRun, start_run

log = logging.getLogger(__name__)

EXPERIMENT = "optimal-loss"
FIGURE_FILE = "jstar.html"


def table_params(table: JStarTable) -> dict[str, object]:
    """What a J* table says about how it was made, as run params (see the module docstring)."""
    row = table.rows()[0]
    sigmas = [float(s) for s in table.column("sigma")]
    meta = table.table.schema.metadata or {}
    params = {
        "estimator": row["estimator"],
        "target": row["target"],
        "subset_size": row["subset_size"],
        "c": row["c"],
        "queries_per_sample": row.get("queries_per_sample"),
        "seed": row.get("seed"),
        "n_queries": row["n_queries"],
        "dataset_fingerprint": row["dataset_fingerprint"],
        "sigma_min": min(sigmas),
        "sigma_max": max(sigmas),
        "n_sigma": len(sigmas),
        "sigmas": json.dumps([float(f"{s:.6g}") for s in sigmas]),
        "sigma_star_threshold": json.loads(meta.get(b"sigma_star_threshold", b"null")),
        "conditional": meta.get(b"class_conditional", b"false") == b"true",
        "labels_fingerprint": meta.get(b"labels_fingerprint", b"").decode() or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def _merge_params(table: JStarTable, params: Mapping[str, object]) -> dict[str, object]:
    """The caller's params plus the table's; a key both hold gets the table's (resolved) value."""
    own = table_params(table)
    for key in own.keys() & params.keys():
        if params[key] is not None and str(params[key]) != str(own[key]):
            log.info("param %s: logging the table's value %r, not %r", key, own[key], params[key])
    return {**params, **own}


def log_jstar(
    run: TrackedRun,
    table: JStarTable,
    *,
    params: Mapping[str, object] | None = None,
    also: Sequence[JStarTable] = (),
    figure_html: str | None = None,
) -> None:
    """Log a J* table (and the same estimate in other targets, `also`, and its figure's page, `figure_html`)
    into an existing run."""
    target = table.rows()[0]["target"]
    run.log_params(_merge_params(table, params or {}))
    log_dataset(run, table.rows()[0]["dataset_fingerprint"], source=str((params or {}).get("data") or ""),
                context="estimate")
    s_star = table.sigma_star
    run.set_tags({
        "lossfloor.kind": "estimate",
        "target": target,
        "dataset_fingerprint": table.rows()[0]["dataset_fingerprint"],
        "sigma_star": "undefined" if s_star is None else f"{s_star:.6g}",
    })
    names = ["sigma", "j_star", "stderr", "bias", "ci_low", "ci_high", "subset_size"]
    if target != "x0":
        names += ["j_star_x0", "ci_low_x0", "ci_high_x0"]
    series = {name: table.column(name) for name in names if name in table.table.column_names}
    for other in also:
        t = other.rows()[0]["target"]
        series[f"j_star_{t}"] = other.column("j_star")
        series[f"stderr_{t}"] = other.column("stderr")
    run.log_series(series)
    scalars = {"total_variance": float(table.column("total_variance")[0]),
               "n_queries": float(table.column("n_queries")[0])}
    if s_star is not None:
        scalars["sigma_star"] = s_star
    run.log_metrics(scalars)

    with tempfile.TemporaryDirectory(prefix="lossfloor-mlflow-") as tmp:
        write_table(table, Path(tmp) / "jstar.parquet")
        run.log_artifact(Path(tmp) / "jstar.parquet")
        for other in also:
            name = f"jstar_{other.rows()[0]['target']}.parquet"
            write_table(other, Path(tmp) / name)
            run.log_artifact(Path(tmp) / name)
    if figure_html is not None:
        run.log_html(figure_html, FIGURE_FILE)


def log_estimate(
    table: JStarTable,
    *,
    params: Mapping[str, object],
    experiment: str = EXPERIMENT,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    also: Sequence[JStarTable] = (),
    tags: Mapping[str, object] | None = None,
    figure_html: str | None = None,
) -> str:
    """Log one estimate as its own MLflow run and return the run id (module docstring: what is logged).

    params: what the table does not say (data source, engine, study, ...); keys the table also holds
      are logged with the table's resolved value.
    also: the same estimate in other targets (`build_table(est, target=...)`), logged as j_star_TARGET.
    parent_run_id: nest the run under a parent (e.g. a study's run).
    figure_html: the figure as an offline page, logged as jstar.html (`jobs.record.record_estimate` draws it).
    The run ends FAILED, never left RUNNING, if logging fails part-way.
    """
    with start_run(experiment=experiment, run_name=run_name, parent_run_id=parent_run_id, tags=tags,
                   tracking_uri=tracking_uri) as run:
        log_jstar(run, table, params=params, also=also, figure_html=figure_html)
    return run.run_id
