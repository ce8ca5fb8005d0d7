"""`.npy` and `.npz` sources: arrays used as given (cast to float32), one sample per leading index.

`.npy` is memory-mapped and read a block of rows at a time. `.npz` members are streamed from the zip
(compressed or not) a block at a time, so neither needs the whole array in memory; only a
Fortran-ordered npz member is loaded whole. In an npz, the samples are the array `x` (or `path.npz:KEY`,
or the only array besides the labels) and labels come from `labels` or `y` when present.
"""

from __future__ import annotations

import functools
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lossfloor.data.source import READ_ERRORS, Chunk, Reader, SourceInfo, error_text
from lossfloor.errors import InputError

LABEL_KEYS = ("labels", "y")

def check_sample_dtype(path: str, dtype: np.dtype) -> None:
    """Samples must be real numbers (bool, integer or float) to be cast to float32."""
    if dtype.hasobject or not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or (
        np.issubdtype(dtype, np.complexfloating)
    ):
        raise InputError(f"{path}: expected a real numeric array, got dtype {dtype}")


def check_count(path: str, shape: tuple[int, ...]) -> int:
    """Number of samples (leading axis) of an array of `shape`; at least 2."""
    if len(shape) < 1:
        raise InputError(f"{path}: expected an array with one sample per leading index, got a scalar")
    if shape[0] < 2:
        raise InputError(f"{path}: expected at least 2 samples, got {shape[0]}")
    return int(shape[0])


def as_labels(path: str, labels: np.ndarray, count: int) -> np.ndarray:
    """Validate integer labels, one per sample, and return them as int64."""
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (count,):
        raise InputError(
            f"{path}: expected {count} integer labels of shape ({count},), got {labels.dtype} {labels.shape}"
        )
    return labels.astype(np.int64)


def _read_header(f) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran_order) of a .npy stream, leaving `f` at the first data byte."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(shape), np.dtype(dtype), bool(fortran)


class NpyReader(Reader):
    """A `.npy` file, memory-mapped."""

    def __init__(self, path: str, file: Path):
        super().__init__(path)
        self.file = file

    @functools.cached_property
    def _array(self) -> np.ndarray:
        try:
            with open(self.file, "rb") as f:
                magic = f.read(len(np.lib.format.MAGIC_PREFIX))
        except OSError as e:
            raise InputError(f"{self.path}: cannot read ({error_text(e)})") from e
        if magic != np.lib.format.MAGIC_PREFIX:  # numpy would take it for a pickle and say so
            raise InputError(f"{self.path}: not a .npy file (it does not start with the NumPy header; a text "
                             "or CSV file must be converted, e.g. np.save(path, np.loadtxt(csv, delimiter=','))")
        try:
            array = np.load(self.file, mmap_mode="r", allow_pickle=False)
        except READ_ERRORS as e:
            raise InputError(f"{self.path}: cannot read as .npy ({error_text(e)})") from e
        check_sample_dtype(self.path, array.dtype)
        check_count(self.path, array.shape)
        return array

    def info(self) -> SourceInfo:
        shape = self._array.shape
        return SourceInfo(count=shape[0], sample_shape=shape[1:], has_labels=False, normalisation="none")

    def blocks(self, rows: int) -> Iterator[Chunk]:
        array = self._array
        for start in range(0, len(array), rows):
            with np.errstate(over="ignore"):  # values beyond float32 become inf, rejected downstream
                block = np.array(array[start : start + rows], dtype=np.float32, order="C")
            yield block, None


class NpzReader(Reader):
    """One array of a `.npz` archive (and its labels), streamed from the zip member."""

    def __init__(self, path: str, file: Path, key: str | None = None):
        super().__init__(path)
        self.file = file
        self.requested_key = key

    @functools.cached_property
    def _layout(self) -> tuple[str, str | None, tuple[int, ...], np.dtype, bool]:
        """(key, label key or None, shape, dtype, fortran_order) from the member headers."""
        with self._zip() as archive:
            keys = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
            key = self._choose_key(keys)
            shape, dtype, fortran = self._header(archive, key)
        check_sample_dtype(self.path, dtype)
        check_count(self.path, shape)
        label_key = next((k for k in LABEL_KEYS if k in keys and k != key), None)
        return key, label_key, shape, dtype, fortran

    def _choose_key(self, keys: list[str]) -> str:
        if self.requested_key is not None:
            if self.requested_key not in keys:
                raise InputError(f"{self.path}: no array named {self.requested_key!r}, found {sorted(keys)}")
            return self.requested_key
        if "x" in keys:
            return "x"
        candidates = [k for k in keys if k not in LABEL_KEYS]
        if len(candidates) != 1:
            raise InputError(
                f"{self.path}: expected an array named 'x' (or choose one as PATH.npz:KEY), "
                f"found {sorted(keys)}"
            )
        return candidates[0]

    def _header(self, archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype, bool]:
        try:
            with archive.open(key + ".npy") as f:
                return _read_header(f)
        except READ_ERRORS as e:
            raise InputError(f"{self.path}: cannot read array {key!r} ({error_text(e)})") from e

    @functools.cached_property
    def _labels(self) -> np.ndarray | None:
        _, label_key, shape, _, _ = self._layout
        if label_key is None:
            return None
        with self._zip() as archive:
            try:
                with archive.open(label_key + ".npy") as f:
                    labels = np.lib.format.read_array(f, allow_pickle=False)
            except READ_ERRORS as e:
                raise InputError(f"{self.path}: cannot read array {label_key!r} ({error_text(e)})") from e
        return as_labels(f"{self.path} ({label_key!r})", labels, shape[0])

    def info(self) -> SourceInfo:
        _, _, shape, _, _ = self._layout
        has_labels = self._labels is not None
        return SourceInfo(count=shape[0], sample_shape=shape[1:], has_labels=has_labels, normalisation="none")

    def blocks(self, rows: int) -> Iterator[Chunk]:
        key, _, shape, dtype, fortran = self._layout
        labels = self._labels
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        with self._zip() as archive:
            try:
                with archive.open(key + ".npy") as f:
                    if fortran:  # rows are not contiguous on disk: load the member whole
                        whole = np.lib.format.read_array(f, allow_pickle=False)
                    else:
                        _read_header(f)  # positions f at the first row
                    for start in range(0, shape[0], rows):
                        n = min(rows, shape[0] - start)
                        if fortran:
                            block = np.array(whole[start : start + n], order="C")
                        else:
                            data = f.read(n * row_bytes)
                            if len(data) != n * row_bytes:
                                raise ValueError(f"array {key!r} is truncated at row {start}")
                            block = np.frombuffer(data, dtype=dtype).reshape(n, *shape[1:])
                        with np.errstate(over="ignore"):  # beyond float32 -> inf, rejected downstream
                            block = block.astype(np.float32)
                        yield block, None if labels is None else labels[start : start + n]
            except READ_ERRORS as e:
                raise InputError(f"{self.path}: cannot read array {key!r} ({error_text(e)})") from e

    def _zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.file)
        except READ_ERRORS as e:
            raise InputError(f"{self.path}: cannot read as .npz ({error_text(e)})") from e
