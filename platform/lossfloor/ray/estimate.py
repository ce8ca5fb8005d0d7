"""`lossfloor estimate --engine ray`: the estimators' batches through Ray Data on an actor pool.

The plan (one Ray Data pipeline per estimate pass):

    from_items([batch indices still missing], one block per task)
      → map_batches(FloorWorker, compute=ActorPoolStrategy(size=workers), batch_size=batches_per_task)
          each actor sees the whole prepared (N, D) data set (references are drawn from all N samples),
          one host copy per node, and runs the core's `batch_terms` for every batch index it is handed
      → per-batch partial sums as plain columns → iterated on the driver
      → stored in the work folder as they arrive (resumable) → reduced in batch order.

A Ray row is a whole lossfloor batch (its index), so a batch is never split across Ray batches whatever
Ray does with blocks. Every batch's randomness comes from (seed, batch index) in the core, never from
the worker, so 1 or 2 workers give the local engine's numbers. Workers only compute: the work folder,
progress and MLflow are the driver's. The class-conditional floor (`labels`, `lossfloor.floor.conditional`)
is one pass over every class's batches, numbered class after class: the classes spread over the pool's
actors, an actor making a class's data (knn: its index) when the first batch of that class reaches it.

The data reach the actors once per node, never once per actor:
- an in-memory array: through the object store (`ray.put` on the driver; each node fetches it once and
  its actors read it zero-copy);
- a shard folder (`lossfloor data prepare`, on storage every node can read): the driver never holds the
  data. J*(inf) and the NaN/inf check come from Ray Data (read_parquet -> map_batches of per-block
  moments -> merged on the driver); the first actor of each node reads the shards block by block into
  the node's cache file (`lossfloor.data.node_cache`) and every actor of the node maps it read-only
  (ImageNet-512 latents, 1.28M x 16384 float32 = 84 GB, do not fit the object store of most nodes).
knn's distinct points and FAISS index are likewise made once per node and mapped by its actors.
On a GPU the data move to the device when they fit next to a batch (`floor.batch.floor_data`,
`max_device_gb`); otherwise they stay in host memory and each batch gathers its rows onto the GPU, so an
actor's device memory is its batch working set, whatever N is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray
import torch

from lossfloor.data import read_meta, read_shard_rows, shard_paths
from lossfloor.data.fingerprint import labels_fingerprint
from lossfloor.data.node_cache import NodeCache, read_only_tensor, shard_matrix
from lossfloor.data.shards import is_plain_shard_dir
from lossfloor.errors import InputError
from lossfloor.floor import Estimate, EstimatorConfig, batch_terms, floor_data, prepare_data, query_plan
from lossfloor.floor.batch import data_mean_square, data_scale, data_total_variance, divided, scale_of_rms
from lossfloor.floor.classes import (
    ClassBatches,
    ClassPlan,
    class_mean_squares,
    class_plan,
    class_total_variances,
)
from lossfloor.floor.conditional import conditional_passes
from lossfloor.floor.config import default_rows_per_batch
from lossfloor.floor.estimate import BatchHook, check_sigmas, estimate_passes, rescaled
from lossfloor.floor.resume import data_fingerprint
from lossfloor.floor.stats import FIELDS, BatchPartial
from lossfloor.ray.cluster import connect

log = logging.getLogger(__name__)

MAX_BLOCKS = 8192  # one block per task up to this many (more tasks share blocks)
TASKS_PER_WORKER = 16  # see `batches_per_task`
MAX_BATCHES_PER_TASK = 8
_COLUMNS = (*FIELDS, "kernel_s", "search_s", "index_build_s")
_TIMES = ("kernel_s", "search_s", "index_build_s")


@dataclass(frozen=True)
class RayRun:
    """An estimate from the Ray engine, with where its time went (for the benchmark and the log)."""

    result: Estimate
    connect_s: float  # starting or attaching the Ray cluster
    shutdown_s: float  # stopping the local Ray instance this call started (0 when it attached)
    kernel_times: tuple[float, ...]  # seconds inside `batch_terms` in the workers, per computed batch
    workers: int
    search_s: float = 0.0  # knn: seconds the workers spent searching their neighbour indexes (in kernel_s)
    index_build_s: float = 0.0  # knn: seconds the workers spent building them, all workers together

    @property
    def kernel_s(self) -> float:
        return float(sum(self.kernel_times))


class FloorWorker:
    """The actor of the pool: the data set on its device (and, for knn, its index), and `batch_terms` for
    each batch index.

    data: ("ref", [object ref of the prepared (N, D) array]) or ("shards", (folder, scale)) for a shard
    folder, mapped from this node's cache (`lossfloor.data.node_cache`, written by the node's first actor)
    and divided by scale (`lossfloor.floor.batch.data_scale`).
    fingerprint: the data set's, naming its node cache entries (knn's distinct points and index).
    classes: the ClassPlan of a class-conditional estimate (then every batch is one class's, `ClassBatches`).
    """

    def __init__(self, data: tuple, fingerprint: str, sigmas: np.ndarray, cfg: EstimatorConfig, threads: int,
                 classes: ClassPlan | None = None):
        torch.set_num_threads(threads)
        kind, where = data
        cache = NodeCache(fingerprint)
        if kind == "ref":
            arr = ray.get(where[0])  # (N, D), read-only and zero-copy on this node
        else:
            arr = shard_matrix(where[0], cache)
        x = read_only_tensor(arr)
        if kind == "shards" and where[1] != 1:
            x = x / where[1]  # data far from unit scale (`batch.data_scale`): a private copy
        if x.dtype != getattr(torch, cfg.dtype):
            x = x.to(getattr(torch, cfg.dtype))  # a float64 reference run: a private copy
        if classes is None:
            plan = query_plan(cfg, x.shape[0])
            data = floor_data(x, cfg, cache=cache)  # on the GPU if it fits; knn's points and index per node
            self.batch = lambda b: batch_terms(data, sigmas, cfg, plan, b)
            self.times = lambda: (data.index_build_s, data.search_s)
        else:
            batches = ClassBatches(x, classes)
            self.batch = lambda b: batches.terms(sigmas, b)
            self.times = lambda: (batches.index_build_s, batches.search_s)
        self.reported = (0.0, 0.0)  # index build and search seconds reported so far

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {name: [] for name in _COLUMNS}
        for b in batch["batch_index"]:
            t0 = time.perf_counter()
            part = self.batch(int(b))  # returns host arrays (synced)
            out["kernel_s"].append(time.perf_counter() - t0)
            times = self.times()
            out["index_build_s"].append(times[0] - self.reported[0])
            out["search_s"].append(times[1] - self.reported[1])
            self.reported = times
            for name in _COLUMNS[:-3]:
                out[name].append(getattr(part, name))
        return {name: np.asarray(values) for name, values in out.items()}  # sum_*: (n, S) float64


def _shard_folder(samples) -> Path | None:
    """The folder when `samples` names a `lossfloor data prepare` shard folder (a str or path), else None."""
    if isinstance(samples, (str, os.PathLike)) and is_plain_shard_dir(Path(samples)):
        return Path(samples).expanduser().absolute()  # workers may run on other nodes: shared storage
    return None


def _moments(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per block of shard rows: first index, count, mean (D,) and M2 = sum ||x - mean||^2, in float64."""
    rows = read_shard_rows(batch)
    x = rows.x.astype(np.float64)
    mean = x.mean(0)
    return {"first": rows.index[:1], "count": np.array([len(x)]), "mean": mean[None],
            "m2": np.array([((x - mean) ** 2).sum()]), "finite": np.array([bool(np.isfinite(x).all())])}


def shard_total_variance(folder: Path) -> tuple[float, float]:
    """J*(inf) = E||x - E x||^2 of a shard folder through Ray Data (read_parquet -> map_batches -> per-block
    moments, merged in index order with Chan et al.'s pairwise update), and E||x||^2; also refuses NaN/inf
    values."""
    ds = ray.data.read_parquet([str(p) for p in shard_paths(folder)]).select_columns(["index", "x"])
    parts = []
    for b in ds.map_batches(_moments, batch_size=None, batch_format="numpy").iter_batches(
            batch_size=None, batch_format="numpy"):
        parts += [(int(b["first"][i]), int(b["count"][i]), np.asarray(b["mean"][i], np.float64), float(b["m2"][i]),
                   bool(b["finite"][i])) for i in range(len(b["first"]))]
    parts.sort(key=lambda p: p[0])  # a fixed merge order: the same float64 result on every run
    if not all(p[4] for p in parts):
        raise InputError(f"--data {folder}: contains NaN or infinite values")
    n, mean, m2 = 0, None, 0.0
    for _, nb, mb, m2b, _ in parts:
        if mean is None:
            n, mean, m2 = nb, mb, m2b
            continue
        delta = mb - mean
        m2 += m2b + float(delta @ delta) * n * nb / (n + nb)
        mean = mean + delta * nb / (n + nb)
        n += nb
    return m2 / n, m2 / n + float(mean @ mean)


def _partials(columns: dict[str, np.ndarray]) -> list[tuple[BatchPartial, dict]]:
    return [
        (
            BatchPartial.from_dict({name: columns[name][i] for name in FIELDS}),
            {name: float(columns[name][i]) for name in _TIMES},
        )
        for i in range(len(columns["batch_index"]))
    ]


def batches_per_task(n_batches: int, workers: int) -> int:
    """Estimator batches per Ray task: about TASKS_PER_WORKER tasks per worker, at most MAX_BATCHES_PER_TASK.

    Each Ray task costs ~20-30 ms of scheduling and transfer; handing a worker several batches at once
    amortises that, while enough tasks per worker keep the pool balanced, the progress line moving and
    the work lost to a kill (at most one task per worker) small.
    """
    return max(1, min(MAX_BATCHES_PER_TASK, n_batches // (TASKS_PER_WORKER * workers)))


class _RayRunner:
    """The `BatchRunner` of the Ray engine (see `lossfloor.floor.estimate.run_pass`)."""

    def __init__(self, data: tuple, fingerprint: str, engine, cpus_per_worker: float, classes: ClassPlan | None = None):
        self.data, self.fingerprint, self.engine, self.cpus = data, fingerprint, engine, cpus_per_worker
        self.classes = classes
        self.kernel_times: list[float] = []  # seconds in `batch_terms` per computed batch, arrival order
        self.search_s = self.index_build_s = 0.0

    def timings(self) -> dict:
        return {"index_build_s": self.index_build_s, "search_s": self.search_s}

    def __call__(self, cfg: EstimatorConfig, sigmas: np.ndarray, batches: Sequence[int]):
        per_task = batches_per_task(len(batches), self.engine.workers)
        n_tasks = math.ceil(len(batches) / per_task)
        ds = ray.data.from_items(
            [{"batch_index": int(b)} for b in batches], override_num_blocks=min(n_tasks, MAX_BLOCKS)
        )
        out = ds.map_batches(
            FloorWorker,
            batch_size=per_task,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(self.engine.workers, len(batches))),
            num_cpus=self.cpus,
            num_gpus=self.engine.gpus_per_worker or None,
            fn_constructor_kwargs={
                "data": self.data,  # a reference inside a tuple reaches the actor as the reference itself
                "fingerprint": self.fingerprint,
                "sigmas": sigmas,
                "cfg": cfg,
                "threads": max(1, int(self.cpus)),
                "classes": self.classes,
            },
        )
        it = iter(out.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0))
        try:
            for columns in it:
                for part, times in _partials(columns):
                    self.kernel_times.append(times["kernel_s"])
                    self.search_s += times["search_s"]
                    self.index_build_s += times["index_build_s"]
                    yield part
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # stops the pipeline and its actors when the driver stops early


@contextlib.contextmanager
def _quiet_ray_data():
    """No Ray Data progress bars or console INFO/WARNING lines (kept in its ray-data.log) during a run:
    the lossfloor progress line (rate and ETA) replaces them. Errors still show."""
    ctx = ray.data.DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in ("enable_progress_bars", "print_on_execution_start")}
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    console = [h for h in logging.getLogger("ray.data").handlers if not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in console]
    for h in console:
        h.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        for h, level in zip(console, levels):
            h.setLevel(level)


