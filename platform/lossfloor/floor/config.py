"""How J*(σ) is estimated: the estimators, their configuration, and the memory budget of a batch.

The estimators differ in the reference set each query's posterior runs over (docs/estimators.md):

- exact: all N samples; the source's own term uses its exact distance σ²||ε||² (paper Eq. 9).
- snis:  a random subset of L samples; the source counts only if it happens to be in it.
- dol:   L-1 random other samples plus the source (Eq. 10; biased: J* too low).
- cdol:  as DOL with the source's kernel weight multiplied by 1/C (Eq. 11; default C = 4N/L, the paper's;
         C=1 is DOL, C=inf is SNIS on L-1 samples that exclude the source). Consistent as N → ∞ (Theorem 2),
         but its worst σ is 20-86 % off at L = 512…32 on the digits (docs/estimators.md): kept as the
         paper's baseline.
- knn:   the L/2 nearest samples of the noisy query plus L/2 uniform draws with a control variate and
         cross-fitting (`lossfloor.floor.knn`): its worst σ 0.07-3 % off at the same L (equal kernel cost).
- auto:  exact when N ≤ EXACT_MAX_N (50 000 on a CPU, measured, and on CUDA), else knn (the default).

At L = N every subset estimator *is* the exact estimator (the subset holds every sample: C = 1), and a
config asking for it resolves to `exact`.

A batch is `rows_per_batch` consecutive queries of the seeded query order (`lossfloor.floor.queries`); by
default as many as fit a memory budget: 512 MiB on a CPU, 8 GiB on CUDA, or `max_device_gb` when smaller.
The batch size changes no number (every query's randomness is its own), only speed and memory.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from lossfloor.devices import check_device
from lossfloor.errors import InputError
from lossfloor.floor.kernel import MATMUL_PRECISIONS
from lossfloor.floor.neighbours import INDEXES
from lossfloor.floor.queries import subset_block

log = logging.getLogger(__name__)

ESTIMATORS = ("auto", "exact", "snis", "dol", "cdol", "knn")
LATENTS = ("mean", "posterior")
SUBSET_ESTIMATORS = ("snis", "dol", "cdol")
# auto: exact up to this many samples, knn above. CPU: measured on 8x8x3 photo patches (D = 192, one thread,
# the same queries for both; benchmarks/knn_crossover.py and benchmarks/estimator_scale.py, results in
# benchmarks/results/): exact/knn CPU time at L = 128 is 0.26x at N = 5 000, 0.36x at 10 000, 0.50x at 20 000
# and 0.77x at 30 000 (M = N, 8 σ; knn 0.13-0.37 % off exact), and exact/knn-to-1 % is 1.75x at 80 000 (M = 2 048, 16 σ;
# knn at L = 512): knn's deep search costs about what exact does up to a few ten thousand samples, so the
# two draw level near N = 40 000-50 000. Exact costs O(N) per query, knn L kernels plus its search. CUDA:
# the exact estimator's 64-σ curve of CIFAR-10 (N = 50 000) is meant to take about a minute (not measured
# here yet).
EXACT_MAX_N = {"cpu": 50_000, "cuda": 50_000}
DEFAULT_SUBSET_SIZE = 4096  # snis/dol/cdol
DEFAULT_KNN_SUBSET_SIZE = 128
MIN_SUBSET_SIZE = {"snis": 8, "dol": 8, "cdol": 8, "knn": 4}  # L/4 >= 2 for the bias levels; two U halves
_MEMORY_BUDGET_BYTES = {"cpu": 512 * 2**20, "cuda": 8 * 2**30}
_MAX_QUERIES_PER_BATCH = 4096


@dataclass(frozen=True, kw_only=True)
class EstimatorConfig:
    """How to estimate J*(σ). Validated against the data by `resolve`.

    estimator: auto | exact | snis | dol | cdol | knn (see the module docstring).
    subset_size: L, kernels per query (snis/dol/cdol: reference subset, default min(4096, N); knn:
      neighbours and uniform draws together, default 128, so equal L is equal kernel cost).
    c: cDOL's source down-weighting C; default 4N/L (paper §3); math.inf allowed.
    queries_per_sample: k, the default budget M = kN (every sample the source of exactly k queries) and
      the most queries per σ any budget may have.
    queries: M, the queries per σ (the first M of the seeded order, `queries`); default kN. With
      rel_error: the most queries the precision may take.
    seed: every query's randomness derives from (seed, its source, its round) (`queries`).
    device: "cpu" or "cuda" (or "cuda:1", ...).
    dtype: "float32" (GEMMs in fp32, sums in float64) or "float64" (a reference computation).
    rows_per_batch: queries per batch (rows of the kernel matrix); default from a memory budget. Subset
      estimators: rounded up to whole blocks of queries (`queries.subset_block`, 128 from N = 1024 on).
    rng_device: "compute" draws noise on the compute device (fast); "cpu" draws it on the CPU so CPU
      and CUDA runs with the same seed use identical noise.
    matmul_precision: float32 GEMMs as fp32 (default, TF32 off), 3xtf32 (split TF32, near-fp32 accuracy,
      faster on CUDA tensor cores) or tf32 (fastest, ~1e-3 error; for speed comparisons).
    rel_error: R, the precision asked for: the 95 % interval's half-width (bias allowance + t·stderr) at
      most R·J* at every σ where J* > 1e-3·J*(∞). Queries are added in batches until the Monte-Carlo part
      fits (or M reaches `queries`), and L doubles (from 128 by default) for the σ whose bias allowance
      exceeds R·J*/2, until it does not or L = N (then exact). `lossfloor.floor.estimate`.
    index, index_pca: knn's neighbour index (see `neighbours`) and the PCA dimension of its search.
    latents: "mean" (the samples as given) or "posterior": each row is [mean, std] of an EDM2 latent's
      encoder posterior and J* is that of the Gaussian mixture the model trains on (`mixture`).
    max_device_gb: a cap on the device memory of one estimator process (GiB): the default batch fits
      it, and on CUDA the data set stays in host memory (each batch gathering its rows) unless data and
      batch fit together (`batch.floor_data`). Default: no cap (8 GiB batches on CUDA, 512 MiB on a CPU;
      the data on the GPU when it fits 90 % of its free memory). It changes the default rows per batch
      (not the numbers): a resolved config records the batch it chose.
    """

    estimator: str = "auto"
    subset_size: int | None = None
    c: float | None = None
    queries_per_sample: int = 3
    queries: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    rows_per_batch: int | None = None
    rng_device: str = "compute"
    matmul_precision: str = "fp32"
    rel_error: float | None = None
    index: str = "auto"
    index_pca: int | None = None
    latents: str = "mean"
    max_device_gb: float | None = None

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise _field("estimator", f"expected one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.subset_size is not None and (not isinstance(self.subset_size, int) or self.subset_size < 2):
            raise _field("subset_size", f"expected an integer >= 2, got {self.subset_size!r}")
        if self.c is not None and not (isinstance(self.c, (int, float)) and self.c > 0 and not math.isnan(self.c)):
            raise _field("c", f"expected a number > 0 (e.g. 4N/L, or inf), got {self.c!r}")
        if not isinstance(self.queries_per_sample, int) or self.queries_per_sample < 1:
            raise _field("queries_per_sample", f"expected an integer >= 1, got {self.queries_per_sample!r}")
        if self.queries is not None and (not isinstance(self.queries, int) or isinstance(self.queries, bool)
                                         or self.queries < 1):
            raise _field("queries", f"expected an integer number of queries >= 1, got {self.queries!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise _field("seed", f"expected an integer >= 0, got {self.seed!r}")
        if self.dtype not in ("float32", "float64"):
            raise _field("dtype", f"expected float32 or float64, got {self.dtype!r}")
        if self.rng_device not in ("compute", "cpu"):
            raise _field("rng_device", f"expected 'compute' or 'cpu', got {self.rng_device!r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise _field("matmul_precision",
                         f"expected one of {', '.join(MATMUL_PRECISIONS)}, got {self.matmul_precision!r}")
        if self.rows_per_batch is not None and (not isinstance(self.rows_per_batch, int) or self.rows_per_batch < 1):
            raise _field("rows_per_batch", f"expected an integer >= 1, got {self.rows_per_batch!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise _field("device", f"expected cpu, cuda or cuda:N, got {self.device!r}")
        if self.rel_error is not None and not (isinstance(self.rel_error, (int, float)) and 0 < self.rel_error < 1):
            raise _field("rel_error", f"expected a fraction in (0, 1) like 0.01, got {self.rel_error!r}")
        if self.index not in INDEXES:
            raise _field("index", f"expected one of {', '.join(INDEXES)}, got {self.index!r}")
        if self.index_pca is not None and (not isinstance(self.index_pca, int) or self.index_pca < 1):
            raise _field("index_pca", f"expected an integer >= 1, got {self.index_pca!r}")
        if self.latents not in LATENTS:
            raise _field("latents", f"expected one of {', '.join(LATENTS)}, got {self.latents!r}")
        if self.max_device_gb is not None and not (
            isinstance(self.max_device_gb, (int, float)) and math.isfinite(self.max_device_gb) and self.max_device_gb > 0
        ):
            raise _field("max_device_gb", f"expected a finite number of GiB > 0 (e.g. 40), got {self.max_device_gb!r}")

    def resolve(self, n_samples: int, dim: int, *, compute_device: str | None = None) -> EstimatorConfig:
        """Fill in the data-dependent defaults (estimator, L, C, batch size) and check them against N.

        compute_device: where the kernel will run, for `auto`'s choice (default: `device`).
        """
        if n_samples < 2:
            raise InputError(f"data: expected at least 2 samples, got {n_samples}")
        most = self.queries_per_sample * n_samples
        if self.queries is not None and self.queries > most:
            raise _field("queries", f"expected at most K·N = {self.queries_per_sample}·{n_samples} = {most} (every sample "
                         f"a source at most K = queries_per_sample times; raise K for more), got {self.queries}")
        est = self.estimator
        if est == "auto":
            kind = "cpu" if (compute_device or self.device) == "cpu" else "cuda"
            est = "exact" if n_samples <= EXACT_MAX_N[kind] else "knn"
        cfg = replace(self, estimator=est, queries=self.queries if self.queries is not None else most)
        if est != "exact":
            default = DEFAULT_KNN_SUBSET_SIZE if est == "knn" else DEFAULT_SUBSET_SIZE
            L = self.subset_size if self.subset_size is not None else min(default, n_samples)
            if L > n_samples:
                raise _field("subset_size", f"expected at most N = {n_samples} (the number of samples), got {L}")
            if L < MIN_SUBSET_SIZE[est] and L < n_samples:
                raise _field("subset_size", f"{est} needs L >= {MIN_SUBSET_SIZE[est]}, got {L}")
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
            raise _field("rows_per_batch",
                         f"{cfg.rows_per_batch} rows need ~{batch_bytes(cfg, dim) / 2**30:.3g} GiB of device memory, "
                         f"above max_device_gb = {cfg.max_device_gb:g}: give fewer rows, or leave the batch to the cap")
        block = subset_block(n_samples)
        if est in SUBSET_ESTIMATORS and cfg.rows_per_batch % block:  # a batch holds whole subset blocks
            cfg = replace(cfg, rows_per_batch=math.ceil(cfg.rows_per_batch / block) * block)
        check_device(cfg.device, "device")
        return cfg


def _field(name: str, text: str) -> InputError:
    """An error about config field `name`, named by it (a command line names its flag: `InputError.field`)."""
    return InputError(f"{name}: {text}", field=name)


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
    """The working memory of one batch of a resolved config (its rows_per_batch queries)."""
    return bytes_per_query(cfg, dim) * cfg.rows_per_batch


def default_rows_per_batch(cfg: EstimatorConfig, n_samples: int, dim: int) -> int:
    """Queries that fit the memory budget of the device, or of max_device_gb when it is smaller (subset
    estimators: whole blocks), at most the M queries of the estimate (a resolved `queries`)."""
    budget = _MEMORY_BUDGET_BYTES["cpu" if cfg.device == "cpu" else "cuda"]
    if cfg.max_device_gb is not None:
        budget = min(budget, int(cfg.max_device_gb * 2**30))
    per_query = bytes_per_query(cfg, dim)
    block = subset_block(n_samples) if cfg.estimator in SUBSET_ESTIMATORS else 1
    if cfg.max_device_gb is not None and per_query * block > budget:
        raise InputError(f"max_device_gb {cfg.max_device_gb:g}: below the working memory of a single batch of "
                         f"{block} queries (~{per_query * block / 2**30:.3g} GiB)", field="max_device_gb")
    queries = min(_MAX_QUERIES_PER_BATCH, budget // per_query, cfg.queries or cfg.queries_per_sample * n_samples)
    return int(max(block, queries // block * block))
