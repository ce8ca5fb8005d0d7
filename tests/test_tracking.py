"""lossfloor.tracking (MLflow) and lossfloor.pages.jstar: what an estimate run holds (with the figure
lossfloor.jobs.record draws), run status on failure, parent/child runs, where runs go, and that the core
stays free of mlflow/plotly/ray."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lossfloor.errors import InputError
from lossfloor.floor import EstimatorConfig, build_table, estimate, read_table
from lossfloor.jobs.record import record_estimate
from lossfloor.pages.html import is_offline_html
from lossfloor.pages.jstar import jstar_figure
from lossfloor.tracking import PARENT_RUN_TAG, client, log_estimate, start_run, tracking_uri
from lossfloor.tracking import runs as runs_mod

SIGMAS = [0.01, 0.1, 0.5, 2.0, 10.0]


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One sqlite store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def est():
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)  # (N, D)
    return estimate(x, SIGMAS, EstimatorConfig(estimator="exact", queries_per_sample=2), progress=False)


def _artifact_text(c, run_id: str, path: str, tmp_path) -> str:
    local = c.download_artifacts(run_id, path, str(tmp_path))
    with open(local, encoding="utf-8") as f:
        return f.read()


def test_log_estimate_holds_params_metrics_table_and_offline_figure(uri, est, tmp_path):
    table = build_table(est, target="x0", fingerprint="fp-test")
    eps = build_table(est, target="eps", fingerprint="fp-test")
    run_id = record_estimate(table, params={"data": "gauss.npy", "engine": "local", "estimator": "cdol"},
                             run_name="gauss", tracking_uri=uri, also=[eps])
    c = client(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert c.get_experiment(run.info.experiment_id).name == "optimal-loss"
    p = run.data.params
    assert p["data"] == "gauss.npy" and p["engine"] == "local"
    assert p["estimator"] == "exact"  # the table's resolved value wins over the caller's
    assert (p["target"], p["subset_size"], p["c"], p["queries_per_sample"], p["seed"]) == ("x0", "64", "1.0", "2", "0")
    assert p["dataset_fingerprint"] == "fp-test" and p["n_sigma"] == "5"

    hist = sorted(c.get_metric_history(run_id, "j_star"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(len(SIGMAS)))
    np.testing.assert_allclose([m.value for m in hist], table.column("j_star"), rtol=1e-12)
    sig = sorted(c.get_metric_history(run_id, "sigma"), key=lambda m: m.step)
    np.testing.assert_allclose([m.value for m in sig], SIGMAS)
    eps_hist = sorted(c.get_metric_history(run_id, "j_star_eps"), key=lambda m: m.step)
    np.testing.assert_allclose([m.value for m in eps_hist], eps.column("j_star"), rtol=1e-12)
    assert run.data.metrics["sigma_star"] == pytest.approx(table.sigma_star)
    assert run.data.tags["lossfloor.kind"] == "estimate"

    names = {a.path for a in c.list_artifacts(run_id)}
    assert {"jstar.parquet", "jstar_eps.parquet", "jstar.html"} <= names
    back = read_table(c.download_artifacts(run_id, "jstar.parquet", str(tmp_path)))
    np.testing.assert_array_equal(back.column("j_star"), table.column("j_star"))
    assert back.sigma_star == table.sigma_star
    html = _artifact_text(c, run_id, "jstar.html", tmp_path)
    assert is_offline_html(html) and len(html) > 1_000_000  # plotly.js embedded, no <script src=...>


def test_undefined_sigma_star_is_a_tag(uri, est):
    high = estimate(np.random.default_rng(1).normal(size=(32, 2)), [5.0, 50.0],
                    EstimatorConfig(estimator="exact", queries_per_sample=1), progress=False)
    table = build_table(high, fingerprint="fp-high")
    assert table.sigma_star is None
    run = client(uri).get_run(log_estimate(table, params={}, tracking_uri=uri))
    assert "sigma_star" not in run.data.metrics and run.data.tags["sigma_star"] == "undefined"


def test_runs_that_fail_end_failed_or_killed(uri, est, monkeypatch):
    c = client(uri)
    with pytest.raises(RuntimeError), start_run(run_name="boom", tracking_uri=uri) as run:
        raise RuntimeError("boom")
    assert c.get_run(run.run_id).info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt), start_run(run_name="interrupted", tracking_uri=uri) as run:
        raise KeyboardInterrupt
    assert c.get_run(run.run_id).info.status == "KILLED"

    def broken(self, *a, **k):
        raise OSError("artifact store unavailable")

    monkeypatch.setattr(runs_mod.TrackedRun, "log_artifact", broken)
    with pytest.raises(OSError, match="artifact store"):
        log_estimate(build_table(est, fingerprint="fp-fail"), params={}, run_name="half", tracking_uri=uri)
    exp = c.get_experiment_by_name("optimal-loss")
    half = c.search_runs([exp.experiment_id], "tags.dataset_fingerprint = 'fp-fail'")
    assert [r.info.status for r in half] == ["FAILED"]
    assert not c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")


def test_child_runs_nest_under_their_parent(uri, est):
    table = build_table(est, fingerprint="fp-child")
    with start_run(experiment="survey-test", run_name="parent", tracking_uri=uri) as parent:
        kids = [log_estimate(table, params={"i": i}, experiment="survey-test", parent_run_id=parent.run_id,
                             run_name=f"child-{i}", tracking_uri=uri) for i in range(2)]
        parent.log_metrics({"sigma_star.a": 0.5})
    c = client(uri)
    found = c.search_runs([parent.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent.run_id}'")
    assert sorted(r.info.run_id for r in found) == sorted(kids)
    assert all(r.info.status == "FINISHED" for r in found)
    assert c.get_run(parent.run_id).data.metrics["sigma_star.a"] == 0.5


def test_a_finished_run_can_be_continued(uri):
    c = client(uri)
    with start_run(run_name="train", tracking_uri=uri) as run:
        run.log_metrics({"loss": 2.0}, step=0)
    with start_run(run_id=run.run_id, tracking_uri=uri) as again:
        assert c.get_run(run.run_id).info.status == "RUNNING"
        again.log_metrics({"loss": 1.0}, step=1)
    assert c.get_run(run.run_id).info.status == "FINISHED"
    assert [m.value for m in sorted(c.get_metric_history(run.run_id, "loss"), key=lambda m: m.step)] == [2.0, 1.0]
    with pytest.raises(InputError, match="no run"):
        with start_run(run_id="0" * 32, tracking_uri=uri):
            pass


def test_tracking_uri_default_env_and_local_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LOSSFLOOR_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tracking_uri() == f"sqlite:///{tmp_path}/home/lossfloor/mlflow.db"  # one place, whatever the cwd
    monkeypatch.setenv("LOSSFLOOR_HOME", str(tmp_path / "lf"))
    assert tracking_uri() == f"sqlite:///{tmp_path}/lf/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri() == "http://mlflow.example:5000"
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    for bad in ("./mlruns", "file:///tmp/mlruns"):
        with pytest.raises(InputError, match="file store"):
            tracking_uri(bad)
    # a relative sqlite store: folder created, artifacts beside the database (not ./mlruns of the cwd)
    monkeypatch.chdir(tmp_path)
    c = client("sqlite:///store/mlflow.db")
    exp_id = runs_mod.experiment_id(c, "where")
    assert (tmp_path / "store" / "mlflow.db").is_file()
    assert c.get_experiment(exp_id).artifact_location == (tmp_path / "store" / "mlartifacts" / "where").as_uri()


def test_figure_panels_and_sigma_star_marks(est):
    tables = {"a": {t: build_table(est, target=t) for t in ("x0", "eps")}}
    fig = jstar_figure(tables)
    zeros = int((est.j_star <= 0).sum())  # J* = 0 points get their own marker trace per panel
    assert len(fig.data) == 2 * (1 + (zeros > 0)) and fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert fig.data[0].error_y.array is not None
    assert [s.x0 for s in fig.layout.shapes] == [tables["a"]["x0"].sigma_star] * 2  # σ* in both panels


CORE = ("diffusion", "data", "floor", "models", "train", "scaling")


@pytest.mark.parametrize("package", CORE)
def test_core_imports_neither_mlflow_nor_plotly_nor_ray(package):
    # every core package and everything it imports at load time, in a fresh interpreter
    code = (f"import sys, importlib, pkgutil, lossfloor.{package} as p; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]; "
            "bad = sorted(m for m in ('mlflow', 'plotly', 'ray', 'polars') if m in sys.modules); "
            "sys.exit(f'lossfloor." + package + " imported {bad}' if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
