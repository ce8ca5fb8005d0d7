"""The EDM2 scaling study (Xu et al. 2026, §5): raw vs gap-corrected power laws of loss vs compute.

Stages, each an MLflow child run of one parent run (tag `lossfloor.stage`, the contract of
`lossfloor.tracking.artifacts`), each skipped on a rerun when its output for the same config exists:

  1. data      --data SRC (EDM2 latents, image folder, ...; default bundled:digits with --preset smoke)
  2. estimate  J*(σ) in x0 units, on Ray Data (--engine ray) or in this process   -> jstar.parquet
               (on labelled data the class-conditional floor Σ_c π_c J*_c, `lossfloor.floor.conditional`)
  3. train     the model ladder, one child per model (EDM2's schedule by default, --schedule optimal for
               the paper's), per-σ loss and gap on a fixed evaluation set with fixed noise at several
               checkpoints, FLOPs = 3 x forward FLOPs x images                   -> loss_curve.parquet
               (on labelled data class-conditional models, as EDM2's; --unconditional: unconditional
               models with the unconditional floor; unlabelled data: unconditional)
  4. fit       per σ (σ* and above, up to a high σ) and for the total loss: raw, gap-corrected and
               free-offset power laws on the envelope, bootstrap over models, hold-out of the largest;
               the curves are those of the weights --ema picks (raw: the loop's own; a tracked or
               post-hoc EMA: the same evaluation repeated at every evaluation point from the EMA
               snapshots, lossfloor.train.ema_curve)          -> fits.json (+ loss_curve.parquet)
               and, for models trained with EDM2's uncertainty head, the total under its learned
               weighting Σ π w e^{-u} J (raw and free offset: u, hence its J*, is each model's own)
                                                                                    -> fits_learned.json
  5. quality   with --features SPEC: the reference statistics of --data (or --reference-stats), then each
               model's final checkpoint (--snapshots: its last snapshot pickle) evaluated by the job of
               `lossfloor evaluate` (lossfloor.jobs.evaluate: --fd-samples per seed, --fd-seeds seeds, EDM2's
               sampler, the --ema weights) -> quality.json (FD / FID / FD_DINOv2, mean and spread over seeds,
               per model with its training FLOPs); on latent data the samples are decoded by --vae with the
               latent statistics (--latent-stats, default --data's own) and compared with --reference-stats,
               the statistics of the images the latents were encoded from
  6. dashboard the offline HTML page (lossfloor.pages.scaling), in --out and on the parent run

With --snapshots DIR, stage 3 trains nothing: it evaluates NVIDIA's published EDM2 network pickles in DIR
(network-snapshot-KIMG-STD.pkl in one folder per model, or post-hoc edm2-NAME-KIMG-STD.pkl), read without
running code from them (lossfloor.models.edm2_pickle), on the same evaluation subset, grid and noise; model
and training images come from the file names, FLOPs from the network (3 x forward FLOPs x images).

    python studies/scaling_imagenet512.py                                  # smoke: 3 tiny models, digits
    python studies/scaling_imagenet512.py --dry-run --preset imagenet512 --data latents.zip
    python studies/scaling_imagenet512.py --data latents.zip --snapshots edm2-snapshots/   # no training
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python studies/scaling_imagenet512.py --preset imagenet512 --data /shared/img512-latents.zip \\
        --workers 8 --gpus-per-worker 1 --budget-scale 0.05

Outputs (--out, default runs/scaling_imagenet512, $LOSSFLOOR_RUNS_DIR/scaling_imagenet512 when set):
    estimate-HASH/    jstar.parquet, work/ (finished batches), DONE.json
    train-MODEL-HASH/ loss_curve.parquet, train_log.parquet, checkpoint-*/, DONE.json
                      (--snapshots: loss_curve.parquet of the model's snapshots, DONE.json)
    fit-HASH/         fits.json, fits_learned.json (models trained with the uncertainty head), DONE.json
                      (and loss_curve.parquet: the fitted curves, when not raw)
    quality-HASH/     reference.stats.npz, MODEL/ (lossfloor evaluate's output), quality.json, DONE.json
    dashboard-PRESET.html, summary.json
HASH is a hash of the stage's config (and of the stages it reads); DONE.json is written last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # _common, _scaling, also when imported by tests
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, default_out, ensure_lossfloor, parser, run_study

ensure_lossfloor()

import _scaling  # noqa: E402
from _scaling import Budget  # noqa: E402

from lossfloor.atomic import write_json  # noqa: E402
from lossfloor.errors import InputError, JStarNotBelowLoss  # noqa: E402
from lossfloor.jobs.engine import LOCAL, Engine, add_engine_args  # noqa: E402
from lossfloor.jobs.evaluate import N_SAMPLES, SEEDS  # noqa: E402
from lossfloor.jobs.study import Done, Step, Study  # noqa: E402

log = logging.getLogger("scaling_imagenet512")

STUDY = "scaling_imagenet512"
PRESETS = ("smoke", "imagenet512")
SCHEDULES = ("edm2", "optimal")
FITTED_CURVES = "loss_curve.parquet"  # in the fit stage: the curves fitted, when not the loop's raw ones
STAGE_TAG = "lossfloor.stage"  # the children's tag in the --dry-run plan (lossfloor.jobs.study.Study.stage_tags)
LATENT_SHAPE = (4, 64, 64)  # what --preset imagenet512 expects (EDM2 SD-VAE latents of ImageNet-512)
QUALITY_FILE = "quality.json"  # in the quality stage: per model the metrics, training FLOPs and size
REFERENCE_FILE = "reference.stats.npz"  # in the quality stage: the data's feature statistics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(
        prog="scaling_imagenet512",
        description="Estimate J*(sigma), train a ladder of EDM2 models, fit raw vs gap-corrected vs free-offset "
        "power laws of loss vs FLOPs, and build the dashboard; MLflow: a parent run with one child per stage.",
    )
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="smoke: 3 tiny widths on small 8x8 data (default without --data); imagenet512: "
                   "EDM2 img512-xs..xxl with EDM2's budgets (default with --data)")
    p.add_argument("--data", default=None, metavar="SRC",
                   help="the data set (EDM2 latents .zip/folder, image folder, .npy, ...); default bundled:digits "
                   "with --preset smoke")
    p.add_argument("--j-star", type=Path, default=None, metavar="TABLE",
                   help="use this J* table (`lossfloor estimate`, e.g. --engine ray on parquet shards) as stage 2 "
                   "instead of estimating; it must come from the same data (its dataset_fingerprint)")
    p.add_argument("--max-samples", type=int, default=None, metavar="N",
                   help="use only the first N samples (J* and training alike)")
    p.add_argument("--smoke-budget", choices=("normal", "tiny"), default="normal",
                   help="--preset smoke size: normal (3 models, minutes on 2 CPU cores) or tiny (2 models, "
                   "seconds of training, for tests)")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every model's training images (imagenet512: also its warm-up and t_ref)")
    p.add_argument("--schedule", choices=SCHEDULES, default="edm2",
                   help="training schedule: edm2 (EDM2's own, what the paper's scaling study uses; default) or "
                   "optimal (the paper's optimal-loss schedule, §4); evaluation is the same for both")
    p.add_argument("--unconditional", action="store_true",
                   help="train unconditional models, measured against the unconditional floor J* (default on "
                   "labelled data: class-conditional models, as EDM2 trains them, against the class-conditional "
                   "floor sum_c pi_c J*_c; unlabelled data: always unconditional)")
    p.add_argument("--ema", default=None, metavar="PROFILE",
                   help="the weights whose loss curves are fitted: raw, a tracked EMA width (0.05 or 0.1) or "
                   "posthoc:SIGMA_REL (EDM2's post-hoc EMA, reconstructed at every evaluation point from the EMA "
                   "snapshots taken up to it); default: the width EDM2 reports for each of its networks "
                   "(imagenet512: posthoc:0.135 for img512-xs ... posthoc:0.07 for img512-xxl), raw for the smoke "
                   "ladder (EDM2 reports none) and with --no-ema-snapshots")
    p.add_argument("--no-ema-snapshots", action="store_true",
                   help="train without EMA snapshots (one per evaluation point, both EMAs: disk); --ema is then raw")
    p.add_argument("--snapshots", type=Path, default=None, metavar="DIR",
                   help="evaluate the EDM2 network pickles in DIR instead of training the ladder: raw "
                   "network-snapshot-KIMG-STD.pkl (one folder per model, the folder names the model) or post-hoc "
                   "edm2-NAME-KIMG-STD.pkl; no code from them is run")
    p.add_argument("--snapshot-std", type=float, default=None, metavar="STD",
                   help="--snapshots: the EMA length of the snapshots to use (default: each model's longest)")
    p.add_argument("--fit-sigmas", default=None, metavar="S1,S2,...",
                   help="the per-sigma fits (default: sigma* and the sigmas where J*/J*(inf) reaches "
                   f"{', '.join(f'{v:g}' for v in _scaling.FIT_LEVELS)}, on the J* grid)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates over models per fit "
                   "(default: smoke 100, tiny 10, imagenet512 1000)")
    p.add_argument("--seed", type=int, default=0)
    eng = add_engine_args(
        p, kind="ray" if os.environ.get("RAY_ADDRESS") else "local", workers=2, cpus_per_worker=1,
        workers_help="Ray Data actors of the J* estimate", worker="training worker and J* actor",
        address_env="RAY_ADDRESS",
        help={"--engine": "ray: J* on Ray Data and the ladder on Ray Train or as Ray tasks; local: this process "
              "(default: ray inside a Ray job, i.e. when RAY_ADDRESS is set, else local)"})
    eng.add_argument("--trainer", choices=("ray-train", "tasks"), default="ray-train",
                     help="ray engine: each model on Ray Train with --train-workers workers (default), or as one "
                     "Ray task running the local loop (lighter: no worker group, no restarts); the models of the "
                     "ladder run concurrently either way, as many as the cluster's resources allow")
    eng.add_argument("--train-workers", type=int, default=1, help="ray engine, ray-train: workers per model (DDP)")
    p.add_argument("--max-device-gb", type=float, default=None, metavar="GB",
                   help="cap on one J* actor's device memory: the batch is sized to it, and on CUDA the data stay in host "
                   "memory (each batch gathering its rows) unless they fit next to a batch (default: no cap)")
    q = p.add_argument_group("sample quality (after the ladder; off unless --features is given)")
    q.add_argument("--features", default=None, metavar="SPEC[,SPEC...]",
                   help="evaluate each model's final checkpoint as `lossfloor evaluate` does (the same job): "
                   "pixels[:K] | inception:FILE (fid) | dinov2:FILE (fd_dinov2) | network:FILE (fd), against the "
                   "reference statistics of --data computed once (latent data: --vae and --reference-stats)")
    q.add_argument("--vae", default=None, metavar="DIR",
                   help="latent data: the VAE (diffusers AutoencoderKL folder) the latents were encoded with; the "
                   "models' samples are decoded by it before the features")
    q.add_argument("--latent-stats", default=None, metavar="SRC",
                   help="latent data: the latent set whose per-channel statistics un-whiten the samples (default: "
                   "--data's own when it carries them, else, and always with --snapshots, EDM2's SD-VAE constants)")
    q.add_argument("--reference-stats", type=Path, default=None, metavar="STATS",
                   help="the reference statistics (lossfloor evaluate --reference --data IMAGES --features SPEC "
                   "--out STATS): required on latent data (those of the images the latents were encoded from); "
                   "on image data instead of computing those of --data (checked against it)")
    q.add_argument("--fd-samples", type=int, default=None, metavar="N",
                   help=f"samples per seed (default {N_SAMPLES}, the published protocol)")
    q.add_argument("--fd-seeds", type=int, default=None, metavar="S",
                   help=f"seeds 0..S-1, reported as mean and spread (default {SEEDS})")
    p.add_argument("--dry-run", action="store_true",
                   help="print the stages, budgets, models, FLOPs and devices, and exit without writing anything")
    add_output_args(p, STUDY, experiment="scaling")
    args = p.parse_args(argv)
    args.preset = args.preset or ("smoke" if args.data is None else "imagenet512")
    if args.data is None and args.preset == "smoke":
        args.data = "bundled:digits"
    args.out = args.out or default_out(STUDY)
    return args


def is_conditional(args: argparse.Namespace) -> bool:
    """Class-conditional models and floor: labelled data without --unconditional (no --data: the dry-run
    plan for labelled ImageNet latents)."""
    if args.unconditional:
        return False
    if args.data is None:
        return True
    from lossfloor.data import open_source

    return open_source(args.data).info().has_labels


# --- The plan -------------------------------------------------------------------------------------------


def make_budget(args: argparse.Namespace, sample_shape: tuple[int, ...] | None) -> Budget:
    if not (math.isfinite(args.budget_scale) and args.budget_scale > 0):
        raise InputError(f"--budget-scale: expected a positive number like 0.1, got {args.budget_scale}")
    if args.train_workers < 1:
        raise InputError(f"--train-workers: expected an integer >= 1, got {args.train_workers}")
    if args.max_samples is not None and args.max_samples < 2:
        raise InputError(f"--max-samples: expected an integer >= 2, got {args.max_samples}")
    if args.max_device_gb is not None:
        from lossfloor.floor import EstimatorConfig

        EstimatorConfig(max_device_gb=args.max_device_gb)  # its own check, before any stage
    if args.bootstrap is not None and args.bootstrap < 0:
        raise InputError(f"--bootstrap: expected an integer >= 0, got {args.bootstrap}")
    if args.preset == "smoke":
        b = _scaling.smoke_budget(args.smoke_budget, args.budget_scale)
        if sample_shape is not None and tuple(sample_shape) != (1, 8, 8):
            b = dataclasses.replace(b, models=tuple(_fit_shape(p, sample_shape) for p in b.models))
    else:
        b = _scaling.imagenet512_budget(args.budget_scale)
        if sample_shape is not None and tuple(sample_shape) != LATENT_SHAPE:
            raise InputError(f"--data {args.data}: samples of shape {tuple(sample_shape)}, but --preset imagenet512 "
                             f"trains on EDM2 ImageNet-512 latents of shape {LATENT_SHAPE}")
    if args.max_samples is not None:
        b = dataclasses.replace(b, max_samples=args.max_samples if b.max_samples is None
                                else min(b.max_samples, args.max_samples))
    if args.bootstrap is not None:
        b = dataclasses.replace(b, bootstrap=args.bootstrap)
    return b


def _fit_shape(preset, shape):
    """A smoke preset for other small (C, H, W) data: same widths, two levels, attention at H/2."""
    c, h, w = shape
    if h != w or h % 2:
        raise InputError(f"--data: --preset smoke trains on square images with an even side, got {tuple(shape)}")
    unet = dataclasses.replace(preset.unet, img_resolution=h, img_channels=c, attn_resolutions=(h // 2,))
    return dataclasses.replace(preset, unet=unet)


def ema_flag(args: argparse.Namespace):
    """--ema as one checked choice (None: the default), refused before any work when the ladder's runs
    cannot give it: a width they do not track, or any EMA without snapshots."""
    from lossfloor.train import TrainConfig
    from lossfloor.train.ema import ema_unavailable, parse_ema

    if args.ema is None:
        return None
    choice = parse_ema(args.ema)
    if args.snapshots is not None and choice.kind != "raw":
        raise InputError(f"--ema: {choice} with --snapshots: the EDM2 pickles are already EMA networks; pick "
                         "their EMA length with --snapshot-std")
    if choice.kind != "raw" and args.no_ema_snapshots:
        raise InputError(f"--ema: {choice} needs EMA snapshots at the evaluation points, which --no-ema-snapshots "
                         "turns off; give --ema raw or drop --no-ema-snapshots")
    tracked = TrainConfig().ema_stds
    why = ema_unavailable(choice, tracked=tracked, snapshots=True)
    if why is not None:
        raise InputError(f"--ema: {choice} {why}; the models track {', '.join(f'{s:g}' for s in tracked)}: give "
                         "raw, one of those or posthoc:SIGMA_REL")
    return choice


def ema_choices(args: argparse.Namespace, b: Budget) -> dict:
    """Per model of the ladder: the weights its fitted curve evaluates (--ema, or the default: EDM2's
    reported post-hoc width for an EDM2 network whose run keeps snapshots, else raw)."""
    from lossfloor.train.ema import EmaChoice

    choice = ema_flag(args)
    if args.snapshots is not None:  # the snapshot pickles are evaluated as they are (--snapshot-std picks them)
        return {p.name: EmaChoice(kind="raw") for p in b.models}
    if choice is not None:
        return {p.name: choice for p in b.models}
    return {p.name: EmaChoice(kind="posthoc", sigma_rel=_scaling.EDM2_SIGMA_REL[p.name])
            if p.name in _scaling.EDM2_SIGMA_REL and not args.no_ema_snapshots else EmaChoice(kind="raw")
            for p in b.models}


def ema_label(choices: dict) -> str:
    """The --ema of a ladder in one line: "posthoc:0.1", or per model when they differ."""
    names = {str(c) for c in choices.values()}
    return names.pop() if len(names) == 1 else ", ".join(f"{m} {c}" for m, c in choices.items())


def model_rows(b: Budget, conditional: bool) -> list[dict]:
    """Per model: params, forward FLOPs per image (lossfloor.train.flops), images, steps, training FLOPs."""
    from lossfloor.models import params_of
    from lossfloor.train import forward_flops, training_flops

    rows = []
    for preset, n_img in zip(b.models, b.duration_n_img):
        unet = preset.unet if conditional else dataclasses.replace(preset.unet, label_dim=0)
        fwd = forward_flops(unet, "edm2")  # the convention of train_configs
        rows.append({"model": preset.name, "params": params_of(unet), "channels": unet.model_channels,
                     "forward_flops": fwd, "n_img": n_img, "steps": n_img // b.batch_n_img,
                     "train_flops": training_flops(fwd, n_img)})
    return rows


def devices(args: argparse.Namespace) -> str:
    engine = args.engine
    if engine.kind == "ray":
        kind = f"{engine.gpus_per_worker:g} GPU + {engine.cpus_per_worker:g} CPU" if engine.gpus_per_worker > 0 \
            else f"{engine.cpus_per_worker:g} CPU"
        how = (f"Ray Train, {args.train_workers} worker(s) per model" if args.trainer == "ray-train"
               else "one Ray task per model")
        return (f"ray engine at {engine.address or 'a local Ray'}: J* on {engine.workers} Ray Data actor(s) x "
                f"{kind}; the models concurrently, each on {how} ({kind} per worker, torch threads "
                f"{engine.cpus_per_worker:g})")
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return f"local engine: this process, device {dev}, torch threads {engine.cpus_per_worker:g}"


def describe_plan(args: argparse.Namespace, b: Budget, count: int | None, shape, uri: str) -> str:
    from lossfloor.diffusion import parse_sigma_grid

    n = None if count is None else (count if b.max_samples is None else min(count, b.max_samples))
    sig = parse_sigma_grid(b.sigma_grid)
    rows = model_rows(b, args.conditional)
    size = f" ({args.smoke_budget})" if args.preset == "smoke" else ""
    lines = [
        f"scaling study: dry run (nothing is computed or written); preset {args.preset}{size}, "
        f"budget scale {args.budget_scale:g}, seed {args.seed}",
        f"stages: 1 data, 2 estimate J*, 3 {'evaluate the snapshots' if args.snapshots else 'train the ladder'}, "
        "4 fit (raw | corrected | free offset), 5 sample quality, 6 dashboard",
        f"1 data: {args.data or '(none: --data is required to run)'}"
        + (f"  N={n}  shape={tuple(shape)}" if n is not None else f"  expected shape {LATENT_SHAPE}"),
        (f"2 estimate: none, the given J* table {args.j_star}" if args.j_star is not None else
         f"2 estimate: {'the class-conditional floor, ' if args.conditional else ''}{_estimator_plan(args, b, n, shape)}"
         + f", {b.queries_per_sample} queries per sample, sigma grid {b.sigma_grid} ({len(sig)} sigmas), x0 target"),
        f"3 train: {len(rows)} models, schedule {args.schedule}, "
        f"{'class-conditional' if args.conditional else 'unconditional'}, batch {b.batch_n_img}, "
        f"{b.evals} evaluations per model on {b.eval_n_samples} training samples with fixed noise",
        f"  {'model':<12}{'params':>14}{'GFLOP/img fwd':>15}{'images':>15}{'steps':>10}{'train FLOPs':>13}",
    ]
    if args.snapshots is not None:  # stage 3 evaluates the snapshots instead (the budget's models are not trained)
        lines[4:] = [f"3 snapshots: the EDM2 network pickles in {args.snapshots} evaluated instead of training, "
                     f"{b.eval_n_samples} samples with fixed noise"]
    else:
        for r in rows:
            lines.append(f"  {r['model']:<12}{r['params']:>14,}{r['forward_flops'] / 1e9:>15.4g}{r['n_img']:>15,}"
                         f"{r['steps']:>10,}{r['train_flops']:>13.3e}")
        lines.append(f"  total training FLOPs {sum(r['train_flops'] for r in rows):.3e} (FLOPs = 3 x forward FLOPs x "
                     f"images; warm-up {b.warmup_n_img if b.warmup_n_img is not None else 'preset'} images, "
                     f"t_ref {b.t_ref_iters if b.t_ref_iters is not None else 'preset'} steps)")
    lines += [
        f"4 fit: sigma {args.fit_sigmas or 'from J*: sigma* and J*/J*(inf) = ' + ', '.join(f'{v:g}' for v in _scaling.FIT_LEVELS)}"
        f" + the total loss; bootstrap {b.bootstrap} over models, hold-out of the largest model",
        f"  weights of the fitted curves (--ema): {ema_label(ema_choices(args, b))}; EMA snapshots "
        + ("off" if args.no_ema_snapshots else "at every evaluation point"),
        f"5 quality: {quality_plan(args, shape)}",
        f"6 dashboard: {args.out}/dashboard-{args.preset}.html, also on the parent run",
        f"devices: {devices(args)}",
        f"outputs: {args.out}/<stage>-<hash>/ (DONE.json marks a finished stage; a rerun skips it), "
        f"{args.out}/summary.json",
        f"MLflow: {uri}, experiment {args.experiment!r}: parent run 'scaling-{args.preset}', children "
        f"{STAGE_TAG}=estimate, train (one per model), fit" + (", quality" if args.features else ""),
    ]
    return "\n".join(lines)


# --- Stage 2: J* -----------------------------------------------------------------------------------------


def _estimator_plan(args: argparse.Namespace, b: Budget, n: int | None, shape) -> str:
    """The estimator the estimate stage will use, resolved (as the stage will) when N is known."""
    from lossfloor.floor.config import DEFAULT_KNN_SUBSET_SIZE, EXACT_MAX_N

    if args.conditional:
        return (f"{b.estimator} estimator resolved for each class's own samples (auto: exact for a class of up to "
                f"{EXACT_MAX_N['cpu']} samples on a CPU, {EXACT_MAX_N['cuda']} on CUDA, else knn)")
    if b.estimator == "auto" and n is None:
        return (f"auto estimator (exact up to {EXACT_MAX_N['cpu']} samples on a CPU, {EXACT_MAX_N['cuda']} on "
                f"CUDA, above knn with L={b.subset_size or DEFAULT_KNN_SUBSET_SIZE}: 1.28M ImageNet latents -> knn)")
    if n is None:
        return f"{b.estimator} estimator" + (f" (L={b.subset_size})" if b.subset_size else "")
    cfg = estimator_config(args, b)
    cfg = dataclasses.replace(cfg, device="cpu").resolve(n, math.prod(shape), compute_device=cfg.device)
    return f"{cfg.estimator} estimator" + ("" if cfg.estimator == "exact" else f" (L={cfg.subset_size})")


def estimator_config(args: argparse.Namespace, b: Budget):
    import torch

    from lossfloor.floor import EstimatorConfig

    if args.engine.kind == "ray":
        device = args.engine.device
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return EstimatorConfig(estimator=b.estimator, subset_size=b.subset_size, queries_per_sample=b.queries_per_sample,
                           seed=args.seed, device=device, rows_per_batch=b.rows_per_batch,
                           max_device_gb=args.max_device_gb)


def _check_fit_sigmas(fit_sigmas, grid) -> None:
    """The rule of the J* table's own reader (`floor.table.outside_grid`), before the table exists."""
    from lossfloor.floor.table import outside_grid

    outside = outside_grid(fit_sigmas, grid)
    if outside:
        raise InputError(f"--fit-sigmas: {', '.join(f'{s:g}' for s in outside)} outside the J* grid "
                         f"[{min(grid):.4g}, {max(grid):.4g}] (J* is known only there)")


