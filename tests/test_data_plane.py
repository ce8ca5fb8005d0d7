"""The data plane: one copy of a data set per machine (`lossfloor.data.node_cache`), knn's points and
FAISS index made once and mapped, batches that gather only their rows, and a device-memory cap that
sizes the batch (`max_device_gb`). The numbers never depend on where the data live."""

from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from lossfloor.data import load, prepare_shards
from lossfloor.data.node_cache import ENV, NodeCache, read_only_tensor, shard_matrix
from lossfloor.errors import InputError
from lossfloor.floor import EstimatorConfig, estimate, floor_data, prepare_data, run_batches
from lossfloor.floor.batch import fits_device
from lossfloor.floor.config import batch_bytes
from lossfloor.floor.neighbours import faiss_module

SIGMAS = np.array([0.05, 0.3, 1.0, 4.0])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(6, 16))
    x = (centres[rng.integers(0, 6, 400)] + 0.4 * rng.normal(size=(400, 16))).astype(np.float32)
    x[350:] = x[:50]  # 50 exact duplicates: knn merges them into weighted points
    return x


def _build_in_child(root: str, log: str, queue) -> None:
    def blocks():
        time.sleep(0.3)  # a window in which the other processes would write it too, without the lock
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        yield from np.arange(8000, dtype=np.float32).reshape(10, 100, 8)

    arr = NodeCache("ab" * 32, root).array("x", (1000, 8), np.float32, blocks)
    queue.put(float(arr.sum()))


def test_concurrent_processes_of_a_machine_write_an_entry_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), str(tmp_path / "fills.log"), queue))
             for _ in range(4)]
    for p in procs:
        p.start()
    sums = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len((tmp_path / "fills.log").read_text().split()) == 1  # one process wrote it, three waited and mapped
    assert sums == [float(np.arange(8000).sum())] * 4
    arr = NodeCache("ab" * 32, tmp_path).array("x", (1000, 8), np.float32, lambda: pytest.fail("rewritten"))
    assert isinstance(arr, np.memmap) and not arr.flags.writeable


def test_a_failed_fill_leaves_nothing_behind(tmp_path):
    cache = NodeCache("cd" * 32, tmp_path)

    def broken():
        yield np.ones((10, 4), np.float32)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.array("x", (100, 4), np.float32, broken)
    assert not [p for p in cache.folder.iterdir() if not p.name.endswith(".lock")]  # no entry, no temporary file
    arr = cache.array("x", (100, 4), np.float32, lambda: [np.full((60, 4), 2.0), np.full((40, 4), 2.0)])
    assert float(arr.sum()) == 800.0
    with pytest.raises(InputError, match="99 rows written, expected 100"):  # a short source is no entry either
        cache.array("y", (100, 4), np.float32, lambda: [np.zeros((99, 4))])
    assert not (cache.folder / "y.npy").exists()


def test_an_unusable_cache_folder_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(ENV, str(tmp_path / "file" / "cache"))
    cache = NodeCache("ef" * 32)  # nothing is made before an entry is needed (cdol on an in-memory array needs none)
    with pytest.raises(InputError, match=ENV):
        cache.array("x", (2, 2), np.float32, lambda: [])


def test_a_shard_folder_for_ray_is_not_loaded_unless_it_must_be(data, tmp_path):
    from lossfloor.data import Dataset, ShardRef, load_for

    np.save(tmp_path / "d.npy", data)
    shards = prepare_shards(tmp_path / "d.npy", tmp_path / "shards", rows_per_shard=70)
    ref = load_for(shards, "ray")
    assert isinstance(ref, ShardRef) and len(ref) == len(data) and ref.fingerprint == load(shards).fingerprint
    assert ref.samples == str(shards.absolute()) and ref.sample_shape == data.shape[1:]
    assert isinstance(load_for(shards, "local"), Dataset)  # this process computes: it needs the samples
    capped = load_for(shards, "ray", max_samples=100)  # a prefix: its own fingerprint, from the samples
    assert isinstance(capped, Dataset) and len(capped) == 100
    assert isinstance(load_for(tmp_path / "d.npy", "ray"), Dataset)