def _default_cpus_per_worker(workers: int) -> float:
    """The cluster's CPUs shared by the workers, at most one node's CPUs, at least 1."""
    total = ray.cluster_resources().get("CPU", 1.0)
    per_node = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=total)
    return float(max(1, min(int(total) // workers, int(per_node))))


def resolve_for(config: EstimatorConfig, n_samples: int, dim: int, device: str) -> EstimatorConfig:
    """Resolve a config on a driver that may have no GPU, for workers computing on `device`."""
    cfg = replace(config, device="cpu").resolve(n_samples, dim, compute_device=device)
    if device != "cpu" and config.rows_per_batch is None:  # the default batch is sized for the device
        cfg = replace(cfg, rows_per_batch=default_rows_per_batch(replace(cfg, device=device), n_samples, dim))
    return replace(cfg, device=device)


def estimate_ray(
    samples,
    sigmas,
    config: EstimatorConfig | None = None,
    *,
    engine,
    labels=None,
    fingerprint: str | None = None,
    work_dir=None,
    work_parent=None,
    progress: bool = True,
    on_batch: BatchHook | None = None,
) -> RayRun:
    """`lossfloor.floor.estimate` on Ray: the same numbers for the same config and seed.

    samples: an (N, ...) array (prepared here and handed to the workers through the object store), or
      the path of a `lossfloor data prepare` shard folder on storage every worker can read: then this
      process reads only meta.json, J*(inf) comes from a Ray Data pass over the shards, and each worker
      reads the shards into its own device memory (one shard block of host memory at a time).

    engine: a `lossfloor.jobs.engine.Engine` of kind ray, as it is (checked there): the cluster (`address`:
      an existing one, "auto", "ray://host:10001", "host:6379"; None: the Ray instance this process already
      has, else a local one, attached if `ray start` runs here, else started), `workers` actors each
      computing whole batches, `gpus_per_worker` (> 0: the kernel runs on CUDA) and `cpus_per_worker`
      (also the actors' torch threads; None: the cluster's CPUs / workers).
    The kernel runs on engine.device (config.device must agree: cuda needs gpus_per_worker > 0).
    work_dir / work_parent: the resumable work folder (see `lossfloor.floor.estimate.estimate`).
    labels: (N,) integer class labels of an array's samples: the class-conditional floor
      (`lossfloor.floor.conditional`), its classes spread over the actors.
    """
    config = config or EstimatorConfig()
    if config.device.startswith("cuda") and engine.device == "cpu":
        raise InputError("--device cuda with --engine ray: give the workers GPUs with --gpus-per-worker 1")
    sigmas = check_sigmas(sigmas)
    shards = _shard_folder(samples)
    started, connect_s = connect(engine.address)
    try:
        with _quiet_ray_data():
            if shards is not None and labels is not None:
                raise InputError(f"--conditional: the Ray engine reads the classes from an array, not a shard folder "
                                 f"({shards}); load the data (`lossfloor.data.load`) and pass its samples and labels")
            if shards is not None and config.latents == "posterior":
                raise InputError(f"--latents posterior: not for shard folders ({shards}); give the EDM2 latents "
                                 "zip or folder")
            if shards is not None:  # the workers read the shards; the driver never holds the data
                meta = read_meta(shards)
                n, d = meta.count, meta.dim
                fingerprint = fingerprint or meta.fingerprint
                tv, mean_square = shard_total_variance(shards)
                scale = scale_of_rms(math.sqrt(mean_square / d))
                tv, mean_square = tv / (scale * scale), mean_square / (scale * scale)
                data = ("shards", (str(shards), scale))
            else:
                scale = data_scale(samples)
                x = prepare_data(divided(samples, scale), replace(config, device="cpu"))  # (N, D) on the driver
                n, d = x.shape
                fingerprint = fingerprint or data_fingerprint(x)
                tv, mean_square = data_total_variance(x, config), data_mean_square(x, config)
                data = ("ref", [ray.put(x.numpy())])
            classes = None
            if labels is not None:
                labels = np.asarray(labels)
                if labels.shape != (n,):
                    raise InputError(f"labels: expected one label per sample, shape ({n},), got shape {labels.shape}")
                classes = class_plan(labels, config, d, lambda c, n_c: resolve_for(c, n_c, d, engine.device))
                cfg = classes.configs[classes.main]
            else:
                cfg = resolve_for(config, n, d, engine.device)
            cpus = engine.cpus_per_worker
            if cpus is None:
                cpus = _default_cpus_per_worker(engine.workers)
            runner = _RayRunner(data, fingerprint, engine, cpus, classes)
            log.info("ray engine: %d worker(s) x %g CPU%s, %s", engine.workers, cpus,
                     f" x {engine.gpus_per_worker:g} GPU" if engine.gpus_per_worker else "", cfg.device)
            if classes is not None:
                result = conditional_passes(
                    classes, d, sigmas / scale, runner, tvs=class_total_variances(x, classes, config),
                    mean_as=class_mean_squares(x, classes, config),
                    fingerprint=fingerprint, labels=labels_fingerprint(labels), work_dir=work_dir,
                    work_parent=work_parent, progress=progress, on_batch=on_batch,
                )
            else:
                result = estimate_passes(
                    (n, d), sigmas / scale, cfg, runner,
                    tv=tv, mean_a=mean_square, fingerprint=fingerprint, work_dir=work_dir, work_parent=work_parent,
                    resolve=lambda c: resolve_for(c, n, d, engine.device), progress=progress, on_batch=on_batch,
                )
    finally:
        t_stop = time.monotonic()
        if started:
            ray.shutdown()
        shutdown_s = time.monotonic() - t_stop
    return RayRun(result=rescaled(result, scale, sigmas), connect_s=connect_s, shutdown_s=shutdown_s, kernel_times=tuple(runner.kernel_times),
                  workers=engine.workers, search_s=runner.search_s, index_build_s=runner.index_build_s)
