"""`lossfloor sweep`: Ray Tune sweeps of the optimal-loss schedule's fields against the EDM2 baseline.

    spec = SweepSpec(base=TrainConfig(preset="tiny", jstar="jstar.parquet", duration_n_img=8192, ...),
                     data="bundled:digits", space=load_space("studies/spaces/optimal_loss.yaml"), trials=8)
    outcome = run_sweep(spec, "runs/sweep", Resources(gpus_per_trial=0.25))
    outcome.best["gain"]        # baseline objective - best objective (lower is better)

The plan:

    driver    checks the spec, derives max_concurrent_trials from the cluster (GPUs, else CPUs), then
              Tuner(fit) — or Tuner.restore when OUT/tune already holds a Tune experiment of the same
              sweep (OUT/sweep.json): unfinished trials continue from their last checkpoint, errored ones
              resume (resume_errored), finished ones are not rerun.
    search    trial 1 is always the baseline, {"schedule": "edm2"} (EDM2Schedule at its defaults, same
              preset, budget and seed); the others are {"schedule": "optimal", <fields>} drawn from the
              space: `random` draws trial k from a generator seeded by (seed, k), `optuna` is Optuna's TPE
              (ray.tune.search.optuna.OptunaSearch). The baseline's result never reaches the searcher.
    scheduler `asha` (ASHAScheduler, time_attr = n_img, max_t = the budget) stops weak trials at its rungs
              (grace_n_img x reduction_factor^k) on the intermediate objective; the baseline is recorded
              at the rungs but never stopped. `fifo` runs every trial to the end.
    trial     one Tune function trainable per trial, reporting the objective at every evaluation:
              - single-process trials (workers_per_trial = 1): the core loop `lossfloor.train.train` runs
                in the Tune function itself; its report hook calls tune.report(metrics, checkpoint=
                tune.Checkpoint of the checkpoint folder it just wrote); a restored trial continues from
                tune.get_checkpoint(). Such a trial may take a fraction of a GPU.
              - multi-worker trials (workers_per_trial > 1): the Tune function runs Ray Train V2
                (`lossfloor.ray.train.train_on_ray`, a TorchTrainer with whole GPUs per worker) with a
                TuneReportCallback that adds the objective to rank 0's metrics and forwards them to Tune;
                the Train run lives in OUT/trials/<trial id> and resumes from there. The callback runs in
                the Train controller, on its CPU: with the `fd` objective it samples there, so prefer
                single-process trials for FD on large models.
    results   collected on the driver: OUT/results.parquet (one row per trial), OUT/best.json (best
              full-budget trial, baseline, gain), two offline HTML figures; MLflow (lossfloor.tracking.sweep)
              is written by the driver only, never by a trial.

Objectives (lossfloor.train.objectives): `gap`, the weighted gap under one fixed reference weighting (a
run's own eval/total_gap is weighted by its own schedule and cannot rank runs), or `fd`, the Fréchet
distance of samples. Lower is better for both. The best trial is the lowest objective among trials that
reached the full budget (a trial ASHA stopped early was measured on fewer images).

Ray's ASHA keeps its rung records in memory only: a restored sweep starts them afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from lossfloor.atomic import write_atomic
from lossfloor.errors import InputError
from lossfloor.train import EDM2Schedule, OptimalLossSchedule, TrainConfig, resolve
from lossfloor.train.objectives import OBJECTIVES
from lossfloor.train.space import SearchSpace

log = logging.getLogger(__name__)

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
    """Where trials run. GPUs: whole GPUs per worker of a multi-worker trial; a single-process trial may
    take a fraction (0.25 = four trials per GPU)."""

    workers_per_trial: int = 1
    gpus_per_trial: float = 0.0  # in total per trial, split evenly over its workers
    cpus_per_worker: float = 1.0  # Ray CPUs and torch threads per worker
    max_concurrent: int | None = None  # at most this many trials at once (default: what the cluster holds)
    address: str | None = None  # the Ray cluster (None: this process's Ray, else a local one)

    def __post_init__(self):
        w, g, c = self.workers_per_trial, self.gpus_per_trial, self.cpus_per_worker
        if not (isinstance(w, int) and not isinstance(w, bool) and w >= 1):
            raise InputError(f"workers_per_trial: expected an integer >= 1, got {w!r}")
        if not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 0):
            raise InputError(f"gpus_per_trial: expected a number >= 0, like 1 or 0.25, got {g!r}")
        if w > 1 and g and (g / w < 1 or not float(g / w).is_integer()):
            raise InputError(f"gpus_per_trial: {g:g} GPUs cannot be split into whole GPUs over {w} workers; "
                             f"a multi-worker trial takes whole GPUs per worker (e.g. {w}), fractional GPUs "
                             "are only for single-process trials (workers_per_trial 1)")
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise InputError(f"cpus_per_worker: expected a number > 0, like 1, got {c!r}")
        if self.max_concurrent is not None and not (isinstance(self.max_concurrent, int) and self.max_concurrent >= 1):
            raise InputError(f"max_concurrent: expected an integer >= 1, got {self.max_concurrent!r}")

    def trial_resources(self) -> dict:
        """What one trial's Tune function holds (tune.with_resources)."""
        if self.workers_per_trial > 1:  # the TorchTrainer's workers hold the CPUs and GPUs
            return {"cpu": MULTI_WORKER_DRIVER_CPU}
        return {"cpu": self.cpus_per_worker, "gpu": self.gpus_per_trial}

    def max_concurrent_trials(self, cluster: dict) -> int:
        """How many trials fit the cluster at once (its GPUs when trials use GPUs, and its CPUs), capped by
        max_concurrent. InputError when not even one fits: Ray Train would wait for workers forever."""
        w = self.workers_per_trial
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


