"""The loss gap J(σ) − J*(σ) of a model, per σ and in total (paper §3's diagnosis, in x0 units).

    d = measure(model, data.samples, data.labels, sigmas, jstar=table.x0(), fingerprint=data.fingerprint)
    write_diagnosis(d, "diag.parquet"); print(format_diagnosis(d))

J(σ_k) = mean over the evaluation samples of ||D(x0 + σ_k ε; σ_k) − x0||², measured by
`lossfloor.train.evaluation.evaluate` (the training loop's own evaluation): common random numbers, the
noise of grid point k seeded by (seed, k), sample i always its row i, so two models diagnosed with the
same seed, samples and grid see the same draws. The samples are the training loop's evaluation subset
for that seed (`split_indices`): the first n of a permutation seeded by seed.

The diagnosis table (one row per σ, parquet):
  sigma                                  float64
  loss_x0, loss_stderr                   J(σ) in x0 units and its standard error over the samples
  j_star_x0, j_star_stderr,              J*(σ) in x0 units, its Monte-Carlo standard error and its 95 %
    j_star_ci_low, j_star_ci_high        interval (bias allowance included), from the J* table
  gap_x0, gap_stderr, rel_gap            J − J*, sqrt(loss_stderr² + j_star_stderr²), (J − J*) / J (NaN
                                         where J is round-off, below 1e-12 J*(∞))
  weight_reference, weight_own           c_k = π_k w(σ_k) of the fixed reference weighting (the sweep
                                         objective's, `train.objectives.reference_weights`) and of the
                                         model's own training weighting (null when unknown): a total
                                         is Σ_k c_k q_k
  prediction, process, model, dataset_fingerprint   str
  seed, n_samples                        int64
  loss_holdout_x0, loss_holdout_stderr,  with held-out data: J on it, its standard error, and the
    generalisation_gap                   generalisation gap J_holdout − J
Schema metadata: `totals` (JSON: {"reference": {...}, "own": {...} or null}, each with loss, j_star,
gap, rel_gap), sigma_star, model_kind, model_spec, weighting_own, jstar_source, holdout_fingerprint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lossfloor.atomic import write_atomic
from lossfloor.diagnose.models import Model
from lossfloor.errors import InputError
from lossfloor.floor.table import JStarX0
from lossfloor.train.evaluation import evaluate, quadrature_weights
from lossfloor.train.loop import split_indices
from lossfloor.train.objectives import reference_weights
from lossfloor.train.schedules import JStarCurve

HOLDOUT_COLUMNS = ("loss_holdout_x0", "loss_holdout_stderr", "generalisation_gap")
ROUNDOFF = 1e-12  # a loss below ROUNDOFF x J*(inf) is round-off: its rel_gap is NaN
SIGMA_RTOL = 1e-3  # a σ this close to the end of a model's range counts as inside (timestep 0 is σ = 0.0100005)


@dataclass(frozen=True)
class Diagnosis:
    """A diagnosis table (module docstring) and its totals."""

    table: pa.Table

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy(zero_copy_only=False)

    def meta(self, key: str):
        return json.loads((self.table.schema.metadata or {}).get(key.encode(), b"null"))

    @property
    def totals(self) -> dict:
        return self.meta("totals")

    @property
    def sigma_star(self) -> float | None:
        return self.meta("sigma_star")

    def rows(self) -> list[dict]:
        return self.table.to_pylist()


def check_sigmas(sigmas, jstar: JStarX0 | None, model: Model | None, *, flag: str = "--sigma-grid") -> None:
    """Every σ inside the J* table's grid and the model's range (InputError naming the file or flag)."""
    if jstar is not None:
        jstar.at(np.asarray(sigmas, dtype=np.float64))  # InputError naming the table
    for s in np.asarray(sigmas, dtype=np.float64):
        if model is not None and model.sigma_range is not None:
            lo, hi = model.sigma_range
            if not lo * (1 - SIGMA_RTOL) <= s <= hi * (1 + SIGMA_RTOL):
                raise InputError(f"{flag}: σ = {s:g} is outside the range of --model {model.spec}: [{lo:.4g}, "
                                 f"{hi:.4g}] (its scheduler's timesteps)")


def evaluation_subset(n: int, n_samples: int | None, seed: int) -> np.ndarray:
    """Indices of the evaluation samples: the training loop's evaluation subset of size n_samples."""
    n_samples = n if n_samples is None else min(int(n_samples), n)
    return split_indices(n, n_samples, False, seed)[1]


