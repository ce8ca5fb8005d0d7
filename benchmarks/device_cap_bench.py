"""Data larger than the device cap: one estimator process on CUDA keeps them in host memory and each
batch gathers its rows (`lossfloor.floor.batch.floor_data`, `--max-device-gb`).

cdol at a fixed batch (its working set does not depend on N) on N x D float32 data larger than the cap,
twice: with the cap (the data on the host, rows gathered per batch) and without it (the data on the
device, when they fit). Reports peak device memory (torch's allocator) against the cap and the batch's
working set, throughput of both, and that the two give the same J* (noise drawn on the CPU, so the
queries are identical). Core only (numpy, torch): runs on a bare GPU box.

    python benchmarks/device_cap_bench.py --out benchmarks/results/device_cap_bench-cuda-DATE.json
    python benchmarks/device_cap_bench.py --device cpu --n 20000 --dim 256   # the plumbing, without a GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from _report import device_label, emit

from lossfloor.floor import (
    EstimatorConfig,
    batch_terms,
    floor_data,
    prepare_data,
    query_plan,
    reduce_estimate,
    total_variance,
)
from lossfloor.floor.config import batch_bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=1_000_000, help="samples N (default with --dim: 15 GiB of data)")
    p.add_argument("--dim", type=int, default=4096, help="values per sample D")
    p.add_argument("--cap-gb", type=float, default=4.0, help="--max-device-gb of the capped run")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("device_cap_bench: --device cuda: no CUDA device here (use --device cpu for the plumbing)",
              file=sys.stderr)
        return 2
    rng = np.random.default_rng(3)
    samples = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    sigmas = np.geomspace(0.01, 10.0, 16)
    base = dict(estimator="cdol", subset_size=1024, queries_per_sample=1, seed=0, rng_device="cpu",
                device=args.device, rows_per_batch=1024)
    x = prepare_data(samples, EstimatorConfig(**{**base, "device": "cpu"}))  # host memory
    tv = total_variance(x)
    cuda = args.device.startswith("cuda")
    out = {"benchmark": "device_cap_bench", "date": dt.date.today().isoformat(), "device": device_label(args.device),
           "n": args.n, "dim": args.dim, "data_gib": round(samples.nbytes / 2**30, 3), "cap_gib": args.cap_gb,
           "runs": {}}
    j = {}
    for mode, cap in (("capped", args.cap_gb), ("uncapped", None)):
        cfg = EstimatorConfig(**base, max_device_gb=cap).resolve(args.n, args.dim)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        data = floor_data(x, cfg)
        plan = query_plan(cfg, args.n)
        parts = [batch_terms(data, sigmas, cfg, plan, b) for b in range(plan.n_batches)]
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        j[mode] = reduce_estimate(parts, sigmas, cfg, tv).j_star
        out["runs"][mode] = {
            "data_on_host": data.on_host, "wall_s": round(wall, 3), "queries_per_s": round(args.n / wall, 1),
            "peak_device_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
            "batch_working_set_gib": round(batch_bytes(cfg, args.dim) / 2**30, 3)}
        del data
    if cuda:
        out["capped_within_cap"] = out["runs"]["capped"]["peak_device_gib"] <= args.cap_gb
    scale = np.maximum(np.abs(j["capped"]), np.abs(j["uncapped"]))
    out["max_rel_diff_j_star"] = float(np.max(np.abs(j["capped"] - j["uncapped"]) / np.where(scale > 0, scale, 1)))
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
