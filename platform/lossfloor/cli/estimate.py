"""`lossfloor estimate`: J*(σ) of a data set, written as a parquet J* table."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from lossfloor.errors import InputError

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help="estimate the optimal loss J*(sigma) of a data set",
        description="Estimate the optimal loss J*(sigma) (Xu et al., Theorem 1) with the exact, SNIS, DOL or "
        "cDOL estimator and write the J* table as parquet.",
    )
    p.add_argument("--data", required=True, help="data source: .npy/.npz, image folder, EDM2 zip/folder, "
                   "CIFAR-10 batches folder, parquet shards folder, or bundled:digits")
    grid = p.add_mutually_exclusive_group(required=True)
    grid.add_argument("--sigmas", help="comma-separated noise levels, e.g. 0.1,0.5,2")
    grid.add_argument("--sigma-grid", help="log-spaced grid MIN:MAX:COUNT, e.g. 0.01:100:64")
    p.add_argument("--estimator", default="cdol", help="exact | snis | dol | cdol (default cdol)")
    p.add_argument("--subset-size", type=int, default=None, metavar="L", help="reference subset size (default min(4096, N))")
    p.add_argument("--c", type=float, default=None, metavar="C", help="cDOL source down-weighting (default 4N/L)")
    p.add_argument("--queries-per-sample", type=int, default=3, metavar="K",
                   help="every sample is the source of exactly K noisy queries (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default) | float64")
    p.add_argument("--target", default="x0", help="x0 | eps | score | vp-v | fm-velocity (default x0)")
    p.add_argument("--subset-sensitivity", action="store_true",
                   help="also estimate with L/2 and report per sigma how much J* moves")
    p.add_argument("--sigma-star-threshold", type=float, default=1e-3,
                   help="sigma* = largest sigma with J* <= threshold * J*(inf) (default 1e-3)")
    p.add_argument("--rows-per-batch", type=int, default=None, metavar="R",
                   help="source samples per batch (R*K queries; default from a memory budget)")
    p.add_argument("--json", action="store_true",
                   help="print the rows as a JSON list instead of a table (non-finite numbers as \"inf\"/\"nan\")")
    p.add_argument("--out", required=True, help="output J* table, FILE.parquet")

    eng = p.add_argument_group("engine and resume")
    eng.add_argument("--engine", default="local", help="local (this process, default) | ray (Ray Data actor pool)")
    eng.add_argument("--work-dir", default=None, metavar="DIR",
                     help="keep finished batches here; a rerun computes only the missing ones (default: "
                     "with --engine ray, OUT's folder/lossfloor-work-<hash of config, data and sigmas>; "
                     "with --engine local, none)")
    eng.add_argument("--address", default=None, metavar="ADDR",
                     help="ray: connect to this cluster (auto, HOST:6379, ray://HOST:10001; default: start or "
                     "attach a local one)")
    eng.add_argument("--workers", type=int, default=None, metavar="N", help="ray: actors in the pool (default 1)")
    eng.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                     help="ray: GPUs per actor; > 0 runs the kernel on CUDA (default 0)")
    eng.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                     help="ray: CPUs (and torch threads) per actor (default: the cluster's CPUs / N)")

    trk = p.add_argument_group("tracking")
    trk.add_argument("--mlflow", action="store_true",
                     help="also log the estimate to MLflow (params, per-sigma metrics, the table, a figure)")
    trk.add_argument("--mlflow-experiment", default="optimal-loss", metavar="NAME",
                     help="MLflow experiment (default optimal-loss)")
    trk.add_argument("--run-name", default=None, help="MLflow run name (default: MLflow's)")
    p.set_defaults(func=run)


ENGINES = ("local", "ray")
_RAY_ONLY = ("address", "workers", "gpus_per_worker", "cpus_per_worker")


def _check_args(args: argparse.Namespace) -> None:
    from lossfloor.floor import ESTIMATORS

    if args.estimator not in ESTIMATORS:
        raise InputError(f"--estimator: expected one of {', '.join(ESTIMATORS)}, got {args.estimator!r}")
    if args.engine not in ENGINES:
        raise InputError(f"--engine: expected one of {', '.join(ENGINES)}, got {args.engine!r}")
    if args.engine != "ray":
        given = [f"--{name.replace('_', '-')}" for name in _RAY_ONLY if getattr(args, name) is not None]
        if given:
            raise InputError(f"{given[0]}: only with --engine ray")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers: expected an integer >= 1, got {args.workers}")
    if args.gpus_per_worker is not None and not (args.gpus_per_worker >= 0 and math.isfinite(args.gpus_per_worker)):
        raise InputError(f"--gpus-per-worker: expected a number >= 0 (e.g. 1 or 0.5), got {args.gpus_per_worker}")
    if args.cpus_per_worker is not None and not (args.cpus_per_worker > 0 and math.isfinite(args.cpus_per_worker)):
        raise InputError(f"--cpus-per-worker: expected a number > 0, got {args.cpus_per_worker}")
    if args.engine == "ray" and args.device.startswith("cuda") and not (args.gpus_per_worker or 0) > 0:
        raise InputError("--device: with --engine ray the workers' device follows --gpus-per-worker (cuda when > 0)")
    if args.rows_per_batch is not None and args.rows_per_batch < 1:
        raise InputError(f"--rows-per-batch: expected an integer >= 1, got {args.rows_per_batch}")
    if args.c is not None and not (args.c > 0):
        raise InputError(f"--c: expected a number > 0 (e.g. 4N/L, or inf), got {args.c}")
    if args.subset_size is not None and args.subset_size < 2:
        raise InputError(f"--subset-size: expected an integer >= 2, got {args.subset_size}")
    if args.queries_per_sample < 1:
        raise InputError(f"--queries-per-sample: expected an integer >= 1, got {args.queries_per_sample}")
    if not (0 < args.sigma_star_threshold < 1):
        raise InputError(f"--sigma-star-threshold: expected a number in (0, 1), got {args.sigma_star_threshold}")
    if not args.out.endswith(".parquet"):
        raise InputError(f"--out: expected a FILE.parquet path, got {args.out!r}")
    if not Path(args.out).resolve().parent.is_dir():
        raise InputError(f"--out: folder {Path(args.out).parent} does not exist")


def _check_data(samples, args: argparse.Namespace) -> None:
    """What the estimators would reject, named by flag and file before any work starts."""
    import numpy as np

    if samples.ndim < 2:
        raise InputError(f"--data {args.data}: expected at least 2 samples, got {len(samples)}")
    _check_count(len(samples), args)
    if not np.isfinite(samples).all():
        raise InputError(f"--data {args.data}: contains NaN or infinite values")


def _check_count(n: int, args: argparse.Namespace) -> None:
    if n < 2:
        raise InputError(f"--data {args.data}: expected at least 2 samples, got {n}")
    if args.subset_size is not None and args.estimator != "exact" and args.subset_size > n:
        raise InputError(f"--subset-size: expected at most N = {n} (the number of samples), got {args.subset_size}")


def _json_value(v):
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def format_table(rows: list[dict], sigma_star: float | None) -> str:
    has_shift = any(r.get("subset_shift") is not None for r in rows)
    head = f"{'sigma':>12} {'j_star':>14} {'stderr':>12}" + (f" {'L/2 shift':>10}" if has_shift else "")
    lines = [head]
    for r in rows:
        line = f"{r['sigma']:>12.6g} {r['j_star']:>14.6g} {r['stderr']:>12.3g}"
        if has_shift:
            shift = r.get("subset_shift")
            line += f" {shift:>+10.2%}" if shift is not None and math.isfinite(shift) else f" {'':>10}"
        lines.append(line)
    r0 = rows[0]
    lines.append(
        f"estimator={r0['estimator']} target={r0['target']} L={r0['subset_size']} C={r0['c']:.6g} "
        f"queries={r0['n_queries']} J*(inf)={r0['total_variance']:.6g} "
        f"sigma*={'n/a (J* above the threshold on the whole grid)' if sigma_star is None else f'{sigma_star:.6g}'}"
    )
    return "\n".join(lines)


def mlflow_params(args: argparse.Namespace, est, fingerprint: str, target: str) -> dict:
    """What an MLflow run of an estimate records as params."""
    cfg = est.config
    return {
        "dataset_fingerprint": fingerprint,
        "data": args.data,
        "estimator": cfg.estimator,
        "subset_size": cfg.subset_size,
        "c": cfg.c,
        "queries_per_sample": cfg.queries_per_sample,
        "seed": cfg.seed,
        "sigma_grid": args.sigmas if args.sigmas is not None else args.sigma_grid,
        "n_sigmas": len(est.sigmas),
        "sigma_min": float(est.sigmas.min()),
        "sigma_max": float(est.sigmas.max()),
        "engine": args.engine,
        "target": target,
        "n_queries": est.n_queries,
        "rows_per_batch": cfg.rows_per_batch,
    }


def run(args: argparse.Namespace) -> int:
    from lossfloor.data import load, read_meta
    from lossfloor.data.shards import is_shard_dir
    from lossfloor.diffusion import check_target, parse_sigma_grid, parse_sigmas
    from lossfloor.floor import EstimatorConfig, build_table, estimate, write_table
    from lossfloor.floor.resume import estimate_resumable

    _check_args(args)
    target = check_target(args.target, field="--target")
    log_estimate = None
    if args.mlflow:  # before any work: a missing tracking layer is a setup error, not a late surprise
        try:
            from lossfloor.tracking import log_estimate
        except ImportError as e:
            raise InputError(f"--mlflow: MLflow tracking is not available ({e})") from None
    sigmas = parse_sigmas(args.sigmas) if args.sigmas is not None else parse_sigma_grid(args.sigma_grid)
    config = EstimatorConfig(
        estimator=args.estimator,
        subset_size=args.subset_size,
        c=args.c,
        queries_per_sample=args.queries_per_sample,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        subset_sensitivity=args.subset_sensitivity,
        rows_per_batch=args.rows_per_batch,
    )
    if args.engine == "ray" and is_shard_dir(Path(args.data)):
        meta = read_meta(args.data)  # the Ray workers read the shards themselves, not this process
        _check_count(meta.count, args)
        samples, fingerprint = args.data, meta.fingerprint
    else:
        data = load(args.data)
        _check_data(data.samples, args)
        samples, fingerprint = data.samples, data.fingerprint
    if args.engine == "ray":
        from lossfloor.ray import RayEngine, estimate_ray

        engine = RayEngine(address=args.address, workers=args.workers or 1,
                           gpus_per_worker=args.gpus_per_worker or 0.0, cpus_per_worker=args.cpus_per_worker)
        est = estimate_ray(
            samples, sigmas, config, engine=engine, fingerprint=fingerprint, work_dir=args.work_dir,
            work_parent=None if args.work_dir else Path(args.out).resolve().parent,
        ).result.estimate
    elif args.work_dir is not None:
        est = estimate_resumable(samples, sigmas, config, fingerprint=fingerprint, work_dir=args.work_dir).estimate
    else:
        est = estimate(samples, sigmas, config)
    table = build_table(est, target=target, fingerprint=fingerprint, threshold=args.sigma_star_threshold)
    write_table(table, args.out)
    if log_estimate is not None:  # on the driver only: workers never write to MLflow
        run_id = log_estimate(table, params=mlflow_params(args, est, fingerprint, target),
                              experiment=args.mlflow_experiment, run_name=args.run_name)
        log.info("logged MLflow run %s (experiment %s)", run_id, args.mlflow_experiment)
    rows = table.rows()
    if args.json:
        rows = [{k: _json_value(v) for k, v in r.items()} for r in rows]
        json.dump(rows, sys.stdout, indent=1, allow_nan=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(rows, table.sigma_star) + "\n")
        sys.stdout.write(f"wrote {args.out}\n")
    return 0
