"""One MLflow run per training run, read back from the run's folder (what `lossfloor.train.train` or
`lossfloor.ray.train_on_ray` wrote: loss_curve.parquet, train_log.parquet, checkpoint-<n_img>/).

    run_id = log_training("runs/tiny", params={"data": "bundled:digits", "engine": "local"})

What a run holds (names are stable: dashboards and comparisons read them):

  params    every TrainConfig field (`to_dict()`; the schedule as JSON) plus the resolved values
            (resolved.batch_n_img, resolved.duration_n_img, resolved.lr_ref, resolved.t_ref_iters,
            resolved.warmup_n_img, resolved.schedule), run, model, n_params, forward_flops,
            flop_convention, and the caller's `params` (data source, engine, workers, ...)
  metrics   per train-log row, step = optimizer step:
              train/loss, train/loss_x0, train/gap (with a J* table), train/lr, images, flops
            per evaluation, step = optimizer step (the loop's own report names):
              eval/total, eval/total_gap, eval/total_learned (with EDM2's uncertainty head),
              eval/loss/sigma_<σ:.4g>, eval/gap/sigma_<σ:.4g>
            the last evaluation as curves over σ, step = σ index (ascending σ):
              final/sigma, final/loss, final/gap, final/j_star
            scalars: n_img, steps, training_flops (3 x forward FLOPs x images), forward_flops, n_params
  inputs    the data set (`tracking.datasets`: digest = the fingerprint's first 36 hex digits)
  tags      lossfloor.kind=train, lossfloor.model, lossfloor.run, out_dir, checkpoint (the newest),
            checkpoints (JSON list of every checkpoint folder)
  artifacts loss_curve.parquet and train_log.parquet at the artifact root (the study contract of
            `lossfloor.tracking.artifacts`: tag the run lossfloor.stage=train to make it a study's
            train child), config.json, and what the caller made of the run (`lossfloor.jobs.record.
            record_training` makes both): loss_curve.html (a finished offline page: eval loss per σ and
            training loss against images), samples.png (a grid of samples of the newest checkpoint)
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lossfloor.errors import InputError
from lossfloor.tracking.datasets import log_dataset
from lossfloor.tracking.estimate import EXPERIMENT
from lossfloor.tracking.runs import TrackedRun, sigma_name, start_run
from lossfloor.train.run_folder import CURVE_FILE, LOG_FILE

if TYPE_CHECKING:
    from lossfloor.train.run_folder import RunFolder

SAMPLES_FILE = "samples.png"
FIGURE_FILE = "loss_curve.html"


def train_params(config) -> dict[str, object]:
    """A TrainConfig as run params: its fields and the resolved defaults (module docstring)."""
    from lossfloor.train import resolve

    R = resolve(config)
    params = {k: v for k, v in config.to_dict().items() if v is not None}
    params["preset"] = R.preset.name
    params.update({
        "resolved.batch_n_img": R.batch_n_img, "resolved.duration_n_img": R.duration_n_img,
        "resolved.lr_ref": R.lr_ref, "resolved.t_ref_iters": R.t_ref_iters,
        "resolved.warmup_n_img": R.warmup_n_img, "resolved.eval_every_n_img": R.eval_every_n_img,
        "resolved.schedule": {"kind": R.schedule.kind, **dataclasses.asdict(R.schedule)},
    })
    return params


# --- Logging -------------------------------------------------------------------------------------------


def log_train_run(run: TrackedRun, out_dir, *, params: Mapping[str, object] | None = None,
                  info: RunFolder | None = None, figure_html: str | None = None,
                  samples_png: Path | None = None) -> RunFolder:
    """Log a finished (or paused) training run's folder into an existing MLflow run.

    info: the folder as `lossfloor.train.run_folder.read_run_folder` read it (read here when not given).
      Returns it.
    figure_html, samples_png: the loss-curve figure's page and a samples grid (a PNG file), logged as
      loss_curve.html and samples.png when given.
    """
    from lossfloor.train.run_folder import read_run_folder

    info = info if info is not None else read_run_folder(out_dir)
    cfg = info.config
    curve_rows, log_rows = info.curve_rows, info.log_rows
    if not log_rows:
        raise InputError(f"{Path(out_dir) / LOG_FILE}: no rows (the run has not taken a step)")
    model, n_params = log_rows[-1]["model"], log_rows[-1]["params"]
    run.log_params({**(params or {}), **train_params(cfg), "run": info.run, "model": model,
                    "n_params": n_params, "forward_flops": info.forward_flops,
                    "flop_convention": info.meta.get("flop_convention", "")})
    log_dataset(run, info.meta.get("dataset_fingerprint", ""), source=str((params or {}).get("data") or ""),
                context="training")
    ckpts = [str(p) for p in info.checkpoints]
    run.set_tags({"lossfloor.kind": "train", "lossfloor.model": model, "lossfloor.run": info.run,
                  "out_dir": str(Path(out_dir).absolute()), "checkpoint": ckpts[-1] if ckpts else "none",
                  "checkpoints": ckpts})

    # per train-log row
    steps = [r["step"] for r in log_rows]
    series = {"train/loss": [r["loss"] for r in log_rows], "train/loss_x0": [r["loss_x0"] for r in log_rows],
              "train/lr": [r["lr"] for r in log_rows], "images": [r["images"] for r in log_rows],
              "flops": [r["flops"] for r in log_rows]}
    if all(r["gap"] is not None for r in log_rows):
        series["train/gap"] = [r["gap"] for r in log_rows]
    run.log_series(series, steps=steps)

    # per evaluation (one row per sigma plus the total with sigma null)
    by_step: dict[int, dict[str, float]] = {}
    for r in curve_rows:
        m = by_step.setdefault(r["step"], {})
        if r["sigma"] is None:
            m["eval/total"] = r["loss"]
            if r["gap"] is not None:
                m["eval/total_gap"] = r["gap"]
            if r.get("total_learned") is not None:
                m["eval/total_learned"] = r["total_learned"]
        else:
            m[f"eval/loss/sigma_{sigma_name(r['sigma'])}"] = r["loss"]
            if r["gap"] is not None:
                m[f"eval/gap/sigma_{sigma_name(r['sigma'])}"] = r["gap"]
    for step, metrics in sorted(by_step.items()):
        run.log_metrics(metrics, step=step)
    _, final, _ = info.last_eval()
    if final:
        curves = {"final/sigma": [r["sigma"] for r in final], "final/loss": [r["loss"] for r in final]}
        if all(r["gap"] is not None for r in final):
            curves["final/gap"] = [r["gap"] for r in final]
            curves["final/j_star"] = [r["j_star"] for r in final]
        run.log_series(curves)
    last = log_rows[-1]
    run.log_metrics({"n_img": last["images"], "steps": last["step"], "training_flops": last["flops"],
                     "forward_flops": info.forward_flops, "n_params": n_params}, step=last["step"])

    # artifacts
    with tempfile.TemporaryDirectory(prefix="lossfloor-mlflow-") as tmp:
        tmp = Path(tmp)
        for name in (CURVE_FILE, LOG_FILE):
            run.log_artifact(Path(out_dir) / name)
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n", encoding="utf-8")
        run.log_artifact(tmp / "config.json")
    if samples_png is not None:
        run.log_artifact(samples_png)
    if figure_html is not None:
        run.log_html(figure_html, FIGURE_FILE)
    return info


def log_training(out_dir, *, params: Mapping[str, object] | None = None, experiment: str = EXPERIMENT,
                 run_name: str | None = None, parent_run_id: str | None = None,
                 tags: Mapping[str, object] | None = None, tracking_uri: str | None = None,
                 info: dict | None = None, figure_html: str | None = None, samples_png: Path | None = None) -> str:
    """Log the training run in `out_dir` as its own MLflow run; returns the run id (module docstring).

    run_name: default the training run's name (`TrainConfig.run` or its hash name).
    info, figure_html, samples_png: as for `log_train_run`.
    The MLflow run ends FAILED, never left RUNNING, if logging fails part-way.
    """
    from lossfloor.train.run_folder import read_run_folder

    run_info = info if info is not None else read_run_folder(out_dir)
    if run_name is None:
        run_name = run_info.run or None
    start, end = run_info.span  # the training's own span: the run's duration is the work's, not the logging's
    with start_run(experiment=experiment, run_name=run_name, parent_run_id=parent_run_id, tags=tags,
                   tracking_uri=tracking_uri, start_time=start, end_time=end) as run:
        log_train_run(run, out_dir, params=params, info=run_info, figure_html=figure_html, samples_png=samples_png)
    return run.run_id


__all__ = ["log_train_run", "log_training", "train_params"]
