"""The queries of an estimate, their order and their randomness: common random numbers per query.

Query order. The M queries are numbered q = 0, 1, ..., M - 1 in a seeded order of the sources: with π a
permutation of the N samples drawn from (seed, key) only, query q has source n = π[q mod N] and round
j = q div N. Every sample is a source once before any is a source twice (the first N queries are one
without-replacement pass over the data), every source is marginally uniform for any M, and the first M
queries of the order are the queries of the budget M: a larger M only adds queries.

Common random numbers. Everything random about one query — its noise ε, knn's uniform draws and its
draws from the bands of neighbour ranks — comes
from a generator seeded by (seed, key, n, j, stream) only (`query_seeds`: NumPy's SeedSequence for
(seed, key, stream), then a splitmix64 hash of (n, j)), so the same seed gives the same queries y = x_n + σε
for every estimator, batch size, number of workers or processes and budget M: comparisons between
estimators are paired by default. The subset estimators' reference subset is drawn per block of
`subset_block(N)` consecutive queries from (seed, key, block, SUBSET_STREAM) (`batch`).

key: 0 for the floor of a data set; the class-conditional floor gives each class its own key, so the
classes' queries (whose sources are numbered within their class) are distinct.

Batches. Batch b holds the queries [b·R, (b+1)·R) ∩ [0, M), R = rows_per_batch; batches are numbered
from `first_batch` (the class-conditional floor numbers each class's batches after the previous class's).
A batch's numbers depend only on its queries, so any process computes the same numbers for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

NOISE_STREAM = 0
SUBSET_STREAM = 1  # snis/dol/cdol: the reference subset of a block of queries
DRAW_STREAM = 2  # knn: a query's uniform draws
ORDER_STREAM = 3  # the order of the sources
BAND_STREAM = 4  # knn: a query's draws from the bands of its neighbour ranks

SUBSET_BLOCK = 128  # queries per reference subset (snis/dol/cdol), at most; `subset_block`
_MASK = (1 << 64) - 1


def batch_seed(seed: int, batch_index: int, stream: int) -> int:
    """A 63-bit seed derived from (seed, index, stream) by NumPy's SeedSequence hashing."""
    return int(np.random.SeedSequence([seed, batch_index, stream]).generate_state(1, np.uint64)[0] >> 1)


def _key_entropy(seed: int, key: int, stream: int) -> list[int]:
    return [seed, key & _MASK, 1 if key < 0 else 0, stream]


