"""Statistics over independent seeds: a mean with its 95 % t-interval, and the words of a verdict.

A claim's measurement is repeated with seeds 0..S-1 (independent noise and draws). For values v_1..v_S the
interval is v̄ ± t_{0.975, S-1} · sd(v)/√S (Student's t: S is small). A comparison of two settings on the
same seeds is paired: the interval of the per-seed differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive at this scale"
NOT_TESTABLE = "not testable at this scale"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTABLE)


@dataclass(frozen=True)
class Interval:
    """A mean over S seeds and its 95 % t-interval (lo = hi = mean when S = 1: no spread to measure)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.lo > 0 or self.hi < 0)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}


def interval(values, level: float = 0.95) -> Interval:
    """The mean of `values` (one per seed) and its t-interval; NaN values are refused (ValueError)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64).ravel()
    if len(v) == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"interval: expected finite values, got {v.tolist()}")
    mean = float(v.mean())
    if len(v) == 1:
        return Interval(mean, mean, mean, 1)
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return Interval(mean, mean - half, mean + half, len(v))


def interval_text(d: dict) -> str:
    """An interval's dict (`Interval.to_dict`) as "mean [lo, hi]" (the mean alone for one seed)."""
    return f"{d['mean']:.3g}" if d["n"] == 1 else f"{d['mean']:.3g} [{d['lo']:.3g}, {d['hi']:.3g}]"


def paired(a, b) -> Interval:
    """The interval of the per-seed differences a_s - b_s (a and b measured on the same seeds)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired: {a.shape} and {b.shape} values are not the same seeds")
    return interval(a - b)
