"""`lossfloor train --engine ray`: the core training loop once per Ray Train worker (Train V2).

    run = train_on_ray(TrainConfig(preset="tiny", duration_n_img=1 << 16), "bundled:digits",
                       workers=2, storage_path="/shared/runs", name="tiny-edm")
    run.checkpoint        # /shared/runs/tiny-edm/checkpoint-000000065536 (state.pt + parquet tables)

The plan:

    driver   checks config, data source and run folder → TorchTrainer(ScalingConfig(num_workers, use_gpu),
             RunConfig(storage_path, name, FailureConfig(max_failures), CheckpointConfig(num_to_keep)))
    worker   rank, world size from ray.train.get_context() (TorchTrainer has already joined them in a
             torch.distributed group: gloo on CPUs, NCCL on GPUs) → loads the data itself
             (lossfloor.data.load; only the source string travels) → lossfloor.train.train(...) with
             resume = ray.train.get_checkpoint()'s folder; the loop's report hook calls
             ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder)) (rank 0 passes the
             folder it just wrote, the other ranks None; every rank reports at the same points)
    failure  a worker that dies is restarted with the whole group (up to max_failures times); the loop
             resumes from the last persisted checkpoint and, as its batches are a function of
             (seed, step), ends with the parameters of an uninterrupted run
    resume   the same RunConfig(storage_path, name) again: Ray restores its checkpoint list and
             get_checkpoint() returns the latest. A run folder written by the local engine (checkpoints
             but no Ray state) is resumed from its newest checkpoint, handed to the workers by path.

In-process mode (workers=0, `ScalingConfig(num_workers=0)`) runs the function in the driver with one
rank; Ray persists nothing there, so the loop writes straight into storage_path/name (local only).

Persisted checkpoints are named like the local engine's (`checkpoint-<n_img:012d>`), so
`storage_path/name` has the layout of a local `checkpoint_dir`: either engine can continue the other's
run, and `lossfloor.train.latest_checkpoint` finds them. For local storage the driver also copies the
final loss_curve.parquet and train_log.parquet to the top of the run folder, and rank 0 copies the EMA
snapshots (ema-<n_img>.pt, no part of Ray's checkpoints) there at every report, for post-hoc EMA.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from lossfloor.atomic import write_atomic
from lossfloor.errors import InputError
from lossfloor.train import TrainConfig, latest_checkpoint, load_checkpoint
from lossfloor.train.config import check_source

log = logging.getLogger(__name__)

TABLES = ("loss_curve.parquet", "train_log.parquet")
RAY_STATE_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


@dataclass(frozen=True)
class RayTrainResult:
    """A finished Ray Train run."""

    run_dir: str  # storage_path/name: Ray's run folder and the checkpoints (a path or a URI)
    checkpoint: str | None  # the newest persisted checkpoint folder (path or URI); None if none
    metrics: dict  # the last metrics reported with a checkpoint (rank 0's)
    result: ray.train.Result  # Ray's own result
    wall_s: float  # driver seconds from the start of fit() to its end

    def state(self) -> dict:
        """The newest checkpoint's training state (lossfloor.train.load_checkpoint) (local storage)."""
        if self.checkpoint is None:
            raise InputError(f"{self.run_dir}: the run has no checkpoint")
        return load_checkpoint(self.checkpoint)


# --- Worker ---------------------------------------------------------------------------------------------


