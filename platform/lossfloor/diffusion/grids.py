"""Noise-level grids and the parsing of user-given sigma lists.

Grids are float64 numpy arrays, sorted ascending, without duplicates.
A "MIN:MAX:COUNT" grid needs SIGMA_MIN <= MIN < MAX <= SIGMA_MAX and COUNT >= 2 (both endpoints are on
it); a single sigma is written as a list, e.g. "0.5".
"""

import math
import numbers

import numpy as np

from lossfloor.errors import InputError

MAX_SIGMAS = 10_000  # a bound on a parsed grid: 0.1:10:1e11 would allocate 745 GiB before any check
# The noise levels any lossfloor computation can take: the kernels divide by 2σ² in float32, and the
# targets' units scale J* by up to 1/σ⁴ in float64. 1e-300 overflowed (1/σ² = inf), 1e300 too (σ² = inf).
SIGMA_MIN, SIGMA_MAX = 1e-10, 1e10
_RANGE = f"in [{SIGMA_MIN:g}, {SIGMA_MAX:g}]"


def log_grid(sigma_min: float, sigma_max: float, count: int) -> np.ndarray:
    """count sigmas, geometrically spaced from sigma_min to sigma_max inclusive (float64, exact endpoints)."""
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if not is_sigma(value):
            raise InputError(f"{name}: expected a number {_RANGE} like 0.002, got {value!r}")
    if not sigma_min < sigma_max:
        raise InputError(f"sigma_max: expected a number above sigma_min={sigma_min!r}, got {sigma_max!r}")
    if not (isinstance(count, numbers.Integral) and not isinstance(count, bool) and count >= 2):
        raise InputError(f"count: expected an integer >= 2, got {count!r}")
    grid = np.exp(np.linspace(math.log(sigma_min), math.log(sigma_max), int(count), dtype=np.float64))
    grid[0], grid[-1] = sigma_min, sigma_max
    return grid


def parse_sigmas(text: str, *, flag: str = "--sigmas") -> np.ndarray:
    """Parse "0.1,0.5,2" into sorted unique positive float64 sigmas; InputError naming `flag` otherwise."""
    example = f"expected numbers {_RANGE} like 0.1,0.5,2"
    items = str(text).split(",")
    values = []
    for item in items:
        value = _to_float(item)
        if value is None or not is_sigma(value):
            raise InputError(f"{flag}: {example}, got {text!r}")
        values.append(value)
    if len(values) > MAX_SIGMAS:
        raise InputError(f"{flag}: expected at most {MAX_SIGMAS} sigmas, got {len(values)}")
    return np.unique(np.asarray(values, dtype=np.float64))


def parse_sigma_grid(text: str, *, flag: str = "--sigma-grid") -> np.ndarray:
    """Parse "MIN:MAX:COUNT" into log_grid(MIN, MAX, COUNT); InputError naming `flag` otherwise."""
    example = f"expected MIN:MAX:COUNT with MIN < MAX {_RANGE} and an integer COUNT >= 2, like 0.002:80:64"
    parts = str(text).split(":")
    if len(parts) != 3:
        raise InputError(f"{flag}: {example}, got {text!r}")
    sigma_min, sigma_max = _to_float(parts[0]), _to_float(parts[1])
    count = _to_int(parts[2])
    if sigma_min is None or sigma_max is None or count is None:
        raise InputError(f"{flag}: {example}, got {text!r}")
    if not (is_sigma(sigma_min) and is_sigma(sigma_max) and sigma_min < sigma_max):
        raise InputError(f"{flag}: {example}, got {text!r}")
    if count < 2:
        raise InputError(f"{flag}: {example} (for one sigma give a list like 0.5), got {text!r}")
    if count > MAX_SIGMAS:
        raise InputError(f"{flag}: expected at most {MAX_SIGMAS} sigmas, got COUNT = {count} in {text!r}")
    return log_grid(sigma_min, sigma_max, count)


def is_sigma(value) -> bool:
    """Whether value is a real number in [SIGMA_MIN, SIGMA_MAX]."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return real and SIGMA_MIN <= value <= SIGMA_MAX


def _to_float(item: str) -> float | None:
    try:
        return float(item.strip())
    except ValueError:
        return None


def _to_int(item: str) -> int | None:
    try:
        return int(item.strip())
    except ValueError:
        return None
