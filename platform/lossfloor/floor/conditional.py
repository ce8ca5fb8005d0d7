"""The class-conditional floor of labelled data: J*_cond(σ) = Σ_c π_c J*_c(σ).

    est = estimate_conditional(samples, labels, sigmas, EstimatorConfig())     # resumable with work_dir
    table = build_table(est, fingerprint=dataset.fingerprint)                  # class_conditional = true

A model that is given the class c of x0 can reach at best E[Var(x0 | x_σ, c)]: the optimal loss (paper
Theorem 1) of class c's samples alone, J*_c(σ), averaged over the classes with their frequencies
π_c = N_c / N:

    J*_cond(σ) = Σ_c π_c J*_c(σ)  ≤  J*(σ)      (knowing the class cannot raise the posterior variance)
    J*_cond(∞) = Σ_c π_c Var_c                  (the within-class variance; J*(∞) - J*_cond(∞) is the
                                                 between-class variance, the two floors' gap at large σ)

Each J*_c is estimated over its own samples with the same estimator (`classes`: one pass over every
class's batches, numbered class after class, so one work folder holds them all). Per σ the classes'
estimates combine as (classes independent: their batches' randomness is)

    J = Σ π_c J_c,   stderr = √(Σ π_c² se_c²),   bias = Σ π_c b_c,   allowance = Σ π_c a_c,

the allowances (a bound each) adding linearly, the standard errors in quadrature with Welch–Satterthwaite
degrees of freedom (Σ v_c)² / Σ (v_c² / dof_c), v_c = π_c² se_c², into the interval of
`uncertainty.interval` — the one the unconditional estimate uses.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from lossfloor.data.fingerprint import labels_fingerprint
from lossfloor.errors import InputError
from lossfloor.floor.batch import data_scale, divided, prepare_data
from lossfloor.floor.classes import (
    ClassPlan,
    class_mean_squares,
    class_plan,
    class_runner,
    class_total_variances,
)
from lossfloor.floor.config import EstimatorConfig
from lossfloor.floor.estimate import (
    BatchHook,
    BatchRunner,
    Estimate,
    check_sigmas,
    reduce_estimate,
    rescaled,
    run_pass,
)
from lossfloor.floor.resume import PartialStore, data_fingerprint, default_work_dir, work_key
from lossfloor.floor.uncertainty import interval, t_quantile


def conditional_key(plan: ClassPlan, *, fingerprint: str, labels: str, sigmas, dim: int) -> dict:
    """The work folder's key: the largest class's `work_key` (config, data, σ grid), the labels'
    fingerprint and every class's size and resolved config."""
    key = work_key(plan.configs[plan.main], fingerprint=fingerprint, sigmas=sigmas, n_samples=plan.n_samples,
                   dim=dim)
    key["labels_fingerprint"] = labels
    key["classes"] = [[int(c), len(r), cfg.estimator, int(cfg.subset_size), float(cfg.c), int(cfg.rows_per_batch)]
                      for c, r, cfg in zip(plan.labels, plan.members, plan.configs)]
    return key


def combine(plan: ClassPlan, estimates: Sequence[Estimate]) -> Estimate:
    """Σ_c π_c of the classes' estimates, with the combined interval (module docstring). The config, L and
    timings are the largest class's; `classes` lists every class's estimator and L."""
    w = plan.weights[:, None]  # (K, 1)
    col = {name: np.stack([getattr(e, name) for e in estimates]) for name in ("j_star", "stderr", "bias", "allowance")}
    tv = float(plan.weights @ np.array([e.total_variance for e in estimates]))
    v = (w * col["stderr"]) ** 2  # (K, S)
    dof_c = np.stack([np.broadcast_to(np.asarray(e.dof, dtype=np.float64), v.shape[1]) for e in estimates])
    spread = (v * v / dof_c).sum(0)
    dof = np.where(spread > 0, v.sum(0) ** 2 / np.where(spread > 0, spread, 1.0), dof_c.sum(0))
    allowance = (w * col["allowance"]).sum(0)
    se = np.sqrt(v.sum(0))
    u = interval((w * col["j_star"]).sum(0), (w * col["bias"]).sum(0), allowance, allowance, se, t_quantile(dof), tv)
    classes = tuple({"label": int(c), "n": len(r), "estimator": e.config.estimator,
                     "subset_size": int(e.config.subset_size)} for c, r, e in zip(plan.labels, plan.members, estimates))
    return replace(estimates[plan.main], j_star=u.j_star, stderr=se, bias=u.bias, ci_low=u.ci_low, ci_high=u.ci_high,
                   allowance=allowance, total_variance=tv, n_queries=sum(e.n_queries for e in estimates),
                   queries=np.sum([np.broadcast_to(e.n_queries if e.queries is None else e.queries, len(e.sigmas))
                                   for e in estimates], axis=0),
                   n_batches=plan.n_batches, dof=np.maximum(np.floor(dof), 1).astype(np.int64), classes=classes)


