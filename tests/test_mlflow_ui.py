"""The MLflow UI link lossfloor prints opens the runs table (the model-training view), checked in a
headless Chromium against a real `mlflow ui` on this machine: MLflow 3's UI picks its GenAI or its
model-training view from the address's `workflowType` parameter, not from the experiment's tags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from browser import find_chromium, render
from lossfloor.tracking import start_run
from lossfloor.tracking.runs import ui_link
from services import free_port, stop, wait_healthy

pytestmark = pytest.mark.e2e
START_S = 90
GENAI_VIEW = "Detect Issues"  # the GenAI overview's call to action; the runs table never shows it


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(address, experiment id, run name): `mlflow ui` on a store holding one lossfloor run."""
    tmp = tmp_path_factory.mktemp("mlflow-ui")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    with start_run(experiment="scaling", run_name="tiny-edm2-baseline", tracking_uri=store) as run:
        run.log_params({"preset": "tiny"})
        run.log_metrics({"loss": 0.25})
    port = free_port()
    log = tmp / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", store,
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, address, log, START_S, "mlflow ui")
        yield address, run.experiment_id, "tiny-edm2-baseline"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()  # installed by the set-up of `make test-e2e` (scripts/setup_browser.sh)
    if path is None:
        pytest.fail("headless Chromium is required for this test: run `make test-e2e` (its set-up installs it)")
    return path


def test_the_printed_link_opens_the_runs_table(ui, chromium, tmp_path):
    address, experiment_id, run_name = ui
    page = render(chromium, ui_link(experiment_id, address=address), tmp_path / "link", screenshot=False,
                  loopback=True, budget_ms=30000)
    assert run_name in page.dom, page.dom[-2000:]
    assert GENAI_VIEW not in page.dom


def test_without_the_view_a_fresh_browser_opens_the_genai_overview(ui, chromium, tmp_path):
    # what a user saw before: the experiment tag alone does not choose the view (and the check above can fail)
    address, experiment_id, run_name = ui
    page = render(chromium, f"{address}/#/experiments/{experiment_id}", tmp_path / "bare", screenshot=False,
                  loopback=True, budget_ms=30000)
    assert GENAI_VIEW in page.dom, page.dom[-2000:]
    assert run_name not in page.dom
