"""A schedule sweep from command-line arguments: the flags, the spec they make, the run, its outputs.

    add_sweep_args(parser); run(parser.parse_args())      # `lossfloor sweep` and studies/schedule_sweep.py

Ray Tune runs it (`lossfloor.ray.sweep`, imported when the sweep runs); the spec and results are
`lossfloor.train.sweep`'s. Writes OUT: results.parquet (one row per trial), objective_history.parquet,
best.json (best configuration, baseline, gain), parallel_coordinates.html, objective_vs_images.html
(`lossfloor.pages.sweep`), sweep.json, tune/ (Ray Tune's experiment: a rerun with the same arguments
resumes it), trials/ (multi-worker Train runs), and jstar.parquet (jstar-conditional.parquet for
class-conditional trials) when --j-star is omitted on bundled data.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from lossfloor.atomic import check_writable
from lossfloor.errors import InputError
from lossfloor.fmt import num
from lossfloor.jobs.engine import Engine, add_engine_args

log = logging.getLogger(__name__)

JSTAR_FILE = {False: "jstar.parquet", True: "jstar-conditional.parquet"}  # by the trials' kind (class-conditional)
JSTAR_GRID = "0.002:80:32"  # the grid of a J* estimated here (bundled data, exact estimator)
INTERRUPTED = 130  # exit code of an interrupted sweep (as ^C)


def add_sweep_args(p: argparse.ArgumentParser, *, data: str | None = None,
                   trials: int | None = None, out: str | None = None, address_env: str | None = None) -> None:
    """The sweep's flags; the study passes defaults so it runs without arguments, the CLI requires them
    (not --space: both default to the space shipped with the package, `train.space.DEFAULT_SPACE`).
    The trials run on the engine of `add_engine_args` (always Ray): --workers per trial, each with
    --cpus-per-worker and --gpus-per-worker; address_env: its default --address (a Ray job's)."""
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--data", default=data, required=data is None, metavar="SRC",
                   help="data source every trial can read (shared storage on a cluster), e.g. bundled:digits")
    p.add_argument("--j-star", default=None, metavar="TABLE",
                   help="J* table (lossfloor estimate); omitted on bundled data: estimated into OUT/jstar.parquet")
    from lossfloor.train.space import DEFAULT_SPACE

    p.add_argument("--space", default=str(DEFAULT_SPACE), metavar="SPACE.yaml",
                   help="search space: OptimalLossSchedule fields -> {uniform|loguniform|randint: [lo, hi]} or "
                   "{choice: [...]} or a fixed value (default: the package's optimal-loss space, w_max, mu, "
                   "varsigma and uniform_mix)")
    p.add_argument("--trials", type=int, default=trials, required=trials is None, metavar="N",
                   help="trials drawn from the space (the EDM2 baseline runs on top)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                   help="asha: stop weak trials early at the rungs (default); fifo: run all to the end")
    p.add_argument("--search", choices=("random", "optuna"), default="random",
                   help="random (seeded; default) or optuna (TPE)")
    p.add_argument("--objective", choices=("gap", "fd"), default="gap",
                   help="gap: weighted loss gap under a fixed reference weighting (default); fd: Fréchet "
                   "distance of samples (pixels, or the network of --fd-weights)")
    p.add_argument("--fd-weights", default=None, metavar="FILE",
                   help="fd: a local Inception-v3 (FID) or DINOv2 (FD_DINOv2) network file (TorchScript or .pt2)")
    p.add_argument("--fd-network", choices=("inception", "dinov2"), default="inception",
                   help="fd: what --fd-weights holds (default inception)")
    p.add_argument("--fd-samples", type=int, default=512, metavar="N", help="fd: samples per evaluation (512)")
    p.add_argument("--fd-steps", type=int, default=32, metavar="N", help="fd: EDM Heun steps (32)")

    b = p.add_argument_group("training budget (shared by every trial)")
    b.add_argument("--images", type=int, default=None, metavar="N", help="training images per trial "
                   "(default: the preset's duration)")
    b.add_argument("--batch", type=int, default=None, metavar="B", help="global batch (default: the preset's)")
    b.add_argument("--lr", type=float, default=None, metavar="LR", help="lr_ref (default: the preset's)")
    b.add_argument("--warmup", type=int, default=None, metavar="N", help="lr warm-up images (default: the preset's)")
    b.add_argument("--evals", type=int, default=8, metavar="K",
                   help="evaluations per trial, each one reported to Tune (default 8)")
    b.add_argument("--eval-samples", type=int, default=256, metavar="N", help="evaluation samples of the training data (256)")
    b.add_argument("--eval-sigmas", default=None, metavar="LIST",
                   help="evaluation sigmas, e.g. 0.02,0.2,1,5 (default 16 log-spaced in [0.002, 80])")
    b.add_argument("--conditional", action="store_true",
                   help="class-conditional training, against the class-conditional floor (`lossfloor estimate "
                   "--conditional`; estimated so on bundled data); default unconditional, the unconditional floor")
    b.add_argument("--seed", type=int, default=0, help="training seed of every trial, and the search's seed")

    a = p.add_argument_group("early stopping (ASHA)")
    a.add_argument("--grace-images", type=int, default=None, metavar="N",
                   help="first rung, in images (default: two evaluation intervals)")
    a.add_argument("--reduction-factor", type=float, default=2.0, metavar="R",
                   help="keep the best 1/R of the trials at each rung (default 2)")

    r = add_engine_args(p, kind="ray", help={"--engine": "ray: the trials on Ray Tune, the only engine of a sweep"},
                        cpus_per_worker=1,
                        workers_help="workers per trial: 1 runs the training loop in the Tune trial itself, N > 1 "
                        "Ray Train with N workers", worker="worker of a trial", address_env=address_env,
                        gpus_help="> 0 trains on CUDA; fractional (e.g. 0.25: four trials per GPU) only with "
                        "--workers 1, else whole GPUs")
    r.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="at most N trials at once (default: as many as the cluster's GPUs, else CPUs, hold)")

    p.add_argument("--out", default=out, required=out is None, metavar="DIR",
                   help="sweep folder; rerunning with the same arguments resumes it")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--json", action="store_true", help="print best.json instead of the table")


