"""Nearest data points of noisy queries, for the kNN estimator: a FAISS index, or torch on a bare GPU box.

    index = build_index(points, kind="auto")       # points (U, D), the distinct samples
    ids = index.search(y, k)                       # (B, k) long, nearest first (squared L2), distinct;
                                                   # -1 where an approximate index found fewer than k
    ids = index.search(y, k, cuts=(64, 256))       # the same k, ordered only at the cuts: entries [0, 64)
                                                   # the 64 nearest, [64, 256) the next, [256, k) the rest

Kinds (the estimator is valid with any of them: its neighbour set may be any deterministic function of
the query, so an approximate search costs efficiency, never correctness):
- flat: FAISS `IndexFlatL2`, exact;
- ivf: FAISS `IndexIVFFlat`, nlist = 4√U lists, nprobe = 32 of them searched, or as many as hold 2k points on
  average for a search of k (large U);
- hnsw: FAISS `IndexHNSWFlat` (M = 32, efSearch = max(64, 2k));
- torch: exact search by a GEMM and top-k on the points' device (the fallback where FAISS is not
  installed, e.g. a GPU box with torch only, and the GPU path without FAISS-GPU);
- auto: flat up to AUTO_FLAT_MAX points, ivf above; torch without FAISS or for CUDA points when FAISS
  has no GPU.
`pca=r` searches on the first r principal components (FAISS `PCAMatrix`): cheaper, approximate.
An IVF search of SCAN_MIN_K or more neighbours does not go through FAISS: FAISS keeps a heap of the k best
per query, which at k = 16 000 cost more than the scan itself; `ListScan` computes the same candidates'
distances by one GEMM per list and partitions each query's row at the cuts the caller asks for.
FAISS indexes move to the GPU when the points are on CUDA and FAISS was built with GPU support.
Build and search times are kept (`build_s`, `search_s`) and reported apart from the kernel's. An IVF
index also gives its lists (`lists()`: the centroids and each list's points), which the kNN estimator's
far strata are made of.

One index per node: the exact flat search on CPU points needs no index at all: FAISS's `knn` searches
the points where they are (a node-shared mapping, or this process's array: no copy; the same results as
`IndexFlatL2.search`, which runs the same routine). Any other FAISS index, given a
`lossfloor.data.node_cache.NodeCache`, is built by the first process of a machine, written to the node
cache and memory-mapped by every process (FAISS's IO_FLAG_MMAP_IFC for flat storage, IO_FLAG_MMAP for
IVF lists): the actors of a node share one copy of its vectors instead of one each, and all of them
search the same index (the same neighbours on every actor, so any number of workers gives the same
numbers). The first process holds the index in memory while it builds it (once per machine). The torch search keeps the points where they
are (host or device) and computes there; ids come back on the query's device.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from lossfloor.errors import InputError

log = logging.getLogger(__name__)

INDEXES = ("auto", "flat", "ivf", "hnsw", "torch")
# auto: flat up to here, IVF above. Measured on noisy queries of 8×8×3 photo patches (benchmarks/knn_search.py,
# README "Neighbour search at scale"): at N = 5000 knn's error with IVF equals the flat search's (2 seeds, L = 128)
# at half its search time; the IVF search is 3.6x (N = 20 000), 13x (100 000) faster than flat with recall ≥ 0.97
# where the posterior is concentrated. HNSW (slower for the same recall) and PCA (recall ≤ 0.93 at every σ) lose.
AUTO_FLAT_MAX = 5_000
IVF_NPROBE = 32
HNSW_M = 32
SCAN_MIN_K = 1024  # an IVF search at least this deep runs `ListScan` (measured: benchmarks/knn_search.py)
_TRAIN_PER_LIST = 64  # IVF training points per list (FAISS warns below 39)
_TORCH_CHUNK = 1 << 14  # points per GEMM block of the torch search


def faiss_module():
    """The faiss module, or None when it is not installed."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines name CPU features, not errors
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class NeighbourIndex:
    """k nearest points by squared L2 distance; `search` takes and returns tensors."""

    def __init__(self, kind: str, n_points: int, build_s: float):
        self.kind, self.n_points, self.build_s = kind, n_points, build_s
        self.search_s = 0.0

    def search(self, y: torch.Tensor, k: int, cuts=None) -> torch.Tensor:
        """(B, D) queries -> (B, k) long point indices, distinct, on y's device; -1 (last) where an
        approximate index (IVF, HNSW) found fewer than k. Nearest first; with `cuts` (positions in (0, k))
        only ordered at the cuts: every entry before a cut is at least as near as every entry from it on
        (an index may still return them sorted)."""
        t0 = time.perf_counter()
        ids = self._search(y, min(k, self.n_points), cuts)
        self.search_s += time.perf_counter() - t0
        return ids

    def _search(self, y: torch.Tensor, k: int, cuts) -> torch.Tensor:
        raise NotImplementedError

    def lists(self) -> Lists | None:
        """The index's partition of the points into lists (an IVF index), or None."""
        return None


