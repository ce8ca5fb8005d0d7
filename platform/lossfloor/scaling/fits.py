"""Scaling-law study on one quantity: envelope, three forms, run-level bootstrap, hold-out check.

The fitting protocol for Eq. 13 of Xu et al. (2026, §5):
  1. envelope of the runs' loss-vs-FLOPs curves (`lossfloor.scaling.envelope`);
  2. the raw, gap-corrected and free-offset forms on the same envelope points (`lossfloor.scaling.powerlaw`);
  3. bootstrap over runs (models), never over checkpoints (checkpoints of a run are correlated): each
     replicate draws n_models runs with replacement, rebuilds the envelope from them, refits all forms;
     with a J* standard error se, each replicate also draws J* ~ N(J*, se^2). Percentile 95% intervals.
     A replicate is invalid for a form when it cannot be fitted (a drawn J* >= the replicate's smallest
     loss, too few envelope points); intervals use the valid replicates, and their count is reported.
     Since the envelope of a multiset of runs is the envelope of its distinct runs, a replicate is in
     effect a random subset of runs. With 2 models there are only 3 distinct subsets, so the intervals
     are coarse (a warning says so); with 1 model there is nothing to resample: intervals are None.
  4. hold-out: fit without the largest model (by `params`, else by largest flops), predict the part of
     the full envelope that model holds, and score each form by log-RMSE there (plus the signed relative
     error at its last point); the best form is the one with the lowest log-RMSE. Choose forms on this,
     not on rho (rho and R^2 rise with the decades covered).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lossfloor.errors import InputError, JStarNotBelowLoss
from lossfloor.scaling.data import SIGMA_RTOL, Curves, as_curves, load_j_star_table
from lossfloor.scaling.envelope import N_GRID, Envelope, envelope_from_runs, interpolate_runs, log_grid
from lossfloor.scaling.powerlaw import (
    FORMS,
    N_STARTS,
    PowerLawFit,
    fit_corrected,
    fit_free_offset,
    fit_raw,
)

log = logging.getLogger(__name__)

N_BOOTSTRAP = 1000
MAX_BOOTSTRAP = 100_000  # replicates are held in memory and fitted one by one: 1e9 would need ~37 GiB
LEVEL = 0.95  # percentile interval
HOLDOUT_LINE_POINTS = 80  # points of each form's stored hold-out prediction line
STATS = ("alpha", "beta", "offset", "rho", "r2")  # per-replicate statistics, columns of a replicate row


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class FormResult:
    """A fitted form with its bootstrap percentile intervals (None without a bootstrap)."""

    fit: PowerLawFit
    intervals: Mapping[str, tuple[float, float]] | None  # alpha, beta, offset (free form), rho, r2
    n_valid: int  # bootstrap replicates that could be fitted

    def to_dict(self) -> dict:
        f = self.fit
        out = {
            "form": f.form,
            "alpha": f.alpha,
            "beta": f.beta,
            "rho": f.rho,
            "abs_rho": f.abs_rho,
            "r2": f.r2,
            "log_rmse": f.log_rmse,
            "n_points": f.n_points,
        }
        if f.form == "free_offset":
            out["offset"] = f.offset
            out["offset_at_bound"] = f.at_bound
        elif f.form == "corrected":
            out["j_star"] = f.offset
        out["intervals"] = None if self.intervals is None else {k: list(v) for k, v in self.intervals.items()}
        out["n_bootstrap_valid"] = self.n_valid
        return out


@dataclass(frozen=True)
class HoldoutScore:
    """How one form, fitted without the largest model, predicts that model's frontier."""

    form: str
    predicted_final: float  # J_hat at the held-out model's last frontier point
    rel_error: float  # signed (J_hat - J) / J at that point
    mean_abs_rel_error: float  # over the held-out frontier points
    log_rmse: float  # sqrt(mean (ln J_hat - ln J)^2) over the held-out frontier points
    predicted_final_interval: tuple[float, float] | None  # bootstrap over the remaining runs
    prediction: tuple[tuple[float, float], ...] = ()  # (F, J_hat) on HOLDOUT_LINE_POINTS log-spaced F, for drawing


