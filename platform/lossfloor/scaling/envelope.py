"""The compute envelope: the lower frontier of loss-vs-FLOPs curves over model sizes.

Chinchilla's approach 1 (Hoffmann et al. 2022), as used for Eq. 13 of Xu et al. (2026, §5): each run's
curve is interpolated in log-log space, ln J_m(ln F), by a monotone cubic (PCHIP, which never
overshoots its data), on a common grid of ln F; the envelope is

    J_env(F) = min_m J_m(F)     over the runs m whose data cover F (no extrapolation),

kept only where it does not jump up: where the frontier run's curve ends and the runs that cover larger
F are above the loss already reached (a larger model's early, under-trained checkpoints), those points
are not on any compute frontier; they are left out and counted in `Envelope.n_superseded` until a run
gets below the loss already reached. Within the frontier run's own curve nothing is dropped or smoothed
(a running minimum over a noisy curve would bias the envelope low), so the envelope is monotone up to
the evaluation noise of one run.

The grid is `n_grid` points evenly spaced in ln F over all runs' range, so every fit that uses the
envelope weights each stretch of ln F equally, whatever the checkpoint spacing. A run with a single
checkpoint cannot be interpolated: its F is added to the grid and it takes part there only. Grid points
that no run covers (a gap between runs' F ranges) are left out of the envelope and counted in
`Envelope.n_uncovered`; nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import PchipInterpolator

from lossfloor.scaling.data import Curves

N_GRID = 1500  # grid points in ln F (Chinchilla used 1500)


@dataclass(frozen=True, eq=False)
class Envelope:
    """The lower frontier: points (flops, loss) and the model that attains each."""

    flops: np.ndarray  # (n,) increasing
    loss: np.ndarray  # (n,)
    frontier: np.ndarray  # (n,) int, index into `models` of the run on the frontier
    models: tuple[str, ...]
    n_uncovered: int  # grid points no run covers, left out
    n_superseded: int = 0  # grid points above the loss an earlier frontier run reached, left out

    def __len__(self) -> int:
        return len(self.flops)

    def segments(self) -> list[tuple[str, float, float]]:
        """(model, first flops, last flops) for each stretch of the frontier held by one model."""
        out = []
        if len(self.flops) == 0:
            return out
        cut = np.flatnonzero(np.diff(self.frontier)) + 1
        for a, b in zip(np.r_[0, cut], np.r_[cut, len(self.flops)], strict=True):
            out.append((self.models[self.frontier[a]], float(self.flops[a]), float(self.flops[b - 1])))
        return out


def log_grid(curves: Curves, n_grid: int = N_GRID) -> np.ndarray:
    """(n,) sorted ln F: `n_grid` evenly spaced points over all runs' range, plus single-checkpoint F's."""
    observed = np.concatenate([np.log(f) for f in curves.flops])
    even = np.linspace(observed.min(), observed.max(), max(int(n_grid), 2))  # ends exactly on the data
    single = [np.log(f) for f in curves.flops if len(f) == 1]
    return np.unique(np.concatenate([even, *single]))


def interpolate_runs(curves: Curves, grid: np.ndarray) -> np.ndarray:
    """(n_models, n_grid) ln J of each run on the ln F grid by PCHIP in log-log; NaN where no data.

    A run is evaluated only on [its smallest F, its largest F]; a single-checkpoint run only at its F.
    """
    out = np.full((curves.n_models, len(grid)), np.nan)
    for m, (f, j) in enumerate(zip(curves.flops, curves.loss, strict=True)):
        lf, lj = np.log(f), np.log(j)
        if len(lf) == 1:
            out[m, grid == lf[0]] = lj[0]
        else:
            out[m] = PchipInterpolator(lf, lj, extrapolate=False)(grid)  # NaN outside [lf[0], lf[-1]]
    return out


def envelope_from_runs(grid: np.ndarray, log_loss: np.ndarray, rows, models: tuple[str, ...]) -> Envelope:
    """Envelope of the runs `rows` of an `interpolate_runs` matrix (rows may repeat: min ignores it)."""
    rows = np.unique(np.asarray(rows, dtype=int))
    sub = np.where(np.isnan(log_loss[rows]), np.inf, log_loss[rows])  # (n_rows, n_grid)
    best = sub.argmin(axis=0)  # (n_grid,)
    low = sub[best, np.arange(len(grid))]
    covered = np.isfinite(low)
    keep = covered.copy()
    c_low, c_best = low[covered], best[covered]
    new_low = c_low <= np.minimum.accumulate(c_low)  # this point reaches a loss no smaller F reached
    holder = c_best[np.maximum.accumulate(np.where(new_low, np.arange(len(c_low)), 0))]  # run that reached it
    keep[covered] = new_low | (c_best == holder)  # another run above the loss already reached: superseded
    return Envelope(
        flops=np.exp(grid[keep]),
        loss=np.exp(low[keep]),
        frontier=rows[best[keep]],
        models=models,
        n_uncovered=int((~covered).sum()),
        n_superseded=int((covered & ~keep).sum()),
    )


def envelope(curves: Curves, n_grid: int = N_GRID) -> Envelope:
    """The lower frontier of all runs of `curves` (see module docstring)."""
    grid = log_grid(curves, n_grid)
    return envelope_from_runs(grid, interpolate_runs(curves, grid), range(curves.n_models), curves.models)
