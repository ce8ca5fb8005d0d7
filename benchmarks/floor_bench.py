"""Benchmark the optimal-loss kernel against a naive fp32 reference and the GEMM peak, in one run.

Two cases (issue 2 §7):
  imagenet512: one cDOL batch at the ImageNet-512-latent shape (D = 16384, L = 4096, B = 4096 queries, 64 σ);
  cifar10:     the exact estimator's whole 64-σ curve on a CIFAR-10-sized set (N = 50 000, D = 3072, k = 3).
Per case: queries·σ per second, achieved TFLOP/s (counted FLOPs / time), the fp32 GEMM peak measured now
at the case's shape, the naive fp32 reference (two GEMMs + a softmax per σ) timed on the same inputs,
the speed-up, and the largest relative difference from a float64 computation of the same batch where
J* > 1e-4 · J*(∞).

`--scale` shrinks every dimension for machines without a GPU (results record the shapes actually run;
the cifar10 time for the full curve is then extrapolated from the measured rate and says so).
Imports only torch and the lossfloor core, so it runs on a bare GPU box. Prints JSON; `--out` writes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from _report import device_label, emit

from lossfloor.floor.kernel import Level, optimal_loss_terms
from lossfloor.floor.reference import naive_optimal_loss_terms


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int):
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), out


def gemm_peak_tflops(B, L, D, device, repeats):
    a = torch.randn(B, D, device=device)
    b = torch.randn(L, D, device=device)
    t, _ = timed(lambda: a @ b.T, device, repeats)
    return 2 * B * L * D / t / 1e12


def kernel_flops(B, L, D, S, gram: bool):
    shared = 2 * (2 * B * L * D)  # G = X Rᵀ and E = ε Rᵀ
    if gram:
        return shared + 2 * L * L * D + S * 2 * B * L * L  # Dref from R Rᵀ, then w Dref per σ
    return shared + S * 2 * B * L * D  # δ = S x - w R per σ


def naive_flops(B, L, D, S):
    return S * 2 * (2 * B * L * D)


def make_batch(N, B, L, D, device, seed=0):
    """Synthetic data with std 0.5 per value (like whitened latents / [-1,1] images): sources, noise, refs."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(N, D, generator=g, dtype=torch.float64)
    src = torch.randint(0, N, (B,), generator=g)
    eps = torch.randn(B, D, generator=g, dtype=torch.float64)
    return x, src, eps


def rel_diff(j, j_ref, total_var):
    """Largest relative difference of the batch-mean J* over σ where J* > 1e-4 J*(∞)."""
    m, m_ref = j.double().mean(0), j_ref.double().mean(0)
    keep = m_ref > 1e-4 * total_var
    if not keep.any():
        return float("nan")
    return float(((m - m_ref).abs() / m_ref)[keep].max())


