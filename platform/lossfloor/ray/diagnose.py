"""`lossfloor diagnose --engine ray`: σ × sample-batch blocks over Ray actors, the local engine's numbers.

    with ray_session(engine.address):
        d = measure(model, samples, labels, sigmas, jstar=..., fingerprint=..., losses=RayLosses(load, engine))

Each of the engine's `workers` actors (all must fit the cluster at once: blocks are handed out
round-robin) loads the model once (`lossfloor.diagnose.load_model` with the driver's arguments, so the
model's path must be readable where it runs) and gets the driver's evaluation samples. The work is cut
into blocks of (grid point k, a run of whole forward batches); an actor draws a block's noise as the local engine does
(`eval_noise(seed, k)`, its rows) and returns the per-batch sums of `batch_sums`; the driver adds them
up per σ in batch order, exactly as `evaluate` does. So the results are the local engine's whatever the
number of workers; with gpus_per_worker > 0 the actors run on CUDA (and match a local
`--device cuda` run).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import ray
import torch

from lossfloor.ray.cluster import actors_killed


@ray.remote
class _Evaluator:
    """One worker: the model, the evaluation samples, and the blocks it is handed."""

    def __init__(self, load_kwargs: dict, x0, labels, seed: int, batch: int, device: str, threads: int):
        from lossfloor.diagnose.models import load_model

        torch.set_num_threads(threads)
        self.model = load_model(**load_kwargs, device=device)
        self.x0, self.labels, self.seed, self.batch, self.device = x0, labels, seed, batch, device

    def run(self, point: int, sigma: float, start: int, stop: int) -> torch.Tensor:
        """(batches, 2) sums of l and l^2 of rows start..stop at grid point `point` (`batch_sums`)."""
        from lossfloor.train.evaluation import batch_sums, eval_noise

        noise = eval_noise(self.seed, point, len(self.x0), self.x0.shape[1:])[start:stop]
        lab = None if self.labels is None else self.labels[start:stop]
        with torch.no_grad():
            return batch_sums(self.model.denoiser, self.x0[start:stop], lab, noise, sigma, batch=self.batch,
                              device=self.device).cpu()


class RayLosses:
    """`local_losses` on the engine's Ray actors (module docstring).

    engine: a `lossfloor.jobs.engine.Engine` of kind ray, as it is (checked there): `workers` actors of
      `cpus_per_worker` CPUs (default: the cluster's CPUs / workers; also their torch threads) and
      `gpus_per_worker` GPUs (> 0: the actors run on CUDA).
    """

    def __init__(self, load_kwargs: dict, engine):
        self.load_kwargs, self.workers = dict(load_kwargs), engine.workers
        self.gpus, self.cpus = float(engine.gpus_per_worker), engine.cpus_per_worker

    def blocks(self, n: int, batch: int, n_sigmas: int) -> list[tuple[int, int, int]]:
        """(k, start, stop) blocks of whole forward batches: about two per worker in all."""
        batches = -(-n // batch)
        per_sigma = min(batches, max(1, math.ceil(2 * self.workers / n_sigmas)))
        step = batch * -(-batches // per_sigma)
        return [(k, start, min(start + step, n)) for k in range(n_sigmas) for start in range(0, n, step)]

    def __call__(self, model, x0, labels, sigmas, *, seed: int, batch: int, device,
                 progress: Callable[[int], None] | None = None, grid_index=None) -> tuple[np.ndarray, np.ndarray]:
        from lossfloor.train.evaluation import mean_stderr

        sigmas = np.asarray(sigmas, dtype=np.float64)
        index = np.arange(len(sigmas)) if grid_index is None else np.asarray(grid_index)
        cpus = self.cpus or max(1.0, float(ray.cluster_resources().get("CPU", 1)) // self.workers)
        task_device = "cuda" if self.gpus > 0 else "cpu"
        x0_ref, labels_ref = ray.put(x0), ray.put(labels)
        actors = [_Evaluator.options(num_cpus=cpus, num_gpus=self.gpus).remote(
            self.load_kwargs, x0_ref, labels_ref, seed, batch, task_device, max(1, int(cpus)))
            for _ in range(self.workers)]
        blocks = self.blocks(len(x0), batch, len(sigmas))
        futures = [actors[i % len(actors)].run.remote(int(index[k]), float(sigmas[k]), start, stop)
                   for i, (k, start, stop) in enumerate(blocks)]
        sums = torch.zeros(2, len(sigmas), dtype=torch.float64)
        with actors_killed(actors):
            for (k, _, stop), future in zip(blocks, futures):  # blocks in (k, row) order: the local sum order
                for part in ray.get(future):
                    sums[:, k] += part
                if stop == len(x0) and progress is not None:
                    progress(k)
        return mean_stderr(sums, len(x0))


__all__ = ["RayLosses"]
