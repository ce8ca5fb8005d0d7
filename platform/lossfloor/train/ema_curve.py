"""A finished run's loss curve under another choice of weights (`EmaChoice`): a tracked EMA or a post-hoc EMA.

    rows = ema_curve("runs/tiny", load("bundled:digits"), parse_ema("posthoc:0.1"))

The loop's own curve (loss_curve.parquet) evaluates the raw weights (or its `eval_ema`) at every
evaluation point. Here the same evaluation — the run's fixed subset, σ grid, noise, weighting and J*
table (`lossfloor.train.evaluation.evaluate`, as the loop calls it) — is repeated at every evaluation
point that has an EMA snapshot (ema-<n_img>.pt), with the weights of the choice at that point:
  tracked σ_rel   the EMA the loop kept, as the snapshot holds it;
  posthoc:σ_rel   `posthoc_ema` of the snapshots taken up to that point (none later), i.e. the EDM2
                  reconstruction of the network that existed then (EDM2 paper §3.2).
Points without a snapshot are left out (a run that snapshots at every evaluation, as the scaling study's
do, keeps them all). The rows have the loop's columns (`lossfloor.train.curves.CURVE_SCHEMA`); run,
model, params, step and FLOPs are the loop's at the same point.
"""

from __future__ import annotations

import math
import os

import torch

from lossfloor.errors import InputError
from lossfloor.train.ema import EmaChoice, posthoc_ema


def ema_curve(run_dir: str | os.PathLike, data, choice: EmaChoice, *, device=None) -> list[dict]:
    """Loss-curve rows of the run in `run_dir` (trained on `data`, the same samples) under `choice`
    (tracked or posthoc) at its snapshot points, oldest first (module docstring). InputError when the run
    has no snapshot at an evaluation point or does not track the width."""
    from lossfloor.models import build_unet
    from lossfloor.train.checkpoint import read_snapshots
    from lossfloor.train.config import check_eval_grid, resolve
    from lossfloor.train.ema import ema_unavailable
    from lossfloor.train.evaluation import evaluate
    from lossfloor.train.loop import _data_arrays, eval_subset
    from lossfloor.train.losses import Denoiser
    from lossfloor.train.run_folder import read_run_folder
    from lossfloor.train.schedules import JStarCurve, build_schedule

    if choice.kind not in ("tracked", "posthoc"):
        raise InputError(f"ema: expected a tracked or posthoc EMA choice, got {choice}")
    folder = read_run_folder(run_dir)
    cfg = folder.config
    R = resolve(cfg)
    snapshots = read_snapshots(run_dir)
    why = ema_unavailable(choice, tracked=cfg.ema_stds, snapshots=bool(snapshots))
    totals = {r["images"]: r for r in folder.curve_rows if r["sigma"] is None}  # the loop's evaluation points
    points = [s for s in snapshots if s["n_img"] in totals]
    if why is None and not points:
        why = "needs EMA snapshots at the run's evaluation points"
    if why is not None:
        raise InputError(f"ema: {choice} {why} (run {run_dir})")

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples, labels = _data_arrays(data, R.unet, cfg.latents == "posterior")
    _, eval_x0, eval_labels = eval_subset(cfg, samples, labels)
    precond = R.preconditioning()
    curve = JStarCurve.from_path(cfg.jstar) if cfg.jstar else None
    if curve is not None:
        check_eval_grid(R, curve.table, table_name=f"jstar {cfg.jstar}")
    schedule = build_schedule(R.schedule, precond, P_mean=R.preset.P_mean, P_std=R.preset.P_std, jstar=curve)
    precision = cfg.precision if device.type == "cuda" or cfg.precision != "fp16" else "none"
    net = build_unet(R.unet, device="meta").to_empty(device=device)
    den = Denoiser(net, precond, None, precision)
    den.eval()
    rows = []
    for snap in points:
        t = snap["n_img"]
        if choice.kind == "posthoc":
            weights = posthoc_ema(snapshots, sigma_rel=choice.sigma_rel, n_img=t)
        else:
            weights = next(e["state"] for e in snap["emas"] if math.isclose(e["sigma_rel"], choice.sigma_rel))
        net.load_state_dict(weights)
        result = evaluate(den, eval_x0, eval_labels, R.eval_sigmas, seed=cfg.seed, weight=schedule.weight,
                          reference_density=schedule.reference_density,
                          j_star=None if curve is None else curve.table, batch=cfg.eval_batch, device=device,
                          to_native=precond.x0_to_native_loss)
        base = {k: totals[t][k] for k in ("run", "model", "params", "step", "images", "flops")}
        rows.extend({**base, **row} for row in result.rows())
    return rows
