"""Per-batch partial sums and their reduction to J*(σ) and its standard error.

A batch contributes, per column (σ × the estimator's channels, see `uncertainty.channels`), the sums of
the per-query terms j_m (see kernel, knn), their squares, and their products with a_m = ||x_s||².
Partials are plain float64 arrays, so a distributed run ships them to the driver and reduces them in
batch order: the same numbers whatever the number of workers.

Standard error. Queries are stratified (every sample is a source k times), so Σ_m a_m / M = A exactly
and a_m - Ā is a control variate with known zero mean: the point estimate is the plain mean of j, and
its variance is estimated from the residual of j after regressing out a (removing the between-sample
spread of ||x||², which the stratified estimator does not have). Estimators that share random
draws per batch (SNIS, DOL, cDOL, kNN) correlate the queries of a batch, so their error is estimated
from batch totals (a ratio estimator over batches, nb - 2 degrees of freedom: they need at least 8
batches); the exact estimator's queries are independent given their sources, so its error is
estimated per query (M - 2 degrees of freedom).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPartial:
    batch_index: int
    count: int
    sum_a: float
    sum_a2: float
    sum_j: np.ndarray  # (P,) float64, P = channels × σ (channel-major)
    sum_j2: np.ndarray  # (P,)
    sum_ja: np.ndarray  # (P,)

    @staticmethod
    def from_terms(batch_index: int, a: np.ndarray, j: np.ndarray) -> BatchPartial:
        """a: (B,) ||x_s||²; j: (B, C, S) or (B, P) per-query terms."""
        a = np.asarray(a, dtype=np.float64)
        j = np.asarray(j, dtype=np.float64).reshape(len(a), -1)  # (B, C, S) -> (B, C·S)
        return BatchPartial(
            batch_index=int(batch_index),
            count=int(a.shape[0]),
            sum_a=float(a.sum()),
            sum_a2=float((a * a).sum()),
            sum_j=j.sum(0),
            sum_j2=(j * j).sum(0),
            sum_ja=(j * a[:, None]).sum(0),
        )

    def to_dict(self) -> dict:
        return {
            "batch_index": self.batch_index,
            "count": self.count,
            "sum_a": self.sum_a,
            "sum_a2": self.sum_a2,
            "sum_j": self.sum_j.tolist(),
            "sum_j2": self.sum_j2.tolist(),
            "sum_ja": self.sum_ja.tolist(),
        }

    @staticmethod
    def from_dict(d: dict) -> BatchPartial:
        return BatchPartial(
            batch_index=int(d["batch_index"]),
            count=int(d["count"]),
            sum_a=float(d["sum_a"]),
            sum_a2=float(d["sum_a2"]),
            sum_j=np.asarray(d["sum_j"], dtype=np.float64),
            sum_j2=np.asarray(d["sum_j2"], dtype=np.float64),
            sum_ja=np.asarray(d["sum_ja"], dtype=np.float64),
        )


@dataclass(frozen=True)
class Reduced:
    j_star: np.ndarray  # (P,) float64: the mean of every column
    stderr: np.ndarray  # (P,)
    n_queries: int
    n_batches: int
    mean_sq_norm: float  # Â = E||x0||² over the queries
    dof: int  # degrees of freedom of the error estimate


def reduce_partials(partials: list[BatchPartial], *, per_batch_error: bool) -> Reduced:
    """Sum the partials in batch order and estimate the standard error (see module docstring)."""
    if not partials:
        raise ValueError("no batches to reduce")
    parts = sorted(partials, key=lambda p: p.batch_index)
    n = np.array([p.count for p in parts], dtype=np.float64)
    M = n.sum()
    sum_a = np.array([p.sum_a for p in parts])
    sum_j = np.stack([p.sum_j for p in parts])  # (nb, S)
    J = sum_j.sum(0) / M
    a_bar = sum_a.sum() / M

    nb = len(parts)
    if per_batch_error:
        if nb < 3:
            raise ValueError(f"a per-batch standard error needs at least 3 batches, got {nb}")
        # ratio estimator over batches, with the batch total of a as control variate
        r = sum_j - J[None, :] * n[:, None]  # (nb, S)
        c = (sum_a - a_bar * n)[:, None]  # (nb, 1)
        cc = float((c * c).sum())
        lam = (r * c).sum(0) / cc if cc > 0 else np.zeros_like(J)
        resid = r - lam[None, :] * c
        var = (resid * resid).sum(0) * nb / max(nb - 2, 1) / M**2
        dof = nb - 2
    else:
        var_j = np.stack([p.sum_j2 for p in parts]).sum(0) / M - J**2
        var_a = sum(p.sum_a2 for p in parts) / M - a_bar**2
        cov = np.stack([p.sum_ja for p in parts]).sum(0) / M - J * a_bar
        resid_var = var_j - (cov**2 / var_a if var_a > 0 else 0.0)
        var = np.clip(resid_var, 0.0, None) / max(M - 2, 1)
        dof = int(M) - 2
    return Reduced(
        j_star=J,
        stderr=np.sqrt(np.clip(var, 0.0, None)),
        n_queries=int(M),
        n_batches=nb,
        mean_sq_norm=float(a_bar),
        dof=max(dof, 1),
    )
