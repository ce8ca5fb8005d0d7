"""The scaling study's page (Xu et al. 2026, §5): J*(σ) with σ*, loss vs compute per σ with the envelope,
raw vs gap-corrected power-law fits, hold-out predictions of the largest model, and the table of fits, as
one standalone HTML file that opens offline (plotly.js embedded once).

    html = build_dashboard(jstar, curves, fits, title="EDM2 scaling, ImageNet-512")   # a str
    write_dashboard(jstar, curves, fits, "scaling.html", title=...)                   # atomic
    html, study = from_mlflow(experiment="scaling", out="scaling.html")   # read back from MLflow alone,
                                                                          # logged as dashboard.html

Inputs: `jstar` a `lossfloor.floor.JStarTable` (or None), `curves` the loss curves (a pyarrow Table in the
`lossfloor.train.curves` schema, e.g. the train runs' loss_curve.parquet concatenated), `fits` a dict
"total" | "sigma=<σ>" -> `ScalingFits.to_dict()`. What a study must log for `from_mlflow` (and so for
`lossfloor dashboard`) is the contract in `lossfloor.tracking.artifacts`.
"""

from __future__ import annotations

import html as html_lib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa

from dashboards import Section, page_html, write_page
from lossfloor.errors import InputError
from lossfloor.fmt import num

SECTION_TITLES = (
    "Optimal loss J*(σ)",
    "Loss vs compute per σ",
    "Raw vs gap-corrected fits",
    "Hold-out: predicting the largest model",
    "Fits",
)


def _as_table(curves) -> pa.Table:
    if isinstance(curves, pa.Table):
        return curves
    if hasattr(curves, "to_arrow"):  # a polars DataFrame
        return curves.to_arrow()
    raise InputError(f"curves: expected a pyarrow Table (lossfloor.train.curves schema), got {type(curves).__name__}")


def fits_table_html(fits: Mapping[str, dict]) -> str:
    """The fits as an HTML table (one row per quantity and form), then each quantity's notes."""
    from lossfloor.plots_scaling import FIT_TABLE_COLUMNS, fit_table_rows, ordered_fits, quantity_label

    e = html_lib.escape
    head = "".join(f"<th>{e(c)}</th>" for c in FIT_TABLE_COLUMNS)
    body, last = [], None
    for row in fit_table_rows(fits):
        cls = ' class="first"' if row["quantity"] != last else ""
        last = row["quantity"]
        body.append(f"<tr{cls}>" + "".join(f"<td>{e(row[c])}</td>" for c in FIT_TABLE_COLUMNS) + "</tr>")
    notes = []
    for _, f in ordered_fits(fits):
        items = list(f.get("notes") or [])
        cons = f.get("consistency")
        if cons:
            inside = cons.get("j_star_in_offset_interval")
            where = "" if inside is None else (" (J* inside E's interval)" if inside else " (J* outside E's interval)")
            items.append(f"free-offset E = {num(cons.get('offset'))} vs J* = {num(cons.get('j_star'))}{where}")
        boot = f.get("bootstrap") or {}
        items.append(f"{f.get('n_models')} models, {f.get('n_envelope_points')} envelope points, "
                     f"bootstrap {boot.get('n', 0)} over {boot.get('unit', 'model')}s (seed {boot.get('seed')})")
        notes.append(f"<li><b>{e(quantity_label(f.get('sigma')))}</b>: " + "; ".join(e(str(i)) for i in items) + "</li>")
    return (f'<div class="table-wrap"><table class="fits"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>'
            f'<p class="note">Intervals: bootstrap 95% percentile over models. ★: the form that best predicts '
            f'the held-out largest model (lowest log-RMSE); choose forms on that, not on ρ.</p>'
            f'<ul class="note">{"".join(notes)}</ul>')


def build_dashboard(
    jstar,
    curves,
    fits: Mapping[str, dict],
    *,
    title: str = "Scaling study",
    sigmas: Sequence[float] | None = None,
    about: Mapping[str, str] | None = None,
) -> str:
    """The page as HTML text (module docstring). sigmas: the per-σ loss panels (default: the fitted σ);
    about: key/value lines shown under the title (e.g. where the runs are)."""
    from lossfloor.plots import jstar_figure
    from lossfloor.plots_scaling import (
        check_curves,
        check_fits,
        fit_lines_figure,
        holdout_figure,
        loss_vs_flops_figure,
    )

    curves = check_curves(_as_table(curves))
    fits = check_fits(dict(fits), "fits")
    if jstar is None:
        first = Section(SECTION_TITLES[0], ['<p class="note">No J* table was given.</p>'])
    else:
        row = jstar.rows()[0]
        label = (row.get("dataset_fingerprint") or "")[:12] or "data"
        first = Section(SECTION_TITLES[0], [jstar_figure({label: {row["target"]: jstar}}, title="Optimal loss J*(σ)")],
                        intro=f"{row['estimator']} estimator, {row['n_queries']} queries, target {row['target']}.")
    hold = holdout_figure(curves, fits)
    sections = [
        first,
        Section(SECTION_TITLES[1], [loss_vs_flops_figure(curves, fits, sigmas=sigmas, jstar=jstar)]),
        Section(SECTION_TITLES[2], [fit_lines_figure(fits)]),
        Section(SECTION_TITLES[3], [hold] if hold is not None else
                ['<p class="note">No fit has a hold-out (fit_all(..., holdout=True) needs 2 or more models).</p>']),
        Section(SECTION_TITLES[4], [fits_table_html(fits)]),
    ]
    return page_html(title, sections, about=about)


def write_dashboard(jstar, curves, fits: Mapping[str, dict], path: str | os.PathLike, **kwargs) -> Path:
    """`build_dashboard(jstar, curves, fits, **kwargs)` written atomically to `path`."""
    return write_page(build_dashboard(jstar, curves, fits, **kwargs), path)


def from_mlflow(
    *,
    experiment: str | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    out: str | os.PathLike | None = None,
    log: bool = True,
    title: str | None = None,
    sigmas: Sequence[float] | None = None,
):
    """Rebuild the page from a study's runs (contract: `lossfloor.tracking.artifacts`).

    Writes it to `out` (when given) and, with `log`, to the parent run as `dashboard.html`.
    Returns (html, Study).
    """
    from lossfloor.tracking.artifacts import log_dashboard, read_study

    study = read_study(experiment=experiment, run_id=run_id, tracking_uri=tracking_uri)
    page = build_dashboard(study.jstar, study.curves, study.fits, sigmas=sigmas, about=study.about(),
                           title=title or f"Scaling study: {study.parent_run_name or study.parent_run_id}")
    if out is not None:
        write_page(page, out)
    if log:
        log_dashboard(study.parent_run_id, page, tracking_uri=study.tracking_uri)
    return page, study


__all__ = ["SECTION_TITLES", "build_dashboard", "fits_table_html", "from_mlflow", "write_dashboard"]
