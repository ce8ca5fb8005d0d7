"""`lossfloor diagnose --engine ray`: the σ grid split over Ray tasks, the same numbers as the local engine.

    with ray_session(address):
        d = measure(model, samples, labels, sigmas, jstar=..., fingerprint=..., losses=RayLosses(load, workers=4))

Each task loads the model itself (`lossfloor.diagnose.load_model` with the driver's arguments, so the
model's path must be readable where the task runs), gets the driver's evaluation samples, and evaluates
its contiguous part of the grid with `local_losses` and the noise of those grid points' indices
(`evaluate(grid_index=...)`). Per σ the arithmetic is the local engine's, so the results do not depend
on the number of workers (DESIGN §2); on CUDA (gpus_per_worker > 0) they match a local `--device cuda` run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import ray

from lossfloor.errors import InputError


@ray.remote
def _losses_task(load_kwargs: dict, x0, labels, sigmas, grid_index, seed: int, batch: int, device: str,
                 threads: int):
    import torch

    from lossfloor.diagnose.measure import local_losses
    from lossfloor.diagnose.models import load_model

    torch.set_num_threads(threads)
    model = load_model(**load_kwargs, device=device)
    return local_losses(model, x0, labels, sigmas, seed=seed, batch=batch, device=device, grid_index=grid_index)


class RayLosses:
    """`local_losses` on Ray tasks: `workers` tasks, each with a contiguous part of the σ grid."""

    def __init__(self, load_kwargs: dict, *, workers: int = 1, gpus_per_worker: float = 0.0,
                 cpus_per_worker: float | None = None):
        if not (isinstance(workers, int) and workers >= 1):
            raise InputError(f"--workers: expected an integer >= 1, got {workers!r}")
        if not (math.isfinite(gpus_per_worker) and gpus_per_worker >= 0):
            raise InputError(f"--gpus-per-worker: expected a number >= 0, got {gpus_per_worker!r}")
        self.load_kwargs, self.workers = dict(load_kwargs), workers
        self.gpus, self.cpus = float(gpus_per_worker), cpus_per_worker

    def __call__(self, model, x0, labels, sigmas, *, seed: int, batch: int, device,
                 progress: Callable[[int], None] | None = None, grid_index=None) -> tuple[np.ndarray, np.ndarray]:
        sigmas = np.asarray(sigmas, dtype=np.float64)
        index = np.arange(len(sigmas)) if grid_index is None else np.asarray(grid_index)
        parts = np.array_split(np.arange(len(sigmas)), min(self.workers, len(sigmas)))
        cpus = self.cpus or max(1.0, float(ray.cluster_resources().get("CPU", 1)) // self.workers)
        options = {"num_cpus": cpus, "num_gpus": self.gpus}
        task_device = "cuda" if self.gpus > 0 else "cpu"
        x0_ref = ray.put(x0)
        futures = [_losses_task.options(**options).remote(self.load_kwargs, x0_ref, labels, sigmas[p], index[p], seed,
                                                          batch, task_device, max(1, int(cpus)))
                   for p in parts]
        loss, stderr = np.empty(len(sigmas)), np.empty(len(sigmas))
        done = 0
        for p, future in zip(parts, futures):  # in grid order: progress counts finished parts
            loss[p], stderr[p] = ray.get(future)
            done += len(p)
            if progress is not None:
                progress(done - 1)
        return loss, stderr


__all__ = ["RayLosses"]
