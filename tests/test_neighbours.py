"""The IVF index's own deep search (`neighbours.ListScan`) against exact distances over the same probed lists."""

import numpy as np
import pytest
import torch

from lossfloor.floor import neighbours
from lossfloor.floor.neighbours import build_index

pytest.importorskip("faiss")


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (24, d))
    return (centres[rng.integers(0, 24, n)] + 0.4 * rng.normal(size=(n, d))).astype(np.float32)


def _reference(x: np.ndarray, lists, y: np.ndarray, nprobe: int) -> list[np.ndarray]:
    """Per query: the ids of the points of its nprobe nearest lists (centroids in float64), by exact float64
    distance, nearest first."""
    c = lists.centroids.numpy()
    owner = lists.list_of.numpy()
    out = []
    for q in y.astype(np.float64):
        probed = np.argsort(((c - q) ** 2).sum(1), kind="stable")[:nprobe]
        cand = np.flatnonzero(np.isin(owner, probed))
        d = ((x[cand].astype(np.float64) - q) ** 2).sum(1)
        out.append(cand[np.argsort(d, kind="stable")])
    return out


@pytest.fixture(scope="module")
def scanned():
    x = _clustered(3000, 12, 0)
    index = build_index(torch.from_numpy(x), "ivf", seed=0)
    rng = np.random.default_rng(1)
    y = x[rng.choice(3000, 40, replace=False)] + 0.3 * rng.normal(size=(40, 12)).astype(np.float32)
    return x, index, y


@pytest.mark.parametrize("k, nprobe", [(700, 5), (2900, 15), (2900, 46)])
def test_scan_partitions_the_probed_lists_exactly_at_the_cuts(scanned, k, nprobe):
    x, index, y = scanned
    lists = index.lists()
    assert len(lists.size) == 46  # 3 000 // 64 lists: 700 and 2 900 points ask for more than 5 and 15 hold
    cuts = (31, 127, 500)
    ids = index.list_scan().search(torch.from_numpy(y), k, nprobe, cuts).numpy()
    ref = _reference(x, lists, y, nprobe)
    for got, want in zip(ids, ref):
        for a, b in zip((0, *cuts), (*cuts, k)):
            assert set(got[a:b].tolist()) - {-1} == set(want[a:b].tolist())  # the same members of each stratum
        assert (got[:len(want)] >= 0).all() and (got[len(want):] == -1).all()  # short of k: -1 after the last
    sorted_ids = index.list_scan().search(torch.from_numpy(y), k, nprobe).numpy()  # no cuts: nearest first
    for got, want in zip(sorted_ids, ref):
        assert got[:min(k, len(want))].tolist() == want[:k].tolist()


def test_a_query_gets_the_same_neighbours_in_any_batch(scanned):
    _, index, y = scanned
    scan = index.list_scan()
    cuts = (63, 255, 1023)
    whole = scan.search(torch.from_numpy(y), 2000, 40, cuts)
    for part in (slice(0, 1), slice(3, 7), slice(11, 40)):
        np.testing.assert_array_equal(scan.search(torch.from_numpy(y[part]), 2000, 40, cuts), whole[part])


def test_deep_ivf_searches_go_through_the_scan(scanned, monkeypatch):
    x, index, y = scanned
    k = 1500
    ref = _reference(x, index.lists(), y, index.base.nlist)  # enough probes for 2k: every list here
    monkeypatch.setattr(neighbours, "SCAN_MIN_K", 10 ** 9)
    faiss_ids = index.search(torch.from_numpy(y), k).numpy()
    monkeypatch.setattr(neighbours, "SCAN_MIN_K", 1024)
    calls, scan = [], neighbours.ListScan.search
    monkeypatch.setattr(neighbours.ListScan, "search", lambda self, *a: calls.append(a[1:]) or scan(self, *a))
    scan_ids = index.search(torch.from_numpy(y), k, cuts=(100,)).numpy()
    assert calls == [(k, index.base.nlist, (100,))]  # nprobe: lists enough for 2k points, all 46 here
    for f, s, want in zip(faiss_ids, scan_ids, ref):
        assert set(s[:100].tolist()) == set(want[:100].tolist()) == set(f[:100].tolist())
        assert set(s.tolist()) == set(want[:k].tolist())


def test_the_scan_of_a_memory_mapped_node_index_equals_the_in_memory_one(scanned, tmp_path):
    # the node cache's index is read with FAISS's IO_FLAG_MMAP: the scan reads its lists' points in place
    from lossfloor.data.node_cache import NodeCache

    x, index, y = scanned
    mapped = build_index(torch.from_numpy(x), "ivf", seed=0, cache=NodeCache("ab" * 32, tmp_path))
    assert any(p.name.startswith("index-points-ivf") for p in (tmp_path / ("ab" * 16)).iterdir())
    cuts = (63, 255)
    np.testing.assert_array_equal(mapped.list_scan().search(torch.from_numpy(y), 1500, 30, cuts),
                                  index.list_scan().search(torch.from_numpy(y), 1500, 30, cuts))
