"""`lossfloor estimate`: J*(σ) of a data set, written as a parquet J* table."""

from __future__ import annotations

import argparse
import json
import math
import sys

from lossfloor.errors import InputError


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
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of a table")
    p.add_argument("--out", required=True, help="output J* table, FILE.parquet")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
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


def run(args: argparse.Namespace) -> int:
    from lossfloor.data import load
    from lossfloor.diffusion import check_target, parse_sigma_grid, parse_sigmas
    from lossfloor.floor import EstimatorConfig, build_table, estimate, write_table

    _check_args(args)
    target = check_target(args.target)
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
    )
    data = load(args.data)
    est = estimate(data.samples, sigmas, config)
    table = build_table(est, target=target, fingerprint=data.fingerprint, threshold=args.sigma_star_threshold)
    write_table(table, args.out)
    rows = table.rows()
    if args.json:
        json.dump(rows, sys.stdout, indent=1, allow_nan=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(rows, table.sigma_star) + "\n")
        sys.stdout.write(f"wrote {args.out}\n")
    return 0
