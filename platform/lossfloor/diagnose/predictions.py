"""What a foreign network predicts, turned into the x0 estimate D(x_hat; sigma) of VE coordinates.

Every named target of `lossfloor.diffusion.targets` is affine in x0 given x_hat = x0 + sigma eps:
target = (x0 - c_skip x_hat) / c_out, so D = c_skip x_hat + c_out F (paper Eq. 12) and the x0 loss is
c_out^2 times the loss in the target's units (J*_target = J*_x0 / c_out^2, `jstar_factor`):

  "x0"           c_skip 0               c_out 1
  "eps"          the "ddpm-eps" table   (1, -sigma)
  "score"        -eps / sigma           (1, sigma^2)
  "vp-v"         the "vp-v" table       (1/(1+sigma^2), -sigma/sqrt(1+sigma^2))
  "fm-velocity"  the "fm" table         (1/(1+sigma), -sigma/(1+sigma))

A network may see another process's coordinates (`--process`): x_t = a x_hat and its time t
(`lossfloor.diffusion.get_process`); the target is the same function of (x0, eps, sigma) either way.
"""

from __future__ import annotations

from lossfloor.diffusion import TARGETS, check_target, get_preconditioning

PREDICTIONS = TARGETS  # ("x0", "eps", "score", "fm-velocity", "vp-v")
_TABLES = {"eps": "ddpm-eps", "vp-v": "vp-v", "fm-velocity": "fm"}  # targets with a preconditioning table


def coefficients(prediction: str, sigma):
    """(c_skip, c_out) of `prediction` at sigma: D = c_skip x_hat + c_out F (module docstring)."""
    prediction = check_target(prediction, field="--prediction")
    if prediction == "x0":
        return 0 * sigma, sigma**0
    if prediction == "score":
        return sigma**0, sigma**2
    table = get_preconditioning(_TABLES[prediction])
    return table.c_skip(sigma), table.c_out(sigma)


def to_x0(prediction: str, F, x_hat, sigma):
    """D = c_skip x_hat + c_out F: the x0 estimate of a network output F in `prediction` units."""
    c_skip, c_out = coefficients(prediction, sigma)
    return c_skip * x_hat + c_out * F


__all__ = ["PREDICTIONS", "coefficients", "to_x0"]
