"""Benchmark `--engine ray` against `--engine local` on the same data and seed, on this machine.

Both engines run the same cDOL estimate (the same batches, the same kernel) with a fresh work folder, from
prepared data to the reduced estimate. Per engine: wall time, time inside the kernel (`batch_terms`,
summed over batches; for Ray measured in the worker), the fraction of wall time spent in the kernel, the
per-batch overhead (wall - kernel) / batches, and for Ray the time to the first batch (actor start-up,
data hand-over). Each Ray run starts and stops its local cluster as the CLI does; the cluster start-up
(`ray.init`) and stop (`ray.shutdown`) are reported apart: `overhead_vs_local` compares wall times
without them (as when attached to a running cluster with `--address` or inside `ray job submit`, where
neither happens), `overhead_vs_local_with_cluster_start` with both. Runs alternate local/ray `--repeats`
times; the best of each is compared (the machine may be shared). Goal (issue): the Ray engine with one worker adds <= 15%
over local when the kernel work is >= 20 s.

    .venv/bin/python benchmarks/ray_floor_bench.py --out benchmarks/results/ray_floor_bench-cpu-DATE.json
    .venv/bin/python benchmarks/ray_floor_bench.py --smoke      # a few seconds of work, checks the plumbing

Two more parts (issue 13), each its own run:

    .venv/bin/python benchmarks/ray_floor_bench.py --part nodes --out benchmarks/results/ray_floor_nodes-cpu-DATE.json
    .venv/bin/python benchmarks/ray_floor_bench.py --part memory --out benchmarks/results/ray_floor_memory-cpu-DATE.json

- nodes: the same knn estimate of a shard folder on 1, 2 and 3 Ray nodes started on this machine (a head
  with no CPUs plus worker nodes via `ray start --address`, tests/ray_cluster.py) at equal total logical
  CPUs and equal workers, against the local engine: wall time, overhead over local, the same numbers.
  On one machine the nodes share its cores and its node cache: what differs is scheduling, the object
  transfer between raylets and Ray Data's cross-node plumbing, which is what this measures.
- memory: peak memory of each estimation actor vs N at a fixed batch, for a shard folder (mapped from the
  node cache) and an in-memory array (the object store), sampled from /proc/PID/smaps_rollup every 50 ms:
  private_dirty (what the actor itself holds: its heap, the batch, torch) must stay flat as N grows,
  while rss/pss count the shared mapped data (pss splits it among the processes mapping it). The
  previous design held a private (N, D) copy per actor: its private memory grew by data_mib.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.59 uses token auth for local clusters

import ray
from _report import emit

from lossfloor.floor import EstimatorConfig, batch_terms, floor_data, prepare_data, query_plan, total_variance
from lossfloor.floor.estimate import estimate_passes
from lossfloor.jobs.engine import Engine
from lossfloor.ray import estimate_ray


def make_data(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Clustered data with std ~0.5 per value (like whitened latents), (N, D) float32."""
    rng = np.random.default_rng(seed)
    centres = 0.45 * rng.normal(size=(64, d))
    return (centres[rng.integers(0, 64, n)] + 0.2 * rng.normal(size=(n, d))).astype(np.float32)


