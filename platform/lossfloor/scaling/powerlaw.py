"""The three power-law forms, fitted on the same points with log-space residuals.

Xu et al. (2026, §5, Eq. 13) fit the gap to the optimal loss, J(F) - J* = beta F^alpha, instead of the
raw J(F) = beta F^alpha, because part of ln J(F) cannot be reduced by compute. For the total loss they
report J(F) = 0.3675 F^-0.014 + 0.015 (Pearson rho 0.9917), and rho 0.82 -> 0.94 at a high sigma.

    raw          ln J        = ln beta + alpha ln F                 ordinary least squares
    corrected    ln(J - J*)  = ln beta + alpha ln F                 ordinary least squares, J* given
    free_offset  ln J        = ln(E + beta F^alpha),  0 <= E < min J  Huber loss (delta 1e-3) on the
                                                                     ln J residual, multi-start

alpha < 0 for a loss that falls with compute (the paper's F^-0.014 is alpha = -0.014).

Goodness of fit, per form, with offset c = 0 (raw), J* (corrected) or E (free_offset):
  rho       Pearson correlation of (ln F, ln(J - c)); negative for a falling power law, so the paper's
            rho is |rho| (`abs_rho`). Compare forms only on identical point sets.
  r2        1 - SS_res / SS_tot of the straight line in (ln F, ln(J - c)); equals rho^2 for the two OLS forms.
  log_rmse  sqrt(mean (ln J - ln J_hat)^2), on ln J for every form, so it is comparable across forms.
rho and r2 are undefined (NaN, printed "-") on a curve that is flat within the loss's round-off: ln(J - c)
then varies by no more than LOSS_RESOLUTION·max J / min(J - c), and a line through round-off has any R²
(a constant curve printed R² = 0.90: the free offset E near min J magnifies J's last digits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

FORMS = ("raw", "corrected", "free_offset")
HUBER_DELTA = 1e-3  # on ln J residuals, as in Hoffmann et al. (2022) and OLMo's ladder fits
E_STARTS = (0.0, 0.25, 0.5, 0.75, 0.9, 0.97)  # free-offset starts, as fractions of min J
N_STARTS = 2  # free-offset starts refined by least squares (the best by Huber loss at the start)
E_MARGIN = 1e-6  # E <= (1 - E_MARGIN) min J
LOSS_RESOLUTION = 1e-6  # relative round-off of a loss (float32 losses, 6e-8, averaged over batches)


@dataclass(frozen=True)
class PowerLawFit:
    """One fitted form: J_hat(F) = offset + beta * F**alpha."""

    form: str  # "raw" | "corrected" | "free_offset"
    alpha: float
    beta: float
    offset: float  # 0 (raw), J* (corrected), fitted E (free_offset)
    rho: float  # Pearson(ln F, ln(J - offset)), negative for a falling law
    r2: float  # of the line in (ln F, ln(J - offset))
    log_rmse: float  # sqrt(mean (ln J - ln J_hat)^2)
    n_points: int
    at_bound: bool = False  # free_offset only: E ended on its upper bound (min J): E not identified

    @property
    def abs_rho(self) -> float:
        return abs(self.rho)

    def predict(self, flops) -> np.ndarray:
        """J_hat(F) = offset + beta F^alpha."""
        return self.offset + self.beta * np.exp(self.alpha * np.log(np.asarray(flops, dtype=np.float64)))


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line y = intercept + slope x."""
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def _line_stats(log_f: np.ndarray, y: np.ndarray, alpha: float, log_beta: float,
                loss: np.ndarray, offset: float) -> tuple[float, float]:
    """(rho, r2) of the line y = log_beta + alpha ln F on the points (ln F, y = ln(loss - offset)); rho is
    Pearson's r. Both NaN when y varies by no more than its round-off (module docstring)."""
    round_off = LOSS_RESOLUTION * float(loss.max()) / float((loss - offset).min())
    if not np.ptp(y) > 2 * round_off:
        return math.nan, math.nan
    rho = float(np.corrcoef(log_f, y)[0, 1])
    ss_res = float(np.sum((y - log_beta - alpha * log_f) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return rho, 1.0 - ss_res / ss_tot


def _log_rmse(loss: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.log(loss) - np.log(predicted)) ** 2)))