def _weights(weighting, sigmas) -> np.ndarray:
    s = torch.as_tensor(sigmas)
    return quadrature_weights(sigmas, weighting.density) * weighting.weight(s).to(torch.float64).numpy()


def _total(coef, loss, j_star) -> dict:
    L, J = float(np.sum(coef * loss)), float(np.sum(coef * j_star))
    return {"loss": L, "j_star": J, "gap": L - J, "rel_gap": (L - J) / L if L > 0 else None}


def local_losses(model: Model, x0: torch.Tensor, labels, sigmas, *, seed: int, batch: int, device,
                 progress: Callable[[int], None] | None = None, grid_index=None) -> tuple[np.ndarray, np.ndarray]:
    """(J_k, its stderr) of `model` on the samples x0 at each σ_k, here: the training loop's `evaluate`.
    A Ray engine (`lossfloor.ray.diagnose`) has the same signature and gives the same numbers."""
    def one(sigma):
        return torch.ones_like(sigma)

    res = evaluate(model.denoiser, x0, labels, sigmas, seed=seed, weight=one, reference_density=one, batch=batch,
                   device=device, progress=progress, grid_index=grid_index)
    return res.loss, res.stderr


def _run(model: Model, samples, labels, sigmas, *, seed, n_samples, batch, device, progress, losses, flag) -> tuple[
        np.ndarray, np.ndarray, int]:
    idx = torch.from_numpy(evaluation_subset(len(samples), n_samples, seed))
    x0 = torch.as_tensor(np.asarray(samples, dtype=np.float32))[idx]
    lab = None if labels is None or not model.label_dim else torch.as_tensor(np.asarray(labels))[idx]
    loss, stderr = losses(model, x0, lab, sigmas, seed=seed, batch=batch, device=device, progress=progress)
    bad = ~(np.isfinite(loss) & np.isfinite(stderr))
    if bad.any():  # a number that cannot be trusted is never written
        k = int(np.argmax(bad))
        raise InputError(f"--model {model.spec}: outputs NaN or inf at σ = {sigmas[k]:.4g} on {flag} samples (loss "
                         f"{loss[k]:g}, stderr {stderr[k]:g}; or outputs too large for float32)")
    return loss, stderr, len(idx)


