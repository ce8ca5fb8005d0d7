"""Train one model, or a ladder of models into stage folders: in this process, as Ray tasks, or on Ray Train.

    run = train_run(config, data="bundled:digits", out="runs/tiny", engine=Engine(kind="ray", workers=2))
    train_ladder(todo, data="bundled:digits", ds=ds, out=out, engine=Engine(kind="ray"),
                 on_done=lambda stage, summary: stage.finish(summary))

`train_run` is `lossfloor train`: one model trains (or resumes from its newest checkpoint) in its run
folder, in this process or on Ray Train with the engine's workers, and is then logged to MLflow when a
store is given (on this process only: workers never write runs).

`todo` holds (stage, TrainConfig) pairs, smallest model first. Each model trains (or resumes from its
newest checkpoint) into its stage folder; when it is done its tables are in the folder and `on_done` is
called on this process with its `summary` (run, model, params, FLOPs, images, seconds, final total loss),
which the caller records in the stage's DONE.json (`lossfloor.jobs.study.Study.run_together` does, and
logs the model: MLflow is written on this process, workers never write runs). With the Ray engine the
models run concurrently, largest first, as many as the cluster's resources allow: each as one Ray task
running the local loop (`trainer="tasks"`), or on Ray Train with `train_workers` workers
(`trainer="ray-train"`, `lossfloor.ray.train.train_on_ray`), each worker with the engine's CPUs and GPUs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lossfloor.atomic import output_folder, write_npz
from lossfloor.errors import InputError
from lossfloor.jobs.engine import LOCAL, Engine
from lossfloor.jobs.stages import Stage
from lossfloor.jobs.tracking import Tracking

log = logging.getLogger(__name__)

TRAINERS = ("ray-train", "tasks")
MAX_FAILURES = 2  # Ray Train: restarts of a run from its last checkpoint after worker failures


@dataclass(frozen=True)
class TrainRun:
    """What `train_run` did: the run folder, its wall time and images trained by this call, the MLflow run."""

    out: Path
    wall_s: float
    images_run: int
    mlflow_run: str | None


def train_run(config, *, data: str, out, engine: Engine = LOCAL, device: str | None = None,
              resume: bool = True, max_failures: int = MAX_FAILURES, tracking: Tracking | None = None,
              samples: int | str = "auto") -> TrainRun:
    """Train (or resume) `config` on `data` into the run folder `out` (module docstring); a failed first
    run leaves no folder behind. device: the local engine's (None: cuda when available); with the Ray
    engine the workers' device follows their GPUs. max_failures: Ray Train's restarts (-1 = no limit).
    samples: the samples grid MLflow logs (`lossfloor.jobs.record.record_training`)."""
    with output_folder(out) as folder:
        t0 = time.monotonic()
        before = _images_done(folder)
        if engine.kind == "ray":
            from lossfloor.ray.train import train_on_ray

            res = train_on_ray(config, data, workers=engine.workers, gpus_per_worker=engine.gpus_per_worker,
                               cpus_per_worker=engine.cpus_per_worker, storage_path=folder.absolute().parent,
                               name=folder.name, max_failures=max_failures, address=engine.address, resume=resume)
            images_run = int(res.metrics.get("n_img", before)) - before
        else:
            from lossfloor.data import load
            from lossfloor.train import train

            res = train(config, load(data, latents=config.latents), checkpoint_dir=folder, resume=resume,
                        device=device)
            images_run = res.n_img - before
        wall = time.monotonic() - t0
    run_id = None
    if tracking is not None:  # on the driver only: workers never write to MLflow
        from lossfloor.jobs.record import record_training

        log.info("MLflow: logging the run to %s, experiment %s", tracking.uri, tracking.experiment)
        run_id = record_training(folder, params={"data": data, "engine": engine.kind,
                                                 "workers": engine.workers if engine.kind == "ray" else 1,
                                                 "out": str(folder.absolute())},
                                 experiment=tracking.experiment, run_name=tracking.run_name, samples=samples,
                                 tracking_uri=tracking.uri, device=device if engine.kind == "local" else None)
        log.info("MLflow: %s, experiment %s, run %s", tracking.uri, tracking.experiment, run_id)
    return TrainRun(out=folder, wall_s=wall, images_run=images_run, mlflow_run=run_id)


def _images_done(out: Path) -> int:
    """Images already trained in OUT (its newest checkpoint's name), 0 for a fresh run."""
    from lossfloor.train import latest_checkpoint

    newest = latest_checkpoint(out)
    return 0 if newest is None else int(newest.name.rsplit("-", 1)[1])


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
    from lossfloor.train.run_folder import CURVE_FILE, LOG_FILE

    meta = result["table_meta"]  # the loop's own metadata: config, FLOPs, data fingerprint, span
    for name, rows, schema in ((CURVE_FILE, result["loss_curve"], CURVE_SCHEMA),
                               (LOG_FILE, result["train_log"], TRAIN_LOG_SCHEMA)):
        if not (Path(folder) / name).is_file():
            write_rows(rows, schema, Path(folder) / name, meta)


def summary(result: dict, engine: str) -> dict:
    """What a finished model's DONE.json records."""
    totals = [r for r in result["loss_curve"] if r["sigma"] is None]
    return {k: result[k] for k in ("run", "model", "params", "forward_flops", "n_img", "step", "train_s", "device")} | {
        "engine": engine, "final_total": totals[-1]["loss"] if totals else None,
        "final_flops": totals[-1]["flops"] if totals else None, "n_evals": len(totals)}


def train_ladder(todo: list[tuple[Stage, object]], *, data: str, ds, out: Path, engine: Engine,
                 on_done: Callable[[Stage, dict], None], trainer: str = "ray-train", train_workers: int = 1,
                 max_samples: int | None = None, n_source: int | None = None) -> None:
    """Train the models of `todo` (module docstring). ds: the loaded data (`data` capped at max_samples;
    n_source: the samples `data` holds, to know whether a cap applies). A worker takes the engine's CPUs
    (1 when it names none; also its torch threads, and this process's with the local engine)."""
    if trainer not in TRAINERS:
        raise InputError(f"--trainer: expected one of {', '.join(TRAINERS)}, got {trainer!r}")
    if not todo:
        return

    def finished(stage: Stage, config, result: dict) -> None:
        write_tables(stage.dir, config, result)
        on_done(stage, summary(result, engine.kind))

    cpus = engine.cpus_per_worker or 1
    if engine.kind == "local":
        for stage, cfg in todo:
            log.info("train %s: %d images in batches of %d, into %s", cfg.preset_obj.name, cfg.duration_n_img,
                     cfg.batch_n_img, stage.dir)
            finished(stage, cfg, train_one(cfg, data, max_samples, str(stage.begin()), None, int(cpus)))
        return
    if trainer == "ray-train":
        _ladder_on_ray_train(todo, _worker_data(data, ds, out, max_samples, n_source), engine, train_workers, out,
                             finished)
    else:
        _ladder_as_ray_tasks(todo, data, max_samples, engine, finished)


def _ladder_as_ray_tasks(todo, data: str, max_samples, engine: Engine, finished) -> None:
    import ray

    cpus = engine.cpus_per_worker or 1
    task = ray.remote(train_one).options(num_cpus=cpus, num_gpus=engine.gpus_per_worker or None, max_retries=0)
    pending = {}
    for stage, cfg in reversed(todo):  # largest first: the longest task starts first
        stage.begin()
        ref = task.remote(cfg, data, max_samples, str(stage.dir), engine.device, max(1, int(cpus)))
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


def concurrent_models(engine: Engine, train_workers: int, n_models: int) -> int:
    """How many models of a ladder train at once on Ray Train: as many whole worker groups as the
    cluster's CPUs (and GPUs) hold, at least 1. A worker group started beyond that would wait for
    resources and fail with Ray Train's start-up timeout (a traceback in a normal run) before retrying."""
    import ray

    from lossfloor.ray.cluster import connect

    connect(engine.address)
    total = ray.cluster_resources()
    need = {"CPU": train_workers * (engine.cpus_per_worker or 1)}
    if engine.gpus_per_worker:
        need["GPU"] = train_workers * engine.gpus_per_worker
    fit = min(int(total.get(k, 0.0) // v) for k, v in need.items())
    at_once = max(1, min(n_models, fit))
    log.info("train: %d model(s), %d at a time (the cluster has %s; each model needs %s)", n_models, at_once,
             ", ".join(f"{total.get(k, 0):g} {k}" for k in need), ", ".join(f"{v:g} {k}" for k, v in need.items()))
    return at_once


def _ladder_on_ray_train(todo, source: str, engine: Engine, train_workers: int, out: Path, finished) -> None:
    """Each model by `lossfloor.ray.train.train_on_ray` into its stage folder, as many at once as the
    cluster's resources hold (`concurrent_models`; one driver thread per running model)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from lossfloor.ray.train import train_on_ray
    from lossfloor.train import forward_flops, resolve
    from lossfloor.train.run_folder import read_run_folder

    def one(stage: Stage, cfg) -> dict:
        stage.begin()
        run = train_on_ray(cfg, source, workers=train_workers, gpus_per_worker=engine.gpus_per_worker,
                           cpus_per_worker=engine.cpus_per_worker, storage_path=str(Path(out).absolute()),
                           name=stage.dir.name, address=engine.address)
        folder = read_run_folder(stage.dir)
        curve = folder.curve_rows
        unet = resolve(cfg).unet
        return {"run": curve[-1]["run"], "model": curve[-1]["model"], "params": curve[-1]["params"],
                "forward_flops": forward_flops(unet, cfg.flop_convention), "n_img": curve[-1]["images"],
                "step": curve[-1]["step"], "loss_curve": curve, "table_meta": folder.meta,
                "train_log": folder.log_rows, "train_s": run.wall_s, "device": engine.device}

    at_once = concurrent_models(engine, train_workers, len(todo))
    pool = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="train")
    try:
        futures = {}
        for stage, cfg in reversed(todo):  # largest first
            futures[pool.submit(one, stage, cfg)] = (stage, cfg)
            log.info("train %s: on Ray Train, %d worker(s) (%d images in batches of %d)", cfg.preset_obj.name,
                     train_workers, cfg.duration_n_img, cfg.batch_n_img)
        for future in as_completed(futures):
            stage, cfg = futures[future]
            finished(stage, cfg, future.result())
    except BaseException:
        # stopped (SIGTERM, ^C) or failed: do not wait for the running models here; the caller's Ray
        # shutdown ends them, and each resumes from its newest checkpoint on the next run
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
