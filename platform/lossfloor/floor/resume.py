"""Resumable estimation: a work folder of finished batches' partial sums, shared by every engine.

A batch's partial sums are a pure function of (data, σ grid, resolved config, batch index) (see
`queries`), so finished batches can be kept on disk and a rerun of the same estimate computes only the
missing ones, with the same final numbers. The local engine (`estimate_resumable`) and the Ray engine
(`lossfloor.ray.estimate`) both run through `run_pass`; only the function that turns a list of batch
indices into partials differs.

Work folder layout (one estimate pass per folder; automatic-L passes at 2L, 4L, ... use DIR/L-<L>):

    DIR/key.json               what the partials belong to (config, data fingerprint, σ grid, shape)
    DIR/part-<ns>-<pid>.npz    partials of some batches: batch_index (n,), count (n,), sum_a (n,),
                               sum_a2 (n,), sum_j (n, P), sum_j2 (n, P), sum_ja (n, P) with P = channels
                               × σ, all exact
    DIR/.lock                  held (flock) by the run using the folder

Partials are written as one part per finished batch (`flush_every`; or every `flush_s` seconds, and
when the pass ends or fails), each to a temporary name then renamed, so a killed run leaves only whole
parts and loses at most the unflushed batches. Whenever the folder holds more than `max_parts` parts
(on open or after a flush) they are merged into one (the merged part is written before the others are
removed), so the file count stays at most `max_parts` + 1 whatever the number of batches or restarts.

The local engine keeps a folder only when asked (`--work-dir`); the Ray engine always does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lossfloor.atomic import write_atomic, write_npz
from lossfloor.data.fingerprint import fingerprint
from lossfloor.errors import InputError
from lossfloor.floor.estimators import (
    Estimate,
    EstimatorConfig,
    FloorData,
    Progress,
    batch_terms,
    data_total_variance,
    floor_data,
    merge_estimates,
    needs_larger_subset,
    prepare_data,
    query_plan,
    reduce_estimate,
)
from lossfloor.floor.stats import BatchPartial
from lossfloor.floor.uncertainty import channels
from lossfloor.hashing import config_hash

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
KEY_VERSION = 2  # 2: per-σ channels (bias levels, kNN self-check)
_ARRAYS = ("batch_index", "count", "sum_a", "sum_a2", "sum_j", "sum_j2", "sum_ja")

# (resolved config, σ grid, batch indices to compute) -> partials of exactly those batches, in any order
BatchRunner = Callable[[EstimatorConfig, np.ndarray, Sequence[int]], Iterable[BatchPartial]]
# called on the driver after each new batch is stored (tests use it to interrupt a run)
BatchHook = Callable[[BatchPartial], None]


def work_key(cfg: EstimatorConfig, *, fingerprint: str, sigmas, n_samples: int, dim: int) -> dict:
    """Everything a batch's partial sums depend on, as plain JSON values (cfg resolved)."""
    return {
        "version": KEY_VERSION,
        "fingerprint": fingerprint,
        "n_samples": int(n_samples),
        "dim": int(dim),
        "sigmas": [float(s) for s in np.asarray(sigmas, dtype=np.float64)],
        "estimator": cfg.estimator,
        "subset_size": int(cfg.subset_size),
        "c": float(cfg.c),
        "columns": len(channels(cfg.estimator)) * len(np.asarray(sigmas)),
        "queries_per_sample": cfg.queries_per_sample,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "rows_per_batch": int(cfg.rows_per_batch),
        "rng_device": cfg.rng_device,
        "matmul_precision": cfg.matmul_precision,
        "index": cfg.index,
        "index_pca": cfg.index_pca,
        "shared_draws": cfg.shared_draws,
        "latents": cfg.latents,
        "device_type": "cuda" if cfg.device.startswith("cuda") else "cpu",
    }


def key_hash(key: dict) -> str:
    """16 hex digits naming a work key (e.g. the default work folder)."""
    return config_hash(key, chars=16)


def default_work_dir(parent: str | os.PathLike, key: dict) -> Path:
    """The work folder of an estimate: PARENT/lossfloor-work-<hash of the key>."""
    return Path(parent) / f"lossfloor-work-{key_hash(key)}"


def data_fingerprint(x: torch.Tensor) -> str:
    """The data fingerprint (`lossfloor.data.fingerprint`) of prepared (N, D) CPU data, for callers that
    have no data set's (it differs from the data set's, whose header holds the unflattened shape)."""
    return fingerprint(x.contiguous().numpy())


