"""Benchmark `lossfloor evaluate`: samples/s and features/s of the plain single-process loop, the local
engine and Ray with 1 and several workers, in one run on this machine.

The model is a small convolutional x0-denoiser saved as TorchScript (random weights: the work per sample
is what matters, not its quality); the features are a small TorchScript network behind DINOv2's preprocessing (`dinov2:FILE`) and
`pixels:2`. The plain loop calls `generate` and the extractors directly (no job, no work folder); the
engines run the `lossfloor.jobs.evaluate` job with its work folder, the Ray ones on a local Ray instance
started beforehand (its start-up is reported apart, as when attached to a running cluster). Every run
evaluates the same samples: the FDs must agree exactly between the engines.

    .venv/bin/python benchmarks/evaluate_bench.py --out benchmarks/results/evaluate_bench-cpu-DATE.json
    .venv/bin/python benchmarks/evaluate_bench.py --smoke          # seconds: checks the plumbing
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.59 uses token auth for local clusters

from _report import device_label, emit

from lossfloor.jobs import evaluate as job
from lossfloor.jobs.engine import Engine
from lossfloor.train.metrics import feature_extractors, to_uint8
from lossfloor.train.quality import SamplerSettings, reference_statistics, write_reference
from lossfloor.train.sampling import generate


class ConvDenoiser(torch.nn.Module):
    """D(x, sigma) = x / (1 + sigma^2) + a small conv net's correction (TorchScript 've' x0 model)."""

    def __init__(self, width: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = t.view(-1, 1, 1, 1)
        return x / (1 + s * s) + 0.1 * self.net(x / torch.sqrt(1 + s * s))


class Features(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 64, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3))


def _save(module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512, help="samples per run (default 512)")
    p.add_argument("--steps", type=int, default=8, help="Heun steps (default 8)")
    p.add_argument("--size", type=int, default=16, help="image size (default 16: 3 x 16 x 16)")
    p.add_argument("--width", type=int, default=32, help="denoiser channels (default 32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", default="1,2", help="Ray worker counts (default 1,2)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.smoke:
        args.n, args.steps, args.width = 64, 3, 8
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="evaluate-bench-"))
    model, feat = _save(ConvDenoiser(args.width), tmp / "model.pt"), _save(Features(), tmp / "features.pt")
    features = f"pixels:2,dinov2:{feat}"  # dinov2: the 224 resize and normalisation, a small net
    shape = (3, args.size, args.size)
    g = torch.Generator().manual_seed(1)
    data = (torch.rand((256, *shape), generator=g) * 2 - 1).numpy()
    from lossfloor.data import Dataset

    ds = Dataset(samples=data, labels=None, fingerprint="bench", source="random", normalisation="none")
    stats = tmp / "ref.npz"
    write_reference(reference_statistics(ds, feature_extractors(features)), stats)

    # the plain loop: generate, quantise, features, in this process
    den = torch.jit.load(str(model))
    t0 = time.perf_counter()
    x, _ = generate(lambda x, s, lab: den(x, s), args.n, shape, seed=0, batch=args.batch, num_steps=args.steps)
    t_sample = time.perf_counter() - t0
    ex = feature_extractors(features)
    t0 = time.perf_counter()
    for i in range(0, args.n, args.batch):
        u8 = to_uint8(x[i : i + args.batch])
        for e in ex.values():
            e(u8)
    t_feat = time.perf_counter() - t0
    runs = {"plain_loop": {"samples_per_s": args.n / t_sample, "features_per_s": args.n / t_feat,
                           "images_per_s": args.n / (t_sample + t_feat), "wall_s": t_sample + t_feat}}

    def engine_run(name: str, engine: Engine) -> dict:
        spec = job.EvaluateSpec(model=str(model), prediction="x0", reference_stats=str(stats), features=features,
                                out=str(tmp / name), n_samples=args.n, seeds=1, batch=args.batch,
                                settings=SamplerSettings(num_steps=args.steps), engine=engine)
        t0 = time.perf_counter()
        result = job.evaluate(spec)
        wall = time.perf_counter() - t0
        return {"images_per_s": args.n / wall, "wall_s": wall, "fd": result["fd"]["mean"]}

    runs["local_engine"] = engine_run("local", Engine())
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - t0
    for w in [int(v) for v in args.workers.split(",")]:
        runs[f"ray_{w}_workers"] = engine_run(f"ray{w}", Engine(kind="ray", workers=w,
                                                                cpus_per_worker=max(1, os.cpu_count() // w)))
    ray.shutdown()
    fds = {k: v["fd"] for k, v in runs.items() if "fd" in v}
    emit({"benchmark": "evaluate_bench", "date": dt.date.today().isoformat(), "device": device_label("cpu"),
          "cpus": os.cpu_count(), "ray_start_s": ray_start,
          "config": {"n": args.n, "steps": args.steps, "shape": list(shape), "width": args.width,
                     "batch": args.batch, "features": "pixels:2,dinov2:(conv 3->64 at 224)"},
          "same_fd_on_every_engine": len(set(fds.values())) == 1, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
