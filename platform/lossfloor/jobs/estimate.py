"""Estimate J*(σ): one entry for every command and study, on this process or on Ray Data.

    est = estimate(samples, sigmas, EstimatorConfig(), engine="ray", ray=RayOptions(workers=4),
                   fingerprint=ds.fingerprint, work_dir="runs/work")
    est.j_star, est.passes[0].computed

Both engines run the same batches through `lossfloor.floor.estimate` (the same numbers for the same seed)
and keep finished batches in a work folder when one is given (`work_dir`, or `work_parent` for a
folder named by a hash of the config, data and σ grid); the Ray engine always keeps one (default:
`work_parent`). `samples` is an (N, ...) array, or for the Ray engine a shard folder its workers read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lossfloor.errors import InputError
from lossfloor.floor import Estimate, EstimatorConfig
from lossfloor.floor import estimate as local_estimate

ENGINES = ("local", "ray")


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """Where the Ray engine runs: the cluster (None: this process's Ray, else a local one) and the pool."""

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None


def estimate(samples, sigmas, config: EstimatorConfig, *, engine: str = "local", ray: RayOptions | None = None,
             fingerprint: str | None = None, work_dir: str | os.PathLike | None = None,
             work_parent: str | os.PathLike | None = None, progress: bool = True) -> Estimate:
    """J*(σ) of `samples` with `config` on `engine` (module docstring)."""
    if engine not in ENGINES:
        raise InputError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "local":
        return local_estimate(samples, sigmas, config, fingerprint=fingerprint, work_dir=work_dir,
                              work_parent=work_parent, progress=progress)
    from lossfloor.ray import RayEngine, estimate_ray  # Ray only here

    opts = ray or RayOptions()
    pool = RayEngine(address=opts.address, workers=opts.workers, gpus_per_worker=opts.gpus_per_worker,
                     cpus_per_worker=opts.cpus_per_worker)
    return estimate_ray(samples, sigmas, config, engine=pool, fingerprint=fingerprint, work_dir=work_dir,
                        work_parent=work_parent, progress=progress).result