class PartialStore:
    """The finished batches of one estimate pass in a work folder (see the module docstring).

    Use as a context manager: it locks the folder, loads the finished partials (`done`), and on exit
    writes whatever is still buffered, also when the run fails or is interrupted.
    """

    def __init__(self, path: str | os.PathLike, key: dict, *, flush_every: int = 1, flush_s: float = 10.0,
                 max_parts: int = 32):
        self.path = Path(path)
        self.key = key
        self.flush_every, self.flush_s, self.max_parts = flush_every, flush_s, max_parts
        self.done: dict[int, BatchPartial] = {}
        self._buffer: list[BatchPartial] = []
        self._last_flush = time.monotonic()
        self._lock_fd: int | None = None
        self._parts: list[Path] = []  # the part files in the folder

    # -- opening ---------------------------------------------------------------------------------
    def __enter__(self) -> PartialStore:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"work dir {self.path}: cannot create it ({e.strerror})") from None
        self._lock()
        try:
            self._check_key()
            for tmp in self.path.glob(".tmp-*"):  # left by a run killed mid-write
                tmp.unlink(missing_ok=True)
            for part in sorted(self.path.glob("part-*.npz")):
                partials = self._read_part(part)
                if partials is not None:
                    self._parts.append(part)
                    for p in partials:
                        self.done.setdefault(p.batch_index, p)
            if len(self._parts) > self.max_parts:
                self._compact()
        except BaseException:
            self._unlock()
            raise
        self._last_flush = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.flush()
        finally:
            self._unlock()

    def _lock(self) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"work dir {self.path}: in use by another run (wait for it, or use another --work-dir)") \
                from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_key(self) -> None:
        key_path = self.path / KEY_FILE
        if key_path.exists():
            try:
                old = json.loads(key_path.read_text())
            except (OSError, ValueError):
                raise InputError(f"work dir {self.path}: {KEY_FILE} is unreadable (remove the folder)") from None
            if old != self.key:
                differ = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k))
                raise InputError(
                    f"work dir {self.path}: holds partials of a different estimate ({', '.join(differ)} differ); "
                    "use another --work-dir or remove it"
                )
        else:
            if any(p.name != ".lock" for p in self.path.iterdir()):
                raise InputError(f"work dir {self.path}: not empty and not a lossfloor work folder (no {KEY_FILE}); "
                                 "use a new or empty folder")
            text = json.dumps(self.key, indent=1, allow_nan=True)
            write_atomic(key_path, lambda p: p.write_text(text, encoding="utf-8"))

    def _read_part(self, part: Path) -> list[BatchPartial] | None:
        n_columns = self.key["columns"]
        try:
            with np.load(part) as z:
                arrays = {name: z[name] for name in _ARRAYS}
            if arrays["sum_j"].ndim != 2 or arrays["sum_j"].shape[1] != n_columns:
                raise ValueError("wrong column count")
        except Exception as e:  # numpy/zipfile raise many types for a damaged file
            bad = part.with_suffix(".npz.corrupt")
            log.warning("work dir: %s is unreadable (%s); its batches will be recomputed (kept as %s)",
                        part.name, e.__class__.__name__, bad.name)
            part.rename(bad)
            return None
        return [
            BatchPartial(
                batch_index=int(arrays["batch_index"][i]),
                count=int(arrays["count"][i]),
                sum_a=float(arrays["sum_a"][i]),
                sum_a2=float(arrays["sum_a2"][i]),
                sum_j=arrays["sum_j"][i].copy(),
                sum_j2=arrays["sum_j2"][i].copy(),
                sum_ja=arrays["sum_ja"][i].copy(),
            )
            for i in range(len(arrays["batch_index"]))
        ]

    def _compact(self) -> None:
        """Merge every part into one: write the merged part first, then remove the others."""
        old = self._parts
        self._parts = []
        if self.done:
            self._write_part(sorted(self.done.values(), key=lambda p: p.batch_index))
        for part in old:
            part.unlink(missing_ok=True)
        log.debug("work dir %s: merged %d parts into one", self.path, len(old))

    # -- writing ---------------------------------------------------------------------------------
    def missing(self, n_batches: int) -> list[int]:
        return [b for b in range(n_batches) if b not in self.done]

    def add(self, partial: BatchPartial) -> None:
        assert partial.sum_j.shape == (self.key["columns"],), partial.sum_j.shape
        self.done.setdefault(partial.batch_index, partial)
        self._buffer.append(partial)
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._write_part(self._buffer)
            self._buffer = []
            if len(self._parts) > self.max_parts:  # everything done is on disk now: merge it
                self._compact()
        self._last_flush = time.monotonic()

    def _write_part(self, partials: list[BatchPartial]) -> Path:
        arrays = {
            "batch_index": np.array([p.batch_index for p in partials], dtype=np.int64),
            "count": np.array([p.count for p in partials], dtype=np.int64),
            "sum_a": np.array([p.sum_a for p in partials], dtype=np.float64),
            "sum_a2": np.array([p.sum_a2 for p in partials], dtype=np.float64),
            "sum_j": np.stack([p.sum_j for p in partials]),  # (n, S)
            "sum_j2": np.stack([p.sum_j2 for p in partials]),
            "sum_ja": np.stack([p.sum_ja for p in partials]),
        }
        path = self.path / f"part-{time.time_ns():020d}-{os.getpid()}.npz"
        write_npz(path, arrays)
        self._parts.append(path)
        return path


