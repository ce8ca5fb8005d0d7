"""Diagnose a model against J*: one entry for the `diagnose` command (and scripts).

    d = diagnose(DiagnoseSpec(model="my-ddpm/", data="bundled:digits", sigmas=log_grid(0.01, 80, 16),
                              out="diag.parquet"))

Everything that can be wrong with the input is checked before any expensive work, in this order:
the output paths; the data; the J* table (same data by fingerprint, every σ inside its grid); the
model (its kind, its σ range, one forward pass on three samples at each σ: it runs, its shape, its labels,
finite values); only then is J* estimated (when no table is given: the default estimator, `auto`) and the
model evaluated. Nothing is written on an error (a model that fails or gives a NaN or inf loss during the
evaluation included: no table, no figure, no MLflow run); the table and the figure are written atomically,
then (with `mlflow`) logged.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lossfloor.devices import check_device
from lossfloor.errors import InputError
from lossfloor.floor import ESTIMATORS
from lossfloor.jobs.engine import LOCAL, Engine

log = logging.getLogger(__name__)

EXPERIMENT = "diagnose"
PROGRESS_SECONDS = 10.0


@dataclass(frozen=True, kw_only=True)
class DiagnoseSpec:
    """What to diagnose and where the results go (the `lossfloor diagnose` flags)."""

    model: str  # model SPEC (lossfloor.diagnose.models)
    data: str  # data source of the training samples (lossfloor.data.load)
    sigmas: np.ndarray  # the σ grid, ascending
    sigma_flag: str = "--sigma-grid"  # how errors name the grid (the CLI's flag)
    out: str  # FILE.parquet
    figure: str | None = None  # FILE.html; None: none
    j_star: str | None = None  # J* table of the same data; None: estimated with `estimator`
    estimator: str = "auto"  # estimator of an on-the-fly J*
    holdout: str | None = None  # held-out data source
    prediction: str | None = None  # TorchScript / torch.export: what forward returns
    process: str | None = None  # TorchScript / torch.export: the coordinates forward takes
    ema: str = "auto"  # lossfloor runs: which weights
    seed: int = 0  # samples and noise (common random numbers)
    n_samples: int | None = None  # evaluation samples, at most the data's (None: all; the CLI's default 4096)
    batch: int = 256
    device: str = "cpu"
    precision: str = "none"
    mlflow: bool = False
    experiment: str = EXPERIMENT
    run_name: str | None = None
    tracking_uri: str | None = None
    # local: this process; ray: σ x sample-batch blocks over `workers` Ray actors (all must fit the cluster
    # at once), on CUDA when they have GPUs
    engine: Engine = LOCAL


def check_outputs(spec: DiagnoseSpec) -> None:
    """--out FILE.parquet in an existing folder, --figure FILE.html likewise."""
    if not str(spec.out).endswith(".parquet"):
        raise InputError(f"--out: expected a FILE.parquet path, got {spec.out!r}")
    for flag, path in (("--out", spec.out), ("--figure", spec.figure)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise InputError(f"{flag}: folder {Path(path).parent} does not exist")
    if spec.figure is not None and Path(spec.figure).suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--figure: expected an .html file, got {spec.figure!r}")


def _load_data(src: str, flag: str):
    from lossfloor.data import load

    try:
        data = load(src)
    except InputError as e:
        raise InputError(f"{flag} {e}") from None
    if len(data.samples) < 2 or not np.isfinite(data.samples).all():
        raise InputError(f"{flag} {src}: expected at least 2 finite samples")
    return data


def _read_jstar(path: str, fingerprint: str, data: str):
    from lossfloor.floor import read_table

    x0 = read_table(path).x0()
    x0.check_data(fingerprint, table=f"--j-star {path}", data=f"--data {data}")
    return x0


def probe(model, samples, labels, sigmas, *, device) -> None:
    """One forward pass on three samples (an odd batch: a file exported for a fixed batch fails here) at
    each σ: a model that fails (its denoiser names --model, σ and the exception), returns another shape
    or a NaN or inf is refused before any expensive work."""
    x0 = torch.as_tensor(np.asarray(samples[:3], dtype=np.float32)).to(device)
    lab = None
    if model.label_dim:
        if labels is None:
            raise InputError(f"--model {model.spec}: class-conditional ({model.label_dim} classes) but --data "
                             "has no labels")
        top = int(np.max(labels))
        if top >= model.label_dim:
            raise InputError(f"--model {model.spec}: class-conditional with {model.label_dim} classes, but --data has "
                             f"label {top}")
        lab = torch.as_tensor(np.asarray(labels[:3])).to(device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
    for sigma in np.asarray(sigmas, dtype=np.float64):
        s = torch.full((len(x0),), float(sigma), device=device)
        with torch.no_grad():
            D = model.denoiser(x0 + s.view(-1, *[1] * (x0.ndim - 1)) * eps, s, lab)
        if tuple(D.shape) != tuple(x0.shape):
            raise InputError(f"--model {model.spec}: output of shape {tuple(D.shape[1:])}, but --data samples have "
                             f"shape {tuple(x0.shape[1:])}")
        if not torch.isfinite(D).all():
            raise InputError(f"--model {model.spec}: outputs NaN or inf at σ = {sigma:.4g}")


def _estimate_jstar(data, sigmas, spec: DiagnoseSpec, conditional: bool):
    """J* of the data on the σ grid: the class-conditional floor for a conditional model."""
    from lossfloor.floor import EstimatorConfig, build_table
    from lossfloor.jobs.estimate import estimate

    config = EstimatorConfig(estimator=spec.estimator, seed=spec.seed, device=spec.device)
    est = estimate(data.samples, sigmas, config, labels=data.labels if conditional else None,
                   fingerprint=data.fingerprint)
    table = build_table(est, fingerprint=data.fingerprint)
    x0 = table.x0()
    return x0, table


class _Progress:
    """A log line every PROGRESS_SECONDS with σ done, rate and ETA."""

    def __init__(self, total: int, name: str):
        self.total, self.name, self.t0, self.last = total, name, time.monotonic(), time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS or done == self.total:
            self.last = now
            rate = done / max(now - self.t0, 1e-9)
            log.info("diagnose %s: %d/%d sigma (%.0f%%), ETA %.0f s", self.name, done, self.total,
                     100 * done / self.total, (self.total - done) / max(rate, 1e-9))


def diagnose(spec: DiagnoseSpec):
    """Run the diagnosis (module docstring); returns the `lossfloor.diagnose.Diagnosis`."""
    from lossfloor.diagnose import load_model, measure, write_diagnosis
    from lossfloor.diagnose.measure import check_sigmas

    check_outputs(spec)
    log_diagnosis = None
    if spec.mlflow:  # before any work: a missing tracking layer is a setup error
        try:
            from lossfloor.tracking.diagnose import log_diagnosis
        except ImportError as e:
            raise InputError(f"--mlflow: MLflow tracking is not available ({e})") from None
    if spec.estimator not in ESTIMATORS:
        raise InputError(f"--estimator: expected one of {', '.join(ESTIMATORS)}, got {spec.estimator!r}")
    if spec.j_star is not None and spec.estimator != "auto":
        raise InputError(f"--estimator {spec.estimator}: only without --j-star (J* comes from the table)")
    if spec.n_samples is not None and spec.n_samples < 2:
        raise InputError(f"--n-samples: expected an integer >= 2, got {spec.n_samples}")
    if spec.batch < 1:
        raise InputError(f"--batch: expected an integer >= 1, got {spec.batch}")
    if spec.seed < 0:
        raise InputError(f"--seed: expected an integer >= 0, got {spec.seed}")
    if spec.precision == "fp16" and not spec.device.startswith("cuda") and spec.engine.device != "cuda":
        raise InputError("--precision: fp16 autocast needs a CUDA device (--device cuda); use bf16 or none on the CPU")
    check_device(spec.device)
    data = _load_data(spec.data, "--data")
    holdout = _load_data(spec.holdout, "--holdout") if spec.holdout is not None else None
    if holdout is not None and holdout.samples.shape[1:] != data.samples.shape[1:]:
        raise InputError(f"--holdout {spec.holdout}: samples of shape {holdout.samples.shape[1:]}, but --data has "
                         f"{data.samples.shape[1:]}")
    jstar = _read_jstar(spec.j_star, data.fingerprint, spec.data) if spec.j_star is not None else None
    check_sigmas(spec.sigmas, jstar, None)
    model = load_model(spec.model, prediction=spec.prediction, process=spec.process, ema=spec.ema,
                       device=spec.device, precision=spec.precision)
    check_sigmas(spec.sigmas, None, model, flag=spec.sigma_flag)
    probe(model, data.samples, data.labels, spec.sigmas, device=spec.device)
    if model.label_dim and holdout is not None and holdout.labels is None:
        raise InputError(f"--holdout {spec.holdout}: --model {model.spec} is class-conditional ({model.label_dim} "
                         "classes) but the held-out data have no labels")
    if jstar is not None:  # the floor of the model's kind: class-conditional (with the data's labels) or not
        from lossfloor.data import labels_fingerprint

        labels = labels_fingerprint(data.labels) if data.labels is not None and model.label_dim else None
        jstar.check_data(conditional=bool(model.label_dim), labels=labels, table=f"--j-star {spec.j_star}",
                         data=f"--data {spec.data}")

    t0 = time.monotonic()
    if jstar is None:
        log.info("diagnose: no --j-star: estimating J* of %s (%d samples, estimator %s%s)", spec.data,
                 len(data.samples), spec.estimator, ", class-conditional" if model.label_dim else "")
        jstar, _ = _estimate_jstar(data, spec.sigmas, spec, conditional=bool(model.label_dim))
    t_jstar = time.monotonic() - t0
    seed = spec.seed
    passes = 2 if holdout is not None else 1
    run = functools.partial(
        measure, model, data.samples, data.labels, spec.sigmas, jstar=jstar, fingerprint=data.fingerprint,
        seed=seed, n_samples=spec.n_samples, batch=spec.batch, device=spec.device,
        holdout=None if holdout is None else (holdout.samples, holdout.labels, holdout.fingerprint),
        progress=_Progress(passes * len(spec.sigmas), model.name))
    if spec.engine.kind == "local":
        d = run()
    else:
        from lossfloor.ray.cluster import ray_session  # Ray only here
        from lossfloor.ray.diagnose import RayLosses

        load = {"spec": spec.model, "prediction": spec.prediction, "process": spec.process, "ema": spec.ema,
                "precision": spec.precision}
        with ray_session(spec.engine.address):
            d = run(losses=RayLosses(load, spec.engine))
    t_eval = time.monotonic() - t0 - t_jstar
    log.info("diagnose %s: %.3g s for J*, %.3g s for the evaluation", model.name, t_jstar, t_eval)
    write_diagnosis(d, spec.out)
    page = None
    if spec.figure is not None or log_diagnosis is not None:
        from lossfloor.pages.diagnose import diagnose_figure
        from lossfloor.pages.html import figure_page

        page = figure_page(diagnose_figure({model.name: d}, title=f"Loss gap of {model.name} on {spec.data}"))
    if spec.figure is not None:
        from lossfloor.pages.html import write_page

        write_page(page, spec.figure)
    if log_diagnosis is not None:
        params = {"model": spec.model, "model_kind": model.kind, "data": spec.data, "j_star": spec.j_star,
                  "estimator": spec.estimator if spec.j_star is None else None, "holdout": spec.holdout,
                  "prediction": model.prediction, "process": model.process, "seed": seed,
                  "n_samples": int(d.column("n_samples")[0]), "device": spec.device, "precision": spec.precision,
                  "ema": spec.ema if model.kind == "lossfloor" else None, "dataset_fingerprint": data.fingerprint}
        run_id = log_diagnosis(d, page, params={k: v for k, v in params.items() if v is not None},
                               experiment=spec.experiment, run_name=spec.run_name or model.name,
                               tracking_uri=spec.tracking_uri)
        log.info("logged MLflow run %s (experiment %s)", run_id, spec.experiment)
    return d


def default_figure(out: str | os.PathLike) -> str:
    """The figure beside the table: diag.parquet -> diag.html."""
    return str(Path(out).with_suffix(".html"))


__all__ = ["EXPERIMENT", "DiagnoseSpec", "check_outputs", "default_figure", "diagnose", "probe"]
