"""Preconditioning tables: D(x_hat; sigma) = c_skip x_hat + c_out F(c_in x_hat; c_noise).

Paper §3, Eq. 12 / Table 1; the EDM row is EDM paper (Karras et al. 2022) Table 1. Every model,
whatever its process and target, is a denoiser D of x_hat = x0 + sigma eps in VE coordinates, and its
network F is trained on the native target (x0 - c_skip x_hat) / c_out, so the per-sigma x0 loss is
||D - x0||^2 = c_out^2 ||F - native target||^2.

  name       process F* = native target             c_skip           c_out               c_in
  "edm"      ve      (s x0/sd - sd eps)/sqrt(s^2+sd^2) sd^2/(s^2+sd^2)  s sd/sqrt(s^2+sd^2) 1/sqrt(s^2+sd^2)
  "fm"       fm      eps - x0 = "fm-velocity"         1/(1+s)          -s/(1+s)            1/(1+s)
  "ncsn"     ve      -eps = -1 x "eps"                1                s                   1
  "ddpm-eps" vp      eps = "eps"                      1                -s                  1/sqrt(1+s^2)
  "vp-v"     vp      a eps - s_t x0 = "vp-v"          1/(1+s^2)        -s/sqrt(1+s^2)      1/sqrt(1+s^2)

(s = sigma, sd = sigma_data, a = 1/sqrt(1+s^2), s_t = s a.)
c_in x_hat is the process's own x_t for fm, ddpm-eps and vp-v.
The EDM target equals -1 x the "vp-v" target of the data scaled by 1/sd at noise level sigma/sd.

c_noise, the network's noise input, does not affect any loss; where the paper does not publish it,
it is a **[choice]** (replace the field with dataclasses.replace to change it):
edm ln(sigma)/4 (EDM Table 1); fm t = sigma/(1+sigma); ncsn ln(sigma^2) (paper §3, NCSN loss);
ddpm-eps (M-1) t_VP(sigma) with EDM's VP schedule, beta_d = 19.9, beta_min = 0.1, M = 1000 (EDM Table 1);
vp-v the cosine-schedule time t = (2/pi) arctan(sigma), i.e. s_t = sin(pi t / 2) (paper appendix).
"""

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from lossfloor.diffusion._ops import atan, check_name, expm1, log
from lossfloor.errors import InputError

SIGMA_DATA = 0.5  # EDM default sigma_data (EDM paper Table 1; EDM2 latents are whitened to std 0.5)

# --- EDM (EDM paper Table 1, "Ours") --------------------------------------------------------------