# --- Arguments -> spec ------------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--trials", args.trials, 1), ("--images", args.images, 1), ("--batch", args.batch, 1),
                             ("--warmup", args.warmup, 0), ("--evals", args.evals, 1),
                             ("--eval-samples", args.eval_samples, 1), ("--seed", args.seed, 0),
                             ("--grace-images", args.grace_images, 1), ("--fd-samples", args.fd_samples, 2),
                             ("--fd-steps", args.fd_steps, 2)):
        if value is not None and value < low:
            raise InputError(f"{flag}: expected an integer >= {low}, got {value}")
    for flag, value, ok in (("--lr", args.lr, lambda v: v > 0), ("--reduction-factor", args.reduction_factor,
                                                                   lambda v: v > 1)):
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise InputError(f"--{flag.lstrip('-')}: got {value}, expected "
                             f"{'a number > 1' if flag == '--reduction-factor' else 'a positive number'}")
    if args.fd_weights is not None and args.objective != "fd":
        raise InputError("--fd-weights: only with --objective fd")
    if args.fd_weights is not None and not Path(args.fd_weights).is_file():
        raise InputError(f"--fd-weights {args.fd_weights}: file not found (a TorchScript or .pt2 network)")
    check_writable(args.out, folder=True)


def build_resources(args: argparse.Namespace):
    """The trials' resources: the engine of the flags and --max-concurrent."""
    from lossfloor.train.sweep import Resources

    engine = Engine.from_args(args)
    try:
        return Resources(engine=engine, max_concurrent=args.max_concurrent)
    except InputError as e:  # "field: message" -> "--flag: message"
        name, _, rest = str(e).partition(":")
        raise InputError(f"--{name.replace('_', '-')}:{rest}") from None


