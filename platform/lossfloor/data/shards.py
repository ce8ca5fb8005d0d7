"""Parquet shard directories (made by `lossfloor data prepare`): the layout, reading them back, and the
helpers Ray Data code uses to turn a batch into numpy.

DIR/shard-00000.parquet, shard-00001.parquet, ... hold columns
    index  int64                          position of the sample in the source
    x      fixed_size_list<float32>[D]    the flattened sample (D = prod(sample_shape))
    label  int64, null when the source has no labels
and DIR/meta.json holds `ShardMeta` (sample_shape, dtype, count, normalisation, fingerprint, source,
rows_per_shard, has_labels, format_version). The fingerprint is that of the samples as `load` returns them.

Latent shards (`lossfloor data encode`) hold each image's VAE posterior mean and std in raw VAE units
(normalisation RAW_LATENTS, sample_shape (8, h, w)) and the set's per-channel statistics (`latent_stats`):
a reader whitens them with those (`lossfloor.data.edm2.whiten_latent`), giving the whitened means
(4, h, w) (`fingerprint`) or, with latents="posterior", the whitened [mean, std] (8, h, w)
(`posterior_fingerprint`), as for EDM2 latents. Only plain shards (`is_plain_shard_dir`: rows are the
samples) are read row by row by the Ray estimate's workers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lossfloor.data.edm2 import LATENT_NORMALISATION, POSTERIOR_NORMALISATION, LatentStats, whiten_latent
from lossfloor.data.source import Chunk, Reader, SourceInfo
from lossfloor.errors import InputError

FORMAT_VERSION = 1
META_NAME = "meta.json"
SHARD_GLOB = "shard-*.parquet"
RAW_LATENTS = "vae-posterior-mean-std"  # raw [mean, std] rows, whitened by the reader


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.parquet"


@dataclass(frozen=True, kw_only=True)
class ShardMeta:
    """Contents of DIR/meta.json."""

    sample_shape: tuple[int, ...]  # shape of one sample; x holds prod(sample_shape) values per row
    count: int  # number of rows over all shards
    normalisation: str  # as in `Dataset.normalisation`
    fingerprint: str  # equal to `load(source).fingerprint`
    source: str  # the SRC string the shards were made from
    rows_per_shard: int  # rows in every shard but the last
    has_labels: bool  # whether `label` is set (else all null)
    dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    latent_stats: dict | None = None  # latent shards: {"mean": [...], "std": [...]} per channel (LatentStats)
    posterior_fingerprint: str | None = None  # latent shards: of the samples load(latents="posterior") gives

    @property
    def dim(self) -> int:
        return math.prod(self.sample_shape)

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["sample_shape"] = list(self.sample_shape)
        if self.latent_stats is None:  # plain shards: the fields of every shard folder before latent shards
            del fields["latent_stats"], fields["posterior_fingerprint"]
        return json.dumps(fields, indent=2, sort_keys=True) + "\n"


def is_shard_dir(path: Path) -> bool:
    return (path / META_NAME).is_file()


def is_plain_shard_dir(path: Path) -> bool:
    """A shard folder whose rows are the samples themselves (not latent shards, which a reader whitens)."""
    return is_shard_dir(path) and read_meta(path).latent_stats is None


def read_meta(directory: str | Path) -> ShardMeta:
    """DIR/meta.json as a ShardMeta; InputError if it is missing or not a version-1 shard description."""
    file = Path(directory) / META_NAME
    expected = f"expected a lossfloor shard description (format_version {FORMAT_VERSION})"
    try:
        fields = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise InputError(f"{file}: missing; {expected}") from e
    except (OSError, ValueError) as e:
        raise InputError(f"{file}: {expected}, cannot parse it ({e})") from e
    if not isinstance(fields, dict) or fields.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{file}: {expected}")
    try:
        meta = ShardMeta(
            sample_shape=tuple(int(s) for s in fields["sample_shape"]),
            count=int(fields["count"]),
            normalisation=str(fields["normalisation"]),
            fingerprint=str(fields["fingerprint"]),
            source=str(fields["source"]),
            rows_per_shard=int(fields["rows_per_shard"]),
            has_labels=bool(fields["has_labels"]),
            dtype=str(fields["dtype"]),
            latent_stats=fields.get("latent_stats"),
            posterior_fingerprint=fields.get("posterior_fingerprint"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{file}: {expected}, field {e} is missing or malformed") from e
    if meta.dtype != "float32" or meta.count < 2 or meta.rows_per_shard < 1:
        raise InputError(f"{file}: {expected}, got dtype={meta.dtype} count={meta.count}")
    latent = meta.normalisation == RAW_LATENTS
    if latent != (meta.latent_stats is not None) or (latent and (meta.sample_shape[:1] != (8,)
                                                                 or meta.posterior_fingerprint is None)):
        raise InputError(f"{file}: {expected}: normalisation {RAW_LATENTS} goes with 8 channels, latent_stats "
                         "and posterior_fingerprint")
    if latent:
        LatentStats.from_dict(meta.latent_stats, f"{file}: latent_stats")
    return meta


def shard_paths(directory: str | Path) -> list[Path]:
    """The shard files of DIR in order (what to give `ray.data.read_parquet`)."""
    return sorted(Path(directory).glob(SHARD_GLOB))


def shard_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("index", pa.int64(), nullable=False),
        pa.field("x", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
    ])


def to_record_batch(first_index: int, samples: np.ndarray, labels: np.ndarray | None) -> pa.RecordBatch:
    """Rows first_index.. of a chunk (n, *sample_shape) float32 as a record batch of the shard schema."""
    n = len(samples)
    dim = math.prod(samples.shape[1:])
    flat = pa.array(np.ascontiguousarray(samples, dtype=np.float32).reshape(-1))  # (n * D,), no copy
    return pa.record_batch(
        [
            pa.array(np.arange(first_index, first_index + n, dtype=np.int64)),
            pa.FixedSizeListArray.from_arrays(flat, dim),
            pa.nulls(n, pa.int64()) if labels is None else pa.array(labels, pa.int64()),
        ],
        schema=shard_schema(dim),
    )


def x_matrix(column) -> np.ndarray:
    """A shard's `x` column (pyarrow Array/ChunkedArray of fixed-size lists) -> (n, D) float32.

    No copy for a single chunk without nulls (the usual Ray batch); one copy to join several chunks.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type) or column.null_count:
        raise ValueError(f"x: expected a fixed-size list column without nulls, got {column.type}")
    dim = column.type.list_size
    values = column.flatten()  # respects the slice offset, unlike .values
    flat = values.to_numpy(zero_copy_only=not values.null_count).astype(np.float32, copy=False)
    return flat.reshape(-1, dim)  # (n * D,) -> (n, D)


