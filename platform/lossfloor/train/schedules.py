"""Training schedules: how sigma is drawn and how each sample's x0 loss is weighted.

A schedule is the pair (p(sigma), w(sigma)) of the training objective E_{sigma ~ p} w(sigma) ||D - x0||^2
(paper §4), with sigma in VE coordinates and the loss in x0 units whatever the process.

Configs (frozen, keyword-only; pick one as `TrainConfig.schedule`):
- `EDM2Schedule`: ln sigma ~ N(P_mean, P_std^2), w = lambda(sigma) = 1/c_out(sigma)^2 (the native loss of the
  preconditioning; EDM2 paper Eq. 5 / edm2.md §4), plus EDM2's learned log-variance u(sigma) by default.
- `FMSchedule`: flow matching / SD3 (paper §1): t ~ logit-normal(t_mean, t_std), sigma = t/(1-t), so
  ln sigma = logit t ~ N(t_mean, t_std^2); w = 1/c_out^2, i.e. ||v - (eps - x0)||^2 with the "fm" table.
- `NCSNSchedule`: NCSN's noise levels in continuous form (paper §3, the NCSN loss; EDM paper Table 1, VE):
  ln sigma ~ U(ln sigma_min, ln sigma_max), w = 1/c_out^2; with the "ncsn" table that is the NCSN loss
  ||eps_theta + eps||^2, i.e. NCSN's lambda(sigma) = sigma^2 on its score loss.
- `VPSchedule`: DDPM's linear-beta VP schedule in continuous form (EDM paper Table 1, VP): t ~ U(t_min, 1),
  sigma = `lossfloor.diffusion.preconditioning.vp_sigma(t)`, w = 1/c_out^2; with the "ddpm-eps" table that is
  DDPM's simple loss ||eps_theta - eps||^2, with the "vp-v" table the v-prediction loss ||v_theta - v||^2.
- `OptimalLossSchedule`: the paper's schedule (paper §4):
      w(sigma) = a min(1/J*(sigma), w_max) + b N(ln sigma; mu, varsigma^2) 1[sigma < sigma*]
      p(sigma) ∝ w(sigma) (J_sigma(theta) - J*(sigma)), tracked online by `GapTracker`.

Runtime objects (`build_schedule`) hold the J* curve and the tracker; they work on torch tensors on
any device and keep all state in `state_dict()` (plain tensors) for exact resume.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lossfloor.diffusion import Preconditioning
from lossfloor.diffusion.grids import SIGMA_MAX, SIGMA_MIN, is_sigma
from lossfloor.diffusion.preconditioning import VP_BETA_D, VP_BETA_MIN, vp_sigma
from lossfloor.errors import InputError
from lossfloor.floor.table import SIGMA_STAR_THRESHOLD, JStarX0, read_table, sigma_star, sigma_star_bracket

SQRT_2PI = math.sqrt(2 * math.pi)
log = logging.getLogger(__name__)


# --- Configs --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EDM2Schedule:
    """EDM2's schedule (edm2.md §4): ln sigma ~ N(P_mean, P_std^2), w = 1/c_out^2, learned u(sigma)."""

    kind: ClassVar[str] = "edm2"
    P_mean: float | None = None  # mean of ln sigma; None = the preset's (img512 -0.4, img64 -0.8)
    P_std: float | None = None  # std of ln sigma; None = the preset's (img512 1.0, img64 1.6)
    uncertainty: bool = True  # learned log-variance weighting L = w/e^u ||D - x0||^2 + d u (edm2.md §4)

    def __post_init__(self):
        _check_real(self, "P_mean", allow_none=True)
        _check_real(self, "P_std", allow_none=True, positive=True)
        _check_bool(self, "uncertainty")


@dataclass(frozen=True, kw_only=True)
class FMSchedule:
    """Flow matching / SD3 (paper §1): t ~ logit-normal(t_mean, t_std), sigma = t/(1 - t), w = 1/c_out^2."""

    kind: ClassVar[str] = "fm"
    t_mean: float = 0.0  # m of the logit-normal; SD3's m = 0, s = 1 (paper §1)
    t_std: float = 1.0  # s of the logit-normal
    uncertainty: bool = False  # [choice] SD3 trains without EDM2's learned weighting

    def __post_init__(self):
        _check_real(self, "t_mean")
        _check_real(self, "t_std", positive=True)
        _check_bool(self, "uncertainty")


