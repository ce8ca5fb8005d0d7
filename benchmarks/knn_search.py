"""Neighbour search of noisy queries at scale: recall per σ, build and search time, and what misses cost.

The knn estimator searches the noisy query y = x_s + σε for its k = L/2 nearest distinct samples
(`lossfloor.floor.knn.neighbour_sets`). Three studies, on photo patches (8×8×3, D = 192, scaled to
[-1, 1]) and a low-rank Gaussian mixture at D = 1 024 (`_scale_data`), 16 σ from 0.002 to 80:

1. recall: for N in `--sizes` (photo patches) and `--synthetic-sizes` (mixture), `--queries` sources
   drawn uniformly, one noisy query each per σ; recall@k = |found ∩ true k nearest| / k (the truth from
   FAISS's exact brute-force `knn`) per σ for IVF (nlist = √N and 4√N; nprobe 8, 32, 128), HNSW
   (M = 32; efSearch 64, 128, 256; up to `--hnsw-max-n`) and PCA-reduced exact search (r = 16, 48 components), with each
   index's build seconds and search seconds per query (exact search: flat, for comparison).
2. accuracy: at N in `--accuracy-sizes` (photo patches, where the exact estimator is affordable) J* of
   knn (L = 128) with each index kind, and with the search replaced by k uniform draws ("uniform"),
   against the exact estimator on the same queries (same seed and batches: the index consumes no
   randomness, so only A differs between the knn runs), per σ: the error an approximate index adds, and
   whether a search helps at all at large σ.

3. depth: at N in `--depth-sizes` (photo patches) the knn estimator's deep search (`knn.layout` at
   `--depth-L`: depth N/20, at least 4 096) of `--depth-queries` noisy queries at three σ, by FAISS's IVF
   search (a heap of the k best per query) and by the index's own list scan (`neighbours.ListScan`: one
   float64 GEMM per probed list, a partition at the strata's edges), the same probes: milliseconds per
   query each, their ratio, whether both gave every stratum the same members, and the scan's floor (its
   GEMM FLOPs at this machine's float64 GEMM rate, measured in the same run).

Prints JSON; `--out` writes it. Imports the lossfloor core, numpy, torch, FAISS and scikit-learn (the
photographs). Timings on a shared machine are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import device_label, emit
from _scale_data import SIGMAS, lowrank_mixture, photo_patches

from lossfloor.floor import EstimatorConfig, estimate
from lossfloor.floor.neighbours import NeighbourIndex, faiss_module

K = 64  # L = 128 (knn's default): k = L/2 nearest


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per query |found ∩ truth| / k of (Q, k) id arrays (ids < 0, FAISS's "none", never match)."""
    k = truth.shape[1]
    out = np.empty(len(truth))
    for start in range(0, len(truth), 1024):
        f, t = found[start:start + 1024], truth[start:start + 1024]
        hit = (f[:, :, None] == t[:, None, :]) & (f[:, :, None] >= 0)
        out[start:start + 1024] = hit.any(1).sum(1) / k
    return out


def noisy_queries(x: np.ndarray, n_queries: int, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, round(sigma * 1e6)])
    src = rng.choice(len(x), n_queries, replace=False)
    return (x[src] + sigma * rng.normal(size=(n_queries, x.shape[1]))).astype(np.float32)