# --- One trial --------------------------------------------------------------------------------------------


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


def run_trial(config: dict, setup: dict) -> None:
    """The Tune function of every trial (module docstring, "trial")."""
    import torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per persisted checkpoint
    trial_id = tune.get_context().get_trial_id()
    train_config = trial_train_config(TrainConfig.from_dict(setup["base"]), config, trial_id)
    if setup["workers"] > 1:
        _run_multi_worker(train_config, setup, trial_id)
        return
    from lossfloor.data import load
    from lossfloor.train import train

    torch.set_num_threads(max(1, int(setup["cpus_per_worker"])))
    device = "cuda" if setup["gpus"] > 0 else "cpu"
    data = load(setup["data"], latents=train_config.latents)
    objective = build_objective(setup, train_config, data, device)

    def report(metrics: dict, path: Path | None) -> None:
        if "eval/total" not in metrics:  # checkpoint-only points do not occur: checkpoints follow evaluations
            return
        checkpoint = None if path is None else tune.Checkpoint.from_directory(os.fspath(path))
        tune.report(tune_metrics(metrics, objective(metrics, path)), checkpoint=checkpoint)

    restored = tune.get_checkpoint()
    local = tempfile.mkdtemp(prefix=f"lossfloor-sweep-{trial_id}-")
    try:
        with restored.as_directory() if restored is not None else contextlib.nullcontext() as folder:
            _on_start(setup, trial_id, folder)
            train(train_config, data, report=report, checkpoint_dir=local, resume=folder or False, device=device)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _run_multi_worker(config: TrainConfig, setup: dict, trial_id: str) -> None:
    """A multi-worker trial: Ray Train V2 (train_on_ray) with the objective forwarded to Tune."""
    from lossfloor.ray.train import train_on_ray
    from lossfloor.train import latest_checkpoint

    storage = Path(setup["trials_dir"])
    _on_start(setup, trial_id, latest_checkpoint(storage / trial_id))
    workers = setup["workers"]
    train_on_ray(config, setup["data"], workers=workers, gpus_per_worker=setup["gpus"] / workers,
                 cpus_per_worker=setup["cpus_per_worker"], storage_path=storage, name=trial_id,
                 max_failures=setup["max_failures"], callbacks=[ObjectiveReportCallback(setup, config.to_dict())])


class ObjectiveReportCallback(TuneReportCallback):
    """Ray Train callback (runs in the Train controller): rank 0's metrics of each evaluation plus the
    objective, forwarded to the Tune trial that started the TorchTrainer (ASHA acts on them)."""

    def __init__(self, setup: dict, config: dict):
        super().__init__()
        self.setup, self.config = setup, config
        self._objective = None

    def after_report(self, run_context, metrics, checkpoint):
        m = dict(metrics[0])
        if "eval/total" not in m:
            return
        if self._objective is None:
            self._objective = build_objective(self.setup, TrainConfig.from_dict(self.config))
        with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as folder:
            out = tune_metrics(m, self._objective(m, folder))
        if checkpoint is not None:
            out[CHECKPOINT_PATH_KEY] = checkpoint.path
        self._training_actor_item_queue.put(out)


