"""One entry point for every data source: `load` (an in-memory Dataset), `iter_chunks` (streaming,
for sources larger than memory) and `describe` (size and shape, cheap). `open_source` picks the reader
from the SRC string:

    bundled:digits                  scikit-learn digits, the product's default data set
    FILE.npy | FILE.npz[:KEY]       arrays used as given (cast to float32)
    FILE.zip                        EDM2-style zip (PNG images or SD-VAE latents, dataset.json labels)
    DIR with meta.json              parquet shards made by `lossfloor data prepare`
    DIR with data_batch_1..5        CIFAR-10 python batches
    DIR with dataset.json, latents  EDM2-style folder
      or only NNNNN/imgNNNNNNNN.png
    any other DIR                   image folder (PNG/JPEG, optional class sub-folders)
"""

from __future__ import annotations

import logging
import numbers
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lossfloor.data import bundled, cifar, edm2, images, shards
from lossfloor.data.arrays import NpyReader, NpzReader
from lossfloor.data.files import DirTree, ZipTree
from lossfloor.data.fingerprint import Fingerprinter
from lossfloor.data.source import Chunk, Reader, SourceInfo, chunks
from lossfloor.errors import InputError

log = logging.getLogger(__name__)

LOAD_ROWS = 4096  # rows per chunk while `load` fills its array
_NPZ_KEY = re.compile(r"(?P<file>.+\.npz):(?P<key>[^/\\:]+)", re.IGNORECASE)
_KINDS = "bundled:digits, a .npy/.npz/.zip file, or a folder of images, CIFAR-10 batches, EDM2 data or shards"


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """A data set in memory, as the estimators use it. Treat the arrays as read-only."""

    samples: np.ndarray  # (N, *sample_shape) float32, C-contiguous
    labels: np.ndarray | None  # (N,) int64, or None
    fingerprint: str  # sha256 hex of the samples (lossfloor.data.fingerprint)
    source: str  # the SRC string as given
    normalisation: str  # how stored values became samples, e.g. "none", "uint8/127.5-1"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.samples.shape[1:]

    def __len__(self) -> int:
        return len(self.samples)


def open_source(src: str | os.PathLike, latents: str = "mean") -> Reader:
    """The reader for SRC (see the module docstring); InputError if SRC is missing or of no known kind.

    latents: "mean" (samples as stored; EDM2 latents: the posterior mean) or "posterior" (EDM2 latents
    only: [mean, std] per sample, see `edm2`).
    """
    if latents not in edm2.LATENTS:
        raise InputError(f"--latents: expected one of {', '.join(edm2.LATENTS)}, got {latents!r}")
    reader = _open(src, latents)
    normalisation = reader.info().normalisation if latents == "posterior" or isinstance(reader, shards.ShardReader) \
        else None
    if latents == "posterior" and normalisation != edm2.POSTERIOR_NORMALISATION:
        raise InputError(f"--latents posterior: {os.fspath(src)} has no encoder posterior (only EDM2 latents, "
                         "img-mean-std-*.npy, have one)")
    if latents == "mean" and normalisation == edm2.POSTERIOR_NORMALISATION:
        raise InputError(f"{os.fspath(src)}: holds posterior latents [mean, std]; pass --latents posterior")
    return reader


def _open(src: str | os.PathLike, latents: str) -> Reader:
    text = os.fspath(src)
    if text.startswith(bundled.PREFIX):
        return bundled.bundled_reader(text)
    path = Path(text)
    match = _NPZ_KEY.fullmatch(text)
    if match and not path.exists():
        return NpzReader(text, _existing(Path(match["file"]), text), match["key"])
    _existing(path, text)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return NpyReader(text, path)
        if suffix == ".npz":
            return NpzReader(text, path)
        if suffix == ".zip":
            tree = ZipTree(path, label=text)
            return edm2.edm2_reader(text, tree, tree.names(), latents)
        raise InputError(f"{text}: unknown source kind, expected {_KINDS}")
    if shards.is_shard_dir(path):
        return shards.ShardReader(text, path, latents)
    if cifar.is_cifar_dir(path):
        return cifar.CifarReader(text, path)
    tree = DirTree(path, label=text)
    names = tree.names()
    if edm2.looks_like_edm2(names):
        return edm2.edm2_reader(text, tree, names, latents)
    return images.image_folder_reader(text, tree, names)


def _existing(path: Path, text: str) -> Path:
    if not path.exists():
        raise InputError(f"{text}: no such file or directory; expected {_KINDS}")
    if not (path.is_file() or path.is_dir()):
        raise InputError(f"{text}: expected a regular file or a directory")
    return path


