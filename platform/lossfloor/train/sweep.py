"""A schedule sweep, as data: what to sweep (`SweepSpec`), where trials run (`Resources`), what came out
(`SweepOutcome`, results.parquet, best.json). Pure: Ray Tune runs it (`lossfloor.ray.sweep`), the command
and the study drive it (`lossfloor.jobs.sweep`), the figures are `lossfloor.pages.sweep`'s.

    spec = SweepSpec(base=TrainConfig(preset="tiny", jstar="jstar.parquet", duration_n_img=8192, ...),
                     data="bundled:digits", space=load_space(DEFAULT_SPACE), trials=8)
    summarize(rows, spec)["gain"]        # baseline objective - best objective (lower is better)

Trial 1 is always the baseline, {"schedule": "edm2"} (EDM2Schedule at its defaults, same preset, budget
and seed); the others are {"schedule": "optimal", <fields>} drawn from the space. The best trial is the
lowest objective among trials that reached the full budget (a trial stopped early was measured on fewer
images).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lossfloor.atomic import write_atomic
from lossfloor.errors import InputError
from lossfloor.train.config import TrainConfig, check_source, resolve
from lossfloor.train.objectives import OBJECTIVES
from lossfloor.train.schedules import EDM2Schedule, OptimalLossSchedule
from lossfloor.train.space import SearchSpace

SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "optuna")
METRIC, MODE = "objective", "min"
TIME_ATTR = "n_img"
BASELINE = {"schedule": "edm2"}
TUNE_NAME = "tune"  # OUT/tune: the Tune experiment
SPEC_FILE, RESULTS_FILE, BEST_FILE = "sweep.json", "results.parquet", "best.json"
HISTORY_FILE = "objective_history.parquet"  # trial_id, n_img, objective: every evaluation of every trial
PARCOORDS_FILE, CURVES_FILE = "parallel_coordinates.html", "objective_vs_images.html"
MULTI_WORKER_DRIVER_CPU = 0.01  # what the Tune function of a multi-worker trial holds (Train's workers hold the rest)


# --- Specs ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ObjectiveSpec:
    """What the sweep minimises (lossfloor.train.objectives)."""

    kind: str = "gap"  # "gap" | "fd"
    features: str = "pixels"  # fd: a lossfloor.train.feature_extractor spec ("inception:PATH", "dinov2:PATH")
    fd_samples: int = 512  # fd: samples per evaluation
    fd_steps: int = 32  # fd: EDM Heun steps

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise InputError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {self.kind!r}")
        if not (isinstance(self.fd_samples, int) and self.fd_samples >= 2):
            raise InputError(f"fd samples: expected an integer >= 2, like 512, got {self.fd_samples!r}")
        if not (isinstance(self.fd_steps, int) and self.fd_steps >= 2):
            raise InputError(f"fd steps: expected an integer >= 2, like 32, got {self.fd_steps!r}")


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A sweep: what every trial shares (`base`: preset, budget, evaluation grid, seed, J* table — its
    schedule is replaced per trial), the data, the space and how trials are searched and stopped."""

    base: TrainConfig
    data: str  # a lossfloor.data source every trial can read (shared storage on a cluster)
    space: SearchSpace
    trials: int  # trials drawn from the space (the baseline comes on top)
    scheduler: str = "asha"
    search: str = "random"
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    grace_n_img: int | None = None  # ASHA's first rung in images; None = two evaluation intervals
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor at each rung

    def __post_init__(self):
        if self.base.jstar is None:
            raise InputError("jstar: a sweep needs a J* table (the schedule and the gap objective use it)")
        if not (isinstance(self.trials, int) and self.trials >= 1):
            raise InputError(f"trials: expected an integer >= 1, like 8, got {self.trials!r}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"scheduler: expected one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.search not in SEARCHES:
            raise InputError(f"search: expected one of {', '.join(SEARCHES)}, got {self.search!r}")
        if self.grace_n_img is not None and not (isinstance(self.grace_n_img, int) and self.grace_n_img >= 1):
            raise InputError(f"grace: expected a number of images >= 1, got {self.grace_n_img!r}")
        if not (isinstance(self.reduction_factor, (int, float)) and self.reduction_factor > 1):
            raise InputError(f"reduction factor: expected a number > 1, like 2, got {self.reduction_factor!r}")

    @property
    def resolved(self):
        return resolve(self.base)

    @property
    def duration_n_img(self) -> int:
        return self.resolved.duration_n_img

    @property
    def grace(self) -> int:
        """ASHA's grace period in images (at most the budget)."""
        return min(self.grace_n_img or 2 * self.resolved.eval_every_n_img, self.duration_n_img)

    def identity(self) -> dict:
        """What makes two sweeps the same one (OUT/sweep.json; a rerun must match it to resume)."""
        base = self.base.to_dict()
        base.pop("schedule", None)
        base.pop("run", None)
        return {"base": base, "data": self.data, "space": self.space.to_dict(), "trials": self.trials,
                "scheduler": self.scheduler, "search": self.search, "objective": dataclasses.asdict(self.objective),
                "grace_n_img": self.grace, "reduction_factor": float(self.reduction_factor)}


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Where trials run: on `engine`, a `lossfloor.jobs.engine.Engine` of kind ray, as it is (it checked
    its settings; the core imports no jobs): the cluster, the workers of one trial and the CPUs (default
    1, also torch threads) and GPUs of each. A trial of one worker runs the loop in its Tune function and
    may take a fraction of a GPU (0.25 = four trials per GPU); the workers of a multi-worker trial (Ray
    Train, NCCL) take whole GPUs. At most `max_concurrent` trials at once (default: what the cluster holds)."""

    engine: object
    max_concurrent: int | None = None

    def __post_init__(self):
        w, g = self.engine.workers, self.engine.gpus_per_worker
        if self.engine.kind != "ray":
            raise InputError(f"engine: a sweep runs its trials on Ray Tune: expected ray, got {self.engine.kind!r}")
        if w > 1 and not float(g).is_integer():
            raise InputError(f"gpus_per_worker: {g:g} GPUs cannot be given to each of {w} workers; a multi-worker "
                             "trial takes whole GPUs per worker (e.g. 1), fractional GPUs are only for "
                             "single-process trials (workers 1)")
        if self.max_concurrent is not None and not (isinstance(self.max_concurrent, int) and self.max_concurrent >= 1):
            raise InputError(f"max_concurrent: expected an integer >= 1, got {self.max_concurrent!r}")

    @property
    def cpus_per_worker(self) -> float:
        return float(self.engine.cpus_per_worker or 1)

    @property
    def gpus_per_trial(self) -> float:
        return self.engine.workers * float(self.engine.gpus_per_worker)

    def trial_resources(self) -> dict:
        """What one trial's Tune function holds (tune.with_resources)."""
        if self.engine.workers > 1:  # the TorchTrainer's workers hold the CPUs and GPUs
            return {"cpu": MULTI_WORKER_DRIVER_CPU}
        return {"cpu": self.cpus_per_worker, "gpu": self.gpus_per_trial}

    def max_concurrent_trials(self, cluster: dict) -> int:
        """How many trials fit the cluster at once (its GPUs when trials use GPUs, and its CPUs), capped by
        max_concurrent. InputError when not even one fits: Ray Train would wait for workers forever."""
        w = self.engine.workers
        need = {"CPU": w * self.cpus_per_worker + (MULTI_WORKER_DRIVER_CPU if w > 1 else 0.0)}
        if self.gpus_per_trial:
            need["GPU"] = self.gpus_per_trial
        fits = {k: math.floor(float(cluster.get(k, 0)) / v + 1e-9) for k, v in need.items()}
        for kind, n in fits.items():
            if n < 1:
                raise InputError(f"resources: a trial needs {need[kind]:g} {kind}s, the Ray cluster has "
                                 f"{float(cluster.get(kind, 0)):g}; lower the per-trial resources")
        n = min(fits.values())
        return min(n, self.max_concurrent or n)


@dataclass(frozen=True)
class SweepOutcome:
    """What a sweep left in its folder."""

    out: Path
    status: str  # "finished" | "interrupted"
    rows: list[dict]  # results.parquet rows
    histories: dict[str, list[tuple[int, float]]]  # trial id -> [(n_img, objective)] at each evaluation
    best: dict  # best.json
    wall_s: float


# --- One trial ----------------------------------------------------------------------------------------------


def trial_train_config(base: TrainConfig, config: dict, trial_id: str) -> TrainConfig:
    """The trial's TrainConfig: `base` with the baseline's EDM2Schedule or the drawn OptimalLossSchedule."""
    values = {k: v for k, v in config.items() if k != "schedule"}
    schedule = EDM2Schedule() if config.get("schedule") == BASELINE["schedule"] else OptimalLossSchedule(**values)
    return dataclasses.replace(base, schedule=schedule, run=trial_id)


def build_objective(setup: dict, config: TrainConfig, data=None, device="cpu"):
    """The trial's objective (lossfloor.train.objectives) from the sweep's ObjectiveSpec."""
    from lossfloor.train.objectives import FDObjective, GapObjective
    from lossfloor.train.schedules import JStarCurve

    spec = setup["objective"]
    if spec["kind"] == "gap":
        return GapObjective(JStarCurve.from_path(config.jstar), resolve(config).eval_sigmas)
    if data is None:
        from lossfloor.data import load

        data = load(setup["data"], latents=config.latents)
    return FDObjective(data, features=spec["features"], n=spec["fd_samples"], num_steps=spec["fd_steps"],
                       seed=config.seed, device=device)


def tune_metrics(metrics: dict, objective: float) -> dict:
    """The loop's metrics as reported to Tune: the objective, progress and every eval/ metric."""
    keep = ("step", "n_img", "flops", "train_loss", "train_gap")
    out = {k: metrics[k] for k in keep if k in metrics}
    out.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
    out[METRIC] = float(objective)
    return out


# --- Checks and results ------------------------------------------------------------------------------------


def check_spec(spec: SweepSpec, resources: Resources) -> None:
    """What the trials would reject, found on the driver (data shape, batch split, J* table, space)."""
    from lossfloor.train.schedules import JStarCurve

    JStarCurve.from_path(spec.base.jstar)
    check_source(spec.base, spec.data, ranks=resources.engine.workers)
    if resources.engine.workers > 1 and spec.base.precision == "fp16" and not resources.gpus_per_trial:
        raise InputError("precision: fp16 autocast needs GPUs (gpus_per_worker > 0); use 'bf16' or 'none'")
    for k, v in spec.space.fixed.items():  # the fixed fields together (bounds were checked one by one)
        OptimalLossSchedule(**{k: v})
    if spec.objective.kind == "fd":
        from lossfloor.train.metrics import feature_extractor

        feature_extractor(spec.objective.features)  # a missing or foreign network file fails now


def check_same_sweep(spec: SweepSpec, out: Path) -> bool:
    """True when OUT already holds this sweep (resume), False when it holds none; InputError otherwise."""
    path = out / SPEC_FILE
    if not path.is_file():
        return False
    saved = json.loads(path.read_text(encoding="utf-8"))
    now = json.loads(json.dumps(spec.identity()))
    if saved != now:
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise InputError(f"--out {out}: holds a different sweep (differs in {', '.join(differ)}); rerun it with "
                         "the same arguments to resume, or choose another --out")
    return True


def summarize(rows: list[dict], spec: SweepSpec) -> dict:
    """best.json: the best full-budget trial, the baseline, the gain (baseline - best) and its share."""
    budget = spec.duration_n_img
    full = [r for r in rows if not r["is_baseline"] and r["status"] == "finished" and _finite(r["objective"])]
    base = next((r for r in rows if r["is_baseline"]), None)
    best = min(full, key=lambda r: r["objective"]) if full else None
    b = base["objective"] if base is not None and base["status"] == "finished" else None
    gain = None if best is None or not _finite(b) else b - best["objective"]
    return {
        "objective": spec.objective.kind, "lower_is_better": True, "budget_n_img": budget,
        "best": None if best is None else {"trial_id": best["trial_id"], "objective": best["objective"],
                                           "config": {k: best[k] for k in spec.space.params}},
        "baseline": None if base is None else {"trial_id": base["trial_id"], "objective": base["objective"],
                                               "n_img": base["n_img"], "status": base["status"]},
        "gain": gain, "relative_gain": None if gain is None or not b else gain / abs(b),
        "trials": sum(not r["is_baseline"] for r in rows), "finished": len(full),
        "stopped_early": sum(r["stopped_early"] for r in rows), "errors": sum(r["status"] == "error" for r in rows),
        "sweep": spec.identity(),
    }


def write_results(out: Path, rows: list[dict], histories: dict, best: dict) -> None:
    """results.parquet, the objective histories, and best.json last (its presence marks a finished sweep)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    write_atomic(out / RESULTS_FILE, lambda p: pq.write_table(table, p))
    points = [{"trial_id": t, "n_img": n, "objective": v} for t, h in histories.items() for n, v in h]
    history = pa.Table.from_pylist(points, schema=pa.schema([("trial_id", pa.string()), ("n_img", pa.int64()),
                                                             ("objective", pa.float64())]))
    write_atomic(out / HISTORY_FILE, lambda p: pq.write_table(history, p))
    write_best(out, best)


def write_best(out: Path, best: dict) -> None:
    write_atomic(out / BEST_FILE, lambda p: p.write_text(json.dumps(best, indent=1), encoding="utf-8"))


def read_outcome(out: Path) -> SweepOutcome:
    """A finished sweep's outcome from its folder (results, histories, best.json); no Ray needed."""
    import pyarrow.parquet as pq

    rows = pq.read_table(out / RESULTS_FILE).to_pylist()
    best = json.loads((out / BEST_FILE).read_text(encoding="utf-8"))
    histories: dict[str, list[tuple[int, float]]] = {}
    for p in pq.read_table(out / HISTORY_FILE).to_pylist():
        histories.setdefault(p["trial_id"], []).append((p["n_img"], p["objective"]))
    return SweepOutcome(out, "finished", rows, histories, best, 0.0)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


__all__ = ["BASELINE", "METRIC", "MODE", "SCHEDULERS", "SEARCHES", "TIME_ATTR", "ObjectiveSpec", "Resources",
           "SweepOutcome", "SweepSpec", "build_objective", "check_same_sweep", "check_spec", "read_outcome",
           "summarize", "trial_train_config", "tune_metrics", "write_best", "write_results"]
