"""Helpers of the scaling study (studies/scaling_imagenet512.py): the model ladders and their budgets,
the choice of σ, J* of the total loss from the loss curves, and the table of ρ it prints. Running the
stages (`lossfloor.jobs.study`) and training the ladder (`lossfloor.jobs.train`) are jobs of the package.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

from lossfloor.errors import InputError

log = logging.getLogger("scaling_imagenet512")

# --- Model ladders ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Budget:
    """What a preset trains and estimates: the ladder and every size that sets the study's cost."""

    models: tuple  # lossfloor.models.Preset per rung, smallest first
    duration_n_img: tuple[int, ...]  # training images per rung
    batch_n_img: int
    evals: int  # evaluations per model (each one a point of its loss-vs-FLOPs curve)
    eval_n_samples: int
    n_eval_sigmas: int  # evaluation grid for the total loss (the fit σ are added to it)
    warmup_n_img: int | None  # None: the preset's
    t_ref_iters: int | None  # None: the preset's
    max_samples: int | None  # data cap (J* and training use the same samples)
    estimator: str
    subset_size: int | None
    queries_per_sample: int
    sigma_grid: str
    bootstrap: int
    keep_checkpoints: int
    rows_per_batch: int | None = None  # J* batch (queries); None: the estimator's default
    samples: int | str = "auto"  # samples grid on each train run (lossfloor.jobs.record.record_training); 0: none


def _round_to(n: float, multiple: int) -> int:
    return max(multiple, round(n / multiple) * multiple)


def tiny_width(mc: int):
    """The `tiny` preset (8x8x1, two levels) at model_channels mc, two attention heads at every width."""
    from lossfloor.models import get_preset

    tiny = get_preset("tiny")
    unet = dataclasses.replace(tiny.unet, model_channels=mc, channels_per_head=mc)
    return dataclasses.replace(tiny, name=f"tiny-c{mc}", unet=unet)


SMOKE_WIDTHS = {"normal": (8, 16, 32), "tiny": (4, 8)}


def smoke_budget(size: str, budget_scale: float) -> Budget:
    """A ladder of `tiny` widths on the bundled digits, sized for 2 CPU cores.

    normal: three widths, about 24k images per model (16 epochs of digits), 8 evaluations, J* in two
    batches (two Ray Data actors); tiny: two widths, a few hundred images on 600 samples, for tests.
    budget_scale multiplies the images per model.
    """
    if size == "normal":
        batch, steps = 64, 384
        return Budget(
            models=tuple(tiny_width(mc) for mc in SMOKE_WIDTHS[size]),
            duration_n_img=tuple(_round_to(batch * steps * budget_scale, batch) for _ in SMOKE_WIDTHS[size]),
            batch_n_img=batch, evals=8, eval_n_samples=256, n_eval_sigmas=8, warmup_n_img=1024,
            t_ref_iters=64, max_samples=None, estimator="exact", subset_size=None, queries_per_sample=2,
            sigma_grid="0.002:80:32", bootstrap=100, keep_checkpoints=1, rows_per_batch=900,
        )
    batch, steps = 32, 24
    return Budget(
        models=tuple(tiny_width(mc) for mc in SMOKE_WIDTHS[size]),
        duration_n_img=tuple(_round_to(batch * steps * budget_scale, batch) for _ in SMOKE_WIDTHS[size]),
        batch_n_img=batch, evals=4, eval_n_samples=64, n_eval_sigmas=5, warmup_n_img=64, t_ref_iters=8,
        max_samples=600, estimator="exact", subset_size=None, queries_per_sample=1, sigma_grid="0.002:50:16",
        bootstrap=10, keep_checkpoints=1, samples=0,
    )


IMG512_LADDER = ("img512-xs", "img512-s", "img512-m", "img512-l", "img512-xl", "img512-xxl")
# The post-hoc EMA width EDM2 reports for each of its ImageNet-512 networks (the σ_rel at which it
# quotes FID, chosen per network by post-hoc reconstruction; the EDM2 paper's ImageNet-512 results
# table): the study's default --ema for these models when their runs keep EMA snapshots.
EDM2_SIGMA_REL = {"img512-xs": 0.135, "img512-s": 0.130, "img512-m": 0.100, "img512-l": 0.085,
                  "img512-xl": 0.085, "img512-xxl": 0.070}