def _on_start(setup: dict, trial_id: str, resumed_from) -> None:
    """The caller's trial hooks (`run_sweep(trial_hooks=...)`), told of every start of a trial."""
    hooks = setup.get("hooks")
    if hooks is not None:
        hooks.on_trial_start(trial_id, None if resumed_from is None else Path(resumed_from))


# --- Search and scheduling ---------------------------------------------------------------------------------


class RandomSearcher(Searcher):
    """Random search: the k-th suggestion is drawn from a generator seeded by (seed, k), so a sweep draws
    the same configurations in the same order on every run, and a restored sweep continues the sequence."""

    def __init__(self, space: SearchSpace, seed: int):
        super().__init__(metric=METRIC, mode=MODE)
        self.space, self.seed, self.count = space, seed, 0

    def suggest(self, trial_id: str) -> dict:
        rng = np.random.default_rng([self.seed, self.count])
        self.count += 1
        return self.space.sample(rng)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"count": self.count}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.count = pickle.load(f)["count"]


class WithBaseline(Searcher):
    """Suggests the EDM2 baseline first, then the inner searcher's configurations as optimal-loss trials
    (plus the space's fixed fields). The baseline's results are kept from the inner searcher: it is not a
    point of the space."""

    def __init__(self, inner: Searcher, fixed: dict):
        super().__init__(metric=METRIC, mode=MODE)
        self.inner, self.fixed = inner, dict(fixed)
        self.baseline_id: str | None = None

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if self.baseline_id is None:
            self.baseline_id = trial_id
            return dict(BASELINE)
        config = self.inner.suggest(trial_id)
        if not isinstance(config, dict):  # None (wait) or Searcher.FINISHED
            return config
        return {"schedule": "optimal", **self.fixed, **config}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id != self.baseline_id:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id != self.baseline_id:
            self.inner.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            self.inner.save(os.path.join(tmp, "inner"))
            inner = Path(tmp, "inner").read_bytes()
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"baseline_id": self.baseline_id, "inner": inner}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.baseline_id = state["baseline_id"]
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "inner").write_bytes(state["inner"])
            self.inner.restore(os.path.join(tmp, "inner"))


def tune_domains(space: SearchSpace) -> dict:
    """The space's swept fields as Ray Tune domains (randint's upper bound included, as in the YAML)."""
    out = {}
    for key, p in space.swept.items():
        if p.kind == "choice":
            out[key] = tune.choice(list(p.args))
        elif p.kind == "uniform":
            out[key] = tune.uniform(*p.args)
        elif p.kind == "loguniform":
            out[key] = tune.loguniform(*p.args)
        else:
            out[key] = tune.randint(p.args[0], p.args[1] + 1)
    return out


def make_searcher(spec: SweepSpec) -> Searcher:
    """The baseline first, then random search or Optuna's TPE over the space (seeded by the base seed)."""
    seed = spec.base.seed
    if spec.search == "random":
        return WithBaseline(RandomSearcher(spec.space, seed), {})
    try:
        import optuna
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:
        raise InputError(f"search optuna: optuna is not installed ({e}); pip install optuna==5.0.0 or use random") \
            from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    inner = OptunaSearch(space=OptunaSearch.convert_search_space(tune_domains(spec.space)), metric=METRIC,
                         mode=MODE, sampler=optuna.samplers.TPESampler(seed=seed))
    return WithBaseline(inner, spec.space.fixed)


