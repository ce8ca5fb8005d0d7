"""One batch of an estimate: the data it runs on, and its queries' terms for every σ of a grid.

A batch holds `rows_per_batch` consecutive queries y = x_s + σ ε of the seeded query order (`queries`);
each query's noise and draws come from (seed, its source, its round) only, so any process, batch size or
estimator computes the same queries. Per query and σ it returns a = ||x_s||² and the estimator's channels
(`uncertainty.channels`):

- exact (paper Eq. 9): the posterior over all N samples, as the query's posterior variance
  Σ_n w̃_n ||x_n - μ||² (the same expectation as the paper's ||x_s||² - ||μ||², Theorem 1, with less query
  noise; `kernel`).
- snis / dol / cdol (Eq. 10-11): the paper's Â - B̂ term ||x_s||² - ||μ̂||² over a reference subset, and in
  the same pass the same at L/2 and L/4 (prefixes of the subset), reported as the shifts J_{L/2} - J_L and
  J_{L/4} - J_{L/2} for the bias estimate.
- knn: the cross-fitted posterior variance and its self-check (`knn`), each query with its own uniform
  draws.

[our choice; the paper does not say how subsets are drawn] The subset estimators draw one reference
subset per block of `queries.subset_block(N)` (128, fewer for N < 1024) consecutive queries, from (seed,
block) only: each query still sees a uniform random subset, the work of a block is GEMMs, and the blocks
do not depend on the batch size or memory budget (a batch holds whole blocks). Blocks are independent,
so the standard error comes from block totals (`stats`). For DOL/cDOL the subset R holds L samples in
random draw order; a query whose source is in R hides that copy (its source term replaces it), any other
query hides R's last draw, so every query sees exactly L-1 uniformly drawn others plus its source.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from lossfloor.errors import InputError
from lossfloor.floor import mixture
from lossfloor.floor.config import EstimatorConfig, batch_bytes
from lossfloor.floor.heap import reuse_freed_memory
from lossfloor.floor.kernel import Level, optimal_loss_terms, take_rows
from lossfloor.floor.knn import KnnData, draw_count, knn_terms, prepare_knn
from lossfloor.floor.queries import (
    BAND_STREAM,
    DRAW_STREAM,
    NOISE_STREAM,
    SUBSET_STREAM,
    QueryPlan,
    block_seed,
    normal_rows,
    subset_block,
    uniform_without_replacement,
)
from lossfloor.floor.stats import BatchPartial

log = logging.getLogger(__name__)


def query_plan(cfg: EstimatorConfig, n_samples: int, *, key: int = 0) -> QueryPlan:
    """The queries and batches of a resolved config over N samples (key: the class of a class-conditional
    floor, `queries`)."""
    return QueryPlan(n_samples=n_samples, n_queries=cfg.queries, rows_per_batch=cfg.rows_per_batch, seed=cfg.seed,
                     key=key)


def unit_size(cfg: EstimatorConfig, n_samples: int) -> int:
    """Queries per independent unit of the standard error: a subset block, or one query (`stats`)."""
    return subset_block(n_samples) if cfg.estimator in ("snis", "dol", "cdol") else 1


# ---------------------------------------------------------------------------------------------------
# The data an estimator runs on


UNIT_RMS = (2.0**-20, 2.0**20)  # data whose RMS lies here are estimated as given (every golden number)
MAX_SCALE_EXPONENT = 500  # s = 2^±500 at most: s² J* stays a normal float64 (2^±1022)
_CHUNK_VALUES = 2**22  # values per float64 chunk of `data_scale` (32 MiB)


def data_scale(samples) -> float:
    """The power of two s the estimators divide (N, ...) samples by: 1 when their RMS value lies in
    UNIT_RMS, else the power of two nearest the RMS (computed in float64 without overflow).

    J* scales exactly: J*(σ; x) = s² J*(σ/s; x/s) (posterior latents: means and stds alike), and dividing
    by a power of two is exact in floating point, so data far from unit scale (×1e30 in float32, whose
    squared distances overflow; ×1e-30, whose underflow) are estimated as the same numbers as unit data.
    Data with NaN/inf, or all zero, give 1 (`prepare_data` refuses the former). Data so far from unit scale
    that J* (in their units squared) is beyond float64 are refused (InputError).
    """
    x = samples if isinstance(samples, torch.Tensor) else torch.as_tensor(np.asarray(samples))
    if x.ndim < 1 or x.numel() == 0 or x.dtype == torch.bool or x.is_complex():
        return 1.0
    rows = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    step = max(1, _CHUNK_VALUES // rows.shape[1])  # in chunks: no float64 copy of the whole data set
    unit, ssq = 0.0, 0.0  # Σ (x / unit)², unit a power of two above max |x| so far: no overflow (one pass)
    for i in range(0, rows.shape[0], step):
        c = rows[i:i + step].double()
        top = float(c.abs().max())
        if not math.isfinite(top):
            return 1.0
        if top >= unit and top > 0:
            grown = 2.0 ** math.frexp(top)[1]
            ssq *= (unit / grown) ** 2
            unit = grown
        if unit > 0:
            ssq += float(((c / unit) ** 2).sum())
    return scale_of_rms(unit * math.sqrt(ssq / x.numel()))


def scale_of_rms(rms: float) -> float:
    """`data_scale` of data whose RMS value is `rms`."""
    if not (math.isfinite(rms) and rms > 0) or UNIT_RMS[0] <= rms <= UNIT_RMS[1]:
        return 1.0
    exponent = round(math.log2(rms))
    if not -MAX_SCALE_EXPONENT <= exponent <= MAX_SCALE_EXPONENT:
        raise InputError(f"data: values of RMS {rms:.3g}: J* (in their units squared) is beyond float64; "
                         "multiply the data by a constant nearer 1/RMS first (J* scales by its square)")
    return 2.0 ** exponent


def divided(samples, scale: float):
    """samples / scale (exact: a power of two, `data_scale`), the samples themselves when scale is 1."""
    if scale == 1:
        return samples
    return (samples if isinstance(samples, torch.Tensor) else np.asarray(samples)) / scale


def prepare_data(samples, cfg: EstimatorConfig) -> torch.Tensor:
    """Flatten (N, ...) samples to (N, D) on the compute device in the compute dtype, checking values."""
    x = torch.as_tensor(np.asarray(samples) if not isinstance(samples, torch.Tensor) else samples)
    if x.ndim < 2:
        raise InputError(f"data: expected an array of shape (N, ...) with one sample per row, got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1)  # (N, D)
    if x.shape[1] == 0:
        raise InputError(f"data: samples of shape {tuple(x.shape[1:])} hold no values (got shape {tuple(x.shape)})")
    if not torch.isfinite(x).all():
        raise InputError("data: contains NaN or infinite values")
    if cfg.latents == "posterior" and (x.shape[1] % 2 or (x[:, x.shape[1] // 2:] < 0).any()):
        raise InputError("data: latents=posterior expects rows [mean, std] with std >= 0 (load the source with "
                         "latents='posterior')")
    return x.to(device=cfg.device, dtype=getattr(torch, cfg.dtype)).contiguous()


def total_variance(x: torch.Tensor) -> float:
    """J*(∞) = E||x0||² - ||E x0||², the limit of J*(σ) as σ → ∞, in float64."""
    xd = x.double()
    return float((xd - xd.mean(0)).pow(2).sum(1).mean())


def data_total_variance(x: torch.Tensor, cfg: EstimatorConfig) -> float:
    """J*(∞) of prepared data: of the samples, or of the Gaussian mixture for posterior latents."""
    return mixture.total_variance(x) if cfg.latents == "posterior" else total_variance(x)


def data_mean_square(x: torch.Tensor, cfg: EstimatorConfig) -> float:
    """E||x0||² of prepared data in float64 (posterior latents: of the mixture), the known mean of the
    queries' control variate a = ||x_s||² (`stats`)."""
    a = mixture.second_moments(x) if cfg.latents == "posterior" else (x.double() ** 2).sum(1)
    return float(a.mean())


