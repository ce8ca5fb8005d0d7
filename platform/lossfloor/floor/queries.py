"""Stratified queries and per-batch randomness.

Every sample is the source of exactly k queries (so Â = (1/M) Σ_m ||x_{s_m}||² equals the data's
E||x0||² exactly). Queries are numbered sample-major, q = n·k + j, and cut into batches of whole samples:
batch b holds the samples [b·R, (b+1)·R) with R = rows_per_batch, i.e. B = R·k queries (numbered from
`first_batch`: the class-conditional floor numbers each class's batches after the previous class's, so no
two batches of an estimate share their randomness). Everything random
in batch b (its noise, its reference subset) comes from a generator seeded by (seed, b, stream) only, so
a batch gives the same numbers whichever process or Ray worker computes it, and in any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

NOISE_STREAM = 0
SUBSET_STREAM = 1


def batch_seed(seed: int, batch_index: int, stream: int) -> int:
    """A 63-bit seed derived from (seed, batch index, stream) by NumPy's SeedSequence hashing."""
    return int(np.random.SeedSequence([seed, batch_index, stream]).generate_state(1, np.uint64)[0] >> 1)


def generator(seed: int, batch_index: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(batch_seed(seed, batch_index, stream))
    return g


@dataclass(frozen=True, kw_only=True)
class QueryPlan:
    """How M = k·N queries are numbered and batched."""

    n_samples: int
    queries_per_sample: int
    rows_per_batch: int
    first_batch: int = 0  # the number of the first batch (batches first_batch .. first_batch + n_batches - 1)

    @property
    def n_queries(self) -> int:
        return self.n_samples * self.queries_per_sample

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_samples / self.rows_per_batch)

    def rows(self, batch_index: int) -> range:
        """The source samples of a batch (each the source of k consecutive queries)."""
        start = (batch_index - self.first_batch) * self.rows_per_batch
        return range(start, min(start + self.rows_per_batch, self.n_samples))

    def sources(self, batch_index: int) -> torch.Tensor:
        """Source sample index of each query of the batch, (B,) long: each row repeated k times."""
        r = self.rows(batch_index)
        return torch.arange(r.start, r.stop).repeat_interleave(self.queries_per_sample)
