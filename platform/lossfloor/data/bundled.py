"""Data sets shipped with the product, named `bundled:NAME`; available offline.

`bundled:digits` (the default): scikit-learn's 1797 hand-written digits, 8x8 grey images with values
0..16, scaled to [-1, 1] as x/8 - 1, shape (1, 8, 8), labels 0..9.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from lossfloor.data.source import Chunk, Reader, SourceInfo
from lossfloor.errors import InputError

PREFIX = "bundled:"
NAMES = ("digits",)
DEFAULT = PREFIX + "digits"


class DigitsReader(Reader):
    """scikit-learn's `load_digits`, scaled to [-1, 1]."""

    @functools.cached_property
    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits  # heavy import, only when used

        digits = load_digits()
        samples = (digits.data / 8.0 - 1.0).astype(np.float32).reshape(-1, 1, 8, 8)  # (N, 64) -> (N, 1, 8, 8)
        return samples, digits.target.astype(np.int64)

    def info(self) -> SourceInfo:
        samples, _ = self._data
        return SourceInfo(count=len(samples), sample_shape=samples.shape[1:], has_labels=True,
                          normalisation="digits/8-1")

    def blocks(self, rows: int) -> Iterator[Chunk]:
        samples, labels = self._data
        for start in range(0, len(samples), rows):
            yield samples[start : start + rows].copy(), labels[start : start + rows].copy()


def bundled_reader(src: str) -> Reader:
    name = src[len(PREFIX) :]
    if name != "digits":
        raise InputError(f"{src}: unknown bundled data set, expected one of {[PREFIX + n for n in NAMES]}")
    return DigitsReader(src)
