"""A scaling study read back from MLflow alone, and the runs, tags and artifacts it must leave there.

The contract (names are stable; `lossfloor dashboard`, i.e. `lossfloor.jobs.dashboard`, reads exactly these):

  parent    one top-level run (no `mlflow.parentRunId` tag), e.g. `start_run(experiment=...,
            tags={"lossfloor.kind": "study", "lossfloor.study": NAME})` (those two tags are the
            convention of every study, not required here). Receives the artifact `dashboard.html`.
  children  runs in the parent's experiment with tag `mlflow.parentRunId` = the parent's id
            (`start_run(parent_run_id=...)` / `log_estimate(parent_run_id=...)`) and tag
            `lossfloor.stage` set to one of:
    estimate  exactly one. Artifact `jstar.parquet` at the artifact root: the J* table as `log_estimate`
              writes it (`lossfloor.floor` table, x0 target recommended), e.g.
              log_estimate(table, params=..., parent_run_id=parent.run_id, tags={"lossfloor.stage": "estimate"})
    train     one or more, one per model. Artifact `loss_curve.parquet` at the artifact root
              (`lossfloor.train.curves` schema: run, model, params, step, images, flops, sigma (null =
              total), loss, gap, j_star). A model name appears in one train run only.
    fit       exactly one. Artifact `fits.json` at the artifact root: a JSON object whose keys are
              "total" (the sigma-null rows) or "sigma=<σ formatted with .6g>" and whose values are
              `ScalingFits.to_dict()`; write it with `log_fits(run, [fits_total, fits_at_sigma, ...])`.
              Optional artifact `loss_curve.parquet` (the train runs' schema, all models): the curves
              the fits were made on when they are not the train runs' own (e.g. the networks under a
              post-hoc EMA); the page then draws these.
    quality   optional, at most one. Artifact `quality.json` at the artifact root: {"metrics": [fd | fid |
              fd_dinov2, ...], "features": {metric: extractor spec}, "n_samples", "seeds", "models": {model:
              {"flops": training FLOPs of the checkpoint evaluated, "params", <metric>: {"mean", "std", "min",
              "max", "per_seed"}}}} (the scaling study's sample-quality stage, `lossfloor evaluate`'s
              numbers); metrics `<metric>/<model>` and `<metric>_std/<model>`, write them with `log_quality`.
  Children that ended FAILED or KILLED are ignored (a retried stage leaves one behind); FINISHED and
  RUNNING ones are read. Other children (no `lossfloor.stage` tag) are ignored.

Which study: `run_id=` names the parent (a child's id is followed to its parent). `experiment=` picks
the most recently started top-level run of that experiment that has at least one child tagged
`lossfloor.stage` (so an experiment's unrelated top-level runs, e.g. lone estimates, are skipped).

    study = read_study(experiment="scaling", tracking_uri=uri)   # Study: jstar, curves, fits, run ids
    log_dashboard(study.parent_run_id, html, tracking_uri=uri)   # -> artifact dashboard.html

Every missing piece raises `InputError` naming the run and what is missing.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lossfloor.errors import InputError
from lossfloor.floor import JStarTable, read_table
from lossfloor.tracking.runs import PARENT_RUN_TAG, TrackedRun, check_store, client

STAGE_TAG = "lossfloor.stage"
STAGES = ("estimate", "train", "fit")
QUALITY_STAGE = "quality"  # optional (the module docstring)
JSTAR_ARTIFACT = "jstar.parquet"  # as written by lossfloor.tracking.estimate.log_jstar
CURVE_ARTIFACT = "loss_curve.parquet"  # as written by lossfloor.train (curves.CURVE_SCHEMA)
FITS_ARTIFACT = "fits.json"
QUALITY_ARTIFACT = "quality.json"
DASHBOARD_ARTIFACT = "dashboard.html"
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
IGNORED_STATUSES = ("FAILED", "KILLED")
TOTAL_KEY = "total"


def fits_key(sigma: float | None) -> str:
    """The fits.json key of a quantity: "total" for the total loss, else "sigma=<σ:.6g>"."""
    return TOTAL_KEY if sigma is None else f"sigma={float(sigma):.6g}"


def log_fits(run: TrackedRun, fits: Iterable) -> dict[str, dict]:
    """Log `fits.json` (see the module docstring) into `run`; `fits` are ScalingFits or their dicts.

    Returns the logged object. Raises ValueError when two fits are of the same quantity.
    """
    out: dict[str, dict] = {}
    for f in fits:
        d = f.to_dict() if hasattr(f, "to_dict") else dict(f)
        key = fits_key(d.get("sigma"))
        if key in out:
            raise ValueError(f"fits: two fits of the same quantity {key!r}")
        out[key] = d
    with tempfile.TemporaryDirectory(prefix="lossfloor-mlflow-") as tmp:
        path = Path(tmp) / FITS_ARTIFACT
        path.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        run.log_artifact(path)
    return out


def check_quality(quality: object, where: str) -> dict:
    """quality.json (module docstring) checked: InputError naming `where` and the first thing missing."""
    if not isinstance(quality, dict) or not isinstance(quality.get("metrics"), list) \
            or not isinstance(quality.get("models"), dict) or not quality["models"]:
        raise InputError(f"{where}: expected an object with a list 'metrics' and an object 'models' of one or more models")
    for model, row in quality["models"].items():
        if not isinstance(row, dict) or not isinstance(row.get("flops"), int | float) or not row["flops"] > 0:
            raise InputError(f"{where}: model {model!r}: expected a positive number 'flops'")
        for metric in quality["metrics"]:
            m = row.get(metric)
            if not isinstance(m, dict) or not all(isinstance(m.get(k), int | float) for k in ("mean", "std")):
                raise InputError(f"{where}: model {model!r}: expected {metric!r} with numbers 'mean' and 'std'")
    return quality


def log_quality(run: TrackedRun, quality: Mapping, path: str | os.PathLike) -> None:
    """Log a study's sample quality into `run`: metrics `<metric>/<model>` (the mean over seeds) and
    `<metric>_std/<model>`, and the file `path` as the artifact quality.json (module docstring)."""
    check_quality(dict(quality), QUALITY_ARTIFACT)
    if Path(path).name != QUALITY_ARTIFACT:
        raise ValueError(f"log_quality: the file must be named {QUALITY_ARTIFACT}, got {path}")
    run.log_metrics({f"{k}{suffix}/{model}": row[k][stat] for model, row in quality["models"].items()
                     for k in quality["metrics"] for suffix, stat in (("", "mean"), ("_std", "std"))})
    run.log_artifact(path)


def log_dashboard(parent_run_id: str, html: str, *, tracking_uri: str | None = None) -> None:
    """Log the page as the artifact `dashboard.html` of the study's parent run (replacing an older one)."""
    c = client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="lossfloor-mlflow-") as tmp:
        path = Path(tmp) / DASHBOARD_ARTIFACT
        path.write_text(html, encoding="utf-8")
        c.log_artifact(parent_run_id, os.fspath(path))