def build_indexes(faiss, x: np.ndarray, seed: int, hnsw_max_n: int):
    """(name, index, build seconds, [(setting name, setter)]) for each approximate index of the study."""
    n, d = x.shape
    rng = np.random.default_rng(seed)
    for nlist in sorted({max(1, int(math.sqrt(n))), max(1, int(4 * math.sqrt(n)))}):
        t0 = time.perf_counter()
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        index.cp.seed = seed
        n_train = min(n, 64 * nlist)
        index.train(x if n_train >= n else x[np.sort(rng.choice(n, n_train, replace=False))])
        index.add(x)
        yield (f"ivf{nlist}", index, time.perf_counter() - t0,
               [(f"nprobe{p}", lambda p=p, ix=index: setattr(ix, "nprobe", min(p, ix.nlist))) for p in (8, 32, 128)])
    if n <= hnsw_max_n:
        t0 = time.perf_counter()
        index = faiss.IndexHNSWFlat(d, 32)
        index.add(x)
        yield ("hnsw32", index, time.perf_counter() - t0,
               [(f"ef{e}", lambda e=e, ix=index: setattr(ix.hnsw, "efSearch", e)) for e in (64, 128, 256)])
    for r in (16, 48):
        if r >= d:
            continue
        t0 = time.perf_counter()
        index = faiss.IndexPreTransform(faiss.PCAMatrix(d, r), faiss.IndexFlatL2(r))
        n_train = min(n, 50_000)
        index.train(x if n_train >= n else x[np.sort(rng.choice(n, n_train, replace=False))])
        index.add(x)
        yield f"pca{r}", index, time.perf_counter() - t0, [("exact", lambda: None)]


def recall_case(name: str, x: np.ndarray, n_queries: int, seed: int, hnsw_max_n: int) -> dict:
    faiss = faiss_module()
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    queries = [noisy_queries(x, n_queries, s, seed) for s in SIGMAS]
    truth, flat_s = [], 0.0
    for q in queries:
        t0 = time.perf_counter()
        truth.append(faiss.knn(q, x, K)[1])
        flat_s += time.perf_counter() - t0
    out = {"data": name, "n_points": len(x), "dim": int(x.shape[1]), "queries_per_sigma": n_queries, "k": K,
           "flat": {"build_s": 0.0, "search_s_per_query": flat_s / (n_queries * len(SIGMAS))}, "indexes": {}}
    for label, index, build_s, settings in build_indexes(faiss, x, seed, hnsw_max_n):
        per = {"build_s": build_s, "settings": {}}
        for setting, apply in settings:
            apply()
            rec, secs = [], 0.0
            for q, t in zip(queries, truth, strict=True):
                t0 = time.perf_counter()
                found = index.search(q, K)[1]
                secs += time.perf_counter() - t0
                rec.append(float(recall_at_k(found, t).mean()))
            per["settings"][setting] = {"recall_per_sigma": rec, "search_s_per_query": secs / (n_queries * len(SIGMAS)),
                                        "speedup_vs_flat": flat_s / max(secs, 1e-12)}
        out["indexes"][label] = per
        print(f"{name} N={len(x)} {label}: build {build_s:.1f}s "
              + ", ".join(f"{s}: {min(v['recall_per_sigma']):.2f}..{max(v['recall_per_sigma']):.2f}"
                          f" x{v['speedup_vs_flat']:.1f}" for s, v in per["settings"].items()), file=sys.stderr)
    return out


class UniformIndex(NeighbourIndex):
    """No search: k distinct points drawn uniformly per query (seeded; the run's batch order fixes them)."""

    def __init__(self, n_points: int, seed: int):
        super().__init__("uniform", n_points, 0.0)
        self.g = torch.Generator().manual_seed(seed)

    def _search(self, y, k, cuts):
        return torch.rand(y.shape[0], self.n_points, generator=self.g).topk(k, dim=1).indices.to(y.device)


def query_config(**kw) -> EstimatorConfig:
    """One query per sample (M = N), as the committed results were measured."""
    return EstimatorConfig(queries_per_sample=1, **kw)


VARIANTS = {  # name: (config fields, IVF nprobe or None, uniform draws instead of a search)
    "flat": ({"index": "flat"}, None, False),
    "ivf_nprobe8": ({"index": "ivf"}, 8, False),
    "ivf_nprobe32": ({"index": "ivf"}, 32, False),
    "hnsw": ({"index": "hnsw"}, None, False),
    "pca16": ({"index": "flat", "index_pca": 16}, None, False),
    "pca48": ({"index": "flat", "index_pca": 48}, None, False),
    "uniform": ({"index": "flat"}, None, True),
}


