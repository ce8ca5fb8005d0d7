"""More than one Ray node, for real: a head (no CPUs) and two worker nodes of 1 CPU started with `ray start
--address`, so two actors or two Train workers must run one on each node. Then a node dies mid-run
(SIGKILL to its raylet and workers) and a replacement joins: the estimate finishes with the local
engine's numbers, every batch counted once (the driver refuses a batch it already has; the tasks in
flight on the dead node are retried), and Ray Train restarts the group from its last checkpoint onto the
nodes alive and ends with one plain process's parameters. A schedule sweep (Ray Tune, `lossfloor sweep
--address`) puts its two 1-CPU trials one on each node and gets the numbers of the same sweep on one local
node; the scaling study submitted as a Ray job (`ray job submit` to the head, its driver on the head with
no CPUs), stopped after its estimate stage and resubmitted, continues from the finished stages and trains
its two models one on each node."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from lossfloor.data import load
from lossfloor.floor import EstimatorConfig, estimate
from lossfloor.jobs.engine import Engine
from lossfloor.models import get_preset
from lossfloor.ray import estimate_ray
from lossfloor.ray.train import train_on_ray
from lossfloor.train import TrainConfig, train
from lossfloor.train.checkpoint import list_checkpoints
from ray_cluster import MultiNode
from ray_head import RAY
from test_scaling_study import REPO, drop_the_stopped_study
from test_scaling_study import TINY as STUDY_FLAGS
from test_scaling_study import _check_outputs as check_outputs
from test_scaling_study import _check_store as check_store
from test_sweep import SPACE as SWEEP_SPACE
from test_sweep import TINY as SWEEP_FLAGS
from test_sweep import install, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]

SIGMAS = np.geomspace(0.05, 5.0, 24)
CFG = EstimatorConfig(estimator="exact", queries_per_sample=2, seed=3, rows_per_batch=200)  # 6000 queries: 30 batches


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(20, 48))
    return (centres[rng.integers(0, 20, 3000)] + 0.5 * rng.normal(size=(3000, 48))).astype(np.float32)


@pytest.fixture(scope="module")
def local(data):
    return estimate(data, SIGMAS, CFG, progress=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with MultiNode(tmp_path_factory.mktemp("multinode")) as c:
        c.add_node("node_a")
        c.add_node("node_b")
        yield c


def two_nodes(cluster: MultiNode) -> Engine:
    """Two 1-CPU actors on the cluster: one on each node."""
    return Engine(kind="ray", address=cluster.address, workers=2, cpus_per_worker=1)


def assert_same(a, b):
    for name in ("j_star", "stderr", "ci_low", "ci_high"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=0, err_msg=name)


def test_an_estimate_across_two_nodes_equals_the_local_one(cluster, data, local):
    seen = []
    run = estimate_ray(data, SIGMAS, CFG, engine=two_nodes(cluster),
                       progress=False, on_batch=lambda p: seen.append(p.batch_index))
    assert sorted(seen) == list(range(30))
    assert_same(run.result, local)


def test_a_shard_folder_across_two_nodes_equals_the_local_estimate_for_knn(cluster, data, tmp_path):
    # the driver reads only meta.json; each machine's first actor maps the shards into its node cache and
    # knn's points, groups and search come from there: the numbers are still the local engine's
    from lossfloor.data import prepare_shards

    np.save(tmp_path / "d.npy", data)
    shards = prepare_shards(tmp_path / "d.npy", tmp_path / "shards", rows_per_shard=700)
    knn = EstimatorConfig(estimator="knn", subset_size=32, queries_per_sample=1, seed=3, rows_per_batch=150)
    run = estimate_ray(str(shards), SIGMAS, knn, progress=False,
                       engine=two_nodes(cluster))
    assert_same(run.result, estimate(data, SIGMAS, knn, progress=False))


def test_a_node_killed_mid_run_loses_no_batch_and_counts_none_twice(cluster, data, local, tmp_path):
    seen = []

    def kill_a_node(part):
        seen.append(part.batch_index)
        if len(seen) == 3:  # the cluster loses node_a with most batches still to do; a replacement joins
            cluster.kill("node_a")
            cluster.add_node("node_c")

    run = estimate_ray(data, SIGMAS, CFG, engine=two_nodes(cluster),
                       work_dir=tmp_path / "w", progress=False, on_batch=kill_a_node)
    assert sorted(seen) == list(range(30))  # each batch exactly once (a second copy would raise)
    assert_same(run.result, local)


TINY = get_preset("tiny")
MICRO = dataclasses.replace(TINY, name="micro", warmup_n_img=0, unet=dataclasses.replace(
    TINY.unet, model_channels=16, num_blocks=1, channels_per_head=16))
TRAIN = TrainConfig(preset=MICRO, batch_n_img=32, duration_n_img=320, eval_n_samples=32, eval_sigmas=(0.2, 1.0),
                    lr_ref=0.01, eval_every_n_img=64, keep_checkpoints=0)


def test_ray_train_across_two_nodes_survives_a_dead_node(cluster, tmp_path):
    plain = train(TRAIN, load("bundled:digits"))
    result = {}
    run = threading.Thread(target=lambda: result.update(run=train_on_ray(
        TRAIN, "bundled:digits", workers=2, cpus_per_worker=1, storage_path=tmp_path, name="two-nodes",
        max_failures=3, address=cluster.address)))
    run.start()
    deadline = time.monotonic() + 600
    while not list_checkpoints(tmp_path / "two-nodes") and time.monotonic() < deadline:
        time.sleep(0.2)
    killed_at = [n for n, _ in list_checkpoints(tmp_path / "two-nodes")]
    cluster.kill("node_b")  # one of the two workers' node, after the first checkpoint
    cluster.add_node("node_d")  # the group needs 2 CPUs on 2 nodes again: a replacement joins
    run.join(timeout=900)
    assert killed_at and killed_at[-1] < 320, "the node died after the run had finished"
    state = result["run"].state()
    assert state["n_img"] == 320
    for k, v in plain.model_state.items():  # the all-reduce's summation order: close, not bit for bit
        scale = max(float(v.abs().max()), 1e-12)
        assert float((state["net"][k] - v).abs().max()) / scale <= 1e-5, k


# ---- a schedule sweep (Ray Tune) across the two nodes, and the same sweep on one local node ----


class NodeMarkers:
    """Trial hooks (`run_sweep(trial_hooks=...)`): the id of the node each trial starts on, in DIR/<trial>.node."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def on_trial_start(self, trial_id: str, resumed_from) -> None:
        import ray

        with open(Path(self.folder) / f"{trial_id}.node", "a", encoding="utf-8") as f:
            f.write(ray.get_runtime_context().get_node_id() + "\n")