def test_a_shard_folder_is_mapped_once_per_machine(data, tmp_path, monkeypatch):
    np.save(tmp_path / "d.npy", data)
    shards = prepare_shards(tmp_path / "d.npy", tmp_path / "shards", rows_per_shard=70)
    ds = load(shards)
    cache = NodeCache(ds.fingerprint, tmp_path / "cache")
    x = shard_matrix(shards, cache)
    assert isinstance(x, np.memmap) and np.array_equal(x, data)
    import lossfloor.data.dataset

    monkeypatch.setattr(lossfloor.data.dataset, "open_source", lambda *a, **k: _Reader(len(data), data.shape[1:]))
    assert np.array_equal(shard_matrix(shards, NodeCache(ds.fingerprint, tmp_path / "cache")), data)  # no re-read


class _Reader:  # what open_source returns, but reading the shards again fails the test
    def __init__(self, n, shape):
        from lossfloor.data.source import SourceInfo

        self._info = SourceInfo(count=n, sample_shape=tuple(shape), has_labels=False, normalisation="none")

    def info(self):
        return self._info

    def blocks(self, rows):
        pytest.fail("the shards were read again")


@pytest.mark.parametrize("index", ["flat", "ivf", "torch"])
def test_knn_on_mapped_points_and_a_node_index_gives_the_same_numbers(data, tmp_path, index):
    if index != "torch" and faiss_module() is None:
        pytest.skip("FAISS is not installed")
    cfg = EstimatorConfig(estimator="knn", subset_size=16, rows_per_batch=25, seed=4, index=index)
    plain = estimate(data, SIGMAS, cfg, progress=False)  # the in-process path: private points and index

    resolved = cfg.resolve(*data.reshape(len(data), -1).shape)
    fp = "12" * 32
    x = read_only_tensor(NodeCache(fp, tmp_path).array("x", data.shape, np.float32, lambda: [data]))
    mapped = floor_data(x, resolved, cache=NodeCache(fp, tmp_path))
    again = floor_data(x, resolved, cache=NodeCache(fp, tmp_path))  # a second actor of the machine
    assert mapped.knn.n_unique == 350 and isinstance(mapped.knn.points, torch.Tensor)
    names = {p.name for p in (tmp_path / fp[:32]).iterdir()}
    assert {"x.npy", "dedup.npz", "dedup-points.npy"} <= names
    if index == "ivf":  # the flat search maps no index: it searches the points themselves
        assert any(n.startswith("index-points-ivf") for n in names)
    parts = run_batches(mapped, SIGMAS, resolved, progress=False)
    parts2 = run_batches(again, SIGMAS, resolved, progress=False)
    direct = run_batches(floor_data(prepare_data(data, resolved), resolved), SIGMAS, resolved, progress=False)
    for a, b, c in zip(parts, parts2, direct):
        assert np.array_equal(a.sum_j, c.sum_j) and np.array_equal(b.sum_j, c.sum_j)
    assert plain.n_batches == len(parts)


@pytest.mark.parametrize("index", ["torch", "flat"])
def test_without_duplicates_knn_points_and_flat_search_are_the_data_itself(tmp_path, index):
    if index == "flat" and faiss_module() is None:
        pytest.skip("FAISS is not installed")
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32))
    cfg = EstimatorConfig(estimator="knn", subset_size=16, rows_per_batch=20, index=index).resolve(300, 8)
    fd = floor_data(x, cfg, cache=NodeCache("34" * 32, tmp_path))
    assert fd.knn.points.data_ptr() == x.data_ptr()  # no copy of the data set
    if index == "flat":  # the exact search runs on the points themselves: no index copy either
        assert np.shares_memory(fd.knn.index.points, x.numpy())


