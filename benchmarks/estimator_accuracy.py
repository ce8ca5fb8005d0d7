"""Accuracy of the subset estimators against the exact J*, at equal kernel cost L, and time to 1 %.

For each data set (the bundled digits, the {-1, 1}^10 product set with its quadrature truth, any
`--data SRC`) and each L of `--subset-sizes`, cdol (the paper's Eq. 11, C = 4N/L) and knn run with
`--seeds` seeds. Per estimator, L and σ (only σ with J* > 1e-3·J*(∞) count):

- subset error: the estimate minus the exact estimator on the *same queries* (same seed and batches;
  cdol against the exact paper form ||x_s||² - ||μ||², knn against the exact posterior-variance form),
  relative to J*: bias (mean over seeds), RMSE and the worst case; query noise is not in it;
- total error against the reference J* (quadrature for the product set, else the exact estimator with
  `--reference-queries` queries per sample): RMSE;
- coverage: how often ci_low..ci_high holds the reference J*;
- wall time per estimate, with knn's index build and search seconds apart.

Cost: the exact and knn wall time of a 32-σ curve at a few N (`--cost-sizes`): where `auto` should
switch from exact to knn.

Time to 1 % accuracy: the smallest L at which an estimator's worst-case subset error is <= 1 % at every
counted σ, and its wall time per estimate (cdol at L = N is the exact estimator). `--device cuda` runs
every estimator there (knn searches with FAISS-GPU when installed, else a torch GEMM + top-k). Imports
only torch, numpy, scipy and the lossfloor core (FAISS when installed); prints JSON, `--out` writes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "tests"))  # the quadrature oracle

from _report import device_label, emit  # noqa: E402

from lossfloor.floor import EstimatorConfig, estimate  # noqa: E402
from lossfloor.floor.neighbours import AUTO_FLAT_MAX  # noqa: E402
from lossfloor.floor.reference import paper_exact_same_queries  # noqa: E402

N_BATCHES = 16  # every run of a data set uses the same batches, so the same queries for a seed


def datasets(extra: list[str]):
    from lossfloor.data import load
    from oracles import product_data, product_optimal_loss

    binary = [[-1.0, 1.0]] * 10
    x = product_data(binary)
    yield "product-binary10", x, lambda s: np.array([product_optimal_loss(binary, v) for v in s])
    digits = load("bundled:digits").samples
    yield "digits", digits.reshape(len(digits), -1), None
    for src in extra:
        ds = load(src)
        yield src, ds.samples.reshape(len(ds), -1), None


def sigma_grid(x: np.ndarray, n: int) -> np.ndarray:
    """Log-spaced σ from where J* starts to matter to where it saturates, scaled to the data's spread."""
    xd = x.astype(np.float64)
    tv = float(((xd - xd.mean(0)) ** 2).sum(1).mean())
    rng = np.random.default_rng(0)
    idx = rng.choice(len(x), size=(min(len(x), 512), 2))
    d = np.sqrt(((xd[idx[:, 0]] - xd[idx[:, 1]]) ** 2).sum(1))
    nearest = np.percentile(d[d > 0], 1) if (d > 0).any() else math.sqrt(tv)
    return np.geomspace(nearest / 8, 3 * math.sqrt(tv), n)


