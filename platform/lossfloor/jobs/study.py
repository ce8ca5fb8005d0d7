"""A study: its stages declared as data, one runner that skips, runs and logs each, under one MLflow parent run.

    with open_study(name="scaling_imagenet512", out=out, log=log, experiment="scaling", tracking_uri=uri,
                    run_name="scaling-smoke", tags={"lossfloor.kind": "study"}, params={...}) as study:
        est = study.run(Step(name="estimate", key={"data_fingerprint": fp, ...}, work=estimate_into,
                             read=read_jstar, log=log_estimate, doing="exact estimator on local engine"))
        est.value, est.skipped, est.logged      # the J* table, whether it was reused, its MLflow run id
        models = study.run_together("train", steps, work=train_ladder, what="model(s) to train")
    study.done                                  # {stage name: Done}, in the order the stages were declared

A stage (`Step`) names
  key    the inputs its outputs depend on, hashed into its folder's name (`jobs.stages.Stage`); a stage
         that reads another names it by its hash, so a changed input reruns everything after it;
  work   what writes its outputs into the folder; returns the summary its DONE.json records;
  read   what later stages get from it, read back from the folder: the same for a stage run now and one
         finished earlier (default: the DONE.json summary);
  log    what is recorded once it is done, run or skipped (e.g. its MLflow child run; `Done.skipped`
         says which); its return value is kept as `Done.logged`. A rerun of the same study continues
         its earlier parent run (`open_study`): a skipped stage then keeps the child run it has there
         (its id is `Done.logged`) instead of logging another;
  doing  what the log says while it runs.

The runner, for each stage: DONE.json there -> "stage NAME: finished earlier in DIR, skipped"; else
"stage NAME: DOING into DIR", the folder made (config.json), `work`, DONE.json written last; then `read`
and `log`. Stages that run at once (a ladder of models) go through `run_together`: the finished ones are
skipped, the others handed to one `work` that reports each as it ends. A rerun does no finished work
again; a stage killed half-way has no DONE.json and runs again, resuming from what its work keeps (a J*
work folder, the newest training checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lossfloor.jobs.stages import Stage

STUDY_KEY_TAG = "lossfloor.study_key"  # a study parent run: the hash of the study, its run name and params
STAGE_HASH_TAG = "lossfloor.stage_hash"  # a stage's child run: the stage's hash (`Study.stage_tags`)


@dataclass(frozen=True)
class Done:
    """A stage the runner is through with: its folder, what it gives later stages (`Step.read`), whether a
    finished folder was reused, and what its `Step.log` returned."""

    stage: Stage
    value: object
    skipped: bool
    logged: object = None


@dataclass(frozen=True, kw_only=True)
class Step:
    """One stage of a study, declared (module docstring)."""

    name: str  # e.g. "estimate", "train-<model>", "fit"
    key: dict  # the inputs its outputs depend on, hashed into the folder name
    work: Callable[[Path], dict] | None = None  # writes into the folder; None: `run_together`'s work runs it
    read: Callable[[Stage], object] = Stage.result
    log: Callable[[Done], object] | None = None
    doing: str = ""
    folder: str | None = None  # the folder's name when the study names it; default <name>-<hash>

    def stage(self, out: Path) -> Stage:
        return Stage(self.name, self.key, Path(out), folder=self.folder)


class Study:
    """The runner of a study's stages in `out`, logging on `log` (the study's logger), under the study's
    MLflow parent run (`parent`, in `experiment` of the store at `tracking_uri`; made by `open_study`)."""

    def __init__(self, *, name: str, out: Path, log: logging.Logger, parent, experiment: str, tracking_uri: str,
                 continued: bool = False):
        self.name, self.out, self.log = name, Path(out), log
        self.parent, self.experiment, self.tracking_uri = parent, experiment, tracking_uri
        self.continued = continued  # the parent run is an earlier run of the same study (`open_study`)
        self.done: dict[str, Done] = {}

    def run(self, step: Step) -> Done:
        """Skip the stage if finished, else run and finish it; then read and log it (module docstring)."""
        stage = step.stage(self.out)
        skipped = stage.done
        if skipped:
            self.log.info("stage %s: finished earlier in %s, skipped", step.name, stage.dir)
        else:
            self.log.info("stage %s: %s into %s", step.name, step.doing, stage.dir)
            stage.finish(step.work(stage.begin()))
        self.done[step.name] = done = self._through(step, stage, skipped)
        return done

    def run_together(self, name: str, steps: Sequence[Step],
                     work: Callable[[list[Stage], Callable[[Stage, dict], None]], None], *, what: str) -> list[Done]:
        """Stages whose work runs at once: `work(todo, finished)` runs the unfinished ones (`todo`, in the
        order of `steps`) and calls `finished(stage, summary)` as each one ends, on this process; the
        runner then finishes, reads and logs it. The skipped ones are read and logged after the work."""
        stages = [step.stage(self.out) for step in steps]
        skipped = {stage.name: stage.done for stage in stages}
        for stage in stages:
            if skipped[stage.name]:
                self.log.info("stage %s: finished earlier in %s, skipped", stage.name, stage.dir)
        todo = [stage for stage in stages if not skipped[stage.name]]
        self.log.info("stage %s: %d %s, %d finished earlier", name, len(todo), what, len(stages) - len(todo))
        by_name = {step.name: step for step in steps}
        through: dict[str, Done] = {}

        def finished(stage: Stage, summary: dict) -> None:
            stage.finish(summary)
            through[stage.name] = self._through(by_name[stage.name], stage, False)

        if todo:
            work(todo, finished)
        for stage in stages:
            if skipped[stage.name]:
                through[stage.name] = self._through(by_name[stage.name], stage, True)
        for step in steps:
            self.done[step.name] = through[step.name]
        return [through[step.name] for step in steps]

    def _through(self, step: Step, stage: Stage, skipped: bool) -> Done:
        done = Done(stage, step.read(stage), skipped)
        if step.log is None:
            return done
        return dataclasses.replace(done, logged=(skipped and self._logged_earlier(stage)) or step.log(done))

    def _logged_earlier(self, stage: Stage) -> str | None:
        """The child run a continued parent already holds for this stage (by its hash), else None."""
        if not self.continued:
            return None
        from lossfloor.tracking.runs import finished_run

        return finished_run(self.tracking_uri, self.experiment, {STAGE_HASH_TAG: stage.hash},
                            parent_run_id=self.parent.run_id)

    def child(self, run_name: str, tags: Mapping[str, object]) -> dict:
        """The keyword arguments that make a `lossfloor.jobs.record` run a child of this study's parent run."""
        return {"experiment": self.experiment, "run_name": run_name, "parent_run_id": self.parent.run_id,
                "tracking_uri": self.tracking_uri, "tags": dict(tags)}

    def stage_tags(self, done: Done, **extra) -> dict:
        """A stage's child-run tags: the stage kind (`lossfloor.stage`, the study contract of
        `lossfloor.tracking.artifacts`: estimate, train, fit), the study, the stage folder and hash, and
        whether the stage was reused (`lossfloor.cached`)."""
        from lossfloor.tracking.artifacts import STAGE_TAG

        stage = done.stage
        return {STAGE_TAG: stage.name.split("-")[0], "lossfloor.study": self.name,
                "lossfloor.stage_dir": str(stage.dir), STAGE_HASH_TAG: stage.hash,
                "lossfloor.cached": str(done.skipped).lower(), **extra}


