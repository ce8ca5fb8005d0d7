"""Inputs of the scaling fits: loss curves and the J* table, read, validated and selected by sigma.

Curves table (one row per evaluated checkpoint; extra columns are ignored):

    model   str    the run; one curve per model, and the unit the bootstrap resamples
    flops   float  training compute F at the checkpoint, > 0
    loss    float  evaluated loss J at the checkpoint, > 0
    params  int    optional; model size, picks the largest model for the hold-out check
    sigma   float  optional; the noise level of a per-sigma loss; null/NaN (or no column) = total loss

J* table (as written by `lossfloor.floor`): read in x0 units with its interval, one row per sigma.

Accepted table objects: a parquet path, a `pyarrow.Table`, anything with `.to_arrow()` (a polars
DataFrame), or a mapping of column name to array (numpy arrays). Every problem raises `InputError`
naming the source and column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lossfloor.errors import InputError
from lossfloor.floor.table import (  # a curves row belongs to sigma s when |row - s| <= RTOL·s
    SIGMA_RTOL,
    JStarX0,
)
from lossfloor.floor.table import JStarTable as FloorTable

# ---------------------------------------------------------------------------------------------------
# Reading any table-like object into pyarrow


def read_table(obj, what: str) -> tuple[pa.Table, str]:
    """(table, source name) from a parquet path, a pyarrow Table, a polars frame or a column mapping."""
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if not path.is_file():
            raise InputError(f"{what} {path}: file not found (expected a parquet file)")
        try:
            return pq.read_table(path), str(path)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{what} {path}: cannot read as parquet ({type(e).__name__}: {e})") from None
    source = f"<{what}>"
    if isinstance(obj, pa.Table):
        return obj, source
    if hasattr(obj, "to_arrow"):  # polars DataFrame (polars is not a core import)
        return obj.to_arrow(), source
    if isinstance(obj, Mapping):
        try:
            lengths = {k: len(np.atleast_1d(v)) for k, v in obj.items()}
            if len(set(lengths.values())) > 1:
                raise InputError(f"{source}: columns have different lengths {lengths}")
            return pa.table({k: np.atleast_1d(np.asarray(v)) for k, v in obj.items()}), source
        except (pa.ArrowException, TypeError, ValueError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"{source}: cannot build a table from the mapping ({e})") from None
    raise InputError(
        f"{what}: expected a parquet path, a pyarrow Table, a polars DataFrame or a mapping of "
        f"column -> array, got {type(obj).__name__}"
    )


def _require(table: pa.Table, columns, source: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        have = ", ".join(table.column_names) or "none"
        raise InputError(f"{source}: missing column(s) {', '.join(missing)} (has: {have})")


def _float_column(table: pa.Table, name: str, source: str, *, nullable: bool) -> np.ndarray:
    """Column `name` as float64; nulls become NaN (an error unless `nullable`)."""
    col = table.column(name)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_null(col.type)):
        raise InputError(f"{source}: column {name!r} must be numeric, got {col.type}")
    if col.null_count and not nullable:
        raise InputError(f"{source}: column {name!r} has {col.null_count} null value(s)")
    arr = pc.fill_null(col.cast(pa.float64()), math.nan).to_numpy() if len(col) else np.empty(0)
    arr = np.asarray(arr, dtype=np.float64)
    if not nullable and np.isnan(arr).any():
        raise InputError(f"{source}: column {name!r} has {int(np.isnan(arr).sum())} NaN value(s)")
    return arr


# ---------------------------------------------------------------------------------------------------
# Loss curves


@dataclass(frozen=True, eq=False)
class Curves:
    """Loss-vs-compute curves of one quantity (one sigma, or the total loss), one curve per model.

    Arrays are per model, sorted by increasing flops, strictly increasing within a model.
    """

    models: tuple[str, ...]  # names in first-seen order
    flops: tuple[np.ndarray, ...]  # per model, (n_m,)
    loss: tuple[np.ndarray, ...]  # per model, (n_m,)
    params: tuple[float, ...] | None  # per model, or None when the table has no `params` column
    sigma: float | None  # None = the total weighted loss
    source: str

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def n_points(self) -> int:
        return sum(len(f) for f in self.flops)

    @property
    def min_loss(self) -> float:
        return float(min(j.min() for j in self.loss))

    def largest(self) -> tuple[int, str]:
        """(index, rule) of the largest model: by `params` when given, else by its largest flops."""
        if self.params is not None:
            return int(np.argmax(self.params)), "params"
        return int(np.argmax([f.max() for f in self.flops])), "max flops"

    def subset(self, keep) -> Curves:
        """The curves of the models at indices `keep` (in that order)."""
        keep = list(keep)
        return Curves(
            models=tuple(self.models[i] for i in keep),
            flops=tuple(self.flops[i] for i in keep),
            loss=tuple(self.loss[i] for i in keep),
            params=None if self.params is None else tuple(self.params[i] for i in keep),
            sigma=self.sigma,
            source=self.source,
        )


def _select_sigma(sig: np.ndarray, sigma: float | None, source: str) -> np.ndarray:
    """Boolean mask of the rows of the requested sigma (None: the total-loss rows, sigma null/NaN)."""
    total = np.isnan(sig)
    available = np.unique(sig[~total])
    shown = ", ".join(f"{s:g}" for s in available[:12]) + (" ..." if len(available) > 12 else "")
    if sigma is None:
        if not total.any():
            raise InputError(
                f"{source}: column 'sigma' has no null rows (total loss); pass a sigma, one of: {shown}"
            )
        return total
    if not (math.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma: expected a positive number, got {sigma}")
    mask = np.abs(sig - sigma) <= SIGMA_RTOL * sigma  # NaN rows compare False
    if not mask.any():
        raise InputError(
            f"{source}: no rows with sigma = {sigma:g} in column 'sigma' (has: {shown or 'none'})"
        )
    return mask


def as_curves(obj, *, sigma: float | None = None) -> Curves:
    """Validate a curves table (see module docstring) and keep the rows of `sigma` (None: total loss).

    Raises InputError for a missing file or column, null/NaN or non-positive `flops`/`loss`, null
    `model`, repeated flops within a model, inconsistent `params`, or fewer than two distinct flops.
    Nothing is dropped: every row of the selected sigma is a point of some curve.
    """
    table, source = read_table(obj, "curves")
    _require(table, ("model", "flops", "loss"), source)
    if table.num_rows == 0:
        raise InputError(f"{source}: the curves table is empty")
    model_col = table.column("model")
    if model_col.null_count:
        raise InputError(f"{source}: column 'model' has {model_col.null_count} null value(s)")
    try:
        model = np.asarray(model_col.cast(pa.string()).to_pylist(), dtype=object)
    except pa.ArrowException:
        raise InputError(f"{source}: column 'model' must be strings, got {model_col.type}") from None
    flops = _float_column(table, "flops", source, nullable=False)
    loss = _float_column(table, "loss", source, nullable=False)
    for name, arr in (("flops", flops), ("loss", loss)):
        if not np.isfinite(arr).all() or (arr <= 0).any():
            bad = int((~np.isfinite(arr) | (arr <= 0)).sum())
            raise InputError(f"{source}: column {name!r} must be finite and > 0 ({bad} row(s) are not)")
    params = None
    if "params" in table.column_names:
        params = _float_column(table, "params", source, nullable=False)
        if not np.isfinite(params).all() or (params <= 0).any():
            raise InputError(f"{source}: column 'params' must be > 0")
    if "sigma" in table.column_names:
        mask = _select_sigma(_float_column(table, "sigma", source, nullable=True), sigma, source)
    elif sigma is not None:
        raise InputError(f"{source}: no 'sigma' column, so no per-sigma rows for sigma = {sigma:g}")
    else:
        mask = np.ones(table.num_rows, dtype=bool)

    model, flops, loss = model[mask], flops[mask], loss[mask]
    params = None if params is None else params[mask]
    names = tuple(dict.fromkeys(model.tolist()))  # first-seen order
    per_f, per_j, per_p = [], [], []
    for name in names:
        rows = model == name
        order = np.argsort(flops[rows], kind="stable")
        f, j = flops[rows][order], loss[rows][order]
        if (np.diff(f) <= 0).any():
            raise InputError(
                f"{source}: model {name!r} has repeated 'flops' values; average repeated evaluations "
                f"(or give each seed its own 'model' name) first"
            )
        per_f.append(f)
        per_j.append(j)
        if params is not None:
            p = np.unique(params[rows])
            if len(p) != 1:
                raise InputError(f"{source}: model {name!r} has several 'params' values {p.tolist()}")
            per_p.append(float(p[0]))
    if len(np.unique(flops)) < 2:
        raise InputError(
            f"{source}: need at least two distinct 'flops' values to fit a power law, got {len(flops)} "
            f"row(s) with {len(np.unique(flops))} distinct value(s)"
        )
    return Curves(
        models=names,
        flops=tuple(per_f),
        loss=tuple(per_j),
        params=None if params is None else tuple(per_p),
        sigma=None if sigma is None else float(sigma),
        source=source,
    )


# ---------------------------------------------------------------------------------------------------
# J* table


def load_j_star_table(obj) -> JStarX0:
    """A J* table in x0 units with its interval (`lossfloor.floor.table.JStarTable.x0`), one row per sigma."""
    table, source = read_table(obj, "J* table")
    _require(table, ("sigma", "j_star", "stderr"), source)
    x0 = FloorTable(table, source=source).x0()
    if (np.diff(x0.sigma) <= 0).any():
        raise InputError(
            f"{source}: column 'sigma' has repeated values; keep one row per sigma (one estimator)"
        )
    return x0