# ---------------------------------------------------------------------------------------------------
# Reading a study back


@dataclass(frozen=True)
class Study:
    """A scaling study as read from MLflow: its tables and the runs they came from."""

    tracking_uri: str
    experiment: str
    parent_run_id: str
    parent_run_name: str
    jstar: JStarTable
    curves: pa.Table  # the train runs' loss_curve.parquet, concatenated (run order: start time)
    fits: dict[str, dict]  # fits.json: "total" | "sigma=..." -> ScalingFits.to_dict()
    runs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # stage -> child run ids
    data: str = ""  # the data set's name as the study was given it (its `data` param)
    quality: dict | None = None  # the quality child's quality.json, None when the study has none
    ema: str = ""  # the weights the fitted curves evaluate (the parent's `ema` param), "" when not recorded

    def about(self) -> dict[str, str]:
        """Where the page came from, for its header."""
        return {
            "tracking URI": re.sub(r"//[^/@]*@", "//", self.tracking_uri),  # never a user:password@ in a page
            "experiment": self.experiment,
            "study run": f"{self.parent_run_name} ({self.parent_run_id})",
            **{f"{stage} runs": ", ".join(ids) for stage, ids in self.runs.items()},
            **({"weights (EMA)": self.ema} if self.ema else {}),
        }


