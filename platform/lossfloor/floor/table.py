"""The J* table: one row per σ, stored as parquet, the hand-off between estimation and everything after.

Columns (all rows of a table share the non-σ values except `subset_size` and `n_queries`):
  sigma                                   float64
  j_star, stderr, bias, ci_low, ci_high   float64, in the units of `target` (for display)
  j_star_x0, stderr_x0, bias_x0,          float64, the same in x0 units: what every consumer reads
    ci_low_x0, ci_high_x0                 (training, σ*, fits, dashboards, diagnosis)
  estimator, target, latents              str (latents: "mean" | "posterior" for EDM2 latents, else "")
  n_queries, subset_size, queries_per_sample, seed   int64 (n_queries, subset_size: the M and L used at
                                          that σ; they vary with a precision target, `--rel-error`)
  c                                       float64 (inf for SNIS)
  total_variance                          float64; J*(∞) in x0 units
  dataset_fingerprint                     str
`stderr` is the Monte-Carlo standard error only; `bias` the estimator's bias estimate and
`ci_low..ci_high` a 95 % interval that includes its allowance (see `lossfloor.floor.uncertainty`).
The schema metadata holds `sigma_star` (σ* from the estimate, interpolated on the grid), `sigma_star_low`,
`sigma_star_high` (the bracket the grid and the intervals allow, `sigma_star_bracket`; JSON numbers or null
for an open end), `sigma_star_threshold` and `timings` (JSON); a table of the class-conditional floor
J* = Σ_c π_c J*_c (`lossfloor.floor.conditional`) also `class_conditional` = true, `labels_fingerprint`
(the label vector's, `lossfloor.data.fingerprint.labels_fingerprint`) and `classes` (JSON: per class its
label, n, estimator and L); total_variance is then the within-class variance J*_cond(∞).

This module is the only reader of J* tables: `read_table` (a file) or `JStarTable` (a pyarrow table), then
`JStarTable.x0()`, the view every consumer reads; `JStarX0.at` is the one lookup of J*(σ) and
`JStarX0.check_data` the one check that a table is the floor of a model's data.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lossfloor.atomic import make_parents, write_atomic
from lossfloor.diffusion import check_target, convert_jstar
from lossfloor.errors import InputError
from lossfloor.floor.estimate import Estimate

SIGMA_STAR_THRESHOLD = 1e-3
SIGMA_RTOL = 1e-5  # two σ are the same grid point when |a - b| <= SIGMA_RTOL * b (keys like "sigma=1.70998" carry 6 digits)
REQUIRED_COLUMNS = ("sigma", "j_star", "stderr", "estimator", "target", "n_queries", "subset_size", "c",
                    "dataset_fingerprint")
VALUE_COLUMNS = ("j_star", "stderr", "bias", "ci_low", "ci_high")  # each with an _x0 twin
OUTSIDE = ("error", "clamp")  # the rules of `JStarX0.at` beyond the grid


def sigma_star(sigmas, j_star_x0, total_var: float, threshold: float = SIGMA_STAR_THRESHOLD) -> float | None:
    """σ*: the largest σ with J*(σ) ≤ threshold · J*(∞) (paper §4), interpolated on the grid.

    J* is interpolated linearly in (ln σ, ln J*) between the last grid point below the threshold and
    the next one. None when even the smallest σ of the grid is above the threshold; the largest σ when
    every point is below (the grid stops too early).
    """
    s = np.asarray(sigmas, dtype=np.float64)
    j = np.asarray(j_star_x0, dtype=np.float64)
    order = np.argsort(s)
    s, j = s[order], j[order]
    level = threshold * total_var
    below = np.nonzero(j <= level)[0]
    if len(below) == 0:
        return None
    # J* is non-decreasing in σ: the crossing is after the last point below the level
    i = int(below[-1])
    if i == len(s) - 1:
        return float(s[i])
    j0, j1 = j[i], j[i + 1]
    if j0 > 0:
        f = (math.log(level) - math.log(j0)) / (math.log(j1) - math.log(j0))
    else:
        f = (level - j0) / (j1 - j0)
    return float(math.exp(math.log(s[i]) + f * (math.log(s[i + 1]) - math.log(s[i]))))


def sigma_star_bracket(sigmas, ci_low, ci_high, total_var: float,
                       threshold: float = SIGMA_STAR_THRESHOLD) -> tuple[float | None, float | None]:
    """Where σ* can lie given the grid and J*'s 95 % intervals: (low, high), None for an open end.

    J*(σ) is non-decreasing in σ, so the true crossing of the level threshold·J*(∞) lies at or after every
    grid σ whose ci_high ≤ level and before every grid σ whose ci_low > level; between two grid points
    the grid says nothing about where it crosses. low is the largest σ of the first kind (None: σ* may lie
    below the grid), high the smallest of the second (None: the grid stops before J* surely crosses).
    A coarse grid gives a wide bracket (0.01, 1, 10: σ* somewhere in [0.01, 1]); a fine one a tight one.
    """
    s = np.asarray(sigmas, dtype=np.float64)
    level = threshold * total_var
    below = s[np.asarray(ci_high, dtype=np.float64) <= level]
    above = s[np.asarray(ci_low, dtype=np.float64) > level]
    low = float(below.max()) if len(below) else None
    high = float(above.min()) if len(above) else None
    if low is not None and high is not None and low > high:  # intervals at odds with monotonicity: span both
        low, high = high, low
    return low, high


def outside_grid(sigmas, grid) -> list[float]:
    """The σ of `sigmas` that a J* table on `grid` cannot give (`JStarX0.at`): not > 0, or beyond the
    grid's ends by more than SIGMA_RTOL."""
    lo, hi = float(np.min(grid)), float(np.max(grid))
    return [float(s) for s in sigmas if not (s > 0 and lo * (1 - SIGMA_RTOL) <= s <= hi * (1 + SIGMA_RTOL))]


