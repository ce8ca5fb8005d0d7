"""Estimate J*(σ): one entry for every command and study, on this process or on Ray Data.

    est = estimate(samples, sigmas, EstimatorConfig(), engine=Engine(kind="ray", workers=4),
                   fingerprint=ds.fingerprint, work_dir="runs/work")
    est.j_star, est.passes[0].computed
    table = estimate_table(samples, sigmas, config, out="jstar.parquet", ...)   # `lossfloor estimate`

Both engines run the same batches through `lossfloor.floor.estimate` (the same numbers for the same seed)
and keep finished batches in a work folder when one is given (`work_dir`, or `work_parent` for a
folder named by a hash of the config, data and σ grid); the Ray engine always keeps one (default:
`work_parent`). `samples` is an (N, ...) array, or for the Ray engine a shard folder its workers read.
With `labels` ((N,) integer class labels of an array's samples) the estimate is the class-conditional
floor Σ_c π_c J*_c (`lossfloor.floor.conditional`) and its table says so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

from lossfloor.errors import InputError
from lossfloor.floor import Estimate, EstimatorConfig
from lossfloor.floor import estimate as local_estimate
from lossfloor.floor.table import SIGMA_STAR_THRESHOLD
from lossfloor.jobs.engine import LOCAL, Engine
from lossfloor.jobs.tracking import Tracking

log = logging.getLogger(__name__)


def estimate(samples, sigmas, config: EstimatorConfig, *, engine: Engine = LOCAL, labels=None,
             fingerprint: str | None = None, work_dir: str | os.PathLike | None = None,
             work_parent: str | os.PathLike | None = None, progress: bool = True) -> Estimate:
    """J*(σ) of `samples` with `config` on `engine` (module docstring)."""
    if engine.kind == "local" and labels is not None:
        from lossfloor.floor.conditional import estimate_conditional

        return estimate_conditional(samples, labels, sigmas, config, fingerprint=fingerprint, work_dir=work_dir,
                                    work_parent=work_parent, progress=progress)
    if engine.kind == "local":
        return local_estimate(samples, sigmas, config, fingerprint=fingerprint, work_dir=work_dir,
                              work_parent=work_parent, progress=progress)
    from lossfloor.data.node_cache import check_cache_root

    check_cache_root()  # the actors' data cache, checked here before Ray starts
    from lossfloor.ray import estimate_ray  # Ray only here

    return estimate_ray(samples, sigmas, config, engine=engine, labels=labels, fingerprint=fingerprint,
                        work_dir=work_dir, work_parent=work_parent, progress=progress).result


def estimate_table(samples, sigmas, config: EstimatorConfig, *, out: str | os.PathLike, fingerprint: str,
                   target: str = "x0", threshold: float = SIGMA_STAR_THRESHOLD, latents: str = "",
                   engine: Engine = LOCAL, labels=None, work_dir: str | os.PathLike | None = None,
                   work_parent: str | os.PathLike | None = None, tracking: Tracking | None = None,
                   params: Mapping[str, object] | None = None):
    """`estimate`, then its J* table in `target` units (σ* at `threshold`) written to `out`, and with
    `tracking` one MLflow run: the estimate's params and the caller's `params` (what the table does not
    say: data source, grid, ...). Returns the table."""
    from lossfloor.floor import build_table, write_table

    est = estimate(samples, sigmas, config, engine=engine, labels=labels, fingerprint=fingerprint,
                   work_dir=work_dir, work_parent=work_parent)
    if est.met is not None and not est.met.all():  # nothing written: a rerun with a larger budget reuses the batches
        bad = est.sigmas[~est.met]
        budget = "--queries" if config.queries is not None else "K·N, --queries-per-sample K"
        raise InputError(
            f"--rel-error: {config.rel_error:g} not met at {len(bad)} sigma (first {bad[0]:.4g}) with all "
            f"{est.n_queries} queries of the budget ({budget}); raise the budget or ask for a larger --rel-error")
    table = build_table(est, target=target, fingerprint=fingerprint, threshold=threshold, latents=latents)
    write_table(table, out)
    if tracking is not None:
        from lossfloor.jobs.record import record_estimate

        cfg = est.config
        run_id = record_estimate(table, params={
            **(params or {}), "dataset_fingerprint": fingerprint, "estimator": cfg.estimator,
            "subset_size": cfg.subset_size, "c": cfg.c, "queries_per_sample": cfg.queries_per_sample,
            "seed": cfg.seed, "n_sigmas": len(est.sigmas), "sigma_min": float(est.sigmas.min()),
            "sigma_max": float(est.sigmas.max()), "engine": engine.kind, "target": target,
            "n_queries": est.n_queries, "rows_per_batch": cfg.rows_per_batch, "rel_error": cfg.rel_error,
            "index": cfg.index if cfg.estimator == "knn" else None,
        }, experiment=tracking.experiment, run_name=tracking.run_name, tracking_uri=tracking.uri)
        log.info("MLflow: %s, experiment %s, run %s", tracking.uri, tracking.experiment, run_id)
    return table


def stage_key(config: EstimatorConfig, *, conditional: bool = False) -> dict:
    """The estimator config as a study stage's key (`lossfloor.jobs.study.Step.key`): not the device (a
    stage is the same estimate on any device), and the device cap only when set (it sizes the default
    batch; keys from before the cap existed stay valid); `conditional` (the class-conditional floor) only
    when true, for the same reason."""
    key = {**dataclasses.asdict(config), "device": None}
    if key["max_device_gb"] is None:
        del key["max_device_gb"]
    if conditional:
        key["conditional"] = True
    return key