def sweep(out: Path, monkeypatch, *address: str) -> tuple[dict, dict]:
    """The EDM2 baseline + 1 trial (2 trials of 1 CPU), 256 images, the tiny preset, as `lossfloor sweep`
    runs it: {schedule: (row, objective history)} and {trial id: [node ids it started on]}."""
    out.mkdir()
    (out / "space.yaml").write_text(SWEEP_SPACE)
    with monkeypatch.context() as mp:
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trials run where tests/ is not
        install(mp, trial_hooks=NodeMarkers(out))
        rc, stdout = run_cli(["sweep", *SWEEP_FLAGS, "--space", str(out / "space.yaml"), "--trials", "1",
                              "--images", "256", "--evals", "2", "--cpus-per-worker", "1", "--out", str(out / "s"),
                              *address])
    assert rc == 0, stdout
    history = pq.read_table(out / "s" / "objective_history.parquet").to_pylist()
    trials = {r["schedule"]: (r, sorted((p["n_img"], p["objective"]) for p in history
                                        if p["trial_id"] == r["trial_id"]))
              for r in pq.read_table(out / "s" / "results.parquet").to_pylist()}
    return trials, {p.stem: p.read_text().split() for p in out.glob("*.node")}


def test_a_sweep_runs_its_trials_on_both_nodes_with_the_local_numbers(cluster, tmp_path, monkeypatch):
    spread, nodes = sweep(tmp_path / "multi", monkeypatch, "--address", cluster.address)
    assert sorted(spread) == ["edm2", "optimal"]
    for row, history in spread.values():
        assert row["status"] == "finished" and row["n_img"] == 256 and row["objective"] > 0
        assert [n for n, _ in history] == [128, 256]
    # each trial started once; 1 CPU each on a cluster of two 1-CPU nodes (the head has none): one per node
    names = cluster.names()
    assert sorted(len(v) for v in nodes.values()) == [1, 1]
    assert sorted(names[v[0]] for v in nodes.values()) == sorted(set(cluster.nodes) - {"head"})
    # the same sweep on one node, a local Ray in this process: the same configurations and numbers
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # Ray >= 2.59 uses token auth for local clusters
    monkeypatch.setenv("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")  # the sweep's own would start a dashboard
    try:
        local, _ = sweep(tmp_path / "local", monkeypatch)
    finally:
        ray.shutdown()
    for schedule, (row, history) in spread.items():
        other, other_history = local[schedule]
        assert {k: row[k] for k in ("w_max", "mu", "varsigma", "n_img")} == \
            {k: other[k] for k in ("w_max", "mu", "varsigma", "n_img")}
        # one process per trial with one torch thread and the same seed, wherever it runs: the same floats
        # (measured: equal bit for bit); 1e-12, as test_sweep's resume check, leaves room for last bits only
        assert row["objective"] == pytest.approx(other["objective"], rel=1e-12), schedule
        assert history == pytest.approx(other_history, rel=1e-12), schedule