def labels_key(args, ds) -> str | None:
    """The fingerprint of the labels of a class-conditional study (its floor's classes), else None."""
    from lossfloor.data import labels_fingerprint

    return labels_fingerprint(ds.labels) if args.conditional else None


def given_table(path: Path, ds, args):
    """The J* table of --j-star, checked against the data: same fingerprint (and labels), the floor of the
    models' kind (class-conditional or not), x0 units available."""
    from lossfloor.floor import read_table

    if not path.is_file():
        raise InputError(f"--j-star {path}: file not found (a J* table written by `lossfloor estimate`)")
    table = read_table(path)
    try:
        x0 = table.x0()  # x0 units and an interval, converted from the table's target if needed
    except InputError as e:
        raise InputError(f"--j-star: {e}") from None
    x0.check_data(ds.fingerprint, conditional=args.conditional, labels=labels_key(args, ds), table=f"--j-star {path}",
                  data="--data (with --max-samples)")
    if "total_variance" not in table.table.column_names:
        raise InputError(f"--j-star {path}: expected column total_variance (write it with `lossfloor estimate`)")
    return table


def estimate_step(args, b: Budget, ds, given, study: Study) -> Step:
    """Stage 2, keyed by the data and the estimator (or the given table's bytes); later stages get the
    J* table (`floor.read_table` of the stage's jstar.parquet)."""
    from lossfloor.floor import read_table
    from lossfloor.jobs.estimate import stage_key

    if given is not None:
        key = {"data_fingerprint": ds.fingerprint, "n_samples": len(ds), "given_sha256": _sha256(args.j_star)}
        work, doing = functools.partial(use_given_table, args.j_star, given), f"the given J* table {args.j_star}"
    else:
        key = {"data_fingerprint": ds.fingerprint, "n_samples": len(ds), "sigma_grid": b.sigma_grid,
               "estimator": stage_key(estimator_config(args, b), conditional=args.conditional)}
        if args.conditional:
            key["labels_fingerprint"] = labels_key(args, ds)
        kind = "class-conditional floor, " if args.conditional else ""
        work = functools.partial(run_estimate, args, b, ds)
        doing = f"{kind}{b.estimator} estimator on {args.engine.kind} engine"
    return Step(name="estimate", key=key, work=work, doing=doing,
                read=lambda stage: read_table(stage.dir / "jstar.parquet"),
                log=functools.partial(log_estimate_child, args, ds, study))