def run(name, x, truth_fn, args) -> dict:
    N = len(x)
    sigmas = sigma_grid(x, args.sigmas)
    rows = math.ceil(N / N_BATCHES)
    t0 = time.perf_counter()
    dev = {"device": args.device}
    ref = estimate(x, sigmas, EstimatorConfig(estimator="exact", queries_per_sample=args.reference_queries, seed=999,
                                              **dev), progress=False)
    reference_s = time.perf_counter() - t0
    truth = truth_fn(sigmas) if truth_fn is not None else ref.j_star
    counted = ref.j_star > 1e-3 * ref.total_variance
    exact_runs, exact_s = {}, []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        exact_runs[seed] = estimate(x, sigmas, EstimatorConfig(estimator="exact", seed=seed, rows_per_batch=rows,
                                                               **dev), progress=False)
        exact_s.append(time.perf_counter() - t0)
    out = {"data": name, "n_samples": N, "dim": int(x.shape[1]), "sigmas": sigmas.tolist(),
           "counted_sigmas": int(counted.sum()), "reference": "quadrature" if truth_fn else
           f"exact, {args.reference_queries} queries per sample", "reference_seconds": reference_s,
           "exact_seconds_per_estimate": float(np.mean(exact_s)), "estimators": {}}
    for est_name in ("cdol", "knn"):
        per_L = []
        for L in [L for L in args.subset_sizes if L < N]:
            sub, tot, cov, secs, search, build = [], [], [], [], [], []
            for seed in range(args.seeds):
                cfg = EstimatorConfig(estimator=est_name, subset_size=L, seed=seed, rows_per_batch=rows, **dev)
                t0 = time.perf_counter()
                e = estimate(x, sigmas, cfg, progress=False)
                secs.append(time.perf_counter() - t0)
                search.append(e.timings.get("search_s", 0.0))
                build.append(e.timings.get("index_build_s", 0.0))
                same = (paper_exact_same_queries(x, sigmas, replace(cfg, device="cpu").resolve(*x.shape))
                        if est_name == "cdol"
                        else exact_runs[seed].j_star)
                sub.append((e.j_star - same) / same)
                tot.append((e.j_star - truth) / truth)
                cov.append((e.ci_low <= truth) & (truth <= e.ci_high))
            sub, tot, cov = (np.array(v)[:, counted] for v in (sub, tot, cov))
            per_L.append({
                "L": L,
                "subset_bias_rel": np.mean(sub, 0).tolist(),
                "subset_rmse_rel": np.sqrt(np.mean(sub**2, 0)).tolist(),
                "subset_rmse_rel_over_sigmas": float(np.sqrt(np.mean(sub**2))),
                "worst_subset_error_rel": float(np.max(np.abs(sub))),
                "total_rmse_rel": np.sqrt(np.mean(tot**2, 0)).tolist(),
                "coverage": np.mean(cov, 0).tolist(),
                "coverage_all": float(np.mean(cov)),
                "seconds_per_estimate": float(np.mean(secs)),
                "index_build_seconds": float(np.mean(build)),
                "search_seconds": float(np.mean(search)),
            })
        hit = next((r for r in per_L if r["worst_subset_error_rel"] <= 0.01), None)
        out["estimators"][est_name] = {
            "per_L": per_L,
            "time_to_1pct": {"L": hit["L"], "seconds": hit["seconds_per_estimate"]} if hit else
            {"L": N, "seconds": out["exact_seconds_per_estimate"], "note": "only at L = N (the exact estimator)"},
        }
    by_L = {r["L"]: r for r in out["estimators"]["cdol"]["per_L"]}
    out["rmse_ratio_cdol_over_knn"] = {
        str(r["L"]): by_L[r["L"]]["subset_rmse_rel_over_sigmas"] / max(r["subset_rmse_rel_over_sigmas"], 1e-12)
        for r in out["estimators"]["knn"]["per_L"] if r["L"] in by_L}
    return out


def cost_case(n: int, args) -> dict:
    """Wall time of the exact and the knn (L = 128, automatic index) estimate of a 32-σ curve at N samples of
    digit-like data (D = 64, 10 clusters): where `auto` switches from exact to knn."""
    rng = np.random.default_rng(n)
    centres = rng.normal(0, 1, (10, 64))
    x = (centres[rng.integers(0, 10, n)] + 0.5 * rng.normal(size=(n, 64))).astype(np.float32)
    sigmas = sigma_grid(x, 32)
    out = {"n_samples": n, "dim": 64, "n_sigmas": 32, "queries_per_sample": 3}
    for name in ("exact", "knn"):
        t0 = time.perf_counter()
        e = estimate(x, sigmas, EstimatorConfig(estimator=name, seed=0, device=args.device), progress=False)
        out[f"{name}_seconds"] = time.perf_counter() - t0
        if name == "knn":
            out["knn_index"] = "ivf" if n > AUTO_FLAT_MAX else "flat"
            out["knn_search_seconds"] = e.timings.get("search_s", 0.0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", default=[], help="another data source (repeatable)")
    p.add_argument("--subset-sizes", default="32,64,128,256,512", help="L values, comma-separated")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--sigmas", type=int, default=12)
    p.add_argument("--reference-queries", type=int, default=16, help="queries per sample of the exact reference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cost-sizes", default="5000,20000,40000",
                   help="N of the exact-vs-knn cost comparison (comma-separated; empty: none)")
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    args = p.parse_args(argv)
    args.subset_sizes = [int(v) for v in args.subset_sizes.split(",")]
    results = {
        "benchmark": "estimator_accuracy",
        "date": dt.date.today().isoformat(),
        "device": device_label(args.device),
        "torch": torch.__version__,
        "seeds": args.seeds,
        "cases": [run(name, x, truth, args) for name, x, truth in datasets(args.data)],
        "cost": [cost_case(int(n), args) for n in args.cost_sizes.split(",") if n],
    }
    emit(results, args.out)


if __name__ == "__main__":
    main()