def train_worker(loop_config: dict) -> None:
    """The per-worker function: `lossfloor.train.train` on this worker's rank (module docstring)."""
    from lossfloor.data import load
    from lossfloor.train import train

    torch.set_num_threads(loop_config["threads"])
    _quiet_report_lines()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    config = TrainConfig.from_dict(loop_config["config"])
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else torch.device("cpu")
    data = load(loop_config["data"], latents=config.latents)
    hooks = loop_config.get("hooks")

    def report(metrics: dict, path: Path | None) -> None:
        if rank == 0 and loop_config.get("snapshot_dir"):
            _keep_snapshots(local, loop_config["snapshot_dir"])
        checkpoint = None if path is None else Checkpoint.from_directory(os.fspath(path))
        name = None if path is None else path.name  # persisted under the loop's own name
        ray.train.report(dict(metrics), checkpoint=checkpoint, checkpoint_dir_name=name)
        if hooks is not None:
            hooks.after_report(rank, world_size, metrics)

    checkpoint = ray.train.get_checkpoint()
    # rank 0 writes here and Ray copies the folder to storage; in-process mode persists nothing, so
    # the loop writes straight into the run folder there
    local = loop_config.get("checkpoint_dir") or tempfile.mkdtemp(prefix=f"lossfloor-train-rank{rank}-")
    try:
        with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as folder:
            resume = folder or loop_config.get("initial_checkpoint") or False
            if hooks is not None:
                hooks.on_start(rank, resume)
            train(config, data, rank=rank, world_size=world_size, report=report, checkpoint_dir=local,
                  resume=resume, device=device)
    finally:
        if not loop_config.get("checkpoint_dir"):
            shutil.rmtree(local, ignore_errors=True)


def _keep_snapshots(src: str, dst: str) -> None:
    """Copy the EMA snapshots (ema-<n_img>.pt) of the worker's folder `src` that the run folder `dst`
    lacks, atomically: post-hoc EMA reads them there (`lossfloor.train.read_snapshots`)."""
    from lossfloor.train.checkpoint import SNAPSHOT_RE

    Path(dst).mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(src).iterdir()):
        if SNAPSHOT_RE.fullmatch(path.name) and not (Path(dst) / path.name).is_file():
            write_atomic(Path(dst) / path.name, lambda p, s=path: shutil.copyfile(s, p))


