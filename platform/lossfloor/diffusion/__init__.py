"""Diffusion processes, prediction targets, preconditioning tables and sigma grids.

Everything is expressed in VE coordinates with the x0 target (paper §3, Eq. 12): sigma = s/a and
x_hat = x_t / a = x0 + sigma eps. The formulas are small pure functions of floats, numpy arrays or
torch tensors.
"""

from lossfloor.diffusion.grids import log_grid, parse_sigma_grid, parse_sigmas
from lossfloor.diffusion.preconditioning import (
    PRECONDITIONINGS,
    SIGMA_DATA,
    Preconditioning,
    edm,
    get_preconditioning,
)
from lossfloor.diffusion.processes import (
    PROCESSES,
    Process,
    get_process,
    sigma_from_scales,
    x_hat,
    x_t,
)
from lossfloor.diffusion.targets import TARGETS, check_target, convert_jstar, jstar_factor

__all__ = [
    "PRECONDITIONINGS",
    "PROCESSES",
    "SIGMA_DATA",
    "TARGETS",
    "Preconditioning",
    "Process",
    "check_target",
    "convert_jstar",
    "edm",
    "get_preconditioning",
    "get_process",
    "jstar_factor",
    "log_grid",
    "parse_sigma_grid",
    "parse_sigmas",
    "sigma_from_scales",
    "x_hat",
    "x_t",
]