class BaselineKeepingASHA(ASHAScheduler):
    """ASHA that records the baseline at its rungs (the yardstick the others meet) but never stops it:
    the gain is measured against the baseline at the full budget."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and trial.config.get("schedule") == BASELINE["schedule"]:
            return TrialScheduler.CONTINUE  # the function ends by itself at the budget
        return action


def make_scheduler(spec: SweepSpec):
    if spec.scheduler == "fifo":
        return FIFOScheduler()
    return BaselineKeepingASHA(time_attr=TIME_ATTR, max_t=spec.duration_n_img, grace_period=spec.grace,
                               reduction_factor=spec.reduction_factor)


class SweepCallback(tune.Callback):
    """Driver-side progress lines: a line per trial that ends."""

    def __init__(self):
        self.ended = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "error")

    def _ended(self, trial, how: str) -> None:
        self.ended += 1
        r = trial.last_result or {}
        log.info("trial %s %s: %s, objective %s at %s images", trial.trial_id, how,
                 trial.config.get("schedule"), _fmt(r.get(METRIC)), r.get(TIME_ATTR, 0))


# --- The sweep ---------------------------------------------------------------------------------------------


def check_spec(spec: SweepSpec, resources: Resources) -> None:
    """What the trials would reject, found on the driver (data shape, batch split, J* table, space)."""
    from lossfloor.train.config import check_source
    from lossfloor.train.schedules import JStarCurve

    JStarCurve.from_path(spec.base.jstar)
    check_source(spec.base, spec.data, ranks=resources.workers_per_trial)
    if resources.workers_per_trial > 1 and spec.base.precision == "fp16" and not resources.gpus_per_trial:
        raise InputError("precision: fp16 autocast needs GPUs (gpus_per_trial > 0); use 'bf16' or 'none'")
    for k, v in spec.space.fixed.items():  # the fixed fields together (bounds were checked one by one)
        OptimalLossSchedule(**{k: v})
    if spec.objective.kind == "fd":
        from lossfloor.train.metrics import feature_extractor

        feature_extractor(spec.objective.features)  # a missing or foreign network file fails now


def _setup(spec: SweepSpec, resources: Resources, out: Path, trial_hooks=None) -> dict:
    """What every trial gets (picklable): the base config, data, objective, resources, the caller's hooks."""
    return {"base": spec.base.to_dict(), "data": spec.data, "objective": dataclasses.asdict(spec.objective),
            "workers": resources.workers_per_trial, "gpus": float(resources.gpus_per_trial),
            "cpus_per_worker": float(resources.cpus_per_worker), "trials_dir": str(out / "trials"),
            "max_failures": 2, "hooks": trial_hooks}


def _check_same_sweep(spec: SweepSpec, out: Path) -> bool:
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


