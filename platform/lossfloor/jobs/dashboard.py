"""A scaling study's dashboard rebuilt from MLflow alone: read the study's runs, draw the page, write it.

    page, study = dashboard(experiment="scaling", out="scaling.html")   # also logged as dashboard.html

What a study must log for this (its parent run, the children tagged `lossfloor.stage` and their
artifacts) is the contract of `lossfloor.tracking.artifacts`; the page is `lossfloor.pages.scaling`'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def dashboard(*, experiment: str | None = None, run_id: str | None = None, tracking_uri: str | None = None,
              out: str | os.PathLike | None = None, log: bool = True, title: str | None = None,
              sigmas: Sequence[float] | None = None):
    """(page HTML, Study) of the latest study of `experiment`, or of the study run `run_id` (a child's id
    also works). Writes the page to `out` when given and, with `log`, to the parent run as dashboard.html."""
    from lossfloor.pages.html import write_page
    from lossfloor.pages.scaling import build_dashboard
    from lossfloor.tracking.artifacts import log_dashboard, read_study

    study = read_study(experiment=experiment, run_id=run_id, tracking_uri=tracking_uri)
    page = build_dashboard(study.jstar, study.curves, study.fits, sigmas=sigmas, about=study.about(), data=study.data,
                           quality=study.quality,
                           title=title or f"Scaling study {study.parent_run_name or study.parent_run_id}: "
                           "raw vs gap-corrected power laws")
    if out is not None:
        write_page(page, out)
    if log:
        log_dashboard(study.parent_run_id, page, tracking_uri=study.tracking_uri)
    return page, study


def diagnose_dashboard(*, experiment: str = "diagnose", tracking_uri: str | None = None,
                       out: str | os.PathLike | None = None, title: str | None = None):
    """(page HTML, runs) of every model diagnosed in `experiment` (`lossfloor diagnose --mlflow`) on one
    page: their loss and J* per σ overlaid, the relative gaps, and a table of totals."""
    from lossfloor.pages.diagnose import diagnose_page
    from lossfloor.pages.html import write_page
    from lossfloor.tracking.diagnose import read_diagnoses

    runs = read_diagnoses(experiment, tracking_uri=tracking_uri)
    page = diagnose_page({r.name: r.diagnosis for r in runs}, title=title or f"Diagnosed models: {experiment}",
                         about={"experiment": experiment, "runs": ", ".join(r.run_id for r in runs)})
    if out is not None:
        write_page(page, out)
    return page, runs


def is_diagnose_experiment(experiment: str, *, tracking_uri: str | None = None) -> bool:
    """True if `experiment` holds `lossfloor diagnose --mlflow` runs (its dashboard is the diagnose page)."""
    from lossfloor.tracking.diagnose import has_diagnoses

    return has_diagnoses(experiment, tracking_uri=tracking_uri)