def c_skip_edm(sigma, sigma_data=SIGMA_DATA):
    """c_skip = sd^2 / (sigma^2 + sd^2) (EDM paper Table 1)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out_edm(sigma, sigma_data=SIGMA_DATA):
    """c_out = sigma sd / sqrt(sigma^2 + sd^2) (EDM paper Table 1)."""
    return sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5


def c_in_edm(sigma, sigma_data=SIGMA_DATA):
    """c_in = 1 / sqrt(sigma^2 + sd^2) (EDM paper Table 1)."""
    return 1 / (sigma**2 + sigma_data**2) ** 0.5


def c_noise_edm(sigma):
    """c_noise = ln(sigma) / 4 (EDM paper Table 1)."""
    return log(sigma) / 4


# --- Flow matching / SD3 (paper Table 1) ----------------------------------------------------------


def c_skip_fm(sigma):
    """c_skip = 1 / (1 + sigma) (paper Table 1, FM/SD3)."""
    return 1 / (1 + sigma)


def c_out_fm(sigma):
    """c_out = -sigma / (1 + sigma) (paper Table 1, FM/SD3)."""
    return -sigma / (1 + sigma)


def c_in_fm(sigma):
    """c_in = 1 / (1 + sigma) = 1 - t, so c_in x_hat = x_t (paper Table 1, FM/SD3)."""
    return 1 / (1 + sigma)


def c_noise_fm(sigma):
    """c_noise = t = sigma / (1 + sigma) (paper Table 1 [I])."""
    return sigma / (1 + sigma)


# --- NCSN, VE with an eps network trained on ||eps_theta + eps||^2 (paper Table 1 [I]) ------------


def c_skip_ncsn(sigma):
    """c_skip = 1 (paper Table 1, NCSN)."""
    return sigma**0


def c_out_ncsn(sigma):
    """c_out = sigma, so F* = -eps (paper Table 1, NCSN)."""
    return sigma


def c_in_ncsn(sigma):
    """c_in = 1 (paper Table 1, NCSN)."""
    return sigma**0


def c_noise_ncsn(sigma):
    """c_noise = ln(sigma^2) (paper §3: the NCSN loss E||eps_theta(x0 + sigma eps, ln sigma^2) + eps||^2)."""
    return 2 * log(sigma)


# --- DDPM / VP eps-prediction (paper Table 1 [I]) -------------------------------------------------

VP_BETA_D = 19.9  # EDM paper Table 1, VP: beta_d
VP_BETA_MIN = 0.1  # EDM paper Table 1, VP: beta_min
VP_M = 1000  # EDM paper Table 1, VP: number of training steps M


def c_skip_ddpm_eps(sigma):
    """c_skip = 1 (paper Table 1, DDPM eps)."""
    return sigma**0


def c_out_ddpm_eps(sigma):
    """c_out = -sigma, so F* = eps (paper Table 1, DDPM eps)."""
    return -sigma


def c_in_ddpm_eps(sigma):
    """c_in = 1 / sqrt(1 + sigma^2), so c_in x_hat = x_t of the VP process (paper Table 1, DDPM eps)."""
    return 1 / (1 + sigma**2) ** 0.5


def vp_sigma(t):
    """sigma(t) = sqrt(exp(b_d t^2 / 2 + b_min t) - 1) of the linear-beta VP schedule (EDM paper Table 1, VP).

    It is DDPM's discrete schedule (Ho et al. 2020: beta_i linear from 1e-4 to 0.02 over T = 1000 steps,
    sigma_i = sqrt(1 / abar_i - 1)) in continuous time (Song et al. 2021, VP SDE: beta(t) = b_min + t b_d with
    b_min = T beta_1 = 0.1 and b_min + b_d = T beta_T = 20), as abar(t) = exp(-(b_d t^2 / 2 + b_min t))."""
    return expm1(VP_BETA_D * t**2 / 2 + VP_BETA_MIN * t) ** 0.5


def vp_time(sigma):
    """t(sigma) = (sqrt(b_min^2 + 2 b_d ln(1 + sigma^2)) - b_min) / b_d, the inverse of `vp_sigma`
    (EDM paper Table 1, VP)."""
    return ((VP_BETA_MIN**2 + 2 * VP_BETA_D * log(1 + sigma**2)) ** 0.5 - VP_BETA_MIN) / VP_BETA_D


def c_noise_ddpm_eps(sigma):
    """c_noise = (M-1) t(sigma), t = `vp_time` (EDM paper Table 1, VP)."""
    return (VP_M - 1) * vp_time(sigma)


# --- VP v-prediction (paper Table 1 [I]) ----------------------------------------------------------


def c_skip_vp_v(sigma):
    """c_skip = 1 / (1 + sigma^2) (paper Table 1, VP v)."""
    return 1 / (1 + sigma**2)


def c_out_vp_v(sigma):
    """c_out = -sigma / sqrt(1 + sigma^2), so F* = a eps - s x0 (paper Table 1, VP v)."""
    return -sigma / (1 + sigma**2) ** 0.5


def c_in_vp_v(sigma):
    """c_in = 1 / sqrt(1 + sigma^2), so c_in x_hat = x_t of the VP process (paper Table 1, VP v)."""
    return 1 / (1 + sigma**2) ** 0.5


def c_noise_vp_v(sigma):
    """c_noise = t = (2/pi) arctan(sigma), the time of s_t = sin(pi t / 2) (paper appendix) [choice]."""
    return (2 / math.pi) * atan(sigma)


# --- The table type -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Preconditioning:
    """One row of paper Table 1: D(x_hat; sigma) = c_skip x_hat + c_out F(c_in x_hat; c_noise).

    sigma may be a float, numpy array or torch tensor; it must broadcast against x_hat
    (e.g. shape (B, 1, 1, 1) for a batch of images).
    """

    name: str  # registry name: "edm", "fm", "ncsn", "ddpm-eps", "vp-v"
    process: str  # the process whose x_t the network sees: "ve", "vp" or "fm"
    target: str | None  # named target (lossfloor.diffusion.targets) that F* equals up to target_sign;
    #                     None for EDM, whose F target is its own (see the module docstring)
    target_sign: float = 1.0  # F* = target_sign * target (NCSN: -1, its net predicts -eps)
    sigma_data: float | None = None  # EDM only: the data standard deviation sd
    c_skip: Callable = field(compare=False, repr=False)  # sigma -> c_skip
    c_out: Callable = field(compare=False, repr=False)  # sigma -> c_out
    c_in: Callable = field(compare=False, repr=False)  # sigma -> c_in
    c_noise: Callable = field(compare=False, repr=False)  # sigma -> c_noise, the network's noise input

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at sigma (paper Table 1)."""
        return self.c_skip(sigma), self.c_out(sigma), self.c_in(sigma), self.c_noise(sigma)

    def denoise(self, F_out, x_hat, sigma):
        """D = c_skip x_hat + c_out F_out, with F_out = F(c_in x_hat; c_noise) (paper Eq. 12)."""
        return self.c_skip(sigma) * x_hat + self.c_out(sigma) * F_out

    def native_target(self, x0, x_hat, sigma):
        """The network's training target (x0 - c_skip x_hat) / c_out (paper Eq. 12)."""
        return (x0 - self.c_skip(sigma) * x_hat) / self.c_out(sigma)

    def native_to_x0_loss(self, loss_native, sigma):
        """Per-sigma x0 loss = c_out^2 * native loss, as ||D - x0||^2 = c_out^2 ||F - target||^2 (Eq. 12)."""
        return self.c_out(sigma) ** 2 * loss_native

    def x0_to_native_loss(self, loss_x0, sigma):
        """Native loss = x0 loss / c_out^2, e.g. J* in the network's own units (paper Eq. 12)."""
        return loss_x0 / self.c_out(sigma) ** 2


