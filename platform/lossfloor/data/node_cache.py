"""One copy of a data set per machine: memory-mapped files in a node-local cache folder.

Every estimation actor on a node needs the whole (N, D) data set (references are drawn from all N
samples), and knn needs its deduplicated points and a neighbour index as well. Held privately, 8 actors
on a node hold 8 copies (ImageNet-512 latents: 8 x 84 GB). Instead the first actor of a node writes
each array (and the index) once to a file here and every actor maps it read-only: the operating system
keeps one copy of the pages, shared by all processes of the node, paged in as rows are touched and
dropped under memory pressure (a file-backed mapping can even exceed RAM). Nothing is copied per
actor or per batch; each batch gathers only its rows.

    check_cache_root()                                # on the driver, before Ray starts
    cache = NodeCache(fingerprint)                    # a folder under $LOSSFLOOR_NODE_CACHE
    x = cache.array("x", (n, d), np.float32, blocks)  # blocks() yields its rows, written once per node
    path = cache.file("index-ivf", write)             # write(path) once per node, e.g. a FAISS index

Entries are named by the data fingerprint (and the caller's name), so a cached file is never another
data set's; an entry appears by an atomic rename only when complete, and one lock file per entry makes
concurrent actors of a node wait for the first one instead of writing in parallel. The folder is
`$LOSSFLOOR_NODE_CACHE`, else `lossfloor-node-cache` in the system temporary folder: local disk on a
cluster node, never a network file system (the shard folder itself may be one). Delete it to reclaim space.

[choice, measured in benchmarks/ray_floor_bench.py] File mappings rather than the Ray object store:
the object store is 30 % of a node's RAM by default (an 84 GB array does not fit most nodes'
and would spill), it needs the array on one process first, and it is Ray's, while the core stays
Ray-free; a mapped file is shared by the actors of a node exactly the same way (zero copy).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from lossfloor.atomic import check_writable
from lossfloor.errors import InputError

ENV = "LOSSFLOOR_NODE_CACHE"
_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")


def cache_root() -> Path:
    """$LOSSFLOOR_NODE_CACHE, else <tmp>/lossfloor-node-cache."""
    return Path(os.environ.get(ENV) or Path(tempfile.gettempdir()) / "lossfloor-node-cache").expanduser()


def check_cache_root() -> Path:
    """Before Ray starts: this machine's cache folder (`cache_root`) can be made and written, else an
    InputError naming $LOSSFLOOR_NODE_CACHE (in the actors it would be one traceback per actor). Nothing
    is created. Nodes of a remote cluster check their own folder when an actor first needs it."""
    return check_writable(cache_root(), f"${ENV}", folder=True)


class NodeCache:
    """The cached files of one data set (by fingerprint) on this machine."""

    def __init__(self, fingerprint: str, root: str | os.PathLike | None = None):
        if not fingerprint or not _NAME.match(fingerprint):
            raise ValueError(f"node cache: expected a data fingerprint (hex), got {fingerprint!r}")
        self.folder = Path(root).expanduser() if root is not None else cache_root()
        self.folder = self.folder / fingerprint[:32]  # made when a first entry is asked for

    def _make_folder(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"${ENV} {self.folder.parent}: cannot make the node-local cache folder ({e.strerror}); "
                             f"set {ENV} to a writable local folder") from e

    @contextlib.contextmanager
    def _locked(self, name: str):
        with open(self.folder / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
            yield

    def file(self, name: str, write: Callable[[Path], None]) -> Path:
        """The path of entry `name`, written by write(tmp_path) the first time on this machine."""
        if not _NAME.match(name):
            raise ValueError(f"node cache entry: expected a plain file name, got {name!r}")
        path = self.folder / name
        if path.exists():
            return path
        self._make_folder()
        with self._locked(name):
            if not path.exists():  # another process of this node may have written it while we waited
                tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
                try:
                    write(tmp)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
        return path

    def array(self, name: str, shape: tuple[int, ...], dtype,
              blocks: Callable[[], Iterable[np.ndarray]]) -> np.ndarray:
        """A read-only memory-mapped array `name`.npy; the first time on this machine it is written from
        blocks(), consecutive row blocks of the given dtype whose rows make up `shape`.

        Written with plain file writes, not through a writable mapping: the pages go to the page cache
        (the machine's one copy) and are never counted as the writing process's own memory."""
        dtype = np.dtype(dtype)

        def write(tmp: Path) -> None:
            rows = 0
            with open(tmp, "wb") as f:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
                np.lib.format.write_array_header_2_0(f, header)
                for block in blocks():
                    block = np.ascontiguousarray(block, dtype=dtype)
                    if block.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"node cache {name}: a block of shape {block.shape}, expected rows {shape[1:]}")
                    f.write(memoryview(block).cast("B"))
                    rows += len(block)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it an entry (and its pages clean)
            if rows != shape[0]:
                raise InputError(f"node cache {name}: {rows} rows written, expected {shape[0]}")

        path = self.file(f"{name}.npy", write)
        arr = np.load(path, mmap_mode="r")
        if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
            raise InputError(f"{path}: a cached array of shape {arr.shape} {arr.dtype}, expected {tuple(shape)} "
                             f"{np.dtype(dtype)}; delete the folder {self.folder}")
        return arr


def read_only_tensor(arr: np.ndarray) -> torch.Tensor:
    """A CPU tensor viewing a read-only array (a mapping, a Ray object) without copying; only ever read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is not writable
        return torch.from_numpy(arr)


def shard_matrix(folder: str | os.PathLike, cache: NodeCache) -> np.ndarray:
    """A `lossfloor data prepare` shard folder as one read-only (N, D) float32 array mapped from this
    machine's cache (read from the shards, block by block, the first time on the machine)."""
    from lossfloor.data.dataset import open_source

    reader = open_source(folder)
    info = reader.info()
    shape = (info.count, math.prod(info.sample_shape))
    rows = max(1, (1 << 22) // shape[1])  # 16 MiB blocks of float32 rows

    def blocks():
        start = 0
        for samples, _ in reader.blocks(rows):
            yield samples.reshape(len(samples), -1)
            start += len(samples)
        if start != info.count:
            raise InputError(f"{folder}: {start} rows in the shards, meta.json says {info.count}")

    return cache.array("x", shape, np.float32, blocks)