@dataclass(frozen=True)
class PassStats:
    """What one pass did: batches in the plan, reused from the work folder, computed now."""

    n_batches: int
    reused: int
    computed: int
    wall_s: float
    work_dir: Path | None
    first_batch_s: float | None = None  # from the start of the pass to the first computed batch (start-up)


def run_pass(
    runner: BatchRunner,
    cfg: EstimatorConfig,
    sigmas: np.ndarray,
    n_samples: int,
    *,
    store: PartialStore | None = None,
    progress: bool = True,
    on_batch: BatchHook | None = None,
) -> tuple[list[BatchPartial], PassStats]:
    """All partials of a resolved config: those in `store`, plus the missing ones computed by `runner`."""
    t0 = time.monotonic()
    plan = query_plan(cfg, n_samples)
    done = dict(store.done) if store is not None else {}
    done = {b: p for b, p in done.items() if b < plan.n_batches}
    missing = [b for b in range(plan.n_batches) if b not in done]
    if done:
        log.info("work dir %s: %d of %d batches already done, computing %d",
                 store.path, len(done), plan.n_batches, len(missing))
    total = sum(len(plan.rows(b)) for b in missing) * cfg.queries_per_sample
    bar = None
    first_batch_s = None
    wanted = set(missing)
    for part in runner(cfg, sigmas, missing) if missing else ():
        if part.batch_index not in wanted:
            raise RuntimeError(f"engine returned batch {part.batch_index}, not asked for or already returned")
        wanted.discard(part.batch_index)
        done[part.batch_index] = part
        if store is not None:
            store.add(part)
        if bar is None:  # rate and ETA from the first batch on, so an engine's start-up does not skew them
            first_batch_s = time.monotonic() - t0
            if progress:
                log.info("estimate %s: first batch after %.1f s, %d of %d batches to go",
                         cfg.estimator, first_batch_s, len(wanted), len(missing))
            bar = Progress(f"estimate {cfg.estimator}", total, enabled=progress, already=part.count)
        else:
            bar.update(part.count)
        if on_batch is not None:
            on_batch(part)
    if wanted:
        raise RuntimeError(f"engine did not return {len(wanted)} batches (e.g. batch {min(wanted)})")
    stats = PassStats(plan.n_batches, plan.n_batches - len(missing), len(missing), time.monotonic() - t0,
                      store.path if store is not None else None, first_batch_s)
    return [done[b] for b in range(plan.n_batches)], stats


def local_runner(x: torch.Tensor) -> BatchRunner:
    """The local engine: `batch_terms` for each batch in turn, on x's device.

    The kNN estimator's deduplicated data and index are built once per (index, PCA, seed) and reused by
    every pass; the runner's `timings` holds the index build and search seconds.
    """
    built: dict[tuple, FloorData] = {}

    def run(cfg: EstimatorConfig, sigmas: np.ndarray, batches: Sequence[int]):
        key = (cfg.estimator == "knn", cfg.index, cfg.index_pca, cfg.seed)
        if key not in built:
            built[key] = floor_data(x, cfg)
        data = built[key]
        plan = query_plan(cfg, x.shape[0])
        for b in batches:
            yield batch_terms(data, sigmas, cfg, plan, b)

    def timings() -> dict:
        return {"index_build_s": sum(d.index_build_s for d in built.values()),
                "search_s": sum(d.search_s for d in built.values())}

    run.timings = timings
    return run


def check_sigmas(sigmas) -> np.ndarray:
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or len(sigmas) == 0 or not np.all(np.isfinite(sigmas)) or np.any(sigmas <= 0):
        raise InputError(f"sigmas: expected a non-empty list of positive numbers, got {sigmas.tolist()!r}")
    return sigmas


@dataclass(frozen=True)
class ResumableRun:
    estimate: Estimate
    passes: tuple[PassStats, ...]  # one per subset size L (several with rel_error)

    @property
    def computed(self) -> int:
        return sum(p.computed for p in self.passes)

    @property
    def reused(self) -> int:
        return sum(p.reused for p in self.passes)