@dataclass(frozen=True)
class Holdout:
    """Extrapolation check: fit without `model`, predict its part of the full envelope."""

    model: str
    chosen_by: str  # "params" or "max flops"
    target: str  # "frontier" (points the model holds on the full envelope) or "curve" (never on it)
    n_target_points: int
    flops_range: tuple[float, float]
    final_flops: float
    final_loss: float
    scores: Mapping[str, HoldoutScore | None]  # per form; None where the form could not be fitted
    best: str | None  # identified form with the lowest log-RMSE
    target_points: tuple[tuple[float, float], ...] = ()  # (F, J) the held-out model actually reached
    unidentified: Mapping[str, str] = field(default_factory=dict)  # form -> why it cannot win

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "chosen_by": self.chosen_by,
            "target": self.target,
            "n_target_points": self.n_target_points,
            "flops_range": list(self.flops_range),
            "final_flops": self.final_flops,
            "final_loss": self.final_loss,
            "target_points": [list(p) for p in self.target_points],
            "scores": {
                k: None
                if s is None
                else {
                    "predicted_final": s.predicted_final,
                    "rel_error": s.rel_error,
                    "mean_abs_rel_error": s.mean_abs_rel_error,
                    "log_rmse": s.log_rmse,
                    "predicted_final_interval": (
                        None if s.predicted_final_interval is None else list(s.predicted_final_interval)
                    ),
                    "prediction": [list(p) for p in s.prediction],
                }
                for k, s in self.scores.items()
            },
            "best": self.best,
            "unidentified": dict(self.unidentified),
        }


@dataclass(frozen=True)
class ScalingFits:
    """Everything `fit_all` measured on one quantity (one sigma, or the total loss)."""

    raw: FormResult
    corrected: FormResult | None  # None without J*
    free_offset: FormResult | None  # None with fewer than 3 distinct envelope flops
    envelope: Envelope
    holdout: Holdout | None
    j_star: float | None  # x0 units, like the losses
    j_star_stderr: float  # the interval's half-width / 1.96 (what the bootstrap draws with)
    j_star_source: str | None
    sigma: float | None
    n_points: int  # checkpoints (rows) used
    n_models: int
    models: tuple[str, ...]
    source: str
    bootstrap: int
    seed: int
    notes: tuple[str, ...] = field(default=())  # why a form or interval is missing, warnings
    j_star_interval: tuple[float, float] | None = None  # the 95 % interval of J*, bias allowance included
    rho_gain: dict | None = None  # |ρ| corrected - |ρ| raw and its paired interval (`rho_gain`)

    @property
    def forms(self) -> dict[str, FormResult | None]:
        return {"raw": self.raw, "corrected": self.corrected, "free_offset": self.free_offset}

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN becomes None). Same inputs and seed give the same dict."""
        out = {
            "curves": self.source,
            "sigma": self.sigma,
            "quantity": "total loss" if self.sigma is None else f"loss at sigma={self.sigma:g}",
            "j_star": self.j_star,
            "j_star_stderr": self.j_star_stderr,
            "j_star_interval": None if self.j_star_interval is None else list(self.j_star_interval),
            "j_star_source": self.j_star_source,
            "n_points": self.n_points,
            "n_models": self.n_models,
            "models": list(self.models),
            "n_envelope_points": len(self.envelope),
            "raw": self.raw.to_dict(),
            "corrected": None if self.corrected is None else self.corrected.to_dict(),
            "free_offset": None if self.free_offset is None else self.free_offset.to_dict(),
            "consistency": _consistency(self),
            "rho_gain": self.rho_gain,
            "holdout": None if self.holdout is None else self.holdout.to_dict(),
            "bootstrap": {"n": self.bootstrap, "seed": self.seed, "unit": "model", "level": LEVEL},
            "notes": list(self.notes),
            "envelope_uncovered_grid_points": self.envelope.n_uncovered,
            "envelope_segments": [
                {"model": m, "flops_min": a, "flops_max": b} for m, a, b in self.envelope.segments()
            ],
            "envelope": [[float(f), float(j)] for f, j in zip(self.envelope.flops, self.envelope.loss)],
        }
        return _clean(out)


def _consistency(fits: ScalingFits) -> dict | None:
    """Free-offset E next to J*: does the fitted floor agree with the estimated one?"""
    if fits.free_offset is None or fits.j_star is None:
        return None
    e = fits.free_offset.fit.offset
    iv = (fits.free_offset.intervals or {}).get("offset")
    return {
        "offset": e,
        "j_star": fits.j_star,
        "difference": e - fits.j_star,
        "j_star_in_offset_interval": None if iv is None else bool(iv[0] <= fits.j_star <= iv[1]),
    }


def _clean(obj):
    """Plain JSON types; non-finite floats become None."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# ---------------------------------------------------------------------------------------------------