@dataclass(frozen=True, kw_only=True)
class NCSNSchedule:
    """NCSN (paper §3: E||eps_theta(x0 + sigma eps, ln sigma^2) + eps||^2 with ln sigma ~ U(ln sigma_min,
    ln sigma_max)): log-uniform sigma, w = 1/c_out^2. NCSN's own loss is the score loss weighted by
    lambda(sigma) = sigma^2 (Song & Ermon 2019, Eq. 2): sigma^2 ||s_theta + eps/sigma||^2 = ||eps_theta + eps||^2
    with eps_theta = sigma s_theta, which is ||D - x0||^2 / sigma^2 = ||D - x0||^2 / c_out^2 in x0 units
    ("ncsn" table, c_out = sigma). Song & Ermon draw sigma from a geometric sequence; its continuous form
    is the log-uniform density, over EDM's VE range (EDM paper Table 1, VE: sigma in [0.02, 100])."""

    kind: ClassVar[str] = "ncsn"
    sigma_min: float = 0.02  # EDM paper Table 1, VE
    sigma_max: float = 100.0  # EDM paper Table 1, VE
    uncertainty: bool = False  # NCSN trains without EDM2's learned weighting

    def __post_init__(self):
        _check_sigma_range(self)
        _check_bool(self, "uncertainty")


@dataclass(frozen=True, kw_only=True)
class VPSchedule:
    """DDPM's VP schedule in continuous time (EDM paper Table 1, VP): t ~ U(t_min, 1) and sigma = vp_sigma(t)
    = sqrt(exp(b_d t^2 / 2 + b_min t) - 1), b_d = 19.9, b_min = 0.1 (DDPM's linear beta from 1e-4 to 0.02
    over T = 1000 steps, `lossfloor.diffusion.preconditioning.vp_sigma`), so sigma in [0.001, 152];
    w = 1/c_out^2. With the "ddpm-eps" table (c_out = -sigma) the loss is DDPM's simple loss
    ||eps_theta - eps||^2 = ||D - x0||^2 / sigma^2 (Ho et al. 2020, Eq. 14: t uniform, no weight); with the
    "vp-v" table (c_out = -sigma/sqrt(1 + sigma^2)) it is the v-prediction loss ||v_theta - v||^2,
    v = a eps - s x0 (Salimans & Ho 2022, §4), = ||D - x0||^2 (1 + sigma^2) / sigma^2."""

    kind: ClassVar[str] = "vp"
    t_min: float = 1e-5  # epsilon_t, the smallest training time (EDM paper Table 1, VP)
    uncertainty: bool = False  # DDPM trains without EDM2's learned weighting

    def __post_init__(self):
        _check_real(self, "t_min", positive=True)
        if not self.t_min < 1:
            raise InputError(f"VPSchedule.t_min: expected a time in (0, 1) like 1e-5, got {self.t_min!r}")
        _check_bool(self, "uncertainty")


