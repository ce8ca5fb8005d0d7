"""The Tune side of `lossfloor sweep`: a schedule sweep (`lossfloor.train.sweep.SweepSpec`) on Ray Tune.

    outcome = run_sweep(spec, "runs/sweep", Resources(engine=Engine(kind="ray", gpus_per_worker=0.25)))
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
              - single-process trials (engine.workers = 1): the core loop `lossfloor.train.train` runs
                in the Tune function itself; its report hook calls tune.report(metrics, checkpoint=
                tune.Checkpoint of the checkpoint folder it just wrote); a restored trial continues from
                tune.get_checkpoint(). Such a trial may take a fraction of a GPU.
              - multi-worker trials (engine.workers > 1): the Tune function runs Ray Train V2
                (`lossfloor.ray.train.train_on_ray`, a TorchTrainer with whole GPUs per worker) with a
                TuneReportCallback that adds the objective to rank 0's metrics and forwards them to Tune;
                the Train run lives in OUT/trials/<trial id> and resumes from there. The callback runs in
                the Train controller, on its CPU: with the `fd` objective it samples there, so prefer
                single-process trials for FD on large models.
    results   collected on the driver: OUT/results.parquet (one row per trial), OUT/best.json (best
              full-budget trial, baseline, gain) (`lossfloor.train.sweep`); the figures and MLflow
              (`lossfloor.jobs.sweep`) are written by the driver only, never by a trial.

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
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from lossfloor.atomic import write_atomic
from lossfloor.errors import InputError
from lossfloor.fmt import num
from lossfloor.train import TrainConfig
from lossfloor.train.space import SearchSpace
from lossfloor.train.sweep import (
    BASELINE,
    BEST_FILE,
    METRIC,
    MODE,
    SPEC_FILE,
    TIME_ATTR,
    TUNE_NAME,
    Resources,
    SweepOutcome,
    SweepSpec,
    build_objective,
    check_same_sweep,
    check_spec,
    read_outcome,
    summarize,
    trial_train_config,
    tune_metrics,
    write_results,
)

log = logging.getLogger(__name__)

# --- One trial --------------------------------------------------------------------------------------------


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
    device = "cuda" if setup["gpus_per_worker"] > 0 else "cpu"
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
    train_on_ray(config, setup["data"], workers=setup["workers"], gpus_per_worker=setup["gpus_per_worker"],
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
                 trial.config.get("schedule"), num(r.get(METRIC), ".5g"), r.get(TIME_ATTR, 0))


# --- The sweep ---------------------------------------------------------------------------------------------


def _setup(spec: SweepSpec, resources: Resources, out: Path, trial_hooks=None) -> dict:
    """What every trial gets (picklable): the base config, data, objective, resources, the caller's hooks."""
    return {"base": spec.base.to_dict(), "data": spec.data, "objective": dataclasses.asdict(spec.objective),
            "workers": resources.engine.workers, "gpus_per_worker": float(resources.engine.gpus_per_worker),
            "cpus_per_worker": float(resources.cpus_per_worker), "trials_dir": str(out / "trials"),
            "max_failures": 2, "hooks": trial_hooks}


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


def run_sweep(spec: SweepSpec, out, resources: Resources, *, callbacks=(),
              trial_hooks=None) -> SweepOutcome:
    """Run (or resume, or just read back) the sweep `spec` in folder `out` (module docstring).

    callbacks: extra driver-side Tune callbacks (pickled with the experiment and restored with it).
    trial_hooks: a picklable object with `on_trial_start(trial_id, resumed_from)`, called in every trial
    as it starts, fresh (None) or from a checkpoint (its folder) — tests use both to cut a sweep off and
    see what a resume restarts.
    """
    from lossfloor.ray.cluster import ray_session

    out = Path(out).absolute()
    check_spec(spec, resources)
    if check_same_sweep(spec, out) and (out / BEST_FILE).is_file():
        log.info("sweep in %s finished earlier: reading its results", out)
        return read_outcome(out)
    # checkpoints follow evaluations, so Tune snapshots its state often; that is intended, not a warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    t0 = time.monotonic()
    with ray_session(resources.engine.address, state_api=True):
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
    write_results(out, rows, histories, best)
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


__all__ = ["BaselineKeepingASHA", "ObjectiveReportCallback", "RandomSearcher", "SweepCallback", "WithBaseline",
           "collect", "make_scheduler", "make_searcher", "make_tuner", "run_sweep", "run_trial", "tune_domains"]