def run_local(samples, sigmas, config, work_dir):
    """The local engine as `lossfloor estimate --work-dir` runs it, with the kernel timed per batch."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    x = prepare_data(samples, config)
    cfg = config.resolve(*x.shape)
    kernel = []

    data = floor_data(x, cfg)

    def runner(c, sig, batches):
        plan = query_plan(c, x.shape[0])
        for b in batches:
            t = time.perf_counter()
            part = batch_terms(data, sig, c, plan, b)
            kernel.append(time.perf_counter() - t)
            yield part

    est = estimate_passes(tuple(x.shape), sigmas, cfg, runner, tv=total_variance(x), fingerprint="bench",
                          work_dir=work_dir, resolve=lambda c: c.resolve(*x.shape), progress=False)
    wall = time.perf_counter() - t0
    return est, {"wall_s": wall, "kernel_s": sum(kernel), "n_batches": est.passes[0].n_batches,
                 "first_batch_s": est.passes[0].first_batch_s, "first_kernel_s": kernel[0],
                 "driver_cpu_s": time.process_time() - cpu0,
                 "kernel_s_per_batch_median": float(np.median(kernel)),
                 "loadavg_1min_after": os.getloadavg()[0]}


def run_ray(samples, sigmas, config, work_dir, workers: int, cpus_per_worker: float):
    """The Ray engine as `lossfloor estimate --engine ray` runs it: it starts (and stops) a local cluster."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    rr = estimate_ray(samples, sigmas, config,
                      engine=Engine(kind="ray", workers=workers, cpus_per_worker=cpus_per_worker),
                      fingerprint="bench", work_dir=work_dir, progress=False)
    wall_with_start = time.perf_counter() - t0
    p = rr.result.passes[0]
    return rr.result, {"wall_s": wall_with_start - rr.connect_s - rr.shutdown_s,
                       "cluster_start_s": rr.connect_s, "cluster_stop_s": rr.shutdown_s,
                       "wall_with_cluster_start_s": wall_with_start, "kernel_s": rr.kernel_s,
                       "n_batches": p.n_batches, "first_batch_s": p.first_batch_s,
                       "workers": workers, "cpus_per_worker": cpus_per_worker,
                       "driver_cpu_s": time.process_time() - cpu0, "first_kernel_s": rr.kernel_times[0],
                       "kernel_s_per_batch_median": float(np.median(rr.kernel_times)),
                       "loadavg_1min_after": os.getloadavg()[0]}


def summarise(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["wall_s"])
    out = dict(best)
    out["kernel_fraction"] = best["kernel_s"] / best["wall_s"]  # > 1 with several workers (kernels overlap)
    out["per_batch_overhead_s"] = (best["wall_s"] - best["kernel_s"]) / best["n_batches"]
    # the steady state: everything after the first batch (start-up excluded)
    first_kernel = best.pop("first_kernel_s")
    out["per_batch_overhead_after_first_s"] = (
        (best["wall_s"] - best["first_batch_s"]) - (best["kernel_s"] - first_kernel)
    ) / max(best["n_batches"] - 1, 1)
    out["wall_s_all"] = [round(r["wall_s"], 3) for r in runs]
    out["loadavg_1min_after_each"] = [round(r["loadavg_1min_after"], 2) for r in runs]
    out.pop("loadavg_1min_after")
    return out


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    scale = np.maximum(np.abs(a), np.abs(b))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(scale > 0, np.abs(a - b) / scale, 0.0)
    return float(d.max())


