"""Prediction targets and the conversion of the optimal loss between them.

Given x_t every target below is affine in x0, target = (x0 - c_skip x_hat) / c_out, so its optimal
loss is the x0 one scaled by 1 / c_out^2: J*_target(sigma) = jstar_factor(target, sigma) * J*_x0(sigma)
(paper Theorem 1 and §1 [I]). All in VE coordinates, sigma = s/a, x_hat = x0 + sigma eps:

  "x0"           x0                                   factor 1
  "eps"          eps                                  factor 1 / sigma^2
  "score"        -eps / sigma  (score of p(x_hat))    factor 1 / sigma^4
  "fm-velocity"  eps - x0, t = sigma / (1 + sigma)    factor (1 + sigma)^2 / sigma^2   [derived]
  "vp-v"         a eps - s x0, a^2 + s^2 = 1          factor (1 + sigma^2) / sigma^2   [derived]

"score" is the score of the VE marginal p(x_hat), -eps/sigma; the score of a VP marginal p(x_t) is
-eps/s, a different scale ((1 + sigma^2) / sigma^4). The derived factors are checked against quadrature
in tests/test_diffusion.py.
"""

from lossfloor.diffusion._ops import check_name


def jstar_factor_x0(sigma):
    """J*_x0 / J*_x0 = 1 (paper Theorem 1)."""
    return sigma**0


def jstar_factor_eps(sigma):
    """J*_eps / J*_x0 = 1 / sigma^2, since eps = (x_hat - x0) / sigma (paper §1 [I])."""
    return 1 / sigma**2


def jstar_factor_score(sigma):
    """J*_score / J*_x0 = 1 / sigma^4, since score = -eps / sigma = (x0 - x_hat) / sigma^2 (paper §1 [I])."""
    return 1 / sigma**4


def jstar_factor_fm_velocity(sigma):
    """J*_v / J*_x0 = (1 + sigma)^2 / sigma^2 = 1/t^2, since eps - x0 = (x_t - x0) / t (paper §1 [I])."""
    return (1 + sigma) ** 2 / sigma**2


def jstar_factor_vp_v(sigma):
    """J*_v / J*_x0 = (1 + sigma^2) / sigma^2 = 1/s^2, as a eps - s x0 = (a x_t - x0) / s (paper §1 [I])."""
    return (1 + sigma**2) / sigma**2


_FACTORS = {
    "x0": jstar_factor_x0,
    "eps": jstar_factor_eps,
    "score": jstar_factor_score,
    "fm-velocity": jstar_factor_fm_velocity,
    "vp-v": jstar_factor_vp_v,
}
TARGETS = tuple(_FACTORS)  # ("x0", "eps", "score", "fm-velocity", "vp-v")


def check_target(target: str, *, field: str = "target") -> str:
    """`target` if it is a known target name, else InputError naming `field` (e.g. "--target")."""
    return check_name(field, target, TARGETS)


def jstar_factor(target: str, sigma):
    """J*_target(sigma) / J*_x0(sigma) for a named target (see the module docstring)."""
    return _FACTORS[check_target(target)](sigma)


def convert_jstar(j_star_x0, sigma, target: str):
    """J*_target(sigma) = jstar_factor(target, sigma) * J*_x0(sigma) (paper Theorem 1, §1 [I])."""
    return jstar_factor(target, sigma) * j_star_x0