def accuracy_case(n: int, seeds: int) -> dict:
    import lossfloor.floor.neighbours as neighbours

    x = photo_patches(n, seed=1)
    rows = math.ceil(n / 16)
    out = {"data": "photo-patches", "n_samples": n, "L": 2 * K, "seeds": seeds, "variants": {}}
    errs = {v: [] for v in VARIANTS}
    secs = {v: [] for v in VARIANTS}
    search = {v: [] for v in VARIANTS}
    counted = None
    for seed in range(seeds):
        ex = estimate(x, SIGMAS, query_config(estimator="exact", seed=seed, rows_per_batch=rows), progress=False)
        counted = ex.j_star > 1e-3 * ex.total_variance
        for name, (kw, nprobe, uniform) in VARIANTS.items():
            cfg = query_config(estimator="knn", subset_size=2 * K, seed=seed, rows_per_batch=rows, **kw)
            with contextlib.ExitStack() as stack:
                stack.enter_context(mock.patch.object(neighbours, "IVF_NPROBE", nprobe or neighbours.IVF_NPROBE))
                if uniform:
                    stack.enter_context(mock.patch("lossfloor.floor.knn.build_index",
                                                   lambda points, *a, seed=seed, **k: UniformIndex(len(points), seed)))
                t0 = time.perf_counter()
                e = estimate(x, SIGMAS, cfg, progress=False)
                secs[name].append(time.perf_counter() - t0)
            search[name].append(e.timings.get("search_s", 0.0) + e.timings.get("index_build_s", 0.0))
            errs[name].append(np.where(ex.j_star > 0, e.j_star - ex.j_star, 0.0) / np.where(ex.j_star > 0, ex.j_star, 1.0))
        print(f"accuracy N={n} seed {seed} done", file=sys.stderr)
    out["counted_sigmas"] = counted.tolist()
    for name in VARIANTS:
        err = np.array(errs[name])  # (seeds, S)
        out["variants"][name] = {
            "rel_error_per_sigma": err.tolist(),
            "rms_rel_error_per_sigma": np.sqrt(np.mean(err**2, 0)).tolist(),
            "worst_rel_error": float(np.max(np.abs(err[:, counted]))),
            "rms_rel_error": float(np.sqrt(np.mean(err[:, counted] ** 2))),
            "seconds": float(np.mean(secs[name])), "index_build_and_search_seconds": float(np.mean(search[name])),
        }
    return out


def float64_gemm_rate(size: int = 1024, repeats: int = 3) -> float:
    """This machine's achieved float64 GEMM FLOP/s (best of `repeats` (size, size) products)."""
    a, b = torch.randn(size, size, dtype=torch.float64), torch.randn(size, size, dtype=torch.float64)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def depth_case(n: int, n_queries: int, L: int, seed: int, gemm_rate: float) -> dict:
    """FAISS's IVF search against `ListScan` at knn's depth on n photo patches (study 3)."""
    from lossfloor.floor import neighbours
    from lossfloor.floor.knn import layout, search_rows

    x = torch.from_numpy(photo_patches(n, seed=1))
    lay = layout(n, L, lists=True)
    k = lay.depth - 1
    index = neighbours.build_index(x, "ivf", seed=seed)
    t0 = time.process_time()
    index.list_scan()  # its lists' views and squared norms, once per index: timed apart
    rng = np.random.default_rng(seed)
    out = {"n": n, "L": L, "depth": lay.depth, "cuts": list(lay.cuts), "queries": n_queries, "index_build_s": index.build_s,
           "scan_setup_s": time.process_time() - t0, "sigmas": []}
    for sigma in (0.02, 0.1, 0.5):
        src = rng.choice(n, n_queries, replace=False)
        y = x[src] + sigma * torch.from_numpy(rng.normal(size=(n_queries, x.shape[1])).astype(np.float32))
        step = search_rows(lay.depth)  # as the estimator batches its searches
        timed = {}
        for name, scan_min in (("faiss", 10**12), ("scan", 0)):
            with mock.patch.object(neighbours, "SCAN_MIN_K", scan_min):
                t0 = time.process_time()
                ids = torch.cat([index.search(y[i:i + step], k, cuts=lay.cuts) for i in range(0, n_queries, step)])
                timed[name] = (time.process_time() - t0, ids.numpy())
        edges = list(zip((0, *lay.cuts), (*lay.cuts, k)))
        shared = np.array([[len(set(a[lo:hi].tolist()) & set(b[lo:hi].tolist())) / max(1, hi - lo) for lo, hi in edges]
                           for a, b in zip(timed["faiss"][1], timed["scan"][1])])  # (queries, strata)
        held = index.base.nprobe * n / index.base.nlist  # candidates per query, on average
        out["sigmas"].append({"sigma": sigma, "faiss_ms_per_query": 1e3 * timed["faiss"][0] / n_queries,
                              "scan_ms_per_query": 1e3 * timed["scan"][0] / n_queries,
                              "speedup": timed["faiss"][0] / timed["scan"][0],
                              "strata_shared": shared.mean(0).tolist(),  # members both found, per stratum
                              "queries_with_the_same_strata": float((shared == 1).all(1).mean()),
                              "nprobe": index.base.nprobe, "candidates_per_query": held,
                              "scan_gemm_floor_ms_per_query": 1e3 * 2.0 * held * x.shape[1] / gemm_rate})
        print(json.dumps({"n": n, **out["sigmas"][-1]}), file=sys.stderr, flush=True)
    return out