def conditional_passes(
    plan: ClassPlan,
    dim: int,
    sigmas: np.ndarray,
    runner: BatchRunner,
    *,
    tvs: np.ndarray,
    mean_as: np.ndarray | None = None,
    fingerprint: str,
    labels: str,
    work_dir: str | os.PathLike | None = None,
    work_parent: str | os.PathLike | None = None,
    progress: bool = True,
    on_batch: BatchHook | None = None,
) -> Estimate:
    """The engine-independent part of a class-conditional estimate: one pass over every class's batches
    (those in the work folder reused, `estimate.run_pass`), each class reduced with its own config,
    J*_c(∞) = tvs[k] and E_c||x0||² = mean_as[k], then combined. labels: the label vector's fingerprint. Work folder: work_dir, or one
    named by the key's hash under work_parent, or none."""
    t0 = time.monotonic()
    key = conditional_key(plan, fingerprint=fingerprint, labels=labels, sigmas=sigmas, dim=dim)
    if work_dir is None and work_parent is not None:
        work_dir = default_work_dir(work_parent, key)
    store_cm = contextlib.nullcontext(None) if work_dir is None else PartialStore(Path(work_dir), key)
    with store_cm as store:
        partials, stats = run_pass(runner, plan.configs[plan.main], sigmas, plan, store=store, progress=progress,
                                   on_batch=on_batch)
    mean_as = [None] * len(tvs) if mean_as is None else mean_as
    per_class = [reduce_estimate(partials[p.first_batch:p.first_batch + p.n_batches], sigmas, cfg, tv, mean_a)
                 for p, cfg, tv, mean_a in zip(plan.plans, plan.configs, tvs, mean_as)]
    timings = getattr(runner, "timings", dict)()
    timings["total_s"] = time.monotonic() - t0
    return replace(combine(plan, per_class), timings=timings, passes=(stats,), labels_fingerprint=labels)


def estimate_conditional(
    samples,
    labels,
    sigmas,
    config: EstimatorConfig | None = None,
    *,
    fingerprint: str | None = None,
    work_dir: str | os.PathLike | None = None,
    work_parent: str | os.PathLike | None = None,
    progress: bool = True,
    on_batch: BatchHook | None = None,
) -> Estimate:
    """J*_cond(σ) of samples (N, ...) with (N,) integer class labels, on this process: as
    `lossfloor.floor.estimate.estimate` (data scale, work folder, fingerprint), per class."""
    config = config or EstimatorConfig()
    sigmas = check_sigmas(sigmas)
    scale = data_scale(samples)
    x = prepare_data(divided(samples, scale), replace(config, device="cpu"))
    labels = np.asarray(labels)
    if labels.shape != (x.shape[0],):
        raise InputError(f"labels: expected one label per sample, shape ({x.shape[0]},), got shape {labels.shape}")
    if fingerprint is None:
        fingerprint = data_fingerprint(x) if work_dir is not None or work_parent is not None else ""
    plan = class_plan(labels, config, x.shape[1])
    est = conditional_passes(plan, x.shape[1], sigmas / scale, class_runner(x, plan),
                             tvs=class_total_variances(x, plan, config),
                             mean_as=class_mean_squares(x, plan, config), fingerprint=fingerprint,
                             labels=labels_fingerprint(labels), work_dir=work_dir, work_parent=work_parent,
                             progress=progress, on_batch=on_batch)
    return rescaled(est, scale, sigmas)
