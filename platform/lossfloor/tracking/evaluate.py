"""One MLflow run per evaluation (experiment `evaluate` by default).

What a run holds:
  params    model (or samples), reference_stats, features, n_samples, seeds, steps, sigma_min, sigma_max,
            rho, ema, guidance, guide_model, vae and latent_stats (a latent model's VAE folder and the source
            of its statistics), dataset_fingerprint (the statistics')
  metrics   per metric (fd, fid, fd_dinov2): <metric> (the mean over seeds), <metric>_std, <metric>_min,
            <metric>_max, and <metric>/seed at step = seed; images_per_second
  tags      lossfloor.kind=evaluate, dataset_fingerprint
  artifacts metrics.json, the reference statistics file, each seed's sample statistics file
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from lossfloor.tracking.runs import start_run

KIND = "evaluate"


def log_evaluation(result: Mapping, files: Sequence[str | os.PathLike], *, params: Mapping[str, object],
                   experiment: str = "evaluate", run_name: str | None = None, tracking_uri: str | None = None) -> str:
    """Log an evaluation's result (`lossfloor.jobs.evaluate.evaluate`) and its files; returns the run id."""
    with start_run(experiment=experiment, run_name=run_name, tracking_uri=tracking_uri,
                   tags={"lossfloor.kind": KIND, "dataset_fingerprint": params.get("dataset_fingerprint", "")}) as run:
        run.log_params({k: v for k, v in params.items() if v is not None})
        scalars = {}
        for metric in result["metrics"]:
            m = result[metric]
            scalars.update({metric: m["mean"], f"{metric}_std": m["std"], f"{metric}_min": m["min"],
                            f"{metric}_max": m["max"]})
            run.log_series({f"{metric}/seed": m["per_seed"]}, steps=list(result["seeds"]))
        if result.get("images_per_second") is not None:
            scalars["images_per_second"] = result["images_per_second"]
        run.log_metrics(scalars)
        for f in files:
            run.log_artifact(f)
    return run.run_id


__all__ = ["KIND", "log_evaluation"]
