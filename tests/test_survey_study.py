"""studies/optimal_loss_survey.py: --dry-run, an in-process smoke run, and a submission as a Ray job
(a local head started here, `ray job submit` with cluster/runtime_env.yaml, results read from MLflow)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lossfloor.diffusion import convert_jstar
from lossfloor.floor import read_table
from lossfloor.plots import is_offline_html
from lossfloor.tracking import PARENT_RUN_TAG, client

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


# ---- as users submit it: a local Ray head, `ray job submit`, cluster/runtime_env.yaml ----

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (the head's: `ray start` ran in a new session we made)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
            except OSError:
                continue
            if int(fields[3]) == sid and int(entry) != os.getpid():
                pids.append(int(entry))
    return pids


def _alive(sid: int) -> list[int]:
    return [p for p in _session_pids(sid) if not _is_zombie(p)]


def _wait_gone(sid: int, timeout_s: float) -> list[int]:
    """The session's live processes after waiting up to timeout_s for none to be left."""
    deadline = time.monotonic() + timeout_s
    while (alive := _alive(sid)) and time.monotonic() < deadline:
        time.sleep(0.3)
    return alive


def _stop_head(head: subprocess.Popen) -> None:
    """End the Ray processes this test started, by id (not `ray stop`: it ends every Ray on the machine)."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in _alive(head.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not _wait_gone(head.pid, wait_s):
            break
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_for_dashboard(url: str, head: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the Ray dashboard (job server) did not answer at {url}:\n{log_path.read_text()[-3000:]}")


@pytest.mark.slow
def test_submitted_as_a_ray_job(tmp_path, gauss):
    ray = str(Path(sys.executable).parent / "ray")
    home = tmp_path / "home"  # runtime_env.yaml puts results under ${HOME}/lossfloor on the cluster
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LOSSFLOOR_RUNS_DIR")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HOME=str(home),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    temp_dir = tempfile.mkdtemp(prefix="lfray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, client_port, agent = _free_ports(4)
    url = f"http://127.0.0.1:{dash}"
    log_path = tmp_path / "ray-head.log"
    with open(log_path, "w") as head_log:
        head = subprocess.Popen(
            [ray, "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dash),
             "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0",
             "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent),
             "--temp-dir", temp_dir, "--disable-usage-stats"],
            env=env, cwd=tmp_path, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_for_dashboard(url, head, log_path)
        job = subprocess.run(
            [ray, "job", "submit", "--address", url, "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml",
             "--", "python", "studies/optimal_loss_survey.py", "--smoke", "--data", str(gauss)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=150,
        )
        logs = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in logs, logs[-4000:]
        assert "runtime_resources/py_modules_files" in logs  # the shipped package ran, not this checkout
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)

    results = home / "lossfloor"
    kids = _check_store(f"sqlite:///{results}/mlflow.db", ["digits", "gauss"])
    out = results / "runs" / "optimal_loss_survey"
    assert is_offline_html((out / "optimal_loss_survey.html").read_text(encoding="utf-8"))
    assert kids["gauss"].data.params["data"] == str(gauss)
    assert read_table(out / "gauss" / "jstar_x0.parquet").sigma_star == pytest.approx(
        kids["gauss"].data.metrics["sigma_star"])
