"""Estimating J*(σ): the passes over a config's batches, their reduction, and `estimate()`.

    est = estimate(samples, sigmas, EstimatorConfig())              # nothing on disk
    est = estimate(samples, sigmas, cfg, work_dir="work")           # a rerun computes only missing batches
    est.j_star, est.ci_low, est.ci_high, est.passes[0].computed

J*(σ) = E||x0||² - E||E[x0|x_σ]||² (paper Theorem 1) is estimated from the terms of M = kN queries
(`queries`, `batch`), with ||x_s||² as a control variate of known mean (`stats`). A pass computes every batch of one resolved config: the batches already in the
work folder are read back (`resume`), the others come from a runner that turns batch indices into
partial sums — `local_runner` on this process, or the Ray engine's (`lossfloor.ray.estimate`) — and the
partials reduce to each channel's mean and standard error (`stats`), then to J*, its bias allowance and
95 % interval per σ (`uncertainty`).

A precision target R (`rel_error`) asks that the 95 % interval's half-width, allowance + t·stderr, be at
most R·J* at every σ where J* > 1e-3·J*(∞) (`precision_met`). A pass at one L runs in rounds over the
first M queries of the seeded order (`queries`): M starts at max(FIRST_QUERIES, one batch) and, while
some σ whose allowance is within R·J*/2 still has t·stderr > R·J* - allowance, grows to at least 2M
(to the M its 1/√M error predicts, whole batches) up to the budget `queries` (default kN). Each round
reuses the previous rounds' batches. Then the σ whose allowance exceeds R·J*/2 get a pass at 2L (4L,
... until the allowance fits or L = N, the exact estimator), starting at the M reached; each σ keeps
the estimate of the last pass that ran it. σ still short of R at the budget are flagged (`Estimate.met`).
Growing M at least twofold keeps the looks at the data few (log₂ of the budget), so the interval after
the last look stays honest (`tests/test_query_budget.py` checks its coverage).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from lossfloor.errors import InputError
from lossfloor.floor.batch import (
    FloorData,
    batch_terms,
    data_mean_square,
    data_scale,
    data_total_variance,
    divided,
    floor_data,
    prepare_data,
    query_plan,
)
from lossfloor.floor.config import EstimatorConfig
from lossfloor.floor.resume import PartialStore, data_fingerprint, default_work_dir, work_key
from lossfloor.floor.stats import BatchPartial, reduce_partials
from lossfloor.floor.uncertainty import bias_and_interval, channels, t_quantile

log = logging.getLogger(__name__)

# (resolved config, σ grid, batch indices to compute) -> partials of exactly those batches, in any order
BatchRunner = Callable[[EstimatorConfig, np.ndarray, Sequence[int]], Iterable[BatchPartial]]
# called on the driver after each new batch is stored (tests use it to interrupt a run)
BatchHook = Callable[[BatchPartial], None]


class Progress:
    """A periodic log line with rate and ETA (every `every_s` seconds and at the end).

    already: units done before the clock starts (counted in the line, not in the rate: e.g. the first
    batch, whose time includes an engine's start-up).
    """

    def __init__(self, label: str, total: int, unit: str = "queries", every_s: float = 2.0, enabled: bool = True,
                 already: int = 0):
        self.label, self.total, self.unit, self.every_s, self.enabled = label, total, unit, every_s, enabled
        self.done = self.already = already
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            rate = (self.done - self.already) / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info(
                "%s: %d/%d %s (%.0f%%), %.0f %s/s, ETA %s",
                self.label, self.done, self.total, self.unit, 100.0 * self.done / max(self.total, 1),
                rate, self.unit, time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?",
            )


# ---------------------------------------------------------------------------------------------------
# The estimate and its reduction


@dataclass(frozen=True)
class PassStats:
    """What one pass did: batches in the plan, reused from the work folder, computed now."""

    n_batches: int
    reused: int
    computed: int
    wall_s: float
    work_dir: Path | None
    first_batch_s: float | None = None  # from the start of the pass to the first computed batch (start-up)


@dataclass(frozen=True)
class Estimate:
    """J*(σ) in x0 units from one estimator run, with its uncertainty (see `uncertainty`).

    bias, ci_low, ci_high: per σ, x0 units. subset_size, queries: the L and M used per σ (they vary with
    rel_error); n_queries: the largest M.
    timings: seconds spent building the neighbour index and searching it (knn), and in total.
    passes: what each pass did (one per L; several with rel_error): batches computed and reused.
    dof: degrees of freedom of the standard error (per σ for the class-conditional floor).
    classes: the class-conditional floor's classes (`lossfloor.floor.conditional`), one dict each (label, n,
      estimator, subset_size); () for the floor of the data without labels. labels_fingerprint: then the
      fingerprint of the label vector (`lossfloor.data.fingerprint.labels_fingerprint`).
    """

    sigmas: np.ndarray
    j_star: np.ndarray
    stderr: np.ndarray
    bias: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    allowance: np.ndarray
    total_variance: float  # J*(∞) = E||x0 - E x0||²
    config: EstimatorConfig  # resolved (the first pass's, with rel_error)
    n_queries: int
    n_batches: int
    subset_size: np.ndarray
    queries: np.ndarray | None = None  # M per σ (default n_queries everywhere)
    met: np.ndarray | None = None  # per σ whether the precision target (rel_error) holds; None without one
    timings: dict = field(default_factory=dict)
    passes: tuple[PassStats, ...] = ()
    dof: int | np.ndarray = 1
    classes: tuple[dict, ...] = ()
    labels_fingerprint: str = ""

    @property
    def class_conditional(self) -> bool:
        """J* = Σ_c π_c J*_c, the floor of a model that sees the class labels."""
        return bool(self.classes)

    @property
    def computed(self) -> int:
        """Batches computed by this run, over all passes."""
        return sum(p.computed for p in self.passes)

    @property
    def reused(self) -> int:
        """Batches read back from work folders, over all passes."""
        return sum(p.reused for p in self.passes)


def reduce_estimate(partials, sigmas, cfg: EstimatorConfig, tv: float, mean_a: float | None = None,
                    timings: dict | None = None) -> Estimate:
    """Reduce a pass's partials to J*, its standard error, bias and interval per σ (mean_a: the data's
    E||x0||², the control variate's mean, `stats.reduce_partials`)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    red = reduce_partials(partials, mean_a=mean_a)
    n_ch = len(channels(cfg.estimator))
    means = red.j_star.reshape(n_ch, len(sigmas))  # (C, S)
    errs = red.stderr.reshape(n_ch, len(sigmas))
    u = bias_and_interval(cfg.estimator, means, errs, red.dof, tv)
    return Estimate(
        sigmas=sigmas, j_star=u.j_star, stderr=errs[0], bias=u.bias, ci_low=u.ci_low, ci_high=u.ci_high,
        allowance=np.maximum(u.lo, u.hi),
        total_variance=tv, config=cfg, n_queries=red.n_queries, n_batches=red.n_batches,
        subset_size=np.full(len(sigmas), cfg.subset_size, dtype=np.int64), timings=dict(timings or {}),
        queries=np.full(len(sigmas), red.n_queries, dtype=np.int64),
        dof=red.dof,
    )