def run_case(n: int, args, tmp: Path) -> dict:
    samples = make_data(n, args.dim)
    sigmas = np.geomspace(0.01, 10.0, args.sigmas)
    config = EstimatorConfig(estimator="cdol", subset_size=args.subset_size, seed=0, rows_per_batch=args.rows_per_batch)
    load0 = os.getloadavg()
    local_runs, ray_runs, ray2_runs = [], [], []
    estimates = {}
    for i in range(args.repeats):  # alternating, so a burst of load from elsewhere hits both engines
        estimates["local"], r = run_local(samples, sigmas, config, tmp / f"local-{n}-{i}")
        local_runs.append(r)
        estimates["ray1"], r = run_ray(samples, sigmas, config, tmp / f"ray-{n}-{i}", 1, float(args.cpus))
        ray_runs.append(r)
        if args.two_workers:
            estimates["ray2"], r = run_ray(samples, sigmas, config, tmp / f"ray2-{n}-{i}", 2, max(1.0, args.cpus / 2))
            ray2_runs.append(r)
    local, ray1 = summarise(local_runs), summarise(ray_runs)
    overhead = ray1["wall_s"] / local["wall_s"] - 1.0
    case = {
        "n": n, "dim": args.dim, "estimator": "cdol", "subset_size": args.subset_size, "queries_per_sample": 3,
        "n_sigmas": args.sigmas, "rows_per_batch": args.rows_per_batch, "n_batches": local["n_batches"],
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
        "local": local,
        "ray_1_worker": ray1,
        "overhead_vs_local": overhead,
        "overhead_vs_local_with_cluster_start": ray1["wall_with_cluster_start_s"] / local["wall_s"] - 1.0,
        "goal_met": bool(overhead <= 0.15 and local["kernel_s"] >= 20.0),
        "max_rel_diff_j_star": rel_diff(estimates["local"].j_star, estimates["ray1"].j_star),
        "max_rel_diff_stderr": rel_diff(estimates["local"].stderr, estimates["ray1"].stderr),
    }
    if ray2_runs:
        ray2 = summarise(ray2_runs)
        case["ray_2_workers"] = ray2
        case["overhead_vs_local_2_workers"] = ray2["wall_s"] / local["wall_s"] - 1.0
        case["max_rel_diff_j_star_2_workers"] = rel_diff(estimates["local"].j_star, estimates["ray2"].j_star)
    return case