def use_given_table(path: Path, table, folder: Path) -> dict:
    """Stage 2 from --j-star: the table copied into the stage folder (the later stages read it there)."""
    shutil.copyfile(path, folder / "jstar.parquet")
    return {"jstar": "jstar.parquet", "sigma_star": table.sigma_star, "given": str(path),
            "total_variance": float(table.column("total_variance")[0]), "seconds": 0.0, "engine": "given"}


def run_estimate(args, b: Budget, ds, folder: Path) -> dict:
    from lossfloor.diffusion import parse_sigma_grid
    from lossfloor.floor import build_table, write_table
    from lossfloor.jobs import estimate

    sigmas = parse_sigma_grid(b.sigma_grid)
    cfg = estimator_config(args, b)
    t0 = time.monotonic()
    est = estimate.estimate(ds.samples, sigmas, cfg, engine=args.engine, labels=ds.labels if args.conditional else None,
                            fingerprint=ds.fingerprint, work_dir=folder / "work")
    table = build_table(est, target="x0", fingerprint=ds.fingerprint)
    write_table(table, folder / "jstar.parquet")
    return {"jstar": "jstar.parquet", "sigma_star": table.sigma_star, "total_variance": est.total_variance,
            "seconds": time.monotonic() - t0, "engine": args.engine.kind}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- Stage 3: the ladder ---------------------------------------------------------------------------------


