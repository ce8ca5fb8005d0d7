"""Exact duplicate samples: a 128-bit key per row, and the groups of equal rows.

A row's key is blake2b-128 of its float32 bytes with -0.0 read as 0.0 (equal values, equal keys), so
duplicates are found in one pass over chunks of any size; two different rows share a key with
probability ~2^-128. The kNN estimator deduplicates with `groups` and carries the counts as weights;
`lossfloor data describe` reports them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

KEY = np.dtype((np.void, 16))
_CHUNK_VALUES = 1 << 20  # float32 values hashed per chunk (4 MiB)


def row_keys(block: np.ndarray) -> np.ndarray:
    """(n, ...) samples -> (n,) 16-byte keys, equal exactly when the rows are equal as float32 values."""
    flat = np.asarray(block).reshape(len(block), -1)
    out = np.empty(len(flat), dtype=KEY)
    step = max(1, _CHUNK_VALUES // max(1, flat.shape[1]))
    for start in range(0, len(flat), step):  # a chunk at a time: a memory-mapped block is never copied whole
        rows = np.ascontiguousarray(flat[start:start + step], dtype=np.float32) + np.float32(0.0)
        for i, row in enumerate(rows, start):
            out[i] = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
    return out


@dataclass(frozen=True)
class Groups:
    """Samples grouped by value: `first` (U,) index of each distinct row's first occurrence (ascending),
    `inverse` (N,) the group of every sample, `counts` (U,) the multiplicities."""

    first: np.ndarray
    inverse: np.ndarray
    counts: np.ndarray

    @property
    def n_unique(self) -> int:
        return len(self.first)

    @property
    def n_duplicates(self) -> int:
        """Samples that repeat an earlier sample (N - U)."""
        return int(len(self.inverse) - len(self.first))


def groups(keys: np.ndarray) -> Groups:
    """Group rows by key; groups are numbered in order of first occurrence."""
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(first, kind="stable")  # number groups by first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return Groups(first=first[order], inverse=rank[inverse.reshape(-1)], counts=counts[order])