class TorchIndex(NeighbourIndex):
    """Exact search: ||y - p||² = ||p||² - 2 y·p + const, a GEMM and top-k per block of points."""

    def __init__(self, points: torch.Tensor):
        t0 = time.perf_counter()
        self.points = points
        self.p_sq = (points * points).sum(1)  # (U,)
        super().__init__("torch", len(points), time.perf_counter() - t0)

    def _search(self, y, k, cuts):
        where = y.device
        y = y.to(self.points.device, self.points.dtype)
        best_d, best_i = None, None
        for start in range(0, self.n_points, _TORCH_CHUNK):
            p = self.points[start:start + _TORCH_CHUNK]
            d = self.p_sq[start:start + _TORCH_CHUNK][None, :] - 2.0 * (y @ p.T)  # (B, chunk)
            kk = min(k, d.shape[1])
            dv, di = d.topk(kk, dim=1, largest=False)
            di = di + start
            if best_d is None:
                best_d, best_i = dv, di
            else:
                cat_d, cat_i = torch.cat([best_d, dv], 1), torch.cat([best_i, di], 1)
                best_d, pos = cat_d.topk(k, dim=1, largest=False)
                best_i = cat_i.gather(1, pos)
        order = best_d.argsort(dim=1, stable=True)  # topk of one block is not sorted on every backend
        return best_i.gather(1, order).to(where)


@dataclass(frozen=True)
class Lists:
    """An IVF index's partition of its points into lists: `centroids` (nlist, D) float64; `ids` (U,) long,
    every list's points in its stored order, list after list; `start`, `size` (nlist,) long, each list's
    slice of `ids`; per point (U,) long: `list_of` its list, `slot` its place in that list."""

    centroids: torch.Tensor
    ids: torch.Tensor
    start: torch.Tensor
    size: torch.Tensor
    list_of: torch.Tensor
    slot: torch.Tensor

    @classmethod
    def of(cls, centroids: torch.Tensor, size: torch.Tensor, ids: torch.Tensor) -> Lists:
        start = size.cumsum(0) - size
        owner = torch.repeat_interleave(torch.arange(len(size)), size)  # each entry of ids: its list
        list_of = torch.empty_like(ids).scatter_(0, ids, owner)
        slot = torch.empty_like(ids).scatter_(0, ids, torch.arange(len(ids)) - start[owner])
        return cls(centroids, ids, start, size, list_of, slot)

    def to(self, device) -> Lists:
        return Lists(*(getattr(self, f.name).to(device) for f in fields(self)))


