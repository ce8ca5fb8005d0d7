"""`lossfloor train`: train an EDM2 model in one of the parametrisations (--process edm, fm, ncsn, ddpm-eps,
vp-v) with its own schedule or the optimal-loss one, locally or on Ray.

Writes OUT: checkpoint-<n_img>/ (the newest `keep` ones), loss_curve.parquet, train_log.parquet; prints
a summary (final losses, the per-σ gap table, FLOPs, where things are). A rerun with the same OUT
continues from its newest checkpoint (either engine), and does nothing when the run is finished.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lossfloor.atomic import check_writable
from lossfloor.devices import check_device
from lossfloor.diffusion import PRECONDITIONINGS
from lossfloor.errors import InputError
from lossfloor.fmt import num
from lossfloor.jobs.engine import Engine, add_engine_args
from lossfloor.jobs.train import MAX_FAILURES

SCHEDULES = ("edm2", "fm", "ncsn", "vp", "optimal-loss")


MAX_IMAGES = 10**11  # a bound on --images: 50x EDM2-XXL's budget; a typo beyond it would run for years


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an EDM2 model (edm, fm, ncsn, ddpm-eps or vp-v parametrisation; its own or the optimal-loss "
        "schedule), locally or on Ray",
        description="Train an EDM2 U-Net on a data set in the EDM, flow-matching, NCSN, DDPM-eps or VP-v "
        "parametrisation with its own or the optimal-loss schedule "
        "(Xu et al. §4); write checkpoints and the loss-curve tables to --out and print a summary.",
    )
    p.add_argument("--preset", default="tiny", help="model preset: tiny (8x8x1), tiny32 (32x32x3), "
                   "img512-xs..img512-xxl, img64-s..img64-xl, or auto: tiny's recipe with an unconditional U-Net "
                   "sized for the data's resolution and channels (default tiny)")
    p.add_argument("--data", required=True, help="data source (as for `lossfloor estimate`), e.g. bundled:digits")
    p.add_argument("--j-star", default=None, metavar="TABLE",
                   help="J* table from `lossfloor estimate` (read in x0 units, any --target): needed by --schedule "
                   "optimal-loss; with any schedule, every loss is also reported as a gap J - J*")
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="edm2 | fm | ncsn | vp | optimal-loss: how σ is drawn and the loss weighted (default: the "
                   "process's own: edm2 for edm, fm for fm, ncsn for ncsn, vp for ddpm-eps and vp-v)")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--conditional", dest="conditional", action="store_true", default=None,
                      help="use the data's class labels (the preset must have classes)")
    cond.add_argument("--unconditional", dest="conditional", action="store_false",
                      help="ignore labels (default when the data has none, or when the J* table is the "
                      "unconditional floor: a conditional model goes below it, giving negative gaps)")
    p.add_argument("--latents", default="mean", choices=("mean", "posterior"),
                   help="EDM2 latents: train on the posterior means (default) or draw x0 ~ N(mean, std^2) every "
                   "step as EDM2 does (posterior); --j-star must be estimated with the same --latents")
    p.add_argument("--process", default="edm", choices=PRECONDITIONINGS,
                   help="parametrisation (the preconditioning table): edm (EDM, sigma_data 0.5), fm (flow matching, "
                   "velocity), ncsn (VE, -eps), ddpm-eps (VP, eps) or vp-v (VP, v) (default edm)")
    p.add_argument("--images", type=int, default=None, metavar="N", help="training length in images "
                   "(default: the preset's)")
    p.add_argument("--batch", type=int, default=None, metavar="B", help="global batch in images, split "
                   "over workers (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, metavar="LR", help="lr_ref (default: the preset's)")
    p.add_argument("--precision", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast of the network (default none = fp32; fp16 needs CUDA)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="evaluate (and checkpoint) every N images (default: 16 evaluations per run)")
    p.add_argument("--eval-sigmas", default=None, metavar="LIST",
                   help="comma-separated evaluation sigmas, e.g. 0.02,0.2,1,5 (default 16 log-spaced in [0.002, 80])")
    p.add_argument("--eval-samples", type=int, default=256, metavar="N",
                   help="fixed evaluation subset of the training data, with fixed noise (default 256; J* is of the "
                   "training set, so the gap holds no generalisation error)")
    p.add_argument("--keep", type=int, default=2, metavar="K", help="newest checkpoints kept; 0 = all (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-name", default=None, help="run name (default <preset>-<process>-<schedule>-<hash>)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints and tables")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT's newest checkpoint if any (default); --no-resume refuses an OUT "
                   "that already holds checkpoints")
    p.add_argument("--dry-run", action="store_true", help="print the resolved run (batches, devices, budget) "
                   "and exit without training")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    eng = add_engine_args(p, ray="Ray Train, one process per worker", workers_help="training workers (DDP ranks)",
                          cpus_per_worker=1, gpus_help="> 0 trains on CUDA with NCCL, else on CPU with gloo")
    eng.add_argument("--device", default=None, help="local: cpu | cuda (default cuda when available)")
    eng.add_argument("--max-failures", type=int, default=None, metavar="F",
                     help=f"ray: restarts from the last checkpoint after worker failures (default {MAX_FAILURES}; "
                     "-1 = no limit)")

    trk = p.add_argument_group("tracking")
    trk.add_argument("--mlflow", action="store_true", help="log the run to MLflow (params, per-step loss, "
                     "per-σ eval loss and gap, FLOPs, checkpoint paths, tables, figure, samples grid)")
    trk.add_argument("--mlflow-experiment", default="optimal-loss", metavar="NAME",
                     help="MLflow experiment (default optimal-loss)")
    trk.add_argument("--tracking-uri", default=None, metavar="URI",
                     help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///~/lossfloor/mlflow.db)")
    trk.add_argument("--samples", default="auto", metavar="N",
                     help="MLflow: samples in the grid image (default auto: 64 for pixel data when cheap; 0 = none)")
    p.set_defaults(func=run)


# --- Checks and config ---------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace, engine: Engine) -> None:
    if engine.kind == "ray" and args.device is not None:
        raise InputError("--device: with --engine ray the device follows --gpus-per-worker (cuda when > 0)")
    check_device(args.device)
    if args.images is not None and args.images > MAX_IMAGES:
        raise InputError(f"--images: expected at most {MAX_IMAGES:.0e} training images (EDM2-XXL trains 2.1e9), "
                         f"got {args.images}")
    if args.max_failures is not None and args.max_failures < -1:
        raise InputError(f"--max-failures: expected an integer >= -1, got {args.max_failures}")
    for flag, value, low in (("--images", args.images, 1), ("--batch", args.batch, 1),
                             ("--eval-every", args.eval_every, 1), ("--eval-samples", args.eval_samples, 1),
                             ("--keep", args.keep, 0), ("--seed", args.seed, 0)):
        if value is not None and value < low:
            raise InputError(f"{flag}: expected an integer >= {low}, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr: expected a positive learning rate like 0.01, got {args.lr}")
    if args.samples != "auto":
        try:
            args.samples = int(args.samples)
        except ValueError:
            raise InputError(f"--samples: expected a number of samples like 64, 0 or auto, got {args.samples!r}") from None
        if args.samples < 0:
            raise InputError(f"--samples: expected a number >= 0, got {args.samples}")
    check_writable(args.out, folder=True)


def build_config(args: argparse.Namespace, engine: Engine):
    """The TrainConfig of the arguments; InputError naming the flag for what is wrong."""
    from lossfloor.train import (
        EDM2Schedule,
        FMSchedule,
        JStarCurve,
        NCSNSchedule,
        OptimalLossSchedule,
        TrainConfig,
        VPSchedule,
        resolve,
    )
    from lossfloor.train.config import DEFAULT_SCHEDULE, check_budget, check_eval_grid
    from lossfloor.train.schedules import check_floor

    preset = _preset(args)
    unet = preset.unet if not isinstance(preset, str) else _named(preset).unet
    schedule = args.schedule or DEFAULT_SCHEDULE[args.process].kind  # the process's own (kinds = CLI names)
    if schedule == "optimal-loss" and args.j_star is None:
        raise InputError("--j-star: --schedule optimal-loss needs a J* table; make one with "
                         "`lossfloor estimate --data SRC --sigma-grid 0.002:80:64 --out jstar.parquet`")
    if args.j_star is not None:
        try:
            curve = JStarCurve.from_path(args.j_star)  # read it now: a bad table fails before any work
            if schedule == "optimal-loss":
                check_floor(curve.table)
        except InputError as e:
            raise InputError(f"--j-star: {e}") from None
        from lossfloor.data import source_fingerprint

        curve.table.check_data(source_fingerprint(args.data, args.latents), args.latents, table=f"--j-star {args.j_star}",
                               data=f"--data {args.data}")
    conditional = args.conditional
    if conditional and not unet.label_dim:
        raise InputError(f"--conditional: --preset {args.preset} has no classes; give a preset with classes "
                         "(tiny, tiny32, img512-*, img64-*) or leave out --conditional")
    if conditional is None:  # labels when the preset, the data and the floor all have classes
        from lossfloor.data import open_source

        labelled = unet.label_dim > 0 and open_source(args.data, args.latents).info().has_labels
        conditional = labelled and (args.j_star is None or curve.table.class_conditional)
    if args.j_star is not None:  # the floor of the model's kind: class-conditional or not
        curve.table.check_data(conditional=bool(conditional), table=f"--j-star {args.j_star}", data=f"--data {args.data}")
    sigmas = None
    if args.eval_sigmas is not None:
        from lossfloor.diffusion import parse_sigmas

        sigmas = tuple(float(x) for x in parse_sigmas(args.eval_sigmas, flag="--eval-sigmas"))
    sched = {"edm2": EDM2Schedule, "fm": FMSchedule, "ncsn": NCSNSchedule, "vp": VPSchedule,
             "optimal-loss": OptimalLossSchedule}[schedule]()
    config = TrainConfig(
        preset=preset, process=args.process, schedule=sched, jstar=args.j_star, batch_n_img=args.batch,
        duration_n_img=args.images, lr_ref=args.lr, precision=args.precision, eval_every_n_img=args.eval_every,
        eval_sigmas=sigmas, eval_n_samples=args.eval_samples, keep_checkpoints=args.keep, seed=args.seed, run=args.run_name,
        latents=args.latents, conditional=conditional,
    )
    check_budget(resolve(config), workers=engine.workers if engine.kind == "ray" else 1)
    if args.j_star is not None:
        check_eval_grid(resolve(config), curve.table, flag="--eval-sigmas", table_name=f"--j-star {args.j_star}")
    if args.precision == "fp16" and engine.device == "cpu":
        raise InputError("--precision fp16: needs GPUs (--gpus-per-worker 1); use bf16 or none on CPUs")
    return config


def _named(name: str):
    from lossfloor.models import get_preset

    try:
        return get_preset(name)
    except InputError as e:
        raise InputError(f"--preset: {e}") from None


def _preset(args: argparse.Namespace):
    """--preset: a preset's name, or for `auto` a Preset sized for --data's samples (`sized_preset`; the
    [mean, std] of posterior latents are 2C channels of a C-channel model)."""
    from lossfloor.models import sized_preset
    from lossfloor.models.presets import AUTO

    if args.preset != AUTO:
        _named(args.preset)
        return args.preset
    from lossfloor.data import open_source

    shape = tuple(open_source(args.data, args.latents).info().sample_shape)
    if args.latents == "posterior" and shape:
        shape = (shape[0] // 2, *shape[1:])
    try:
        return sized_preset(shape)
    except InputError as e:
        raise InputError(f"--preset: --data {args.data}: {e}") from None


def _check_data(config, source: str) -> None:
    """What the loop would reject about the data, from its header (no samples read), named by flag."""
    from lossfloor.train.config import check_source

    check_source(config, source, names={"data": "--data", "preset": "--preset", "eval_n_samples": "--eval-samples",
                                        "batch_n_img": "--batch", "conditional=False": "--unconditional",
                                        "auto": "--preset auto"})


def _check_out(args: argparse.Namespace) -> None:
    from lossfloor.train import latest_checkpoint

    newest = latest_checkpoint(args.out)
    if newest is not None and not args.resume:
        raise InputError(f"--no-resume: {args.out} already holds checkpoints (newest {newest.name}); remove them, "
                         "choose another --out, or resume")


# --- Summary -------------------------------------------------------------------------------------------


def summary(out_dir, *, wall_s: float, images_run: int, engine: str, mlflow_run: str | None) -> dict:
    """What a run reports, read from its folder's tables (the same for both engines)."""
    from lossfloor.train.run_folder import CURVE_FILE, LOG_FILE, read_run_folder

    out = Path(out_dir)
    folder = read_run_folder(out)
    last_img, final, total = folder.last_eval()
    last = folder.log_rows[-1] if folder.log_rows else {}
    newest = folder.checkpoints[-1] if folder.checkpoints else None
    return {
        "run": folder.meta.get("run"),
        "model": last.get("model"),
        "params": last.get("params"),
        "n_img": last.get("images"),
        "steps": last.get("step"),
        "train_loss": last.get("loss"),
        "train_gap": last.get("gap"),
        "eval_images": last_img,
        "eval_total": None if total is None else total["loss"],
        "eval_total_gap": None if total is None else total["gap"],
        "per_sigma": [{"sigma": r["sigma"], "loss": r["loss"], "j_star": r["j_star"], "gap": r["gap"],
                       "loss_native": r.get("loss_native")} for r in final],
        "forward_flops": folder.forward_flops,
        "training_flops": last.get("flops"),
        "engine": engine,
        "wall_s": wall_s,
        "images_per_s": images_run / wall_s if wall_s > 0 and images_run else None,
        "out": str(out),
        "checkpoint": None if newest is None else str(newest),
        "loss_curve": str(out / CURVE_FILE),
        "train_log": str(out / LOG_FILE),
        "mlflow_run": mlflow_run,
    }


