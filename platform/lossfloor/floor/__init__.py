"""The optimal loss J*(σ) of a data set (paper Theorem 1) and its estimators (Eq. 9-11, and kNN).

    est = estimate(samples, sigmas, EstimatorConfig())        # auto: exact for N <= 5000 (CPU) / 50 000 (CUDA), else knn
    est = estimate(samples, sigmas, cfg, work_dir="work")     # resumable: a rerun computes only missing batches
    est = estimate_conditional(samples, labels, sigmas, cfg)       # the class-conditional floor Σ_c π_c J*_c
    table = build_table(est, target="x0", fingerprint=dataset.fingerprint)
    write_table(table, "jstar.parquet")
"""

from lossfloor.floor.batch import (
    FloorData,
    batch_terms,
    floor_data,
    prepare_data,
    query_plan,
    query_terms,
    total_variance,
)
from lossfloor.floor.conditional import estimate_conditional
from lossfloor.floor.config import ESTIMATORS, EstimatorConfig
from lossfloor.floor.estimate import Estimate, estimate, reduce_estimate, run_batches
from lossfloor.floor.queries import QueryPlan
from lossfloor.floor.stats import BatchPartial, reduce_partials
from lossfloor.floor.table import JStarTable, build_table, read_table, sigma_star, write_table

__all__ = [
    "ESTIMATORS",
    "BatchPartial",
    "Estimate",
    "EstimatorConfig",
    "FloorData",
    "JStarTable",
    "QueryPlan",
    "batch_terms",
    "build_table",
    "estimate",
    "estimate_conditional",
    "floor_data",
    "prepare_data",
    "query_plan",
    "query_terms",
    "read_table",
    "reduce_estimate",
    "reduce_partials",
    "run_batches",
    "sigma_star",
    "total_variance",
    "write_table",
]
