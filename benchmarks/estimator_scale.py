"""Cost of J* as N grows: time to 1 %, its split into search, gathers and kernels, peak memory, a cost model.

Data: photo patches (8×8×3 from the photographs scikit-learn ships, D = 192, in [-1, 1]) at N in
`--sizes`, and a low-rank Gaussian mixture at D = `--synthetic-dim` (≥ 1 024) at N in
`--synthetic-sizes` (`_scale_data`); 16 σ from 0.002 to 80 (`--sigmas`).

Per data set and N:
- exact: the reference. Its wall time, and the per-query spread of its terms (stderr·√M / J*), hence the
  queries a 1 % Monte-Carlo half-width needs: M₁ = (1.96 · spread / 0.01)².
- cdol and knn: a ladder of L (knn 128, 256, 512, …; cdol 512, 2 048, 8 192, …) until the worst true
  error against the exact estimator on the same queries (same seed) is ≤ 1 % at every σ with
  J* > 1e-3·J*(∞); "time to 1 %" is the wall time of that run (none: the ladder reached N, i.e. exact).
- every run: wall time split into search (the neighbour index: build + search, from the estimate's
  timings), gathers (row gathers and scatters: aten::index, index_select, gather, …), GEMMs (mm, bmm, …),
  element-wise work and reductions (every other torch op), and the rest (Python, FAISS-free glue) —
  from torch.profiler's self times (`--no-split` skips the profiler); peak memory: the resident set's
  largest increase during the run (sampled every 10 ms) and the process's ru_maxrss; on CUDA the
  allocator's peak.
- growth: the exponent of a least-squares fit of log time vs log N per estimator (sizes with a time).

Queries: M = `--queries` in total per σ (the first M of the seeded query order: the same queries for
every estimator, so the exact estimate is the reference on them).

Hardware limits measured in the same run: this machine's fp32 GEMM FLOP/s and memory bandwidth (copy).
The cost model (`cost_model`, FLOPs and bytes per stage) is evaluated at every measured case with those
limits (model seconds beside measured seconds) and at the ImageNet-512 latent shape (N = 1 281 167,
D = 16 384, 64 σ) on one H100 (datasheet peaks, `H100`).

`--quick`: tiny sizes (about a minute). `--device cuda` runs there (FAISS-GPU when installed, else the torch
search). Imports only the lossfloor core, numpy, torch (FAISS when installed; scikit-learn for the photos).
Prints JSON; `--out` writes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import resource
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import device_label, emit
from _scale_data import lowrank_mixture, photo_patches, sigma_grid

from lossfloor.floor import EstimatorConfig, estimate
from lossfloor.floor.knn import search_limit
from lossfloor.floor.neighbours import AUTO_FLAT_MAX, IVF_NPROBE, faiss_module

LADDERS = {"knn": (128, 256, 512, 1024), "cdol": (512, 2048, 8192, 32768)}
THRESHOLD = 1e-3  # σ with J* > THRESHOLD·J*(∞) count

# One H100 SXM5 (NVIDIA datasheet): FP32 67 TFLOP/s (non-tensor), TF32 tensor 495 TFLOP/s dense
# (989 with sparsity), HBM3 3.35 TB/s.
H100 = {"name": "H100 SXM5 (datasheet)", "fp32_flops": 67e12, "tf32_flops": 495e12, "bandwidth": 3.35e12}
IMAGENET512 = {"n": 1_281_167, "d": 4 * 64 * 64, "sigmas": 64}

# Passes over the (B, ·) per-σ arrays of the current kernels (reads + writes of 4-byte values), counted
# from the code: exact/cdol's per-σ logits, max, exp, normalisation and weighted sums (`floor.kernel`);
# knn's per-σ differences fA = x_A - x_s, their norms, ε·fA and the weighted sums (`floor.knn`).
EW_PASSES = {"exact": 18, "cdol": 18, "knn_rows": 10, "knn_draws": 40}
EW_FLOPS = 8  # element-wise flops per entry of a per-σ (B, L) array (exp counted as one)


# ---------------------------------------------------------------------------------------------------
# Cost model

def search_points(n: int, d: int, index: str, *, k: int = 64, nprobe: int = IVF_NPROBE, hnsw_m: int = 32,
                  ef: int = 64, pca: int | None = None) -> float:
    """Points (of dimension d, or pca) a single search of k neighbours compares its query with: flat N;
    IVF nlist centroids + the lists probed, nprobe of N/nlist or enough to hold 2k points (nlist = 4√N, as
    `neighbours`); HNSW about max(efSearch, 2k)·M."""
    if index == "flat":
        return float(n)
    if index == "ivf":
        nlist = max(1, int(4 * math.sqrt(n)))
        return nlist + min(n, max(min(nprobe, nlist) * n / nlist, 2 * k))
    if index == "hnsw":
        return float(max(ef, 2 * k) * hnsw_m)
    raise ValueError(f"index: expected flat, ivf or hnsw, got {index!r}")


def cost_model(estimator: str, *, n: int, m: int, L: int, d: int, sigmas: int, batch: int = 4096,
               index: str = "flat", pca: int | None = None, search_sigmas: int | None = None,
               bytes_per_value: int = 4, a_share: float = 1.0) -> dict:
    """FLOPs and bytes of one estimate, per stage, as the current implementation does the work.

    n samples of dimension d, m queries (each evaluated at every σ), `sigmas` σ values, queries in
    batches of `batch`, L kernels per query (exact: L = n). Stages, each {"flops", "bytes"} in total and
    "per_sigma" where the work repeats per σ:

    - gemm: matrix products. exact/cdol (`floor.kernel`): per batch the σ-independent Dxx, Dex
      (2 GEMMs (B,d)·(d,L): 4·B·L·d), and when L < d the reference distances Dref (2·L²·d); per σ and
      level (exact: L; cdol: L, L/2, L/4) the posterior mean w·X (2·B·ℓ·d) or, with Dref, w·Dref
      (2·B·ℓ²). knn (`floor.knn`, k = the width of A and the bands' draws (`knn.layout`), n_draw
      candidates (`knn.draws_needed`, ≥ L), σ in chunks of knn.SIGMA_CHUNK): per σ the weighted sums over those k (a bmm of 4 weight
      rows per σ — each half, both, plain — with the chunk's r distinct rows: 8·B·r·d per σ,
      r = a_share·s·k for a chunk of s σ; a_share = 1, every σ's rows different, is the upper bound, 1/s
      the lower) and over the rest's draws (6 rows: 12·B·L·d), and the scalar sums (16·B·k + 36·B·L).
    - elementwise: the per-σ work on (B, L) arrays (EW_PASSES passes, EW_FLOPS flops an entry); knn also
      on its (B, k, d) gathered differences (EW_PASSES["knn_rows"] passes, 4 flops an entry).
    - gathers: rows moved: the batch's sources (m·d), cdol's reference rows per batch (L·d), knn's A rows
      per σ (m·k·d read and written) and candidate rows per batch.
    - search (knn): per σ (search_sigmas of them; default all) every query compared with
      `search_points` points (a search to the layout's depth, 4 096 ranks at L = 128 on large data):
      2·m·P·d' flops (d' = pca or d) and the P·d' values read per query batch
      (the index streamed once per batch of queries); a PCA projection adds 2·m·d·pca; an IVF index's
      list bands add each query's centroid distances (2·m·nlist·d).

    Bytes count reads and writes of `bytes_per_value`-byte values; they bound memory traffic from below
    where arrays fit no cache. The projection `roofline_seconds` takes the larger of flops/peak and
    bytes/bandwidth per stage.
    """
    b = min(batch, m)
    nb = math.ceil(m / b)
    v = bytes_per_value
    stages = {s: {"flops": 0.0, "bytes": 0.0, "per_sigma": {"flops": 0.0, "bytes": 0.0}}
              for s in ("search", "gathers", "gemm", "elementwise")}

    def add(stage, flops, nbytes, per_sigma=False):
        reps = sigmas if per_sigma else 1
        stages[stage]["flops"] += reps * flops
        stages[stage]["bytes"] += reps * nbytes
        if per_sigma:
            stages[stage]["per_sigma"]["flops"] += flops
            stages[stage]["per_sigma"]["bytes"] += nbytes

    if estimator in ("exact", "cdol"):
        L = n if estimator == "exact" else L
        levels = [L] if estimator == "exact" else [L, L // 2, L // 4]
        use_dref = L < d
        add("gathers", 0.0, 2 * v * m * d + (0 if estimator == "exact" else 2 * v * nb * L * d))
        add("gemm", 4.0 * m * L * d + (2.0 * nb * L * L * d if use_dref else 0.0),
            v * (2 * m * d + nb * L * d + 2 * m * L) + (v * nb * (L * d + L * L) if use_dref else 0))
        for ell in levels:
            if use_dref:
                add("gemm", 2.0 * m * ell * ell, v * (2 * m * ell + nb * ell * ell), per_sigma=True)
            else:
                add("gemm", 2.0 * m * ell * d, v * (m * ell + nb * ell * d + m * d), per_sigma=True)
            add("elementwise", EW_FLOPS * m * ell, EW_PASSES[estimator] * v * m * ell, per_sigma=True)
    elif estimator == "knn":
        from lossfloor.floor.knn import SIGMA_CHUNK, draws_needed, layout

        lists = index == "ivf" and not pca  # the rest in list bands (`knn.layout`)
        lay = layout(n, L, lists)
        k, n_draw = lay.width, draws_needed(n, n, L, lists=lists)  # the σ-dependent rows: A and the bands' draws
        chunks = [min(SIGMA_CHUNK, sigmas - c) for c in range(0, sigmas, SIGMA_CHUNK)]
        r_rows = sum(a_share * s_ch * k * s_ch for s_ch in chunks) / sigmas  # Σ over chunks of r·s, per σ
        add("gathers", 0.0, 2 * v * (m * d + m * n_draw * d))  # sources and each query's candidates
        add("gathers", 0.0, 2 * v * m * a_share * k * d, per_sigma=True)  # a chunk's distinct A rows, per σ
        add("gemm", 8.0 * m * r_rows * d + 12.0 * m * n_draw * d + 16.0 * m * k + 36.0 * m * n_draw,
            v * (2 * m * r_rows * d + 4 * m * n_draw * d), per_sigma=True)
        add("elementwise", 4.0 * m * n_draw * d + EW_FLOPS * m * (k + n_draw),
            EW_PASSES["knn_rows"] * v * m * k * d + EW_PASSES["knn_draws"] * v * m * n_draw, per_sigma=True)
        dim = pca or d
        pts = search_points(n, dim, index, k=lay.depth)
        s_sigmas = sigmas if search_sigmas is None else search_sigmas
        search_flops = 2.0 * m * pts * dim + (2.0 * m * d * pca if pca else 0.0)
        if lists:  # each query's order of the lists: its centroid distances again
            search_flops += 2.0 * m * max(1, int(4 * math.sqrt(n))) * dim
        search_bytes = v * (nb * pts * dim + m * d)
        stages["search"]["flops"] += s_sigmas * search_flops
        stages["search"]["bytes"] += s_sigmas * search_bytes
        stages["search"]["per_sigma"] = {"flops": search_flops, "bytes": search_bytes}
    else:
        raise ValueError(f"estimator: expected exact, cdol or knn, got {estimator!r}")
    return {"estimator": estimator, "n": n, "m": m, "L": L, "d": d, "sigmas": sigmas, "batch": b,
            "index": index if estimator == "knn" else None, "stages": stages,
            "flops": sum(s["flops"] for s in stages.values()), "bytes": sum(s["bytes"] for s in stages.values())}


def roofline_seconds(cost: dict, flops_per_s: float, bytes_per_s: float) -> dict:
    """Seconds per stage (max of flops/peak and bytes/bandwidth) and their sum: a lower bound."""
    per = {name: max(s["flops"] / flops_per_s, s["bytes"] / bytes_per_s) for name, s in cost["stages"].items()}
    return {"stages": per, "total": sum(per.values())}


# ---------------------------------------------------------------------------------------------------
# Measurement

def hardware_limits(device: torch.device, size: int = 2048, repeats: int = 5) -> dict:
    """Achieved fp32 GEMM FLOP/s ((size, size) products) and memory bandwidth (a 256 MiB copy: read + write)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    gemm = 2.0 * size**3 * repeats / (time.perf_counter() - t0)
    src = torch.randn(1 << 26, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync()
    bandwidth = 2.0 * src.numel() * 4 * repeats / (time.perf_counter() - t0)
    return {"gemm_fp32_flops_per_s": gemm, "copy_bytes_per_s": bandwidth, "gemm_size": size}


class PeakMemory:
    """The largest increase of the resident set (Linux /proc/self/statm) while the block runs, in bytes."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return 0

    def _watch(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.increase = self.peak - self.base


GEMM_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::mv", "aten::dot", "aten::addmv"}
GATHER_OPS = {"aten::index", "aten::index_select", "aten::gather", "aten::take", "aten::embedding",
              "aten::index_put_", "aten::_index_put_impl_", "aten::scatter_", "aten::masked_select"}


def stage_split(events, cuda: bool) -> dict:
    """Seconds in GEMMs, gathers and everything else from profiler key averages. CPU: each op's self time.
    CUDA: the kernels under each GEMM/gather op (its device time; `_index_put_impl_` is inside `index_put_`),
    the rest of all kernels' time element-wise."""
    split = {"gathers_s": 0.0, "gemm_s": 0.0, "elementwise_s": 0.0}
    if not cuda:
        for ev in events:
            kind = "gemm_s" if ev.key in GEMM_OPS else "gathers_s" if ev.key in GATHER_OPS else "elementwise_s"
            split[kind] += ev.self_cpu_time_total * 1e-6
        return split
    total = sum(ev.self_device_time_total for ev in events) * 1e-6
    for ev in events:
        if ev.key in GEMM_OPS:
            split["gemm_s"] += ev.device_time_total * 1e-6
        elif ev.key in GATHER_OPS and ev.key != "aten::_index_put_impl_":
            split["gathers_s"] += ev.device_time_total * 1e-6
    split["elementwise_s"] = max(0.0, total - split["gemm_s"] - split["gathers_s"])
    return split


def query_config(queries: int | None, **kw) -> EstimatorConfig:
    """The config of a case: M = `queries` per σ (None: the default K·N)."""
    return EstimatorConfig(queries=queries, **kw)


SPLIT_QUERIES = 512  # queries of the profiled run that splits a run's time into stages


def timed_estimate(x, sigmas: np.ndarray, cfg: EstimatorConfig, split: bool) -> tuple:
    """(estimate, record): wall seconds and peak memory of one estimate, and with `split` its time split into
    stages: the shares of a second, profiled run of the first SPLIT_QUERIES queries (the profiler's per-op
    overhead would inflate the timed run, more for many small ops than for few large ones), applied to
    the timed run's seconds."""
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        e = estimate(x, sigmas, cfg, progress=False)
        wall = time.perf_counter() - t0
    rec = {"seconds": wall, "search_s": e.timings.get("search_s", 0.0) + e.timings.get("index_build_s", 0.0),
           "peak_rss_increase_bytes": mem.increase,
           "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "queries": int(e.n_queries), "L": int(cfg.subset_size or 0), "rows_per_batch": int(e.config.rows_per_batch)}
    if dev.type == "cuda":
        rec["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
    if split:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if dev.type == "cuda" else [])
        small = replace(cfg, queries=min(int(e.n_queries), SPLIT_QUERIES))
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=acts) as prof:
            p = estimate(x, sigmas, small, progress=False)
        p_wall = time.perf_counter() - t0
        shares = {"search_s": p.timings.get("search_s", 0.0), **stage_split(prof.key_averages(), dev.type == "cuda")}
        shares["other_s"] = max(0.0, p_wall - p.timings.get("index_build_s", 0.0) - sum(shares.values()))
        total = sum(shares.values()) or 1.0
        build = e.timings.get("index_build_s", 0.0)
        rec["split"] = {"index_build_s": build, **{k: (wall - build) * v / total for k, v in shares.items()}}
        rec["split_note"] = (f"index build as timed; the rest split by the shares of a profiled run of the first "
                             f"{small.queries} queries, applied to this run's seconds")
    return e, rec


def growth_exponent(ns, secs) -> float | None:
    """Slope of log seconds vs log N (least squares), None with fewer than two sizes."""
    pts = [(n, s) for n, s in zip(ns, secs, strict=True) if s]
    if len({n for n, _ in pts}) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def run_case(name: str, x: np.ndarray, args, limits: dict) -> dict:
    n, d = x.shape
    base = {"seed": args.seed, "device": args.device}  # each estimator's own batch size: the same queries anyway
    out = {"data": name, "n_samples": n, "dim": d, "runs": {}}
    ex, rec = timed_estimate(x, args.sigma_grid, query_config(args.queries, estimator="exact", **base), args.split)
    counted = ex.j_star > THRESHOLD * ex.total_variance
    spread = np.where(counted, ex.stderr * math.sqrt(ex.n_queries) / np.where(ex.j_star > 0, ex.j_star, 1), 0)
    rec["per_query_spread_rel"] = spread.tolist()
    rec["queries_for_1pct"] = math.ceil((1.96 * spread.max() / 0.01) ** 2)
    rec["mc_half_width_rel"] = float(np.max(1.96 * spread / math.sqrt(ex.n_queries)))
    out["runs"]["exact"] = {"time_to_1pct_s": rec["seconds"], "ladder": [rec]}
    out["counted_sigmas"] = counted.tolist()
    print(f"{name} N={n} exact {rec['seconds']:.1f}s", file=sys.stderr)
    for est in ("cdol", "knn"):
        ladder, hit = [], None
        for L in LADDERS[est]:
            if L >= n:
                break
            cfg = query_config(args.queries, estimator=est, subset_size=L, **base)
            e, rec = timed_estimate(x, args.sigma_grid, cfg, args.split)
            err = np.abs(e.j_star - ex.j_star) / np.where(ex.j_star > 0, ex.j_star, 1.0)
            rec["worst_rel_error"] = float(err[counted].max())
            rec["rel_error_per_sigma"] = np.where(counted, err, 0.0).tolist()
            ladder.append(rec)
            print(f"{name} N={n} {est} L={L} {rec['seconds']:.1f}s err {rec.get('worst_rel_error')}", file=sys.stderr)
            if rec["worst_rel_error"] <= 0.01:
                hit = rec
                break
            if rec["seconds"] > args.max_seconds:
                break
        out["runs"][est] = {"ladder": ladder, "time_to_1pct_s": hit["seconds"] if hit else None,
                            "L_to_1pct": hit["L"] if hit else None}
    for est, r in out["runs"].items():
        for rec in r["ladder"]:
            _add_model(rec, est, n, d, rec["rows_per_batch"], len(args.sigma_grid), limits)
    return out


def _add_model(rec: dict, est: str, n: int, d: int, rows: int, n_sigmas: int, limits: dict) -> None:
    """The cost model of a measured run, in seconds at this machine's measured GEMM rate and bandwidth."""
    index = "flat" if n <= AUTO_FLAT_MAX else "ivf"
    cost = cost_model(est, n=n, m=rec["queries"], L=rec["L"] or n, d=d, sigmas=n_sigmas, batch=rows, index=index)
    rec["model"] = {"flops": cost["flops"], "bytes": cost["bytes"],
                    "seconds_at_measured_limits": roofline_seconds(
                        cost, limits["gemm_fp32_flops_per_s"], limits["copy_bytes_per_s"])}


def searched_sigmas(count: int, dim: int, data_std: float = 0.5) -> int:
    """σ of a `count`-σ grid (0.002 … 80) where knn searches (`knn.search_limit`). EDM2's latents:
    σ_data = 0.5."""
    return int((sigma_grid(count) < search_limit(dim, data_std)).sum())


def imagenet_projection(m_values, knn_L: int = 128, cdol_L: int = 4096) -> list[dict]:
    """The cost model at the ImageNet-512 latent shape on one H100, for each M (queries per σ)."""
    out = []
    shape = IMAGENET512
    for m in m_values:
        for est, L, index, extra in (("exact", shape["n"], None, {}), ("cdol", cdol_L, None, {}),
                                     ("knn", knn_L, "flat", {}), ("knn", knn_L, "ivf", {}),
                                     ("knn", knn_L, "ivf", {"search_sigmas": searched_sigmas(shape["sigmas"], shape["d"])})):
            cost = cost_model(est, n=shape["n"], m=m, L=L, d=shape["d"], sigmas=shape["sigmas"],
                              index=index or "flat", **extra)
            fp32 = roofline_seconds(cost, H100["fp32_flops"], H100["bandwidth"])
            out.append({"estimator": est, "queries": m, "L": L, "index": index, **extra,
                        "flops": cost["flops"], "bytes": cost["bytes"],
                        "stage_flops": {k: v["flops"] for k, v in cost["stages"].items()},
                        "stage_bytes": {k: v["bytes"] for k, v in cost["stages"].items()},
                        "h100_fp32_seconds": fp32["total"], "h100_fp32_stage_seconds": fp32["stages"]})
    return out


def _sizes(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="5000,20000,80000,320000,500000", help="photo-patch N, comma-separated")
    p.add_argument("--synthetic-sizes", default="5000,20000,80000", help="N of the low-rank mixture")
    p.add_argument("--synthetic-dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=8192, help="M per σ")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop a ladder after a run this long")
    p.add_argument("--sigmas", type=int, default=16, help="σ count (log-spaced from 0.002 to 80)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: about a minute")
    p.add_argument("--no-split", dest="split", action="store_false", help="no profiler (no stage split)")
    p.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.synthetic_sizes, args.synthetic_dim, args.queries = "500,1000", "500", 1024, 1000
    if args.threads:
        torch.set_num_threads(args.threads)  # the FAISS index takes torch's thread count when built
    args.sigma_grid = sigma_grid(args.sigmas)
    device = torch.device(args.device)
    limits = hardware_limits(device)
    cases = []
    todo = [("photo-patches", n) for n in _sizes(args.sizes)]
    todo += [(f"lowrank-mixture-d{args.synthetic_dim}", n) for n in _sizes(args.synthetic_sizes)]
    for name, n in todo:
        x = photo_patches(n, seed=1) if name == "photo-patches" else lowrank_mixture(n, args.synthetic_dim)
        cases.append(run_case(name, x, args, limits))
        if args.out:  # the cases so far, in case a long run is stopped
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out + ".partial").write_text(json.dumps({"cases": cases}, indent=2) + "\n", encoding="utf-8")
    growth = {}
    for data in sorted({c["data"] for c in cases}):
        mine = [c for c in cases if c["data"] == data]
        growth[data] = {}
        for est in ("exact", "cdol", "knn"):
            runs = [(c["n_samples"], c["runs"][est]) for c in mine if c["runs"].get(est, {}).get("ladder")]
            growth[data][est] = {
                "smallest_L": growth_exponent([n for n, _ in runs], [r["ladder"][0]["seconds"] for _, r in runs]),
                "time_to_1pct": growth_exponent([n for n, _ in runs], [r["time_to_1pct_s"] for _, r in runs]),
                "sizes": [n for n, _ in runs]}
    spreads = [c["runs"]["exact"]["ladder"][0]["queries_for_1pct"] for c in cases
               if c["data"] == "photo-patches" and "exact" in c["runs"]]
    m_values = sorted({3000, 20000, *([max(spreads)] if spreads else [])})
    results = {
        "benchmark": "estimator_scale", "date": dt.date.today().isoformat(), "device": device_label(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "faiss": getattr(faiss_module(), "__version__", None),
        "queries": "M per σ = --queries",
        "sigmas": args.sigma_grid.tolist(), "hardware_limits": limits, "cases": cases,
        "growth_exponent": growth,
        "imagenet512_h100_projection": {"hardware": H100, "shape": IMAGENET512,
                                        "rows": imagenet_projection(m_values)},
    }
    emit(results, args.out)
    if args.out:
        Path(args.out + ".partial").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
