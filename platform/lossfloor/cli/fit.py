"""`lossfloor fit`: scaling-law fits of loss against training compute (Xu et al. 2026, §5, Eq. 13).

    lossfloor fit --curves CURVES.parquet [--j-star J.parquet | --j-star-value X [--j-star-stderr S]]
                  [--sigma S] [--bootstrap N] [--holdout-largest] [--seed S] --out FITS.json

Fits raw J = beta F^alpha, gap-corrected J - J* = beta F^alpha and free-offset J = E + beta F^alpha on
the envelope of the curves, with run-level bootstrap intervals; writes FITS.json atomically and prints a
summary. See `lossfloor.scaling` for the method.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lossfloor.atomic import check_writable, write_output
from lossfloor.errors import InputError
from lossfloor.fmt import num


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit",
        help="fit raw, gap-corrected and free-offset power laws to loss-vs-FLOPs curves",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--curves",
        required=True,
        type=Path,
        help="parquet with columns model, flops, loss [, params, sigma (null = total loss)]",
    )
    js = p.add_mutually_exclusive_group()
    js.add_argument("--j-star", type=Path, help="J* table from `lossfloor estimate` (read in x0 units with its interval); needs --sigma")
    js.add_argument("--j-star-value", type=float, help="J* of the fitted quantity, as a number")
    p.add_argument(
        "--j-star-stderr",
        type=float,
        default=None,
        help="standard error of --j-star-value, propagated through the bootstrap (default 0)",
    )
    p.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="fit the rows with this sigma (default: the total-loss rows, sigma null)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates over models (0: none; at most 100000)")
    p.add_argument(
        "--holdout-largest",
        action="store_true",
        help="also fit without the largest model and score each form on predicting it",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (same seed, same output)")
    p.add_argument("--out", required=True, type=Path, help="output JSON path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lossfloor.scaling import fit_all  # scipy loads only when the command runs

    if args.j_star_stderr is not None and args.j_star_value is None:
        raise InputError("--j-star-stderr: needs --j-star-value (a J* table carries its own interval)")
    if args.j_star_value is not None and not (math.isfinite(args.j_star_value) and args.j_star_value >= 0):
        raise InputError(f"--j-star-value: expected a number >= 0 (an optimal loss, x0 units), got {args.j_star_value}")
    if args.j_star_stderr is not None and not (math.isfinite(args.j_star_stderr) and args.j_star_stderr >= 0):
        raise InputError(f"--j-star-stderr: expected a number >= 0, got {args.j_star_stderr}")
    check_writable(args.out)
    if args.j_star is not None:
        _check_same_data(args.curves, args.j_star)
    fits = fit_all(
        args.curves,
        j_star=args.j_star if args.j_star is not None else args.j_star_value,
        j_star_stderr=args.j_star_stderr,
        sigma=args.sigma,
        bootstrap=args.bootstrap,
        holdout=args.holdout_largest,
        seed=args.seed,
    )
    write_json_atomic(args.out, fits.to_dict())
    sys.stdout.write(summary(fits) + f"wrote {args.out}\n")
    return 0


def _check_same_data(curves: Path, j_star: Path) -> None:
    """Curves written by `lossfloor train` name their data's fingerprint and whether the models were
    class-conditional: the J* table must be of the same data, and the matching floor."""
    import pyarrow.parquet as pq

    from lossfloor.floor import read_table

    if curves.suffix != ".parquet" or not curves.is_file():
        return  # fit_all names a missing or unreadable file
    try:
        meta = pq.read_schema(curves).metadata or {}
    except Exception:
        return
    made_on = meta.get(b"dataset_fingerprint", b"").decode()
    kind = meta.get(b"class_conditional")  # absent: curves from before it was recorded, not checked
    conditional = None if kind is None else kind == b"true"
    try:
        table = read_table(j_star).x0()
    except InputError:
        return  # fit_all names an unreadable table
    table.check_data(made_on, conditional=conditional, table=f"--j-star {j_star}",
                     data=f"--curves {curves} (the models' training data)")


def write_json_atomic(path: Path, obj: dict) -> None:
    """`obj` as JSON, written atomically (lossfloor.atomic.write_output)."""
    write_output(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def _iv(iv) -> str:
    return "" if iv is None else f" [{num(iv[0])}, {num(iv[1])}]"


def summary(fits) -> str:
    """Human-readable summary of a `ScalingFits` (one line per form, then checks and notes)."""
    what = "total loss" if fits.sigma is None else f"sigma = {fits.sigma:g}"
    js = (
        "none"
        if fits.j_star is None
        else f"{fits.j_star:.6g}{_iv(fits.j_star_interval)} ({fits.j_star_source}; x0 units, 95 % interval)"
    )
    lines = [
        f"{fits.source}: {what}; {fits.n_models} models, {fits.n_points} points, "
        f"{len(fits.envelope)} envelope points; J* = {js}; bootstrap {fits.bootstrap} over models, "
        f"seed {fits.seed}",
    ]
    for name, res in fits.forms.items():
        if res is None:
            lines.append(f"  {name:<12} -")
            continue
        f, iv = res.fit, res.intervals or {}
        off = f"  E = {num(f.offset)}{_iv(iv.get('offset'))}" if name == "free_offset" else ""
        lines.append(
            f"  {name:<12} alpha = {num(f.alpha)}{_iv(iv.get('alpha'))}  beta = {num(f.beta)}"
            f"{_iv(iv.get('beta'))}{off}  |rho| = {num(f.abs_rho, '.5f')}  R2 = {num(f.r2, '.5f')}"
            f"  log-RMSE = {num(f.log_rmse, '.3g')}"
        )
    if fits.free_offset is not None and fits.j_star is not None:
        lines.append(
            f"  check: free-offset E = {num(fits.free_offset.fit.offset)} vs J* = {fits.j_star:.4g}"
        )
    if fits.holdout is not None:
        h = fits.holdout
        scores = ", ".join(
            f"{k} {num(s.log_rmse, '.3g')} ({num(100 * s.rel_error, '+.2f')}% at F={h.final_flops:.3g})"
            for k, s in h.scores.items()
            if s is not None
        )
        lines.append(f"  hold-out {h.model!r} (largest by {h.chosen_by}), log-RMSE: {scores}; best: {h.best}")
    lines += [f"  note: {n}" for n in fits.notes]
    return "\n".join(lines) + "\n"