@dataclass(frozen=True, kw_only=True)
class OptimalLossSchedule:
    """The optimal-loss schedule (paper §4). Every field the paper left open is a **[choice]**.

    J* comes from `TrainConfig.jstar` (a J* parquet table, x0 units), interpolated linearly in ln sigma
    and held constant beyond the table's ends. p(sigma) is read as a density of ln sigma **[choice]** (the
    measure EDM's log-normal uses), supported on [sigma_min, sigma_max] and tracked by `GapTracker`:
    a bin is drawn with its tracked probability, then sigma log-uniformly within the bin.

    Where the schedule clamps **[choice]**: the weight and the tracker read J* beyond the table's grid
    [sigma_lo, sigma_hi] at its end values (`JStarCurve`), as training draws sigma wherever p puts it.
    J* is non-decreasing in sigma, so below the grid J*(sigma) <= J*(sigma_lo) and the clamped weight is
    the truncated w_max wherever J*(sigma_lo) is under the sigma* level (the true one); above it
    J*(sigma_hi) <= J*(sigma) <= J*(inf) and the clamped weight overstates a/J*(sigma) by at most
    J*(inf)/J*(sigma_hi). That moves only where training puts its effort. No reported gap is read there:
    the evaluation's sigmas must lie in the grid (`lossfloor.train.config.check_eval_grid`). The schedule
    needs J*(inf) > 0 (`check_floor`).
    """

    kind: ClassVar[str] = "optimal"
    a: float = 1.0  # scale of the J* term; a = 1 puts w J* = 1 wherever w is not truncated
    w_max: float | None = None  # truncation of 1/J*; None = 1 / (sigma_star_threshold J*(inf)), i.e. the
    #                             weight stops growing where J* falls below the sigma* level
    b: float | None = None  # scale of the Gaussian focus below sigma*; None = a w_max varsigma sqrt(2 pi),
    #                         so the focus peaks at a w_max (the truncated weight); 0 turns it off
    mu: float | None = None  # centre of the focus in ln sigma; None = ln sigma*
    varsigma: float = 1.0  # width of the focus in ln sigma
    sigma_star: float | None = None  # sigma*; None = the J* table's (J*/J*(inf) < sigma_star_threshold)
    sigma_star_threshold: float = SIGMA_STAR_THRESHOLD  # 1e-3: sigma* level and default truncation
    sigma_min: float = 0.002  # range of the tracked p(sigma) (EDM sampler's range, edm2.md §6)
    sigma_max: float = 80.0
    n_bins: int = 32  # log-sigma bins of the tracker
    halflife_n_img: int = 1_000_000  # per-bin statistics are exponentially weighted with this half-life
    uniform_mix: float = 0.1  # p = (1 - uniform_mix) p_gap + uniform_mix / n_bins
    uncertainty: bool = False  # also learn EDM2's log-variance u(sigma) on top of w (off: w is the weight)

    def __post_init__(self):
        _check_real(self, "a", positive=True)
        _check_real(self, "w_max", allow_none=True, positive=True)
        _check_real(self, "b", allow_none=True, nonnegative=True)
        _check_real(self, "mu", allow_none=True)
        _check_real(self, "varsigma", positive=True)
        _check_real(self, "sigma_star", allow_none=True, positive=True)
        _check_real(self, "sigma_star_threshold", positive=True)
        _check_real(self, "sigma_min", positive=True)
        _check_real(self, "sigma_max", positive=True)
        if not self.sigma_min < self.sigma_max:
            raise InputError(f"sigma_max: expected a number above sigma_min={self.sigma_min}, like 80, got {self.sigma_max}")
        _check_int(self, "n_bins", minimum=1)
        _check_int(self, "halflife_n_img", minimum=1)
        _check_real(self, "uniform_mix", nonnegative=True)
        if not self.uniform_mix <= 1:
            raise InputError(f"uniform_mix: expected a fraction in [0, 1] like 0.1, got {self.uniform_mix}")
        _check_bool(self, "uncertainty")


SCHEDULES = {cls.kind: cls for cls in (EDM2Schedule, FMSchedule, NCSNSchedule, VPSchedule, OptimalLossSchedule)}