def rescaled(est: Estimate, scale: float, sigmas: np.ndarray) -> Estimate:
    """The estimate of data divided by `scale` (at σ/scale) in the data's own units: J*(σ; x) =
    scale² J*(σ/scale; x/scale) for J* and every column of its uncertainty (`batch.data_scale`)."""
    if scale == 1:
        return est
    s2 = scale * scale
    cols = ("j_star", "stderr", "bias", "ci_low", "ci_high", "allowance")
    return replace(est, sigmas=np.asarray(sigmas, dtype=np.float64), total_variance=est.total_variance * s2,
                   **{name: getattr(est, name) * s2 for name in cols})


FIRST_QUERIES = 1024  # a precision target's first round (at least one batch)
USEFUL = 1e-3  # the target holds where J* > USEFUL·J*(∞)


def half_width(est: Estimate) -> np.ndarray:
    """The 95 % interval's half-width before clipping to [0, J*(∞)]: allowance + t·stderr, per σ."""
    return est.allowance + t_quantile(est.dof) * est.stderr


def needs_larger_subset(est: Estimate, rel_error: float) -> np.ndarray:
    """Per σ: the bias allowance exceeds half the target, rel_error·J*/2, where J* > USEFUL·J*(∞)."""
    return (est.j_star > USEFUL * est.total_variance) & (est.allowance > 0.5 * rel_error * np.abs(est.j_star))