def estimate_passes(
    shape: tuple[int, int],
    sigmas: np.ndarray,
    cfg: EstimatorConfig,
    runner: BatchRunner,
    *,
    tv: float,
    fingerprint: str,
    work_dir: str | os.PathLike | None = None,
    work_parent: str | os.PathLike | None = None,
    resolve: Callable[[EstimatorConfig], EstimatorConfig],
    progress: bool = True,
    on_batch: BatchHook | None = None,
) -> ResumableRun:
    """The engine-independent part of an estimate: its passes, resumable.

    shape: (N, D) of the prepared data; cfg: resolved; resolve: resolves a config for this data and
    engine (for the larger L of automatic-L passes). One pass at cfg's L over every σ; with
    cfg.rel_error, more passes at 2L, 4L, ... over the σ whose bias allowance is still above
    rel_error·J* (at L = N the pass is exact). Pass i keeps its batches in WORK_DIR (i = 0) or
    WORK_DIR/L-<L>. Without work_dir and work_parent nothing is kept on disk.
    """
    n, d = shape
    key = work_key(cfg, fingerprint=fingerprint, sigmas=sigmas, n_samples=n, dim=d)
    if work_dir is None and work_parent is not None:
        work_dir = default_work_dir(work_parent, key)
    todo = np.arange(len(sigmas))
    parts, passes = [], []
    c = cfg
    t0 = time.monotonic()
    while True:
        sig = sigmas[todo]
        if work_dir is None:
            store_cm = contextlib.nullcontext(None)
        else:
            first = not passes
            path = Path(work_dir) if first else Path(work_dir) / f"L-{c.subset_size}"
            k = key if first else work_key(c, fingerprint=fingerprint, sigmas=sig, n_samples=n, dim=d)
            store_cm = PartialStore(path, k)
        with store_cm as store:
            partials, stats = run_pass(runner, c, sig, n, store=store, progress=progress, on_batch=on_batch)
        est = reduce_estimate(partials, sig, c, tv)
        passes.append(stats)
        if stats.work_dir is not None:
            log.info("work dir %s: %d batches computed, %d reused", stats.work_dir, stats.computed, stats.reused)
        if cfg.rel_error is None or c.estimator == "exact":
            parts.append((est, todo))
            break
        more = needs_larger_subset(est, cfg.rel_error)
        parts.append((_take(est, ~more), todo[~more]))
        if not more.any():
            break
        todo = todo[more]
        c = resolve(replace(cfg, subset_size=min(2 * c.subset_size, n), rows_per_batch=None, c=None
                            if cfg.c is None else cfg.c))
        log.info("automatic L: %d σ above %.3g relative error, next pass at L = %s",
                 len(todo), cfg.rel_error, c.subset_size if c.estimator != "exact" else f"N ({c.estimator})")
    timings = getattr(runner, "timings", dict)()
    timings["total_s"] = time.monotonic() - t0
    est = merge_estimates(parts, sigmas)
    return ResumableRun(replace(est, timings=timings), tuple(passes))


def _take(est: Estimate, keep: np.ndarray) -> Estimate:
    cols = ("sigmas", "j_star", "stderr", "bias", "ci_low", "ci_high", "allowance", "subset_size")
    return replace(est, **{name: getattr(est, name)[keep] for name in cols})


def estimate_resumable(
    samples,
    sigmas,
    config: EstimatorConfig | None = None,
    *,
    fingerprint: str | None = None,
    work_dir: str | os.PathLike | None = None,
    work_parent: str | os.PathLike | None = None,
    progress: bool = True,
    on_batch: BatchHook | None = None,
) -> ResumableRun:
    """Estimate J*(σ) (x0 target, VE coordinates) of samples (N, ...) for every σ, on this process.

    work_dir: keep finished batches there, so a rerun computes only the missing ones (the same numbers);
    or work_parent: the folder's parent, the folder being named by a hash of the config, data
    fingerprint and σ grid; neither: nothing on disk. fingerprint: the data set's (default: a hash of
    the samples).
    """
    config = config or EstimatorConfig()
    sigmas = check_sigmas(sigmas)
    x = prepare_data(samples, replace(config, device="cpu"))  # `floor_data` moves it to the device if it fits
    cfg = config.resolve(x.shape[0], x.shape[1])
    if fingerprint is None:
        fingerprint = data_fingerprint(x.cpu())
    return estimate_passes(
        tuple(x.shape), sigmas, cfg, local_runner(x),
        tv=data_total_variance(x, cfg), fingerprint=fingerprint, work_dir=work_dir, work_parent=work_parent,
        resolve=lambda c: c.resolve(x.shape[0], x.shape[1]), progress=progress, on_batch=on_batch,
    )


def estimate(samples, sigmas, config: EstimatorConfig | None = None, *, progress: bool = True) -> Estimate:
    """Estimate J*(σ) (x0 target, VE coordinates) of a data set for every σ in `sigmas` (nothing on disk).

    samples: (N, ...) array or tensor, one sample per leading index, used as given.
    """
    return estimate_resumable(samples, sigmas, config, fingerprint="", progress=progress).estimate