def case_imagenet512(scale, device, repeats, n_sigmas):
    D, L, B = int(16384 * scale), int(4096 * scale), int(4096 * scale)
    N = 4 * L
    x64, src, eps64 = make_batch(N, B, L, D, device)
    R = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:L]
    position = torch.full((N,), -1, dtype=torch.long)
    position[R] = torch.arange(L)
    pos = position[src]
    exclude = torch.where(pos >= 0, pos, L - 1).to(device)
    log_factor = torch.full((B,), -math.log(4.0 * N / L), dtype=torch.float64, device=device)
    sigmas = torch.logspace(math.log10(0.002), math.log10(80.0), n_sigmas, dtype=torch.float64)
    total_var = float((x64 - x64.mean(0)).pow(2).sum(1).mean())

    def inputs(dtype):
        x = x64.to(device=device, dtype=dtype)
        return x[src.to(device)], eps64.to(device=device, dtype=dtype), x[R.to(device)]

    xs32, eps32, refs32 = inputs(torch.float32)
    xs64, e64, refs64 = inputs(torch.float64)
    kw = dict(exclude=exclude, source_log_factor=log_factor)
    levels = [Level(L, exclude, log_factor)]

    def fast(xs, e, refs, precision="fp32"):  # one level: the estimator at L (cdol's bias levels cost extra)
        return optimal_loss_terms(xs, e, refs, sigmas, levels=levels, precision=precision)[:, 0]

    t_fast, j_fast = timed(lambda: fast(xs32, eps32, refs32), device, repeats)
    t_naive, j_naive = timed(lambda: naive_optimal_loss_terms(xs32, eps32, refs32, sigmas, **kw), device, repeats)
    j_ref = fast(xs64, e64, refs64)
    j_ref_naive = naive_optimal_loss_terms(xs64, e64, refs64, sigmas, **kw)
    S = n_sigmas
    gram = L < D
    variants = {}
    if device.type == "cuda":  # TF32 tensor cores exist only there
        for precision in ("3xtf32", "tf32"):
            t, j = timed(lambda p=precision: fast(xs32, eps32, refs32, p), device, repeats)
            variants[precision] = {
                "seconds_per_batch": t,
                "speedup_vs_naive_fp32": t_naive / t,
                "max_rel_diff_vs_fp64": rel_diff(j, j_ref, total_var),
            }
    return {
        "case": "imagenet512",
        "shape": {"D": D, "L": L, "B": B, "N": N, "n_sigmas": S, "estimator": "cdol"},
        "seconds_per_batch": t_fast,
        "naive_fp32_seconds_per_batch": t_naive,
        "speedup_vs_naive_fp32": t_naive / t_fast,
        "query_sigmas_per_second": B * S / t_fast,
        "achieved_tflops": kernel_flops(B, L, D, S, gram) / t_fast / 1e12,
        "naive_achieved_tflops": naive_flops(B, L, D, S) / t_naive / 1e12,
        "gemm_peak_fp32_tflops": gemm_peak_tflops(B, L, D, device, repeats),
        "max_rel_diff_vs_fp64": rel_diff(j_fast, j_ref, total_var),
        "naive_fp32_max_rel_diff_vs_fp64": rel_diff(j_naive, j_ref, total_var),
        "fp64_kernel_vs_fp64_naive_max_rel_diff": rel_diff(j_ref, j_ref_naive, total_var),
        "matmul_precision_variants": variants,
    }


def case_cifar10(scale, device, repeats, n_sigmas):
    """The exact estimator's full curve: every sample is the source of k queries against all N."""
    from lossfloor.floor import EstimatorConfig, estimate

    N, D, k = int(50_000 * scale), int(3072 * scale), 3
    x = (0.5 * torch.randn(N, D, generator=torch.Generator().manual_seed(0))).numpy()
    sigmas = torch.logspace(math.log10(0.002), math.log10(80.0), n_sigmas, dtype=torch.float64).numpy()
    cfg = EstimatorConfig(estimator="exact", queries_per_sample=k, device=str(device), seed=0)
    t0 = time.perf_counter()
    est = estimate(x, sigmas, cfg, progress=False)
    sync(device)
    seconds = time.perf_counter() - t0
    B, L = est.config.rows_per_batch * k, N
    flops = est.n_batches * kernel_flops(B, L, D, n_sigmas, gram=L < D)
    out = {
        "case": "cifar10",
        "shape": {"N": N, "D": D, "k": k, "n_sigmas": n_sigmas, "estimator": "exact",
                  "queries_per_batch": B},
        "seconds_full_curve": seconds,
        "query_sigmas_per_second": est.n_queries * n_sigmas / seconds,
        "achieved_tflops": flops / seconds / 1e12,
        "gemm_peak_fp32_tflops": gemm_peak_tflops(min(B, 4096), min(L, 4096), D, device, repeats),
    }
    if scale != 1.0:
        full_flops = kernel_flops(50_000 * k, 50_000, 3072, n_sigmas, gram=False)
        out["extrapolated_seconds_at_full_shape"] = full_flops / (flops / seconds)
        out["note"] = "scaled run; the full-shape time is extrapolated from the measured FLOP rate"
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=float, default=None, help="shrink every dimension (default 1 on CUDA, 1/8 on CPU)")
    p.add_argument("--sigmas", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default="imagenet512,cifar10")
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else 0.125)
    results = {
        "benchmark": "floor_bench",
        "date": dt.date.today().isoformat(),
        "device": device_label(device),
        "torch": torch.__version__,
        "scale": scale,
        "cases": [],
    }
    for name in args.cases.split(","):
        fn = {"imagenet512": case_imagenet512, "cifar10": case_cifar10}[name]
        results["cases"].append(fn(scale, device, args.repeats, args.sigmas))
    emit(results, args.out)


if __name__ == "__main__":
    main()
