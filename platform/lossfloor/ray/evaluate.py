"""`lossfloor evaluate --engine ray`: blocks of samples over Ray actors, the local engine's numbers.

    with ray_session(engine.address):
        for key, sums in RayBlocks(build, engine).run(todo):        # todo: [(seed, start, stop), ...]
            ...                                                      # as each block finishes

Each of the engine's `workers` actors builds the sampler and the feature extractors once (`build`, a
picklable callable of the device: the job's own, so the model paths must be readable where the actors
run) and computes whole blocks (`lossfloor.train.quality.block_sums`): a block's samples come from
(seed, index) and its batches from its bounds, so a block is the same numbers on any actor, and the
driver's sums in block order are those of one process whatever the number of workers. With
gpus_per_worker > 0 the actors run on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import ray
import torch

from lossfloor.ray.cluster import actors_killed


@ray.remote
class _Sampler:
    """One worker: the sampler and the extractors, and the blocks it is handed."""

    def __init__(self, build: Callable, device: str, threads: int):
        torch.set_num_threads(threads)
        self.compute = build(device)

    def run(self, seed: int, start: int, stop: int) -> dict:
        return self.compute(seed, start, stop)


class RayBlocks:
    """Blocks over the engine's Ray actors (module docstring); `engine` a `lossfloor.jobs.engine.Engine`
    of kind ray, as it is (checked there)."""

    def __init__(self, build: Callable, engine):
        self.build, self.workers = build, engine.workers
        self.gpus, self.cpus = float(engine.gpus_per_worker), engine.cpus_per_worker

    def run(self, todo: list[tuple[int, int, int]]) -> Iterator[tuple[tuple[int, int, int], dict]]:
        """(block, its sums) for each block of `todo`, in the order they finish."""
        if not todo:
            return
        cpus = self.cpus or max(1.0, float(ray.cluster_resources().get("CPU", 1)) // self.workers)
        device = "cuda" if self.gpus > 0 else "cpu"
        actors = [_Sampler.options(num_cpus=cpus, num_gpus=self.gpus).remote(self.build, device, max(1, int(cpus)))
                  for _ in range(min(self.workers, len(todo)))]
        free, queue, running = list(actors), list(todo), {}
        with actors_killed(actors):
            while queue or running:
                while free and queue:
                    actor, block = free.pop(), queue.pop(0)
                    running[actor.run.remote(*block)] = (block, actor)
                done, _ = ray.wait(list(running), num_returns=1)
                block, actor = running.pop(done[0])
                free.append(actor)
                yield block, ray.get(done[0])


__all__ = ["RayBlocks"]