# ---- the scaling study as a Ray job on the two nodes: its driver stopped, the job resubmitted ----


def job_nodes(cluster: MultiNode, submission_id: str) -> dict[str, set[str]]:
    """{actor class: names of the nodes its actors ran on} of one submitted job (dead actors included; an
    actor the job created but that was never placed before the job stopped ran nowhere and is left out)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(cluster.dashboard).get_job_info(submission_id).job_id
    names, out = cluster.names(), {}
    for a in list_actors(address=cluster.dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=10000,
                         raise_on_missing_output=False):
        if a.node_id:
            out.setdefault(a.class_name, set()).add(names.get(a.node_id, a.node_id))
    return out


def test_the_study_stopped_and_resubmitted_as_a_ray_job_on_two_nodes(cluster):
    home = cluster.folder / "home"  # the head's HOME: runtime_env.yaml puts results under ${HOME}/lossfloor
    submit = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--runtime-env",
              "cluster/runtime_env.yaml"]
    study = ["--", "python", "studies/scaling_imagenet512.py", *STUDY_FLAGS]
    runs = home / "lossfloor" / "runs" / "scaling_imagenet512"
    # the driver (on the head, 0 CPUs: its work goes to the worker nodes) is stopped after its estimate stage ...
    first = subprocess.run([*submit, "--no-wait", "--submission-id", "first", *study], cwd=REPO, env=cluster.env,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    deadline = time.monotonic() + 180
    while not list(runs.glob("estimate-*/DONE.json")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert list(runs.glob("estimate-*/DONE.json")), "the estimate stage did not finish"
    subprocess.run([RAY, "job", "stop", "--address", cluster.dashboard, "first"], env=cluster.env,
                   capture_output=True, timeout=120)
    # ... and the same job submitted again continues from the finished stages
    job = subprocess.run([*submit, "--submission-id", "second", *study], cwd=REPO, env=cluster.env,
                         capture_output=True, text=True, timeout=300)
    logs = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in logs, logs[-4000:]
    assert "stage estimate: finished earlier" in logs and "skipped" in logs
    assert "on Ray Train" in logs and "train: 2 model(s), 2 at a time" in logs
    # the work ran on the worker nodes: the J* actors of the first job, the two models' Train workers (one
    # each, 1 CPU on 1-CPU nodes, at the same time) of the second, one on each node
    workers = set(cluster.nodes) - {"head"}
    first, second = job_nodes(cluster, "first"), job_nodes(cluster, "second")
    assert set().union(*(v for k, v in first.items() if k.startswith("MapWorker"))) <= workers, first
    assert second["RayTrainWorker"] == workers, second

    uri = f"sqlite:///{home}/lossfloor/mlflow.db"
    drop_the_stopped_study(uri)
    check_store(uri)
    check_outputs(runs)