# Fitting all forms on one envelope


def fit_forms(env: Envelope, j_star: float | None) -> dict[str, PowerLawFit | None]:
    """The three forms on the envelope points (corrected: None without J*; free: None if < 3 points)."""
    out: dict[str, PowerLawFit | None] = {"raw": fit_raw(env.flops, env.loss), "corrected": None}
    if j_star is not None:
        out["corrected"] = fit_corrected(env.flops, env.loss, j_star)
    out["free_offset"] = fit_free_offset(env.flops, env.loss) if len(env) >= 3 else None
    return out


def _replicate_row(fit: PowerLawFit | None) -> list[float]:
    if fit is None:
        return [math.nan] * len(STATS)
    return [fit.alpha, fit.beta, fit.offset, fit.rho, fit.r2]


def bootstrap_runs(
    grid: np.ndarray,
    log_loss: np.ndarray,
    rows,
    models: tuple[str, ...],
    *,
    j_star: JStarValue | None,
    n: int,
    rng: np.random.Generator,
    predict_at: float | None = None,
    start: PowerLawFit | None = None,
) -> dict[str, np.ndarray]:
    """Per form, an (n, len(STATS) [+1]) array of replicate statistics (NaN rows: invalid replicates).

    Each replicate resamples the runs `rows` with replacement, rebuilds their envelope, draws J* from
    the normal whose 95 % interval is J*'s interval (`JStarValue.draw`) and refits. With `predict_at`, a last column holds J_hat(predict_at).
    `start` (the free-offset fit on all of `rows`) is an extra start for each replicate's free-offset fit.
    """
    rows = np.asarray(list(rows), dtype=int)
    width = len(STATS) + (predict_at is not None)
    out = {form: np.full((n, width), np.nan) for form in FORMS}
    t0 = time.perf_counter()
    for r in range(n):
        pick = rows[rng.integers(0, len(rows), len(rows))]
        js = None if j_star is None else j_star.draw(rng)
        env = envelope_from_runs(grid, log_loss, pick, models)
        if len(env) < 2:
            continue
        fits = {"raw": fit_raw(env.flops, env.loss), "corrected": None, "free_offset": None}
        if js is not None and js < env.loss.min():
            fits["corrected"] = fit_corrected(env.flops, env.loss, js)
        if len(env) >= 3:
            # the full-data solution as an extra start; refining the single best start gives the
            # same intervals as refining two, at half the cost
            fits["free_offset"] = fit_free_offset(
                env.flops, env.loss, start=start, n_starts=1 if start is not None else N_STARTS
            )
        for form, fit in fits.items():
            if fit is None:
                continue
            row = _replicate_row(fit)
            if predict_at is not None:
                row.append(float(fit.predict(predict_at)))
            out[form][r] = row
        if (r + 1) % 250 == 0 and r + 1 < n:
            rate = (r + 1) / (time.perf_counter() - t0)
            log.info("bootstrap %d/%d replicates, %.0f/s, ETA %.0f s", r + 1, n, rate, (n - r - 1) / rate)
    return out


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the finite `values` ((nan, nan) if none)."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return (float(lo), float(hi))


def rho_gain(fits: Mapping[str, PowerLawFit | None], reps: Mapping[str, np.ndarray] | None) -> dict | None:
    """|ρ| of the corrected form minus the raw form's (the paper's ρ 0.82 -> 0.94), with the percentile
    interval of the same difference over the bootstrap replicates: both forms are refitted on the same
    run subsets in a replicate, so the interval is paired (narrower than comparing two intervals).
    None without J* (no corrected form)."""
    if fits.get("corrected") is None:
        return None
    value = float(fits["corrected"].abs_rho - fits["raw"].abs_rho)
    if reps is None:
        return {"value": value, "interval": None, "n_valid": 0}
    i = STATS.index("rho")
    d = np.abs(reps["corrected"][:, i]) - np.abs(reps["raw"][:, i])
    return {"value": value, "interval": list(percentile_interval(d)), "n_valid": int(np.isfinite(d).sum())}


def _intervals(form: str, reps: np.ndarray) -> dict[str, tuple[float, float]]:
    keep = [s for s in STATS if not (s == "offset" and form == "raw")]  # raw has no offset
    if form == "corrected":
        keep = [s for s in keep if s != "offset"]  # the drawn J*, not a fitted quantity
    return {s: percentile_interval(reps[:, STATS.index(s)]) for s in keep}


