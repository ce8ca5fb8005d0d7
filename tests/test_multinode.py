"""More than one Ray node, for real: a head (no CPUs) and two worker nodes of 1 CPU started with `ray start
--address`, so two actors or two Train workers must run one on each node. Then a node dies mid-run
(SIGKILL to its raylet and workers) and a replacement joins: the estimate finishes with the local
engine's numbers, every batch counted once (the driver refuses a batch it already has; the tasks in
flight on the dead node are retried), and Ray Train restarts the group from its last checkpoint onto the
nodes alive and ends with one plain process's parameters."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from lossfloor.data import load
from lossfloor.floor import EstimatorConfig, estimate
from lossfloor.models import get_preset
from lossfloor.ray import RayEngine, estimate_ray
from lossfloor.ray.train import train_on_ray
from lossfloor.train import TrainConfig, train
from lossfloor.train.checkpoint import list_checkpoints
from ray_cluster import MultiNode

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]

SIGMAS = np.geomspace(0.05, 5.0, 24)
CFG = EstimatorConfig(estimator="exact", queries_per_sample=2, seed=3, rows_per_batch=100)  # 30 batches


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


def assert_same(a, b):
    for name in ("j_star", "stderr", "ci_low", "ci_high"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=0, err_msg=name)


def test_an_estimate_across_two_nodes_equals_the_local_one(cluster, data, local):
    seen = []
    run = estimate_ray(data, SIGMAS, CFG, engine=RayEngine(address=cluster.address, workers=2, cpus_per_worker=1),
                       progress=False, on_batch=lambda p: seen.append(p.batch_index))
    assert sorted(seen) == list(range(30))
    assert_same(run.result.estimate, local)


def test_a_node_killed_mid_run_loses_no_batch_and_counts_none_twice(cluster, data, local, tmp_path):
    seen = []

    def kill_a_node(part):
        seen.append(part.batch_index)
        if len(seen) == 3:  # the cluster loses node_a with most batches still to do; a replacement joins
            cluster.kill("node_a")
            cluster.add_node("node_c")

    run = estimate_ray(data, SIGMAS, CFG, engine=RayEngine(address=cluster.address, workers=2, cpus_per_worker=1),
                       work_dir=tmp_path / "w", progress=False, on_batch=kill_a_node)
    assert sorted(seen) == list(range(30))  # each batch exactly once (a second copy would raise)
    assert_same(run.result.estimate, local)


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