def imagenet512_budget(budget_scale: float) -> Budget:
    """EDM2's ImageNet-512 ladder (XS..XXL) with EDM2's own durations (2048Mi..896Mi images) and batch
    2048, scaled by budget_scale: durations, lr warm-up and t_ref shrink together, so the learning-rate
    schedule keeps its shape in images."""
    from lossfloor.models import get_preset

    presets = tuple(get_preset(name) for name in IMG512_LADDER)
    batch = presets[0].batch_n_img
    scale = min(budget_scale, 1.0)
    return Budget(
        models=presets,
        duration_n_img=tuple(_round_to(p.duration_n_img * budget_scale, batch) for p in presets),
        batch_n_img=batch, evals=16, eval_n_samples=4096, n_eval_sigmas=16,
        warmup_n_img=round(presets[0].warmup_n_img * scale),
        t_ref_iters=max(1, round(presets[0].t_ref_iters * scale)),
        max_samples=None, estimator="auto", subset_size=None, queries_per_sample=3, sigma_grid="0.002:80:64",
        bootstrap=1000, keep_checkpoints=2,
    )


# --- σ of the fits and of the evaluation grid ---------------------------------------------------------

FIT_LEVELS = (0.05, 0.4, 0.9)  # J*(σ)/J*(∞) of the fitted σ above σ*; 0.9 is the high σ


