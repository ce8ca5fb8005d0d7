"""`lossfloor estimate`: J*(σ) of a data set, written as a parquet J* table."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lossfloor.atomic import check_writable
from lossfloor.devices import check_device
from lossfloor.errors import InputError
from lossfloor.jobs.engine import Engine, add_engine_args


def register(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help="estimate the optimal loss J*(sigma) of a data set",
        description="Estimate the optimal loss J*(sigma) (Xu et al., Theorem 1) with the exact, kNN, SNIS, DOL "
        "or cDOL estimator and write the J* table (with a bias allowance and a 95%% interval) as parquet.",
    )
    p.add_argument("--data", required=True, help="data source: .npy/.npz, image folder, EDM2 zip/folder, "
                   "CIFAR-10 batches folder, parquet shards folder, or bundled:digits")
    grid = p.add_mutually_exclusive_group(required=True)
    grid.add_argument("--sigmas", help="comma-separated noise levels, e.g. 0.1,0.5,2")
    grid.add_argument("--sigma-grid", help="log-spaced grid MIN:MAX:COUNT, e.g. 0.01:100:64")
    p.add_argument("--estimator", default="auto",
                   help="auto | exact | knn | snis | dol | cdol (default auto: exact up to 50 000 samples, else knn)")
    p.add_argument("--subset-size", type=int, default=None, metavar="L",
                   help="kernels per query: knn default 128, snis/dol/cdol default min(4096, N); L = N is exact")
    p.add_argument("--rel-error", type=float, default=None, metavar="R",
                   help="automatic L: double L from --subset-size (default 128) until the bias allowance is <= "
                   "R*J* wherever J* > 1e-3*J*(inf), or L = N (e.g. 0.01)")
    p.add_argument("--c", type=float, default=None, metavar="C", help="cDOL source down-weighting (default 4N/L)")
    p.add_argument("--index", default="auto",
                   help="knn neighbour index: auto | flat | ivf | hnsw | torch (default auto: FAISS flat up to "
                   "5000 samples, IVF above; torch GEMM+top-k without FAISS)")
    p.add_argument("--index-pca", type=int, default=None, metavar="R",
                   help="knn: search neighbours on the first R principal components (FAISS PCAMatrix)")
    p.add_argument("--queries-per-sample", type=int, default=3, metavar="K",
                   help="the default budget M = K*N queries per sigma, every sample the source of exactly K of them, "
                   "and the most any budget may have (default 3)")
    p.add_argument("--queries", type=int, default=None, metavar="M",
                   help="noisy queries per sigma: the first M of the seeded order (default K*N, at most K*N); with "
                   "--rel-error the most it may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default) | float64")
    p.add_argument("--latents", default="mean",
                   help="EDM2 latents: mean (the posterior means, default) | posterior (J* of the Gaussian mixture "
                   "N(mean, std^2) the model trains on, as EDM2 samples latents)")
    p.add_argument("--conditional", action="store_true",
                   help="the class-conditional floor J*_cond = sum_c pi_c J*_c of labelled data (each class's J*_c "
                   "over its own samples, pi_c the label frequencies): the floor of a model given the class label")
    p.add_argument("--target", default="x0", help="x0 | eps | score | vp-v | fm-velocity (default x0)")
    p.add_argument("--sigma-star-threshold", type=float, default=1e-3,
                   help="sigma* = largest sigma with J* <= threshold * J*(inf) (default 1e-3)")
    p.add_argument("--rows-per-batch", type=int, default=None, metavar="R",
                   help="queries per batch (default from a memory budget; it changes no number, only speed and "
                   "memory; snis/dol/cdol: rounded up to whole 128-query blocks)")
    p.add_argument("--max-device-gb", type=float, default=None, metavar="GB",
                   help="cap on one estimator process's device memory: the batch is sized to it and on CUDA the data "
                   "stay in host memory unless they fit next to a batch (default: 8 GiB batches, data on the GPU "
                   "when they fit)")
    p.add_argument("--json", action="store_true",
                   help="print the rows as a JSON list instead of a table (non-finite numbers as \"inf\"/\"nan\")")
    p.add_argument("--out", required=True, help="output J* table, FILE.parquet")

    eng = add_engine_args(p, ray="Ray Data actor pool", workers_help="actors in the pool", worker="actor",
                          gpus_help="> 0 runs the kernel on CUDA")
    eng.add_argument("--work-dir", default=None, metavar="DIR",
                     help="keep finished batches here; a rerun computes only the missing ones (default: "
                     "with --engine ray, OUT's folder/lossfloor-work-<hash of config, data and sigmas>; "
                     "with --engine local, none)")

    trk = p.add_argument_group("tracking")
    trk.add_argument("--mlflow", action="store_true",
                     help="also log the estimate to MLflow (params, per-sigma metrics, the table, a figure)")
    trk.add_argument("--mlflow-experiment", default="optimal-loss", metavar="NAME",
                     help="MLflow experiment (default optimal-loss)")
    trk.add_argument("--run-name", default=None, help="MLflow run name (default: MLflow's)")
    trk.add_argument("--tracking-uri", default=None, metavar="URI",
                     help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///~/lossfloor/mlflow.db)")
    p.set_defaults(func=run)


MAX_QUERIES_PER_SAMPLE = 1024  # M = K N queries; beyond this the error is no longer the queries'.


def _config(args: argparse.Namespace):
    """The flags' EstimatorConfig: its own checks refuse a bad value (`InputError.field` names the flag)."""
    from lossfloor.floor import EstimatorConfig

    return EstimatorConfig(
        estimator=args.estimator,
        subset_size=args.subset_size,
        c=args.c,
        queries_per_sample=args.queries_per_sample,
        queries=args.queries,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        rows_per_batch=args.rows_per_batch,
        rel_error=args.rel_error,
        index=args.index,
        index_pca=args.index_pca,
        latents=args.latents,
        max_device_gb=args.max_device_gb,
    )