# ---------------------------------------------------------------------------------------------------
# Hold-out: fit without the largest model, predict its frontier


def holdout_largest(
    curves: Curves,
    grid: np.ndarray,
    log_loss: np.ndarray,
    full: Envelope,
    *,
    j_star: JStarValue | None,
    bootstrap: int,
    rng: np.random.Generator,
    unidentified: Mapping[str, str] | None = None,
) -> tuple[Holdout | None, str | None]:
    """(Holdout, None), or (None, reason) when there is nothing to hold out or fit on.

    `best` is ranked over identified forms only: a free offset that ends on its bound (min J) on the full
    data or on the held-in models is a different model in disguise, and its hold-out error says nothing
    about the form; `unidentified` (form -> why) are scored and shown, never chosen."""
    if curves.n_models < 2:
        return None, "hold-out: needs at least 2 models"
    big, rule = curves.largest()
    rest = [m for m in range(curves.n_models) if m != big]
    train = envelope_from_runs(grid, log_loss, rest, curves.models)
    if len(train) < 2:
        return None, f"hold-out: the models other than {curves.models[big]!r} give < 2 envelope points"
    held = full.frontier == big
    if held.any():
        target, t_flops, t_loss = "frontier", full.flops[held], full.loss[held]
    else:  # the largest model is nowhere on the frontier: predict its own checkpoints
        target, t_flops, t_loss = "curve", curves.flops[big], curves.loss[big]
    fits = fit_forms(train, None if j_star is None else j_star.value)  # J* < min J <= min of the training envelope
    reps = None
    if bootstrap > 0 and len(rest) > 1:
        reps = bootstrap_runs(
            grid,
            log_loss,
            rest,
            curves.models,
            j_star=j_star,
            n=bootstrap,
            rng=rng,
            predict_at=float(t_flops[-1]),
            start=fits["free_offset"],
        )
    scores: dict[str, HoldoutScore | None] = {}
    line = np.geomspace(min(train.flops.min(), t_flops.min()), max(t_flops.max(), train.flops.max()),
                        HOLDOUT_LINE_POINTS)  # where each form's prediction is drawn
    for form, fit in fits.items():
        if fit is None:
            scores[form] = None
            continue
        pred = fit.predict(t_flops)
        scores[form] = HoldoutScore(
            form=form,
            predicted_final=float(pred[-1]),
            rel_error=float((pred[-1] - t_loss[-1]) / t_loss[-1]),
            mean_abs_rel_error=float(np.mean(np.abs(pred - t_loss) / t_loss)),
            log_rmse=float(np.sqrt(np.mean((np.log(pred) - np.log(t_loss)) ** 2))),
            predicted_final_interval=None if reps is None else percentile_interval(reps[form][:, -1]),
            prediction=tuple(zip(line.tolist(), np.asarray(fit.predict(line), dtype=float).tolist())),
        )
    unidentified = dict(unidentified or {})
    if fits["free_offset"] is not None and fits["free_offset"].at_bound:
        unidentified.setdefault("free_offset", "E at its upper bound min J on the held-in models")
    scored = {k: s.log_rmse for k, s in scores.items()
              if s is not None and math.isfinite(s.log_rmse) and k not in unidentified}
    return Holdout(
        model=curves.models[big],
        chosen_by=rule,
        target=target,
        n_target_points=len(t_flops),
        flops_range=(float(t_flops[0]), float(t_flops[-1])),
        final_flops=float(t_flops[-1]),
        final_loss=float(t_loss[-1]),
        scores=scores,
        best=min(scored, key=scored.get) if scored else None,
        target_points=tuple(zip(np.asarray(t_flops, float).tolist(), np.asarray(t_loss, float).tolist())),
        unidentified=unidentified,
    ), None


# ---------------------------------------------------------------------------------------------------
# The study


@dataclass(frozen=True)
class JStarValue:
    """J* for a fit, x0 units: the estimate and its 95 % interval (bias allowance included)."""

    value: float
    low: float
    high: float
    source: str

    @property
    def stderr(self) -> float:
        """The standard deviation of the normal whose 95 % interval is [low, high]."""
        return (self.high - self.low) / (2 * 1.959964)

    def draw(self, rng: np.random.Generator) -> float:
        """A bootstrap draw: N((low + high)/2, stderr²)."""
        return 0.5 * (self.low + self.high) + self.stderr * rng.standard_normal()


