"""Content fingerprints of sample arrays: which data a J* table or a shard directory was computed from.

The digest is sha256 over a one-line header naming the dtype and full shape, then the raw bytes of the
array in C order. `fingerprint` hashes an array in one go; `Fingerprinter` hashes the same bytes chunk by
chunk (rows along the leading axis) and gives the identical digest, so sources larger than memory can be
fingerprinted while they stream. Labels, source paths and normalisation names are not part of it
(`labels_fingerprint` hashes a label vector the same way).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

_MAGIC = b"lossfloor.fingerprint/1\n"


def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    fields = {"dtype": np.dtype(dtype).str, "shape": [int(s) for s in shape]}
    return _MAGIC + json.dumps(fields, separators=(",", ":"), sort_keys=True).encode() + b"\n"


class Fingerprinter:
    """Streaming sha256 of an array of known shape, fed as consecutive row chunks.

    `Fingerprinter(shape=(N, *sample_shape))`, then `update(chunk)` with chunks of shape (n_i, *sample_shape)
    summing to N rows, then `hexdigest()` — equal to `fingerprint(whole_array)`.
    """

    def __init__(self, *, shape: tuple[int, ...], dtype=np.float32):
        if len(shape) < 1:
            raise ValueError(f"shape: expected (N, *sample_shape), got {shape!r}")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._hash = hashlib.sha256(_header(self.shape, self.dtype))

    def update(self, chunk: np.ndarray) -> None:
        """Hash the next `len(chunk)` rows (dtype and trailing shape must match the declared ones)."""
        chunk = np.asarray(chunk)
        if chunk.dtype != self.dtype or chunk.shape[1:] != self.shape[1:]:
            raise ValueError(
                f"chunk: expected dtype {self.dtype} and rows of shape {self.shape[1:]}, "
                f"got {chunk.dtype} {chunk.shape}"
            )
        if self.rows + chunk.shape[0] > self.shape[0]:
            raise ValueError(f"chunk: more than the declared {self.shape[0]} rows")
        self.rows += chunk.shape[0]
        self._hash.update(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))

    def hexdigest(self) -> str:
        """The sha256 hex digest; all declared rows must have been fed."""
        if self.rows != self.shape[0]:
            raise ValueError(f"fingerprint: fed {self.rows} of the declared {self.shape[0]} rows")
        return self._hash.hexdigest()


def fingerprint(samples: np.ndarray) -> str:
    """sha256 hex of (header with dtype and shape) + the array's raw C-order bytes."""
    samples = np.asarray(samples)
    hasher = Fingerprinter(shape=samples.shape, dtype=samples.dtype)
    hasher.update(samples)
    return hasher.hexdigest()


def labels_fingerprint(labels) -> str:
    """The fingerprint of a label vector (N,) as int64: which labels a class-conditional J* table's classes
    came from (`lossfloor.floor.conditional`)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"labels: expected an integer vector (N,), got {labels.dtype} {labels.shape}")
    return fingerprint(labels.astype(np.int64))