@dataclass(eq=False)
class FloorData:
    """The prepared (N, D) samples, and what the kNN estimator adds to them.

    x lives on the compute `device`, or in host memory (a node-shared mapping, `floor_data`) while the
    kernel runs on `device`: each batch then gathers its rows (`take_rows`).
    """

    x: torch.Tensor
    knn: KnnData | None = None
    device: torch.device | None = None

    def __post_init__(self):
        if self.device is None:
            self.device = self.x.device

    @property
    def on_host(self) -> bool:
        return self.x.device != self.device

    @property
    def index_build_s(self) -> float:
        return 0.0 if self.knn is None else self.knn.index.build_s

    @property
    def search_s(self) -> float:
        return 0.0 if self.knn is None else self.knn.index.search_s


def floor_data(x: torch.Tensor, cfg: EstimatorConfig, *, cache=None) -> FloorData:
    """FloorData for a resolved config: for knn the samples are deduplicated and indexed (once).

    x: the prepared (N, D) samples on the compute device, or in host memory with the kernel on a GPU:
    they move to the GPU when they fit it next to one batch (`fits_device`); else they stay on the host
    and every batch gathers its rows (exact and posterior-latent subset estimators need all N samples
    per batch on the device: InputError then). cache: a `lossfloor.data.node_cache.NodeCache` of this
    data set: knn's distinct points and FAISS index are made once per machine and shared by mapping.
    """
    reuse_freed_memory()  # every batch's working arrays: reused heap pages, not fresh ones (`heap`)
    device = torch.device(cfg.device)
    if x.device != device:
        if fits_device(cfg, x):
            x = x.to(device)
        elif cfg.estimator == "exact" or (cfg.latents == "posterior" and cfg.estimator != "knn"):
            raise InputError(
                f"--max-device-gb: the {cfg.estimator} estimator needs all {x.shape[0]} samples "
                f"({_gib(x.numel() * x.element_size())} GiB) on {device} for every batch, more than fits next to a "
                f"batch; use --estimator knn (it gathers each batch's rows from host memory) or a larger cap")
        else:
            log.info("data %s GiB stay in host memory, each batch gathers its rows onto %s",
                     _gib(x.numel() * x.element_size()), device)
    if cfg.estimator == "knn":
        return FloorData(x, prepare_knn(x, index=cfg.index, pca=cfg.index_pca, seed=cfg.seed,
                                        mixture=cfg.latents == "posterior", cache=cache, device=device), device)
    return FloorData(x, device=device)


