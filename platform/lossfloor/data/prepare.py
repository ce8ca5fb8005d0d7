"""`prepare_shards`: any source -> a directory of parquet shards for Ray Data (layout in `shards`).

Streams one shard's rows at a time, so memory stays bounded whatever the source size. Shards are written
into a temporary sibling directory that is renamed to DIR only when complete: an interrupted run leaves
no DIR behind. A rerun over a finished DIR made from the same data (same fingerprint) does nothing;
a DIR made from other data, or anything else at that path, is an InputError.
"""

from __future__ import annotations

import errno
import logging
import numbers
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lossfloor.data.dataset import open_source
from lossfloor.data.fingerprint import Fingerprinter
from lossfloor.data.shards import META_NAME, ShardMeta, read_meta, shard_name, to_record_batch
from lossfloor.data.source import Reader, SourceInfo, chunks
from lossfloor.errors import InputError

log = logging.getLogger(__name__)

SHARD_BYTES = 64 * 2**20  # default shard size: 64 MiB of float32 samples
LOG_EVERY_S = 5.0


def default_rows_per_shard(info: SourceInfo) -> int:
    """Rows giving shards of about SHARD_BYTES (Ray Data reads one shard per block)."""
    return max(1, SHARD_BYTES // (4 * info.dim))


def prepare_shards(
    src: str | os.PathLike, out_dir: str | os.PathLike, *, rows_per_shard: int | None = None
) -> Path:
    """Write SRC as DIR/shard-NNNNN.parquet + DIR/meta.json and return DIR (see the module docstring).

    rows_per_shard: rows in every shard but the last; default: about 64 MiB of samples per shard
    (on a rerun over a finished DIR, the default accepts whatever the DIR was made with).
    """
    out = Path(out_dir)
    is_count = isinstance(rows_per_shard, numbers.Integral) and not isinstance(rows_per_shard, bool)
    if rows_per_shard is not None and not (is_count and rows_per_shard >= 1):
        raise InputError(f"rows_per_shard: expected a positive integer like 4096, got {rows_per_shard!r}")
    reader = open_source(src)
    info = reader.info()
    if _finished(out, reader, info, rows_per_shard):
        return out
    rows = int(rows_per_shard or default_rows_per_shard(info))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = _write(reader, info, tmp, rows)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _publish(tmp, out, reader, info, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(reader: Reader, info: SourceInfo, tmp: Path, rows: int) -> ShardMeta:
    """All shards and meta.json into `tmp`; the fingerprint is computed as the rows stream by."""
    hasher = Fingerprinter(shape=(info.count, *info.sample_shape))
    progress = _Progress(reader.path, info.count)
    done = 0
    for number, (samples, labels) in enumerate(chunks(reader, rows)):
        write_shard(tmp / shard_name(number), to_record_batch(done, samples, labels))
        hasher.update(samples)
        done += len(samples)
        progress.update(done)
    meta = ShardMeta(
        sample_shape=info.sample_shape, count=info.count, normalisation=info.normalisation,
        fingerprint=hasher.hexdigest(), source=reader.path, rows_per_shard=rows, has_labels=info.has_labels,
    )
    (tmp / META_NAME).write_text(meta.to_json())
    log.info("wrote %d samples of shape %s in %d shards (fingerprint %s)",
             info.count, info.sample_shape, number + 1, meta.fingerprint[:16])
    return meta


def write_shard(file: Path, batch: pa.RecordBatch) -> None:
    # snappy: ~free on float noise (latents), ~2x smaller on pixel-valued floats; one row group per shard
    pq.write_table(pa.Table.from_batches([batch]), file, compression="snappy", use_dictionary=False,
                   row_group_size=max(1, batch.num_rows))


def _publish(tmp: Path, out: Path, reader: Reader, info: SourceInfo, meta: ShardMeta) -> None:
    """Rename tmp to out; if another run finished out meanwhile with the same data, keep that one."""
    try:
        os.rename(tmp, out)  # replaces out only if it is an empty directory
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR) or not out.exists():
            raise
        if not _finished(out, reader, info, meta.rows_per_shard, fingerprint=meta.fingerprint):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return
    log.info("shards ready: %s", out)


def _finished(out: Path, reader: Reader, info: SourceInfo, rows_per_shard: int | None, *,
              fingerprint: str | None = None) -> bool:
    """True if `out` already holds these data's shards; False if `out` is absent or an empty directory.

    Raises InputError for anything else at `out` (a file, a foreign directory, shards of other data).
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; expected a new or finished shard directory")
    if not (out / META_NAME).is_file():
        if any(out.iterdir()):
            raise InputError(
                f"{out}: exists and is not a shard directory (no {META_NAME}); choose another --out"
            )
        return False
    meta = read_meta(out)
    different = (
        f"{out}: holds shards of other data (source {meta.source!r}); choose another --out or remove it"
    )
    layout = (info.count, info.sample_shape, info.normalisation)
    if (meta.count, meta.sample_shape, meta.normalisation) != layout:
        raise InputError(different)
    if fingerprint is None:
        fingerprint = _fingerprint(reader, info, meta.rows_per_shard)
    if fingerprint != meta.fingerprint:
        raise InputError(different)
    if rows_per_shard is not None and rows_per_shard != meta.rows_per_shard:
        raise InputError(
            f"{out}: holds these data with rows_per_shard={meta.rows_per_shard}, not {rows_per_shard}; "
            "remove it to re-shard"
        )
    log.info("%s already holds %s (fingerprint %s): nothing to do", out, reader.path, fingerprint[:16])
    return True


def _fingerprint(reader: Reader, info: SourceInfo, rows: int) -> str:
    hasher = Fingerprinter(shape=(info.count, *info.sample_shape))
    for samples, _ in chunks(reader, rows):
        hasher.update(samples)
    return hasher.hexdigest()


class _Progress:
    """A log line every LOG_EVERY_S seconds (and at the end): rows done, rate, ETA."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < LOG_EVERY_S and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        log.info("prepare %s: %d/%d rows (%.0f%%), %.0f rows/s, ETA %.0fs",
                 self.label, done, self.total, 100.0 * done / self.total, rate, eta)