def _splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, a bijection of uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def query_seeds(seed: int, key: int, sources, rounds, stream: int) -> np.ndarray:
    """A 63-bit seed per query (source n, round j), from (seed, key, n, j, stream) only: (B,) uint64."""
    base = np.random.SeedSequence(_key_entropy(seed, key, stream)).generate_state(1, np.uint64)[0]
    n = np.asarray(sources, dtype=np.uint64)
    j = np.asarray(rounds, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix(base + n * _GOLDEN)
        z = _splitmix(z + (j + np.uint64(1)) * _GOLDEN)
    return z >> np.uint64(1)


def block_seed(seed: int, key: int, block: int, stream: int) -> int:
    """A 63-bit seed of a block of queries (the subset estimators' reference subset)."""
    ss = np.random.SeedSequence([*_key_entropy(seed, key, stream), block])
    return int(ss.generate_state(1, np.uint64)[0] >> 1)


def normal_rows(seeds: np.ndarray, dim: int, device: torch.device | str = "cpu", parts: int = 1) -> torch.Tensor:
    """(B, parts·dim) float32 standard normals, row i drawn by a generator seeded with seeds[i]: `parts`
    draws of `dim` values one after the other (separate draws: torch's values depend on a draw's size, so
    the first `dim` values of a row are the same for any `parts`)."""
    out = torch.empty(len(seeds), parts * dim, dtype=torch.float32, device=device)
    g = torch.Generator(device=device)
    for i, s in enumerate(seeds.tolist()):
        g.manual_seed(s)
        for p in range(parts):
            torch.randn(dim, generator=g, device=device, out=out[i, p * dim:(p + 1) * dim])
    return out


def uniform_without_replacement(seeds: np.ndarray, n: int, size: int, chunk: int | None = None) -> torch.Tensor:
    """(B, size) long on the CPU: per row, `size` distinct indices of range(n), a uniform ordered sample
    without replacement drawn by a generator seeded with seeds[i].

    Small samples (size ≤ n/4): the distinct values of a stream of uniform integers in order of first
    appearance (an exact uniform ordered sample; no O(n) work per row): a first chunk of
    size + 2·size²/n + 16 integers (or `chunk`; vectorised deduplication), more chunks in the rare row that
    needs them. Larger ones: the first `size` of a uniform permutation."""
    B = len(seeds)
    out = torch.empty(B, size, dtype=torch.long)
    g = torch.Generator()
    if size > n // 4:
        for i, s in enumerate(seeds.tolist()):
            g.manual_seed(s)
            out[i] = torch.randperm(n, generator=g)[:size]
        return out
    m = chunk or _stream_length(n, size)
    draws = torch.empty(B, m, dtype=torch.long)
    for i, s in enumerate(seeds.tolist()):
        g.manual_seed(s)
        torch.randint(n, (m,), generator=g, out=draws[i])
    values, count = _first_distinct(draws, size)
    enough = count >= size
    out[enough] = values[enough]
    for i in torch.nonzero(~enough).flatten().tolist():  # rare: continue the row's stream
        g.manual_seed(int(seeds[i]))
        seen: dict[int, None] = {}
        while len(seen) < size:
            for v in torch.randint(n, (m,), generator=g).tolist():
                seen.setdefault(v)
        out[i] = torch.tensor(list(seen)[:size])
    return out


def uniform_subsets(seeds: np.ndarray, rows: int, widths, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query (row i drawn by a generator seeded with seeds[i]) `rows` × len(widths) uniform ordered
    samples without replacement, of sizes[b] positions of range(widths[b]) (`sizes` one int for all):
    (B, rows, len(widths), max size) long on the CPU, and (same shape) bool, the positions taken.

    Each sample is the distinct values of size + 2·size²/width + 16 uniform integers in order of first
    appearance. The rare sample whose integers hold fewer than its size distinct values takes the t it has:
    given t, an ordered sample is uniform whatever t, so an estimate that weighs it by width/t stays unbiased.
    """
    B = len(seeds)
    sizes = [sizes] * len(widths) if isinstance(sizes, int) else list(sizes)
    most = max(sizes, default=0)
    pos = torch.zeros(B, rows, len(widths), most, dtype=torch.long)
    taken = torch.zeros(B, rows, len(widths), most, dtype=torch.bool)
    if B == 0 or rows == 0 or not widths:
        return pos, taken
    g = torch.Generator()
    streams = [torch.empty(B, rows, _stream_length(w, size), dtype=torch.long) for w, size in zip(widths, sizes)]
    for i, s in enumerate(seeds.tolist()):
        g.manual_seed(s)
        for w, out in zip(widths, streams):
            torch.randint(w, out.shape[1:], generator=g, out=out[i])
    for b, (draws, size) in enumerate(zip(streams, sizes)):
        values, count = _first_distinct(draws.view(B * rows, -1), size)
        pos[:, :, b, :size] = values.view(B, rows, size)
        taken[:, :, b] = (torch.arange(most)[None, :] < count[:, None]).view(B, rows, most)
    return pos, taken


def _stream_length(n: int, size: int) -> int:
    """Uniform integers of range(n) drawn for `size` distinct ones: size + 2·size²/n + 16 (rarely short)."""
    return size + math.ceil(2 * size * size / n) + 16


def _first_distinct(draws: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (B, m) draws its first `size` distinct values in order of first appearance, (B, size)
    (zero-padded where a row has fewer), and how many it has, (B,) (at most `size`)."""
    keep = _first_occurrences(draws)
    rank = keep.cumsum(1)
    take = keep & (rank <= size)
    values = torch.zeros(draws.shape[0], size + 1, dtype=draws.dtype)
    values.scatter_(1, torch.where(take, rank - 1, size), draws)  # the untaken go to a spare column, dropped
    return values[:, :size], take.sum(1)


def _first_occurrences(draws: torch.Tensor) -> torch.Tensor:
    """(B, m) bool: True where a value appears for the first time in its row."""
    values, pos = draws.sort(dim=1, stable=True)
    dup = torch.zeros_like(draws, dtype=torch.bool)
    dup.scatter_(1, pos[:, 1:], values[:, 1:] == values[:, :-1])
    return ~dup


def subset_block(n_samples: int) -> int:
    """Queries per reference subset of the subset estimators: SUBSET_BLOCK, fewer for small N (at least 8
    blocks per N queries, the error's units)."""
    return max(1, min(SUBSET_BLOCK, n_samples // 8))


@dataclass(frozen=True, kw_only=True)
class QueryPlan:
    """How the M queries of an estimate are ordered and batched (module docstring)."""

    n_samples: int
    n_queries: int
    rows_per_batch: int  # queries per batch
    seed: int = 0
    key: int = 0  # the class-conditional floor's class; 0 otherwise
    first_batch: int = 0  # the number of the first batch (batches first_batch .. first_batch + n_batches - 1)
    _order: list = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_queries / self.rows_per_batch)

    def queries(self, batch_index: int) -> range:
        """The query numbers q of a batch."""
        start = (batch_index - self.first_batch) * self.rows_per_batch
        return range(start, min(start + self.rows_per_batch, self.n_queries))

    def order(self) -> torch.Tensor:
        """π: the sources' order, (N,) long (drawn once per plan)."""
        if not self._order:
            g = torch.Generator().manual_seed(batch_seed(self.seed, self.key & _MASK, ORDER_STREAM))
            self._order.append(torch.randperm(self.n_samples, generator=g))
        return self._order[0]

    def sources_and_rounds(self, batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Source sample n (B,) long and round j (B,) long of each query of the batch."""
        r = self.queries(batch_index)
        q = torch.arange(r.start, r.stop)
        return self.order()[q % self.n_samples], q // self.n_samples

    def sources(self, batch_index: int) -> torch.Tensor:
        return self.sources_and_rounds(batch_index)[0]

    def seeds(self, batch_index: int, stream: int) -> np.ndarray:
        """Per query of the batch its seed for `stream` (`query_seeds`)."""
        n, j = self.sources_and_rounds(batch_index)
        return query_seeds(self.seed, self.key, n.numpy(), j.numpy(), stream)