# --- The J* curve -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class JStarCurve:
    """J*(sigma) as training reads it: a view of a J* table (`JStarX0.at` with outside="clamp": linear in
    ln sigma between grid points, the end values beyond, as training samples sigma beyond any grid) for
    the schedule's weight, its tracker and the per-step training gap; the evaluation reads `table` with
    outside="error" (`OptimalLossSchedule` says where clamping is allowed). Tensors in, tensors out on
    their device."""

    table: JStarX0

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> JStarCurve:
        """Read a J* table in x0 units (`JStarTable.x0`: converted from its target if needed)."""
        return cls(read_table(path).x0())

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        """J*(sigma) for a tensor of sigmas, same dtype and device."""
        return self.table.at(sigma, outside="clamp", columns=("j_star",))[0]

    def interval(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ci_low, ci_high) of J* at sigma, read like J*."""
        return self.table.at(sigma, outside="clamp", columns=("ci_low", "ci_high"))


def check_floor(table: JStarX0) -> None:
    """The optimal-loss schedule needs J*(inf) > 0: its weight a min(1/J*, w_max) is truncated at
    w_max = 1/(threshold J*(inf)) and sigma* is where J* crosses threshold J*(inf) (paper §4). Data
    without variance (all samples identical) have J* = 0 at every sigma: nothing to scale by.
    InputError naming the table."""
    if not table.total_variance > 0:
        raise InputError(f"J* table {table.source}: J*(inf) = {table.total_variance:g} (data without variance, "
                         "e.g. identical samples): the optimal-loss weight 1/J* has no scale; use the edm2 schedule")


def _g(v: float | None) -> str:
    return "undefined" if v is None else f"{v:.4g}"


# --- Runtime schedules ----------------------------------------------------------------------------


class NativeWeight:
    """The native loss of a preconditioning table, w = 1/c_out^2, and a fixed sigma density (no state):
    the base of the schedules that are a process's own recipe."""

    tracker = None

    def __init__(self, precond: Preconditioning, uncertainty: bool):
        self.precond, self.uncertainty = precond, uncertainty

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = 1/c_out(sigma)^2: w ||D - x0||^2 = ||F - native target||^2 (paper Eq. 12)."""
        return 1.0 / self.precond.c_out(sigma) ** 2

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LogNormalSchedule(NativeWeight):
    """ln sigma ~ N(P_mean, P_std^2) and w = 1/c_out^2 (EDM2Schedule and FMSchedule at run time)."""

    def __init__(self, P_mean: float, P_std: float, precond: Preconditioning, uncertainty: bool):
        super().__init__(precond, uncertainty)
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def sample_sigma(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) float32 sigmas: ln sigma = P_mean + P_std z (edm2.md §4)."""
        z = torch.randn(n, generator=generator, device=generator.device)
        return torch.exp(self.P_mean + self.P_std * z)

    def reference_density(self, sigma: torch.Tensor) -> torch.Tensor:
        """The density of ln sigma this schedule samples from: N(ln sigma; P_mean, P_std^2)."""
        return _normal_pdf(torch.log(sigma), self.P_mean, self.P_std)


class LogUniformSchedule(NativeWeight):
    """ln sigma ~ U(ln sigma_min, ln sigma_max) and w = 1/c_out^2 (NCSNSchedule at run time)."""

    def __init__(self, sigma_min: float, sigma_max: float, precond: Preconditioning, uncertainty: bool):
        super().__init__(precond, uncertainty)
        self.log_min, self.log_max = math.log(sigma_min), math.log(sigma_max)

    def sample_sigma(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) float32 sigmas: ln sigma = ln sigma_min + u (ln sigma_max - ln sigma_min), u ~ U(0, 1)."""
        u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
        return torch.exp(self.log_min + u * (self.log_max - self.log_min)).to(torch.float32)

    def reference_density(self, sigma: torch.Tensor) -> torch.Tensor:
        """The density of ln sigma: 1 / (ln sigma_max - ln sigma_min) on the range, 0 outside."""
        x = torch.log(sigma)
        return ((x >= self.log_min) & (x <= self.log_max)).to(sigma.dtype) / (self.log_max - self.log_min)


class VPTimeSchedule(NativeWeight):
    """t ~ U(t_min, 1), sigma = vp_sigma(t), and w = 1/c_out^2 (VPSchedule at run time)."""

    def __init__(self, t_min: float, precond: Preconditioning, uncertainty: bool):
        super().__init__(precond, uncertainty)
        self.t_min = float(t_min)
        self.sigma_range = (vp_sigma(self.t_min), vp_sigma(1.0))  # float64 ends of the sampled sigma

    def sample_sigma(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) float32 sigmas: sigma = vp_sigma(t_min + u (1 - t_min)), u ~ U(0, 1) (EDM paper Table 1, VP)."""
        u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
        return vp_sigma(self.t_min + u * (1 - self.t_min)).to(torch.float32)

    def reference_density(self, sigma: torch.Tensor) -> torch.Tensor:
        """The density of ln sigma when t ~ U(t_min, 1): sigma dt/dsigma / (1 - t_min)
        = 2 sigma^2 / ((1 + sigma^2) sqrt(b_min^2 + 2 b_d ln(1 + sigma^2))) / (1 - t_min) on
        [vp_sigma(t_min), vp_sigma(1)], 0 outside (differentiating `vp_time`)."""
        s2 = sigma**2
        root = torch.sqrt(VP_BETA_MIN**2 + 2 * VP_BETA_D * torch.log1p(s2))
        density = 2 * s2 / ((1 + s2) * root) / (1 - self.t_min)
        return density * ((sigma >= self.sigma_range[0]) & (sigma <= self.sigma_range[1])).to(sigma.dtype)