def resolve_j_star(j_star, j_star_stderr: float | None, sigma: float | None) -> JStarValue | None:
    """J* from a number (± 1.96 j_star_stderr), a `JStarValue`, or a J* table (path / pyarrow / polars /
    mapping) at `sigma`: its x0 columns and interval (`JStarX0.at`: linear in ln sigma between rows)."""
    if j_star is None:
        if j_star_stderr:
            raise InputError("j_star_stderr: given without a J* value")
        return None
    if isinstance(j_star, JStarValue):
        if j_star_stderr is not None:
            raise InputError("j_star_stderr: a JStarValue carries its own interval; do not pass one")
        if not (0 <= j_star.low <= j_star.value <= j_star.high and math.isfinite(j_star.high)):
            raise InputError(f"j_star: expected 0 <= low <= value <= high, got {j_star}")
        return j_star
    if isinstance(j_star, (int, float, np.integer, np.floating)) and not isinstance(j_star, bool):
        se = 0.0 if j_star_stderr is None else float(j_star_stderr)
        if not (math.isfinite(float(j_star)) and float(j_star) >= 0):
            raise InputError(f"j_star: expected a finite number >= 0 (an optimal loss), got {j_star}")
        if not (math.isfinite(se) and se >= 0):
            raise InputError(f"j_star_stderr: expected a number >= 0, got {j_star_stderr}")
        v = float(j_star)
        return JStarValue(v, max(v - 1.959964 * se, 0.0), v + 1.959964 * se, "value")
    table = load_j_star_table(j_star)
    if sigma is None:
        raise InputError(
            f"{table.source}: a J* table gives J*(sigma), but the total loss has no sigma; pass a sigma, "
            f"or the total loss's J* as a value (the weighted integral of J*(sigma))"
        )
    if j_star_stderr is not None:
        raise InputError("j_star_stderr: the J* table's interval (ci_low_x0, ci_high_x0) is used; do not pass one")
    value, low, high = table.at(sigma)
    return JStarValue(value, low, high, f"{table.source} at sigma={sigma:g}")


