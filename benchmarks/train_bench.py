"""Benchmark EDM2 training steps per preset: images/s, peak memory and model-FLOP utilisation (issue 4 §7).

One training step is the loop's (lossfloor.train.loop, steps 1-4) on synthetic data already on the
device: sigma from the EDM2 schedule, the EDM2 loss with the learned log-variance, backward, NaN-zeroing
of the gradients, Adam, forced weight normalisation and the power-function EMA update. Data loading,
evaluation and checkpoints are not timed (the published EDM2 numbers also exclude them).

Per preset: img/s at the given batch (median step time over --steps timed steps after --warmup steps),
peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS), and MFU = achieved
model FLOP/s / the bf16 matmul peak measured in the same run (a big square matmul), where model FLOPs
per image = 3 x lossfloor.train.forward_flops(preset) (FlopCounterMode, forward + backward = 3 forwards,
the loop's FLOP convention). Printed next to the official EDM2 anchors (H100, batch 32, fp16).

    python benchmarks/train_bench.py --out benchmarks/results/train_bench-h100.json           # GPU
    python benchmarks/train_bench.py --presets img512-xs,img512-m --compile --precision bf16
    python benchmarks/train_bench.py --presets tiny --batch 8 --steps 3                        # CPU smoke

Imports only torch and the lossfloor core, so it runs on a bare GPU box. Prints JSON; `--out` writes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from _report import device_label, emit

from lossfloor.diffusion import get_preconditioning
from lossfloor.models import (
    build_uncertainty_head,
    build_unet,
    force_weight_norm_,
    get_preset,
    params_of,
    set_forced_wn,
)
from lossfloor.train import EDM2Schedule, PowerFunctionEMA, build_schedule, forward_flops, training_loss
from lossfloor.train.loop import zero_nonfinite_grads_
from lossfloor.train.losses import Denoiser

EDM2_PRESETS = ("img512-xs", "img512-s", "img512-m", "img512-l", "img512-xl", "img512-xxl")
# Official EDM2 training throughput: H100, batch 32, fp16 (the EDM2 paper's published throughput)
REFERENCE = {"source": "official EDM2 code, H100, batch 32 per GPU, fp16, img/s",
             "img_per_s": {"img512-xs": 197, "img512-s": 207, "img512-m": 172, "img512-l": 121,
                           "img512-xl": 96, "img512-xxl": 74}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """TFLOP/s of an (n, n) @ (n, n) matmul in `dtype`, best of `repeats` after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del a, b
    return 2 * n**3 / best / 1e12


