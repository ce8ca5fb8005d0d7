"""The optimal-loss estimators: exact (Eq. 9), SNIS, DOL (Eq. 10), cDOL (Eq. 11) and kNN.

They differ in the reference set each query's posterior runs over:

- exact: all N samples; the source's own term uses its exact distance σ²||ε||².
- snis:  a random subset of L samples; the source counts only if it happens to be in it.
- dol:   L-1 random other samples plus the source (biased: J* too low).
- cdol:  as DOL with the source's kernel weight multiplied by 1/C (default C = 4N/L, the paper's; C=1 is
         DOL, C=inf is SNIS on L-1 samples that exclude the source). Consistent as N → ∞ (Theorem 2), but
         30-130 % off at useful L on real data (reference/estimators.md): kept as the paper's baseline.
- knn:   the L/2 nearest samples of the noisy query plus L/2 uniform draws with a control variate and
         cross-fitting (`lossfloor.floor.knn`): 0.1-1.4 % off at equal kernel cost.
- auto:  exact when N ≤ EXACT_MAX_N (5000 on a CPU, 50 000 on CUDA), else knn (the default).

At L = N every subset estimator *is* the exact estimator (the subset holds every sample: C = 1), and a
config asking for it resolves to `exact`. The exact estimator averages each query's posterior variance
(lower query noise than the paper's ||x_s||² - ||μ||², same expectation); snis/dol/cdol report the paper's
Â - B̂ and, in the same pass, the same at L/2 and L/4 (prefixes of the subset) for their bias estimate.

A batch of queries shares one random reference subset [our choice; the paper does not say how subsets
are drawn]: each query still sees a uniform random subset, and the work becomes GEMMs. For DOL/cDOL
the subset R holds L samples in random draw order; a query whose source is in R hides that copy
(its source term replaces it), any other query hides R's last draw, so every query sees exactly L-1
uniformly drawn others plus its source.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lossfloor.devices import check_device
from lossfloor.errors import InputError
from lossfloor.floor import mixture
from lossfloor.floor.kernel import MATMUL_PRECISIONS, Level, optimal_loss_terms, take_rows
from lossfloor.floor.knn import KnnData, knn_terms, prepare_knn
from lossfloor.floor.neighbours import INDEXES
from lossfloor.floor.queries import NOISE_STREAM, SUBSET_STREAM, QueryPlan, generator
from lossfloor.floor.stats import BatchPartial, reduce_partials
from lossfloor.floor.uncertainty import bias_and_interval, channels

log = logging.getLogger(__name__)

ESTIMATORS = ("auto", "exact", "snis", "dol", "cdol", "knn")
LATENTS = ("mean", "posterior")
SUBSET_ESTIMATORS = ("snis", "dol", "cdol")
# auto: exact up to this many samples, knn above. CPU: measured (benchmarks/results/estimator_accuracy-*.json,
# 2 cores, D = 64, 32 σ): exact 42 s vs knn 35 s at N = 5000, 756 s vs 221 s at N = 20 000 — exact costs
# O(N²), knn O(N) with an index. CUDA: the exact estimator's 64-σ curve of CIFAR-10 (N = 50 000) is the
# design's one-minute target (DESIGN §4; not measured in this repository yet).
EXACT_MAX_N = {"cpu": 5_000, "cuda": 50_000}
DEFAULT_SUBSET_SIZE = 4096  # snis/dol/cdol
DEFAULT_KNN_SUBSET_SIZE = 128
MIN_SUBSET_SIZE = {"snis": 8, "dol": 8, "cdol": 8, "knn": 4}  # L/4 >= 2 for the bias levels; two U halves
MIN_BATCHES = 8  # subset estimators: the standard error is estimated from batch totals
_DEFAULT_MIN_BATCHES = 16
_MEMORY_BUDGET_BYTES = {"cpu": 512 * 2**20, "cuda": 8 * 2**30}
_MAX_QUERIES_PER_BATCH = 4096


@dataclass(frozen=True, kw_only=True)
class EstimatorConfig:
    """How to estimate J*(σ). Validated against the data by `resolve`.

    estimator: auto | exact | snis | dol | cdol | knn (see the module docstring).
    subset_size: L, kernels per query (snis/dol/cdol: reference subset, default min(4096, N); knn:
      neighbours and uniform draws together, default 128, so equal L is equal kernel cost).
    c: cDOL's source down-weighting C; default 4N/L (paper §3); math.inf allowed.
    queries_per_sample: k, every sample is the source of exactly k queries (M = kN).
    seed: every batch's randomness derives from (seed, batch index).
    device: "cpu" or "cuda" (or "cuda:1", ...).
    dtype: "float32" (GEMMs in fp32, sums in float64) or "float64" (a reference computation).
    rows_per_batch: source samples per batch (k queries each); default from a memory budget. Subset
      estimators need at least 8 batches (their standard error comes from batch totals).
    rng_device: "compute" draws noise on the compute device (fast); "cpu" draws it on the CPU so CPU
      and CUDA runs with the same seed use identical noise.
    matmul_precision: float32 GEMMs as fp32 (default, TF32 off), 3xtf32 (split TF32, near-fp32 accuracy,
      faster on CUDA tensor cores) or tf32 (fastest, ~1e-3 error; for speed comparisons).
    rel_error: automatic L: start at L (default 128) and double it for the σ whose bias allowance exceeds
      rel_error·J* (where J* > 1e-3·J*(∞)), until it does not or L = N (then exact).
    index, index_pca, shared_draws: knn's neighbour index (see `neighbours`), PCA dimension of its
      search, and one uniform draw per batch (True) or per query.
    latents: "mean" (the samples as given) or "posterior": each row is [mean, std] of an EDM2 latent's
      encoder posterior and J* is that of the Gaussian mixture the model trains on (`mixture`).
    max_device_gb: a cap on the device memory of one estimator process (GiB): the default batch fits
      it, and on CUDA the data set stays in host memory (each batch gathering its rows) unless data and
      batch fit together (`floor_data`). Default: no cap (8 GiB batches on CUDA, 512 MiB on a CPU;
      the data on the GPU when it fits 90 % of its free memory). It changes the default rows per batch,
      hence the random draws: a resolved config records the batch it chose.
    """

    estimator: str = "auto"
    subset_size: int | None = None
    c: float | None = None
    queries_per_sample: int = 3
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    rows_per_batch: int | None = None
    rng_device: str = "compute"
    matmul_precision: str = "fp32"
    rel_error: float | None = None
    index: str = "auto"
    index_pca: int | None = None
    shared_draws: bool = True
    latents: str = "mean"
    max_device_gb: float | None = None

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise InputError(f"estimator: expected one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.subset_size is not None and (not isinstance(self.subset_size, int) or self.subset_size < 2):
            raise InputError(f"subset size L: expected an integer >= 2, got {self.subset_size!r}")
        if self.c is not None and not (isinstance(self.c, (int, float)) and self.c > 0 and not math.isnan(self.c)):
            raise InputError(f"C: expected a number > 0 (e.g. 4N/L, or inf), got {self.c!r}")
        if not isinstance(self.queries_per_sample, int) or self.queries_per_sample < 1:
            raise InputError(f"queries per sample: expected an integer >= 1, got {self.queries_per_sample!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InputError(f"seed: expected an integer >= 0, got {self.seed!r}")
        if self.dtype not in ("float32", "float64"):
            raise InputError(f"dtype: expected float32 or float64, got {self.dtype!r}")
        if self.rng_device not in ("compute", "cpu"):
            raise InputError(f"rng_device: expected 'compute' or 'cpu', got {self.rng_device!r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise InputError(
                f"matmul precision: expected one of {', '.join(MATMUL_PRECISIONS)}, got {self.matmul_precision!r}"
            )
        if self.rows_per_batch is not None and (not isinstance(self.rows_per_batch, int) or self.rows_per_batch < 1):
            raise InputError(f"rows_per_batch: expected an integer >= 1, got {self.rows_per_batch!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InputError(f"device: expected cpu or cuda, got {self.device!r}")
        if self.rel_error is not None and not (isinstance(self.rel_error, (int, float)) and 0 < self.rel_error < 1):
            raise InputError(f"rel-error: expected a fraction in (0, 1) like 0.01, got {self.rel_error!r}")
        if self.index not in INDEXES:
            raise InputError(f"index: expected one of {', '.join(INDEXES)}, got {self.index!r}")
        if self.index_pca is not None and (not isinstance(self.index_pca, int) or self.index_pca < 1):
            raise InputError(f"index-pca: expected an integer >= 1, got {self.index_pca!r}")
        if self.latents not in LATENTS:
            raise InputError(f"latents: expected one of {', '.join(LATENTS)}, got {self.latents!r}")
        if self.max_device_gb is not None and not (
            isinstance(self.max_device_gb, (int, float)) and math.isfinite(self.max_device_gb) and self.max_device_gb > 0
        ):
            raise InputError(f"--max-device-gb: expected a number of GiB > 0 (e.g. 40), got {self.max_device_gb!r}")

    def resolve(self, n_samples: int, dim: int, *, compute_device: str | None = None) -> EstimatorConfig:
        """Fill in the data-dependent defaults (estimator, L, C, batch size) and check them against N.

        compute_device: where the kernel will run, for `auto`'s choice (default: `device`).
        """
        if n_samples < 2:
            raise InputError(f"data: expected at least 2 samples, got {n_samples}")
        est = self.estimator
        if est == "auto":
            kind = "cpu" if (compute_device or self.device) == "cpu" else "cuda"
            est = "exact" if n_samples <= EXACT_MAX_N[kind] else "knn"
        cfg = replace(self, estimator=est)
        if est != "exact":
            default = DEFAULT_KNN_SUBSET_SIZE if est == "knn" else DEFAULT_SUBSET_SIZE
            L = self.subset_size if self.subset_size is not None else min(default, n_samples)
            if L > n_samples:
                raise InputError(f"subset size L: expected at most N = {n_samples} (the number of samples), got {L}")
            if L < MIN_SUBSET_SIZE[est] and L < n_samples:
                raise InputError(f"subset size L: {est} needs L >= {MIN_SUBSET_SIZE[est]}, got {L}")
            if L == n_samples:  # the subset holds every sample: the estimator is the exact one (C = 1)
                log.info("L = N = %d: %s is the exact estimator", n_samples, est)
                est = "exact"
                cfg = replace(cfg, estimator="exact")
            else:
                c = {"snis": math.inf, "dol": 1.0, "knn": 1.0}.get(est, self.c if self.c is not None else 4.0 * n_samples / L)
                cfg = replace(cfg, subset_size=L, c=float(c))
        if est == "exact":
            cfg = replace(cfg, subset_size=n_samples, c=1.0)
        if cfg.rows_per_batch is None:
            cfg = replace(cfg, rows_per_batch=default_rows_per_batch(cfg, n_samples, dim))
        elif cfg.max_device_gb is not None and batch_bytes(cfg, dim) > cfg.max_device_gb * 2**30:
            raise InputError(
                f"rows per batch: {cfg.rows_per_batch} rows need ~{batch_bytes(cfg, dim) / 2**30:.3g} GiB of device "
                f"memory, above --max-device-gb {cfg.max_device_gb:g}: give fewer rows, or leave the batch to the cap"
            )
        if est != "exact" and self.rows_per_batch is not None:
            n_batches = math.ceil(n_samples / cfg.rows_per_batch)
            if n_batches < MIN_BATCHES:
                raise InputError(
                    f"rows per batch: {est} needs at least {MIN_BATCHES} batches for its standard error (the "
                    f"queries of a batch share random draws); {cfg.rows_per_batch} rows give {n_batches} of "
                    f"N = {n_samples}: use at most {n_samples // MIN_BATCHES}"
                )
        check_device(cfg.device, "device")
        return cfg


def bytes_per_query(cfg: EstimatorConfig, dim: int) -> int:
    """The working memory one query of a resolved config needs on the device (an estimate)."""
    L = cfg.subset_size
    bytes_per_value = 8 if cfg.dtype == "float64" else 4
    if cfg.estimator == "knn":
        # per σ: the (k, D) gathered neighbours twice, (n_draw,) work rows, the (n_draw, k) membership test
        k = L // 2
        return bytes_per_value * (3 * k * dim + 24 * L + 16 * dim) + 2 * L * k
    # (B, L) work arrays of the kernel and its levels, and the (B, D) noise/sources/δ
    return bytes_per_value * (12 * L + 4 * dim)


def batch_bytes(cfg: EstimatorConfig, dim: int) -> int:
    """The working memory of one batch of a resolved config (its rows_per_batch x k queries)."""
    return bytes_per_query(cfg, dim) * cfg.rows_per_batch * cfg.queries_per_sample


def default_rows_per_batch(cfg: EstimatorConfig, n_samples: int, dim: int) -> int:
    """Rows whose queries fit the memory budget of the device, or of max_device_gb when it is smaller."""
    budget = _MEMORY_BUDGET_BYTES["cpu" if cfg.device == "cpu" else "cuda"]
    if cfg.max_device_gb is not None:
        budget = min(budget, int(cfg.max_device_gb * 2**30))
    per_query = bytes_per_query(cfg, dim)
    if cfg.max_device_gb is not None and per_query * cfg.queries_per_sample > budget:
        raise InputError(f"--max-device-gb {cfg.max_device_gb:g}: below the working memory of a single row's "
                         f"{cfg.queries_per_sample} queries (~{per_query * cfg.queries_per_sample / 2**30:.3g} GiB)")
    queries = max(1, min(_MAX_QUERIES_PER_BATCH, budget // per_query))
    rows = max(1, queries // cfg.queries_per_sample)
    if cfg.estimator != "exact":
        rows = min(rows, max(1, n_samples // _DEFAULT_MIN_BATCHES))
    return int(min(rows, n_samples))


# ---------------------------------------------------------------------------------------------------
# The data an estimator runs on


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


def prepare_data(samples, cfg: EstimatorConfig) -> torch.Tensor:
    """Flatten (N, ...) samples to (N, D) on the compute device in the compute dtype, checking values."""
    x = torch.as_tensor(np.asarray(samples) if not isinstance(samples, torch.Tensor) else samples)
    if x.ndim < 2:
        raise InputError(f"data: expected an array of shape (N, ...) with one sample per row, got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1)  # (N, D)
    if not torch.isfinite(x).all():
        raise InputError("data: contains NaN or infinite values")
    if cfg.latents == "posterior" and (x.shape[1] % 2 or (x[:, x.shape[1] // 2:] < 0).any()):
        raise InputError("data: latents=posterior expects rows [mean, std] with std >= 0 (load the source with "
                         "latents='posterior')")
    return x.to(device=cfg.device, dtype=getattr(torch, cfg.dtype)).contiguous()


def data_total_variance(x: torch.Tensor, cfg: EstimatorConfig) -> float:
    """J*(∞) of prepared data: of the samples, or of the Gaussian mixture for posterior latents."""
    return mixture.total_variance(x) if cfg.latents == "posterior" else total_variance(x)


# ---------------------------------------------------------------------------------------------------
# One batch


def _subset_levels(cfg: EstimatorConfig, n: int, sources: torch.Tensor, batch_index: int):
    """The random subset R (L,) and the kernel levels L, L/2, L/4 (prefixes of R, in draw order)."""
    L = cfg.subset_size
    g = generator(cfg.seed, batch_index, SUBSET_STREAM, "cpu")
    R = torch.randperm(n, generator=g)[:L]  # in draw order
    position = torch.full((n,), n, dtype=torch.long)
    position[R] = torch.arange(L)
    pos = position[sources]  # (B,), n when the source is not in R
    B = len(sources)
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
            log_factor = torch.full((B,), -math.log(c) if math.isfinite(c) else -math.inf, dtype=torch.float64)
        levels.append((size, hide, log_factor))
    return R, levels


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
    B, D = sources.shape[0], x.shape[1]
    noise_device = device if cfg.rng_device == "compute" else torch.device("cpu")
    g = generator(cfg.seed, batch_index, NOISE_STREAM, noise_device)
    # drawn in float32 whatever the compute dtype, so a float64 run is a reference for the float32 one
    posterior = cfg.latents == "posterior"
    eps = torch.randn(B, D // 2 if posterior else D, generator=g, device=noise_device, dtype=torch.float32)
    if posterior:  # ε first (the same as for the means alone), then z: x0 = m + s z (`mixture.query_noise`)
        eps = torch.cat([torch.randn(eps.shape, generator=g, device=noise_device, dtype=torch.float32), eps], 1)
    eps = eps.to(device, x.dtype)
    src = sources.to(device)
    xs = take_rows(x, src, device)  # the sources' rows, gathered once (x may be in host memory)
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    if cfg.estimator == "knn":
        gd = generator(cfg.seed, batch_index, SUBSET_STREAM, "cpu")
        j = knn_terms(data.knn, data.knn.inverse[src], eps, sig, subset_size=cfg.subset_size,
                      shared_draws=cfg.shared_draws, g=gd, precision=cfg.matmul_precision)
    elif cfg.estimator == "exact":
        lvl = Level(x.shape[0], src, torch.zeros(B, dtype=torch.float64, device=device))
        if posterior:
            j = mixture.mixture_terms(x, src, eps, sig, None, [lvl], "posterior-variance")
        else:
            j = optimal_loss_terms(xs, eps, x, sig, levels=[lvl], form="posterior-variance",
                                   precision=cfg.matmul_precision)  # x is on the device (`floor_data`)
    else:
        R, levels = _subset_levels(cfg, x.shape[0], sources, batch_index)
        levels = [Level(n, hide.to(device), lf.to(device)) for n, hide, lf in levels]
        R = R.to(device)
        if posterior:
            j = mixture.mixture_terms(x, src, eps, sig, R, levels, "paper")
        else:
            j = optimal_loss_terms(xs, eps, take_rows(x, R, device), sig, levels=levels, form="paper",
                                   precision=cfg.matmul_precision)
        j = torch.stack([j[:, 0], j[:, 1] - j[:, 0], j[:, 2] - j[:, 1]], 1)  # (B, 3, S): j, shifts
    a = mixture.second_moments(xs) if posterior else (xs.double() ** 2).sum(1)
    return a, j


def batch_terms(
    data: FloorData | torch.Tensor, sigmas: np.ndarray, cfg: EstimatorConfig, plan: QueryPlan, batch_index: int
) -> BatchPartial:
    """One batch's partial sums (see `query_terms`)."""
    a, j = query_terms(data, sigmas, cfg, plan, batch_index)
    return BatchPartial.from_terms(batch_index, a.cpu().numpy(), j.double().cpu().numpy())


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