def measure(model: Model, samples, labels, sigmas, *, jstar: JStarX0, fingerprint: str, seed: int = 0,
            n_samples: int | None = None, holdout=None, batch: int = 256, device="cpu",
            progress: Callable[[int], None] | None = None, losses=local_losses) -> Diagnosis:
    """The diagnosis of `model` on `samples` (N, ...) at `sigmas` against `jstar` (module docstring).

    holdout: (samples, labels, fingerprint) of held-out data, evaluated the same way; progress: called
    with the number of σ done (over both passes with holdout); losses: the engine (`local_losses`).
    A NaN or inf loss (the model's output) is an InputError naming --model and the σ.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    check_sigmas(sigmas, jstar, model)
    K = len(sigmas)
    loss, stderr, n = _run(model, samples, labels, sigmas, seed=seed, n_samples=n_samples, batch=batch,
                           device=device, losses=losses, flag="--data",
                           progress=None if progress is None else (lambda k: progress(k + 1)))
    j_star, lo, hi, j_se = jstar.at(sigmas, columns=("j_star", "ci_low", "ci_high", "stderr"))
    gap = loss - j_star
    seen = loss > ROUNDOFF * jstar.total_variance  # below: float round-off of an exact model, no relative gap
    ref = reference_weights(JStarCurve(jstar), sigmas)
    own = None if model.weighting is None else _weights(model.weighting, sigmas)
    cols = {
        "sigma": pa.array(sigmas, pa.float64()),
        "loss_x0": pa.array(loss, pa.float64()),
        "loss_stderr": pa.array(stderr, pa.float64()),
        "j_star_x0": pa.array(j_star, pa.float64()),
        "j_star_stderr": pa.array(j_se, pa.float64()),
        "j_star_ci_low": pa.array(lo, pa.float64()),
        "j_star_ci_high": pa.array(hi, pa.float64()),
        "gap_x0": pa.array(gap, pa.float64()),
        "gap_stderr": pa.array(np.sqrt(stderr**2 + j_se**2), pa.float64()),
        "rel_gap": pa.array(np.where(seen, gap / np.where(seen, loss, 1), np.nan), pa.float64()),
        "weight_reference": pa.array(ref, pa.float64()),
        "weight_own": pa.array([None] * K if own is None else own, pa.float64()),
        "prediction": pa.array([model.prediction] * K, pa.string()),
        "process": pa.array([model.process] * K, pa.string()),
        "model": pa.array([model.name] * K, pa.string()),
        "dataset_fingerprint": pa.array([fingerprint] * K, pa.string()),
        "seed": pa.array([seed] * K, pa.int64()),
        "n_samples": pa.array([n] * K, pa.int64()),
    }
    meta = {"model_kind": model.kind, "model_spec": model.spec, "jstar_source": jstar.source,
            "weighting_own": None if model.weighting is None else model.weighting.name,
            "sigma_star": jstar.sigma_star, "holdout_fingerprint": None}
    totals = {"reference": _total(ref, loss, j_star), "own": None if own is None else _total(own, loss, j_star)}
    if holdout is not None:
        h_samples, h_labels, h_fp = holdout
        h_loss, h_stderr, _ = _run(model, h_samples, h_labels, sigmas, seed=seed, n_samples=n_samples, batch=batch,
                                   device=device, losses=losses, flag="--holdout",
                                   progress=None if progress is None else (lambda k: progress(K + k + 1)))
        cols["loss_holdout_x0"] = pa.array(h_loss, pa.float64())
        cols["loss_holdout_stderr"] = pa.array(h_stderr, pa.float64())
        cols["generalisation_gap"] = pa.array(h_loss - loss, pa.float64())
        meta["holdout_fingerprint"] = h_fp
        totals["holdout_reference"] = _total(ref, h_loss, j_star)
    meta["totals"] = totals
    table = pa.table(cols).replace_schema_metadata({k: json.dumps(v) for k, v in meta.items()})
    return Diagnosis(table)


def write_diagnosis(d: Diagnosis, path: str | os.PathLike) -> Path:
    """Write the table atomically (a temporary name in the same folder, then renamed)."""
    return write_atomic(Path(path), lambda p: pq.write_table(d.table, p))


def read_diagnosis(path: str | os.PathLike) -> Diagnosis:
    """A diagnosis table back from parquet (InputError naming the file if it is not one)."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for missing or corrupt files
        raise InputError(f"diagnosis {path}: not a readable parquet file ({e.__class__.__name__})") from None
    if not {"sigma", "loss_x0", "j_star_x0", "gap_x0"} <= set(table.column_names):
        raise InputError(f"diagnosis {path}: not a diagnosis table (write it with `lossfloor diagnose`)")
    return Diagnosis(table)


def _g(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def format_diagnosis(d: Diagnosis) -> str:
    """The table as text (x0 units) and the totals."""
    holdout = "loss_holdout_x0" in d.table.column_names
    head = (f"{'sigma':>10} {'loss_x0':>11} {'stderr':>9} {'j_star_x0':>11} {'ci_low':>10} {'ci_high':>10} "
            f"{'gap_x0':>11} {'rel_gap':>8}" + (f" {'holdout':>11} {'gen_gap':>10}" if holdout else ""))
    lines = [head]
    for r in d.rows():
        line = (f"{r['sigma']:>10.4g} {r['loss_x0']:>11.5g} {r['loss_stderr']:>9.2g} {r['j_star_x0']:>11.5g} "
                f"{r['j_star_ci_low']:>10.4g} {r['j_star_ci_high']:>10.4g} {r['gap_x0']:>+11.4g} "
                f"{_g(r['rel_gap']):>8}")
        if holdout:
            line += f" {r['loss_holdout_x0']:>11.5g} {r['generalisation_gap']:>+10.3g}"
        lines.append(line)
    r0 = d.rows()[0]
    lines.append(f"model={r0['model']} ({d.meta('model_kind')}, predicts {r0['prediction']} in {r0['process']} "
                 f"coordinates) samples={r0['n_samples']} seed={r0['seed']} sigma*={_g(d.sigma_star)}")
    for key, what in (("reference", "reference weighting (min(1/J*, w_max), uniform ln σ)"),
                      ("own", f"own weighting ({d.meta('weighting_own')})")):
        t = d.totals.get(key)
        if t is not None:
            lines.append(f"total, {what}: loss {_g(t['loss'])}, J* {_g(t['j_star'])}, gap {_g(t['gap'])}, "
                         f"rel gap {_g(t['rel_gap'])}")
    if d.totals.get("own") is None:
        lines.append("total, own weighting: unknown for this model")
    return "\n".join(lines)


__all__ = ["HOLDOUT_COLUMNS", "Diagnosis", "check_sigmas", "evaluation_subset", "format_diagnosis",
           "local_losses", "measure", "read_diagnosis", "write_diagnosis"]
