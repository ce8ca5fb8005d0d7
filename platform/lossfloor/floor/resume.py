"""The work folder of an estimate: finished batches' partial sums on disk, shared by every engine.

A batch's partial sums are a pure function of (data, σ grid, resolved config, batch index) (see
`queries`), so finished batches can be kept on disk and a rerun of the same estimate computes only the
missing ones, with the same final numbers. The passes that fill a folder are `lossfloor.floor.estimate`'s,
whichever engine computes the batches.

Work folder layout (one estimate pass per folder; automatic-L passes at 2L, 4L, ... use DIR/L-<L>):

    DIR/key.json               what the partials belong to (`work_key`: config, data fingerprint, σ grid,
                               shape); a default folder is named by the key's hash (`default_work_dir`)
    DIR/part-<ns>-<pid>.npz    partials of some batches: one array per `stats.FIELDS`, (n,) for the
                               scalars and (n, P) for the per-column sums (P = channels × σ), all exact
    DIR/.lock                  held (flock) by the run using the folder

Partials are written as one part per finished batch (`flush_every`; or every `flush_s` seconds, and
when the pass ends or fails), each to a temporary name then renamed, so a killed run leaves only whole
parts and loses at most the unflushed batches. Whenever the folder holds more than `max_parts` parts
(on open or after a flush) they are merged into one (the merged part is written before the others are
removed), so the file count stays at most `max_parts` + 1 whatever the number of batches or restarts.
A folder whose key differs from the run's is refused; an unreadable part is set aside and its batches
are computed again. The key leaves out the budget M (`EstimatorConfig.queries`): a budget's batches are a
prefix of a larger one's, so one folder serves every budget (and the rounds of a precision target); a
batch is reused only when it holds the plan's count of queries (a budget's last batch may be short).

The local engine keeps a folder only when asked (`--work-dir`); the Ray engine always does.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from lossfloor.atomic import write_atomic, write_npz
from lossfloor.data.fingerprint import fingerprint
from lossfloor.errors import InputError
from lossfloor.floor.config import EstimatorConfig
from lossfloor.floor.stats import FIELDS, VECTORS, BatchPartial
from lossfloor.floor.uncertainty import channels
from lossfloor.hashing import config_hash

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
KEY_VERSION = 3  # 2: per-σ channels (bias levels, kNN self-check); 3: noise per query, error per unit


def work_key(cfg: EstimatorConfig, *, fingerprint: str, sigmas, n_samples: int, dim: int) -> dict:
    """Everything a batch's partial sums depend on, as plain JSON values (cfg resolved)."""
    return {
        "version": KEY_VERSION,
        "fingerprint": fingerprint,
        "n_samples": int(n_samples),
        "dim": int(dim),
        "sigmas": [float(s) for s in np.asarray(sigmas, dtype=np.float64)],
        "estimator": cfg.estimator,
        "subset_size": int(cfg.subset_size),
        "c": float(cfg.c),
        "columns": len(channels(cfg.estimator)) * len(np.asarray(sigmas)),
        "queries_per_sample": cfg.queries_per_sample,  # not `queries`: a budget's batches are a prefix
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "rows_per_batch": int(cfg.rows_per_batch),
        "rng_device": cfg.rng_device,
        "matmul_precision": cfg.matmul_precision,
        "index": cfg.index,
        "index_pca": cfg.index_pca,
        "latents": cfg.latents,
        "device_type": "cuda" if cfg.device.startswith("cuda") else "cpu",
    }


def key_hash(key: dict) -> str:
    """16 hex digits naming a work key (e.g. the default work folder)."""
    return config_hash(key, chars=16)


def default_work_dir(parent: str | os.PathLike, key: dict) -> Path:
    """The work folder of an estimate: PARENT/lossfloor-work-<hash of the key>."""
    return Path(parent) / f"lossfloor-work-{key_hash(key)}"


def data_fingerprint(x: torch.Tensor) -> str:
    """The data fingerprint (`lossfloor.data.fingerprint`) of prepared (N, D) CPU data, for callers that
    have no data set's (it differs from the data set's, whose header holds the unflattened shape)."""
    return fingerprint(x.contiguous().numpy())