def format_summary(s: dict) -> str:
    lines = [f"run {s['run']}: {s['model']} ({num(s['params'], ',')} parameters), {s['n_img']} images in "
             f"{s['steps']} steps ({s['engine']}, {s['wall_s']:.1f} s"
             + (f", {s['images_per_s']:.1f} img/s overall)" if s["images_per_s"] else ")")]
    lines.append(f"training: loss {num(s['train_loss'], '.5g')}"
                 + (f", gap {num(s['train_gap'], '.5g')}" if s["train_gap"] is not None else "")
                 + " (the objective w(σ)·‖D − x0‖² of the last logged steps, σ drawn by the schedule)")
    n_sigma = len(s["per_sigma"])
    lines.append(f"evaluation at {s['eval_images']} images: weighted total {num(s['eval_total'], '.5g')}"
                 + (f", total gap {num(s['eval_total_gap'], '.5g')}" if s["eval_total_gap"] is not None else "")
                 + f" (Σ π(σ)·w(σ)·loss over the {n_sigma} evaluation σ below; loss per σ = ‖D − x0‖² in x0 units)")
    lines.append(f"{'sigma':>10} {'loss':>12} {'j_star':>12} {'gap':>12} {'gap/loss':>9}")
    for r in s["per_sigma"]:
        ratio = r["gap"] / r["loss"] if r["gap"] is not None and r["loss"] else None
        lines.append(f"{r['sigma']:>10.4g} {r['loss']:>12.5g} {num(r['j_star'], '.5g'):>12} {num(r['gap'], '.5g'):>12} "
                     f"{num(ratio, '.1%'):>9}")
    lines.append(f"FLOPs: {s['forward_flops']:.4g} per forward per image, {num(s['training_flops'], '.4g')} "
                 "for training (3 x forward x images)")
    lines.append(f"checkpoint {s['checkpoint']}")
    lines.append(f"tables {s['loss_curve']}, {s['train_log']}")
    if s["mlflow_run"]:
        lines.append(f"MLflow run {s['mlflow_run']}")
    return "\n".join(lines)


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    return v