class OptimalLoss:
    """The optimal-loss schedule at run time (paper §4): weight from J*, sigma from the tracked gap."""

    def __init__(self, config: OptimalLossSchedule, curve: JStarCurve):
        self.config, self.curve, self.uncertainty = config, curve, config.uncertainty
        c, t = config, curve.table
        check_floor(t)
        # Resolve the open choices (OptimalLossSchedule's field comments)
        self.w_max = c.w_max if c.w_max is not None else 1.0 / (c.sigma_star_threshold * t.total_variance)
        s_star = c.sigma_star if c.sigma_star is not None else t.sigma_star
        if s_star is None:
            s_star = sigma_star(t.sigma, t.j_star, t.total_variance, c.sigma_star_threshold)
        self.sigma_star = s_star
        # where σ* can lie given the grid and J*'s 95 % intervals (None: an open end)
        self.sigma_star_interval = None
        if c.sigma_star is None:
            self.sigma_star_interval = sigma_star_bracket(t.sigma, t.ci_low, t.ci_high, t.total_variance,
                                                          c.sigma_star_threshold)
            lo, hi = self.sigma_star_interval
            log.info("optimal-loss schedule: sigma* = %s, in [%s, %s] given the grid and J*'s 95%% interval",
                     _g(s_star), _g(lo), _g(hi))
        self.mu = c.mu if c.mu is not None else (math.log(s_star) if s_star is not None else None)
        b = c.b if c.b is not None else c.a * self.w_max * c.varsigma * SQRT_2PI
        self.b = 0.0 if s_star is None or self.mu is None else b  # no sigma*: no focus term
        self.tracker = GapTracker(sigma_min=c.sigma_min, sigma_max=c.sigma_max, n_bins=c.n_bins,
                                  halflife_n_img=c.halflife_n_img, uniform_mix=c.uniform_mix)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """w = a min(1/J*, w_max) + b N(ln sigma; mu, varsigma^2) 1[sigma < sigma*] (paper §4)."""
        j = self.curve(sigma)
        w = self.config.a / torch.clamp(j, min=1.0 / self.w_max)  # a min(1/J*, w_max), safe at J* = 0
        if self.b:
            focus = _normal_pdf(torch.log(sigma), self.mu, self.config.varsigma)
            w = w + self.b * focus * (sigma < self.sigma_star)
        return w

    def sample_sigma(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) float32 sigmas from the tracked p(sigma) (see GapTracker.sample)."""
        return self.tracker.sample(n, generator)

    def reference_density(self, sigma: torch.Tensor) -> torch.Tensor:
        """[choice] Uniform in ln sigma over [sigma_min, sigma_max]: p itself moves during training, so a
        fixed density keeps evaluation totals comparable over time and across runs."""
        lo, hi = math.log(self.config.sigma_min), math.log(self.config.sigma_max)
        x = torch.log(sigma)
        return ((x >= lo) & (x <= hi)).to(sigma.dtype) / (hi - lo)

    def state_dict(self) -> dict:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state)


def build_schedule(config, precond: Preconditioning, *, P_mean: float, P_std: float,
                   jstar: JStarCurve | None):
    """The run-time schedule of a config. P_mean/P_std: the preset's, used where EDM2Schedule has None."""
    if isinstance(config, EDM2Schedule):
        return LogNormalSchedule(P_mean if config.P_mean is None else config.P_mean,
                                 P_std if config.P_std is None else config.P_std, precond, config.uncertainty)
    if isinstance(config, FMSchedule):
        # t ~ logit-normal(m, s) and sigma = t/(1-t) = exp(logit t): ln sigma ~ N(m, s^2)
        return LogNormalSchedule(config.t_mean, config.t_std, precond, config.uncertainty)
    if isinstance(config, NCSNSchedule):
        return LogUniformSchedule(config.sigma_min, config.sigma_max, precond, config.uncertainty)
    if isinstance(config, VPSchedule):
        return VPTimeSchedule(config.t_min, precond, config.uncertainty)
    if isinstance(config, OptimalLossSchedule):
        if jstar is None:
            raise InputError("jstar: the optimal-loss schedule needs a J* table, e.g. jstar='jstar.parquet'")
        return OptimalLoss(config, jstar)
    raise InputError(f"schedule: expected one of {', '.join(c.__name__ for c in SCHEDULES.values())}, "
                     f"got {type(config).__name__}")