def _client(uri: str | None) -> MlflowClient:
    """A client for an existing store: a sqlite:/// URI must name an existing file (never create one)."""
    return client(check_store(uri, must_exist=True))


def _search(c: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    """Every active run matching the filter, newest first (all pages)."""
    runs, token = [], None
    while True:
        page = c.search_runs(experiment_ids, filter_string, max_results=1000,
                             order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _get_run(c: MlflowClient, run_id: str) -> Run:
    try:
        return c.get_run(run_id)
    except MlflowException:
        raise InputError(f"--run: no run {run_id!r} in {c.tracking_uri}") from None


def find_parent(c: MlflowClient, *, experiment: str | None = None, run_id: str | None = None) -> Run:
    """The study's parent run: `run_id` (or its parent), or the latest study of `experiment`."""
    if (experiment is None) == (run_id is None):
        raise InputError("give exactly one of --experiment NAME or --run ID")
    if run_id is not None:
        run = _get_run(c, run_id)
        parent = run.data.tags.get(PARENT_RUN_TAG)
        return _get_run(c, parent) if parent else run
    exp = c.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in c.search_experiments())
        raise InputError(f"--experiment: no experiment {experiment!r} in {c.tracking_uri} "
                         f"(has: {', '.join(names) or 'none'})")
    staged = _search(c, [exp.experiment_id], f"tags.`{STAGE_TAG}` LIKE '%'")
    parent_ids = {r.data.tags[PARENT_RUN_TAG] for r in staged if r.data.tags.get(PARENT_RUN_TAG)}
    parents = [_get_run(c, i) for i in parent_ids]
    parents = [p for p in parents if PARENT_RUN_TAG not in p.data.tags and p.info.lifecycle_stage == "active"]
    if not parents:
        raise InputError(
            f"--experiment {experiment!r}: no study found, i.e. no top-level run with children tagged "
            f"{STAGE_TAG} ({'|'.join(STAGES)}); see lossfloor.tracking.artifacts for what a study logs"
        )
    return max(parents, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def children_by_stage(c: MlflowClient, parent: Run) -> dict[str, list[Run]]:
    """The parent's children per `lossfloor.stage`, oldest first, FAILED/KILLED ones left out."""
    kids = _search(c, [parent.info.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'")
    out: dict[str, list[Run]] = {s: [] for s in (*STAGES, QUALITY_STAGE)}
    for run in reversed(kids):  # oldest first
        stage = run.data.tags.get(STAGE_TAG)
        if stage in out and run.info.status not in IGNORED_STATUSES:
            out[stage].append(run)
    return out


def _one(parent: Run, stage: str, runs: list[Run]) -> Run:
    name = parent.info.run_id
    if not runs:
        raise InputError(f"run {name} has no child with {STAGE_TAG}={stage} (FAILED/KILLED children are ignored)")
    if len(runs) > 1:
        ids = ", ".join(r.info.run_id for r in runs)
        raise InputError(f"run {name} has {len(runs)} children with {STAGE_TAG}={stage} ({ids}); expected one")
    return runs[0]


def _download(c: MlflowClient, run: Run, artifact: str, dst: Path) -> Path:
    """Download one artifact at the run's artifact root, or InputError naming what the run has."""
    have = [f.path for f in c.list_artifacts(run.info.run_id)]
    if artifact not in have:
        stage = run.data.tags.get(STAGE_TAG)
        raise InputError(f"run {run.info.run_id} ({STAGE_TAG}={stage}) has no artifact {artifact} "
                         f"(has: {', '.join(have) or 'none'})")
    folder = dst / run.info.run_id
    folder.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get(PROGRESS_BAR_ENV)
    os.environ[PROGRESS_BAR_ENV] = "false"  # a bar per small table would bury the CLI's one-line output
    try:
        return Path(c.download_artifacts(run.info.run_id, artifact, os.fspath(folder)))
    finally:
        if saved is None:
            os.environ.pop(PROGRESS_BAR_ENV, None)
        else:
            os.environ[PROGRESS_BAR_ENV] = saved


def _read_jstar(path: Path, run: Run) -> JStarTable:
    try:
        return read_table(path)
    except InputError as e:
        raise InputError(f"run {run.info.run_id} artifact {JSTAR_ARTIFACT}: {e}") from None


def _read_curves(paths: list[tuple[Run, Path]]) -> pa.Table:
    from lossfloor.train.curves import check_curves

    tables, owner = [], {}
    for run, path in paths:
        where = f"run {run.info.run_id} artifact {CURVE_ARTIFACT}"
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{where}: not a readable parquet file ({type(e).__name__})") from None
        check_curves(table, where)
        for model in table.column("model").unique().to_pylist():
            if model in owner:
                raise InputError(f"{where}: model {model!r} is also in run {owner[model]}; "
                                 f"give each train run its own model name")
            owner[model] = run.info.run_id
        tables.append(table.replace_schema_metadata(None))
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as e:
        raise InputError(f"{CURVE_ARTIFACT}: the train runs' tables do not share a schema ({e})") from None


def _read_fits(path: Path, run: Run) -> dict[str, dict]:
    where = f"run {run.info.run_id} artifact {FITS_ARTIFACT}"
    try:
        fits = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise InputError(f"{where}: not readable JSON ({e})") from None
    from lossfloor.scaling.fits import check_fits_json as check_fits

    return check_fits(fits, where)


def _read_quality(path: Path, run: Run) -> dict:
    where = f"run {run.info.run_id} artifact {QUALITY_ARTIFACT}"
    try:
        quality = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise InputError(f"{where}: not readable JSON ({e})") from None
    return check_quality(quality, where)


def read_study(*, experiment: str | None = None, run_id: str | None = None,
               tracking_uri: str | None = None) -> Study:
    """Find a study (module docstring: which one) and read its J* table, loss curves and fits."""
    c = _client(tracking_uri)
    parent = find_parent(c, experiment=experiment, run_id=run_id)
    stages = children_by_stage(c, parent)
    estimate, fit = _one(parent, "estimate", stages["estimate"]), _one(parent, "fit", stages["fit"])
    if not stages["train"]:
        _one(parent, "train", [])
    with tempfile.TemporaryDirectory(prefix="lossfloor-study-") as tmp:
        dst = Path(tmp)
        jstar = _read_jstar(_download(c, estimate, JSTAR_ARTIFACT, dst), estimate)
        fitted = CURVE_ARTIFACT in {f.path for f in c.list_artifacts(fit.info.run_id)}  # the fits' own curves
        curves = _read_curves([(r, _download(c, r, CURVE_ARTIFACT, dst)) for r in ([fit] if fitted else stages["train"])])
        fits = _read_fits(_download(c, fit, FITS_ARTIFACT, dst), fit)
        quality = None
        if stages[QUALITY_STAGE]:
            run = _one(parent, QUALITY_STAGE, stages[QUALITY_STAGE])
            quality = _read_quality(_download(c, run, QUALITY_ARTIFACT, dst), run)
    return Study(
        tracking_uri=c.tracking_uri,
        experiment=c.get_experiment(parent.info.experiment_id).name,
        parent_run_id=parent.info.run_id,
        parent_run_name=parent.info.run_name or "",
        jstar=jstar,
        curves=curves,
        fits=fits,
        runs={s: tuple(r.info.run_id for r in stages[s]) for s in (*STAGES, QUALITY_STAGE)
              if s in STAGES or stages[s]},
        data=parent.data.params.get("data", "") or estimate.data.params.get("data", ""),
        ema=parent.data.params.get("ema", ""),
        quality=quality,
    )


__all__ = [
    "CURVE_ARTIFACT",
    "DASHBOARD_ARTIFACT",
    "FITS_ARTIFACT",
    "JSTAR_ARTIFACT",
    "QUALITY_ARTIFACT",
    "QUALITY_STAGE",
    "STAGES",
    "STAGE_TAG",
    "Study",
    "check_quality",
    "children_by_stage",
    "find_parent",
    "fits_key",
    "log_dashboard",
    "log_fits",
    "log_quality",
    "read_study",
]