def describe(src: str | os.PathLike, latents: str = "mean") -> tuple[int, tuple[int, ...]]:
    """(N, sample_shape) of SRC without reading its samples."""
    info = open_source(src, latents).info()
    return info.count, info.sample_shape


def iter_chunks(src: str | os.PathLike, rows: int, *, max_samples: int | None = None,
                latents: str = "mean") -> Iterator[Chunk]:
    """(samples (n, *sample_shape) float32, labels (n,) int64 or None) in source order, n = rows except
    for the last chunk; memory bounded by a few chunks whatever the source size.
    """
    if not (isinstance(rows, numbers.Integral) and not isinstance(rows, bool) and rows >= 1):
        raise InputError(f"rows: expected a positive integer like 4096, got {rows!r}")
    _check_max_samples(max_samples)
    return chunks(open_source(src, latents), rows, limit=max_samples)


def load(src: str | os.PathLike, *, max_samples: int | None = None, latents: str = "mean") -> Dataset:
    """Read SRC into memory (the first `max_samples` samples in source order, if given); latents: see
    `open_source` (with "posterior" the fingerprint is of the [mean, std] samples, not of the means)."""
    _check_max_samples(max_samples)
    reader = open_source(src, latents)
    info: SourceInfo = reader.info()
    count = info.count if max_samples is None else min(info.count, max_samples)
    samples = np.empty((count, *info.sample_shape), dtype=np.float32)  # (N, *sample_shape)
    labels = np.empty(count, dtype=np.int64) if info.has_labels else None
    hasher = Fingerprinter(shape=samples.shape)
    done = 0
    for chunk_samples, chunk_labels in chunks(reader, LOAD_ROWS, limit=count):
        samples[done : done + len(chunk_samples)] = chunk_samples
        if labels is not None:
            labels[done : done + len(chunk_samples)] = chunk_labels
        hasher.update(chunk_samples)
        done += len(chunk_samples)
    digest = hasher.hexdigest()
    if isinstance(reader, shards.ShardReader) and max_samples is None and digest != reader.fingerprint:
        raise InputError(f"{reader.path}: samples do not match the fingerprint in meta.json (damaged?)")
    log.debug("loaded %s: %d samples of shape %s (%s)", reader.path, count, info.sample_shape, digest[:12])
    return Dataset(samples=samples, labels=labels, fingerprint=digest, source=os.fspath(src),
                   normalisation=info.normalisation)


@dataclass(frozen=True, kw_only=True)
class ShardRef:
    """A shard folder left on its storage: what a driver needs to hand it to Ray workers without loading
    it (the Ray estimate's workers map it once per node, training workers read it themselves).
    `samples` is the folder, which `lossfloor.jobs.estimate` takes in place of an array on the Ray engine."""

    samples: str  # the folder
    fingerprint: str  # from meta.json: equal to `load(folder).fingerprint`
    sample_shape: tuple[int, ...]
    count: int
    labels: None = None  # never loaded on the driver
    source: str = ""

    def __len__(self) -> int:
        return self.count


def load_for(src: str | os.PathLike, engine: str, *, max_samples: int | None = None,
             latents: str = "mean") -> Dataset | ShardRef:
    """`load(src)`, except that a shard folder used whole by the Ray engine is not loaded: a `ShardRef`
    (the driver of a study then never holds the data set)."""
    path = Path(src).expanduser()
    if engine == "ray" and latents == "mean" and shards.is_plain_shard_dir(path):
        meta = shards.read_meta(path)
        if max_samples is None or max_samples >= meta.count:
            return ShardRef(samples=str(path.absolute()), fingerprint=meta.fingerprint,
                            sample_shape=meta.sample_shape, count=meta.count, source=os.fspath(src))
    return load(src, max_samples=max_samples, latents=latents)


def source_fingerprint(src: str | os.PathLike, latents: str = "mean") -> str:
    """The fingerprint `load(src, latents=latents).fingerprint` would give, with bounded memory: a shard
    folder's from its meta.json, any other source hashed as it streams."""
    reader = open_source(src, latents)
    if isinstance(reader, shards.ShardReader):
        return reader.fingerprint
    info = reader.info()
    hasher = Fingerprinter(shape=(info.count, *info.sample_shape))
    for samples, _ in chunks(reader, LOAD_ROWS):
        hasher.update(samples)
    return hasher.hexdigest()


def _check_max_samples(max_samples: int | None) -> None:
    if max_samples is not None and not (
        isinstance(max_samples, numbers.Integral) and not isinstance(max_samples, bool) and max_samples >= 2
    ):
        raise InputError(f"max_samples: expected an integer >= 2 (or None for all), got {max_samples!r}")
