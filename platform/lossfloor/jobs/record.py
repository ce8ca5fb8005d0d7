"""What a job keeps of its results in MLflow and on pages: the figures drawn here (`lossfloor.pages`, and
`jobs.samples` for a samples grid), handed finished to `lossfloor.tracking`, which logs what it is given.

    run_id = record_estimate(table, params={"data": "bundled:digits"})          # + jstar.html
    run_id = record_training("runs/tiny", params={"data": "bundled:digits"})    # + loss_curve.html, samples.png
    run_id = record_fits(fits, params={...}, metrics={...}, tags={...}, **study.child("fit", tags))
    jstar_page({"digits": {"x0": table, "eps": eps}}, targets=("x0", "eps"), title="...", out="survey.html")

The keyword arguments after the first are those of `lossfloor.tracking.log_estimate` / `log_training`
(experiment, run_name, parent_run_id, tags, tracking_uri); what each run holds is documented there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path


def record_estimate(table, *, params: Mapping[str, object], also: Sequence = (), run_name: str | None = None,
                    **run) -> str:
    """`lossfloor.tracking.log_estimate` with the estimate's figure (jstar.html: J*(σ) log-log with its
    95 % interval, σ* dashed, one panel per target of `table` and `also`), named `run_name` or by the data."""
    from lossfloor.pages.html import figure_page
    from lossfloor.pages.jstar import data_label, jstar_figure
    from lossfloor.tracking import log_estimate

    by_target = {t.rows()[0]["target"]: t for t in (table, *also)}
    name = run_name or data_label(str(params.get("data") or ""), table.rows()[0]["dataset_fingerprint"])
    page = figure_page(jstar_figure({name: by_target}, title=f"J*(σ) of {name}"))
    return log_estimate(table, params=params, also=also, run_name=run_name, figure_html=page, **run)


def record_training(out_dir, *, samples: int | str | None = "auto", device: str | None = None, **run) -> str:
    """`lossfloor.tracking.log_training` of the run folder `out_dir` with its loss-curve figure
    (loss_curve.html) and, when `jobs.samples.grid_size(samples, ...)` > 0, a samples grid of its newest
    checkpoint (samples.png; "auto": 64 for cheap pixel data, else none; 0 or None: none) on `device`."""
    from lossfloor.jobs.samples import grid_size, samples_grid, write_png
    from lossfloor.pages.html import figure_page
    from lossfloor.pages.training import loss_curve_figure
    from lossfloor.tracking.train import SAMPLES_FILE, log_training
    from lossfloor.train.run_folder import read_run_folder

    info = read_run_folder(out_dir)
    curve_rows, log_rows = info.curve_rows, info.log_rows
    page = figure_page(loss_curve_figure(curve_rows, log_rows, title=info.run)) if curve_rows else None
    n = grid_size(samples, info.config, info.forward_flops, device)
    with tempfile.TemporaryDirectory(prefix="lossfloor-samples-") as tmp:
        png = None
        if n and info.checkpoints:
            png = write_png(samples_grid(info.checkpoints[-1], n, device=device), Path(tmp) / SAMPLES_FILE)
        return log_training(out_dir, info=info, figure_html=page, samples_png=png, **run)


def record_curves(curve_path, *, params: Mapping[str, object], metrics: Mapping[str, float], **run) -> str:
    """A model's loss curves measured without training (a scaling study on EDM2 snapshots) as its own run:
    params, metrics and the artifact loss_curve.parquet (`lossfloor.train.curves` schema, the contract
    `lossfloor.tracking.artifacts` reads); `run`: start_run's arguments."""
    from lossfloor.tracking import start_run

    with start_run(**run) as tracked:
        tracked.log_params(params)
        tracked.log_metrics(metrics)
        tracked.log_artifact(curve_path)
    return tracked.run_id