def _check_args(args: argparse.Namespace, engine: Engine) -> None:
    """What the config alone cannot know: flags the chosen estimator or engine would ignore or refuse."""
    if engine.kind == "ray" and args.device.startswith("cuda") and engine.device != "cuda":
        raise InputError("--device: with --engine ray the workers' device follows --gpus-per-worker (cuda when > 0)")
    if args.c is not None and args.estimator != "cdol":
        raise InputError(f"--c: cDOL's source down-weighting, only with --estimator cdol (--estimator "
                         f"{args.estimator} would ignore it)")
    if args.index_pca is not None and args.estimator != "knn":
        raise InputError(f"--index-pca: knn's neighbour search, only with --estimator knn (--estimator "
                         f"{args.estimator} would ignore it)")
    if args.queries_per_sample > MAX_QUERIES_PER_SAMPLE:
        raise InputError(f"--queries-per-sample: expected at most {MAX_QUERIES_PER_SAMPLE} noisy queries per sample, "
                         f"got {args.queries_per_sample}")
    if engine.kind == "local":
        check_device(args.device)
    from lossfloor.floor.neighbours import faiss_module

    if args.index not in ("auto", "torch") and faiss_module() is None:
        raise InputError(f"--index {args.index}: FAISS is not installed (pip install faiss-cpu), or use --index torch")
    if not (0 < args.sigma_star_threshold < 1):
        raise InputError(f"--sigma-star-threshold: expected a number in (0, 1), got {args.sigma_star_threshold}")
    if not args.out.endswith(".parquet"):
        raise InputError(f"--out: expected a FILE.parquet path, got {args.out!r}")
    check_writable(args.out)
    if args.work_dir is not None:
        check_writable(args.work_dir, "--work-dir", folder=True)


def _check_data(samples, args: argparse.Namespace) -> None:
    """What the estimators would reject about the samples (finite values were checked as they were read)."""
    if samples.ndim < 2:
        n = len(samples)
        raise InputError(f"--data {args.data}: the estimators need samples with at least one axis, (N, D) or "
                         f"(N, C, H, W); got shape {samples.shape}, {n} scalars (as one-value samples: reshape to "
                         f"({n}, 1))")
    _check_count(len(samples), args)
    if samples[0].size == 0:
        raise InputError(f"--data {args.data}: samples of shape {samples.shape[1:]} hold no values")


def _check_count(n: int, args: argparse.Namespace) -> None:
    """What the estimators would reject about N, named by flag and file before any work starts."""
    if n < 2:
        raise InputError(f"--data {args.data}: expected at least 2 samples, got {n}")
    if args.subset_size is not None and args.estimator != "exact" and args.subset_size > n:
        raise InputError(f"--subset-size: expected at most N = {n} (the number of samples), got {args.subset_size}")