@contextlib.contextmanager
def open_study(*, name: str, out: Path, log: logging.Logger, experiment: str, run_name: str,
               tags: Mapping[str, object], params: Mapping[str, object], tracking_uri: str) -> Iterator[Study]:
    """A `Study` with its MLflow parent run (`study.parent`, holding `params`), which ends FINISHED, or
    FAILED / KILLED when the study stops on an error or a signal (lossfloor.tracking.start_run).

    A rerun adds no runs: the parent is tagged with the hash of the study, its run name and params
    (STUDY_KEY_TAG); a FINISHED parent with that tag is continued instead of a new one made, and a
    stage it skips keeps the child run that parent holds for it (`Study.run`)."""
    from lossfloor.hashing import config_hash
    from lossfloor.tracking import start_run
    from lossfloor.tracking.runs import finished_run

    key = config_hash({"study": name, "run_name": run_name, "params": dict(params)})
    earlier = finished_run(tracking_uri, experiment, {STUDY_KEY_TAG: key})
    with start_run(experiment=experiment, run_name=run_name, tags={**tags, STUDY_KEY_TAG: key},
                   tracking_uri=tracking_uri, run_id=earlier) as parent:
        if earlier is None:
            parent.log_params(params)
        else:
            log.info("MLflow: the same study ran before: continuing its parent run %s", earlier)
        yield Study(name=name, out=out, log=log, parent=parent, experiment=experiment, tracking_uri=tracking_uri,
                    continued=earlier is not None)


def tracking_uri(uri: str | None) -> str:
    """Where a study's runs go (the flag, else $MLFLOW_TRACKING_URI, else ~/lossfloor/mlflow.db), without
    opening the store: what a --dry-run prints."""
    from lossfloor.tracking import tracking_uri as resolve

    return resolve(uri)


def check_outputs(out: str | os.PathLike, uri: str | None) -> str:
    """Before a study's first stage: --out can be written and the tracking store opens; its URI."""
    from lossfloor.atomic import check_writable
    from lossfloor.tracking import check_store

    check_writable(out, folder=True)
    return check_store(uri)


def attach_ray(address: str | None) -> None:
    """A study on the ray engine attaches before its first stage (to the cluster at `address`, else a
    local Ray): every stage's Ray work then runs there, and an address nobody answers on fails now,
    naming --address."""
    from lossfloor.ray.cluster import connect

    connect(address)