def make_tuner(spec: SweepSpec, resources: Resources, out: Path, concurrent: int, *, callbacks=(),
               trial_hooks=None) -> tune.Tuner:
    """A new Tuner for the sweep, or the restored one when OUT/tune holds its experiment (unfinished
    trials continue from their last checkpoint, errored ones resume, finished ones stay as they are).
    callbacks: extra Tune callbacks of a new sweep (a restored one gets back those it was saved with)."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=_setup(spec, resources, out, trial_hooks)),
                                    resources.trial_resources())
    experiment = out / TUNE_NAME
    if tune.Tuner.can_restore(str(experiment)):
        log.info("resuming the sweep in %s (finished trials are kept)", experiment)
        return tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    log.info("sweep: baseline + %d trials, %s search, %s scheduler, objective %s, up to %d at once",
             spec.trials, spec.search, spec.scheduler, spec.objective.kind, concurrent)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=make_searcher(spec),
                                    scheduler=make_scheduler(spec), num_samples=spec.trials + 1,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=TUNE_NAME, storage_path=str(out), verbose=0,
                                  callbacks=[SweepCallback(), *callbacks],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )


def run_sweep(spec: SweepSpec, out, resources: Resources | None = None, *, callbacks=(),
              trial_hooks=None) -> SweepOutcome:
    """Run (or resume, or just read back) the sweep `spec` in folder `out` (module docstring).

    callbacks: extra driver-side Tune callbacks (pickled with the experiment and restored with it).
    trial_hooks: a picklable object with `on_trial_start(trial_id, resumed_from)`, called in every trial
    as it starts, fresh (None) or from a checkpoint (its folder) — tests use both to cut a sweep off and
    see what a resume restarts.
    """
    from lossfloor.ray.cluster import ray_session

    resources = resources or Resources()
    out = Path(out).absolute()
    check_spec(spec, resources)
    if _check_same_sweep(spec, out) and (out / BEST_FILE).is_file():
        log.info("sweep in %s finished earlier: reading its results", out)
        return read_outcome(out)
    # checkpoints follow evaluations, so Tune snapshots its state often; that is intended, not a warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    t0 = time.monotonic()
    with ray_session(resources.address, state_api=True):
        concurrent = resources.max_concurrent_trials(ray.cluster_resources())  # before anything is written
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / SPEC_FILE, lambda p: p.write_text(json.dumps(spec.identity(), indent=1), encoding="utf-8"))
        grid = make_tuner(spec, resources, out, concurrent, callbacks=callbacks, trial_hooks=trial_hooks).fit()
    wall = time.monotonic() - t0
    rows, histories = collect(grid, spec)
    ended = grid.num_terminated + grid.num_errors
    if ended < spec.trials + 1:
        log.warning("sweep interrupted: %d of %d trials ended; rerun the same command to resume", ended,
                    spec.trials + 1)
        return SweepOutcome(out, "interrupted", rows, histories, {}, wall)
    best = summarize(rows, spec)
    write_outputs(out, rows, histories, best, spec)
    return SweepOutcome(out, "finished", rows, histories, best, wall)


# --- Results -----------------------------------------------------------------------------------------------


def collect(grid, spec: SweepSpec) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    """One row per trial (results.parquet) and each trial's objective at every evaluation."""
    fields = list(spec.space.params)
    rows, histories = [], {}
    for result in grid:
        metrics, config = result.metrics or {}, result.config or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        n_img = int(metrics.get(TIME_ATTR, 0))
        error = None if result.error is None else str(result.error).strip().splitlines()[-1][:500]
        finished = error is None and n_img >= spec.duration_n_img
        row = {"trial_id": trial_id, "is_baseline": config.get("schedule") == BASELINE["schedule"],
               "schedule": config.get("schedule")}
        row.update({k: config.get(k) for k in fields})
        objective = metrics.get(METRIC)
        row.update({"objective": None if objective is None else float(objective), "n_img": n_img,
                    "stopped_early": error is None and not finished and objective is not None,
                    "status": "error" if error else "finished" if finished else "stopped",
                    "error": error, "time_total_s": metrics.get("time_total_s")})
        rows.append(row)
        histories[trial_id] = _history(result.metrics_dataframe)
    rows.sort(key=lambda r: (not r["is_baseline"], r["trial_id"]))
    return rows, histories


def _history(df) -> list[tuple[int, float]]:
    """(n_img, objective) per evaluation, one per n_img (the last, should a resumed trial repeat one)."""
    if df is None or METRIC not in df.columns or TIME_ATTR not in df.columns:
        return []
    points = {}
    for n, v in zip(df[TIME_ATTR], df[METRIC]):
        if n == n and v == v:  # not NaN
            points[int(n)] = float(v)
    return sorted(points.items())


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


def write_outputs(out: Path, rows: list[dict], histories: dict, best: dict, spec: SweepSpec) -> None:
    """results.parquet, the objective histories, the two figures, and best.json last (its presence marks
    a finished sweep)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lossfloor.plots import write_html
    from lossfloor.plots_sweep import objective_curves_figure, parallel_coordinates_figure

    table = pa.Table.from_pylist(rows)
    write_atomic(out / RESULTS_FILE, lambda p: pq.write_table(table, p))
    points = [{"trial_id": t, "n_img": n, "objective": v} for t, h in histories.items() for n, v in h]
    history = pa.Table.from_pylist(points, schema=pa.schema([("trial_id", pa.string()), ("n_img", pa.int64()),
                                                             ("objective", pa.float64())]))
    write_atomic(out / HISTORY_FILE, lambda p: pq.write_table(history, p))
    write_html(parallel_coordinates_figure(rows, spec.space, objective=spec.objective.kind), out / PARCOORDS_FILE)
    write_html(objective_curves_figure(rows, histories, objective=spec.objective.kind, budget=spec.duration_n_img),
               out / CURVES_FILE)
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


def _fmt(v) -> str:
    return "-" if not _finite(v) else f"{v:.5g}"


__all__ = ["BaselineKeepingASHA", "make_tuner", "ObjectiveReportCallback", "ObjectiveSpec", "RandomSearcher", "Resources",
           "SweepOutcome", "SweepSpec", "WithBaseline", "collect", "make_scheduler", "make_searcher",
           "read_outcome", "run_sweep", "run_trial", "summarize", "trial_train_config",
           "tune_domains"]