@dataclass(frozen=True, kw_only=True)
class ShardRows:
    """A batch of shard rows as numpy."""

    index: np.ndarray  # (n,) int64, positions in the source
    x: np.ndarray  # (n, D) float32 flattened samples
    labels: np.ndarray | None  # (n,) int64, or None when the batch has no labels


def read_shard_rows(batch) -> ShardRows:
    """A pyarrow RecordBatch/Table of shard rows (or a dict of numpy arrays, Ray's "numpy" batch format)
    -> ShardRows. Reshape `x` with `meta.sample_shape` to get samples back.
    """
    if isinstance(batch, dict):
        x = np.asarray(batch["x"])
        x = np.stack(x) if x.dtype == object else x  # a column of per-row arrays -> (n, D)
        return ShardRows(
            index=np.asarray(batch["index"], dtype=np.int64),
            x=np.asarray(x, dtype=np.float32).reshape(len(x), -1),
            labels=_numpy_labels(batch.get("label")),
        )
    label = batch.column("label")
    if 0 < label.null_count < len(label):
        raise ValueError("label: expected every row set or every row null")
    return ShardRows(
        index=batch.column("index").to_numpy().astype(np.int64, copy=False),
        x=x_matrix(batch.column("x")),
        labels=None if label.null_count else label.to_numpy().astype(np.int64, copy=False),
    )


def _numpy_labels(labels) -> np.ndarray | None:
    """A numpy label column (nulls may arrive as None or NaN) -> int64, or None when all are null."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.dtype == object or np.issubdtype(labels.dtype, np.floating):
        missing = np.array([v is None or v != v for v in labels], dtype=bool)  # None or NaN
        if missing.all():
            return None
        if missing.any():
            raise ValueError("label: expected every row set or every row null")
    return labels.astype(np.int64)


class ShardReader(Reader):
    """Reads a shard directory back, checking count, order and sample width against meta.json; latent
    shards whitened (module docstring), their whitened means or with latents="posterior" [mean, std]."""

    def __init__(self, path: str, directory: Path, latents: str = "mean"):
        super().__init__(path)
        self.directory, self.latents = directory, latents

    @functools.cached_property
    def meta(self) -> ShardMeta:
        return read_meta(self.directory)

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the samples this reader yields."""
        posterior = self.meta.latent_stats is not None and self.latents == "posterior"
        return self.meta.posterior_fingerprint if posterior else self.meta.fingerprint

    def info(self) -> SourceInfo:
        meta = self.meta
        shape, normalisation = meta.sample_shape, meta.normalisation
        if meta.latent_stats is not None:
            posterior = self.latents == "posterior"
            shape = (8 if posterior else 4, *shape[1:])
            normalisation = POSTERIOR_NORMALISATION if posterior else LATENT_NORMALISATION
        return SourceInfo(count=meta.count, sample_shape=shape, has_labels=meta.has_labels,
                          normalisation=normalisation)

    def blocks(self, rows: int) -> Iterator[Chunk]:
        meta = self.meta
        files = shard_paths(self.directory)
        if not files:
            raise InputError(f"{self.path}: expected shard-*.parquet files next to meta.json, found none")
        next_index = 0
        stats = None if meta.latent_stats is None else LatentStats.from_dict(meta.latent_stats, self.path)
        posterior = self.latents == "posterior"
        for file in files:
            try:
                parquet = pq.ParquetFile(file)
                if parquet.schema_arrow != shard_schema(meta.dim):
                    raise InputError(f"{file}: expected columns index, x (list<float32>[{meta.dim}]), label")
                for batch in parquet.iter_batches(batch_size=rows):
                    shard_rows = read_shard_rows(batch)
                    expected = np.arange(next_index, next_index + len(shard_rows.index))
                    if not np.array_equal(shard_rows.index, expected):
                        raise InputError(f"{file}: expected rows {next_index}.. in order, a shard is missing")
                    next_index += len(expected)
                    samples = shard_rows.x.reshape(len(expected), *meta.sample_shape)
                    if (shard_rows.labels is not None) != meta.has_labels:
                        raise InputError(f"{file}: labels disagree with has_labels={meta.has_labels}")
                    if stats is not None:
                        if (samples[:, 4:] < 0).any():
                            raise InputError(f"{file}: expected a posterior std >= 0 in channels 4..7")
                        samples = np.stack([whiten_latent(s, posterior, stats) for s in samples])
                        yield samples, shard_rows.labels
                        continue
                    yield samples.copy(), shard_rows.labels  # copy: writable, independent of arrow buffers
            except (OSError, pa.ArrowException, ValueError) as e:
                if isinstance(e, InputError):
                    raise
                raise InputError(f"{file}: cannot read as a parquet shard ({e})") from e