class PartialStore:
    """The finished batches of one estimate pass in a work folder (see the module docstring).

    Use as a context manager: it locks the folder, loads the finished partials (`done`), and on exit
    writes whatever is still buffered, also when the run fails or is interrupted.
    """

    def __init__(self, path: str | os.PathLike, key: dict, *, flush_every: int = 1, flush_s: float = 10.0,
                 max_parts: int = 32):
        self.path = Path(path)
        self.key = key
        self.flush_every, self.flush_s, self.max_parts = flush_every, flush_s, max_parts
        self.done: dict[int, BatchPartial] = {}
        self._buffer: list[BatchPartial] = []
        self._last_flush = time.monotonic()
        self._lock_fd: int | None = None
        self._parts: list[Path] = []  # the part files in the folder

    # -- opening ---------------------------------------------------------------------------------
    def __enter__(self) -> PartialStore:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"work dir {self.path}: cannot create it ({e.strerror})") from None
        self._lock()
        try:
            self._check_key()
            for tmp in self.path.glob(".tmp-*"):  # left by a run killed mid-write
                tmp.unlink(missing_ok=True)
            for part in sorted(self.path.glob("part-*.npz")):
                partials = self._read_part(part)
                if partials is not None:
                    self._parts.append(part)
                    for p in partials:  # parts in time order: a batch recomputed for a larger budget wins
                        self.done[p.batch_index] = p
            if len(self._parts) > self.max_parts:
                self._compact()
        except BaseException:
            self._unlock()
            raise
        self._last_flush = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.flush()
        finally:
            self._unlock()

    def _lock(self) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"work dir {self.path}: in use by another run (wait for it, or use another --work-dir)") \
                from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_key(self) -> None:
        key_path = self.path / KEY_FILE
        if key_path.exists():
            try:
                old = json.loads(key_path.read_text())
            except (OSError, ValueError):
                raise InputError(f"work dir {self.path}: {KEY_FILE} is unreadable (remove the folder)") from None
            if old != self.key:
                differ = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k))
                raise InputError(
                    f"work dir {self.path}: holds partials of a different estimate ({', '.join(differ)} differ); "
                    "use another --work-dir or remove it"
                )
        else:
            if any(p.name != ".lock" for p in self.path.iterdir()):
                raise InputError(f"work dir {self.path}: not empty and not a lossfloor work folder (no {KEY_FILE}); "
                                 "use a new or empty folder")
            text = json.dumps(self.key, indent=1, allow_nan=True)
            write_atomic(key_path, lambda p: p.write_text(text, encoding="utf-8"))

    def _read_part(self, part: Path) -> list[BatchPartial] | None:
        n_columns = self.key["columns"]
        try:
            with np.load(part) as z:
                arrays = {name: z[name] for name in FIELDS}
            if arrays["sum_j"].ndim != 2 or arrays["sum_j"].shape[1] != n_columns:
                raise ValueError("wrong column count")
        except Exception as e:  # numpy/zipfile raise many types for a damaged file
            bad = part.with_suffix(".npz.corrupt")
            log.warning("work dir: %s is unreadable (%s); its batches will be recomputed (kept as %s)",
                        part.name, e.__class__.__name__, bad.name)
            part.rename(bad)
            return None
        return [BatchPartial.from_dict({name: arrays[name][i] for name in FIELDS})
                for i in range(len(arrays["batch_index"]))]

    def _compact(self) -> None:
        """Merge every part into one: write the merged part first, then remove the others."""
        old = self._parts
        self._parts = []
        if self.done:
            self._write_part(sorted(self.done.values(), key=lambda p: p.batch_index))
        for part in old:
            part.unlink(missing_ok=True)
        log.debug("work dir %s: merged %d parts into one", self.path, len(old))

    # -- writing ---------------------------------------------------------------------------------
    def add(self, partial: BatchPartial) -> None:
        assert partial.sum_j.shape == (self.key["columns"],), partial.sum_j.shape
        self.done[partial.batch_index] = partial
        self._buffer.append(partial)
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._write_part(self._buffer)
            self._buffer = []
            if len(self._parts) > self.max_parts:  # everything done is on disk now: merge it
                self._compact()
        self._last_flush = time.monotonic()

    def _write_part(self, partials: list[BatchPartial]) -> Path:
        arrays = {name: np.stack([getattr(p, name) for p in partials]) if name in VECTORS
                  else np.array([getattr(p, name) for p in partials]) for name in FIELDS}
        path = self.path / f"part-{time.time_ns():020d}-{os.getpid()}.npz"
        write_npz(path, arrays)
        self._parts.append(path)
        return path