def record_fits(fits: Mapping[str, dict], *, params: Mapping[str, object], metrics: Mapping[str, float],
                curves: str | os.PathLike | None = None, **run) -> str:
    """A scaling study's fit as its own run: params, metrics, and fits.json (`lossfloor.tracking.artifacts.
    log_fits`: the contract the dashboard reads); `curves`: a file loss_curve.parquet of the curves the fits
    were made on, when they are not the train runs' own (the dashboard then draws it); `run`: start_run's
    arguments (experiment, run_name, parent_run_id, tags, tracking_uri)."""
    from lossfloor.tracking import start_run
    from lossfloor.tracking.artifacts import log_fits

    with start_run(**run) as tracked:
        tracked.log_params(params)
        tracked.log_metrics(metrics)
        log_fits(tracked, fits.values())
        if curves is not None:  # a file named CURVE_ARTIFACT, at the artifact root
            tracked.log_artifact(curves)
    return tracked.run_id


def record_quality(quality: Mapping, path: str | os.PathLike, *, params: Mapping[str, object],
                   files: Mapping[str, Sequence[str | os.PathLike]] | None = None, **run) -> str:
    """A scaling study's sample-quality stage as its own run: params, per model and metric the mean and
    spread over seeds (`lossfloor.tracking.artifacts.log_quality`), the file `path` (quality.json, the
    contract the dashboard reads) and `files` (artifact folder -> statistics files); `run`: start_run's
    arguments."""
    from lossfloor.tracking import start_run
    from lossfloor.tracking.artifacts import log_quality

    with start_run(**run) as tracked:
        tracked.log_params(params)
        log_quality(tracked, quality, path)
        for folder, paths in (files or {}).items():
            for f in paths:
                tracked.log_artifact(f, folder or None)
    return tracked.run_id


def record_claim(claim: Mapping, files: Sequence[str | os.PathLike], *, params: Mapping[str, object], **run) -> str:
    """One claim of the paper-claims study (`lossfloor.claims`) as its own run: params (the claim's data and
    settings), its verdict and statement as tags, every interval of its detail as metrics
    (<name>.mean/.lo/.hi), and `files` (the part's result.json); `run`: start_run's arguments."""
    from lossfloor.tracking import start_run

    with start_run(**run) as tracked:
        tracked.log_params({k: v for k, v in params.items() if v is not None})
        tracked.set_tags({"lossfloor.claim": claim["id"], "lossfloor.verdict": claim["verdict"],
                          "mlflow.note.content": f"{claim['claim']}: {claim['verdict']}. {claim['measured']}"})
        tracked.log_metrics(_interval_metrics(claim["detail"]))
        for f in files:
            tracked.log_artifact(f)
    return tracked.run_id


def _interval_metrics(detail: Mapping, prefix: str = "") -> dict[str, float]:
    """{a.b.mean: .., a.b.lo: .., a.b.hi: ..} for every interval ({mean, lo, hi, n}) nested in `detail`."""
    out: dict[str, float] = {}
    for key, value in detail.items():
        name = f"{prefix}{key}".replace(" ", "_").replace("(", "").replace(")", "").replace("=", "").replace("∞", "inf")
        if isinstance(value, Mapping) and {"mean", "lo", "hi"} <= set(value):
            out.update({f"{name}.{k}": float(value[k]) for k in ("mean", "lo", "hi")})
        elif isinstance(value, Mapping):
            out.update(_interval_metrics(value, f"{name}."))
    return out


def jstar_page(tables: Mapping[str, Mapping[str, object]], *, targets: Sequence[str], title: str,
               out: str | os.PathLike) -> Path:
    """The J* figure of several data sets (`lossfloor.pages.jstar.jstar_figure`: tables[data set][target])
    written as an offline page to `out`; its path."""
    from lossfloor.pages.html import write_html
    from lossfloor.pages.jstar import jstar_figure

    return write_html(jstar_figure(tables, targets=targets, title=title), out)


def claims_page(parts: Mapping[str, Mapping], *, title: str, about: Mapping[str, str],
                out: str | os.PathLike) -> Path:
    """The paper-claims page (`lossfloor.pages.claims.claims_page`) written as an offline page to `out`."""
    from lossfloor.pages.claims import claims_page as page
    from lossfloor.pages.html import write_page

    return write_page(page(parts, title=title, about=about), out)