def _ols(form: str, log_f: np.ndarray, loss: np.ndarray, offset: float) -> PowerLawFit:
    y = np.log(loss - offset)
    alpha, log_beta = _line(log_f, y)
    rho, r2 = _line_stats(log_f, y, alpha, log_beta, loss, offset)
    predicted = offset + np.exp(log_beta + alpha * log_f)
    return PowerLawFit(form, alpha, math.exp(log_beta), offset, rho, r2, _log_rmse(loss, predicted), len(y))


def fit_raw(flops, loss) -> PowerLawFit:
    """(a) J = beta F^alpha by least squares on ln J = ln beta + alpha ln F."""
    return _ols("raw", np.log(np.asarray(flops, float)), np.asarray(loss, float), 0.0)


def fit_corrected(flops, loss, j_star: float) -> PowerLawFit:
    """(b) Eq. 13: J - J* = beta F^alpha by least squares on ln(J - J*) = ln beta + alpha ln F.

    Requires J* < min J (raises ValueError otherwise; the API checks it first with an InputError).
    """
    loss = np.asarray(loss, float)
    if not j_star < loss.min():
        raise ValueError(f"J* = {j_star:g} must be below the smallest loss {loss.min():g}")
    return _ols("corrected", np.log(np.asarray(flops, float)), loss, float(j_star))


def fit_free_offset(
    flops, loss, *, delta: float = HUBER_DELTA, start: PowerLawFit | None = None, n_starts: int = N_STARTS
) -> PowerLawFit:
    """(c) J = E + beta F^alpha, 0 <= E < min J, minimising sum Huber_delta(ln J - ln(E + beta F^alpha)).

    Parameters theta = (E, b, alpha) with beta = exp(b - alpha x0), x = ln F - x0 centred for
    conditioning. Starts: for each E0 in E_STARTS * min J, (b, alpha) by OLS of ln(J - E0) on x; the
    `n_starts` best starts by Huber loss are refined by `scipy.optimize.least_squares(loss="huber")`
    (trust-region, bounds 0 <= E <= (1 - 1e-6) min J); the lowest Huber loss wins. `start`, a fit of
    similar data (the full-data fit, for a bootstrap replicate), is one more start.
    """
    log_f, loss = np.log(np.asarray(flops, float)), np.asarray(loss, float)
    if len(np.unique(log_f)) < 3:
        raise ValueError("the free-offset form needs at least 3 distinct flops values")
    x0 = float(log_f.mean())
    x, log_j, j_min = log_f - x0, np.log(loss), float(loss.min())
    e_hi = j_min * (1.0 - E_MARGIN)

    def residual(theta):  # (n,) ln J - ln(E + g), g = exp(b + alpha x)
        e, b, a = theta
        return log_j - np.log(e + np.exp(b + a * x))

    def jacobian(theta):  # (n, 3)
        e, b, a = theta
        g = np.exp(b + a * x)
        s = e + g
        return -np.stack([1.0 / s, g / s, g * x / s], axis=1)

    starts = []
    for frac in E_STARTS:
        e0 = min(frac * j_min, e_hi)
        slope, intercept = _line(x, np.log(loss - e0))
        theta = np.array([e0, intercept, slope])
        starts.append((float(np.sum(special.huber(delta, residual(theta)))), theta))
    if start is not None:
        theta = np.array([min(start.offset, e_hi), math.log(start.beta) + start.alpha * x0, start.alpha])
        starts.append((float(np.sum(special.huber(delta, residual(theta)))), theta))
    starts.sort(key=lambda s: s[0])
    best = None
    for _, theta0 in starts[:n_starts]:
        res = optimize.least_squares(
            residual,
            theta0,
            jac=jacobian,
            bounds=([0.0, -np.inf, -np.inf], [e_hi, np.inf, np.inf]),
            loss="huber",
            f_scale=delta,
            method="trf",
            x_scale="jac",
            max_nfev=500,
        )
        if best is None or res.cost < best.cost:
            best = res
    e, b, alpha = (float(v) for v in best.x)
    log_beta = b - alpha * x0
    y = np.log(loss - e)
    rho, r2 = _line_stats(log_f, y, alpha, log_beta, loss, e)
    predicted = e + np.exp(b + alpha * x)
    return PowerLawFit(
        "free_offset",
        alpha,
        math.exp(log_beta),
        e,
        rho,
        r2,
        _log_rmse(loss, predicted),
        len(loss),
        at_bound=bool(e >= e_hi * (1 - 1e-9)),
    )
