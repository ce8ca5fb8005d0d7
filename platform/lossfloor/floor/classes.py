"""The classes of labelled data as batches of one estimate: the plan and its computation on this process.

The class-conditional floor (`lossfloor.floor.conditional`) estimates each class's J*_c over its own N_c
samples with the same estimator and settings, resolved for N_c (`EstimatorConfig.resolve`: auto is exact
for N_c ≤ 50 000; an L of N_c or more is the exact estimator). The classes' batches are numbered one
after another (class k's first batch follows class k-1's last: `QueryPlan.first_batch`), and each class's
queries are keyed by its label (`QueryPlan.key`): their order, noise and draws come from (seed, label,
source within the class, round), independent between classes, whichever process computes them.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from lossfloor.errors import InputError
from lossfloor.floor.batch import (
    FloorData,
    batch_terms,
    data_mean_square,
    data_total_variance,
    floor_data,
    query_plan,
)
from lossfloor.floor.config import EstimatorConfig
from lossfloor.floor.queries import QueryPlan
from lossfloor.floor.stats import BatchPartial


@dataclass(frozen=True, eq=False)
class ClassPlan:
    """The batches of a class-conditional estimate: per class (ascending label) its samples' rows in the
    data, its config resolved for its N_c, and its `QueryPlan` numbered after the previous class's batches.
    Read by `estimate.run_pass` as a plan (n_batches, rows)."""

    labels: np.ndarray  # (K,) int64, ascending
    members: tuple[np.ndarray, ...]  # per class: its samples' rows in the data, ascending
    configs: tuple[EstimatorConfig, ...]  # per class, resolved
    plans: tuple[QueryPlan, ...]

    @property
    def n_batches(self) -> int:
        return self.plans[-1].first_batch + self.plans[-1].n_batches

    @property
    def n_samples(self) -> int:
        return sum(len(r) for r in self.members)

    @property
    def weights(self) -> np.ndarray:
        """π_c = N_c / N."""
        return np.array([len(r) for r in self.members], dtype=np.float64) / self.n_samples

    @property
    def main(self) -> int:
        """The largest class (the first of equal ones): its config stands for the estimate's in the table."""
        return int(np.argmax([len(r) for r in self.members]))

    def class_of(self, batch_index: int) -> int:
        """The class (its position in `labels`) whose batches hold `batch_index`."""
        return bisect.bisect_right([p.first_batch for p in self.plans], batch_index) - 1

    def queries(self, batch_index: int) -> range:
        """The batch's query numbers within its class (`QueryPlan.queries`)."""
        return self.plans[self.class_of(batch_index)].queries(batch_index)


def class_plan(labels, config: EstimatorConfig, dim: int,
               resolve: Callable[[EstimatorConfig, int], EstimatorConfig] | None = None) -> ClassPlan:
    """The ClassPlan of an (N,) integer label vector for an unresolved config; resolve(config, N_c) resolves
    it for one class (default `config.resolve(N_c, dim)`; the Ray engine's for its workers' device).
    InputError for labels that are not one integer per sample, a class of one sample, or automatic L."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels: expected one integer class label per sample, got {labels.dtype} of shape "
                         f"{labels.shape}")
    if config.rel_error is not None:
        raise InputError("--rel-error: a precision target is not supported for the class-conditional floor (each "
                         "class would need its own passes); give --subset-size and --queries-per-sample")
    if config.queries is not None:
        raise InputError("--queries: the class-conditional floor takes K·N_c queries per class "
                         "(--queries-per-sample K), not a total budget")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) == 0:
        raise InputError("labels: expected at least one class, got none")
    if (counts < 2).any():
        c = int(classes[np.argmax(counts < 2)])
        raise InputError(f"labels: class {c} has 1 sample; the class-conditional floor needs at least 2 per class "
                         "(each J*_c is estimated from its own samples)")
    order = np.argsort(labels, kind="stable")  # rows grouped by class, ascending within each
    members = tuple(np.split(order, np.cumsum(counts)[:-1]))
    configs, plans, first = [], [], 0
    for label, n_c in zip(classes.tolist(), (int(n) for n in counts)):
        c = config
        if c.subset_size is not None and c.subset_size > n_c:
            c = replace(c, subset_size=n_c)  # the whole class: its exact estimator
        c = resolve(c, n_c) if resolve is not None else c.resolve(n_c, dim)
        plan = replace(query_plan(c, n_c, key=class_key(label)), first_batch=first)
        configs.append(c)
        plans.append(plan)
        first += plan.n_batches
    return ClassPlan(labels=classes.astype(np.int64), members=members, configs=tuple(configs), plans=tuple(plans))


def class_key(label: int) -> int:
    """The query key of a class (`queries`): distinct for every label and from the unconditional floor's 0."""
    return 2 * label + 1 if label >= 0 else 2 * label


def class_total_variances(x: torch.Tensor, plan: ClassPlan, cfg: EstimatorConfig) -> np.ndarray:
    """Var_c = J*_c(∞) of every class of the prepared (N, D) samples (posterior latents: of its mixture)."""
    return np.array([data_total_variance(x.index_select(0, torch.as_tensor(r)), cfg) for r in plan.members])


def class_mean_squares(x: torch.Tensor, plan: ClassPlan, cfg: EstimatorConfig) -> np.ndarray:
    """E_c||x0||² of every class (`batch.data_mean_square`)."""
    return np.array([data_mean_square(x.index_select(0, torch.as_tensor(r)), cfg) for r in plan.members])


class ClassBatches:
    """Any batch of a ClassPlan over the prepared (N, D) samples `x`, on this process: the class's rows
    made into `FloorData` (knn: deduplicated and indexed) once per class in turn — batches arrive in class
    order — then `batch.batch_terms`."""

    def __init__(self, x: torch.Tensor, plan: ClassPlan):
        self.x, self.plan = x, plan
        self._class: int | None = None
        self._data: FloorData | None = None
        self.index_build_s = 0.0  # knn: every class made so far
        self._search_s = 0.0  # knn: the classes made before the current one

    def data(self, k: int) -> FloorData:
        """The FloorData of class k (made now unless it is the current class)."""
        if self._class != k:
            if self._data is not None:
                self._search_s += self._data.search_s
            rows = torch.as_tensor(self.plan.members[k]).to(self.x.device)
            self._data = floor_data(self.x.index_select(0, rows), self.plan.configs[k])
            self._class = k
            self.index_build_s += self._data.index_build_s
        return self._data

    @property
    def search_s(self) -> float:
        """knn: seconds spent searching, every class so far."""
        return self._search_s + (self._data.search_s if self._data is not None else 0.0)

    def terms(self, sigmas: np.ndarray, batch_index: int) -> BatchPartial:
        k = self.plan.class_of(batch_index)
        return batch_terms(self.data(k), sigmas, self.plan.configs[k], self.plan.plans[k], batch_index)


def class_runner(x: torch.Tensor, plan: ClassPlan):
    """The local engine of a class-conditional estimate (an `estimate.BatchRunner`): `ClassBatches` in
    batch order on this process; its `timings` the knn index build and search seconds."""
    batches = ClassBatches(x, plan)

    def run(cfg: EstimatorConfig, sigmas: np.ndarray, todo: Sequence[int]):
        return (batches.terms(sigmas, b) for b in todo)

    run.timings = lambda: {"index_build_s": batches.index_build_s, "search_s": batches.search_s}
    return run