def _json_value(v):
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def format_table(rows: list[dict], table) -> str:
    """The rows as a text table (target units) and a summary line: estimator, L (C for cdol), σ* and its
    interval, timings."""
    varying_L = len({r["subset_size"] for r in rows}) > 1
    varying_M = len({r["n_queries"] for r in rows}) > 1
    head = (f"{'sigma':>12} {'j_star':>13} {'stderr':>10} {'bias':>10} {'ci_low':>13} {'ci_high':>13}"
            + (f" {'L':>7}" if varying_L else "") + (f" {'M':>9}" if varying_M else ""))
    lines = [head]
    for r in rows:
        line = (f"{r['sigma']:>12.6g} {r['j_star']:>13.6g} {r['stderr']:>10.3g} {r['bias']:>+10.3g} "
                f"{r['ci_low']:>13.6g} {r['ci_high']:>13.6g}")
        lines.append(line + (f" {r['subset_size']:>7d}" if varying_L else "")
                     + (f" {r['n_queries']:>9d}" if varying_M else ""))
    r0 = rows[0]
    meta = table.table.schema.metadata or {}
    lo, hi = (json.loads(meta.get(k, b"null")) for k in (b"sigma_star_low", b"sigma_star_high"))
    s_star = table.sigma_star
    star = ("n/a (J* above the threshold on the whole grid)" if s_star is None
            else f"{s_star:.6g} [{_g(lo)}, {_g(hi)}]")
    L = "N" if r0["estimator"] == "exact" else ("per row" if varying_L else str(r0["subset_size"]))
    c = f" C={r0['c']:.6g}" if r0["estimator"] == "cdol" else ""  # the other estimators have no C to choose
    lines.append(
        f"estimator={r0['estimator']} target={r0['target']} L={L}{c} "
        f"queries={'per row' if varying_M else r0['n_queries']} J*(inf)={r0['total_variance']:.6g} sigma*={star}"
    )
    timings = json.loads(meta.get(b"timings", b"{}"))
    if timings.get("index_build_s") or timings.get("search_s"):
        lines.append(f"time: {timings.get('total_s', 0):.3g} s in all, index build {timings['index_build_s']:.3g} s, "
                     f"neighbour search {timings['search_s']:.3g} s")
    if meta.get(b"class_conditional") == b"true":
        n_classes = len(json.loads(meta.get(b"classes", b"[]")))
        lines.append(f"class-conditional floor: J* = sum_c pi_c J*_c over {n_classes} classes, J*(inf) = the "
                     "within-class variance")
    lines.append("ci_low..ci_high: 95% interval with the estimator's bias allowance; stderr: Monte-Carlo only")
    return "\n".join(lines)


def _g(v) -> str:
    return "?" if v is None else f"{v:.4g}"


def run(args: argparse.Namespace) -> int:
    from lossfloor.data import load, read_meta
    from lossfloor.data.shards import is_plain_shard_dir
    from lossfloor.diffusion import check_target, parse_sigma_grid, parse_sigmas
    from lossfloor.jobs.estimate import estimate_table
    from lossfloor.jobs.tracking import open_tracking

    engine = Engine.from_args(args)
    config = _config(args)
    _check_args(args, engine)
    target = check_target(args.target, field="--target")
    tracking = open_tracking(args.mlflow, args.tracking_uri, experiment=args.mlflow_experiment,
                             run_name=args.run_name)
    sigmas = parse_sigmas(args.sigmas) if args.sigmas is not None else parse_sigma_grid(args.sigma_grid)
    labels = None
    if engine.kind == "ray" and is_plain_shard_dir(Path(args.data)) and not args.conditional:
        meta = read_meta(args.data)  # the Ray workers read the shards themselves, not this process
        _check_count(meta.count, args)
        samples, fingerprint, normalisation = args.data, meta.fingerprint, meta.normalisation
    else:
        data = load(args.data, latents=args.latents)
        _check_data(data.samples, args)
        samples, fingerprint, normalisation = data.samples, data.fingerprint, data.normalisation
        if args.conditional:
            if data.labels is None:
                raise InputError(f"--conditional: --data {args.data} has no class labels (the class-conditional floor "
                                 "needs labelled data: class sub-folders, dataset.json labels, a labels column)")
            labels = data.labels
    # the table says which floor it is for latent data (mean or posterior), nothing for other data
    latents = args.latents if normalisation.startswith("edm2-latent") else ""
    # the Ray engine always keeps a work folder: by default beside --out, named by the config's hash
    work_parent = Path(args.out).resolve().parent if engine.kind == "ray" and not args.work_dir else None
    table = estimate_table(samples, sigmas, config, out=args.out, target=target, fingerprint=fingerprint,
                           threshold=args.sigma_star_threshold, latents=latents, engine=engine, labels=labels,
                           work_dir=args.work_dir, work_parent=work_parent, tracking=tracking,
                           params={"data": args.data,
                                   "sigma_grid": args.sigmas if args.sigmas is not None else args.sigma_grid})
    rows = table.rows()
    if args.json:
        rows = [{k: _json_value(v) for k, v in r.items()} for r in rows]
        json.dump(rows, sys.stdout, indent=1, allow_nan=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(rows, table) + "\n")
        sys.stdout.write(f"wrote {args.out}\n")
    return 0