class ListScan:
    """An IVF index's deep search without FAISS's heap of the k best (`FaissIndex` from SCAN_MIN_K on).

    A query's candidates are the points of the nprobe lists whose centroids are nearest to it, as FAISS
    probes them. Their distances ||p||² - 2 y·p (+ ||y||², the same for all of a query's candidates) are
    computed list by list, each list's points against all the queries of the batch that probe it (one
    GEMM per list: a list is read once per batch, not once per query). Each query's row, its probed lists
    in list order, is then gathered and partitioned alone at the cuts (numpy's introselect; sorted without
    cuts), so its neighbours and their order do not depend on the rest of the batch. Float64 throughout for
    the same reason: MKL's float32 products differ in their last bits with the number of rows, enough to
    swap near-equal ranks at a cut (seen at N = 80 000).
    """

    def __init__(self, lists: Lists, vectors: list[torch.Tensor]):
        self.lists, self.vectors = lists, vectors  # vectors: each list's (size, D) points, in its order
        self.sq = [v.double().square().sum(1) for v in vectors]
        self.c_sq = lists.centroids.square().sum(1)

    def search(self, y: torch.Tensor, k: int, nprobe: int, cuts=None) -> torch.Tensor:
        """(B, D) queries -> (B, k) point ids on the CPU, as `NeighbourIndex.search`."""
        lists = self.lists
        y = y.detach().to("cpu", torch.float64)
        dist = self.c_sq[None, :] - 2.0 * (y @ lists.centroids.T)
        probe = dist.topk(min(nprobe, len(self.vectors)), dim=1, largest=False).indices.sort(dim=1).values
        pairs = probe.reshape(-1)
        by_list = pairs.argsort(stable=True)  # (query, probe) pairs, list after list
        run_size = lists.size[pairs[by_list]]
        runs = torch.empty_like(by_list)  # where each pair's distances start in `out`
        runs[by_list] = run_size.cumsum(0) - run_size
        out = torch.empty(int(run_size.sum()), dtype=torch.float64)
        queries, done, at = by_list // probe.shape[1], 0, 0
        for i, c in enumerate(torch.bincount(pairs, minlength=len(self.vectors)).tolist()):
            if c:  # one GEMM: this list's points against every query of the batch that probes it
                v = self.vectors[i]
                n = v.shape[0]
                torch.addmm(self.sq[i], y[queries[done:done + c]], v.T.double(), alpha=-2.0,
                            out=out[at:at + c * n].view(c, n))
                done, at = done + c, at + c * n
        size = lists.size[probe]
        before = size.cumsum(1) - size  # each probed list's first column in its query's row
        # a row's column j holds out[j + from_out] and the point ids[j + from_ids] of its run's list
        from_out = (runs.view(probe.shape) - before).numpy()
        from_ids = (lists.start[probe] - before).numpy()
        size, held = size.numpy(), size.sum(1).tolist()
        col = np.arange(max(held, default=0))
        out_np, ids_np = out.numpy(), lists.ids.numpy()
        ids = torch.full((len(y), k), -1, dtype=torch.long)
        for b, n in enumerate(held):  # each query's row partitioned alone: the same in any batch
            kk = min(k, n)
            if not kk:
                continue
            row = out_np[np.repeat(from_out[b], size[b]) + col[:n]]
            if cuts is None:  # nearest first
                part = np.argsort(row, kind="stable")[:kk]
            else:
                part = np.argpartition(row, sorted({c - 1 for c in cuts if 0 < c < kk} | {kk - 1}))[:kk]
            ids[b, :kk] = torch.from_numpy(ids_np[np.repeat(from_ids[b], size[b])[part] + part])
        return ids


FAISS_GPU_MAX_K = 2048  # FAISS's GPU indexes return at most this many neighbours per query


class FaissIndex(NeighbourIndex):
    """A FAISS index; `cpu` is its CPU copy when `index` is on a GPU: a deeper search than FAISS's GPU
    selection allows, and every search whose IVF probes must follow k, runs there (not measured: no GPU
    with FAISS here)."""

    def __init__(self, index, base, kind: str, n_points: int, build_s: float, cpu=None):
        super().__init__(kind, n_points, build_s)
        self.index, self.base, self.cpu = index, base, cpu
        self._lists, self._list_scan = None, None

    def lists(self) -> Lists | None:
        """The IVF lists of an `ivf` index searched on the points themselves (no PCA), read once from the
        index (no search); None for any other index."""
        if self.kind != "ivf":
            return None
        if self._lists is None:
            faiss = faiss_module()
            ivf = faiss.extract_index_ivf(self.cpu if self.cpu is not None else self.index)
            inv, nlist = ivf.invlists, ivf.nlist
            size = np.array([inv.list_size(i) for i in range(nlist)], dtype=np.int64)
            ids = np.concatenate([faiss.rev_swig_ptr(inv.get_ids(i), int(n)).copy() if n else np.zeros(0, np.int64)
                                  for i, n in enumerate(size)])
            self._lists = Lists.of(torch.from_numpy(ivf.quantizer.reconstruct_n(0, nlist)).double(),
                                   torch.from_numpy(size), torch.from_numpy(ids.astype(np.int64)))
        return self._lists

    def list_scan(self) -> ListScan:
        """The lists' own scan (`ListScan`) of an `ivf` index: its points read in place from the index's lists."""
        if self._list_scan is None:
            faiss, lists = faiss_module(), self.lists()
            inv = faiss.extract_index_ivf(self.cpu if self.cpu is not None else self.index).invlists
            d = self.base.d
            vectors = [torch.from_numpy(faiss.rev_swig_ptr(inv.get_codes(i), int(n) * d * 4).view(np.float32)
                                        .reshape(int(n), d)) if n else torch.zeros(0, d)
                       for i, n in enumerate(lists.size.tolist())]
            self._list_scan = ListScan(lists, vectors)
        return self._list_scan

    def _search(self, y, k, cuts):
        if hasattr(self.base, "hnsw"):
            self.base.hnsw.efSearch = max(64, 2 * k)
        index = self.index
        if hasattr(self.base, "nprobe"):  # enough lists to hold 2k points: a deep search finds its ranks
            nprobe = min(self.base.nlist, max(IVF_NPROBE, math.ceil(2 * k * self.base.nlist / self.n_points)))
            self.base.nprobe = nprobe
            if self.kind == "ivf" and k >= SCAN_MIN_K:
                return self.list_scan().search(y, k, nprobe, cuts).to(y.device)
            if self.cpu is not None and nprobe != IVF_NPROBE:
                index = self.cpu
        if self.cpu is not None and k > FAISS_GPU_MAX_K:
            index = self.cpu
        q = np.ascontiguousarray(y.detach().to("cpu", torch.float32).numpy())
        _, ids = index.search(q, k)  # (B, k) int64; -1 where fewer than k were found (IVF, HNSW)
        return torch.from_numpy(ids).to(y.device)


