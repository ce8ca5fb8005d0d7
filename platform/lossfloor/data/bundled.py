"""Data sets shipped with the product, named `bundled:NAME`; available offline.

- `bundled:digits` (the default): scikit-learn's 1797 hand-written digits, 8x8 grey images with values
  0..16, scaled to [-1, 1] as x/8 - 1, shape (1, 8, 8), labels 0..9.
- `bundled:photos`: 1950 colour patches of 32x32 pixels (a CIFAR-shaped set) cut with stride 16 from the
  two photographs scikit-learn ships (`load_sample_images`: a temple in China and a flower, 427x640 RGB),
  scaled to [-1, 1] as x/127.5 - 1, shape (3, 32, 32); no labels.
- `bundled:terrain`: 2058 patches of 16x16 elevation samples cut with stride 8 from the digital elevation
  model matplotlib ships (`jacksboro_fault_dem.npz`, 344x403 samples of about 90 m, 236-1076 m), scaled
  to [-1, 1] by the model's minimum and maximum, shape (1, 16, 16); no labels. Smooth fields: a data set
  of a different kind from handwriting and photographs.

`patches` cuts the windows; the benchmarks use it for photo patches of other sizes and strides.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np

from lossfloor.data.source import Chunk, Reader, SourceInfo
from lossfloor.errors import InputError

PREFIX = "bundled:"
DEFAULT = PREFIX + "digits"


def patches(image: np.ndarray, size: int, stride: int) -> np.ndarray:
    """All size x size windows of an (H, W, C) image whose corners lie on a stride grid: (n, C, size, size),
    row-major over the corners (n = (⌊(H - size)/stride⌋ + 1)·(⌊(W - size)/stride⌋ + 1))."""
    windows = np.lib.stride_tricks.sliding_window_view(image, (size, size), axis=(0, 1))  # (H', W', C, s, s)
    return np.ascontiguousarray(windows[::stride, ::stride].reshape(-1, image.shape[2], size, size))


def sample_photos() -> list[np.ndarray]:
    """scikit-learn's two sample photographs, (427, 640, 3) uint8 each."""
    from sklearn.datasets import load_sample_images  # heavy import, only when used

    return list(load_sample_images().images)


def _digits() -> tuple[np.ndarray, np.ndarray | None]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    samples = (digits.data / 8.0 - 1.0).astype(np.float32).reshape(-1, 1, 8, 8)  # (N, 64) -> (N, 1, 8, 8)
    return samples, digits.target.astype(np.int64)


def _photos() -> tuple[np.ndarray, np.ndarray | None]:
    cut = np.concatenate([patches(p, 32, 16) for p in sample_photos()])
    return (cut.astype(np.float32) / 127.5 - 1.0).astype(np.float32), None


def _terrain() -> tuple[np.ndarray, np.ndarray | None]:
    from matplotlib.cbook import get_sample_data  # matplotlib's sample data: installed with the package

    with np.load(get_sample_data("jacksboro_fault_dem.npz", asfileobj=False)) as f:
        z = f["elevation"].astype(np.float64)
    z = 2.0 * (z - z.min()) / (z.max() - z.min()) - 1.0
    return patches(z[:, :, None], 16, 8).astype(np.float32), None


_SETS: dict[str, tuple[Callable[[], tuple[np.ndarray, np.ndarray | None]], str]] = {
    "digits": (_digits, "digits/8-1"),
    "photos": (_photos, "uint8/127.5-1"),
    "terrain": (_terrain, "elevation min-max to [-1,1]"),
}
NAMES = tuple(_SETS)


class BundledReader(Reader):
    """One bundled data set, made in memory on first use."""

    def __init__(self, path: str, make: Callable[[], tuple[np.ndarray, np.ndarray | None]], normalisation: str):
        super().__init__(path)
        self._make, self._normalisation = make, normalisation

    @functools.cached_property
    def _data(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self._make()

    def info(self) -> SourceInfo:
        samples, labels = self._data
        return SourceInfo(count=len(samples), sample_shape=samples.shape[1:], has_labels=labels is not None,
                          normalisation=self._normalisation)

    def blocks(self, rows: int) -> Iterator[Chunk]:
        samples, labels = self._data
        for start in range(0, len(samples), rows):
            yield (samples[start : start + rows].copy(),
                   None if labels is None else labels[start : start + rows].copy())


def bundled_reader(src: str) -> Reader:
    name = src[len(PREFIX) :]
    if name not in _SETS:
        raise InputError(f"{src}: unknown bundled data set, expected one of {[PREFIX + n for n in NAMES]}")
    return BundledReader(src, *_SETS[name])