def dry_run_text(config, args: argparse.Namespace, engine: Engine) -> str:
    from lossfloor.train import forward_flops, resolve

    R = resolve(config)
    workers = engine.workers if engine.kind == "ray" else 1
    steps = math.ceil(R.duration_n_img / R.batch_n_img)
    fwd = forward_flops(R.preset, config.flop_convention)
    where = (f"ray: {workers} worker(s) x {engine.gpus_per_worker:g} GPU, {engine.cpus_per_worker:g} CPU"
             if engine.kind == "ray" else f"local: {args.device or 'cuda if available, else cpu'}")
    return "\n".join([
        f"run {R.run}: preset {R.preset.name}, process {config.process}, schedule {R.schedule.kind}",
        f"data {args.data} ({'class-conditional' if R.unet.label_dim else 'unconditional'}); J* {config.jstar or 'none'}",
        f"{R.duration_n_img} images = {steps} steps of {R.batch_n_img} ({R.batch_n_img // workers} per worker)",
        f"lr_ref {R.lr_ref:g}, t_ref {R.t_ref_iters} steps, warm-up {R.warmup_n_img} images, precision {config.precision}",
        f"eval every {R.eval_every_n_img} images on {len(R.eval_sigmas)} sigmas x {config.eval_n_samples} samples; "
        f"checkpoint every {R.checkpoint_every_n_img} images, keep {config.keep_checkpoints}",
        f"{where}; out {args.out} (resume: {args.resume})",
        f"budget: {3 * fwd * steps * R.batch_n_img:.4g} training FLOPs ({fwd:.4g} per forward per image)",
    ])


# --- Run -----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from lossfloor.jobs.tracking import open_tracking
    from lossfloor.jobs.train import train_run

    engine = Engine.from_args(args, ray_only=("max_failures",))
    _check_args(args, engine)
    config = build_config(args, engine)
    _check_data(config, args.data)
    _check_out(args)
    if args.dry_run:
        sys.stdout.write(dry_run_text(config, args, engine) + "\n")
        return 0
    tracking = open_tracking(args.mlflow, args.tracking_uri, experiment=args.mlflow_experiment)
    done = train_run(config, data=args.data, out=args.out, engine=engine, device=args.device, resume=args.resume,
                     max_failures=MAX_FAILURES if args.max_failures is None else args.max_failures,
                     tracking=tracking, samples=args.samples)
    s = summary(done.out, wall_s=done.wall_s, images_run=done.images_run, engine=engine.kind,
                mlflow_run=done.mlflow_run)
    if args.json:
        json.dump(_json_value(s), sys.stdout, indent=1, allow_nan=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_summary(s) + "\n")
    return 0
