"""Run `train` on several local processes joined by torch.distributed (gloo on the CPU).

For tests and single-machine debugging of the multi-rank path; clusters use the Ray Train wrapper
(lossfloor.ray), which calls the same `train` once per worker. Each rank is a fresh spawned process
(one intra-op thread), rendezvous through a file in a temporary folder.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from lossfloor.errors import InputError
from lossfloor.train.config import TrainConfig


def _rank_main(rank: int, world_size: int, init_file: str, out_dir: str, config: TrainConfig,
               samples: np.ndarray, labels: np.ndarray | None, checkpoint_dir: str | None) -> None:
    import torch.distributed as dist

    from lossfloor.train.loop import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        reports = []
        data = _Arrays(samples, labels)
        ckpt = None if checkpoint_dir is None else os.path.join(checkpoint_dir, f"rank{rank}") if rank else checkpoint_dir
        res = train(config, data, rank=rank, world_size=world_size, checkpoint_dir=ckpt, device="cpu",
                    report=lambda metrics, path: reports.append({"metrics": metrics, "checkpoint": None if path is None else str(path)}))
        torch.save({"model_state": res.model_state, "loss_curve": res.loss_curve, "train_log": res.train_log,
                    "reports": reports, "n_img": res.n_img}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class _Arrays:
    def __init__(self, samples, labels):
        self.samples, self.labels = samples, labels


def run_local_ranks(config: TrainConfig, data, *, world_size: int = 2, checkpoint_dir=None,
                    timeout_s: float = 600.0) -> list[dict]:
    """Train `config` on `world_size` local CPU processes (gloo); returns one dict per rank with
    model_state, loss_curve, train_log, n_img and reports (the report hook's calls: metrics, checkpoint).

    Rank 0 writes checkpoints to checkpoint_dir; other ranks get checkpoint_dir/rank<r>, which must stay
    empty (rank 0 alone writes).
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise InputError(f"world_size: expected an integer >= 1, like 2, got {world_size!r}")
    samples = np.asarray(getattr(data, "samples", data), dtype=np.float32)
    labels = getattr(data, "labels", None)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lossfloor-ranks-") as tmp:
        args = (world_size, str(Path(tmp) / "rendezvous"), tmp, config, samples, labels,
                None if checkpoint_dir is None else str(checkpoint_dir))
        procs = [ctx.Process(target=_rank_main, args=(r, *args)) for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        for p in procs:
            if p.is_alive():
                p.kill()
        codes = [p.exitcode for p in procs]
        if codes != [0] * world_size:
            raise RuntimeError(f"run_local_ranks: rank exit codes {codes}")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