# --- The online gap tracker (paper §4 [choice]) -------------------------------------------------


class GapTracker:
    """Tracks p(sigma) ∝ w(sigma) (J_sigma(theta) - J*(sigma)) on log-sigma bins (paper §4, [choice]).

    Bins: n_bins of equal width in ln sigma over [sigma_min, sigma_max]; sigma outside counts in the edge bin.
    Per bin, exponentially weighted sums over the observed training samples (half-life halflife_n_img
    images, decayed once per step by 0.5^(batch/halflife)) of: 1, the x0 loss l, J*(sigma), and
    w(sigma)(l - J*(sigma)). The bin's mean loss and gap are ratios of these sums. The weighted gap is
    averaged per sample rather than formed from the bin's mean loss because J* and w vary steeply
    within a bin near sigma*; its mean over a bin is exactly what p needs, as sigma is log-uniform within
    each bin. p_b = (1 - uniform_mix) q_b / sum q + uniform_mix / n_bins with q_b = max(mean w-gap, 0); a bin
    not observed yet gets the largest q of the observed ones; with nothing observed (or every q = 0),
    p is uniform.

    Distributed use: compute `batch_stats` per rank, sum them over ranks, then `update` on every rank.
    """

    STATS = ("count", "loss", "j_star", "wgap")

    def __init__(self, *, sigma_min: float, sigma_max: float, n_bins: int, halflife_n_img: int,
                 uniform_mix: float):
        self.n_bins = int(n_bins)
        self.halflife_n_img = int(halflife_n_img)
        self.uniform_mix = float(uniform_mix)
        self.log_edges = np.linspace(math.log(sigma_min), math.log(sigma_max), self.n_bins + 1)  # (n_bins + 1,)
        self.sums = torch.zeros(len(self.STATS), self.n_bins, dtype=torch.float64)  # CPU

    def bin_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """The bin of each sigma (long tensor, same device)."""
        lo, hi = self.log_edges[0], self.log_edges[-1]
        f = (torch.log(sigma.to(torch.float64)) - lo) / (hi - lo) * self.n_bins
        return f.floor().long().clamp(0, self.n_bins - 1)

    def batch_stats(self, sigma, loss_x0, j_star, weight) -> torch.Tensor:
        """(4, n_bins) float64 sums over this batch of (1, l, J*, w (l - J*)), on sigma's device."""
        idx = self.bin_index(sigma)
        lx0, j, w = (t.detach().to(torch.float64) for t in (loss_x0, j_star, weight))
        values = torch.stack([torch.ones_like(lx0), lx0, j, w * (lx0 - j)])  # (4, B)
        out = torch.zeros(len(self.STATS), self.n_bins, dtype=torch.float64, device=sigma.device)
        return out.scatter_add_(1, idx.expand(len(self.STATS), -1), values)  # (4, B) -> (4, n_bins)

    def update(self, stats: torch.Tensor, batch_n_img: int) -> None:
        """Decay the sums by 0.5^(batch/halflife), then add this step's (globally summed) stats."""
        decay = 0.5 ** (batch_n_img / self.halflife_n_img)
        self.sums.mul_(decay).add_(stats.to(device="cpu", dtype=torch.float64))

    def _mean(self, row: int) -> torch.Tensor:
        count = self.sums[0]
        return torch.where(count > 0, self.sums[row] / count.clamp(min=1e-300), torch.nan)

    def loss(self) -> torch.Tensor:
        """(n_bins,) tracked mean x0 loss J_sigma(theta) per bin; NaN where nothing was observed."""
        return self._mean(1)

    def gap(self) -> torch.Tensor:
        """(n_bins,) tracked J_sigma(theta) - J*(sigma) per bin, not clipped; NaN where unobserved."""
        return self._mean(1) - self._mean(2)

    def weighted_gap(self) -> torch.Tensor:
        """(n_bins,) tracked mean of w (l - J*) per bin, not clipped; NaN where unobserved."""
        return self._mean(3)

    def probabilities(self) -> torch.Tensor:
        """(n_bins,) float64 bin probabilities p_b (class docstring)."""
        q = self.weighted_gap().clamp(min=0)
        observed = ~torch.isnan(q)
        uniform = torch.full((self.n_bins,), 1.0 / self.n_bins, dtype=torch.float64)
        if not observed.any():
            return uniform
        q = torch.where(observed, q, q[observed].max())
        total = q.sum()
        if not total > 0:
            return uniform
        return (1 - self.uniform_mix) * q / total + self.uniform_mix * uniform

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) float32 sigmas: a bin b ~ p, then ln sigma uniform within bin b (log-uniform sigma)."""
        device = generator.device
        p = self.probabilities().to(device)
        bins = torch.multinomial(p, n, replacement=True, generator=generator)  # (n,)
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        edges = torch.as_tensor(self.log_edges, device=device)
        log_sigma = edges[bins] + u * (edges[bins + 1] - edges[bins])
        return torch.exp(log_sigma).to(torch.float32)

    def bin_centers(self) -> np.ndarray:
        """(n_bins,) geometric bin centres."""
        return np.exp(0.5 * (self.log_edges[:-1] + self.log_edges[1:]))

    def state_dict(self) -> dict:
        return {"sums": self.sums.clone()}

    def load_state_dict(self, state: dict) -> None:
        sums = state["sums"]
        if tuple(sums.shape) != tuple(self.sums.shape):
            raise InputError(f"schedule: the checkpoint's tracker has {tuple(sums.shape)} bins, the config {tuple(self.sums.shape)}")
        self.sums.copy_(sums)


# --- Helpers ----------------------------------------------------------------------------------------


def _normal_pdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """N(x; mean, std^2)."""
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * SQRT_2PI)


def _check_real(cfg, name: str, *, allow_none: bool = False, positive: bool = False,
                nonnegative: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not positive or value > 0) and (not nonnegative or value >= 0)
    if not ok:
        kind = "a positive number" if positive else "a non-negative number" if nonnegative else "a finite number"
        example = {"a": 1.0, "varsigma": 1.0, "sigma_min": 0.002, "sigma_max": 80.0, "uniform_mix": 0.1}.get(name, 1.0)
        raise InputError(f"{type(cfg).__name__}.{name}: expected {kind} like {example}, got {value!r}")
    object.__setattr__(cfg, name, float(value))


def _check_sigma_range(cfg) -> None:
    """sigma_min < sigma_max, both noise levels lossfloor can take (`lossfloor.diffusion.grids.is_sigma`)."""
    name = type(cfg).__name__
    for field in ("sigma_min", "sigma_max"):
        value = getattr(cfg, field)
        if not is_sigma(value):
            raise InputError(f"{name}.{field}: expected a number in [{SIGMA_MIN:g}, {SIGMA_MAX:g}] like "
                             f"{0.02 if field == 'sigma_min' else 100.0}, got {value!r}")
        object.__setattr__(cfg, field, float(value))
    if not cfg.sigma_min < cfg.sigma_max:
        raise InputError(f"{name}.sigma_max: expected a number above sigma_min={cfg.sigma_min:g}, got {cfg.sigma_max:g}")


def _check_int(cfg, name: str, *, minimum: int) -> None:
    value = getattr(cfg, name)
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum):
        raise InputError(f"{type(cfg).__name__}.{name}: expected an integer >= {minimum}, like 32, got {value!r}")
    object.__setattr__(cfg, name, int(value))


def _check_bool(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        raise InputError(f"{type(cfg).__name__}.{name}: expected true or false, got {value!r}")
