"""The J* table: one row per σ, stored as parquet, the hand-off between estimation and everything after.

Columns (all rows of a table share the non-σ values):
  sigma, j_star, stderr          float64; j_star and stderr in the units of `target`
  j_star_x0, stderr_x0           float64; the same in x0 units (what training and σ* use)
  estimator, target              str
  n_queries, subset_size, queries_per_sample, seed   int64
  c                              float64 (inf for SNIS)
  total_variance                 float64; J*(∞) in x0 units
  subset_shift                   float64 or null; (J*_{L/2} - J*_L)/J*_L when asked for
  dataset_fingerprint            str
The schema metadata holds `sigma_star` and `sigma_star_threshold` (JSON numbers or null).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lossfloor.atomic import write_atomic
from lossfloor.diffusion import check_target, convert_jstar
from lossfloor.errors import InputError
from lossfloor.floor.estimators import Estimate

SIGMA_STAR_THRESHOLD = 1e-3
REQUIRED_COLUMNS = ("sigma", "j_star", "stderr", "estimator", "target", "n_queries", "subset_size", "c",
                    "dataset_fingerprint")


def sigma_star(sigmas, j_star_x0, total_var: float, threshold: float = SIGMA_STAR_THRESHOLD) -> float | None:
    """σ*: the largest σ with J*(σ) ≤ threshold · J*(∞) (paper §4), interpolated on the grid.

    J* is interpolated linearly in (ln σ, ln J*) between the last grid point below the threshold and
    the next one. None when even the smallest σ of the grid is above the threshold; the largest σ when
    every point is below (the grid stops too early).
    """
    s = np.asarray(sigmas, dtype=np.float64)
    j = np.asarray(j_star_x0, dtype=np.float64)
    order = np.argsort(s)
    s, j = s[order], j[order]
    level = threshold * total_var
    below = np.nonzero(j <= level)[0]
    if len(below) == 0:
        return None
    # J* is non-decreasing in σ: the crossing is after the last point below the level
    i = int(below[-1])
    if i == len(s) - 1:
        return float(s[i])
    j0, j1 = j[i], j[i + 1]
    if j0 > 0:
        f = (math.log(level) - math.log(j0)) / (math.log(j1) - math.log(j0))
    else:
        f = (level - j0) / (j1 - j0)
    return float(math.exp(math.log(s[i]) + f * (math.log(s[i + 1]) - math.log(s[i]))))


@dataclass(frozen=True)
class JStarTable:
    table: pa.Table

    @property
    def sigma_star(self) -> float | None:
        meta = self.table.schema.metadata or {}
        v = json.loads(meta.get(b"sigma_star", b"null"))
        return None if v is None else float(v)

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()

    def rows(self) -> list[dict]:
        return self.table.to_pylist()


def build_table(
    est: Estimate, *, target: str = "x0", fingerprint: str = "", threshold: float = SIGMA_STAR_THRESHOLD
) -> JStarTable:
    """Turn an estimate into the J* table, converting J* to `target` units (DESIGN §1)."""
    target = check_target(target)
    cfg = est.config
    n = len(est.sigmas)
    factor = np.asarray(convert_jstar(np.ones(n), est.sigmas, target), dtype=np.float64)
    s_star = sigma_star(est.sigmas, est.j_star, est.total_variance, threshold)
    cols = {
        "sigma": pa.array(est.sigmas, pa.float64()),
        "j_star": pa.array(est.j_star * factor, pa.float64()),
        "stderr": pa.array(est.stderr * factor, pa.float64()),
        "j_star_x0": pa.array(est.j_star, pa.float64()),
        "stderr_x0": pa.array(est.stderr, pa.float64()),
        "estimator": pa.array([cfg.estimator] * n, pa.string()),
        "target": pa.array([target] * n, pa.string()),
        "n_queries": pa.array([est.n_queries] * n, pa.int64()),
        "subset_size": pa.array([cfg.subset_size] * n, pa.int64()),
        "queries_per_sample": pa.array([cfg.queries_per_sample] * n, pa.int64()),
        "seed": pa.array([cfg.seed] * n, pa.int64()),
        "c": pa.array([cfg.c] * n, pa.float64()),
        "total_variance": pa.array([est.total_variance] * n, pa.float64()),
        "subset_shift": pa.array(
            [None] * n if est.subset_shift is None else est.subset_shift, pa.float64()
        ),
        "dataset_fingerprint": pa.array([fingerprint] * n, pa.string()),
    }
    meta = {"sigma_star": json.dumps(s_star), "sigma_star_threshold": json.dumps(threshold)}
    return JStarTable(pa.table(cols).replace_schema_metadata(meta))


def write_table(t: JStarTable, path: str | os.PathLike) -> Path:
    """Write atomically: a temporary file in the same folder, renamed over `path` when complete."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise InputError(f"--out: folder {path.parent} does not exist")
    return write_atomic(path, lambda p: pq.write_table(t.table, p))


def read_table(path: str | os.PathLike) -> JStarTable:
    """Read a J* table, checking it has the documented columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"J* table {path}: file not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise InputError(f"J* table {path}: not a readable parquet file ({e.__class__.__name__})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"J* table {path}: missing columns {', '.join(missing)} (write it with `lossfloor estimate`)")
    return JStarTable(table)
