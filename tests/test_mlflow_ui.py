"""The MLflow UI link lossfloor prints opens the runs table (the model-training view), checked in a
headless Chromium against a real `mlflow ui` on this machine: MLflow 3's UI picks its GenAI or its
model-training view from the address's `workflowType` parameter, not from the experiment's tags."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from browser import find_chromium, render
from lossfloor.tracking import start_run
from lossfloor.tracking.runs import ui_link

pytestmark = pytest.mark.e2e
START_S = 90
GENAI_VIEW = "Detect Issues"  # the GenAI overview's call to action; the runs table never shows it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(address, experiment id, run name): `mlflow ui` on a store holding one lossfloor run."""
    tmp = tmp_path_factory.mktemp("mlflow-ui")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    with start_run(experiment="scaling", run_name="tiny-edm2-baseline", tracking_uri=store) as run:
        run.log_params({"preset": "tiny"})
        run.log_metrics({"loss": 0.25})
    port = _free_port()
    log = tmp / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", store,
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(address + "/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"no answer on {address}/health after {START_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield address, run.experiment_id, "tiny-edm2-baseline"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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
