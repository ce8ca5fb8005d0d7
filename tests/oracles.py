"""Ground truth for the optimal loss, independent of lossfloor's estimators.

Product data sets: all combinations of per-coordinate values. Under the posterior the coordinates stay
independent, so J*(σ) is the sum over coordinates of the 1-D optimal loss
    J1(σ) = ∫ p(y) Var[x | y] dy,   p(y) = mean_i φ_σ(y - v_i),
computed by adaptive quadrature (scipy.integrate.quad) to ~1e-10.

Products of 1-D Gaussian mixtures (component i: mean m_i, std s_i per coordinate) are the same oracle
for posterior latents: p(y) = mean_i N(y; m_i, s_i² + σ²) and Var[x | y] = Σ_i r_i (v_i + μ_i²) - (Σ_i r_i μ_i)²,
with r_i ∝ N(y; m_i, s_i² + σ²), μ_i = m_i + s_i²/(s_i² + σ²)(y - m_i), v_i = s_i²σ²/(s_i² + σ²).
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


def mixture_optimal_loss_1d(means, stds, sigma: float) -> float:
    m, s = np.asarray(means, dtype=np.float64), np.asarray(stds, dtype=np.float64)
    var = s * s + sigma**2

    def integrand(y):
        logk = -((y - m) ** 2) / (2 * var) - 0.5 * np.log(2 * np.pi * var)
        top = logk.max()
        k = np.exp(logk - top)
        r = k / k.sum()
        mu = m + s * s / var * (y - m)
        v = s * s * sigma**2 / var
        post_var = (r * (v + mu * mu)).sum() - (r * mu).sum() ** 2
        return np.exp(top) * k.sum() / len(m) * post_var

    width = 12 * np.sqrt(var.max())
    val, _ = integrate.quad(integrand, m.min() - width, m.max() + width, points=np.unique(m), limit=500,
                            epsabs=1e-14, epsrel=1e-11)
    return val


def product_mixture(components_per_coordinate: list[list[tuple[float, float]]]) -> np.ndarray:
    """All combinations of per-coordinate (mean, std) components as [mean (d), std (d)] rows, float32."""
    combos = list(itertools.product(*components_per_coordinate))
    means = np.array([[c[0] for c in combo] for combo in combos])
    stds = np.array([[c[1] for c in combo] for combo in combos])
    return np.concatenate([means, stds], 1).astype(np.float32)


def product_mixture_optimal_loss(components_per_coordinate, sigma: float) -> float:
    return float(sum(mixture_optimal_loss_1d([c[0] for c in comps], [c[1] for c in comps], sigma)
                     for comps in components_per_coordinate))
