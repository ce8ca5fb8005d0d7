"""Ground truth for the optimal loss, independent of lossfloor's estimators (DESIGN §3).

Product data sets: all combinations of per-coordinate values. Under the posterior the coordinates stay
independent, so J*(σ) is the sum over coordinates of the 1-D optimal loss
    J1(σ) = ∫ p(y) Var[x | y] dy,   p(y) = mean_i φ_σ(y - v_i),
computed by adaptive quadrature (scipy.integrate.quad) to ~1e-10.
"""

import itertools

import numpy as np
from scipy import integrate


def product_data(values_per_coordinate: list[list[float]]) -> np.ndarray:
    """All combinations, (prod n_i, d) float32."""
    return np.array(list(itertools.product(*values_per_coordinate)), dtype=np.float32)


def optimal_loss_1d(values, sigma: float) -> float:
    v = np.asarray(values, dtype=np.float64)

    def integrand(y):
        logk = -((y - v) ** 2) / (2 * sigma**2)
        m = logk.max()
        k = np.exp(logk - m)
        w = k / k.sum()
        var = (w * v * v).sum() - (w * v).sum() ** 2
        p = np.exp(m) * k.sum() / len(v) / np.sqrt(2 * np.pi * sigma**2)
        return p * var

    lo, hi = v.min() - 12 * sigma, v.max() + 12 * sigma
    points = np.unique(np.concatenate([v, (v[:-1] + v[1:]) / 2 if len(v) > 1 else v]))
    val, _ = integrate.quad(integrand, lo, hi, points=points, limit=500, epsabs=1e-14, epsrel=1e-11)
    return val


def product_optimal_loss(values_per_coordinate: list[list[float]], sigma: float) -> float:
    return float(sum(optimal_loss_1d(sorted(vals), sigma) for vals in values_per_coordinate))
