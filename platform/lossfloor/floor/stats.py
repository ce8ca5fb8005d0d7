"""Per-batch partial sums and their reduction to J*(σ) and its standard error.

Units. The error is estimated from independent units of queries: one query for the exact and knn
estimators (every query has its own noise and draws), one block of queries for snis/dol/cdol (a block
shares its reference subset; `batch`). A batch holds whole units and contributes, per column (σ × the
estimator's channels, see `uncertainty.channels`), the sums of the terms j_m and of a_m = ||x_s||², and
the second moments of its units' totals (S_j,u, S_a,u over n_u queries) about the batch's own means —
centred, so the reduction does not cancel large common offsets. Partials are plain float64 arrays, so a
distributed run ships them to the driver and reduces them in batch order: the same numbers whatever the
number of workers.

Estimate and standard error. Every source is marginally uniform (`queries`), so the mean of the M terms
is unbiased for any M. a_m has a known mean A = E||x0||² (computed from the data), so a_m - A is a
control variate: J = j̄ - λ (ā - A) with λ the regression coefficient of the units' totals of j on those of
a (ā = A exactly when M is a multiple of N: then J = j̄). Its variance is estimated from the residuals of
the units' totals after the regression (a ratio estimator over U units, U - 2 degrees of freedom), which
removes the between-sample spread of ||x||² that the query order's near-stratification also removes.
Sources drawn without replacement are negatively correlated, so treating units as independent errs on the
side of a wider interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCALARS = ("batch_index", "count", "units", "sum_a", "m_cc", "m_nc", "m_nn")
VECTORS = ("sum_j", "m_rr", "m_rc", "m_nr")  # (P,) each, P = channels × σ (channel-major)
FIELDS = SCALARS + VECTORS
_INTS = ("batch_index", "count", "units")


@dataclass(frozen=True)
class BatchPartial:
    """One batch's sums (module docstring): with r_u, c_u the units' totals of j and a minus n_u times the
    batch's mean, m_rr = Σ r_u², m_rc = Σ r_u c_u, m_nr = Σ n_u r_u, m_cc = Σ c_u², m_nc = Σ n_u c_u,
    m_nn = Σ n_u²."""

    batch_index: int
    count: int  # queries
    units: int
    sum_a: float
    m_cc: float
    m_nc: float
    m_nn: float
    sum_j: np.ndarray
    m_rr: np.ndarray
    m_rc: np.ndarray
    m_nr: np.ndarray

    @staticmethod
    def from_terms(batch_index: int, a: np.ndarray, j: np.ndarray, *, unit: int = 1,
                   first_query: int = 0) -> BatchPartial:
        """a: (B,) ||x_s||²; j: (B, C, S) or (B, P) per-query terms of the queries first_query, ... of a
        batch; unit: queries per unit, units aligned to the query numbers (q // unit)."""
        a = np.asarray(a, dtype=np.float64)
        j = np.asarray(j, dtype=np.float64).reshape(len(a), -1)  # (B, C, S) -> (B, C·S)
        u = (first_query + np.arange(len(a))) // unit
        starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
        n = np.diff(np.r_[starts, len(a)]).astype(np.float64)  # (U,)
        sa, sj = np.add.reduceat(a, starts), np.add.reduceat(j, starts, axis=0)  # (U,), (U, P)
        c = sa - n * (a.sum() / len(a))
        r = sj - n[:, None] * (j.sum(0) / len(a))[None, :]
        return BatchPartial(
            batch_index=int(batch_index), count=len(a), units=len(n), sum_a=float(a.sum()),
            m_cc=float(c @ c), m_nc=float(n @ c), m_nn=float(n @ n),
            sum_j=j.sum(0), m_rr=(r * r).sum(0), m_rc=(r * c[:, None]).sum(0), m_nr=n @ r,
        )

    def to_dict(self) -> dict:
        return {name: (getattr(self, name).tolist() if name in VECTORS else getattr(self, name)) for name in FIELDS}

    @staticmethod
    def from_dict(d: dict) -> BatchPartial:
        return BatchPartial(**{name: int(d[name]) if name in _INTS else
                               np.asarray(d[name], dtype=np.float64).copy() if name in VECTORS else float(d[name])
                               for name in FIELDS})


@dataclass(frozen=True)
class Reduced:
    j_star: np.ndarray  # (P,) float64: the control-variate estimate of every column
    stderr: np.ndarray  # (P,)
    n_queries: int
    n_batches: int
    mean_sq_norm: float  # ā = the queries' mean ||x_s||²
    dof: int  # degrees of freedom of the error estimate


def reduce_partials(partials: list[BatchPartial], *, mean_a: float | None = None) -> Reduced:
    """Sum the partials in batch order and estimate J and its standard error (module docstring).

    mean_a: the known E||x0||² of the data (the control variate's mean); default the queries' own mean
    (then J is the plain mean)."""
    if not partials:
        raise ValueError("no batches to reduce")
    parts = sorted(partials, key=lambda p: p.batch_index)
    n = np.array([p.count for p in parts], dtype=np.float64)
    M, U = n.sum(), sum(p.units for p in parts)
    if U < 3:
        raise ValueError(f"a standard error needs at least 3 independent units of queries, got {U}")
    sum_a = np.array([p.sum_a for p in parts])
    sum_j = np.stack([p.sum_j for p in parts])  # (nb, P)
    J = sum_j.sum(0) / M
    a_bar = sum_a.sum() / M
    A = a_bar if mean_a is None else float(mean_a)
    dj = J[None, :] - sum_j / n[:, None]  # (nb, P): the overall centre minus each batch's
    da = (A - sum_a / n)[:, None]  # (nb, 1)
    m_nn = np.array([p.m_nn for p in parts])[:, None]
    m_nc = np.array([p.m_nc for p in parts])[:, None]
    m_cc = np.array([p.m_cc for p in parts])[:, None]
    m_rr, m_rc, m_nr = (np.stack([getattr(p, name) for p in parts]) for name in ("m_rr", "m_rc", "m_nr"))
    rr = (m_rr - 2 * dj * m_nr + dj * dj * m_nn).sum(0)
    cc = float((m_cc - 2 * da * m_nc + da * da * m_nn).sum())
    rc = (m_rc - da * m_nr - dj * m_nc + dj * da * m_nn).sum(0)
    lam = rc / cc if cc > 0 else np.zeros_like(J)
    resid = np.clip(rr - lam * rc, 0.0, None)
    var = resid * U / (U - 2) / M**2
    return Reduced(
        j_star=J - lam * (a_bar - A),
        stderr=np.sqrt(var),
        n_queries=int(M),
        n_batches=len(parts),
        mean_sq_norm=float(a_bar),
        dof=U - 2,
    )