def _quiet_report_lines() -> None:
    """Ray Train V2 logs every `ray.train.report` with all its metrics at INFO, to the console, under a
    logger named by its file path (so `LoggingConfig(log_level=...)` misses it); keep it for warnings.

    A private module: the public API has no switch for these lines (checked on Ray 2.60, pinned in
    pyproject.toml); without it the lines stay, nothing breaks."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging alone
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


# --- Driver ---------------------------------------------------------------------------------------------


def _storage(storage_path) -> tuple[str, bool]:
    """(storage path as Ray wants it, whether it is a local folder)."""
    text = os.fspath(storage_path)
    if "://" in text:
        return text, text.startswith("file://")
    return str(Path(text).expanduser().absolute()), True


def _local_dir(run_dir: str) -> Path:
    return Path(run_dir[len("file://"):] if run_dir.startswith("file://") else run_dir)


def train_on_ray(config: TrainConfig, data_source: str, *, workers: int, gpus_per_worker: float = 0,
                 cpus_per_worker: float | None = None, storage_path, name: str, max_failures: int = 2,
                 address: str | None = None, resume: bool = True, callbacks=(), hooks=None) -> RayTrainResult:
    """Train `config` on `workers` Ray Train workers (module docstring); returns where the run is.

    data_source: a `lossfloor.data.load` source every worker can read (a path on shared storage, or
      bundled:digits); each worker loads it itself.
    workers: 0 = Ray Train's in-process local mode (one rank, no process group; for smoke tests).
    gpus_per_worker: > 0 trains on the worker's CUDA device (NCCL), else on CPU (gloo).
    cpus_per_worker: Ray CPUs per worker, also its torch thread count (default 1).
      (gpus_per_worker, cpus_per_worker and address are a `lossfloor.jobs.engine.Engine`'s, checked there.)
    storage_path, name: the run folder storage_path/name (a local or shared path, or a URI like s3://).
    max_failures: whole-group restarts from the last checkpoint before giving up (-1 = no limit).
    address: the Ray cluster to join (None: this process's Ray, else a local one).
    resume: False refuses a run folder that already holds checkpoints (start a new `name` instead).
    callbacks: Ray Train callbacks for RunConfig (e.g. a Tune report callback when this runs inside a Ray
      Tune trial, lossfloor.ray.sweep).
    hooks: a picklable object with `on_start(rank, resume)` and `after_report(rank, world_size, metrics)`,
      called in every worker (tests use it to kill a worker mid-run and to see what a restart resumes).
    """
    if not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0):
        raise InputError(f"workers: expected an integer >= 0 (0 = in-process), like 2, got {workers!r}")
    if not (isinstance(max_failures, int) and max_failures >= -1):
        raise InputError(f"max_failures: expected an integer >= -1 (-1 = no limit), like 2, got {max_failures!r}")
    if not (isinstance(name, str) and name.strip() and "/" not in name):
        raise InputError(f"name: expected a folder name like 'tiny-edm', got {name!r}")
    if config.precision == "fp16" and not gpus_per_worker:
        raise InputError("precision: fp16 autocast needs GPUs (gpus_per_worker > 0); use 'bf16' or 'none'")
    source = os.fspath(data_source)
    if not source.startswith("bundled:"):
        source = str(Path(source).expanduser().absolute())  # workers may run elsewhere
    check_source(config, source, ranks=workers)
    storage, local_storage = _storage(storage_path)
    run_dir = f"{storage.rstrip('/')}/{name}"
    initial = None
    if workers == 0 and not local_storage:
        raise InputError(f"storage_path: in-process mode (workers=0) needs a local folder, got {storage!r}")
    if local_storage:
        folder = _local_dir(run_dir)
        newest = latest_checkpoint(folder)
        has_ray_state = (folder / RAY_STATE_FILE).exists()
        if not resume and (newest is not None or has_ray_state):
            raise InputError(f"resume: {folder} already holds a run (checkpoint {newest.name if newest else '?'}); "
                             "resume it or choose another name/output folder")
        if newest is not None and (not has_ray_state or workers == 0):
            initial = str(newest)  # a run of the local engine or in-process mode: its newest checkpoint
        if newest is not None:
            from lossfloor.train.loop import check_resume  # the loop's own config check, on the driver

            check_resume(load_checkpoint(newest), config, newest)

    from lossfloor.ray.cluster import ray_session

    threads = max(1, int(cpus_per_worker or 1))
    loop_config = {
        "config": config.to_dict(), "data": source, "use_gpu": gpus_per_worker > 0, "threads": threads,
        "initial_checkpoint": initial, "hooks": hooks,
        "checkpoint_dir": str(_local_dir(run_dir)) if workers == 0 else None,
        # EMA snapshots are no part of Ray's checkpoints: rank 0 copies them into the run folder itself
        "snapshot_dir": str(_local_dir(run_dir)) if workers and local_storage else None,
    }
    resources = {"CPU": float(cpus_per_worker or 1)}
    if gpus_per_worker:
        resources["GPU"] = float(gpus_per_worker)
    keep = config.keep_checkpoints or None
    with ray_session(address, state_api=True):
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                         resources_per_worker=resources if workers else None),
            run_config=RunConfig(
                name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=keep), callbacks=list(callbacks),
                worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
                logging_config=LoggingConfig(log_level="WARNING"),  # Train's INFO lines stay in its log files
            ),
        )
        log.info("ray train: %d worker(s)%s, run folder %s", workers,
                 f" x {gpus_per_worker:g} GPU" if gpus_per_worker else " (CPU, gloo)", run_dir)
        t0 = time.monotonic()
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            _raise_input_error(e)
            raise
        wall = time.monotonic() - t0
    ckpt = result.checkpoint
    ckpt_path = None if ckpt is None else ckpt.path if local_storage else f"{storage.split('://')[0]}://{ckpt.path}"
    if local_storage and ckpt_path is None and latest_checkpoint(_local_dir(run_dir)) is not None:
        ckpt_path = str(latest_checkpoint(_local_dir(run_dir)))  # in-process mode, or nothing left to train
    if local_storage and ckpt_path is not None and workers > 0:
        for table in TABLES:  # the run folder then reads like a local checkpoint_dir
            src = Path(ckpt_path) / table
            if src.is_file():
                write_atomic(_local_dir(run_dir) / table, lambda p, s=src: shutil.copyfile(s, p))
    return RayTrainResult(run_dir=run_dir, checkpoint=ckpt_path, metrics=dict(result.metrics or {}),
                          result=result, wall_s=wall)


def _raise_input_error(error: Exception) -> None:
    """A worker's InputError (bad data or config found late) as the driver's own InputError."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        cause = failure
        while cause is not None and not isinstance(cause, InputError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, InputError):
            raise InputError(str(cause)) from None


__all__ = ["RayTrainResult", "train_on_ray", "train_worker"]
