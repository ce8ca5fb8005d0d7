"""Train one model, or a ladder of models into stage folders: in this process, as Ray tasks, or on Ray Train.

    train_ladder(todo, data="bundled:digits", ds=ds, out=out, resources=Resources(engine="ray"),
                 on_done=lambda stage, summary: ...)

`todo` holds (stage, TrainConfig) pairs, smallest model first. Each model trains (or resumes from its
newest checkpoint) into its stage folder; when it is done its tables are in the folder, the stage's
DONE.json records `summary` (run, model, params, FLOPs, images, seconds, final total loss) and `on_done`
is called on this process (where MLflow is written: workers never write runs). With the Ray engine the
models run concurrently, largest first, as many as the cluster's resources allow: each as one Ray task
running the local loop (`trainer="tasks"`), or on Ray Train with `train_workers` workers
(`trainer="ray-train"`, `lossfloor.ray.train.train_on_ray`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lossfloor.atomic import write_npz
from lossfloor.errors import InputError
from lossfloor.jobs.stages import Stage

log = logging.getLogger(__name__)

ENGINES, TRAINERS = ("local", "ray"), ("ray-train", "tasks")


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Where the models train: this process, or Ray (the cluster at `address`, or this process's Ray)."""

    engine: str = "local"
    trainer: str = "ray-train"  # ray engine: each model on Ray Train, or as one Ray task
    train_workers: int = 1  # ray-train: workers (DDP ranks) per model
    cpus_per_worker: int = 1  # also the torch threads of a worker
    gpus_per_worker: float = 0.0
    address: str | None = None

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise InputError(f"engine: expected one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.trainer not in TRAINERS:
            raise InputError(f"trainer: expected one of {', '.join(TRAINERS)}, got {self.trainer!r}")

    @property
    def device(self) -> str | None:
        """The workers' device (None: the loop's choice, cuda if available)."""
        if self.engine == "local":
            return None
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


def train_one(config, data: str, max_samples: int | None, checkpoint_dir: str, device: str | None,
              threads: int) -> dict:
    """Train (or resume) one model into checkpoint_dir; its tables and counts as plain data (picklable)."""
    import torch

    from lossfloor.data import load
    from lossfloor.train import train

    if not logging.getLogger().handlers:  # a Ray worker: show the loop's progress lines (rate, ETA) in the job log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    torch.set_num_threads(threads)
    ds = load(data, max_samples=max_samples, latents=config.latents)
    t0 = time.monotonic()
    res = train(config, ds, checkpoint_dir=checkpoint_dir, device=device)
    return {
        "run": res.run, "model": res.model, "params": res.params, "forward_flops": res.forward_flops,
        "n_img": res.n_img, "step": res.step, "loss_curve": res.loss_curve, "train_log": res.train_log,
        "table_meta": res.table_meta,
        "train_s": time.monotonic() - t0, "device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
    }


def write_tables(folder: Path, config, result: dict) -> None:
    """The run folder's tables, where the worker's copy is not visible (a Ray task on another node):
    written from the rows that came back, with the loop's metadata (lossfloor.tracking.train reads it)."""
    from lossfloor.train import CURVE_SCHEMA, TRAIN_LOG_SCHEMA
    from lossfloor.train.curves import write_rows

    meta = result["table_meta"]  # the loop's own metadata: config, FLOPs, data fingerprint, span
    for name, rows, schema in (("loss_curve.parquet", result["loss_curve"], CURVE_SCHEMA),
                               ("train_log.parquet", result["train_log"], TRAIN_LOG_SCHEMA)):
        if not (Path(folder) / name).is_file():
            write_rows(rows, schema, Path(folder) / name, meta)


def summary(result: dict, engine: str) -> dict:
    """What a finished model's DONE.json records."""
    totals = [r for r in result["loss_curve"] if r["sigma"] is None]
    return {k: result[k] for k in ("run", "model", "params", "forward_flops", "n_img", "step", "train_s", "device")} | {
        "engine": engine, "final_total": totals[-1]["loss"] if totals else None,
        "final_flops": totals[-1]["flops"] if totals else None, "n_evals": len(totals)}


def train_ladder(todo: list[tuple[Stage, object]], *, data: str, ds, out: Path, resources: Resources,
                 on_done: Callable[[Stage, dict], None], max_samples: int | None = None,
                 n_source: int | None = None) -> None:
    """Train the models of `todo` (module docstring). ds: the loaded data (`data` capped at max_samples;
    n_source: the samples `data` holds, to know whether a cap applies)."""
    if not todo:
        return

    def finished(stage: Stage, config, result: dict) -> None:
        write_tables(stage.dir, config, result)
        stage.finish(summary(result, resources.engine))
        on_done(stage, stage.result())

    if resources.engine == "local":
        for stage, cfg in todo:
            log.info("train %s: %d images in batches of %d, into %s", cfg.preset_obj.name, cfg.duration_n_img,
                     cfg.batch_n_img, stage.dir)
            finished(stage, cfg, train_one(cfg, data, max_samples, str(stage.begin()), None,
                                           resources.cpus_per_worker))
        return
    if resources.trainer == "ray-train":
        _ladder_on_ray_train(todo, _worker_data(data, ds, out, max_samples, n_source), resources, out, finished)
    else:
        _ladder_as_ray_tasks(todo, data, max_samples, resources, finished)


def _ladder_as_ray_tasks(todo, data: str, max_samples, resources: Resources, finished) -> None:
    import ray

    task = ray.remote(train_one).options(num_cpus=resources.cpus_per_worker,
                                         num_gpus=resources.gpus_per_worker or None, max_retries=0)
    pending = {}
    for stage, cfg in reversed(todo):  # largest first: the longest task starts first
        stage.begin()
        ref = task.remote(cfg, data, max_samples, str(stage.dir), resources.device, resources.cpus_per_worker)
        pending[ref] = (stage, cfg)
        log.info("train %s: submitted as a Ray task (%d images in batches of %d)", cfg.preset_obj.name,
                 cfg.duration_n_img, cfg.batch_n_img)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        stage, cfg = pending.pop(ready[0])
        finished(stage, cfg, ray.get(ready[0]))


def _worker_data(data: str, ds, out: Path, max_samples: int | None, n_source: int | None) -> str:
    """A source the Ray Train workers load whole: `data`, or (with a sample cap) the capped samples
    written once as OUT/data-<fingerprint>.npz (same samples, same fingerprint)."""
    if max_samples is None or n_source is None or max_samples >= n_source:
        return data

    from lossfloor.data import load

    path = (Path(out) / f"data-{ds.fingerprint[:12]}.npz").absolute()
    if not path.is_file():
        arrays = {"x": ds.samples} | ({} if ds.labels is None else {"labels": ds.labels})
        write_npz(path, arrays)
    if load(path).fingerprint != ds.fingerprint:
        raise InputError(f"{path}: the capped data set does not read back with fingerprint {ds.fingerprint[:12]}")
    return str(path)


def concurrent_models(resources: Resources, n_models: int) -> int:
    """How many models of a ladder train at once on Ray Train: as many whole worker groups as the
    cluster's CPUs (and GPUs) hold, at least 1. A worker group started beyond that would wait for
    resources and fail with Ray Train's start-up timeout (a traceback in a normal run) before retrying."""
    import ray

    from lossfloor.ray.cluster import connect

    connect(resources.address)
    total = ray.cluster_resources()
    need = {"CPU": resources.train_workers * resources.cpus_per_worker}
    if resources.gpus_per_worker:
        need["GPU"] = resources.train_workers * resources.gpus_per_worker
    fit = min(int(total.get(k, 0.0) // v) for k, v in need.items())
    at_once = max(1, min(n_models, fit))
    log.info("train: %d model(s), %d at a time (the cluster has %s; each model needs %s)", n_models, at_once,
             ", ".join(f"{total.get(k, 0):g} {k}" for k in need), ", ".join(f"{v:g} {k}" for k, v in need.items()))
    return at_once


def _ladder_on_ray_train(todo, source: str, resources: Resources, out: Path, finished) -> None:
    """Each model by `lossfloor.ray.train.train_on_ray` into its stage folder, as many at once as the
    cluster's resources hold (`concurrent_models`; one driver thread per running model)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from lossfloor.ray.train import train_on_ray
    from lossfloor.train import forward_flops, resolve
    from lossfloor.train.run_folder import read_run_folder

    def one(stage: Stage, cfg) -> dict:
        stage.begin()
        run = train_on_ray(cfg, source, workers=resources.train_workers, gpus_per_worker=resources.gpus_per_worker,
                           cpus_per_worker=resources.cpus_per_worker, storage_path=str(Path(out).absolute()),
                           name=stage.dir.name, address=resources.address)
        folder = read_run_folder(stage.dir)
        curve = folder.curve_rows
        unet = resolve(cfg).unet
        return {"run": curve[-1]["run"], "model": curve[-1]["model"], "params": curve[-1]["params"],
                "forward_flops": forward_flops(unet, cfg.flop_convention), "n_img": curve[-1]["images"],
                "step": curve[-1]["step"], "loss_curve": curve, "table_meta": folder.meta,
                "train_log": folder.log_rows, "train_s": run.wall_s, "device": resources.device}

    at_once = concurrent_models(resources, len(todo))
    pool = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="train")
    try:
        futures = {}
        for stage, cfg in reversed(todo):  # largest first
            futures[pool.submit(one, stage, cfg)] = (stage, cfg)
            log.info("train %s: on Ray Train, %d worker(s) (%d images in batches of %d)", cfg.preset_obj.name,
                     resources.train_workers, cfg.duration_n_img, cfg.batch_n_img)
        for future in as_completed(futures):
            stage, cfg = futures[future]
            finished(stage, cfg, future.result())
    except BaseException:
        # stopped (SIGTERM, ^C) or failed: do not wait for the running models here; the caller's Ray
        # shutdown ends them, and each resumes from its newest checkpoint on the next run
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