def choose_sigmas(sigmas, j_star_x0, total_variance: float, sigma_star: float | None, *, n_eval: int,
                  levels=FIT_LEVELS) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(fit σ, eval σ), all points of the J* table's grid (so J* at them is the table's, no interpolation).

    fit σ: the grid point nearest σ* (in ln σ) and, per level, the first grid point where
    J*(σ)/J*(∞) >= level; eval σ: the fit σ plus n_eval points spread evenly over the grid (the
    quadrature of the total loss).
    """
    s = np.asarray(sigmas, dtype=np.float64)
    ratio = np.asarray(j_star_x0, dtype=np.float64) / total_variance
    fit = [int(np.argmin(np.abs(np.log(s) - math.log(sigma_star)))) if sigma_star else 0]
    for level in levels:
        above = np.nonzero(ratio >= level)[0]
        fit.append(int(above[0]) if len(above) else len(s) - 1)
    coarse = np.unique(np.round(np.linspace(0, len(s) - 1, max(2, n_eval))).astype(int))
    fit_sigmas = tuple(float(s[i]) for i in sorted(set(fit)))
    eval_sigmas = tuple(float(s[i]) for i in sorted(set(fit) | set(coarse.tolist())))
    return fit_sigmas, eval_sigmas


# --- J* of the total loss -----------------------------------------------------------------------------


def total_j_star(curves) -> tuple[float, float, float]:
    """(J*, ci_low, ci_high) of the total weighted loss, as the training loop wrote it in the total rows
    (sigma null) of the loss curves: sum_k pi_k w_k J*_k and the same sums of the interval's ends
    (lossfloor.train.evaluation). Every model of the ladder has the same schedule weighting and grid,
    hence the same total J*; a mismatch is an error."""
    rows = [r for r in curves.to_pylist() if r["sigma"] is None]
    values = {(r["j_star"], r["j_star_ci_low"], r["j_star_ci_high"]) for r in rows}
    if len(values) != 1 or None in next(iter(values)):
        raise InputError(f"loss curves: expected one total J* over the models' total rows, found {sorted(values)}")
    return tuple(float(v) for v in values.pop())


# --- EDM2 snapshots instead of training ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """One EDM2 network pickle of the --snapshots folder, as its file name describes it."""

    path: object  # pathlib.Path
    model: str  # the size: a post-hoc file's name (edm2-img512-xs), a raw snapshot's folder name
    kimg: int  # thousands of training images
    std: float  # EMA length sigma_rel


def find_snapshots(folder, std: float | None = None) -> dict[str, list[Snapshot]]:
    """model -> its snapshots, fewest training images first, from the EDM2 pickles under `folder`:
    network-snapshot-{kimg}-{std}.pkl (the model: its folder's name) or edm2-{name}-{kimg}-{std}.pkl (the
    model: edm2-{name}). One EMA length per model: `std`, or each model's longest. InputError naming
    --snapshots: no such folder, no snapshots, a .pkl of another name, a std a model lacks."""
    from pathlib import Path

    from lossfloor.models.edm2_pickle import snapshot_info

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--snapshots {folder}: not a folder (expected a folder of EDM2 network pickles)")
    by_model: dict[str, list[Snapshot]] = {}
    for path in sorted(folder.rglob("*.pkl")):
        try:
            name, kimg, s = snapshot_info(path)
        except InputError as e:
            raise InputError(f"--snapshots: {e}") from None
        model = name or path.parent.name
        by_model.setdefault(model, []).append(Snapshot(path=path, model=model, kimg=kimg, std=s))
    if not by_model:
        raise InputError(f"--snapshots {folder}: no EDM2 network pickles (network-snapshot-KIMG-STD.pkl or "
                         "edm2-NAME-KIMG-STD.pkl)")
    out = {}
    for model, snaps in sorted(by_model.items()):
        stds = sorted({s.std for s in snaps})
        want = stds[-1] if std is None else next((v for v in stds if math.isclose(v, std)), None)
        if want is None:
            raise InputError(f"--snapshot-std {std:g}: model {model} has snapshots of EMA std "
                             f"{', '.join(f'{v:g}' for v in stds)} only")
        chosen = sorted((s for s in snaps if s.std == want), key=lambda s: s.kimg)
        kimgs = [s.kimg for s in chosen]
        if len(set(kimgs)) < len(kimgs):
            raise InputError(f"--snapshots {folder}: model {model} has two snapshots of {kimgs[0]} kimg and std "
                             f"{want:g}")
        out[model] = chosen
    return out


def snapshot_curve(snaps: list[Snapshot], x0, labels, sigmas, *, j_star, seed: int, batch: int, device,
                   precision: str = "none") -> list[dict]:
    """Loss-curve rows (`lossfloor.train.curves` schema) of one model's snapshots: per snapshot the
    evaluation of `lossfloor.train.evaluation.evaluate` on the fixed subset x0 with fixed noise (EDM2's
    weighting: w = 1/c_out^2, ln sigma ~ N(P_mean, P_std^2) of its stored loss, and its learned u(sigma)),
    images = 1000 kimg, FLOPs = 3 x forward FLOPs (counted on the network, EDM2 convention) x images."""
    import numpy as np
    import torch

    from lossfloor.diffusion import get_preconditioning
    from lossfloor.models import params_of
    from lossfloor.models.edm2_pickle import load_edm2_network
    from lossfloor.train import forward_flops, training_flops
    from lossfloor.train.evaluation import evaluate
    from lossfloor.train.losses import Denoiser
    from lossfloor.train.schedules import LogNormalSchedule

    rows = []
    for snap in snaps:
        edm2 = load_edm2_network(snap.path, device=device)
        cfg = edm2.config
        shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
        if tuple(x0.shape[1:]) != shape:
            raise InputError(f"--snapshots {snap.path}: a network of samples {shape}, but --data samples have shape "
                             f"{tuple(x0.shape[1:])}")
        lab = None
        if cfg.label_dim:
            if labels is None:
                raise InputError(f"--snapshots {snap.path}: class-conditional ({cfg.label_dim} classes), but --data "
                                 "has no labels")
            if int(np.max(labels)) >= cfg.label_dim:
                raise InputError(f"--snapshots {snap.path}: class-conditional with {cfg.label_dim} classes, but "
                                 f"--data has label {int(np.max(labels))}")
            lab = torch.as_tensor(np.asarray(labels))
        precond = get_preconditioning("edm", sigma_data=edm2.sigma_data)
        schedule = LogNormalSchedule(*(edm2.loss or EDM2_LOSS), precond, True)
        den = Denoiser(edm2.net, precond, edm2.head, precision)
        res = evaluate(den, x0, lab, sigmas, seed=seed, weight=schedule.weight,
                       reference_density=schedule.reference_density, j_star=j_star, batch=batch, device=device,
                       log_var=den.log_var)
        images = 1000 * snap.kimg
        fwd = forward_flops(cfg, "edm2")
        base = {"run": snap.model, "model": snap.model, "params": params_of(cfg), "step": None, "images": images,
                "flops": training_flops(fwd, images)}
        rows += [{**base, **row} for row in res.rows()]
        log.info("snapshot %s: %d kimg, total loss %.4g", snap.path.name, snap.kimg, res.total)
    return rows


EDM2_LOSS = (-0.4, 1.0)  # (P_mean, P_std) of EDM2's ImageNet-512 loss, when a pickle stores none


# --- The total under EDM2's learned weighting -------------------------------------------------------------

LEARNED_KEY = "total_learned"  # its quantity in the ρ table and the metrics
LEARNED_FILE = "fits_learned.json"  # the fit stage's file of its fit (fits.json keeps the dashboard's contract)
LEARNED_NOTE = ("corrected: not fitted: each model learns its own weighting u(σ), so the learned total has no "
                "single J*")


def learned_total_curves(curves):
    """The total rows (σ null) with `loss` replaced by `total_learned` = Σ_k π_k w_k e^{-u_k} J_k, the total
    under the model's learned log-variance u(σ) (lossfloor.train.evaluation), as the paper weighted its
    total-loss law; None when any model was trained without the uncertainty head."""
    import pyarrow.compute as pc

    if "total_learned" not in curves.column_names:
        return None
    rows = curves.filter(pc.is_null(curves["sigma"]))
    if rows.num_rows == 0 or rows["total_learned"].null_count:
        return None
    return rows.set_column(rows.schema.get_field_index("loss"), "loss", rows["total_learned"])


def metric_quantity(key: str) -> str:
    """A ρ table quantity as a metric name part: total, total_learned, sigma_<σ>."""
    return key if key in ("total", LEARNED_KEY) else "sigma_" + key.removeprefix("sigma=")


# --- The ρ table --------------------------------------------------------------------------------------


def rho_table(fits: dict) -> list[dict]:
    rows = []
    for key, d in fits.items():
        form = {k: (None if d[k] is None else d[k]["abs_rho"]) for k in ("raw", "corrected", "free_offset")}
        hold = d.get("holdout") or {}
        rows.append({"quantity": key, "j_star": d.get("j_star"), "raw": form["raw"], "corrected": form["corrected"],
                     "free_offset": form["free_offset"],
                     "offset": (d["free_offset"] or {}).get("offset"), "holdout_best": hold.get("best"),
                     "unidentified": sorted(hold.get("unidentified") or {})})
    return rows


def format_rho(rows: list[dict]) -> str:
    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    lines = [f"{'quantity':<18}{'J*':>10}{'|rho| raw':>11}{'corrected':>11}{'free':>9}{'free E':>10}  hold-out best"]
    for r in rows:
        lines.append(f"{r['quantity']:<18}{f(r['j_star'], '.4g'):>10}{f(r['raw']):>11}{f(r['corrected']):>11}"
                     f"{f(r['free_offset']):>9}{f(r['offset'], '.4g'):>10}  {r['holdout_best'] or '-'}")
    both = [r for r in rows if r["corrected"] is not None]
    diff = [round(r["corrected"], 4) - round(r["raw"], 4) for r in both]  # equal as printed: equal
    lines.append(f"gap correction vs raw |rho|: higher for {sum(d > 0 for d in diff)}, lower for "
                 f"{sum(d < 0 for d in diff)}, equal (to 4 decimals) for {sum(d == 0 for d in diff)} of {len(both)} "
                 "quantities with a corrected fit"
                 + (f"; {len(rows) - len(both)} without one (J* not below the smallest loss, or no single J*: "
                    f"{LEARNED_KEY})" if len(both) < len(rows)
                    else "")
                 + ". Choose between forms by the hold-out, not by rho.")
    caveat = [r["quantity"] for r in rows if "free_offset" in r["unidentified"]]
    if caveat:
        lines.append(f"free_offset is not identified for {', '.join(caveat)} (E reached its bound min J): it is "
                     "not ranked there; its hold-out error and |rho| describe another model, not the form.")
    return "\n".join(lines)