def precision_met(est: Estimate, rel_error: float) -> np.ndarray:
    """Per σ: the half-width is at most rel_error·J*, or J* ≤ USEFUL·J*(∞) (no target there)."""
    return (est.j_star <= USEFUL * est.total_variance) | (half_width(est) <= rel_error * np.abs(est.j_star))


def queries_needed(est: Estimate, rel_error: float, short: np.ndarray) -> int:
    """The M at which the Monte-Carlo part t·stderr (∝ 1/√M) of the σ in `short` would fit R·J* - allowance."""
    room = rel_error * np.abs(est.j_star[short]) - est.allowance[short]
    ratio = (t_quantile(est.dof) * est.stderr[short]) / np.maximum(room, 1e-300)
    return int(min(np.max(est.n_queries * ratio**2), 2.0**62))


def _take(est: Estimate, keep: np.ndarray) -> Estimate:
    """The estimate at the σ where `keep` is True."""
    cols = ("sigmas", "j_star", "stderr", "bias", "ci_low", "ci_high", "allowance", "subset_size", "queries")
    return replace(est, **{name: getattr(est, name)[keep] for name in cols},
                   met=None if est.met is None else est.met[keep])


def merge_estimates(parts: list[tuple[Estimate, np.ndarray]], sigmas: np.ndarray) -> Estimate:
    """One estimate from passes over parts of the σ grid: (estimate of the pass, the grid positions it gives)."""
    first = parts[0][0]
    cols = {name: np.empty(len(sigmas)) for name in ("j_star", "stderr", "bias", "ci_low", "ci_high", "allowance")}
    L = np.empty(len(sigmas), dtype=np.int64)
    M = np.empty(len(sigmas), dtype=np.int64)
    timings: dict = {}
    met = None if first.met is None else np.empty(len(sigmas), dtype=bool)
    for est, where in parts:
        for name in cols:
            cols[name][where] = getattr(est, name)
        L[where] = est.subset_size
        M[where] = est.queries
        if met is not None:
            met[where] = est.met
        for k, v in est.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return replace(first, sigmas=np.asarray(sigmas, dtype=np.float64), subset_size=L, queries=M, met=met,
                   n_queries=int(M.max()), timings=timings, **cols)


# ---------------------------------------------------------------------------------------------------
# Passes and the local runner


def run_pass(
    runner: BatchRunner,
    cfg: EstimatorConfig,
    sigmas: np.ndarray,
    plan,
    *,
    store: PartialStore | None = None,
    progress: bool = True,
    on_batch: BatchHook | None = None,
    reuse: dict[int, BatchPartial] | None = None,
) -> tuple[list[BatchPartial], PassStats]:
    """All partials of a resolved config: those in `store` or `reuse` (batch index -> partial, e.g. the
    previous rounds' of a precision target), plus the missing ones computed by `runner`.

    plan: the pass's batches (`query_plan`, or a `classes.ClassPlan`): n_batches, queries(b)."""
    t0 = time.monotonic()
    done = dict(store.done) if store is not None else {}
    if reuse is not None:
        done.update(reuse)
    # a batch counts when it holds the plan's queries (a smaller budget's last batch may be short)
    done = {b: p for b, p in done.items() if b < plan.n_batches and p.count == len(plan.queries(b))}
    missing = [b for b in range(plan.n_batches) if b not in done]
    if done and store is not None:
        log.info("work dir %s: %d of %d batches already done, computing %d",
                 store.path, len(done), plan.n_batches, len(missing))
    total = sum(len(plan.queries(b)) for b in missing)
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


def _computed(data: FloorData, sigmas: np.ndarray, cfg: EstimatorConfig, batches: Iterable[int]) -> Iterator[BatchPartial]:
    """The partials of the given batches, computed in turn on this process."""
    plan = query_plan(cfg, data.x.shape[0])
    for b in batches:
        yield batch_terms(data, sigmas, cfg, plan, b)