def query_plan(cfg: EstimatorConfig, n_samples: int) -> QueryPlan:
    """The batches of a resolved config over N samples."""
    return QueryPlan(n_samples=n_samples, queries_per_sample=cfg.queries_per_sample, rows_per_batch=cfg.rows_per_batch)


def run_batches(
    data: FloorData | torch.Tensor, sigmas: np.ndarray, cfg: EstimatorConfig, batches=None, *, progress: bool = True
) -> list[BatchPartial]:
    """Compute the partials of the given batches (default: all) for a resolved config."""
    if isinstance(data, torch.Tensor):
        data = floor_data(data, cfg)
    plan = query_plan(cfg, data.x.shape[0])
    batches = range(plan.n_batches) if batches is None else batches
    bar = Progress(f"estimate {cfg.estimator}", len(batches) * plan.rows_per_batch * cfg.queries_per_sample,
                   enabled=progress)
    out = []
    for b in batches:
        part = batch_terms(data, sigmas, cfg, plan, b)
        out.append(part)
        bar.update(part.count)
    return out


# ---------------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class Estimate:
    """J*(σ) in x0 units from one estimator run, with its uncertainty (see `uncertainty`).

    bias, ci_low, ci_high: per σ, x0 units. subset_size: the L used per σ (it varies with rel_error).
    timings: seconds spent building the neighbour index and searching it (knn), and in total.
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
    timings: dict = field(default_factory=dict)


def total_variance(x: torch.Tensor) -> float:
    """J*(∞) = E||x0||² - ||E x0||², the limit of J*(σ) as σ → ∞, in float64."""
    xd = x.double()
    return float((xd - xd.mean(0)).pow(2).sum(1).mean())


def reduce_estimate(partials, sigmas, cfg: EstimatorConfig, tv: float, timings: dict | None = None) -> Estimate:
    """Reduce a pass's partials to J*, its standard error, bias and interval per σ."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    red = reduce_partials(partials, per_batch_error=cfg.estimator != "exact")
    n_ch = len(channels(cfg.estimator))
    means = red.j_star.reshape(n_ch, len(sigmas))  # (C, S)
    errs = red.stderr.reshape(n_ch, len(sigmas))
    u = bias_and_interval(cfg.estimator, means, errs, red.dof, tv)
    return Estimate(
        sigmas=sigmas, j_star=means[0], stderr=errs[0], bias=u.bias, ci_low=u.ci_low, ci_high=u.ci_high,
        allowance=np.maximum(u.lo, u.hi),
        total_variance=tv, config=cfg, n_queries=red.n_queries, n_batches=red.n_batches,
        subset_size=np.full(len(sigmas), cfg.subset_size, dtype=np.int64), timings=dict(timings or {}),
    )


def needs_larger_subset(est: Estimate, rel_error: float, threshold: float = 1e-3) -> np.ndarray:
    """Per σ: the bias allowance exceeds rel_error·J* where J* > threshold·J*(∞) (automatic L)."""
    return (est.j_star > threshold * est.total_variance) & (est.allowance > rel_error * np.abs(est.j_star))


def merge_estimates(parts: list[tuple[Estimate, np.ndarray]], sigmas: np.ndarray) -> Estimate:
    """One estimate from passes over parts of the σ grid: (estimate of the pass, the grid positions it gives)."""
    first = parts[0][0]
    cols = {name: np.empty(len(sigmas)) for name in ("j_star", "stderr", "bias", "ci_low", "ci_high", "allowance")}
    L = np.empty(len(sigmas), dtype=np.int64)
    timings: dict = {}
    for est, where in parts:
        for name in cols:
            cols[name][where] = getattr(est, name)
        L[where] = est.subset_size
        for k, v in est.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return replace(first, sigmas=np.asarray(sigmas, dtype=np.float64), subset_size=L, timings=timings, **cols)