class Step:
    """One EDM2 training step of a preset on synthetic device-resident data (module docstring)."""

    def __init__(self, preset, batch: int, device: torch.device, precision: str, compile_net: bool, seed: int = 0):
        p = get_preset(preset)
        self.batch, self.device = batch, device
        self.net = build_unet(p, device=device, seed=seed)
        self.head = build_uncertainty_head(p, device=device, seed=seed)
        self.modules = [self.net, self.head]
        for m in self.modules:
            set_forced_wn(m, False)  # forced weight normalisation once per step, as the loop does
            force_weight_norm_(m)
        precond = get_preconditioning("edm", sigma_data=p.sigma_data)
        self.schedule = build_schedule(EDM2Schedule(), precond, P_mean=p.P_mean, P_std=p.P_std, jstar=None)
        net = torch.compile(self.net) if compile_net else self.net
        self.denoiser = Denoiser(net, precond, self.head, precision)
        self.params = [q for m in self.modules for q in m.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-4, betas=p.adam_betas, eps=p.adam_eps)
        self.ema = PowerFunctionEMA(self.net, (0.05, 0.10))
        u = p.unet
        g = torch.Generator().manual_seed(seed)
        self.x0 = (0.5 * torch.randn(batch, u.img_channels, u.img_resolution, u.img_resolution, generator=g)).to(device)
        self.labels = torch.randint(0, u.label_dim, (batch,), generator=g).to(device) if u.label_dim else None
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.n_img = 0

    def __call__(self) -> None:
        B = self.batch
        sigma = self.schedule.sample_sigma(B, self.gen).to(torch.float32)  # (B,)
        noise = torch.randn(self.x0.shape, generator=self.gen, device=self.device)  # (B, C, H, W)
        self.optimizer.zero_grad(set_to_none=True)
        L, _, _ = training_loss(self.denoiser, self.x0, sigma, noise, self.labels, self.schedule.weight(sigma),
                                uncertainty=True)
        (L.sum() / B).backward()
        zero_nonfinite_grads_(self.params)
        self.optimizer.step()
        for m in self.modules:
            force_weight_norm_(m)
        self.n_img += B
        self.ema.update(self.net, self.n_img, B)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_preset(name: str, args, device: torch.device, peak_bf16: float, peak_fp32: float) -> dict:
    p = get_preset(name)
    fwd = forward_flops(p)  # FLOPs of one forward of F per image
    row = {"preset": name, "params": params_of(p), "forward_gflops_per_img": fwd / 1e9,
           "train_gflops_per_img": 3 * fwd / 1e9, "reference_img_per_s": REFERENCE["img_per_s"].get(name)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        t_build = time.perf_counter()
        step = Step(name, args.batch, device, args.precision, args.compile)
        for _ in range(args.warmup):
            step()
        sync(device)
        row["warmup_s"] = time.perf_counter() - t_build  # build + warm-up steps (+ compilation)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        return row
    t = statistics.median(times)
    img_s = args.batch / t
    achieved = img_s * 3 * fwd / 1e12
    row.update({
        "step_s": t, "step_s_all": times, "img_per_s": img_s, "achieved_tflops": achieved,
        "mfu_vs_bf16_peak": achieved / peak_bf16,
        "mfu_vs_fp32_peak": achieved / peak_fp32,
        "vs_reference": None if row["reference_img_per_s"] is None else img_s / row["reference_img_per_s"],
    })
    if device.type == "cuda":
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        row["peak_memory_mib"] = peak_rss_mib()
        row["memory_kind"] = "peak RSS of the whole process (CPU; includes every preset run before it)"
    del step
    gc.collect()
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(EDM2_PRESETS), help="comma-separated presets (default the img512 ladder)")
    ap.add_argument("--batch", type=int, default=32, help="images per step (default 32, as the EDM2 anchors)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per preset (default 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, 10 with --compile)")
    ap.add_argument("--precision", default=None, choices=("none", "bf16", "fp16"),
                    help="autocast of the network (default bf16 on CUDA, none on the CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network")
    ap.add_argument("--device", default=None, help="cuda | cpu (default cuda when available)")
    ap.add_argument("--matmul-n", type=int, default=None, help="size of the peak matmul (default 8192 CUDA, 1024 CPU)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default torch's)")
    ap.add_argument("--note", default=None, help="a remark stored with the results (e.g. machine load)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "none")
    args.warmup = args.warmup if args.warmup is not None else (10 if args.compile else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "fp16" and not cuda:
        ap.error("--precision fp16 needs CUDA")
    n = args.matmul_n or (8192 if cuda else 1024)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 peak = true fp32
    peak_bf16 = matmul_peak_tflops(device, torch.bfloat16, n)
    peak_fp32 = matmul_peak_tflops(device, torch.float32, n)
    results = [bench_preset(name.strip(), args, device, peak_bf16, peak_fp32)
               for name in args.presets.split(",") if name.strip()]
    out = {
        "benchmark": "train_bench",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device_kind": "GPU" if cuda else "CPU",
        "device": device_label(device),
        "note": "; ".join(x for x in (None if cuda else "CPU run: a smoke test of the benchmark, not comparable "
                                      "with the GPU anchors", args.note) if x) or None,
        "torch": torch.__version__, "python": platform.python_version(),
        "settings": {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "precision": args.precision,
                     "compile": args.compile, "ema_stds": [0.05, 0.10], "data": "synthetic, on the device"},
        "flop_convention": "model FLOPs per image = 3 x forward FLOPs of F (FlopCounterMode, batch 1, 2 per MAC)",
        "peak_tflops": {"bf16": peak_bf16, "fp32": peak_fp32, "matmul_n": n},
        "results": results,
        "reference": REFERENCE,
    }
    emit(out, args.out, indent=1)
    return out


if __name__ == "__main__":
    main()
