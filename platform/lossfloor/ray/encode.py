"""`lossfloor data encode --engine ray`: the encoder as Ray Data batch inference on an actor pool.

    from_items([chunk indices still missing], one block per chunk)
      → map_batches(EncodeWorker, compute=ActorPoolStrategy(size=workers), batch_size=1, num_gpus=G)
          each actor loads the VAE once (on CUDA when it has GPUs) and encodes whole chunks with the
          core's `ChunkEncoder`, writing each into the work folder (which, like the source, must be on
          storage every worker can read and write)
      → (chunk, images) rows → iterated on the driver for progress.

A chunk is encoded in the same batches whichever worker takes it (`lossfloor.data.encoding`), so any
number of workers writes the local engine's bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import ray
import torch

from lossfloor.data.encoding import ChunkEncoder, EncodePlan, WorkFolder
from lossfloor.ray.cluster import ray_session
from lossfloor.ray.estimate import _quiet_ray_data


class EncodeWorker:
    """An actor of the pool: one VAE, whole chunks encoded into the work folder."""

    def __init__(self, plan: EncodePlan, work_path: str, device: str, threads: int):
        torch.set_num_threads(threads)
        self.encoder = ChunkEncoder(plan, WorkFolder(work_path, plan), device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks = [int(i) for i in batch["chunk"]]
        return {"chunk": np.array(chunks, dtype=np.int64),
                "images": np.array([self.encoder(i) for i in chunks], dtype=np.int64)}


def encode_ray(plan: EncodePlan, work: WorkFolder, missing: Sequence[int], engine) -> Iterator[int]:
    """Encode the `missing` chunks on Ray (`engine`: a `lossfloor.jobs.engine.Engine` of kind ray);
    yields each finished chunk's number of images as it arrives."""
    with ray_session(engine.address), _quiet_ray_data():
        cpus = engine.cpus_per_worker or 1.0  # also the actor's torch threads (reading and cropping: one each)
        ds = ray.data.from_items([{"chunk": int(i)} for i in missing], override_num_blocks=len(missing))
        out = ds.map_batches(
            EncodeWorker,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(engine.workers, len(missing))),
            num_cpus=cpus,
            num_gpus=engine.gpus_per_worker or None,
            fn_constructor_kwargs={"plan": plan, "work_path": str(work.path.absolute()), "device": engine.device,
                                   "threads": max(1, int(cpus))},
        )
        it = iter(out.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0))
        try:
            for columns in it:
                yield from (int(n) for n in columns["images"])
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