def _actor_memory(pid: int) -> dict | None:
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) / 1024.0
    except OSError:
        return None
    try:  # the kernel's split of the resident pages: anonymous (the process's own heap), file, shmem
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    fields[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return {"rss_mib": fields.get("Rss", 0.0), "pss_mib": fields.get("Pss", 0.0),
            "private_dirty_mib": fields.get("Private_Dirty", 0.0),
            "private_mib": fields.get("Private_Dirty", 0.0) + fields.get("Private_Clean", 0.0),
            "rss_anon_mib": fields.get("RssAnon", 0.0), "rss_file_mib": fields.get("RssFile", 0.0),
            "rss_shmem_mib": fields.get("RssShmem", 0.0)}


def _floor_workers() -> set[int]:
    pids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if b"FloorWorker" in f.read():
                        pids.add(int(entry.name))
            except OSError:
                continue
    return pids


class ActorMemory:
    """Peak memory per estimation actor (a process whose title names FloorWorker) started during the
    measurement (actors of an earlier run still shutting down are left out), sampled in a thread."""

    def __init__(self, every_s: float = 0.05):
        import threading

        self.every_s, self.peaks, self._stop = every_s, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._before: set[int] = set()

    def _run(self):
        while not self._stop.is_set():
            for pid in _floor_workers() - self._before:
                mem = _actor_memory(pid)
                if mem:
                    peak = self.peaks.setdefault(pid, dict(mem))
                    for k, v in mem.items():
                        peak[k] = max(peak[k], v)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._before = _floor_workers()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """Over the actors: the largest peak of each measure, and the smallest peak private_dirty (an
        actor that found the node cache ready; the first one of a node also wrote it)."""
        peaks = list(self.peaks.values())
        out = {"actors_seen": len(peaks), **{f"max_{k}": round(max((p[k] for p in peaks), default=0.0), 1)
                                             for k in ("rss_mib", "pss_mib", "private_dirty_mib", "private_mib",
                                                       "rss_anon_mib", "rss_file_mib", "rss_shmem_mib")}}
        for k in ("private_dirty_mib", "rss_anon_mib"):
            out[f"min_{k}"] = round(min((p[k] for p in peaks), default=0.0), 1)
        return out


def _shards(samples: np.ndarray, folder: Path) -> str:
    from lossfloor.data import prepare_shards

    np.save(folder / "data.npy", samples)
    return str(prepare_shards(folder / "data.npy", folder / "shards", rows_per_shard=4096))


def memory_part(args, tmp: Path) -> dict:
    """Peak actor memory vs N at a fixed batch (module docstring), 2 workers on one local Ray node."""
    from lossfloor.data import load

    os.environ["LOSSFLOOR_NODE_CACHE"] = str(tmp / "node-cache")
    sigmas = np.geomspace(0.05, 5.0, 4)
    # cdol: a batch's cost and working set do not depend on N (it gathers its 64 sources and 64 references),
    # so only where the (N, D) data live can make an actor's memory grow with N; knn adds its distinct
    # points, groups and neighbour search (flat: FAISS's knn on the mapped points, no index copy)
    cfg = EstimatorConfig(estimator=args.memory_estimator, subset_size=64, queries_per_sample=1, seed=0,
                          rows_per_batch=64, index="flat" if args.memory_estimator == "knn" else "auto")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    cases = []
    try:
        for n in [int(v) for v in args.memory_n.split(",")]:
            folder = tmp / f"mem-{n}"
            folder.mkdir()
            samples = make_data(n, args.memory_dim, seed=1)
            shards = _shards(samples, folder)
            fp = load(shards).fingerprint
            for kind, source in (("shard_folder", shards), ("in_memory_array", samples)):
                with ActorMemory() as mem:
                    t0 = time.perf_counter()
                    rr = estimate_ray(source, sigmas, cfg, engine=Engine(kind="ray", workers=2, cpus_per_worker=1),
                                      fingerprint=fp, work_dir=folder / f"work-{kind}", progress=False)
                    wall = time.perf_counter() - t0
                cases.append({"n": n, "dim": args.memory_dim, "estimator": cfg.estimator, "data_mib": round(samples.nbytes / 2**20, 1), "source": kind,
                              "rows_per_batch": cfg.rows_per_batch, "wall_s": round(wall, 2),
                              "batches": rr.result.passes[0].n_batches, **mem.summary()})
                print(json.dumps(cases[-1]), file=sys.stderr)
    finally:
        ray.shutdown()
    out = {"cases": cases}
    for kind in ("shard_folder", "in_memory_array"):
        rows = [c for c in cases if c["source"] == kind]
        if len(rows) >= 2:
            d_data = rows[-1]["data_mib"] - rows[0]["data_mib"]
            for which in ("max", "min"):
                for k in ("private_dirty_mib", "rss_anon_mib"):
                    out[f"{kind}_{which}_{k[:-4]}_growth_per_data_mib"] = round(
                        (rows[-1][f"{which}_{k}"] - rows[0][f"{which}_{k}"]) / d_data, 3)
    out["previous_design_private_growth_per_data_mib"] = 1.0  # a private (N, D) copy per actor, by construction
    return out


def nodes_part(args, tmp: Path) -> dict:
    """The same estimate on 1, 2 and 3 nodes at equal total logical CPUs (module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from lossfloor.data import load
    from ray_cluster import MultiNode

    os.environ["LOSSFLOOR_NODE_CACHE"] = str(tmp / "node-cache")
    samples = make_data(args.nodes_n, args.dim, seed=2)
    shards = _shards(samples, tmp)
    fp = load(shards).fingerprint
    sigmas = np.geomspace(0.01, 10.0, args.sigmas)
    cfg = EstimatorConfig(estimator="knn", subset_size=128, queries_per_sample=1, seed=0, rows_per_batch=64)
    local, lr = run_local(samples, sigmas, cfg, tmp / "local")
    total = args.total_cpus
    out = {"n": args.nodes_n, "dim": args.dim, "estimator": "knn", "subset_size": 128, "n_sigmas": args.sigmas,
           "total_logical_cpus": total, "workers": total, "physical_cpus": os.cpu_count(),
           "local": {"wall_s": round(lr["wall_s"], 2), "kernel_s": round(lr["kernel_s"], 2),
                     "threads": torch.get_num_threads()}, "clusters": []}
    for n_nodes in (1, 2, 3):
        folder = tmp / f"cluster-{n_nodes}"
        folder.mkdir()
        with MultiNode(folder) as cluster:
            for i in range(n_nodes):
                cluster.add_node(f"node_{i}", cpus=total // n_nodes)
            t0 = time.perf_counter()
            rr = estimate_ray(shards, sigmas, cfg, engine=Engine(kind="ray", address=cluster.address, workers=total,
                                                                   cpus_per_worker=1),
                              fingerprint=fp, work_dir=folder / "work", progress=False)
            wall = time.perf_counter() - t0 - rr.connect_s - rr.shutdown_s
        est = rr.result
        row = {"nodes": n_nodes, "cpus_per_node": total // n_nodes, "wall_s": round(wall, 2),
               "kernel_s": round(rr.kernel_s, 2), "first_batch_s": round(rr.result.passes[0].first_batch_s, 2),
               "overhead_vs_local": round(wall / lr["wall_s"] - 1.0, 3),
               "max_rel_diff_j_star_vs_local": rel_diff(local.j_star, est.j_star),
               "max_rel_diff_stderr_vs_local": rel_diff(local.stderr, est.stderr)}
        out["clusters"].append(row)
        print(json.dumps(row), file=sys.stderr)
    one = out["clusters"][0]["wall_s"]
    for row in out["clusters"]:
        row["wall_vs_one_node"] = round(row["wall_s"] / one, 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="10240,24576", help="samples N, one case per comma-separated value")
    p.add_argument("--dim", type=int, default=512, help="values per sample D")
    p.add_argument("--subset-size", type=int, default=1024, help="cDOL reference subset L")
    p.add_argument("--sigmas", type=int, default=32, help="number of sigmas (log grid 0.01..10)")
    p.add_argument("--rows-per-batch", type=int, default=256, help="source samples per batch (3 queries each)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="torch threads (local) and Ray num_cpus")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--two-workers", action="store_true", help="also time 2 workers x cpus/2 threads")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    p.add_argument("--part", choices=("engines", "nodes", "memory"), default="engines",
                   help="engines: local vs Ray on one node (default); nodes: 1/2/3 nodes; memory: actor memory vs N "
                   "(the GPU counterpart, core only: benchmarks/device_cap_bench.py)")
    p.add_argument("--nodes-n", type=int, default=16384, help="nodes part: samples N")
    p.add_argument("--total-cpus", type=int, default=6, help="nodes part: logical CPUs (and workers) in every cluster")
    p.add_argument("--memory-n", default="4096,16384,65536", help="memory part: samples N, comma-separated")
    p.add_argument("--memory-dim", type=int, default=1024, help="memory part: values per sample D")
    p.add_argument("--memory-estimator", choices=("cdol", "knn"), default="cdol", help="memory part: the estimator")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.dim, args.subset_size, args.sigmas, args.rows_per_batch, args.repeats = "1024", 64, 128, 8, 128, 1
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.cpus)

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__}
    if args.part != "engines":
        with tempfile.TemporaryDirectory() as tmp:
            part = (nodes_part if args.part == "nodes" else memory_part)(args, Path(tmp))
        emit({"benchmark": f"ray_floor_bench --part {args.part}", "date": dt.date.today().isoformat(),
              "device": "cpu", "machine": machine, **part}, args.out, indent=1)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cases = [run_case(int(n), args, Path(tmp)) for n in args.n.split(",")]
    result = {
        "benchmark": "ray_floor_bench",
        "date": dt.date.today().isoformat(),
        "machine": machine,
        "setup": {"threads": args.cpus, "ray_cpus_per_worker_1_worker": args.cpus, "ray_worker_niceness": 0,
                  "repeats": args.repeats, "best_of_repeats": True, "smoke": args.smoke,
                  "work_dir": "fresh per run (both engines keep partials, as the CLI's ray engine does)"},
        "goal": "ray 1 worker <= 15% over local (wall, without cluster start and stop) at >= 20 s of kernel work",
        "cases": cases,
    }
    emit(result, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
