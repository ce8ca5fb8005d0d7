"""studies/optimal_loss_survey.py: --dry-run, an in-process smoke run, and a submission as a Ray job
(a local head started here, `ray job submit` with cluster/runtime_env.yaml, results read from MLflow)."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lossfloor.diffusion import convert_jstar
from lossfloor.floor import read_table
from lossfloor.pages.html import is_offline_html
from lossfloor.tracking import PARENT_RUN_TAG, client
from ray_head import RAY, job_env, ray_head

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "studies" / "optimal_loss_survey.py"
TARGETS = ("x0", "eps", "vp-v", "fm-velocity")


def _study():
    spec = importlib.util.spec_from_file_location("optimal_loss_survey", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gauss(tmp_path) -> Path:
    path = tmp_path / "gauss.npy"
    np.save(path, np.random.default_rng(0).normal(size=(120, 2, 3)).astype(np.float32))  # (N, 2, 3)
    return path


def _check_store(uri: str, labels: list[str]) -> dict:
    """One FINISHED parent with one FINISHED child per label, each with j_star and its figure."""
    c = client(uri)
    exp = c.get_experiment_by_name("optimal-loss")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if PARENT_RUN_TAG not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "optimal-loss-survey"
    parent = parents[0]
    kids = {r.info.run_name: r for r in runs if r.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id}
    assert sorted(kids) == sorted(labels) and len(runs) == 1 + len(labels)
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in kids.values():
        assert len(c.get_metric_history(r.info.run_id, "j_star")) == len(c.get_metric_history(r.info.run_id, "sigma"))
        assert {"jstar.html", "jstar.parquet"} <= {a.path for a in c.list_artifacts(r.info.run_id)}
        assert f"sigma_star.{r.info.run_name}" in parent.data.metrics
    assert {"optimal_loss_survey.html", "summary.json"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    return kids


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, gauss, capsys):
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    rc = _study().main(["--dry-run", "--data", str(gauss), "--data", "bundled:digits", "--out", str(out),
                        "--tracking-uri", f"sqlite:///{db}"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "digits" in text and "N=1797" in text and "gauss" in text and "N=120" in text
    assert "estimator=exact" in text and "0.002:80:32" in text and "fm-velocity" in text and str(out) in text
    assert not out.exists() and not db.exists()


def test_studies_find_the_package_without_an_install():
    code = ("import sys; sys.path[:] = [p for p in sys.path if not p.rstrip('/').endswith('platform')]; "
            "import importlib.util; assert importlib.util.find_spec('lossfloor') is None; "
            "sys.path.insert(0, 'studies'); import _common; _common.ensure_lossfloor(); "
            "import lossfloor; print(lossfloor.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()).parent == REPO / "platform" / "lossfloor"


def test_bad_data_exits_2_naming_it(tmp_path, capsys):
    rc = _study().main(["--data", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "out"),
                        "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert rc == 2 and "missing.npy" in capsys.readouterr().err


def test_smoke_run_in_process(tmp_path, gauss):
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    assert _study().main(["--smoke", "--data", str(gauss), "--out", str(out), "--tracking-uri", uri]) == 0
    _check_store(uri, ["digits", "gauss"])
    assert is_offline_html((out / "optimal_loss_survey.html").read_text(encoding="utf-8"))
    x0 = read_table(out / "gauss" / "jstar_x0.parquet")
    for target in TARGETS[1:]:  # one estimate in x0, converted
        t = read_table(out / "gauss" / f"jstar_{target}.parquet")
        np.testing.assert_allclose(t.column("j_star"), convert_jstar(x0.column("j_star"), x0.column("sigma"), target))


def test_conditional_survey_writes_the_class_conditional_floor(tmp_path, gauss, capsys):
    from lossfloor.data import labels_fingerprint, load

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    assert _study().main(["--smoke", "--conditional", "--out", str(out), "--tracking-uri", uri]) == 0
    x0 = read_table(out / "digits" / "jstar_x0.parquet").x0()
    digits = load("bundled:digits", max_samples=1000)  # the smoke cap
    assert x0.class_conditional and x0.labels_fingerprint == labels_fingerprint(digits.labels)
    rc = _study().main(["--smoke", "--conditional", "--data", str(gauss), "--out", str(tmp_path / "o"),
                        "--tracking-uri", uri])
    assert rc == 2 and "--conditional: --data " in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_rerun_skips_the_finished_data_sets(tmp_path, caplog):
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--smoke", "--out", str(out), "--tracking-uri", uri]
    assert _study().main(argv) == 0
    marker = out / "digits" / "DONE.json"
    first = marker.stat().st_mtime_ns, json.loads(marker.read_text(encoding="utf-8"))["hash"]
    runs = _check_store(uri, ["digits"])
    with caplog.at_level(logging.INFO, logger="optimal_loss_survey"):
        assert _study().main(argv) == 0
    assert "stage estimate-digits: finished earlier" in caplog.text
    assert marker.stat().st_mtime_ns == first[0]  # nothing redone
    again = _check_store(uri, ["digits"])  # the same parent and child: a rerun adds no runs
    assert again["digits"].info.run_id == runs["digits"].info.run_id
    assert _study().main([*argv, "--seed", "1"]) == 0  # another input: estimated again, in the same folder
    assert json.loads(marker.read_text(encoding="utf-8"))["hash"] != first[1]


# ---- as users submit it: a local Ray head, `ray job submit`, cluster/runtime_env.yaml ----

@pytest.mark.e2e
def test_submitted_as_a_ray_job(tmp_path, gauss):
    home = tmp_path / "home"  # runtime_env.yaml puts results under ${HOME}/lossfloor on the cluster
    env = job_env(home)
    with ray_head(env, tmp_path / "ray-head.log") as url:
        job = subprocess.run(
            [RAY, "job", "submit", "--address", url, "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml",
             "--", "python", "studies/optimal_loss_survey.py", "--smoke", "--data", str(gauss)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=150,
        )
    logs = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in logs, logs[-4000:]
    assert "runtime_resources/py_modules_files" in logs  # the shipped package ran, not this checkout

    results = home / "lossfloor"
    kids = _check_store(f"sqlite:///{results}/mlflow.db", ["digits", "gauss"])
    out = results / "runs" / "optimal_loss_survey"
    assert is_offline_html((out / "optimal_loss_survey.html").read_text(encoding="utf-8"))
    assert kids["gauss"].data.params["data"] == str(gauss)
    assert read_table(out / "gauss" / "jstar_x0.parquet").sigma_star == pytest.approx(
        kids["gauss"].data.metrics["sigma_star"])


@pytest.mark.e2e  # a Ray instance and two survey runs: 40 s
@pytest.mark.usefixtures("local_ray")  # the tests' Ray (no token auth), which the study attaches to and leaves
def test_a_shard_folder_on_ray_is_never_loaded_on_the_driver(tmp_path, gauss, monkeypatch):
    import lossfloor.data.dataset
    from lossfloor.data import prepare_shards

    shards = prepare_shards(gauss, tmp_path / "shards" / "gauss", rows_per_shard=50)
    assert _study().main(["--smoke", "--data", str(gauss), "--out", str(tmp_path / "local"),
                          "--tracking-uri", f"sqlite:///{tmp_path}/local.db"]) == 0
    real_load = lossfloor.data.dataset.load

    def load(src, **kw):
        assert str(src) != str(shards), "the driver loaded the shard folder"
        return real_load(src, **kw)

    monkeypatch.setattr(lossfloor.data.dataset, "load", load)
    assert _study().main(["--smoke", "--data", str(shards), "--engine", "ray", "--out", str(tmp_path / "ray"),
                          "--tracking-uri", f"sqlite:///{tmp_path}/ray.db"]) == 0
    a, b = read_table(tmp_path / "local" / "gauss" / "jstar_x0.parquet"), read_table(tmp_path / "ray" / "gauss" /
                                                                                      "jstar_x0.parquet")
    np.testing.assert_allclose(b.column("j_star"), a.column("j_star"), rtol=1e-9, atol=0)
    assert b.column("dataset_fingerprint")[0] == a.column("dataset_fingerprint")[0]
