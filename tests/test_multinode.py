"""More than one Ray node, for real: a head (no CPUs) and two worker nodes started with `ray start
--address`, so the estimate's two actors must run one on each node; then a node dies mid-run (SIGKILL to
its raylet and workers) and a replacement joins: the estimate finishes with the local engine's numbers,
every batch counted once (the driver refuses a batch it already has)."""

from __future__ import annotations

import numpy as np
import pytest

from lossfloor.floor import EstimatorConfig, estimate
from lossfloor.ray import RayEngine, estimate_ray
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