class FlatSearch(NeighbourIndex):
    """Exact search by FAISS's brute-force `knn` on the points themselves (CPU, float32): no index copy."""

    def __init__(self, faiss, points: torch.Tensor):
        t0 = time.perf_counter()
        self.faiss, self.points = faiss, points.detach().numpy()
        super().__init__("flat", len(points), time.perf_counter() - t0)

    def _search(self, y, k, cuts):
        q = np.ascontiguousarray(y.detach().to("cpu", torch.float32).numpy())
        _, ids = self.faiss.knn(q, self.points, k)
        return torch.from_numpy(ids).to(y.device)


def build_index(points: torch.Tensor, kind: str = "auto", *, pca: int | None = None, seed: int = 0,
                cache=None, name: str = "points") -> NeighbourIndex:
    """An index of (U, D) points (see the module docstring); deterministic for the same points and seed.

    cache: a `NodeCache` of the data the points come from: the FAISS index is built once per machine and
    memory-mapped (`name` tells apart indexes of different point sets of the same data)."""
    if kind not in INDEXES:
        raise InputError(f"index: expected one of {', '.join(INDEXES)}, got {kind!r}")
    faiss = faiss_module()
    on_cuda = points.device.type == "cuda"
    faiss_gpu = faiss is not None and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if kind == "auto":
        if faiss is None or (on_cuda and not faiss_gpu):
            kind = "torch"
        else:
            kind = "flat" if len(points) <= AUTO_FLAT_MAX else "ivf"
    if kind == "torch":
        if pca is not None:
            raise InputError("index_pca: needs a FAISS index (index flat, ivf or hnsw), not the torch search", field="index_pca")
        return TorchIndex(points)
    if faiss is None:
        raise InputError(f"index {kind}: FAISS is not installed (pip install faiss-cpu), use --index torch")
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    n, d = points.shape
    if pca is not None and not (isinstance(pca, int) and 1 <= pca <= d):
        raise InputError(f"index_pca: expected an integer in [1, D = {d}], got {pca!r}", field="index_pca")
    label = kind + (f"+pca{pca}" if pca is not None else "")
    if kind == "flat" and pca is None and not on_cuda and points.dtype == torch.float32 and points.is_contiguous():
        return FlatSearch(faiss, points)
    if cache is None:
        index = _faiss_index(faiss, points, kind, pca, seed)
    else:  # built by the first process of this machine, mapped by all
        path = cache.file(f"index-{name}-{label}-seed{seed}.faiss",
                          lambda tmp: faiss.write_index(_faiss_index(faiss, points, kind, pca, seed), str(tmp)))
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if kind == "ivf" else faiss.IO_FLAG_MMAP_IFC)
    base = faiss.downcast_index(index.index) if pca is not None else index
    if kind == "ivf":
        base.nprobe = min(base.nlist, IVF_NPROBE)
    cpu = None
    if on_cuda and faiss_gpu and kind != "hnsw":  # FAISS has no GPU HNSW
        cpu, index = index, faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), points.device.index or 0, index)
    return FaissIndex(index, base, label, n, time.perf_counter() - t0, cpu=cpu)


def _faiss_index(faiss, points: torch.Tensor, kind: str, pca: int | None, seed: int):
    """A trained FAISS index (on the CPU) holding the points."""
    x = np.ascontiguousarray(points.detach().to("cpu", torch.float32).numpy())
    n, d = x.shape
    dim = d if pca is None else pca
    if kind == "flat":
        base = faiss.IndexFlatL2(dim)
    elif kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // _TRAIN_PER_LIST or 1))
        base = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        base.nprobe = min(nlist, IVF_NPROBE)
        base.cp.seed = seed
    else:
        base = faiss.IndexHNSWFlat(dim, HNSW_M)
    index = faiss.IndexPreTransform(faiss.PCAMatrix(d, dim), base) if pca is not None else base
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        n_train = min(n, max(_TRAIN_PER_LIST * getattr(base, "nlist", 1), 4 * dim, 10_000))
        train = x if n_train >= n else x[np.sort(rng.choice(n, n_train, replace=False))]
        index.train(train)
    index.add(x)
    return index
