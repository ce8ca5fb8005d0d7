"""The optimal-loss estimators: exact (Eq. 9), SNIS, DOL (Eq. 10) and cDOL (Eq. 11).

They differ only in the reference set each query's softmax runs over (the kernel is shared):

- exact: all N samples; the source's own term uses its exact distance σ²||ε||².
- snis:  a random subset of L samples; the source counts only if it happens to be in it.
- dol:   L-1 random other samples plus the source (biased: J* too low).
- cdol:  as DOL with the source's kernel weight multiplied by 1/C (default C = 4N/L; C=1 is DOL,
         C=inf is SNIS on L-1 samples that exclude the source). Consistent (Theorem 2).

A batch of queries shares one random reference subset [our choice; the paper does not say how subsets
are drawn]: each query still sees a uniform random subset, and the work becomes GEMMs. For DOL/cDOL
the subset R holds L samples in random draw order; a query whose source is in R hides that copy
(its source term replaces it), any other query hides R's last draw, so every query sees exactly L-1
uniformly drawn others plus its source. With L = N, DOL is the exact estimator query by query.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from lossfloor.errors import InputError
from lossfloor.floor.kernel import MATMUL_PRECISIONS, optimal_loss_terms
from lossfloor.floor.queries import NOISE_STREAM, SUBSET_STREAM, QueryPlan, generator
from lossfloor.floor.stats import BatchPartial, Reduced, reduce_partials

log = logging.getLogger(__name__)

ESTIMATORS = ("exact", "snis", "dol", "cdol")
DEFAULT_SUBSET_SIZE = 4096
_MEMORY_BUDGET_BYTES = {"cpu": 512 * 2**20, "cuda": 8 * 2**30}
_MAX_QUERIES_PER_BATCH = 4096
_MIN_BATCHES_FOR_SUBSETS = 16  # so the batch-level standard error has enough batches


@dataclass(frozen=True, kw_only=True)
class EstimatorConfig:
    """How to estimate J*(σ). Validated against the data by `resolve`.

    estimator: one of exact | snis | dol | cdol.
    subset_size: L, the reference subset size (snis/dol/cdol); default min(4096, N).
    c: cDOL's source down-weighting C; default 4N/L (paper §3); math.inf allowed.
    queries_per_sample: k, every sample is the source of exactly k queries (M = kN).
    seed: every batch's randomness derives from (seed, batch index).
    device: "cpu" or "cuda" (or "cuda:1", ...).
    dtype: "float32" (GEMMs in fp32, sums in float64) or "float64" (a reference computation).
    rows_per_batch: source samples per batch (k queries each); default from a memory budget.
    rng_device: "compute" draws noise on the compute device (fast); "cpu" draws it on the CPU so CPU
      and CUDA runs with the same seed use identical noise.
    subset_sensitivity: also estimate with L/2 and report how much J* moves (subset estimators).
    matmul_precision: float32 GEMMs as fp32 (default), 3xtf32 (split TF32, near-fp32 accuracy, faster on
      CUDA tensor cores) or tf32 (fastest, ~1e-3 error; for speed comparisons).
    """

    estimator: str = "cdol"
    subset_size: int | None = None
    c: float | None = None
    queries_per_sample: int = 3
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    rows_per_batch: int | None = None
    rng_device: str = "compute"
    subset_sensitivity: bool = False
    matmul_precision: str = "fp32"

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise InputError(f"estimator: expected one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.subset_size is not None and (not isinstance(self.subset_size, int) or self.subset_size < 2):
            raise InputError(f"subset size L: expected an integer >= 2, got {self.subset_size!r}")
        if self.c is not None and not (isinstance(self.c, (int, float)) and self.c > 0 and not math.isnan(self.c)):
            raise InputError(f"C: expected a number > 0 (e.g. 4N/L, or inf), got {self.c!r}")
        if not isinstance(self.queries_per_sample, int) or self.queries_per_sample < 1:
            raise InputError(f"queries per sample: expected an integer >= 1, got {self.queries_per_sample!r}")
        if self.dtype not in ("float32", "float64"):
            raise InputError(f"dtype: expected float32 or float64, got {self.dtype!r}")
        if self.rng_device not in ("compute", "cpu"):
            raise InputError(f"rng_device: expected 'compute' or 'cpu', got {self.rng_device!r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise InputError(
                f"matmul precision: expected one of {', '.join(MATMUL_PRECISIONS)}, got {self.matmul_precision!r}"
            )
        if self.rows_per_batch is not None and self.rows_per_batch < 1:
            raise InputError(f"rows_per_batch: expected an integer >= 1, got {self.rows_per_batch!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InputError(f"device: expected cpu or cuda, got {self.device!r}")

    def resolve(self, n_samples: int, dim: int) -> EstimatorConfig:
        """Fill in the data-dependent defaults (L, C, batch size) and check them against N."""
        if n_samples < 2:
            raise InputError(f"data: expected at least 2 samples, got {n_samples}")
        cfg = self
        if self.estimator == "exact":
            cfg = replace(cfg, subset_size=n_samples, c=1.0)
        else:
            L = self.subset_size if self.subset_size is not None else min(DEFAULT_SUBSET_SIZE, n_samples)
            if L > n_samples:
                raise InputError(f"subset size L: expected at most N = {n_samples} (the number of samples), got {L}")
            c = {"snis": math.inf, "dol": 1.0}.get(self.estimator, self.c if self.c is not None else 4.0 * n_samples / L)
            cfg = replace(cfg, subset_size=L, c=float(c))
        if cfg.rows_per_batch is None:
            cfg = replace(cfg, rows_per_batch=_default_rows_per_batch(cfg, n_samples, dim))
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("device: cuda requested but no CUDA device is available")
        return cfg


def _default_rows_per_batch(cfg: EstimatorConfig, n_samples: int, dim: int) -> int:
    L = cfg.subset_size
    bytes_per_value = 8 if cfg.dtype == "float64" else 4
    # (B, L) work arrays of the kernel, the Gram matrix's share, and the (B, D) noise/sources/δ
    bytes_per_query = bytes_per_value * (9 * L + 4 * dim)
    budget = _MEMORY_BUDGET_BYTES["cpu" if cfg.device == "cpu" else "cuda"]
    queries = max(1, min(_MAX_QUERIES_PER_BATCH, budget // bytes_per_query))
    rows = max(1, queries // cfg.queries_per_sample)
    if cfg.estimator != "exact":
        rows = min(rows, max(1, math.ceil(n_samples / _MIN_BATCHES_FOR_SUBSETS)))
    return int(min(rows, n_samples))


def _reference_set(cfg: EstimatorConfig, n: int, sources: torch.Tensor, batch_index: int):
    """Reference indices (L,), hidden position per query (B,), and log source-term factor (B,)."""
    B = sources.shape[0]
    if cfg.estimator == "exact":
        return None, sources.clone(), torch.zeros(B, dtype=torch.float64)
    L = cfg.subset_size
    g = generator(cfg.seed, batch_index, SUBSET_STREAM, "cpu")
    R = torch.randperm(n, generator=g)[:L]  # in draw order
    position = torch.full((n,), -1, dtype=torch.long)
    position[R] = torch.arange(L)
    pos = position[sources]
    in_R = pos >= 0
    if cfg.estimator == "snis":
        hide = torch.where(in_R, pos, -1)
        log_factor = torch.where(in_R, 0.0, -math.inf).to(torch.float64)
    else:  # dol, cdol: L-1 random others plus the source weighted by 1/C
        hide = torch.where(in_R, pos, L - 1)
        log_factor = torch.full((B,), -math.log(cfg.c) if math.isfinite(cfg.c) else -math.inf, dtype=torch.float64)
    return R, hide, log_factor


def query_terms(
    x: torch.Tensor, sigmas: np.ndarray, cfg: EstimatorConfig, plan: QueryPlan, batch_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query a = ||x_s||² (B,) float64 and j = ||x_s||² - ||μ̂||² (B, S) of one batch.

    x: (N, D) data already on the compute device and in the compute dtype; cfg resolved.
    """
    sources = plan.sources(batch_index)  # (B,)
    B, D = sources.shape[0], x.shape[1]
    device = x.device
    noise_device = device if cfg.rng_device == "compute" else torch.device("cpu")
    g = generator(cfg.seed, batch_index, NOISE_STREAM, noise_device)
    eps = torch.randn(B, D, generator=g, device=noise_device, dtype=x.dtype).to(device)
    R, hide, log_factor = _reference_set(cfg, x.shape[0], sources, batch_index)
    src = sources.to(device)
    xs = x[src]  # (B, D)
    refs = x if R is None else x[R.to(device)]  # (L, D)
    j = optimal_loss_terms(
        xs,
        eps,
        refs,
        torch.as_tensor(sigmas, dtype=torch.float64),
        exclude=hide.to(device),
        source_log_factor=log_factor.to(device),
        precision=cfg.matmul_precision,
    )
    return (xs.double() ** 2).sum(1), j