def _grid_row(s: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(n,) the row k that each σ of `s` (n,) reads on the ascending `grid` (K,): the nearest grid point
    when within SIGMA_RTOL of it (the same grid point) or beyond that end of the grid; else -1."""
    k = torch.searchsorted(grid, s).clamp(max=len(grid) - 1)  # grid[k-1] < σ <= grid[k]
    k = torch.where((k > 0) & ((s - grid[k - 1]).abs() < (grid[k] - s).abs()), k - 1, k)  # the nearest
    near = (s - grid[k]).abs() <= SIGMA_RTOL * grid[k]
    beyond = ((k == 0) & (s < grid[0])) | ((k == len(grid) - 1) & (s > grid[-1]))
    return torch.where(near | beyond, k, -1)


@dataclass(frozen=True, eq=False)
class JStarX0:
    """A J* table in x0 units, sorted by σ: what training, fits, dashboards and diagnosis read.

    j_star is clipped at 0 (a float round-off below 0 at tiny σ); ci_low..ci_high is the 95 % interval
    with the estimator's bias allowance.
    """

    sigma: np.ndarray
    j_star: np.ndarray
    stderr: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    total_variance: float
    sigma_star: float | None
    fingerprint: str  # the data set the table was estimated on ("" when not recorded)
    estimator: str
    latents: str  # "mean" | "posterior" for EDM2 latents: which data the floor is of; "" for other data
    class_conditional: bool  # J* = Σ_c π_c J*_c, the floor of a model that sees the class labels
    source: str
    labels_fingerprint: str = ""  # a class-conditional table's: the labels its classes came from

    def at(self, sigma, *, outside: str = "error", columns: tuple[str, ...] = ("j_star", "ci_low", "ci_high")):
        """The table's `columns` (x0 units) at σ: a tuple of floats for a number, of arrays for an array,
        of tensors (σ's device and dtype) for a tensor.

        A σ within SIGMA_RTOL of a grid point σ_k reads row k; between grid points every column is linear
        in ln σ:  v(σ) = v_k + (ln σ - ln σ_k) / (ln σ_{k+1} - ln σ_k) · (v_{k+1} - v_k).
        Beyond the grid (`outside_grid`) the rule is named: "error" refuses (InputError naming the table,
        the σ and the grid), "clamp" reads the end row (training samples σ beyond any grid).
        """
        if outside not in OUTSIDE:
            raise ValueError(f"outside: expected one of {', '.join(OUTSIDE)}, got {outside!r}")
        is_tensor = isinstance(sigma, torch.Tensor)
        s = sigma.to(torch.float64) if is_tensor else torch.as_tensor(np.asarray(sigma, dtype=np.float64))
        if outside == "error":
            bad = outside_grid(s.flatten().cpu().numpy(), self.sigma)
            if bad:
                raise InputError(f"J* table {self.source}: σ = {bad[0]:g} is outside its grid "
                                 f"[{self.sigma[0]:g}, {self.sigma[-1]:g}]")
        n = s.flatten()
        grid = torch.as_tensor(np.stack([self.sigma, np.log(self.sigma)]), dtype=torch.float64, device=s.device)
        fp = torch.as_tensor(np.stack([getattr(self, c) for c in columns]), dtype=torch.float64, device=s.device)
        row = _grid_row(n, grid[0])
        v = fp[:, row.clamp(min=0)]  # (columns, n): the row's values where σ reads a row
        if len(self.sigma) > 1:
            x, xp, K = torch.log(n), grid[1], len(self.sigma)
            i = torch.searchsorted(xp, x, right=True).clamp(1, K - 1)  # xp[i-1] <= x < xp[i] inside the grid
            f = ((x - xp[i - 1]) / (xp[i] - xp[i - 1])).clamp(0, 1)
            v = torch.where(row >= 0, v, fp[:, i - 1] + f * (fp[:, i] - fp[:, i - 1]))
        values = [c.view(s.shape) for c in v]
        if is_tensor:
            return tuple(c.to(sigma.dtype) for c in values)
        if s.ndim == 0:
            return tuple(float(c) for c in values)
        return tuple(c.numpy() for c in values)

    def check_data(self, fingerprint: str | None = None, latents: str | None = None, conditional: bool | None = None,
                   *, labels: str | None = None, table: str, data: str) -> None:
        """Refuse a table that is not the floor of the data a model sees: InputError, one line naming
        `table` (e.g. "--j-star J.parquet") and `data` (the data it is checked against, e.g. "--data SRC").
        What is None is not checked.

        fingerprint: the data's; not checked when either side is "" (not recorded).
        latents: how the model reads EDM2 latents, "mean" | "posterior": a floor of the posterior is not
          one of the means, nor the reverse (a table of other data, latents "", counts as the means).
        conditional: whether the model sees class labels; the floor must be the matching one. A
          class-conditional floor Σ_c π_c J*_c lies below what a model without labels can reach, and a
          conditional model goes below an unconditional floor (by up to the between-class variance at large
          σ: negative gaps): both refused.
        labels: the fingerprint of the data's label vector (`lossfloor.data.fingerprint.labels_fingerprint`),
          checked against a class-conditional table's when both are known.
        """
        if latents is not None and (self.latents == "posterior") != (latents == "posterior"):
            raise InputError(f"{table}: estimated with latents={self.latents or 'mean'}, but {data} is read with "
                             f"latents={latents}: the floor must be of the data the model sees (estimate with "
                             f"--latents {latents})")
        if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            raise InputError(f"{table}: estimated on data with fingerprint {self.fingerprint[:16]}..., but {data} "
                             f"has {fingerprint[:16]}...; estimate J* on the same data")
        if conditional is False and self.class_conditional:
            raise InputError(f"{table}: a class-conditional floor (J* = Σ_c π_c J*_c), but the model has no class "
                             "labels and cannot reach it: use the unconditional floor (`lossfloor estimate` without "
                             "--conditional)")
        if conditional and not self.class_conditional:
            raise InputError(f"{table}: the unconditional floor, but the model is class-conditional and goes below it "
                             "(by up to the between-class variance at large σ): use the class-conditional floor "
                             "(`lossfloor estimate --conditional`)")
        if labels and self.class_conditional and self.labels_fingerprint and labels != self.labels_fingerprint:
            raise InputError(f"{table}: a class-conditional floor of labels with fingerprint "
                             f"{self.labels_fingerprint[:16]}..., but {data} has labels {labels[:16]}...; estimate "
                             "J* with the same labels")


@dataclass(frozen=True)
class JStarTable:
    table: pa.Table
    source: str = "<table>"

    @property
    def sigma_star(self) -> float | None:
        return self._meta_number(b"sigma_star")

    def _meta_number(self, key: bytes) -> float | None:
        meta = self.table.schema.metadata or {}
        v = json.loads(meta.get(key, b"null"))
        return None if v is None else float(v)

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()

    def rows(self) -> list[dict]:
        return self.table.to_pylist()

    def x0(self) -> JStarX0:
        """The table in x0 units with its interval; converted from the target columns if the x0 columns
        are missing, refused if it has no interval and its estimator is biased, or numbers that cannot be
        trusted (`_check_rows`)."""
        names = self.table.column_names
        if self.table.num_rows == 0:
            raise InputError(f"J* table {self.source}: has no rows (no σ): estimate J* on a grid with "
                             "`lossfloor estimate --sigma-grid 0.002:80:32`")
        sigma = self.column("sigma").astype(np.float64)
        bad = np.nonzero(~(np.isfinite(sigma) & (sigma > 0)))[0]
        if len(bad):
            raise InputError(f"J* table {self.source}: row {bad[0]}: sigma must be finite and > 0, got {sigma[bad[0]]}")
        if "target" not in names:
            raise InputError(f"J* table {self.source}: no 'target' column: its units are unknown (write it with "
                             "`lossfloor estimate`)")
        targets = set(self.table.column("target").to_pylist())
        if len(targets) != 1:
            raise InputError(f"J* table {self.source}: expected one target, found {sorted(map(str, targets))}")
        target = check_target(targets.pop(), field=f"J* table {self.source}: target")
        factor = np.asarray(convert_jstar(np.ones_like(sigma), sigma, target), dtype=np.float64)

        read: dict[str, str] = {}  # the column each x0 value is read from, for messages

        def x0_column(name: str) -> np.ndarray | None:
            for column, scale in ((f"{name}_x0", 1.0), (name, factor)):
                if column in names:
                    read[name] = column
                    return self.column(column).astype(np.float64) / scale
            return None

        j, se = x0_column("j_star"), x0_column("stderr")
        lo, hi = x0_column("ci_low"), x0_column("ci_high")
        estimators = set(self.table.column("estimator").to_pylist()) if "estimator" in names else {"unknown"}
        if lo is None or hi is None:
            if estimators != {"exact"}:
                raise InputError(
                    f"J* table {self.source}: no ci_low/ci_high columns (written by an older lossfloor) and its "
                    f"{'/'.join(sorted(estimators))} J* has no bias allowance: re-run `lossfloor estimate`")
            # exact: unbiased, the interval is its standard error
            lo, hi = np.maximum(j - 1.96 * se, 0.0), j + 1.96 * se
            read.update(ci_low="j_star - 1.96 stderr", ci_high="j_star + 1.96 stderr")
        tv_column = (self.column("total_variance").astype(np.float64) if "total_variance" in names
                     else np.full(len(j), np.max(j)))
        _check_rows(self.source, sigma, {read[k]: v for k, v in
                                         (("j_star", j), ("stderr", se), ("ci_low", lo), ("ci_high", hi))},
                    tv_column)
        order = np.argsort(sigma)
        tv = float(tv_column[0])
        fp = str(self.table.column("dataset_fingerprint")[0]) if "dataset_fingerprint" in names else ""
        latents = str(self.table.column("latents")[0]) if "latents" in names else ""
        meta = self.table.schema.metadata or {}
        conditional = meta.get(b"class_conditional", b"false").strip().lower() == b"true"
        labels_fp = meta.get(b"labels_fingerprint", b"").decode("utf-8", "replace") if conditional else ""
        return JStarX0(
            sigma=sigma[order], j_star=np.maximum(j[order], 0.0), stderr=se[order],
            ci_low=np.maximum(lo[order], 0.0), ci_high=hi[order], total_variance=tv,
            sigma_star=self.sigma_star, fingerprint=fp, estimator="/".join(sorted(estimators)), latents=latents,
            class_conditional=conditional, source=self.source, labels_fingerprint=labels_fp,
        )


def _check_rows(source: str, sigma: np.ndarray, values: dict[str, np.ndarray], total_variance: np.ndarray) -> None:
    """Refuse a J* table whose numbers cannot be trusted: InputError naming the table and its first bad row.

    values: j_star, stderr, ci_low, ci_high in x0 units, keyed by the column each was read from. Every value
    and total_variance must be finite and >= 0, ci_low <= ci_high, and J* within [ci_low, ci_high] — each
    up to float64 round-off of the table's largest value. J* >= 0 by definition, but an unbiased estimate
    of a J* near 0 (small σ) can come out a hair below it: within 4 standard errors that reads as 0.
    """
    (nj, j), (ns, se), (nl, lo), (nh, hi) = values.items()
    nt = "total_variance"
    finite = np.concatenate([v[np.isfinite(v)] for v in (j, se, lo, hi, total_variance)])
    tol = 1e-12 * (np.abs(finite).max() if len(finite) else 0.0)

    def refuse(bad: np.ndarray, what) -> None:
        rows = np.nonzero(bad)[0]
        if len(rows):
            i = int(rows[0])
            raise InputError(f"J* table {source}: row {i} (sigma={sigma[i]:g}): {what(i)}; re-run `lossfloor estimate`")

    def not_number(name: str, v: np.ndarray, floor: np.ndarray | float) -> None:
        refuse(~np.isfinite(v) | (v < floor), lambda i: f"column '{name}' must be finite and >= 0, got {v[i]:g}")

    not_number(nj, j, -(4 * se + tol))
    for name, v in ((ns, se), (nl, lo), (nh, hi), (nt, total_variance)):
        not_number(name, v, -tol)
    refuse(lo > hi + tol, lambda i: f"{nl} = {lo[i]:g} is above {nh} = {hi[i]:g}")
    jc = np.maximum(j, 0.0)
    refuse((jc < lo - tol) | (jc > hi + tol),
           lambda i: f"{nj} = {j[i]:g} lies outside its interval [{lo[i]:g}, {hi[i]:g}]")


def build_table(
    est: Estimate, *, target: str = "x0", fingerprint: str = "", threshold: float = SIGMA_STAR_THRESHOLD,
    latents: str = "",
) -> JStarTable:
    """Turn an estimate into the J* table, converting J* and its uncertainty to `target` units (`lossfloor.diffusion.targets`).

    An estimate with a NaN or infinite value is refused (InputError naming the σ and the estimator): such
    a table is never written."""
    target = check_target(target)
    cfg = est.config
    n = len(est.sigmas)
    for name in ("total_variance", *VALUE_COLUMNS):
        v = np.atleast_1d(np.asarray(getattr(est, name), dtype=np.float64))
        bad = np.nonzero(~np.isfinite(v))[0]
        if len(bad):
            where = "J*(inf)" if name == "total_variance" else f"sigma = {est.sigmas[bad[0]]:g}"
            raise InputError(f"J* estimate: {name} = {v[bad[0]]} at {where}, from the {cfg.estimator} estimator on "
                             "this data: a number that cannot be trusted, no table written")
    factor = np.asarray(convert_jstar(np.ones(n), est.sigmas, target), dtype=np.float64)
    values = {name: getattr(est, name) for name in VALUE_COLUMNS}
    cols = {"sigma": pa.array(est.sigmas, pa.float64())}
    cols.update({name: pa.array(v * factor, pa.float64()) for name, v in values.items()})
    cols.update({f"{name}_x0": pa.array(v, pa.float64()) for name, v in values.items()})
    cols.update({
        "estimator": pa.array([cfg.estimator] * n, pa.string()),
        "target": pa.array([target] * n, pa.string()),
        "latents": pa.array([latents] * n, pa.string()),
        "n_queries": pa.array(est.queries if est.queries is not None else [est.n_queries] * n, pa.int64()),
        "subset_size": pa.array(est.subset_size, pa.int64()),
        "queries_per_sample": pa.array([cfg.queries_per_sample] * n, pa.int64()),
        "seed": pa.array([cfg.seed] * n, pa.int64()),
        "c": pa.array([cfg.c] * n, pa.float64()),
        "total_variance": pa.array([est.total_variance] * n, pa.float64()),
        "dataset_fingerprint": pa.array([fingerprint] * n, pa.string()),
    })
    tv = est.total_variance
    point = sigma_star(est.sigmas, est.j_star, tv, threshold)
    low, high = sigma_star_bracket(est.sigmas, est.ci_low, est.ci_high, tv, threshold)
    meta = {
        "sigma_star": json.dumps(point),
        "sigma_star_low": json.dumps(low),
        "sigma_star_high": json.dumps(high),
        "sigma_star_threshold": json.dumps(threshold),
        "timings": json.dumps({k: round(float(v), 6) for k, v in est.timings.items()}),
    }
    if est.class_conditional:
        meta.update(class_conditional="true", labels_fingerprint=est.labels_fingerprint,
                    classes=json.dumps(list(est.classes)))
    return JStarTable(pa.table(cols).replace_schema_metadata(meta))


def write_table(t: JStarTable, path: str | os.PathLike) -> Path:
    """Write atomically: a temporary file in the same folder, renamed over `path` when complete."""
    path = make_parents(path)
    return write_atomic(path, lambda p: pq.write_table(t.table, p))


def read_table(path: str | os.PathLike) -> JStarTable:
    """Read a J* table, checking it has the documented columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"J* table {path}: file not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise InputError(f"J* table {path}: not a readable parquet file ({e.__class__.__name__})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"J* table {path}: missing columns {', '.join(missing)} (write it with `lossfloor estimate`)")
    return JStarTable(table, source=str(path))
