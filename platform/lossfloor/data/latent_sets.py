"""Writing an encoded latent set, from its raw chunks (float32 (n, 8, h, w): posterior mean then std, in
source order), with the set's per-channel statistics:

    stats = channel_stats(chunks())                   # mean and std of the posterior means per channel
    write_shards(folder, chunks, labels, stats=stats, source=SRC)   # lossfloor shards + meta.json
    write_edm2(folder_or_zip, chunks, labels, stats=stats)          # EDM2's latent layout

`chunks` is a callable giving a fresh iterator of the chunks (the shards are written in one pass that
also fingerprints both whitened views). Both layouts read back with `lossfloor.data.load(OUT,
latents="mean" | "posterior")` to the same samples, whitened with `stats`.

EDM2's layout: `NNNNN/img-mean-std-NNNNNNNN.npy` (image k's 8-digit index; NNNNN its first five digits),
each a float32 [8, h, w] array; `dataset.json` = {"labels": [[relative_path, int], ...]} (or null);
and ours beside it, `latent_stats.json` (EDM2's own tools ignore it and whiten with their constants).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from lossfloor.data.edm2 import LABELS_FILE, STATS_FILE, LatentStats, whiten_latent
from lossfloor.data.fingerprint import Fingerprinter
from lossfloor.data.prepare import default_rows_per_shard, write_shard
from lossfloor.data.shards import META_NAME, RAW_LATENTS, ShardMeta, shard_name, to_record_batch
from lossfloor.data.source import Chunk, Reader, SourceInfo, chunks

Chunks = Callable[[], Iterator[np.ndarray]]


def channel_stats(raw_chunks: Iterable[np.ndarray]) -> LatentStats:
    """Mean and std (population) of the posterior means per channel over every image and latent pixel,
    summed in float64 in chunk order."""
    total = square = None
    count = 0
    for mean_std in raw_chunks:
        means = mean_std[:, :4].astype(np.float64)  # (n, 4, h, w)
        s, q = means.sum(axis=(0, 2, 3)), np.square(means).sum(axis=(0, 2, 3))
        total, square = (s, q) if total is None else (total + s, square + q)
        count += means.shape[0] * means.shape[2] * means.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(square / count - mean * mean, 0.0))
    return LatentStats(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


def whitened(mean_std: np.ndarray, stats: LatentStats, posterior: bool) -> np.ndarray:
    """(n, 8, h, w) raw -> whitened (n, 4 or 8, h, w), as the readers of both layouts give them."""
    return np.stack([whiten_latent(row, posterior, stats) for row in mean_std])


class _RawReader(Reader):
    """The raw chunks as a Reader, so `source.chunks` cuts them into shards (and checks them)."""

    def __init__(self, path: str, raw: Chunks, labels: np.ndarray | None, count: int, shape: tuple[int, ...]):
        super().__init__(path)
        self.raw, self.labels, self.count, self.shape = raw, labels, count, shape

    def info(self) -> SourceInfo:
        return SourceInfo(count=self.count, sample_shape=self.shape, has_labels=self.labels is not None,
                          normalisation=RAW_LATENTS)

    def blocks(self, rows: int) -> Iterator[Chunk]:
        done = 0
        for mean_std in self.raw():
            labels = None if self.labels is None else self.labels[done : done + len(mean_std)]
            done += len(mean_std)
            yield mean_std, labels


def write_shards(folder: Path, raw: Chunks, labels: np.ndarray | None, *, count: int, shape: tuple[int, ...],
                 stats: LatentStats, source: str, rows_per_shard: int | None = None) -> ShardMeta:
    """The set as shards of raw [mean, std] rows + meta.json (RAW_LATENTS, the stats, both fingerprints)
    in `folder` (an empty folder the caller publishes)."""
    reader = _RawReader(source, raw, labels, count, shape)
    info = reader.info()
    rows = int(rows_per_shard or default_rows_per_shard(info))
    mean_hash = Fingerprinter(shape=(count, 4, *shape[1:]))
    posterior_hash = Fingerprinter(shape=(count, 8, *shape[1:]))
    done = 0
    for number, (samples, chunk_labels) in enumerate(chunks(reader, rows)):
        write_shard(folder / shard_name(number), to_record_batch(done, samples, chunk_labels))
        mean_hash.update(whitened(samples, stats, posterior=False))
        posterior_hash.update(whitened(samples, stats, posterior=True))
        done += len(samples)
    meta = ShardMeta(sample_shape=shape, count=count, normalisation=RAW_LATENTS, fingerprint=mean_hash.hexdigest(),
                     source=source, rows_per_shard=rows, has_labels=labels is not None,
                     latent_stats=stats.to_dict(), posterior_fingerprint=posterior_hash.hexdigest())
    (folder / META_NAME).write_text(meta.to_json())
    return meta


def edm2_name(k: int) -> str:
    """Image k's latent file in EDM2's layout."""
    index = f"{k:08d}"
    return f"{index[:5]}/img-mean-std-{index}.npy"


def write_edm2(out: Path, raw: Chunks, labels: np.ndarray | None, *, stats: LatentStats, as_zip: bool) -> int:
    """The set in EDM2's latent layout (module docstring), into the folder `out` or, as_zip, the zip file
    `out` (stored, as EDM2 writes its data sets); both new paths the caller publishes. Returns the count."""
    with _Members(out, as_zip) as put:
        names = []
        for mean_std in raw():
            for row in mean_std:
                names.append(edm2_name(len(names)))
                buffer = io.BytesIO()
                np.save(buffer, np.ascontiguousarray(row), allow_pickle=False)
                put(names[-1], buffer.getvalue())
        entries = None if labels is None else [[n, int(c)] for n, c in zip(names, labels, strict=True)]
        put(LABELS_FILE, json.dumps({"labels": entries}).encode())
        put(STATS_FILE, json.dumps(stats.to_dict(), indent=1).encode())
    return len(names)


class _Members:
    """Writes members into a folder or a stored zip."""

    def __init__(self, out: Path, as_zip: bool):
        self.out, self.as_zip = out, as_zip

    def __enter__(self):
        if self.as_zip:
            self.archive = zipfile.ZipFile(self.out, "w", compression=zipfile.ZIP_STORED)
            return self.archive.writestr

        def put(name: str, data: bytes) -> None:
            file = self.out / name
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(data)

        return put

    def __exit__(self, *exc):
        if self.as_zip:
            self.archive.close()
