"""Honest uncertainty of a J* estimate: a bias allowance and a 95 % interval per σ.

Every estimator returns, per query and σ, its term j and a few "channels" computed from the same
kernels; their means over the queries (with Monte-Carlo standard errors from `stats`) give

- stderr: the Monte-Carlo standard error of J* (query noise, and the subset draws of a batch);
- bias:   an estimate of the estimator's systematic error, from the channels:
    exact          0 (the estimator is unbiased);
    snis/dol/cdol  d₁ = J*_{L/2} - J*_L, the shift from halving the subset in the same pass (the bias at L
                   if it falls as 1/L: J*_L - J*_∞ = J*_{L/2} - J*_L under a 1/L extrapolation); signed,
                   negative = the estimate is low;
    knn            the spread max - min of its cross-fitted, plain and Richardson estimates (unsigned),
                   which bounded the true error in every case measured (docs/estimators.md);
- ci_low, ci_high: [J* - lo - t·stderr, J* + hi + t·stderr] with t Student's 97.5 % quantile for the
  error's degrees of freedom, intersected with [0, J*(∞)] (J* lies there for every data set, so the
  intersection covers the truth whenever the interval does), where
    exact          lo = hi = 0;
    knn            lo = hi = bias (the spread);
    snis/dol/cdol  the allowance a = 4 (|d₁| + t·se(d₁)) on both sides, provided the shifts converge:
                   |d₁| ≤ 0.7 |d₂| with d₂ = J*_{L/4} - J*_{L/2} of the same sign, or d₁ within noise. When
                   they do not (halving L moves J* as much as the previous halving did), the bias is not
                   resolved and the interval is the whole [0, J*(∞)]: the estimator does not know. Both sides,
                   not only the one d₁ points to: cDOL with C = 4N/L is biased low at small L but high near
                   L = N (C → 4), so its sequence in L can cross the truth (measured: +22 % at L = N/2).

An interval lying wholly above J*(∞) (or below 0) has missed the truth: it becomes the interval of the same
width against the bound, [max(0, J*(∞) - width), J*(∞)] (or [0, min(width, J*(∞))]), not a zero-width one
at the bound (exact on 40 samples with 30 copies of one, σ = 20: J* 28.66 had [26.982, 26.982] = J*(∞)).
The estimate itself is clipped to J*(∞) (an estimate above it is high for sure); a hair below 0 is kept
(unbiased at small σ; tables read it as 0).

The class-conditional floor Σ_c π_c J*_c combines its classes' estimates into the same interval
(`lossfloor.floor.conditional`): the standard errors in quadrature, the allowances linearly, each weighted
by π_c.

The interval covers the query noise and the bias allowance, not errors outside the estimator's own
evidence (e.g. a data set that is a small sample of the population: J* here is the floor of *this* set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from lossfloor.floor.knn import CHANNELS as KNN_CHANNELS

SUBSET_CHANNELS = ("j", "half_minus_j", "quarter_minus_half")
EXACT_CHANNELS = ("j",)
SUBSET_MARGIN = 4.0  # the subset estimators' allowance in units of the L -> L/2 shift
CONVERGED_RATIO = 0.7  # successive shifts must shrink at least this much for the allowance to be finite


def channels(estimator: str) -> tuple[str, ...]:
    """The per-query channels an estimator returns (the first is its J* term)."""
    if estimator == "exact":
        return EXACT_CHANNELS
    if estimator == "knn":
        return KNN_CHANNELS
    return SUBSET_CHANNELS


def t_quantile(dof):
    """Student's t 97.5 % quantile (1.96 for many degrees of freedom); dof a number or an array (per σ)."""
    q = stats.t.ppf(0.975, np.maximum(np.floor(dof), 1))
    return float(q) if np.ndim(q) == 0 else q


@dataclass(frozen=True)
class Uncertainty:
    """Per σ: the estimate (at most J*(∞)), the bias estimate, the bias allowances below (lo) and above (hi)
    the estimate, the interval."""

    j_star: np.ndarray
    bias: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


def bias_and_interval(estimator: str, means: np.ndarray, stderr: np.ndarray, dof: int,
                      total_variance: float) -> Uncertainty:
    """The uncertainty per σ from the channel means and standard errors, both (C, S)."""
    j, se = means[0], stderr[0]
    t = t_quantile(dof)
    zero = np.zeros_like(j)
    if estimator == "exact":
        bias, lo, hi = zero, zero, zero
    elif estimator == "knn":
        spread = np.maximum.reduce([zero, means[1], means[2]]) - np.minimum.reduce([zero, means[1], means[2]])
        bias, lo, hi = spread, spread, spread
    else:
        d1, d2, se1 = means[1], means[2], stderr[1]
        bias = d1
        within_noise = np.abs(d1) <= t * se1
        converged = within_noise | ((np.sign(d1) == np.sign(d2)) & (np.abs(d1) <= CONVERGED_RATIO * np.abs(d2)))
        lo = hi = np.where(converged, SUBSET_MARGIN * (np.abs(d1) + t * se1), np.inf)
    return interval(j, bias, lo, hi, se, t, total_variance)


def interval(j: np.ndarray, bias: np.ndarray, lo: np.ndarray, hi: np.ndarray, se: np.ndarray, t,
             total_variance: float) -> Uncertainty:
    """The 95 % interval [J - lo - t·se, J + hi + t·se] within [0, J*(∞)] (`within_bounds`), per σ; t: the
    t quantile (a number, or per σ)."""
    ci_low, ci_high = within_bounds(j - lo - t * se, j + hi + t * se, total_variance)
    return Uncertainty(j_star=np.minimum(j, total_variance), bias=bias, lo=lo, hi=hi, ci_low=ci_low, ci_high=ci_high)


def within_bounds(low: np.ndarray, high: np.ndarray, total_variance: float) -> tuple[np.ndarray, np.ndarray]:
    """The interval [low, high] within [0, J*(∞)]: intersected where they meet, else of the same width
    against the nearer bound (module docstring)."""
    width = high - low  # inf for an unresolved bias: then the whole [0, J*(∞)]
    above, below = low > total_variance, high < 0
    ci_low = np.where(above, np.maximum(total_variance - width, 0.0), np.clip(low, 0.0, total_variance))
    ci_high = np.where(below, np.minimum(width, total_variance), np.clip(high, 0.0, total_variance))
    return ci_low, ci_high