def test_the_device_cap_sizes_the_batch_and_refuses_what_cannot_fit():
    n, d = 100_000, 1024
    free = EstimatorConfig(estimator="knn").resolve(n, d)
    capped = EstimatorConfig(estimator="knn", max_device_gb=0.05).resolve(n, d)
    assert capped.rows_per_batch < free.rows_per_batch
    assert batch_bytes(capped, d) <= 0.05 * 2**30 < batch_bytes(free, d)
    with pytest.raises(InputError, match="max_device_gb"):
        EstimatorConfig(estimator="knn", max_device_gb=1e-6).resolve(n, d)  # below one row's queries
    with pytest.raises(InputError, match=r"rows_per_batch.*max_device_gb"):
        EstimatorConfig(estimator="knn", max_device_gb=0.05, rows_per_batch=4000).resolve(n, d)
    for bad in (0, -1, float("nan"), float("inf"), "8"):
        with pytest.raises(InputError, match="max_device_gb"):
            EstimatorConfig(max_device_gb=bad)


def test_data_too_large_for_the_cap_stay_on_the_host_or_are_refused_for_exact():
    x = torch.zeros(20_000, 512)  # 40 MiB
    knn = EstimatorConfig(estimator="knn", subset_size=16, rows_per_batch=100, device="cuda", max_device_gb=0.05)
    assert not fits_device(knn, x)  # points + index 80 MiB > 50 MiB: each batch gathers its rows instead
    assert fits_device(EstimatorConfig(estimator="knn", subset_size=16, rows_per_batch=100, device="cuda",
                                       max_device_gb=1.0), x)
    exact = EstimatorConfig(estimator="exact", rows_per_batch=30, subset_size=20_000, c=1.0, device="cuda",
                            max_device_gb=0.05)
    with pytest.raises(InputError, match="exact estimator needs all 20000 samples"):
        floor_data(x, exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("estimator", ["knn", "cdol"])
def test_cuda_batches_gathered_from_host_memory_equal_the_data_on_the_device(data, estimator):
    base = dict(estimator=estimator, subset_size=16, rows_per_batch=25, seed=4, rng_device="cpu", index="torch")
    on_device = estimate(data, SIGMAS, EstimatorConfig(device="cuda", **base), progress=False)
    cfg = EstimatorConfig(device="cuda", max_device_gb=batch_bytes(
        EstimatorConfig(**base).resolve(*data.shape), data.shape[1]) * 1.01 / 2**30, **base)
    resolved = cfg.resolve(*data.shape)
    fd = floor_data(prepare_data(data, EstimatorConfig(**base)), resolved)
    assert fd.on_host  # the cap leaves room for a batch, not for the data
    parts = run_batches(fd, SIGMAS, resolved, progress=False)
    from lossfloor.floor import reduce_estimate, total_variance

    host = reduce_estimate(parts, SIGMAS, resolved, total_variance(torch.from_numpy(data)))
    np.testing.assert_allclose(host.j_star, on_device.j_star, rtol=1e-6)
    cpu = estimate(data, SIGMAS, EstimatorConfig(**base), progress=False)
    np.testing.assert_allclose(host.j_star, cpu.j_star, rtol=1e-4)


def _private_dirty_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/self/smaps_rollup")
def test_the_flat_search_of_mapped_points_copies_nothing(tmp_path):
    # the mapped file is on disk (the cache fsyncs it): its pages are clean, so Private_Dirty counts only
    # what this process allocates
    if faiss_module() is None:
        pytest.skip("FAISS is not installed")
    import threading

    from lossfloor.floor.neighbours import build_index

    rng = np.random.default_rng(1)
    points = rng.standard_normal((16384, 1024), dtype=np.float32)  # 64 MiB
    mapped = NodeCache("56" * 32, tmp_path).array("x", points.shape, np.float32, lambda: [points])
    y = torch.from_numpy(points[:64] + 0.01)
    base, peak, stop = _private_dirty_mib(), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _private_dirty_mib() - base)
            stop.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        index = build_index(read_only_tensor(mapped), "flat")  # no FAISS index: it would hold a copy
        for _ in range(5):
            ids = index.search(y, 8)
    finally:
        stop.set()
        sampler.join()
    assert peak[0] < 16  # an IndexFlatL2 holds its own 64 MiB copy of the points
    assert torch.equal(ids[:, 0], torch.arange(64))
    assert np.array_equal(ids.numpy(), faiss_module().knn(y.numpy(), points, 8)[1])  # FAISS's own flat search
