"""Scaling laws of diffusion losses against training compute (Xu et al. 2026, §5, Eq. 13).

Three forms fitted on the same envelope points, with log-space residuals:
  raw          J(F)      = beta F^alpha
  corrected    J(F) - J* = beta F^alpha       (Eq. 13; J* from the optimal-loss estimate)
  free_offset  J(F)      = E + beta F^alpha   (E fitted, 0 <= E < min J; a check on J*)

Modules: `data` (curves and J* tables), `envelope` (lower frontier over model sizes), `powerlaw` (the
three fits), `fits` (bootstrap over runs, hold-out, `fit_all`). No plotting here.

    from lossfloor.scaling import fit_all
    fits = fit_all("curves.parquet", j_star="j_star.parquet", sigma=4.38, seed=0)
    fits.corrected.fit.alpha, fits.corrected.intervals["alpha"], fits.to_dict()
"""

from lossfloor.scaling.data import Curves, as_curves, load_j_star_table
from lossfloor.scaling.envelope import Envelope, envelope
from lossfloor.scaling.fits import (
    FormResult,
    Holdout,
    HoldoutScore,
    JStarValue,
    ScalingFits,
    fit_all,
    fit_forms,
)
from lossfloor.scaling.powerlaw import (
    FORMS,
    PowerLawFit,
    fit_corrected,
    fit_free_offset,
    fit_raw,
)

__all__ = [
    "FORMS",
    "Curves",
    "Envelope",
    "FormResult",
    "Holdout",
    "HoldoutScore",
    "JStarValue",
    "PowerLawFit",
    "ScalingFits",
    "as_curves",
    "envelope",
    "fit_all",
    "fit_corrected",
    "fit_forms",
    "fit_free_offset",
    "fit_raw",
    "load_j_star_table",
]