def jstar_path(args: argparse.Namespace, *, create: bool, conditional: bool = False) -> str:
    """--j-star, or OUT/jstar.parquet for bundled data (estimated with the exact estimator when `create`);
    for class-conditional trials OUT/jstar-conditional.parquet, the class-conditional floor."""
    if args.j_star is not None:
        return str(Path(args.j_star).absolute())
    if not str(args.data).startswith("bundled:"):
        raise InputError("--j-star: needed for this data; make one with `lossfloor estimate --data SRC "
                         f"--sigma-grid {JSTAR_GRID} --out jstar.parquet`")
    path = Path(args.out).absolute() / JSTAR_FILE[conditional]
    if create and not path.is_file():
        from lossfloor.data import load
        from lossfloor.diffusion import parse_sigma_grid
        from lossfloor.floor import EstimatorConfig, build_table, write_table
        from lossfloor.jobs.estimate import estimate

        ds = load(args.data)
        log.info("no --j-star: estimating J* of %s (exact, %s%s) into %s", args.data, JSTAR_GRID,
                 ", class-conditional" if conditional else "", path)
        cfg = EstimatorConfig(estimator="exact", queries_per_sample=1, seed=args.seed)
        est = estimate(ds.samples, parse_sigma_grid(JSTAR_GRID), cfg, labels=ds.labels if conditional else None,
                       fingerprint=ds.fingerprint, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table(build_table(est, target="x0", fingerprint=ds.fingerprint), path)
    return str(path)


def build_spec(args: argparse.Namespace, resources, *, create_jstar: bool = True):
    """The SweepSpec of the arguments, for trials on `resources`; InputError naming the flag for what is
    wrong."""
    from lossfloor.data import describe
    from lossfloor.models import get_preset
    from lossfloor.train import TrainConfig, resolve
    from lossfloor.train.config import check_budget, check_eval_grid
    from lossfloor.train.schedules import JStarCurve, check_floor
    from lossfloor.train.space import load_space
    from lossfloor.train.sweep import ObjectiveSpec, SweepSpec

    _check_args(args)
    describe(args.data)  # the data source first: a missing file is named as itself, not as a missing --j-star
    try:
        get_preset(args.preset)
    except InputError as e:
        raise InputError(f"--preset: {e}") from None
    space = load_space(args.space)  # InputError naming the file and key
    sigmas = None
    if args.eval_sigmas is not None:
        from lossfloor.diffusion import parse_sigmas

        sigmas = tuple(float(x) for x in parse_sigmas(args.eval_sigmas, flag="--eval-sigmas"))
    budget = resolve(TrainConfig(preset=args.preset, batch_n_img=args.batch, duration_n_img=args.images))
    check_budget(budget, workers=resources.engine.workers)
    if args.scheduler == "asha" and args.grace_images is not None and args.grace_images >= budget.duration_n_img:
        raise InputError(f"--grace-images: {args.grace_images} is not below the {budget.duration_n_img} training "
                         "images of a trial (--images): ASHA's first rung would come at the end and stop no trial; "
                         "give fewer, or --scheduler fifo")
    every = max(budget.batch_n_img, budget.duration_n_img // args.evals // budget.batch_n_img * budget.batch_n_img)
    # the trials see class labels when asked and the preset has classes: their floor is the matching one
    conditional = bool(args.conditional and get_preset(args.preset).unet.label_dim)
    jstar = jstar_path(args, create=create_jstar, conditional=conditional)
    curve = None
    if create_jstar or args.j_star is not None:
        try:
            curve = JStarCurve.from_path(jstar)
            check_floor(curve.table)  # every trial but the baseline runs the optimal-loss schedule
        except InputError as e:
            raise InputError(f"--j-star: {e}") from None
        from lossfloor.data import source_fingerprint

        curve.table.check_data(source_fingerprint(args.data, "mean"), "mean", conditional, table=f"--j-star {jstar}",
                               data=f"--data {args.data}")
    base = TrainConfig(preset=args.preset, jstar=jstar, conditional=args.conditional, batch_n_img=args.batch,
                       duration_n_img=args.images, lr_ref=args.lr, warmup_n_img=args.warmup, eval_every_n_img=every,
                       checkpoint_every_n_img=every, eval_sigmas=sigmas, eval_n_samples=args.eval_samples,
                       keep_checkpoints=2, seed=args.seed)
    if curve is not None:
        check_eval_grid(resolve(base), curve.table, flag="--eval-sigmas", table_name=f"--j-star {jstar}")
    features = "pixels" if args.fd_weights is None else f"{args.fd_network}:{Path(args.fd_weights).absolute()}"
    objective = ObjectiveSpec(kind=args.objective, features=features, fd_samples=args.fd_samples,
                              fd_steps=args.fd_steps)
    source = args.data if str(args.data).startswith("bundled:") else str(Path(args.data).absolute())
    return SweepSpec(base=base, data=source, space=space, trials=args.trials, scheduler=args.scheduler,
                     search=args.search, objective=objective, grace_n_img=args.grace_images,
                     reduction_factor=args.reduction_factor)


def _check_optuna(args: argparse.Namespace) -> None:
    if args.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise InputError("--search optuna: optuna is not installed (pip install optuna==5.0.0); "
                             "use --search random") from None


# --- Output ---------------------------------------------------------------------------------------------


def plan_text(spec, resources, args: argparse.Namespace) -> str:
    R = spec.resolved
    swept = ", ".join(f"{k} {p.kind} {list(p.args)}" for k, p in spec.space.swept.items())
    fixed = ", ".join(f"{k}={v}" for k, v in spec.space.fixed.items()) or "none"
    stopping = "no early stopping (fifo)"
    if spec.scheduler == "asha":
        rungs, m = [], spec.grace
        while m < R.duration_n_img:
            rungs.append(str(m))
            m = math.ceil(m * spec.reduction_factor)
        stopping = (f"ASHA rungs at {', '.join(rungs) or 'none'} images (reduction factor "
                    f"{spec.reduction_factor:g}); the baseline always runs to the end")
    engine = resources.engine
    where = (f"{engine.workers} Ray Train workers per trial" if engine.workers > 1
             else "the training loop in each Tune trial")
    return "\n".join([
        f"sweep: EDM2 baseline + {spec.trials} optimal-loss trials, {spec.search} search, {spec.scheduler} scheduler",
        f"space {args.space}: {swept}; fixed: {fixed}",
        f"each trial: preset {R.preset.name}, {R.duration_n_img} images in batches of {R.batch_n_img}, "
        f"{math.ceil(R.duration_n_img / R.eval_every_n_img)} evaluations (every {R.eval_every_n_img} images) on "
        f"{len(R.eval_sigmas)} sigmas, seed {spec.base.seed}",
        f"objective {spec.objective.kind}" + (f" ({spec.objective.features}, {spec.objective.fd_samples} samples)"
                                               if spec.objective.kind == "fd" else " (fixed reference weighting)"),
        stopping,
        f"resources: {where}, {engine.gpus_per_worker:g} GPU and {resources.cpus_per_worker:g} CPU per worker; "
        f"concurrency {resources.max_concurrent or 'from the cluster'}",
        f"J* {spec.base.jstar}; out {args.out}",
    ])


def results_text(outcome, spec) -> str:
    fields = list(spec.space.params)
    head = f"{'trial':<14}{'schedule':<10}" + "".join(f"{k:>12}" for k in fields) + \
        f"{'objective':>12}{'images':>9}  status"
    lines = [head]
    for r in outcome.rows:
        lines.append(f"{r['trial_id'][:13]:<14}{r['schedule'] or '-':<10}"
                     + "".join(f"{num(r.get(k), '.5g') if not r['is_baseline'] else '':>12}" for k in fields)
                     + f"{num(r['objective'], '.5g'):>12}{r['n_img']:>9}  {r['status']}")
    b = outcome.best
    base = (b.get("baseline") or {}).get("objective")
    best = b.get("best")
    lines.append(f"baseline (EDM2) {spec.objective.kind}: {num(base, '.5g')}")
    if best:
        lines.append(f"best ({best['trial_id']}) {spec.objective.kind}: {num(best['objective'], '.5g')}  config "
                     + ", ".join(f"{k}={num(v, '.5g')}" for k, v in best["config"].items()))
        rel = b.get("relative_gain")
        lines.append(f"gain over EDM2: {num(b.get('gain'), '.5g')}" + (f" ({rel:+.1%})" if rel is not None else "")
                     + " (baseline - best; > 0: better than EDM2)")
    else:
        lines.append("best: no optimal-loss trial reached the full budget")
    lines.append(f"{b.get('stopped_early', 0)} trial(s) stopped early, {b.get('errors', 0)} error(s); "
                 f"{outcome.out}/results.parquet, best.json, parallel_coordinates.html, objective_vs_images.html")
    if b.get("mlflow_run"):
        lines.append(f"MLflow parent run {b['mlflow_run']}")
    return "\n".join(lines)


# --- Run ------------------------------------------------------------------------------------------------


def write_figures(outcome, spec) -> None:
    """The sweep's two offline pages (lossfloor.pages.sweep), from its results."""
    from lossfloor.pages.html import write_html
    from lossfloor.pages.sweep import objective_curves_figure, parallel_coordinates_figure
    from lossfloor.train.sweep import CURVES_FILE, PARCOORDS_FILE

    write_html(parallel_coordinates_figure(outcome.rows, spec.space, objective=spec.objective.kind),
               outcome.out / PARCOORDS_FILE)
    write_html(objective_curves_figure(outcome.rows, outcome.histories, objective=spec.objective.kind,
                                       budget=spec.duration_n_img), outcome.out / CURVES_FILE)


def log_to_mlflow(outcome, spec, resources, args: argparse.Namespace, *, experiment: str,
                  tracking_uri: str | None) -> str:
    """The parent and child runs (lossfloor.tracking.sweep); the parent's id is added to best.json."""
    from lossfloor.tracking.sweep import log_sweep
    from lossfloor.train.sweep import write_best

    R = spec.resolved
    params = {"preset": R.preset.name, "data": spec.data, "j_star": spec.base.jstar, "trials": spec.trials,
              "search": spec.search, "scheduler": spec.scheduler, "objective": spec.objective.kind,
              "duration_n_img": R.duration_n_img, "batch_n_img": R.batch_n_img, "eval_every_n_img": R.eval_every_n_img,
              "grace_n_img": spec.grace, "reduction_factor": spec.reduction_factor, "seed": spec.base.seed,
              "workers": resources.engine.workers, "gpus_per_worker": resources.engine.gpus_per_worker,
              "conditional": spec.base.conditional}
    run_id = log_sweep(outcome, params=params, space_file=args.space, experiment=experiment, tracking_uri=tracking_uri)
    outcome.best["mlflow_run"] = run_id
    write_best(outcome.out, outcome.best)
    return run_id


def run(args: argparse.Namespace) -> int:
    _check_optuna(args)
    resources = build_resources(args)
    if args.mlflow and not args.dry_run:  # before any work: a broken tracking store is an input error
        try:
            from lossfloor.tracking.runs import check_store
        except ImportError as e:
            raise InputError(f"--mlflow: MLflow tracking is not available ({e})") from None
        args.tracking_uri = check_store(args.tracking_uri)
    spec = build_spec(args, resources, create_jstar=not args.dry_run)
    if args.dry_run:
        if args.fd_weights is not None:  # the run reads it before its first trial (train.sweep.check_spec)
            from lossfloor.train.metrics import feature_extractor

            try:
                feature_extractor(spec.objective.features)
            except InputError as e:
                raise InputError(f"--fd-weights: {e}") from None
        sys.stdout.write(plan_text(spec, resources, args) + "\n")
        return 0
    from lossfloor.ray import sweep as ray_sweep  # Ray only when a sweep runs

    outcome = ray_sweep.run_sweep(spec, args.out, resources)
    if outcome.status == "finished":
        write_figures(outcome, spec)
    if outcome.status != "finished":
        sys.stderr.write(f"lossfloor sweep: interrupted; rerun the same command to resume the sweep in {outcome.out}\n")
        return INTERRUPTED
    if args.mlflow and not outcome.best.get("mlflow_run"):
        log_to_mlflow(outcome, spec, resources, args, experiment=args.mlflow_experiment,
                      tracking_uri=args.tracking_uri)
    if args.json:
        json.dump(outcome.best, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(results_text(outcome, spec) + "\n")
    return 0
