"""CIFAR-10 "python version" training batches: a folder with `data_batch_1` .. `data_batch_5`.

Each batch is a pickled dict with b"data" (uint8, (n, 3072): 1024 red, then green, then blue values,
row-major) and b"labels" (n ints). Samples are (3, 32, 32) scaled to [-1, 1] as x/127.5 - 1.
The pickles are read by an unpickler that only builds numpy arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lossfloor.data.images import PIXEL_NORMALISATION, scale_pixels
from lossfloor.data.source import Chunk, Reader, SourceInfo
from lossfloor.errors import InputError

BATCH_NAMES = tuple(f"data_batch_{i}" for i in range(1, 6))
SAMPLE_SHAPE = (3, 32, 32)

# The only globals a CIFAR batch pickle needs (numpy array reconstruction, any numpy version).
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def is_cifar_dir(root: Path) -> bool:
    return (root / BATCH_NAMES[0]).is_file()


def read_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 pixels (n, 3, 32, 32), int64 labels (n,))."""
    try:
        with open(file, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as e:
        raise InputError(f"{file}: missing; expected CIFAR-10 batches data_batch_1 .. data_batch_5") from e
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, AttributeError) as e:
        message = f"{file}: expected a CIFAR-10 python batch (a pickled dict), cannot read it ({e})"
        raise InputError(message) from e
    if not isinstance(batch, dict):
        raise InputError(f"{file}: expected a CIFAR-10 python batch (a pickled dict), got {type(batch)}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    pixels_ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not (pixels_ok and data.shape[1] == 3072):
        raise InputError(f"{file}: expected b'data' to be a uint8 array of shape (n, 3072)")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError):
        labels = np.zeros(0, dtype=object)
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(data),):
        raise InputError(f"{file}: expected b'labels' to be {len(data)} integers")
    return data.reshape(len(data), *SAMPLE_SHAPE), labels.astype(np.int64)  # (n, 3072) -> (n, 3, 32, 32)


class CifarReader(Reader):
    """The five CIFAR-10 training batches of a folder, in order."""

    def __init__(self, path: str, root: Path):
        super().__init__(path)
        self.files = [root / name for name in BATCH_NAMES]

    @functools.cached_property
    def _counts(self) -> list[int]:
        return [len(read_batch(file)[1]) for file in self.files]

    def info(self) -> SourceInfo:
        count = sum(self._counts)
        if count < 2:
            raise InputError(f"{self.path}: expected at least 2 samples, got {count}")
        return SourceInfo(count=count, sample_shape=SAMPLE_SHAPE, has_labels=True,
                          normalisation=PIXEL_NORMALISATION)

    def blocks(self, rows: int) -> Iterator[Chunk]:
        for file in self.files:
            pixels, labels = read_batch(file)
            for start in range(0, len(pixels), rows):
                yield scale_pixels(pixels[start : start + rows]), labels[start : start + rows]
