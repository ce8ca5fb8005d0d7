"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def lossfloor_home(tmp_path_factory):
    """The default tracking store ($LOSSFLOOR_HOME/mlflow.db) of every test in a temporary folder, never
    the user's ~/lossfloor."""
    import os

    names = ("LOSSFLOOR_HOME", "LOSSFLOOR_NODE_CACHE")  # and the node-local data cache (lossfloor.data.node_cache)
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = str(tmp_path_factory.mktemp(name.lower()))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests: tiny tensors on 2 shared CI cores only contend
    with more (seconds per op under load, ~10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU Ray instance for a module's tests (no dashboard, no token auth), workers at the tests'
    priority and one torch thread in the driver; everything restored afterwards."""
    import os

    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_worker_niceness")}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray >= 2.59 uses token auth for local clusters
    os.environ["RAY_worker_niceness"] = "0"  # Ray's default (15) starves workers on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
