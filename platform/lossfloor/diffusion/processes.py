"""Diffusion processes x_t = a(t) x0 + s(t) eps and their map to VE coordinates.

Every process is the variance-exploding one in disguise (paper §3, Eq. 12): with
sigma = s(t) / a(t) the rescaled sample x_hat = x_t / a(t) = x0 + sigma * eps.
So J*(sigma) is a property of the data and sigma alone; a process only says how t maps to sigma.

Time variables: VE uses t = sigma; VP is parametrised by sigma directly (t = sigma, a^2 + s^2 = 1),
so a noise schedule such as DDPM's beta_t or the cosine one is a map t_schedule -> sigma kept outside
this module; flow matching uses t in [0, 1) with a = 1 - t, s = t.
"""

from collections.abc import Callable
from dataclasses import dataclass

from lossfloor.diffusion._ops import check_name

# --- VE (variance exploding): a = 1, s = t, so sigma = t ---------------------------------------


def a_ve(t):
    """a(t) = 1 (VE process; paper §1)."""
    return t**0


def s_ve(t):
    """s(t) = t (VE process; paper §1)."""
    return t


def t_ve(sigma):
    """t(sigma) = sigma (VE process)."""
    return sigma


# --- VP (variance preserving), parametrised by sigma: a^2 + s^2 = 1 ----------------------------


def a_vp(sigma):
    """a = 1 / sqrt(1 + sigma^2) (VP process, a^2 + s^2 = 1; paper §1)."""
    return 1 / (1 + sigma**2) ** 0.5


def s_vp(sigma):
    """s = sigma / sqrt(1 + sigma^2) (VP process, a^2 + s^2 = 1; paper §1)."""
    return sigma / (1 + sigma**2) ** 0.5


def t_vp(sigma):
    """t(sigma) = sigma (the VP process is parametrised by sigma itself)."""
    return sigma


# --- Flow matching / rectified flow: a = 1 - t, s = t --------------------------------------------


def a_fm(t):
    """a(t) = 1 - t (flow matching; paper §1, SD3)."""
    return 1 - t


def s_fm(t):
    """s(t) = t (flow matching; paper §1, SD3)."""
    return t


def t_fm(sigma):
    """t(sigma) = sigma / (1 + sigma), the inverse of sigma = t / (1 - t) (flow matching)."""
    return sigma / (1 + sigma)


# --- Shared maps (paper §3, Eq. 12) ------------------------------------------------------------


def sigma_from_scales(a, s):
    """sigma = s / a, the VE noise level of x_t = a x0 + s eps (paper §3, Eq. 12)."""
    return s / a


def x_t(x0, eps, a, s):
    """x_t = a x0 + s eps (paper §1)."""
    return a * x0 + s * eps


def x_hat(x_t, a):
    """x_hat = x_t / a = x0 + sigma eps, the sample in VE coordinates (paper §3, Eq. 12)."""
    return x_t / a


@dataclass(frozen=True, kw_only=True)
class Process:
    """One diffusion process: its scales a(t), s(t) and the inverse t(sigma) of sigma(t) = s(t)/a(t)."""

    name: str
    a: Callable  # t -> a(t), signal scale
    s: Callable  # t -> s(t), noise scale
    t_of_sigma: Callable  # sigma -> t, inverse of sigma(t)

    def sigma(self, t):
        """sigma(t) = s(t) / a(t) (paper §3, Eq. 12)."""
        return sigma_from_scales(self.a(t), self.s(t))

    def t(self, sigma):
        """t(sigma), the process time at VE noise level sigma."""
        return self.t_of_sigma(sigma)

    def scales(self, sigma):
        """(a, s) at VE noise level sigma."""
        t = self.t_of_sigma(sigma)
        return self.a(t), self.s(t)

    def x_hat(self, xt, t):
        """x_hat = x_t / a(t) = x0 + sigma(t) eps (paper §3, Eq. 12)."""
        return x_hat(xt, self.a(t))


VE = Process(name="ve", a=a_ve, s=s_ve, t_of_sigma=t_ve)
VP = Process(name="vp", a=a_vp, s=s_vp, t_of_sigma=t_vp)
FM = Process(name="fm", a=a_fm, s=s_fm, t_of_sigma=t_fm)

_PROCESSES = {p.name: p for p in (VE, VP, FM)}
PROCESSES = tuple(_PROCESSES)  # ("ve", "vp", "fm")


def get_process(name: str) -> Process:
    """The process registered as `name` ("ve", "vp" or "fm"); InputError otherwise."""
    return _PROCESSES[check_name("process", name, PROCESSES)]
