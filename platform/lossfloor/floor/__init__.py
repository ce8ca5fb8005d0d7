"""The optimal loss J*(σ) of a data set (paper Theorem 1) and its estimators (Eq. 9-11).

    est = estimate(samples, sigmas, EstimatorConfig(estimator="cdol", subset_size=1024))
    table = build_table(est, target="x0", fingerprint=dataset.fingerprint)
    write_table(table, "jstar.parquet")
"""

from lossfloor.floor.estimators import (
    ESTIMATORS,
    Estimate,
    EstimatorConfig,
    batch_terms,
    estimate,
    prepare_data,
    query_plan,
    query_terms,
    reduce_estimate,
    run_batches,
    total_variance,
)
from lossfloor.floor.queries import QueryPlan
from lossfloor.floor.stats import BatchPartial, reduce_partials
from lossfloor.floor.table import JStarTable, build_table, read_table, sigma_star, write_table

__all__ = [
    "ESTIMATORS",
    "BatchPartial",
    "Estimate",
    "EstimatorConfig",
    "JStarTable",
    "QueryPlan",
    "batch_terms",
    "query_plan",
    "query_terms",
    "build_table",
    "estimate",
    "prepare_data",
    "read_table",
    "reduce_estimate",
    "reduce_partials",
    "run_batches",
    "sigma_star",
    "total_variance",
    "write_table",
]