def run_batches(
    data: FloorData | torch.Tensor, sigmas: np.ndarray, cfg: EstimatorConfig, batches=None, *, progress: bool = True
) -> list[BatchPartial]:
    """Compute the partials of the given batches (default: all) for a resolved config, nothing on disk."""
    if isinstance(data, torch.Tensor):
        data = floor_data(data, cfg)
    plan = query_plan(cfg, data.x.shape[0])
    batches = range(plan.n_batches) if batches is None else batches
    bar = Progress(f"estimate {cfg.estimator}", sum(len(plan.queries(b)) for b in batches), enabled=progress)
    out = []
    for part in _computed(data, sigmas, cfg, batches):
        out.append(part)
        bar.update(part.count)
    return out


def local_runner(x: torch.Tensor) -> BatchRunner:
    """The local engine: `batch.batch_terms` for each batch in turn, on x's device.

    The kNN estimator's deduplicated data and index are built once per (index, PCA, seed) and reused by
    every pass; the runner's `timings` holds the index build and search seconds.
    """
    built: dict[tuple, FloorData] = {}

    def run(cfg: EstimatorConfig, sigmas: np.ndarray, batches: Sequence[int]):
        key = (cfg.estimator == "knn", cfg.index, cfg.index_pca, cfg.seed)
        if key not in built:
            built[key] = floor_data(x, cfg)
        return _computed(built[key], sigmas, cfg, batches)

    def timings() -> dict:
        return {"index_build_s": sum(d.index_build_s for d in built.values()),
                "search_s": sum(d.search_s for d in built.values())}

    run.timings = timings
    return run


