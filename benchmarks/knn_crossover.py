"""Where knn becomes cheaper than exact: CPU time of both on real photo patches at the same queries.

Data: 8×8×3 patches cut (stride 4) from the two photographs scikit-learn ships
(`sklearn.datasets.load_sample_images`), scaled to [-1, 1], N drawn without replacement (seeded) for each
N of `--sizes`. For each N and seed, exact and knn (L = `--subset-size`) estimate J* at `--sigmas` σ with
K = 1 query per sample (the same seeded queries for both, whatever their batch size; both run at knn's
default `rows_per_batch`): knn's true error is its estimate minus exact's on the same queries (relative,
over the σ where J* > 1e-3·J*(∞)). Exact is also timed at its own default batch size. Each run is repeated `--repeats`
times and the least CPU time (user + system, this process) kept: the machine may be shared.

Prints JSON (`_report.emit`); `--out` writes it. Imports only numpy, torch, scikit-learn's sample images
and the lossfloor core.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from _report import device_label, emit  # noqa: E402

from lossfloor.floor import EstimatorConfig, estimate  # noqa: E402


def photo_patches(n: int, seed: int, size: int = 8, stride: int = 4) -> np.ndarray:
    """(n, size·size·3) float32 patches of scikit-learn's sample photographs in [-1, 1] (each flattened
    height, width, channel), n drawn without replacement from every stride-th position."""
    from lossfloor.data.bundled import patches, sample_photos

    rows = np.concatenate([patches(image, size, stride).transpose(0, 2, 3, 1).reshape(-1, size * size * 3)
                           for image in sample_photos()]).astype(np.float32) / 127.5 - 1.0
    if n > len(rows):
        raise SystemExit(f"--sizes: at most {len(rows)} patches at stride {stride}, got {n}")
    return rows[np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(x, sigmas, cfg: EstimatorConfig, repeats: int):
    """(estimate, least CPU seconds, its wall seconds, its system seconds) over `repeats` runs."""
    best = None
    for _ in range(repeats):
        r0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(), time.perf_counter()
        est = estimate(x, sigmas, cfg, progress=False)
        cpu, wall = cpu_seconds() - c0, time.perf_counter() - w0
        sys_s = resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0.ru_stime
        if best is None or cpu < best[1]:
            best = (est, cpu, wall, sys_s)
    return best


def run(n: int, seed: int, args) -> dict:
    x = photo_patches(n, seed)
    sigmas = np.geomspace(args.sigma_min, args.sigma_max, args.sigmas)
    one = dict(seed=seed, queries_per_sample=1)  # M = N queries, the same for both
    knn_cfg = EstimatorConfig(estimator="knn", subset_size=args.subset_size, **one)
    rows = knn_cfg.resolve(*x.shape).rows_per_batch
    exact_default_rows = EstimatorConfig(estimator="exact", **one).resolve(*x.shape).rows_per_batch
    knn, knn_cpu, knn_wall, knn_sys = timed(x, sigmas, knn_cfg, args.repeats)
    exact, ex_cpu, ex_wall, ex_sys = timed(x, sigmas, EstimatorConfig(estimator="exact", **one,
                                                                        rows_per_batch=rows), args.repeats)
    out = {"n": n, "seed": seed, "rows_per_batch": rows, "queries": int(knn.n_queries),
           "knn": {"cpu_s": knn_cpu, "wall_s": knn_wall, "system_s": knn_sys,
                   "search_s": knn.timings.get("search_s"), "index_build_s": knn.timings.get("index_build_s")},
           "exact_same_rows": {"cpu_s": ex_cpu, "wall_s": ex_wall, "system_s": ex_sys}}
    if args.exact_default_rows and exact_default_rows != rows:
        _, c, w, s = timed(x, sigmas, EstimatorConfig(estimator="exact", **one), args.repeats)
        out["exact_default_rows"] = {"rows_per_batch": exact_default_rows, "cpu_s": c, "wall_s": w, "system_s": s}
    exact_cpu = min(ex_cpu, out.get("exact_default_rows", {}).get("cpu_s", ex_cpu))
    useful = exact.j_star > 1e-3 * exact.total_variance
    err = (knn.j_star - exact.j_star) / exact.j_star
    covered = (knn.ci_low <= exact.j_star) & (exact.j_star <= knn.ci_high)
    out.update({"exact_over_knn_cpu": exact_cpu / knn_cpu, "sigmas": sigmas.tolist(),
                "j_star_exact": exact.j_star.tolist(), "j_star_knn": knn.j_star.tolist(),
                "exact_rel_stderr": (exact.stderr / exact.j_star).tolist(),
                "knn_true_rel_error": err.tolist(), "knn_bias_rel": (knn.bias / exact.j_star).tolist(),
                "knn_worst_true_error": float(np.abs(err[useful]).max()),
                "knn_interval_covers_exact": int(covered[useful].sum()), "counted_sigmas": int(useful.sum())})
    print(f"N={n} seed={seed}: exact {exact_cpu:.1f} s, knn {knn_cpu:.1f} s CPU "
          f"(x{out['exact_over_knn_cpu']:.2f}), knn worst true error {out['knn_worst_true_error']:.4f}",
          file=sys.stderr, flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10_000, 20_000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--subset-size", type=int, default=128)
    p.add_argument("--sigmas", type=int, default=8)
    p.add_argument("--sigma-min", type=float, default=0.01)
    p.add_argument("--sigma-max", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--exact-default-rows", action="store_true", help="also time exact at its own batch size")
    p.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default torch's)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # the FAISS index takes torch's thread count when built
    results = {"benchmark": "knn_crossover", "device": device_label("cpu"),
               "date": dt.date.today().isoformat(), "data": "photo patches 8x8x3 (sklearn sample images), [-1, 1]",
               "subset_size": args.subset_size, "queries_per_sample": 1, "threads": torch.get_num_threads(), "repeats": args.repeats,
               "runs": []}
    for n in args.sizes:
        for seed in args.seeds:
            results["runs"].append(run(n, seed, args))
            if args.out:  # what has run so far, in case a long run is stopped
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    emit(results, args.out)
    return results


if __name__ == "__main__":
    main()