def fit_all(
    curves,
    j_star=None,
    j_star_stderr: float | None = None,
    sigma: float | None = None,
    bootstrap: int = N_BOOTSTRAP,
    holdout: bool = True,
    seed: int = 0,
    n_grid: int = N_GRID,
) -> ScalingFits:
    """Envelope, the raw / corrected / free-offset forms, bootstrap intervals and hold-out, on one quantity.

    curves: a curves table (parquet path, pyarrow Table, polars DataFrame, or a mapping of numpy arrays
        with `model`, `flops`, `loss`, optional `params`, `sigma`), or a `Curves`.
    j_star: None (raw and free-offset forms only), a number (with `j_star_stderr`), or a J* table
        read at `sigma` in x0 units with its interval (`lossfloor.floor.table`), interpolated in ln sigma.
    sigma: the per-sigma rows to fit; None fits the total-loss rows (sigma null or no sigma column).
    bootstrap: replicates over runs (0: no intervals). seed: makes the result deterministic.
    Raises InputError on bad input, including J* >= the smallest loss.
    """
    if not isinstance(bootstrap, (int, np.integer)) or not 0 <= bootstrap <= MAX_BOOTSTRAP:
        raise InputError(f"bootstrap: expected an integer in [0, {MAX_BOOTSTRAP}] (replicates; 95 % percentile "
                         f"intervals settle by about 10 000), got {bootstrap!r}", field="bootstrap")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed: expected an integer >= 0, got {seed!r}", field="seed")
    data = curves if isinstance(curves, Curves) else as_curves(curves, sigma=sigma)
    jv = resolve_j_star(j_star, j_star_stderr, data.sigma)
    js = None if jv is None else jv.value
    if js is not None and not js < data.min_loss:
        raise JStarNotBelowLoss(
            f"{data.source}: J* = {js:.6g} ({jv.source}) must be below the smallest loss "
            f"{data.min_loss:.6g} in column 'loss'; the gap J - J* must be positive"
        )
    notes: list[str] = []
    if js is None:
        notes.append("corrected: no J* given, so only the raw and free-offset forms are fitted")

    grid = log_grid(data, n_grid)
    log_loss = interpolate_runs(data, grid)  # (n_models, n_grid)
    env = envelope_from_runs(grid, log_loss, range(data.n_models), data.models)
    if env.n_uncovered:
        notes.append(
            f"envelope: {env.n_uncovered} grid point(s) between runs' flops ranges have no data and are "
            f"left out"
        )
    if env.n_superseded:
        notes.append(
            f"envelope: {env.n_superseded} grid point(s) where a run's curve ends and the runs covering larger "
            f"flops are above the loss already reached are left out (the envelope never jumps up)"
        )
    fits = fit_forms(env, js)
    if fits["free_offset"] is None:
        notes.append("free_offset: needs at least 3 envelope points")
    elif fits["free_offset"].at_bound:
        notes.append("free_offset: E reached its upper bound min J; the offset is not identified")

    reps = None
    if bootstrap > 0 and data.n_models >= 2:
        rng = np.random.default_rng(seed)
        reps = bootstrap_runs(
            grid,
            log_loss,
            range(data.n_models),
            data.models,
            j_star=jv,
            n=int(bootstrap),
            rng=rng,
            start=fits["free_offset"],
        )
        if data.n_models == 2:
            notes.append("bootstrap: only 2 models, so only 3 distinct run subsets; intervals are coarse")
    elif bootstrap > 0:
        notes.append("bootstrap: only 1 model, nothing to resample over runs; no intervals")

    results: dict[str, FormResult | None] = {}
    for form, fit in fits.items():
        if fit is None:
            results[form] = None
            continue
        if reps is None:
            results[form] = FormResult(fit, None, 0)
            continue
        valid = int(np.isfinite(reps[form][:, 0]).sum())
        if valid < bootstrap:
            notes.append(f"bootstrap: {bootstrap - valid} of {bootstrap} replicates invalid for {form}")
        results[form] = FormResult(fit, _intervals(form, reps[form]), valid)

    hold = None
    if holdout:
        hold, why = holdout_largest(
            data,
            grid,
            log_loss,
            env,
            j_star=jv,
            bootstrap=int(bootstrap),
            rng=np.random.default_rng([seed, 1]),
            unidentified={"free_offset": "E at its upper bound min J: the offset is not identified"}
            if fits["free_offset"] is not None and fits["free_offset"].at_bound else None,
        )
        if why:
            notes.append(why)

    return ScalingFits(
        raw=results["raw"],
        corrected=results["corrected"],
        free_offset=results["free_offset"],
        envelope=env,
        holdout=hold,
        j_star=js,
        j_star_stderr=0.0 if jv is None else jv.stderr,
        j_star_source=None if jv is None else jv.source,
        j_star_interval=None if jv is None else (jv.low, jv.high),
        sigma=data.sigma,
        n_points=data.n_points,
        n_models=data.n_models,
        models=data.models,
        source=data.source,
        bootstrap=int(bootstrap),
        seed=int(seed),
        notes=tuple(notes),
        rho_gain=rho_gain(fits, reps),
    )


def check_fits_json(fits, source: str) -> dict[str, dict]:
    """Validate a fits.json object: keys "total" | "sigma=X", values `ScalingFits.to_dict()` at that sigma."""
    if not isinstance(fits, dict) or not fits:
        raise InputError(f"{source}: expected a non-empty JSON object {{\"total\" | \"sigma=X\": fits}}")
    for key, value in fits.items():
        if not isinstance(value, dict) or not isinstance(value.get("raw"), dict) or "envelope" not in value:
            raise InputError(f"{source}: {key!r} is not a ScalingFits.to_dict() object (no 'raw' or 'envelope')")
        sigma = value.get("sigma")
        if key == "total":
            if sigma is not None:
                raise InputError(f"{source}: key 'total' holds a fit at sigma={sigma}; expected sigma null")
            continue
        try:
            want = float(key.removeprefix("sigma=")) if key.startswith("sigma=") else math.nan
        except ValueError:
            want = math.nan
        if not math.isfinite(want):
            raise InputError(f"{source}: key {key!r}: expected 'total' or 'sigma=<number>'")
        if sigma is None or abs(float(sigma) - want) > SIGMA_RTOL * want:
            raise InputError(f"{source}: key {key!r} holds a fit at sigma={sigma}")
    return fits


__all__ = [
    "FormResult",
    "Holdout",
    "HoldoutScore",
    "JStarValue",
    "ScalingFits",
    "bootstrap_runs",
    "check_fits_json",
    "fit_all",
    "fit_forms",
    "holdout_largest",
    "percentile_interval",
    "resolve_j_star",
]
