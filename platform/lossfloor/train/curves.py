"""The run's tables, written as parquet (loss curves (run, model, params, step, images, flops,
sigma, loss, gap)).

loss_curve.parquet, one row per (evaluation, sigma) plus one row with sigma null per evaluation:
    run str, model str, params int64, step int64, images int64, flops float64,
    sigma float64 (null = the schedule-weighted total), loss float64 (x0 units per sigma; weighted
    total for the null row), gap float64 (J - J*, null without a J* table), j_star, j_star_ci_low,
    j_star_ci_high float64 (J* and its 95 % interval, x0 units; for the null row the same weighted total;
    null without a table), log_var float64 (u(sigma) of the uncertainty head per sigma row; null on the
    total row and without a head), total_learned float64 (total row: sum_k pi_k w_k e^{-u_k} J_k, the total
    under EDM2's learned weighting; null elsewhere and without a head), loss_native, j_star_native float64
    (per sigma row: J and J* in the network's own units, ||F - native target||^2 = J / c_out^2 of the
    run's preconditioning, e.g. the eps loss of an NCSN or DDPM model; null on the total row and for J*
    without a table)
  `lossfloor.scaling` reads it directly (model, flops, loss, params, sigma; extra columns ignored).
train_log.parquet, one row per logged step (sigma always null):
    run, model, params, step, images, flops, sigma, loss (the training objective per image, averaged
    over the global batches since the previous row), gap (the same mean of w (l - J*), null without J*),
    loss_x0 (the same mean of ||D - x0||^2), lr float64 (the row's step)
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lossfloor.atomic import write_atomic

CURVE_SCHEMA = pa.schema([
    ("run", pa.string()), ("model", pa.string()), ("params", pa.int64()), ("step", pa.int64()),
    ("images", pa.int64()), ("flops", pa.float64()), ("sigma", pa.float64()), ("loss", pa.float64()),
    ("gap", pa.float64()), ("j_star", pa.float64()), ("j_star_ci_low", pa.float64()),
    ("j_star_ci_high", pa.float64()), ("log_var", pa.float64()), ("total_learned", pa.float64()),
    ("loss_native", pa.float64()), ("j_star_native", pa.float64()),
])
TRAIN_LOG_SCHEMA = pa.schema([
    ("run", pa.string()), ("model", pa.string()), ("params", pa.int64()), ("step", pa.int64()),
    ("images", pa.int64()), ("flops", pa.float64()), ("sigma", pa.float64()), ("loss", pa.float64()),
    ("gap", pa.float64()), ("loss_x0", pa.float64()), ("lr", pa.float64()),
])


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts with the schema's keys) as a pyarrow table of that schema."""
    return pa.Table.from_pylist([{name: r.get(name) for name in schema.names} for r in rows], schema=schema)


def write_rows(rows: list[dict], schema: pa.Schema, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write rows as parquet atomically; `metadata` (str -> str) goes into the schema metadata."""
    table = to_table(rows, schema)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    return write_atomic(path, lambda p: pq.write_table(table, p))


FIGURE_COLUMNS = ("model", "flops", "loss")  # what a reader of curves needs at least (sigma, params optional)


def check_curves(curves: pa.Table, source: str = "curves") -> pa.Table:
    """A loss-curves table with the columns every reader needs (model, flops, loss) and some rows."""
    from lossfloor.errors import InputError

    missing = [c for c in FIGURE_COLUMNS if c not in curves.column_names]
    if missing:
        raise InputError(f"{source}: missing column(s) {', '.join(missing)} (lossfloor.train.curves schema; "
                         f"has: {', '.join(curves.column_names) or 'none'})")
    if curves.num_rows == 0:
        raise InputError(f"{source}: no rows")
    return curves
