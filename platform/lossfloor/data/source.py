"""What every data reader provides, and the one place its output is re-chunked and checked.

A reader knows its source's size, sample shape, whether it has labels and how values were normalised
(`SourceInfo`, cheap: no sample is decoded), and yields blocks of float32 samples in source order
(`Reader.blocks`). `chunks` turns those blocks into chunks of exactly `rows` rows (the last may be
shorter), checks shape, count and finiteness, and stops early at a sample limit.
"""

from __future__ import annotations

import abc
import collections
import math
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lossfloor.errors import InputError

# Errors a corrupt or truncated file raises from numpy, zipfile or zlib while being read.
READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)

# (samples (n, *sample_shape) float32, labels (n,) int64 or None)
Chunk = tuple[np.ndarray, "np.ndarray | None"]


@dataclass(frozen=True, kw_only=True)
class SourceInfo:
    """A source's size and layout, known before any sample is read."""

    count: int  # number of samples N
    sample_shape: tuple[int, ...]  # shape of one sample, e.g. (3, 32, 32)
    has_labels: bool  # whether an int64 label comes with each sample
    normalisation: str  # how stored values became samples, e.g. "uint8/127.5-1"

    @property
    def dim(self) -> int:
        """Values per sample D (flattened length)."""
        return math.prod(self.sample_shape)


def error_text(error: BaseException) -> str:
    """The first line of an exception's message, for one-line InputErrors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Reader(abc.ABC):
    """One source kind. `path` is the SRC string, used in every error message."""

    def __init__(self, path: str):
        self.path = path

    @abc.abstractmethod
    def info(self) -> SourceInfo:
        """Size and layout, without decoding samples."""

    @abc.abstractmethod
    def blocks(self, rows: int) -> Iterator[Chunk]:
        """Samples in source order, in blocks of about `rows` rows (any size is accepted downstream).

        A block must be a fresh array the caller may keep (never a view of a reused buffer or a mmap).
        """


def chunks(reader: Reader, rows: int, *, limit: int | None = None) -> Iterator[Chunk]:
    """Chunks of exactly `rows` rows (the last may be shorter), at most `limit` rows in all.

    Raises InputError naming the source when a block has the wrong shape, holds NaN/inf, or when the
    source yields a different number of samples than it announced.
    """
    info = reader.info()
    total = info.count if limit is None else min(info.count, limit)
    buffer = _Buffer()
    done = 0  # rows yielded so far
    blocks = reader.blocks(rows)
    try:
        for samples, labels in blocks:
            first_row = done + buffer.rows
            _check_block(reader.path, info, samples, labels, first_row=first_row)
            room = total - first_row
            if len(samples) > room:
                if total == info.count:
                    raise InputError(f"{reader.path}: expected {info.count} samples, the source holds more")
                samples, labels = samples[:room], None if labels is None else labels[:room]
            buffer.append(samples, labels)
            while buffer.rows >= rows or (buffer.rows and done + buffer.rows == total):
                chunk = buffer.take(min(rows, buffer.rows))
                done += len(chunk[0])
                yield chunk
            if done == total:
                break
    finally:
        blocks.close()
    if done != total:  # rows still buffered were read: the source holds them too
        raise InputError(f"{reader.path}: expected {total} samples, the source holds only {done + buffer.rows}")


def _check_block(path: str, info: SourceInfo, samples, labels, *, first_row: int) -> None:
    if samples.dtype != np.float32 or samples.shape[1:] != info.sample_shape:
        raise InputError(
            f"{path}: expected float32 samples of shape {info.sample_shape} at sample {first_row}, "
            f"got {samples.dtype} {samples.shape[1:]}"
        )
    finite = np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)
    if not finite.all():
        bad = first_row + int(np.flatnonzero(~finite)[0])
        raise InputError(f"{path}: expected finite values, sample {bad} holds NaN or inf")
    if info.has_labels != (labels is not None) or (
        labels is not None and (labels.dtype != np.int64 or labels.shape != (len(samples),))
    ):
        raise InputError(f"{path}: expected one int64 label per sample at sample {first_row}")


class _Buffer:
    """Blocks waiting to be cut into chunks; copies only when a chunk spans several blocks."""

    def __init__(self):
        self._blocks: collections.deque[Chunk] = collections.deque()
        self.rows = 0

    def append(self, samples: np.ndarray, labels: np.ndarray | None) -> None:
        if len(samples):
            self._blocks.append((samples, labels))
            self.rows += len(samples)

    def take(self, n: int) -> Chunk:
        """Remove and return the first n rows (n <= self.rows)."""
        parts: list[Chunk] = []
        need = n
        while need:
            samples, labels = self._blocks.popleft()
            k = min(need, len(samples))
            parts.append((samples[:k], None if labels is None else labels[:k]))
            if k < len(samples):
                self._blocks.appendleft((samples[k:], None if labels is None else labels[k:]))
            need -= k
        self.rows -= n
        if len(parts) == 1:  # a slice of one fresh block: no copy
            return np.ascontiguousarray(parts[0][0]), parts[0][1]
        samples = np.concatenate([s for s, _ in parts])
        labels = None if parts[0][1] is None else np.concatenate([lab for _, lab in parts])
        return samples, labels