def train_configs(args, b: Budget, jstar_path: Path, eval_sigmas) -> list:
    from lossfloor.train import EDM2Schedule, OptimalLossSchedule, TrainConfig

    schedule = EDM2Schedule() if args.schedule == "edm2" else OptimalLossSchedule()
    out = []
    for preset, n_img in zip(b.models, b.duration_n_img):
        every = max(b.batch_n_img, n_img // b.evals // b.batch_n_img * b.batch_n_img)
        out.append(TrainConfig(
            preset=preset, schedule=schedule, jstar=str(jstar_path), conditional=args.conditional,
            batch_n_img=b.batch_n_img, duration_n_img=n_img, warmup_n_img=b.warmup_n_img,
            t_ref_iters=b.t_ref_iters, eval_every_n_img=every, eval_sigmas=tuple(eval_sigmas),
            eval_n_samples=b.eval_n_samples, keep_checkpoints=b.keep_checkpoints, seed=args.seed,
            snapshot_every_n_img=None if args.no_ema_snapshots else every,  # snapshots = evaluation points
            flop_convention="edm2", run=preset.name,
        ))
    return out


def train_step(args, config, estimate: Done, fingerprint: str, b: Budget, study: Study) -> Step:
    """One model of the ladder, keyed by its TrainConfig, the J* it reads (by the estimate stage's hash, not
    its path) and the data; trained by `train_ladder` with the others; later stages get its DONE.json summary."""
    d = config.to_dict()
    d["jstar"] = f"estimate-{estimate.stage.hash}"  # the J* it reads, by hash, not by path
    return Step(name=f"train-{config.preset_obj.name}", key={"train": d, "data_fingerprint": fingerprint,
                                                             "max_samples": b.max_samples},
                log=functools.partial(log_train_child, args, b, study))


def train_ladder(args, b: Budget, ds, configs, todo, finished) -> None:
    """Stage 3's work: the models of `todo` (stages named train-MODEL) on the chosen engine."""
    from lossfloor.jobs import train as jobs_train

    by_name = {f"train-{cfg.preset_obj.name}": cfg for cfg in configs}
    jobs_train.train_ladder([(st, by_name[st.name]) for st in todo], data=args.data, ds=ds, out=args.out,
                            engine=args.engine, on_done=finished, trainer=args.trainer,
                            train_workers=args.train_workers, max_samples=b.max_samples, n_source=args.n_source)


# --- Stage 3 from EDM2 snapshots -------------------------------------------------------------------------


def snapshot_step(args, b: Budget, ds, estimate: Done, model: str, snaps, eval_sigmas, study: Study) -> Step:
    """One model of --snapshots, keyed by its files (name and size), the data, the J* it reads (by hash) and
    the evaluation; named train-MODEL (the study contract's train stage); later stages get its curves."""
    import pyarrow.parquet as pq

    from lossfloor.train.run_folder import CURVE_FILE

    key = {"snapshots": [[str(s.path.relative_to(args.snapshots)), s.path.stat().st_size] for s in snaps],
           "data_fingerprint": ds.fingerprint, "n_samples": len(ds), "estimate": estimate.stage.hash,
           "eval_sigmas": list(eval_sigmas), "eval_n_samples": b.eval_n_samples, "seed": args.seed}
    return Step(name=f"train-{model}", key=key, doing=f"{len(snaps)} EDM2 snapshot(s) of {model}, evaluated",
                work=functools.partial(run_snapshots, args, b, ds, estimate.value, snaps, eval_sigmas),
                read=lambda stage: pq.read_table(stage.dir / CURVE_FILE),
                log=functools.partial(log_snapshot_child, args, study, model))


def run_snapshots(args, b: Budget, ds, table, snaps, eval_sigmas, folder: Path) -> dict:
    """Stage 3's work for one model of --snapshots: its loss curve (`_scaling.snapshot_curve`) on the first
    eval_n_samples of the study's evaluation split, written as loss_curve.parquet."""
    import numpy as np
    import torch

    from lossfloor.train.curves import CURVE_SCHEMA, write_rows
    from lossfloor.train.loop import split_indices
    from lossfloor.train.run_folder import CURVE_FILE

    t0 = time.monotonic()
    _, idx = split_indices(len(ds), min(b.eval_n_samples, len(ds)), False, args.seed)
    x0 = torch.as_tensor(np.asarray(ds.samples[idx], dtype=np.float32))
    labels = None if ds.labels is None else np.asarray(ds.labels)[idx]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # this process, whatever the engine
    rows = _scaling.snapshot_curve(snaps, x0, labels, eval_sigmas, j_star=table.x0(), seed=args.seed, batch=256,
                                   device=device)
    write_rows(rows, CURVE_SCHEMA, folder / CURVE_FILE, {"snapshots": json.dumps([str(s.path) for s in snaps])})
    return {"model": snaps[0].model, "snapshots": len(snaps), "final_total": rows[-1]["loss"],
            "device": str(device), "seconds": time.monotonic() - t0}


def log_snapshot_child(args, study: Study, model: str, done: Done) -> str:
    """The model's curves as the study's train child (`lossfloor.jobs.record.record_curves`)."""
    from lossfloor.jobs.record import record_curves
    from lossfloor.train.run_folder import CURVE_FILE

    totals = [r["loss"] for r in done.value.to_pylist() if r["sigma"] is None]
    return record_curves(done.stage.dir / CURVE_FILE,
                         params={"study": STUDY, "data": args.data, "snapshots": str(args.snapshots), "model": model,
                                 "stage_dir": str(done.stage.dir)},
                         metrics={"final_total": totals[-1]},
                         **study.child(model, study.stage_tags(done, **{"lossfloor.model": model})))


# --- Stage 4: fits ---------------------------------------------------------------------------------------


def fit_step(args, b: Budget, ds, estimate: Done, trained: list[Done], curves, fit_sigmas, total_js,
             choices: dict, study: Study) -> Step:
    """Stage 4, keyed by the stages it reads (by hash), the weights of every model (--ema) and the fits'
    settings; later stages get fits.json."""
    key = {"estimate": estimate.stage.hash, "train": sorted(d.stage.hash for d in trained),
           "sigmas": list(fit_sigmas), "bootstrap": b.bootstrap, "seed": args.seed, "holdout": "largest",
           "total_j_star": list(total_js), "ema": {m: str(c) for m, c in choices.items()},
           "learned": _scaling.learned_total_curves(curves) is not None}
    return Step(name="fit", key=key, doing=f"{len(fit_sigmas) + 1} quantities, bootstrap {b.bootstrap}, "
                f"weights {ema_label(choices)}",
                work=functools.partial(run_fits, args, b, ds, curves, trained, choices, estimate.value,
                                       fit_sigmas, total_js),
                read=lambda stage: json.loads((stage.dir / "fits.json").read_text(encoding="utf-8")),
                log=functools.partial(log_fit_child, study))


def fitted_curves(args, b: Budget, ds, curves, trained: list[Done], choices: dict):
    """The curves the fits are made on: per model the loop's own (raw) or, under an EMA choice, the same
    evaluation at every snapshot point with those weights (`lossfloor.train.ema_curve.ema_curve`, on this
    process's device). ds: the study's data (a shard folder the Ray engine left unloaded is loaded here)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from lossfloor.data import Dataset, load
    from lossfloor.train import CURVE_SCHEMA
    from lossfloor.train.curves import to_table
    from lossfloor.train.ema_curve import ema_curve

    if all(c.kind == "raw" for c in choices.values()):
        return curves
    data = ds if isinstance(ds, Dataset) else load(args.data, max_samples=b.max_samples)  # what the models trained on
    tables = []
    for done in trained:
        model = done.value["model"]
        if choices[model].kind == "raw":
            tables.append(curves.filter(pc.equal(curves.column("model"), model)))
            continue
        log.info("fit: evaluating %s under --ema %s at its snapshot points", model, choices[model])
        tables.append(to_table(ema_curve(done.stage.dir, data, choices[model]), CURVE_SCHEMA))
    return pa.concat_tables(tables)


def run_fits(args, b: Budget, ds, curves, trained: list[Done], choices: dict, table, fit_sigmas, total_js,
             folder: Path) -> dict:
    from lossfloor.scaling import JStarValue, fit_all
    from lossfloor.train.curves import write_rows

    t0 = time.monotonic()
    curves = fitted_curves(args, b, ds, curves, trained, choices)
    ema_s = time.monotonic() - t0
    if any(c.kind != "raw" for c in choices.values()):  # the fitted curves, for the dashboard (record_fits)
        write_rows(curves.to_pylist(), curves.schema, folder / FITTED_CURVES)
    # per σ: the J* table itself (read in x0 units with its interval); the total: its weighted sum
    total = JStarValue(*total_js, source="the schedule-weighted J*(σ) of the table")
    fits = {}
    t0 = time.monotonic()
    quantities = [*fit_sigmas, None]
    for sigma in quantities:
        key = "total" if sigma is None else f"sigma={sigma:.6g}"
        js = table.table if sigma is not None else total
        note = None
        try:
            f = fit_all(curves, j_star=js, sigma=sigma, bootstrap=b.bootstrap, holdout=True, seed=args.seed)
        except JStarNotBelowLoss as e:
            # J* reached within evaluation noise: the corrected form cannot be fitted; say so, fit the others
            note = f"corrected: not fitted: {e}"
            f = fit_all(curves, sigma=sigma, bootstrap=b.bootstrap, holdout=True, seed=args.seed)
        d = f.to_dict()
        if note:
            d["notes"] = [note, *[n for n in d["notes"] if not n.startswith("corrected: no J* given")]]
        fits[key] = d
        log.info("fit %s: raw |rho| %.4f, corrected |rho| %s", key, d["raw"]["abs_rho"],
                 "-" if d["corrected"] is None else f"{d['corrected']['abs_rho']:.4f}")
    write_json(folder / "fits.json", fits)
    learned = _scaling.learned_total_curves(curves)
    if learned is not None:  # the total under the learned weighting, beside the schedule's
        d = fit_all(learned, sigma=None, bootstrap=b.bootstrap, holdout=True, seed=args.seed).to_dict()
        d["notes"] = [_scaling.LEARNED_NOTE, *[n for n in d["notes"] if not n.startswith("corrected: no J* given")]]
        write_json(folder / _scaling.LEARNED_FILE, {_scaling.LEARNED_KEY: d})
        log.info("fit %s: raw |rho| %.4f", _scaling.LEARNED_KEY, d["raw"]["abs_rho"])
        fits = {**fits, _scaling.LEARNED_KEY: d}
    return {"fits": "fits.json", "quantities": list(fits), "seconds": time.monotonic() - t0,
            "rho": _scaling.rho_table(fits), "ema": {m: str(c) for m, c in choices.items()}, "ema_seconds": ema_s}


def read_learned_fit(folder: Path) -> dict:
    """{total_learned: its fit} from a fit stage's folder, or {} (a model trained without the head)."""
    path = folder / _scaling.LEARNED_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# --- Stage 5: sample quality -----------------------------------------------------------------------------


def quality_flags(args: argparse.Namespace) -> dict | None:
    """--features, --fd-samples, --fd-seeds checked before any work (the extractors' network files are opened
    and hashed here); None without --features (the stage is off)."""
    from lossfloor.train.metrics import feature_extractors

    if args.features is None:
        for flag, value in (("--fd-samples", args.fd_samples), ("--fd-seeds", args.fd_seeds), ("--vae", args.vae),
                            ("--latent-stats", args.latent_stats), ("--reference-stats", args.reference_stats)):
            if value is not None:
                raise InputError(f"{flag}: only with --features SPEC (it sets up the sample-quality stage)")
        return None
    n = N_SAMPLES if args.fd_samples is None else args.fd_samples
    seeds = SEEDS if args.fd_seeds is None else args.fd_seeds
    if n < 2:
        raise InputError(f"--fd-samples: expected an integer >= 2, like 50000, got {n}")
    if seeds < 1:
        raise InputError(f"--fd-seeds: expected an integer >= 1 (runs of --fd-samples each), got {seeds}")
    extractors = feature_extractors(args.features, device="cpu")
    quality = {"features": args.features, "networks": {k: ex.network_sha256 for k, ex in extractors.items()},
               "n_samples": n, "seeds": seeds}
    if args.reference_stats is not None:  # its features must be those of --features (the data: quality_inputs)
        from lossfloor.train.quality import read_reference

        ref = read_reference(str(args.reference_stats))
        ref.check(extractors, shape=ref.shape, path=str(args.reference_stats))
        quality["reference_stats"] = _sha256(args.reference_stats)
    return quality


def is_latent(shape) -> bool:
    """Samples of neither 1 nor 3 channels are latents (as `lossfloor evaluate` tells them)."""
    return shape[0] not in (1, 3)


def quality_inputs(args: argparse.Namespace, shape, fingerprint: str | None = None) -> dict:
    """The latent flags against the data (before any work): latent data need --vae and --reference-stats,
    image data take neither --vae nor --latent-stats, and a given --reference-stats of image data must be of
    all of --data (`fingerprint`, once it is known) at its shape. Returns what of them enters the stage key:
    the VAE's weights file by path and mtime (as the work key of `lossfloor evaluate` stamps it) and the
    latent statistics (None: EDM2's constants)."""
    from lossfloor.data.vae import WEIGHTS

    if not is_latent(shape):
        for flag, value in (("--vae", args.vae), ("--latent-stats", args.latent_stats)):
            if value is not None:
                raise InputError(f"{flag}: only for latent data, but --data {args.data} holds images of shape "
                                 f"{tuple(shape)}")
        if args.reference_stats is not None:
            from lossfloor.train.quality import read_reference

            read_reference(str(args.reference_stats)).check({}, shape=shape, fingerprint=fingerprint,
                                                            path=str(args.reference_stats))
        return {}
    if args.vae is None:
        raise InputError(f"--vae: --features on latent data (--data {args.data}, {shape[0]} channels) needs the VAE "
                         "the latents were encoded with (a diffusers AutoencoderKL folder) to decode the samples")
    if args.reference_stats is None:
        raise InputError(f"--reference-stats: --features on latent data (--data {args.data}) needs the statistics of "
                         "the images they were encoded from (lossfloor evaluate --reference --data IMAGES "
                         f"--features {args.features} --out STATS)")
    from lossfloor.data.vae import check_vae_folder
    from lossfloor.jobs.encode import latent_stats

    check_vae_folder(args.vae)
    source = args.latent_stats
    if source is None and args.snapshots is None:  # --data's own statistics when it is a latent set carrying
        try:  # them, else EDM2's constants (EDM2's snapshots sample latents whitened with those)
            latent_stats(args.data, "--data")
            source = args.data
        except InputError:
            source = None
    stats = None if source is None else latent_stats(source, "--latent-stats")
    weights = Path(args.vae).expanduser() / WEIGHTS
    return {"vae": [str(weights.absolute()), weights.stat().st_mtime_ns],
            "latent_stats": None if stats is None else {"source": str(source), **stats.to_dict()}}


def quality_plan(args: argparse.Namespace, shape) -> str:
    """The sample-quality stage in the --dry-run plan."""
    if args.features is None:
        return "off (--features SPEC turns it on)"
    shape = shape if shape is not None else (LATENT_SHAPE if args.preset == "imagenet512" else None)
    latent = shape is not None and is_latent(shape)
    n = N_SAMPLES if args.fd_samples is None else args.fd_samples
    seeds = SEEDS if args.fd_seeds is None else args.fd_seeds
    which = "last snapshot pickle" if args.snapshots is not None else "final checkpoint"
    decoded = (f", decoded by the VAE {args.vae or '(--vae DIR: required)'}" if latent else "")
    against = (f"--reference-stats {args.reference_stats}" if args.reference_stats is not None
               else "--reference-stats STATS (required: those of the images)" if latent
               else "the reference statistics of the data")
    return (f"{args.features}, {n} samples x {seeds} seed(s) from each model's {which} (the job of "
            f"lossfloor evaluate){decoded}, against {against}")


def final_models(trained: list[Done], snapshots: dict | None, choices: dict) -> dict:
    """{model: (its train stage's folder, what `lossfloor evaluate --model` samples, its --ema)}: the run folder
    (its final checkpoint) with the weights of the fitted curves (`ema_choices`), or with --snapshots the last
    snapshot pickle, the one the model's loss curve ends with, as it is (--ema auto: a pickle is an EMA)."""
    if snapshots is None:
        return {d.value["model"]: (d.stage.dir, str(d.stage.dir), str(choices[d.value["model"]])) for d in trained}
    return {model: (d.stage.dir, str(snaps[-1].path), "auto") for d, (model, snaps) in zip(trained, snapshots.items())}


def quality_step(args, quality: dict, trained: list[Done], models: dict, study: Study) -> Step:
    """Stage 5, keyed by the train stages (by hash), the data, the extractors (their network files' sha256),
    the sample counts, the sampler settings, the weights evaluated (--ema) and, when given, the reference
    statistics (sha256), the VAE and the latent statistics (`quality_inputs`); later stages get quality.json."""
    from lossfloor.train.quality import SamplerSettings

    key = {"train": sorted(d.stage.hash for d in trained), "data": args.data, **quality,
           "sampler": dataclasses.asdict(SamplerSettings()), "ema": {m: ema for m, (_, _, ema) in models.items()}}
    return Step(name="quality", key=key,
                doing=f"{quality['features']} of {quality['n_samples']} samples x {quality['seeds']} seed(s) per model",
                work=functools.partial(run_quality, args, quality, models),
                read=lambda stage: json.loads((stage.dir / QUALITY_FILE).read_text(encoding="utf-8")),
                log=functools.partial(log_quality_child, args, study))


def run_quality(args, quality: dict, models: dict, folder: Path) -> dict:
    """Stage 5's work: the reference statistics of --data (`jobs.evaluate.reference`; a given --reference-stats
    is copied instead), then each model's final checkpoint or last snapshot pickle (`final_models`) evaluated
    by `jobs.evaluate.evaluate` (what `lossfloor evaluate` runs; on Ray with the study's Ray engine; latent
    models decoded by --vae) into MODEL/; quality.json: per model its metrics, training FLOPs (the last row of
    its loss curve) and parameter count. A stage
    interrupted half-way keeps what it finished: the statistics file, the models with all their outputs (the
    folder's hash fixes the settings), the evaluation under way (its work folder)."""
    import pyarrow.parquet as pq
    import torch

    from lossfloor.atomic import write_atomic
    from lossfloor.jobs.evaluate import METRICS_FILE, EvaluateSpec, ReferenceSpec, evaluate, reference
    from lossfloor.train.run_folder import CURVE_FILE

    device = "cuda" if torch.cuda.is_available() else "cpu"  # this process (the reference; local evaluations)
    t0 = time.monotonic()
    ref = folder / REFERENCE_FILE
    if not ref.is_file() and args.reference_stats is not None:  # written atomically: there means whole
        write_atomic(ref, lambda tmp: shutil.copyfile(args.reference_stats, tmp))
    elif not ref.is_file():
        reference(ReferenceSpec(data=args.data, features=quality["features"], out=str(ref), device=device))
    rated_models = {}
    for model, (stage_dir, spec, ema) in models.items():
        out = folder / model
        if (out / METRICS_FILE).is_file() and all((out / f"samples-seed{s}.stats.npz").is_file()
                                                   for s in range(quality["seeds"])):
            res = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
            log.info("quality %s: evaluated before the stage was interrupted, read from %s", model, out)
        else:
            res = evaluate(EvaluateSpec(
                model=spec, reference_stats=str(ref), features=quality["features"], out=str(out),
                n_samples=quality["n_samples"], seeds=quality["seeds"], ema=ema, device=device,
                vae=args.vae, latent_stats=(quality.get("latent_stats") or {}).get("source"),
                engine=args.engine if args.engine.kind == "ray" else LOCAL))
        totals = [r for r in pq.read_table(stage_dir / CURVE_FILE).to_pylist() if r["sigma"] is None]
        last = max(totals, key=lambda r: r["images"])  # the final checkpoint's (or snapshot's) point on the curve
        rated_models[model] = {"params": last["params"], "images": last["images"], "flops": last["flops"],
                               "ema": ema, **{k: res[k] for k in res["metrics"]}}
        log.info("quality %s: %s", model, ", ".join(f"{k} {res[k]['mean']:.4g} ± {res[k]['std']:.2g}"
                                                    for k in res["metrics"]))
    rated = {"metrics": res["metrics"], "features": res["features"], "network_sha256": res["network_sha256"],
             "n_samples": quality["n_samples"], "seeds": quality["seeds"], "reference_stats": REFERENCE_FILE,
             "dataset_fingerprint": res["dataset_fingerprint"], "models": rated_models}
    write_json(folder / QUALITY_FILE, rated)
    return {"quality": QUALITY_FILE, "metrics": rated["metrics"], "seconds": time.monotonic() - t0}


# --- MLflow children -------------------------------------------------------------------------------------


def log_estimate_child(args, ds, study: Study, done: Done) -> str:
    """The J* table's run (lossfloor.jobs.record.record_estimate), tagged as the study's estimate child."""
    from lossfloor.jobs.record import record_estimate

    return record_estimate(done.value, params={"data": args.data, "engine": args.engine.kind, "study": STUDY,
                                               "n_samples": len(ds), "stage_dir": str(done.stage.dir)},
                           **study.child("estimate", study.stage_tags(done)))


def log_train_child(args, b: Budget, study: Study, done: Done) -> str:
    """The model's run (lossfloor.jobs.record.record_training: config, eval/train metrics, loss_curve.parquet,
    train_log.parquet, loss_curve.html, a samples grid), tagged as the study's train child."""
    from lossfloor.jobs.record import record_training

    res = done.value
    if not done.skipped:
        log.info("train %s: %d images in %.0f s, final total loss %.4g", res["model"], res["n_img"], res["train_s"],
                 res["final_total"])
    return record_training(
        done.stage.dir, samples=b.samples,
        params={"study": STUDY, "data": args.data, "engine": res["engine"], "device": res["device"],
                "train_seconds": res["train_s"], "stage_dir": str(done.stage.dir)},
        **study.child(res["model"], study.stage_tags(done, **{"lossfloor.model": res["model"]})))


def log_fit_child(study: Study, done: Done) -> str:
    """The fits' run (lossfloor.jobs.record.record_fits): |rho| per form and quantity, fits.json."""
    from lossfloor.jobs.record import record_fits

    cfg, fits = done.stage.config, done.value
    metrics, tags = {}, {}
    for r in _scaling.rho_table({**fits, **read_learned_fit(done.stage.dir)}):
        q = _scaling.metric_quantity(r["quantity"])
        for form in ("raw", "corrected", "free_offset"):
            if r[form] is not None:
                metrics[f"abs_rho/{form}/{q}"] = r[form]
        tags[f"holdout_best.{q}"] = r["holdout_best"] or "none"
    params = {"sigmas": cfg["sigmas"], "bootstrap": cfg["bootstrap"], "seed": cfg["seed"], "holdout": "largest model",
              "total_j_star": cfg["total_j_star"][0], "total_j_star_ci_low": cfg["total_j_star"][1],
              "total_j_star_ci_high": cfg["total_j_star"][2], "ema": ema_label(cfg["ema"])}
    fitted = done.stage.dir / FITTED_CURVES
    return record_fits(fits, params=params, metrics=metrics, curves=fitted if fitted.is_file() else None,
                       **study.child("fit", {**study.stage_tags(done), **tags}))


def log_quality_child(args, study: Study, done: Done) -> str:
    """The sample-quality run (lossfloor.jobs.record.record_quality): per model and metric the mean and spread
    over seeds, quality.json (what the dashboard reads) and the statistics files (the data's and each model's
    per seed)."""
    from lossfloor.jobs.record import record_quality

    q, folder = done.value, done.stage.dir
    files = {"": [folder / REFERENCE_FILE], **{f"stats/{m}": sorted((folder / m).glob("samples-seed*.stats.npz"))
                                                for m in q["models"]}}
    params = {"features": ",".join(q["features"].values()), "n_samples": q["n_samples"], "seeds": q["seeds"],
              "dataset_fingerprint": q["dataset_fingerprint"], "data": args.data, "stage_dir": str(folder)}
    return record_quality(q, folder / QUALITY_FILE, params=params, files=files,
                          **study.child("quality", study.stage_tags(done)))


def build_dashboard(args, uri: str, parent_run_id: str, fit_sigmas) -> Path:
    """The page from the study's runs (lossfloor.jobs.dashboard, contract lossfloor.tracking.artifacts)."""
    from lossfloor.jobs.dashboard import dashboard

    path = args.out / f"dashboard-{args.preset}.html"
    dashboard(run_id=parent_run_id, tracking_uri=uri, out=path, log=True, sigmas=list(fit_sigmas))  # its title
    # is the one `lossfloor dashboard` gives the same page
    return path


# --- The study -------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import lossfloor
    from lossfloor.data import describe
    from lossfloor.diffusion import parse_sigma_grid, parse_sigmas
    from lossfloor.jobs.study import check_outputs, tracking_uri
    from lossfloor.jobs.tracking import ui_hint

    t_start = time.monotonic()
    log.info("lossfloor %s from %s", lossfloor.__version__, Path(lossfloor.__file__).parent)
    args.engine = Engine.from_args(args)  # the engine flags as one checked setting
    fit_sigmas = tuple(parse_sigmas(args.fit_sigmas, flag="--fit-sigmas").tolist()) if args.fit_sigmas else None
    if args.seed < 0:
        raise InputError(f"--seed: expected an integer >= 0, got {args.seed}")
    ema_flag(args)  # before anything is read or written
    quality = quality_flags(args)
    args.conditional = is_conditional(args)
    if args.dry_run:
        count, shape = describe(args.data) if args.data else (None, None)
        print(describe_plan(args, make_budget(args, shape), count, shape, tracking_uri(args.tracking_uri)))
        return 0
    if args.data is None:
        raise InputError("--data: --preset imagenet512 needs the EDM2 latents (e.g. --data img512-latents.zip)")
    snapshots = _scaling.find_snapshots(args.snapshots, args.snapshot_std) if args.snapshots is not None else None
    count, shape = describe(args.data)
    if quality is not None:  # the latent flags against the data, before anything is written
        quality.update(quality_inputs(args, shape))
    uri = check_outputs(args.out, args.tracking_uri)  # before the first stage: --out writable, the store opens

    from lossfloor.data import load_for
    from lossfloor.jobs.study import attach_ray, open_study

    # 1. data
    args.n_source = count
    b = make_budget(args, shape)
    choices = ema_choices(args, b)
    if args.conditional:  # the classes of the conditional floor are read on this process
        from lossfloor.data import load

        ds = load(args.data, max_samples=b.max_samples)
    else:
        ds = load_for(args.data, args.engine.kind, max_samples=b.max_samples)  # Ray: a shard folder is not loaded here
    log.info("data %s: %d samples of shape %s, fingerprint %s; %s", args.data, len(ds), ds.sample_shape,
             ds.fingerprint[:12], "class-conditional models and floor" if args.conditional else "unconditional")
    given = given_table(args.j_star, ds, args) if args.j_star is not None else None  # checked before anything is written
    if quality is not None and args.reference_stats is not None and not is_latent(shape):
        from lossfloor.data import load

        # the given statistics must be of all of --data, what the stage would compute
        quality_inputs(args, shape, ds.fingerprint if len(ds) == count else load(args.data).fingerprint)
    if fit_sigmas is not None:  # on the J* grid, known before the estimate: refused now, not after the ladder
        _check_fit_sigmas(fit_sigmas, given.x0().sigma if given is not None else parse_sigma_grid(b.sigma_grid))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.engine.kind == "ray":  # attach to the job's cluster by its address (or start a local Ray)
        attach_ray(args.engine.address)

    study_tags = {"lossfloor.kind": "study", "lossfloor.study": STUDY, "lossfloor.preset": args.preset}
    params = {
        "preset": args.preset, "smoke_budget": args.smoke_budget if args.preset == "smoke" else None,
        "data": args.data, "n_samples": len(ds), "sample_shape": list(ds.sample_shape),
        "dataset_fingerprint": ds.fingerprint, "schedule": args.schedule, "conditional": args.conditional,
        "budget_scale": args.budget_scale, "engine": args.engine.kind,
        "models": list(snapshots) if snapshots else [p.name for p in b.models],
        "snapshots": None if snapshots is None else str(args.snapshots),
        "workers": args.engine.workers, "gpus_per_worker": args.engine.gpus_per_worker, "seed": args.seed,
        "out": str(args.out), "ema": ema_label(choices), "ema_snapshots": not args.no_ema_snapshots,
    }
    if quality is not None:  # only then: the parent run of a study without the stage keeps its key
        params["quality"] = {k: v for k, v in quality.items() if k != "networks"}
    with open_study(name=STUDY, out=args.out, log=log, experiment=args.experiment, run_name=f"scaling-{args.preset}",
                    tags=study_tags, params=params, tracking_uri=uri) as study:
        parent = study.parent

        # 2. J*(σ)
        estimate = study.run(estimate_step(args, b, ds, given, study))
        table = estimate.value
        s_star = table.sigma_star
        if s_star is not None:
            parent.log_metrics({"sigma_star": s_star})

        # the σ of the fits and of the evaluation grid, all on the J* grid
        x0 = table.x0()
        auto_fit, eval_sigmas = _scaling.choose_sigmas(x0.sigma, x0.j_star, x0.total_variance, s_star,
                                                       n_eval=b.n_eval_sigmas)
        fit_sigmas = fit_sigmas or auto_fit
        eval_sigmas = tuple(sorted(set(eval_sigmas) | set(fit_sigmas)))
        log.info("sigma*: %s; fits at sigma %s; evaluation at %d sigmas", s_star,
                 ", ".join(f"{s:.4g}" for s in fit_sigmas), len(eval_sigmas))

        # 3. the ladder: trained, or evaluated from EDM2 snapshots
        import pyarrow as pa

        from lossfloor.train.run_folder import read_run_folder

        if snapshots is not None:
            trained = [study.run(snapshot_step(args, b, ds, estimate, model, snaps, eval_sigmas, study))
                       for model, snaps in snapshots.items()]
            tables = [d.value for d in trained]
        else:
            configs = train_configs(args, b, estimate.stage.dir / "jstar.parquet", eval_sigmas)
            steps = [train_step(args, cfg, estimate, ds.fingerprint, b, study) for cfg in configs]
            trained = study.run_together("train", steps, work=functools.partial(train_ladder, args, b, ds, configs),
                                         what="model(s) to train")
            tables = [read_run_folder(d.stage.dir).curve for d in trained]
        stages = [d.stage for d in trained]

        # 4. fits
        curves = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
        total_js = _scaling.total_j_star(curves)
        fitted = study.run(fit_step(args, b, ds, estimate, trained, curves, fit_sigmas, total_js, choices, study))
        fits = {**fitted.value, **read_learned_fit(fitted.stage.dir)}
        rows = _scaling.rho_table(fits)
        parent.log_metrics({f"abs_rho/{form}/{_scaling.metric_quantity(r['quantity'])}":
                            r[form] for r in rows for form in ("raw", "corrected") if r[form] is not None})

        # 5. sample quality of each model's final checkpoint (--features)
        rated = None
        if quality is not None:
            rated = study.run(quality_step(args, quality, trained, final_models(trained, snapshots, choices),
                                           study)).value

        # 6. dashboard
        html = build_dashboard(args, uri, parent.run_id, fit_sigmas)
        summary = {
            "study": STUDY, "preset": args.preset, "tracking_uri": uri, "experiment": args.experiment,
            "parent_run_id": parent.run_id, "mlflow_ui": ui_hint(uri, parent.experiment_id),
            "dashboard": str(html), "sigma_star": s_star,
            "fit_sigmas": list(fit_sigmas), "eval_sigmas": list(eval_sigmas), "total_j_star": list(total_js),
            "ema": {m: str(c) for m, c in choices.items()}, "ema_seconds": fitted.stage.result()["ema_seconds"],
            "stages": {name: {"dir": str(d.stage.dir), "skipped": d.skipped} for name, d in study.done.items()},
            "rho": rows, "quality": rated,
            "seconds": time.monotonic() - t_start,
        }
        parent.log_artifact(write_json(args.out / "summary.json", summary))

    n_trained = sum(not d.skipped for d in trained)
    print(f"\nscaling study ({args.preset}) finished in {time.monotonic() - t_start:.0f} s: "
          f"{n_trained} model(s) {'evaluated from snapshots' if snapshots else 'trained'}, "
          f"{len(stages) - n_trained} reused; "
          f"stages skipped: {', '.join(k for k, d in study.done.items() if d.skipped) or 'none'}")
    print(f"sigma* = {'undefined' if s_star is None else f'{s_star:.4g}'}; raw vs gap-corrected vs free-offset "
          f"power laws on the envelope of {len(stages)} models (|rho| of ln(J - offset) vs ln F):")
    print(_scaling.format_rho(rows))
    print(f"weights of the fitted curves (--ema): {ema_label(choices)}")
    if rated is not None:
        print(f"sample quality (mean ± spread over seeds, {'last snapshots' if snapshots else 'final checkpoints'}):")
        for model, r in rated["models"].items():
            print(f"  {model:<12} F={r['flops']:.3e}  " + "  ".join(
                f"{k} {r[k]['mean']:.4g} ± {r[k]['std']:.2g}" for k in rated["metrics"]))
    print(f"dashboard: {html}")
    print(f"MLflow: {uri}, experiment {args.experiment!r}, parent run {parent.run_id}")
    print(f"open the runs: {summary['mlflow_ui']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_study("scaling_imagenet512", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
