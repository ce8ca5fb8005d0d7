"""Where work runs: the one engine setting of every command and study, and its one set of flags.

    add_engine_args(parser, workers_help="actors in the pool")   # --engine --address --workers ...
    engine = Engine.from_args(parser.parse_args())               # validated, defaults filled in
    estimate(samples, sigmas, config, engine=engine)

`local` runs in this process (on the command's own --device). `ray` runs on a Ray cluster: the one at
`address`, else the Ray this process already has, else a new local one; with `workers` workers of
`cpus_per_worker` Ray CPUs (also their torch threads) and `gpus_per_worker` GPUs each, computing on CUDA
when they have GPUs. What a worker is belongs to the job: an actor of the estimate's pool, a Ray Train
worker of a model, an actor of a diagnosis, a worker of a sweep's trial.

Every setting is checked here, once: the `lossfloor.ray` adapters and the sweep's resources take an
Engine (or its fields) as it is. A Ray setting given on the command line without `--engine ray` is
refused (`from_args`): it would be silently ignored otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lossfloor.errors import InputError

KINDS = ("local", "ray")
RAY_SETTINGS = ("address", "workers", "cpus_per_worker", "gpus_per_worker")  # flags only for --engine ray
_DEFAULTS = "engine_defaults"  # where add_engine_args leaves a command's defaults in the parsed arguments


@dataclass(frozen=True, kw_only=True)
class Engine:
    """Where a job runs (module docstring). cpus_per_worker None: the job's default (the cluster's CPUs
    shared by the workers for an estimate or a diagnosis, 1 for training)."""

    kind: str = "local"
    address: str | None = None  # ray: "auto", "HOST:6379" or "ray://HOST:10001"
    workers: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"--engine: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.address is not None and not _address(self.address):
            raise InputError(f"--address: expected auto, HOST:PORT or ray://HOST:PORT, got {self.address!r}")
        if not (isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 1):
            raise InputError(f"--workers: expected an integer >= 1, got {_show(self.workers)}")
        if self.cpus_per_worker is not None and not (_finite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise InputError(f"--cpus-per-worker: expected a number > 0, got {_show(self.cpus_per_worker)}")
        if not (_finite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise InputError(f"--gpus-per-worker: expected a number >= 0 (e.g. 1 or 0.5), got "
                             f"{_show(self.gpus_per_worker)}")

    @property
    def device(self) -> str | None:
        """The Ray workers' device: cuda when they have GPUs, else cpu; None for the local engine."""
        if self.kind == "local":
            return None
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, ray_only: Iterable[str] = ()) -> Engine:
        """The engine of the `add_engine_args` flags, a flag not given taking the command's default. With
        the local engine a Ray setting given is refused, as are the command's own `ray_only` flags
        (argument names, e.g. "max_failures"; None when not given)."""
        defaults = getattr(args, _DEFAULTS)
        kind = defaults["kind"] if args.engine is None else args.engine
        given = {name: getattr(args, name) for name in (*RAY_SETTINGS, *ray_only) if getattr(args, name) is not None}
        if kind == "local" and given:
            raise InputError(f"--{next(iter(given)).replace('_', '-')}: only with --engine ray")
        return cls(kind=kind, **{name: given.get(name, defaults[name]) for name in RAY_SETTINGS})


def add_engine_args(parser: argparse.ArgumentParser, *, kind: str = "local", ray: str = "Ray workers",
                    workers: int = 1, workers_help: str = "workers", worker: str = "worker",
                    cpus_per_worker: float | None = None, gpus_help: str = "> 0 computes on CUDA",
                    address_env: str | None = None, help: Mapping[str, str] | None = None) -> argparse._ArgumentGroup:
    """The engine flags, as one argument group: --engine, --address, --workers, --cpus-per-worker,
    --gpus-per-worker. The command gives its defaults (`kind`, `workers`, `cpus_per_worker`; None: the
    job's own) and its words: `ray` (what runs on Ray), `workers_help` (what --workers counts), `worker`
    (one of them), `gpus_help` (what GPUs do). address_env: an environment variable holding the default
    address (RAY_ADDRESS, which a Ray job sets). help: a flag's whole help text instead ("--engine": ...).
    Returns the group, for the command's own engine flags; `Engine.from_args` reads the result."""
    address = os.environ.get(address_env) if address_env else None
    where = "this process's Ray, else a new local one"
    texts = {
        "--engine": f"local (this process) | ray ({ray}) (default {kind})",
        "--address": "ray: the cluster: auto, HOST:6379 or ray://HOST:10001 (default: "
                     + (f"${address_env}, which a Ray job sets; else {where})" if address_env else f"{where})"),
        "--workers": f"ray: {workers_help} (default {workers})",
        "--cpus-per-worker": f"ray: CPUs (and torch threads) per {worker} (default "
                             + (": the cluster's CPUs / N)" if cpus_per_worker is None else f"{cpus_per_worker:g})"),
        "--gpus-per-worker": f"ray: GPUs per {worker}; {gpus_help} (default 0)",
        **(help or {}),
    }
    eng = parser.add_argument_group("engine")
    eng.add_argument("--engine", default=None, metavar="|".join(KINDS), help=texts["--engine"])
    eng.add_argument("--address", default=None, metavar="ADDR", help=texts["--address"])
    eng.add_argument("--workers", type=int, default=None, metavar="N", help=texts["--workers"])
    eng.add_argument("--cpus-per-worker", type=float, default=None, metavar="C", help=texts["--cpus-per-worker"])
    eng.add_argument("--gpus-per-worker", type=float, default=None, metavar="G", help=texts["--gpus-per-worker"])
    parser.set_defaults(**{_DEFAULTS: {"kind": kind, "address": address, "workers": workers,
                                       "cpus_per_worker": cpus_per_worker, "gpus_per_worker": 0.0}})
    return eng


def _address(v) -> bool:
    if not isinstance(v, str):
        return False
    host, _, port = v.rpartition(":")
    return v == "auto" or "://" in v or (bool(host) and port.isdigit())


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else repr(v)


LOCAL = Engine()  # this process

__all__ = ["KINDS", "LOCAL", "RAY_SETTINGS", "Engine", "add_engine_args"]