def partial(results: dict, out: str | None) -> None:
    """The results so far, written to `out` (a long run keeps what it measured if stopped)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,100000,500000", help="photo-patch N of the recall study")
    p.add_argument("--synthetic-sizes", default="20000,100000", help="N of the D = 1024 mixture (recall)")
    p.add_argument("--synthetic-dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=128, help="noisy queries per σ (recall study)")
    p.add_argument("--accuracy-sizes", default="5000,20000", help="N of the accuracy study (empty: none)")
    p.add_argument("--accuracy-seeds", type=int, default=2)
    p.add_argument("--depth-sizes", default="10000,20000,80000,320000", help="N of the depth study (empty: none)")
    p.add_argument("--depth-queries", type=int, default=1024, help="noisy queries per σ (depth study)")
    p.add_argument("--depth-L", type=int, default=256, help="knn's L whose layout sets the depth (depth study)")
    p.add_argument("--hnsw-max-n", type=int, default=200_000, help="largest N with an HNSW index (slow to build)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (CPU times are summed over them)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if faiss_module() is None:
        raise SystemExit("knn_search: needs FAISS (pip install faiss-cpu)")
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    results = {"benchmark": "knn_search", "date": dt.date.today().isoformat(), "device": device_label("cpu"),
               "torch": torch.__version__, "faiss": faiss_module().__version__, "sigmas": SIGMAS.tolist(),
               "threads": args.threads, "recall": [], "accuracy": [], "depth": []}
    gemm_rate = float64_gemm_rate()
    results["float64_gemm_flops_per_s"] = gemm_rate
    for n in ints(args.depth_sizes):
        results["depth"].append(depth_case(n, args.depth_queries, args.depth_L, args.seed, gemm_rate))
        partial(results, args.out)
    for n in ints(args.sizes):
        results["recall"].append(recall_case("photo-patches", photo_patches(n, seed=1), args.queries, args.seed, args.hnsw_max_n))
        partial(results, args.out)
    for n in ints(args.synthetic_sizes):
        results["recall"].append(recall_case(f"lowrank-mixture-d{args.synthetic_dim}",
                                             lowrank_mixture(n, args.synthetic_dim), args.queries, args.seed, args.hnsw_max_n))
        partial(results, args.out)
    for n in ints(args.accuracy_sizes):
        results["accuracy"].append(accuracy_case(n, args.accuracy_seeds))
        partial(results, args.out)
    emit(results, args.out)


if __name__ == "__main__":
    main()
