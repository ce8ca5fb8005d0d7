"""Data sets and σ grid of the scale benchmarks (knn_search.py, estimator_scale.py).

- photo patches: every 8×8×3 patch (stride 1) of the two photographs scikit-learn ships
  (`load_sample_images`), scaled like images to [-1, 1] (x/127.5 - 1), D = 192; the two photographs hold
  531 720 patches, and their left-right flips as many again. `photo_patches(n, seed)` draws n distinct
  patches without replacement in a seeded order (nested: the first n of a larger draw).
- low-rank mixture: a structured synthetic set at D ≥ 1 024: C Gaussian clusters whose centres and
  within-cluster spread live in a random r-dimensional subspace, plus small isotropic noise, at the
  scale of image data (per-coordinate RMS ≈ 0.5).
- SIGMAS (`sigma_grid`): 16 σ log-spaced from 0.002 to 80 (data in [-1, 1]: from below the nearest-neighbour distance
  to far above the data's spread, where the posterior is flat).
"""

from __future__ import annotations

import functools

import numpy as np


def sigma_grid(count: int = 16) -> np.ndarray:
    """`count` σ log-spaced from 0.002 to 80."""
    return np.geomspace(0.002, 80.0, count)


SIGMAS = sigma_grid(16)


def _all_patches(flips: bool) -> np.ndarray:
    """Every 8×8×3 window (stride 1) of the photographs (and their left-right flips), (n, 192) uint8, each
    window flattened height, width, channel."""
    from lossfloor.data.bundled import patches, sample_photos

    images = sample_photos()
    if flips:
        images += [im[:, ::-1] for im in images]
    return np.concatenate([patches(im, 8, 1).transpose(0, 2, 3, 1).reshape(-1, 192) for im in images])


@functools.lru_cache(maxsize=2)
def _distinct_patches(flips: bool) -> np.ndarray:
    return np.unique(_all_patches(flips), axis=0)  # sorted; `photo_patches` orders them by a seeded permutation


def photo_patches(n: int, seed: int = 0) -> np.ndarray:
    """(n, 192) float32 distinct 8×8×3 photo patches in [-1, 1], a seeded draw without replacement."""
    raw = _distinct_patches(False)
    if n > len(raw):  # the flips too (then the draw is not nested in the draws of fewer patches)
        raw = _distinct_patches(True)
    if n > len(raw):
        raise ValueError(f"photo patches: at most {len(raw)} distinct patches, asked for {n}")
    take = np.random.default_rng(seed).permutation(len(raw))[:n]
    return (raw[take].astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def lowrank_mixture(n: int, dim: int = 1024, *, rank: int = 32, clusters: int = 64, seed: int = 0) -> np.ndarray:
    """(n, dim) float32: `clusters` Gaussian clusters in a random rank-`rank` subspace plus 0.05 noise."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, rank)))  # (dim, rank) orthonormal
    centres = rng.normal(0.0, 2.0, (clusters, rank))
    scales = rng.uniform(0.3, 1.0, (clusters, rank))
    label = rng.integers(0, clusters, n)
    z = centres[label] + scales[label] * rng.normal(size=(n, rank))
    x = z @ basis.T * (0.5 * np.sqrt(dim / (rank * 4.5))) + 0.05 * rng.normal(size=(n, dim))
    return x.astype(np.float32)