def fits_device(cfg: EstimatorConfig, x: torch.Tensor) -> bool:
    """Whether the (N, D) data (and for knn its index) fit on cfg.device next to one batch: within
    max_device_gb when given, else 90 % of the device's free memory."""
    device = torch.device(cfg.device)
    if device.type != "cuda":
        return True
    cap = cfg.max_device_gb * 2**30 if cfg.max_device_gb is not None else 0.9 * torch.cuda.mem_get_info(device)[0]
    data = x.numel() * x.element_size() * (2 if cfg.estimator == "knn" else 1)  # knn: points + a GPU index
    return data + batch_bytes(cfg, x.shape[1]) <= cap


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g}"


# ---------------------------------------------------------------------------------------------------
# One batch


def _subset_levels(cfg: EstimatorConfig, n: int, sources: torch.Tensor, R: torch.Tensor):
    """The kernel levels L, L/2, L/4 (prefixes of the subset R (L,), in draw order) of a block's queries."""
    L = cfg.subset_size
    hit = sources[:, None] == R[None, :]  # (b, L)
    pos = torch.where(hit.any(1), hit.to(torch.int8).argmax(1), n)  # (b,), n when the source is not in R
    b = len(sources)
    levels = []
    for size in (L, L // 2, L // 4):
        in_R = pos < size
        if cfg.estimator == "snis":
            hide = torch.where(in_R, pos, -1)
            log_factor = torch.where(in_R, 0.0, -math.inf).to(torch.float64)
        else:  # dol, cdol: size-1 random others plus the source weighted by 1/C
            # the paper's default C = 4N/L is re-derived for each level; a C given by the user stays fixed
            c = 4.0 * n / size if cfg.estimator == "cdol" and math.isclose(cfg.c, 4.0 * n / L) else cfg.c
            hide = torch.where(in_R, pos, size - 1)
            log_factor = torch.full((b,), -math.log(c) if math.isfinite(c) else -math.inf, dtype=torch.float64)
        levels.append((size, hide, log_factor))
    return levels


def block_subset(cfg: EstimatorConfig, plan: QueryPlan, block: int) -> torch.Tensor:
    """The reference subset (L,) long of a block of queries, in draw order, from (seed, key, block) only."""
    seed = np.array([block_seed(cfg.seed, plan.key, block, SUBSET_STREAM)], dtype=np.uint64)
    return uniform_without_replacement(seed, plan.n_samples, cfg.subset_size)[0]


def query_noise(cfg: EstimatorConfig, plan: QueryPlan, batch_index: int, dim: int, device) -> torch.Tensor:
    """The batch's query noise (B, D) float32 on `device`, each row from (seed, key, source, round) only;
    posterior latents: (B, 2D) [z, ε], ε the same as for the means alone (`mixture.query_noise`)."""
    seeds = plan.seeds(batch_index, NOISE_STREAM)
    if cfg.latents != "posterior":
        return normal_rows(seeds, dim, device)
    both = normal_rows(seeds, dim // 2, device, parts=2)  # ε, then z
    return torch.cat([both[:, dim // 2:], both[:, :dim // 2]], 1)


def query_terms(
    data: FloorData | torch.Tensor, sigmas: np.ndarray, cfg: EstimatorConfig, plan: QueryPlan, batch_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query a = ||x_s||² (B,) float64 and the channels (B, C, S) of one batch (cfg resolved).

    data: `floor_data(x, cfg)` (or the (N, D) samples themselves, on the compute device and dtype).
    """
    if isinstance(data, torch.Tensor):
        data = floor_data(data, cfg)
    x, device = data.x, data.device
    sources = plan.sources(batch_index)  # (B,)
    B = sources.shape[0]
    noise_device = device if cfg.rng_device == "compute" else torch.device("cpu")
    # drawn in float32 whatever the compute dtype, so a float64 run is a reference for the float32 one
    posterior = cfg.latents == "posterior"
    eps = query_noise(cfg, plan, batch_index, x.shape[1], noise_device).to(device, x.dtype)
    src = sources.to(device)
    xs = take_rows(x, src, device)  # the sources' rows, gathered once (x may be in host memory)
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    if cfg.estimator == "knn":
        draws = uniform_without_replacement(plan.seeds(batch_index, DRAW_STREAM), data.knn.n_samples,
                                            draw_count(data.knn, cfg.subset_size))
        j = knn_terms(data.knn, data.knn.inverse[src], eps, sig, subset_size=cfg.subset_size, draws=draws,
                      band_seeds=plan.seeds(batch_index, BAND_STREAM))
    elif cfg.estimator == "exact":
        lvl = Level(x.shape[0], src, torch.zeros(B, dtype=torch.float64, device=device))
        if posterior:
            j = mixture.mixture_terms(x, src, eps, sig, None, [lvl], "posterior-variance")
        else:
            j = optimal_loss_terms(xs, eps, x, sig, levels=[lvl], form="posterior-variance",
                                   precision=cfg.matmul_precision)  # x is on the device (`floor_data`)
    else:
        j = torch.cat([_block_terms(x, xs, src, eps, sig, cfg, plan, block, rows, device)
                       for block, rows in _blocks(plan, batch_index)])
        j = torch.stack([j[:, 0], j[:, 1] - j[:, 0], j[:, 2] - j[:, 1]], 1)  # (B, 3, S): j, shifts
    a = mixture.second_moments(xs) if posterior else (xs.double() ** 2).sum(1)
    return a, j


def _blocks(plan: QueryPlan, batch_index: int):
    """(block number, slice of the batch's queries) of every subset block in the batch."""
    q = plan.queries(batch_index)
    size = subset_block(plan.n_samples)
    for block in range(q.start // size, (q.stop - 1) // size + 1):
        start, stop = max(block * size, q.start), min((block + 1) * size, q.stop)
        yield block, slice(start - q.start, stop - q.start)


def _block_terms(x, xs, src, eps, sig, cfg: EstimatorConfig, plan: QueryPlan, block: int, rows: slice, device):
    """The subset estimators' levels (b, 3, S) of one block's queries, over the block's subset."""
    R = block_subset(cfg, plan, block)
    levels = [Level(n, hide.to(device), lf.to(device))
              for n, hide, lf in _subset_levels(cfg, x.shape[0], src[rows].cpu(), R)]
    R = R.to(device)
    if cfg.latents == "posterior":
        return mixture.mixture_terms(x, src[rows], eps[rows], sig, R, levels, "paper")
    return optimal_loss_terms(xs[rows], eps[rows], take_rows(x, R, device), sig, levels=levels, form="paper",
                              precision=cfg.matmul_precision)


def batch_terms(
    data: FloorData | torch.Tensor, sigmas: np.ndarray, cfg: EstimatorConfig, plan: QueryPlan, batch_index: int
) -> BatchPartial:
    """One batch's partial sums (see `query_terms`)."""
    a, j = query_terms(data, sigmas, cfg, plan, batch_index)
    return BatchPartial.from_terms(batch_index, a.cpu().numpy(), j.double().cpu().numpy(),
                                   unit=unit_size(cfg, plan.n_samples), first_query=plan.queries(batch_index).start)