def edm(sigma_data: float = SIGMA_DATA) -> Preconditioning:
    """EDM preconditioning with data standard deviation sigma_data (EDM paper Table 1)."""
    real = isinstance(sigma_data, numbers.Real) and not isinstance(sigma_data, bool)
    if not (real and math.isfinite(sigma_data) and sigma_data > 0):
        raise InputError(f"sigma_data: expected a positive number like 0.5, got {sigma_data!r}")
    sigma_data = float(sigma_data)
    return Preconditioning(
        name="edm",
        process="ve",
        target=None,
        sigma_data=sigma_data,
        c_skip=partial(c_skip_edm, sigma_data=sigma_data),
        c_out=partial(c_out_edm, sigma_data=sigma_data),
        c_in=partial(c_in_edm, sigma_data=sigma_data),
        c_noise=c_noise_edm,
    )


FM = Preconditioning(
    name="fm", process="fm", target="fm-velocity",
    c_skip=c_skip_fm, c_out=c_out_fm, c_in=c_in_fm, c_noise=c_noise_fm,
)  # fmt: skip
NCSN = Preconditioning(
    name="ncsn", process="ve", target="eps", target_sign=-1.0,
    c_skip=c_skip_ncsn, c_out=c_out_ncsn, c_in=c_in_ncsn, c_noise=c_noise_ncsn,
)  # fmt: skip
DDPM_EPS = Preconditioning(
    name="ddpm-eps", process="vp", target="eps",
    c_skip=c_skip_ddpm_eps, c_out=c_out_ddpm_eps, c_in=c_in_ddpm_eps, c_noise=c_noise_ddpm_eps,
)  # fmt: skip
VP_V = Preconditioning(
    name="vp-v", process="vp", target="vp-v",
    c_skip=c_skip_vp_v, c_out=c_out_vp_v, c_in=c_in_vp_v, c_noise=c_noise_vp_v,
)  # fmt: skip

_FIXED = {p.name: p for p in (FM, NCSN, DDPM_EPS, VP_V)}
PRECONDITIONINGS = ("edm", *_FIXED)  # ("edm", "fm", "ncsn", "ddpm-eps", "vp-v")


def get_preconditioning(name: str, *, sigma_data: float | None = None) -> Preconditioning:
    """The table registered as `name`; sigma_data (default 0.5) is accepted for "edm" only."""
    check_name("preconditioning", name, PRECONDITIONINGS)
    if name == "edm":
        return edm(SIGMA_DATA if sigma_data is None else sigma_data)
    if sigma_data is not None:
        raise InputError(f"sigma_data: only the 'edm' preconditioning takes sigma_data, not {name!r}")
    return _FIXED[name]