def check_sigmas(sigmas) -> np.ndarray:
    """The σ grid as float64, refusing an empty one or σ that are not finite and positive."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or len(sigmas) == 0 or not np.all(np.isfinite(sigmas)) or np.any(sigmas <= 0):
        raise InputError(f"sigmas: expected a non-empty list of positive numbers, got {sigmas.tolist()!r}")
    return sigmas


def estimate_passes(
    shape: tuple[int, int],
    sigmas: np.ndarray,
    cfg: EstimatorConfig,
    runner: BatchRunner,
    *,
    tv: float,
    mean_a: float | None = None,
    fingerprint: str,
    work_dir: str | os.PathLike | None = None,
    work_parent: str | os.PathLike | None = None,
    resolve: Callable[[EstimatorConfig], EstimatorConfig],
    progress: bool = True,
    on_batch: BatchHook | None = None,
) -> Estimate:
    """The engine-independent part of an estimate: its passes, resumable (module docstring).

    shape: (N, D) of the prepared data; cfg: resolved; tv, mean_a: the data's J*(∞) and E||x0||²;
    resolve: resolves a config for this data and engine (for the larger L of a precision target's passes).
    Pass i keeps its batches in WORK_DIR (i = 0) or WORK_DIR/L-<L> (every round of its M in the same
    folder). Without work_dir and work_parent nothing is kept on disk.
    """
    n, d = shape
    key = work_key(cfg, fingerprint=fingerprint, sigmas=sigmas, n_samples=n, dim=d)
    if work_dir is None and work_parent is not None:
        work_dir = default_work_dir(work_parent, key)
    rel = cfg.rel_error
    todo = np.arange(len(sigmas))
    parts, passes = [], []
    c = cfg
    M = cfg.queries if rel is None else whole_batches(FIRST_QUERIES, cfg)
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
            est, stats = _rounds(runner, c, sig, n, M, store=store, tv=tv, mean_a=mean_a, progress=progress,
                                 on_batch=on_batch)
        passes.append(stats)
        if stats.work_dir is not None:
            log.info("work dir %s: %d batches computed, %d reused", stats.work_dir, stats.computed, stats.reused)
        if rel is None:
            parts.append((est, todo))
            break
        est = replace(est, met=precision_met(est, rel))
        more = needs_larger_subset(est, rel)
        parts.append((_take(est, ~more), todo[~more]))
        if not more.any():
            break
        todo, M = todo[more], est.n_queries
        c = resolve(replace(cfg, subset_size=min(2 * c.subset_size, n), rows_per_batch=None, c=None
                            if cfg.c is None else cfg.c))
        M = whole_batches(M, c)
        log.info("precision target: %d σ with a bias allowance above %.3g/2 of J*, next pass at L = %s",
                 len(todo), rel, c.subset_size if c.estimator != "exact" else f"N ({c.estimator})")
    timings = getattr(runner, "timings", dict)()
    timings["total_s"] = time.monotonic() - t0
    out = replace(merge_estimates(parts, sigmas), timings=timings, passes=tuple(passes))
    if rel is not None and not out.met.all():
        log.warning("precision target %.3g not met at σ = %s within the budget of %d queries", rel,
                    ", ".join(f"{s:.4g}" for s in out.sigmas[~out.met]), cfg.queries)
    return out


def whole_batches(m: int, cfg: EstimatorConfig) -> int:
    """m queries rounded up to whole batches of a resolved config, at most its budget `queries`."""
    return min(cfg.queries, math.ceil(m / cfg.rows_per_batch) * cfg.rows_per_batch)


def _rounds(runner: BatchRunner, c: EstimatorConfig, sigmas: np.ndarray, n: int, M: int, *, store, tv, mean_a,
            progress, on_batch) -> tuple[Estimate, PassStats]:
    """One pass at the L of a resolved config: its first M queries, then (with rel_error) rounds of at
    least twice as many while a σ is short of the target on its Monte-Carlo part alone (module docstring)."""
    done: dict[int, BatchPartial] = {}
    computed, wall, first_s = 0, 0.0, None
    while True:
        cm = replace(c, queries=M)
        partials, st = run_pass(runner, cm, sigmas, query_plan(cm, n), store=store, progress=progress,
                                on_batch=on_batch, reuse=done)
        done.update((p.batch_index, p) for p in partials)
        computed, wall = computed + st.computed, wall + st.wall_s
        first_s = st.first_batch_s if first_s is None else first_s
        est = reduce_estimate(partials, sigmas, cm, tv, mean_a)
        if c.rel_error is None or M >= c.queries:
            break
        short = ~precision_met(est, c.rel_error) & ~needs_larger_subset(est, c.rel_error)
        if not short.any():
            break
        M = whole_batches(max(2 * M, queries_needed(est, c.rel_error, short)), c)
        log.info("precision target: %d σ short of %.3g on their Monte-Carlo part, next round at M = %d",
                 int(short.sum()), c.rel_error, M)
    return est, PassStats(st.n_batches, max(st.n_batches - computed, 0), computed, wall, st.work_dir, first_s)


def estimate(
    samples,
    sigmas,
    config: EstimatorConfig | None = None,
    *,
    fingerprint: str | None = None,
    work_dir: str | os.PathLike | None = None,
    work_parent: str | os.PathLike | None = None,
    progress: bool = True,
    on_batch: BatchHook | None = None,
) -> Estimate:
    """Estimate J*(σ) (x0 target, VE coordinates) of samples (N, ...) for every σ, on this process.

    samples: (N, ...) array or tensor, one sample per leading index, used as given (data whose RMS value is
    far from 1 divided by a power of two first, J* multiplied back: `batch.data_scale`).
    work_dir: keep finished batches there, so a rerun computes only the missing ones (the same numbers);
    or work_parent: the folder's parent, the folder being named by a hash of the config, data
    fingerprint and σ grid; neither: nothing on disk. fingerprint: the data set's, for the work folder
    (default: a hash of the samples). on_batch: called after each computed batch is stored.
    """
    config = config or EstimatorConfig()
    sigmas = check_sigmas(sigmas)
    scale = data_scale(samples)  # data far from unit scale are estimated at unit scale, exactly (`rescaled`)
    x = prepare_data(divided(samples, scale), replace(config, device="cpu"))  # `floor_data` moves it to the device
    cfg = config.resolve(x.shape[0], x.shape[1])
    if fingerprint is None:  # only a work folder's key needs it: hashing large data is not free
        fingerprint = data_fingerprint(x) if work_dir is not None or work_parent is not None else ""
    est = estimate_passes(
        tuple(x.shape), sigmas / scale, cfg, local_runner(x),
        tv=data_total_variance(x, cfg), mean_a=data_mean_square(x, cfg), fingerprint=fingerprint, work_dir=work_dir, work_parent=work_parent,
        resolve=lambda c: c.resolve(x.shape[0], x.shape[1]), progress=progress, on_batch=on_batch,
    )
    return rescaled(est, scale, sigmas)