def batch_terms(
    x: torch.Tensor, sigmas: np.ndarray, cfg: EstimatorConfig, plan: QueryPlan, batch_index: int
) -> BatchPartial:
    """One batch's partial sums (see `query_terms`)."""
    a, j = query_terms(x, sigmas, cfg, plan, batch_index)
    return BatchPartial.from_terms(batch_index, a.cpu().numpy(), j.double().cpu().numpy())


class Progress:
    """A periodic log line with rate and ETA (every `every_s` seconds and at the end)."""

    def __init__(self, label: str, total: int, unit: str = "queries", every_s: float = 2.0, enabled: bool = True):
        self.label, self.total, self.unit, self.every_s, self.enabled = label, total, unit, every_s, enabled
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info(
                "%s: %d/%d %s (%.0f%%), %.0f %s/s, ETA %s",
                self.label, self.done, self.total, self.unit, 100.0 * self.done / max(self.total, 1),
                rate, self.unit, time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?",
            )


def prepare_data(samples, cfg: EstimatorConfig) -> torch.Tensor:
    """Flatten (N, ...) samples to (N, D) on the compute device in the compute dtype, checking values."""
    x = torch.as_tensor(np.asarray(samples) if not isinstance(samples, torch.Tensor) else samples)
    if x.ndim < 2:
        raise InputError(f"data: expected an array of shape (N, ...) with one sample per row, got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1)  # (N, D)
    if not torch.isfinite(x).all():
        raise InputError("data: contains NaN or infinite values")
    return x.to(device=cfg.device, dtype=getattr(torch, cfg.dtype)).contiguous()


def query_plan(cfg: EstimatorConfig, n_samples: int) -> QueryPlan:
    """The batches of a resolved config over N samples."""
    return QueryPlan(n_samples=n_samples, queries_per_sample=cfg.queries_per_sample, rows_per_batch=cfg.rows_per_batch)


def run_batches(
    x: torch.Tensor, sigmas: np.ndarray, cfg: EstimatorConfig, batches=None, *, progress: bool = True
) -> list[BatchPartial]:
    """Compute the partials of the given batches (default: all) for a resolved config."""
    plan = query_plan(cfg, x.shape[0])
    batches = range(plan.n_batches) if batches is None else batches
    bar = Progress(f"estimate {cfg.estimator}", len(batches) * plan.rows_per_batch * cfg.queries_per_sample,
                   enabled=progress)
    out = []
    for b in batches:
        part = batch_terms(x, sigmas, cfg, plan, b)
        out.append(part)
        bar.update(part.count)
    return out


@dataclass(frozen=True)
class Estimate:
    """J*(σ) in x0 units from one estimator run, with everything needed to write the J* table."""

    sigmas: np.ndarray
    j_star: np.ndarray
    stderr: np.ndarray
    total_variance: float  # J*(∞) = E||x0 - E x0||²
    config: EstimatorConfig  # resolved
    n_queries: int
    n_batches: int
    subset_shift: np.ndarray | None = None  # (J*_{L/2} - J*_L) / J*_L, when asked for


def total_variance(x: torch.Tensor) -> float:
    """J*(∞) = E||x0||² - ||E x0||², the limit of J*(σ) as σ → ∞, in float64."""
    xd = x.double()
    return float((xd - xd.mean(0)).pow(2).sum(1).mean())


def reduce_estimate(partials, sigmas, cfg: EstimatorConfig, tv: float) -> Estimate:
    red: Reduced = reduce_partials(partials, per_batch_error=cfg.estimator != "exact")
    return Estimate(
        sigmas=np.asarray(sigmas, dtype=np.float64),
        j_star=red.j_star,
        stderr=red.stderr,
        total_variance=tv,
        config=cfg,
        n_queries=red.n_queries,
        n_batches=red.n_batches,
    )


def estimate(samples, sigmas, config: EstimatorConfig | None = None, *, progress: bool = True) -> Estimate:
    """Estimate J*(σ) (x0 target, VE coordinates) of a data set for every σ in `sigmas`.

    samples: (N, ...) array or tensor, one sample per leading index, used as given.
    """
    cfg = config or EstimatorConfig()
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or len(sigmas) == 0 or not np.all(np.isfinite(sigmas)) or np.any(sigmas <= 0):
        raise InputError(f"sigmas: expected a non-empty list of positive numbers, got {sigmas.tolist()!r}")
    x = prepare_data(samples, cfg)
    cfg = cfg.resolve(x.shape[0], x.shape[1])
    tv = total_variance(x)
    est = reduce_estimate(run_batches(x, sigmas, cfg, progress=progress), sigmas, cfg, tv)
    if cfg.subset_sensitivity and cfg.estimator != "exact":
        half = replace(
            cfg,
            subset_size=max(2, cfg.subset_size // 2),
            c=None if config is None else config.c,  # a default C is re-derived for L/2
            rows_per_batch=None,
            subset_sensitivity=False,
        )
        half = half.resolve(x.shape[0], x.shape[1])
        est_half = reduce_estimate(run_batches(x, sigmas, half, progress=progress), sigmas, half, tv)
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.where(est.j_star > 0, (est_half.j_star - est.j_star) / est.j_star, 0.0)
        est = replace(est, subset_shift=shift)
    return est
