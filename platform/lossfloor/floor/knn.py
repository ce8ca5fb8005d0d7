"""The query-nearest-neighbour estimator of J*(σ) (`--estimator knn`), stratified by neighbour rank, with
cross-fitting (docs/estimators.md; the kNN-proposal idea of Niedoba et al., ICML 2024,
arXiv 2402.08018, applied to the optimal loss).

Per query (source s, y = x_s + σε) the posterior over the N samples is estimated from L kernels, the
samples split into strata by the query's neighbour ranks (`layout`; Z = (s, the nearest distinct samples of
y in rank order) from a neighbour index):

1. A = Z's first k = L/2 entries: the source and the k - 1 nearest, every kernel computed (weight 1).
2. Bands of ranks [k, 4k), [4k, 16k), ..., the last cut at the depth, N/20 ranks (at least 4 096, at most
   65 536 and half the distinct points): each
   band gets d of the L - k remaining kernels, drawn uniformly without replacement from its ranks by the
   query's own band stream (`queries.uniform_subsets`, from (seed, source, round)). At L = 128 and
   N = 20 000: A = 64, bands [64, 256), [256, 1 024), [1 024, 4 096) with 16 draws each.
3. The rest (every sample whose distinct point is not among Z's searched entries) gets the remaining
   draws, taken from the query's uniform ordered sample of `draw_count` of the N samples (drawn from
   (seed, source, round) only, `queries`): the first ones that fall in the rest. A duplicated point is
   drawn as often as it occurs, so the draw follows the data's mass.
   With an IVF index the rest is stratified too (`Layout.lists`): the query orders every distinct point by
   its IVF list's centroid distance to y (nearest list first; a list's points in their stored order), and
   list bands of these positions, [0, 2·depth) then geometric widths to U, get DRAWS_MIN draws each (at
   most LIST_BANDS_MAX bands): uniform with replacement over the band's positions outside Z (from the band
   stream), each weighing (the band's points outside Z) / (the draws in its half). With replacement each
   half keeps its fixed number of draws: drawing among all positions and dropping those in Z left a half
   with none often enough (Z fills half of the first band) to bias the estimate low.
   Measured on photo patches (M = 2 048, L = 256, N = 320 000): worst error 0.68 % against 0.99 % with
   16 uniform draws for the rest, and a bias allowance 40 % narrower, at the same cost (docs/estimators.md).
   Z may be any deterministic function of (s, y): an approximate index (missing or misranked neighbours)
   lowers efficiency, never validity. Where the kernel is flat enough that neighbours no longer help
   (`searched`: √(2D)·s_x/σ ≤ 2, s_x the distinct points' per-coordinate standard deviation), there is no
   search: A = {source}, no bands, and the rest gets L - 1 draws.
4. Each stratum's draws are split in order into halves; a drawn kernel is weighed by its stratum's size
   over its draws in the half (|band| in ranks or positions, |rest| in samples; a stratum drawn whole is known and
   weighs 1 in both), A's kernels by 1. With f_n = x_n - x_s, q_n = ||f_n||², multiplicities m_n (a drawn
   sample counts once) and kernels w_n = m_n exp(ℓ_n - max), ℓ_n = -||y - x_n||²/2σ², for each half j
   (and both halves together):

       δ_j = [Σ_j F w f + β_j ē_j (T_f - Σ_rest,j F f)] / Σ_j F w
       Q_j = [Σ_j F w q + β'_j ē_j (T_q - Σ_rest,j F q)] / Σ_j F w

   (F the kernels' weights in that estimate), a Horvitz-Thompson estimate of the posterior's sums per
   stratum. Without bands (a σ without search, or data too small for a band) the rest's draws get a
   control variate: T_f = Σ_rest m f and T_q = Σ_rest m q are known exactly (from the data's sums), ē_j
   is the rest's mean kernel, and the coefficients shrink with how concentrated the weights are:
   β = min(4, weighted variance of f over the draws / unweighted variance), β' the same for q (→ 1 for
   flat weights, exact as σ → ∞; → 0 when a few close points carry the posterior). With bands β = 0: the
   bands already hold the mass a control variate would correct.
5. δ estimates x_s - E[x0|y] up to sign, Q the posterior mean of ||x - x_s||². The query's term is the
   posterior variance Q - ⟨δ₁, δ₂⟩ (cross-fitted: the product of independent halves removes the
   +tr Var(δ̂) bias of ||δ̂||²), with Q and δ from both halves where a single estimate is needed.

Self-check from the same kernels: plain Q - ||δ||² and Richardson Q - (2||δ||² - ½(||δ₁||² + ||δ₂||²)).
The spread of {cross-fitted, plain, Richardson} bounded the true error in every measured case; it is the
estimator's bias allowance (`lossfloor.floor.uncertainty`). The batch returns channels
(cross, plain - cross, Richardson - cross) per σ. What bias is left sits in the self-normalised ratio:
it shrinks as the strata hold the posterior's mass more evenly (docs/estimators.md).

A Gaussian mixture (posterior latents) runs the same estimator with each component's kernel, posterior
mean and variance (`lossfloor.floor.mixture`): f_n = μ_n(y) - m_s, q_n = Σ v_n + ||f_n||², neighbours
searched among the component means.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from lossfloor.data.duplicates import groups, row_keys
from lossfloor.data.node_cache import read_only_tensor
from lossfloor.floor.kernel import take_rows
from lossfloor.floor.mixture import component_terms, mixture_totals, query_noise, split_rows, total_f_q
from lossfloor.floor.neighbours import Lists, NeighbourIndex, build_index
from lossfloor.floor.queries import uniform_subsets

CHANNELS = ("j", "plain_minus_j", "richardson_minus_j")
BETA_MAX = 4.0


@dataclass(eq=False)
class KnnData:
    """The distinct samples, their multiplicities, the data's sums and the neighbour index.

    For a Gaussian mixture (posterior latents, `lossfloor.floor.mixture`) `points` are the components'
    means, `stds` their standard deviations, and the sums over all components are per σ (`totals`).
    """

    points: torch.Tensor  # (U, D) distinct samples (component means), compute dtype, on the device or the host
    mult: torch.Tensor  # (U,) multiplicities, compute dtype, on the compute device (as all below)
    inverse: torch.Tensor  # (N,) long: sample -> distinct sample
    sum_x: torch.Tensor  # (D,) float64, Σ_n x_n over all N samples (a mixture uses `totals` instead)
    sum_sq: float  # Σ_n ||x_n||², float64
    index: NeighbourIndex
    stds: torch.Tensor | None = None  # (U, D) mixture components' standard deviations
    rows: torch.Tensor | None = None  # (N, 2D) the mixture's [mean, std] rows, for `totals`
    _totals: dict | None = None
    _most_held: dict | None = None
    _coordinate_std: float | None = None
    _rank_distance: dict | None = None
    _lists: Lists | bool | None = None

    @property
    def lists(self) -> Lists | None:
        """The index's lists (an IVF index: `NeighbourIndex.lists`) on the compute device, or None."""
        if self._lists is None:
            got = self.index.lists()
            self._lists = False if got is None else got.to(self.mult.device)
        return self._lists or None

    def totals(self, sigma: float) -> dict:
        """The mixture's sums over all N components at σ (`mixture.mixture_totals`), cached."""
        if self._totals is None:
            self._totals = {}
        if sigma not in self._totals:  # computed where the rows are (host or device), used on the device
            self._totals[sigma] = {k: v.to(self.mult.device) if torch.is_tensor(v) else v
                                   for k, v in mixture_totals(self.rows, sigma).items()}
        return self._totals[sigma]

    @property
    def n_samples(self) -> int:
        return len(self.inverse)

    @property
    def n_unique(self) -> int:
        return len(self.points)

    @property
    def coordinate_std(self) -> float:
        """s_x: the distinct points' root-mean-square deviation from their mean, per coordinate, computed
        once (a pass over the points). Distinct points, not samples: many copies of one point shrink the
        samples' spread but not the distances between the points a kernel weighs."""
        if self._coordinate_std is None:
            sum_x, sum_sq = _sums(self.points)
            n, d = float(self.n_unique), self.points.shape[1]
            self._coordinate_std = math.sqrt(max(0.0, (sum_sq / n - float((sum_x / n).square().sum())) / d))
        return self._coordinate_std

    def rank_distance(self, k: int) -> float:
        """r_k: the 5th percentile over 256 seeded distinct points (all, if fewer) of the distance to their
        k-th nearest other point (by the index; a miss counts as infinitely far), computed once per k."""
        if self._rank_distance is None:
            self._rank_distance = {}
        if k not in self._rank_distance:
            g = torch.Generator().manual_seed(0)
            pick = torch.randperm(self.n_unique, generator=g)[:256].to(self.mult.device)
            x = take_rows(self.points, pick, self.mult.device)
            ids = self.index.search(x, min(k + 1, self.n_unique))
            d = (take_rows(self.points, ids.clamp_min(0), x.device) - x[:, None]).double().square().sum(-1).sqrt()
            d = d.masked_fill((ids < 0) | (ids == pick[:, None]), torch.inf).sort(1).values
            r = d[:, min(k, d.shape[1]) - 1]
            self._rank_distance[k] = float(torch.quantile(r.clamp_max(torch.finfo(torch.float64).max), 0.05))
        return self._rank_distance[k]

    def most_held(self, k: int) -> int:
        """The samples that k distinct points can hold at most: the sum of the k largest multiplicities."""
        if self._most_held is None:
            self._most_held = {}
        if k not in self._most_held:  # `draw_count` asks for a few k in every batch
            self._most_held[k] = int(torch.topk(self.mult, min(k, self.n_unique)).values.sum())
        return self._most_held[k]


def deduplicate(x: torch.Tensor, cache=None):
    """(points (U, D), multiplicities (U,), inverse (N,)) of (N, D) samples, points in first-seen order,
    on x's device. Without duplicates the points are x itself (no copy). cache: a `NodeCache` of x's
    data set: the groups and the distinct points are computed once per machine and mapped."""
    n = x.shape[0]
    if cache is None:
        g = groups(row_keys(x.detach().cpu().numpy()))
        first, counts, inverse = g.first, g.counts, g.inverse
    else:
        with np.load(cache.file("dedup.npz", lambda tmp: _save_groups(tmp, x))) as f:
            first, counts, inverse = f["first"], f["counts"], f["inverse"]
    mult = torch.from_numpy(np.asarray(counts)).to(x.device, x.dtype)
    inverse = torch.from_numpy(np.asarray(inverse)).to(x.device)
    if len(first) == n:  # no duplicates: first is 0..N-1
        return x, mult, inverse
    if cache is None or x.device.type != "cpu":
        return x[torch.from_numpy(np.asarray(first)).to(x.device)], mult, inverse
    points = cache.array("dedup-points", (len(first), x.shape[1]), x.numpy().dtype,
                         lambda: _gathered(x, np.asarray(first)))
    return read_only_tensor(points), mult, inverse


def _save_groups(path, x: torch.Tensor) -> None:
    g = groups(row_keys(x.detach().cpu().numpy()))
    with open(path, "wb") as f:
        np.savez(f, first=g.first, counts=g.counts, inverse=g.inverse)


_CHUNK_VALUES = 1 << 20  # values per chunk of rows when a pass goes over a (mapped) data set


def _gathered(x: torch.Tensor, rows: np.ndarray):
    chunk = max(1, _CHUNK_VALUES // x.shape[1])
    for start in range(0, len(rows), chunk):
        yield x[torch.from_numpy(rows[start:start + chunk])].numpy()


def _sums(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Σ_n x_n (D,) and Σ_n ||x_n||² in float64, a chunk of rows at a time (x may be a mapped data set)."""
    chunk = max(1, _CHUNK_VALUES // x.shape[1])
    sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    sum_sq = 0.0
    for start in range(0, x.shape[0], chunk):
        xd = x[start:start + chunk].double()
        sum_x += xd.sum(0)
        sum_sq += float((xd * xd).sum())
    return sum_x, sum_sq


def prepare_knn(x: torch.Tensor, *, index: str = "auto", pca: int | None = None, seed: int = 0,
                mixture: bool = False, cache=None, device: torch.device | None = None) -> KnnData:
    """Deduplicate (N, D) samples (mixture: (N, 2D) [mean, std] rows) and index the distinct (means).

    x may stay in host memory while the kernel runs on `device` (default x's): the points stay with x
    and each batch gathers its rows; the small per-sample arrays and sums live on `device`."""
    device = x.device if device is None else torch.device(device)
    points, mult, inverse = deduplicate(x, cache)
    stds = None
    if mixture:
        points, stds = split_rows(points)
    sum_x, sum_sq = _sums(x)
    return KnnData(points=points, mult=mult.to(device), inverse=inverse.to(device), sum_x=sum_x.to(device),
                   sum_sq=sum_sq, stds=stds,
                   index=build_index(points if points.is_contiguous() else points.contiguous(), index, pca=pca,
                                     seed=seed, cache=cache, name="means" if mixture else "points"),
                   rows=x if mixture else None)


# Searching for neighbours pays while the kernel's log-weights spread over the samples: their spread is
# about |ε·(x_n - x_s)|/σ ≈ √(2D)·s_x/σ. Measured on 8×8×3 photo patches (D = 192, s_x = 0.66, L = 128, error
# against exact on the same queries, N = 500 and 1 500): at spread ≤ 2 (σ ≥ 8) drawing the L - 1 others
# uniformly erred ≤ 0.34 % like the search (≤ 0.49 %); at spread 3.5 (σ = 3.7) it erred 2.5 % at N = 500
# against 0.44 % with L/2 neighbours, which there hold much of the posterior.
SEARCH_SPREAD = 2.0


def search_limit(dim: int, coordinate_std: float) -> float:
    """The σ from which knn stops searching: √(2D)·s_x / SEARCH_SPREAD."""
    return math.sqrt(2.0 * dim) * coordinate_std / SEARCH_SPREAD


def searched(data: KnnData, sigma: float) -> bool:
    """Whether the queries at σ search for neighbours: σ below `search_limit` (a Gaussian mixture's
    components are always searched: their own widths change the kernel)."""
    return data.stds is not None or sigma < search_limit(data.points.shape[1], data.coordinate_std)


# The bands pay only where the posterior reaches beyond A. A point at distance r from the source has
# log-weight -(r² - 2σ r z)/2σ² = -t²/2 + t z relative to the source's (t = r/σ, z = ε·f/|f| standard normal,
# at most 5.3 over 1.28 M points): with r beyond the k-th nearest distance r_k, N such points weigh < 10⁻⁶ of
# the source at N = 1.28 M once t ≥ 14.5. r_k is taken low (its 5th percentile over 256 sampled points,
# `KnnData.rank_distance`), so a query in a dense region keeps its bands.
BAND_REACH = 14.5


def banded(data: KnnData, sigma: float, k: int) -> bool:
    """Whether the searched queries at σ draw from bands of ranks beyond A: σ·BAND_REACH > r_k (always for a
    Gaussian mixture: its components' own widths reach further)."""
    return data.stds is not None or sigma * BAND_REACH > data.rank_distance(k)


# Bands of neighbour ranks [k·4^i, k·4^(i+1)), searched to a depth of N/20 distinct points, at least
# DEPTH_MIN and at most DEPTH_MAX ranks and half the distinct points (the last band cut there), each band
# drawn DRAWS_MIN times at least. Measured on 8×8×3 photo patches at L = 128 against exact on the same
# queries (benchmarks/estimator_scale.py, M = 2 048 or 1 024, 16 σ): with depth 4 096 knn's worst error was
# 0.28 % at N = 10 000, 0.40 % at 20 000, 1.8 % at 80 000 and 2.9-3.9 % at 320 000, where depth 16 384 (N/20)
# brought it to 1.4 %: the posterior's mass spreads over a fixed share of the data, so the depth follows N.
BAND_GROWTH = 4
DEPTH_SHARE = 20
DEPTH_MIN = 4096
DEPTH_MAX = 65536
DRAWS_MIN = 4
LIST_BANDS_MAX = 16


@dataclass(frozen=True)
class Layout:
    """How a searched query spends its L kernels (module docstring, steps 1-3)."""

    k: int  # |A|: the source and the k - 1 nearest
    bands: tuple[tuple[int, int], ...]  # the bands' rank ranges [start, stop) in Z (the source is rank 0)
    band_draws: int  # draws per band
    rest_draws: int  # draws from the rest: L - k - (bands)·(band draws); 0 where list bands take them
    lists: tuple[tuple[int, int], ...] = ()  # list bands: ranges [start, stop) of positions in the query's
    # order of the index's lists, together [0, U)
    list_draws: int = 0  # draws per list band

    @property
    def depth(self) -> int:
        """The ranks searched: Z = (source, the depth - 1 nearest)."""
        return self.bands[-1][1] if self.bands else self.k

    @property
    def cuts(self) -> tuple[int, ...]:
        """Where Z's strata meet inside its search (Z = (source, the search's depth - 1 entries)): A takes the
        first k - 1 entries, band [start, stop) the entries [start - 1, stop - 1); only these sets matter, not
        the order within them (a band's draws are uniform over its members)."""
        return tuple(c for c in (self.k - 1, *(stop - 1 for _, stop in self.bands)) if c < self.depth - 1)

    @property
    def width(self) -> int:
        """A's entries and the bands' draws: the kernels whose rows depend on σ."""
        return self.k + len(self.bands) * self.band_draws + len(self.lists) * self.list_draws


def layout(n_unique: int, subset_size: int, lists: bool = False) -> Layout:
    """k = L/2, then bands [k, 4k), [4k, 16k), ..., the last one cut at the depth U/20 (within
    [DEPTH_MIN, DEPTH_MAX], at most U/2), while each of the bands and the rest keeps ≥ DRAWS_MIN of the
    L - k draws (the rest takes the remainder). With lists (an IVF index) and bands, the rest's draws go to
    list bands instead, DRAWS_MIN each (at most LIST_BANDS_MAX bands, the remainder unused): ranges of
    positions [0, 2·depth), then geometric widths to U."""
    k = subset_size // 2
    spare = subset_size - k
    depth = min(n_unique // 2, DEPTH_MAX, max(DEPTH_MIN, n_unique // DEPTH_SHARE))
    stops = [k]
    while stops[-1] < depth and spare // (len(stops) + 1) >= DRAWS_MIN:
        stops.append(min(stops[-1] * BAND_GROWTH, depth))
    bands = tuple(itertools.pairwise(stops))
    per_band = spare // (len(bands) + 1)
    rest = spare - len(bands) * per_band
    if not (lists and bands):
        return Layout(k=k, bands=bands, band_draws=per_band if bands else 0, rest_draws=rest)
    n_lists = min(LIST_BANDS_MAX, rest // DRAWS_MIN)
    first = min(2 * stops[-1], n_unique)
    growth = (n_unique / first) ** (1.0 / max(1, n_lists - 1))
    ends = sorted({min(n_unique, round(first * growth**i)) for i in range(n_lists - 1)} | {n_unique})
    return Layout(k=k, bands=bands, band_draws=per_band, rest_draws=0, lists=tuple(itertools.pairwise([0, *ends])),
                  list_draws=rest // len(ends))


def draw_count(data: KnnData, subset_size: int) -> int:
    """Uniform draws per query (sample indices) at L = subset_size, enough that the rest's draws remain
    outside the searched ranks: L - 1 outside {source} (a σ without search) and L - k outside A (no bands)
    whatever the data (the k largest multiplicities bound what k points hold); with bands the rest holds at
    least N - (the depth largest multiplicities) samples, and the draws are 4× the rest's draws over that
    fraction (a shortfall is still unbiased: the t drawn are weighed by |rest|/t). One when A holds every
    distinct point (the draw falls in A, keeping the shapes)."""
    return draws_needed(data.n_samples, data.n_unique, subset_size, data.most_held, lists=data.lists is not None)


def draws_needed(n_samples: int, n_unique: int, subset_size: int, most_held=lambda k: k, lists: bool = False) -> int:
    """`draw_count` of a data set of n_samples, n_unique distinct, most_held(k) the samples its k most
    repeated points hold (k without duplicates); lists: the index has lists (`layout`)."""
    if subset_size >= n_unique:
        return 1
    lay, n = layout(n_unique, subset_size, lists), n_samples
    need = [subset_size - 1 + most_held(1), subset_size - lay.k + most_held(lay.k)]
    if lay.bands and lay.rest_draws:
        rest = n - most_held(lay.depth)
        need.append(n if rest <= 0 else math.ceil(4 * lay.rest_draws * n / rest))
    return min(n, max(need))


SIGMA_CHUNK = 4  # σ per pass: the distinct rows of their kernels are gathered once (at most 4·width per query)
# The queries of a batch go through in blocks whose gathered rows take at most this many bytes: on a CPU
# large enough that the per-block Python and dispatch work stays small (8 MiB blocks of 28 queries made it
# a third of the time at N = 10 000), their arrays reused from the heap (`heap`); on a GPU the block bounds
# the memory (three arrays of this size) whatever D.
BLOCK_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
SEARCH_ROWS = 4096  # queries per index search at most (a torch search holds a (rows, 16 384) block)
SEARCH_IDS = 1 << 22  # neighbour ids per index search at most (1 024 rows at depth 4 096, 64 at 65 536)


def search_rows(depth: int) -> int:
    """Queries per index search to this depth: SEARCH_ROWS, fewer where their ids would pass SEARCH_IDS."""
    return max(1, min(SEARCH_ROWS, SEARCH_IDS // depth))


@dataclass
class Strata:
    """Every query's kernels at every σ of a batch (module docstring, steps 1-2).

    R: (B, S, width) the distinct points of A (the first k; the source first) and of the bands' draws;
    valid: (B, S, width) which of them count (a search's repeats and misses, an unsearched σ's padding do
    not); factor: (B, S, 3, width) their weights in half 1, half 2 and both halves (A: 1; a band's draw
    |band|/(its draws in that half)); in_top: (B, S, n_draw) whether a query's uniform draw lies in the
    searched ranks (or A), outside the rest; n_rest: (B, S) float64 the rest's samples; rest_draws (S,)
    long, the draws from the rest; cv (S,) bool, whether the rest's draws get the control variate (the
    rest is everything outside A: no bands).
    """

    R: torch.Tensor
    valid: torch.Tensor
    factor: torch.Tensor
    in_top: torch.Tensor
    n_rest: torch.Tensor
    rest_draws: torch.Tensor
    cv: torch.Tensor

    def rows(self, blk: slice) -> Strata:
        return Strata(self.R[blk], self.valid[blk], self.factor[blk], self.in_top[blk], self.n_rest[blk],
                      self.rest_draws, self.cv)


def knn_terms(data: KnnData, xs_idx: torch.Tensor, eps: torch.Tensor, sigmas, *, subset_size: int,
              draws: torch.Tensor, band_seeds: np.ndarray) -> torch.Tensor:
    """Per-query channels (cross, plain - cross, Richardson - cross) for every σ: (B, 3, S) float64.

    xs_idx: (B,) distinct-sample index of each query's source; eps: (B, D) its noise ((B, 2D) for a
    mixture: z then ε); draws: (B, draw_count) each query's uniform sample of sample indices, without
    replacement; band_seeds: (B,) each query's seed of its band draws (`queries.BAND_STREAM`).
    L = subset_size; from L >= U distinct points on, A holds all of them: the rest is empty and every
    query is the exact one.

    The work is shaped as gathers and GEMMs: the candidates' rows and their σ-independent terms once per
    block of queries, the neighbour ranks of all searched σ in a few searches, and per chunk of σ the
    distinct rows of their kernels gathered once; every sum of a σ (weighted and plain, per half) is one
    batched product of stacked weight rows with the rows [1, q, q²] and f (`_chunk_terms`).
    """
    B, dev = eps.shape[0], eps.device
    C = data.inverse[draws.to(data.inverse.device)].to(dev)  # (B, n_draw): the distinct points of the draws
    sig = np.asarray(sigmas, dtype=np.float64).tolist()
    xs = take_rows(data.points, xs_idx, dev)  # (B, D): the sources (a mixture: their components' means)
    x0, e = _query_points(data, xs, xs_idx, eps)
    if subset_size >= data.n_unique:
        strata = _everything(data, B, len(sig), C)
    else:
        strata = _strata_of_grid(data, layout(data.n_unique, subset_size, data.lists is not None), x0, e, xs_idx,
                                 C, sig, band_seeds, subset_size)
    row_bytes = ((min(len(sig), SIGMA_CHUNK) * strata.R.shape[2] + C.shape[1])
                 * data.points.shape[1] * data.points.element_size())
    step = max(1, BLOCK_BYTES.get(dev.type, BLOCK_BYTES["cuda"]) // row_bytes)
    out = torch.empty(B, 3, len(sig), dtype=torch.float64, device=dev)
    for b0 in range(0, B, step):
        blk = slice(b0, min(B, b0 + step))
        out[blk] = _block_terms(data, xs[blk], x0[blk], e[blk], sig, C[blk], strata.rows(blk))
    return out


def _everything(data: KnnData, B: int, S: int, C: torch.Tensor) -> Strata:
    """L >= U: A holds every distinct point, the rest is empty."""
    U, dev = data.n_unique, C.device
    return Strata(R=torch.arange(U, device=dev).expand(B, S, U), valid=torch.ones(B, S, U, dtype=torch.bool, device=dev),
                  factor=torch.ones(B, S, 3, U, dtype=data.mult.dtype, device=dev),
                  in_top=torch.ones(B, S, C.shape[1], dtype=torch.bool, device=dev),
                  n_rest=torch.zeros(B, S, dtype=torch.float64, device=dev),
                  rest_draws=torch.zeros(S, dtype=torch.long, device=dev), cv=torch.ones(S, dtype=torch.bool, device=dev))


def _strata_of_grid(data: KnnData, lay: Layout, x0, e, xs_idx, C, sig: list[float], band_seeds, subset_size: int) -> Strata:
    """The kernels of every σ: at a searched σ the ranks of its queries (all such σ together, SEARCH_IDS ids
    per search at most) give A, the bands' draws (where `banded`; else A and the rest only) and the searched
    set; at a σ without search A = {source} and the rest, everything else, gets the L - 1 draws."""
    B, S, dev, N = len(xs_idx), len(sig), xs_idx.device, data.n_samples
    R = xs_idx[:, None, None].expand(B, S, lay.width).clone()
    valid = torch.zeros(B, S, lay.width, dtype=torch.bool, device=dev)
    valid[:, :, 0] = True
    factor = torch.ones(B, S, 3, lay.width, dtype=data.mult.dtype, device=dev)
    in_top = (C == xs_idx[:, None])[:, None].expand(B, S, -1).clone()
    n_rest = (N - data.mult[xs_idx].double())[:, None].expand(B, S).clone()
    rest_draws = torch.full((S,), subset_size - 1, dtype=torch.long, device=dev)
    cv = torch.ones(S, dtype=torch.bool, device=dev)
    on = [i for i, sigma in enumerate(sig) if searched(data, sigma)]
    deep = [i for i in on if (lay.bands or lay.lists) and banded(data, sig[i], lay.k)]
    shallow = Layout(k=lay.k, bands=(), band_draws=0, rest_draws=subset_size - lay.k)
    for group, g_lay in ((deep, lay), ([i for i in on if i not in deep], shallow)):
        if not group:
            continue
        rest_draws[group], cv[group] = g_lay.rest_draws, not (g_lay.bands or g_lay.lists)
        widths = [stop - start for start, stop in g_lay.bands] + [UNIT] * len(g_lay.lists)
        sizes = [g_lay.band_draws] * len(g_lay.bands) + [g_lay.list_draws] * len(g_lay.lists)
        pos, taken = uniform_subsets(band_seeds, len(group), widths, sizes)  # (B, σ, bands, draws)
        pos, taken = (t.to(dev).transpose(0, 1).reshape(len(group) * B, len(widths), t.shape[-1])
                      for t in (pos, taken))
        y, src, Cs = torch.cat([x0 + sig[i] * e for i in group]), xs_idx.repeat(len(group)), C.repeat(len(group), 1)
        step = search_rows(g_lay.depth)
        parts = [_ranked(data, g_lay, y[r], src[r], Cs[r], pos[r], taken[r])
                 for r in (slice(i, i + step) for i in range(0, len(y), step))]
        w = g_lay.width
        for target, got in zip((R[..., :w], valid[..., :w], factor[..., :w], in_top, n_rest),
                               map(torch.cat, zip(*parts))):
            target[:, group] = got.view(len(group), B, *got.shape[1:]).transpose(0, 1)
    return Strata(R, valid, factor, in_top, n_rest, rest_draws, cv)


def _ranked(data: KnnData, lay: Layout, y, src, C, pos, taken):
    """One search's queries (rows): Z = (source, the depth - 1 nearest), an entry valid unless it is missing
    (-1) or the source again (an index returns distinct ids); A = Z's first k, each band's draws at the drawn
    positions of its ranks; which of the query's uniform draws lie in the searched set (Z's valid entries);
    the rest's samples."""
    ids = data.index.search(y, lay.depth - 1, cuts=lay.cuts)
    valid = torch.cat([torch.ones_like(src[:, None], dtype=torch.bool), (ids >= 0) & (ids != src[:, None])], 1)
    Z = torch.cat([src[:, None], ids.clamp_min(0)], 1)
    n_rest = data.n_samples - (data.mult[Z] * valid).sum(1, dtype=torch.float64)
    # the uniform draws outside Z are the rest's; with list bands the rest is empty
    in_top = _hits(C, Z.masked_fill(~valid, -1)) if lay.rest_draws else torch.ones_like(C, dtype=torch.bool)
    R, V = [Z[:, :lay.k]], [valid[:, :lay.k]]
    F = [torch.ones(len(Z), 3, lay.k, dtype=data.mult.dtype, device=Z.device)]
    d = lay.band_draws
    for b, (start, stop) in enumerate(lay.bands):
        at = start + pos[:, b, :d]
        R.append(Z.gather(1, at))
        V.append(valid.gather(1, at) & taken[:, b, :d])
        F.append(_draw_factors(taken[:, b, :d], float(stop - start)).to(data.mult.dtype))
    if lay.lists:
        nb, d = len(lay.bands), lay.list_draws
        r, v, f = _list_draws(data.lists, lay, y, Z, valid, pos[:, nb:, :d])
        R.append(r)
        V.append(v)
        F.append(f.to(data.mult.dtype))
    return torch.cat(R, 1), torch.cat(V, 1), torch.cat(F, 2), in_top, n_rest


def _list_draws(lists: Lists, lay: Layout, y, Z, valid, pos):
    """The list bands' draws (module docstring, step 3), band after band: (Q, n) drawn points, whether each
    counts and (Q, 3, n) their weights in half 1, half 2 and both. The query's positions are its lists'
    points in order of the lists' centroid distance to y (nearest first; a list's points in their stored
    order); a band's draws are uniform, with replacement, over its positions outside Z (pos: uniform
    integers of range(UNIT); a sample of t distinct ones out of t + 16 is never short at that width), each
    weighing (the band's points outside Z) / (the draws in its half): a fixed number in each half, so no
    half is ever empty."""
    Q, n_lists, dev = len(y), len(lists.size), y.device
    c = lists.centroids
    order = ((c * c).sum(1)[None, :] - 2.0 * (y.double() @ c.T)).argsort(dim=1, stable=True)  # nearest list first
    size = lists.size[order]
    first = size.cumsum(1) - size  # (Q, lists): each ranked list's first position
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_lists, device=dev).expand(Q, -1))
    z_pos = first.gather(1, rank.gather(1, lists.list_of[Z])) + lists.slot[Z]  # (Q, depth): Z's positions
    z_pos = _sorted_rows(z_pos.masked_fill(~valid, len(lists.ids) + Z.shape[1]))  # invalid ones last
    gaps = z_pos - torch.arange(Z.shape[1], device=dev)  # nondecreasing: Z's positions below each, removed
    starts = torch.tensor([start for start, _ in lay.lists], device=dev)[None, :].expand(Q, -1).contiguous()
    stops = torch.tensor([stop for _, stop in lay.lists], device=dev)[None, :].expand(Q, -1).contiguous()
    free_start = starts - torch.searchsorted(z_pos, starts)  # free (outside Z) positions before each band
    free = stops - torch.searchsorted(z_pos, stops) - free_start  # (Q, bands): the band's points outside Z
    u = (pos.double() + 0.5) / UNIT  # (Q, bands, draws) uniform in (0, 1)
    r = free_start[..., None] + (u * free[..., None]).long().clamp_max((free[..., None] - 1).clamp_min(0))
    r = r.view(Q, -1)
    at = r + torch.searchsorted(gaps, r, right=True)  # the r-th position outside Z
    j = torch.searchsorted(first, at, right=True) - 1  # the ranked list holding it
    points = lists.ids[lists.start[order.gather(1, j)] + at - first.gather(1, j)].view(pos.shape)
    t = pos.shape[2]
    h = t // 2
    half1 = torch.arange(t, device=dev) < h
    n_free = free[..., None].double().expand(-1, -1, t)  # (Q, bands, draws)
    f = torch.stack([torch.where(half1, n_free / h, 0.0), torch.where(half1, 0.0, n_free / (t - h)), n_free / t], 1)
    return points.view(Q, -1), (n_free > 0).view(Q, -1), f.view(Q, 3, -1)


UNIT = 1 << 31  # a list band's draws are uniform integers of range(UNIT), read as (i + 1/2) / UNIT


def _sorted_rows(t: torch.Tensor) -> torch.Tensor:
    """t's rows sorted, values only: numpy's sort on the CPU (5.6x faster than torch's on (262, 16 000) int64
    rows, one thread), torch's on a GPU."""
    return torch.from_numpy(np.sort(t.numpy(), axis=1)) if t.device.type == "cpu" else t.sort(1).values


def _hits(C: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """(rows, n) whether each of C's (rows, n) values (≥ 0) occurs in its row of Z (rows, depth): Z's entries
    looked up in the sorted C (C is short, Z long: no sort of Z)."""
    sc, perm = C.sort(1)
    at = torch.searchsorted(sc, Z).clamp_(max=sc.shape[1] - 1)
    hit = sc.gather(1, at) == Z
    found = torch.zeros(sc.shape, dtype=torch.int32, device=C.device).scatter_add_(1, at, hit.to(torch.int32)) > 0
    # a value repeated in C: the search lands on its first copy; its later copies take the first's answer
    first = torch.ones_like(found)
    first[:, 1:] = sc[:, 1:] != sc[:, :-1]
    start = torch.where(first, torch.arange(sc.shape[1], device=C.device), 0).cummax(1).values
    found = found.gather(1, start)
    return torch.empty_like(found).scatter_(1, perm, found)


def _draw_factors(taken: torch.Tensor, size) -> torch.Tensor:
    """(rows, 3, n) float64 weights of ordered draws from a stratum of `size` (per row, or one for all):
    the first t//2 taken are half 1, the other taken half 2; weight size/(draws in the half) in that half,
    size/t in both halves. A stratum drawn whole (t = size) is known: weight 1 everywhere, both halves alike."""
    t = taken.sum(-1, keepdim=True).double()
    half = torch.div(t, 2, rounding_mode="floor")
    h1 = taken & (taken.cumsum(-1) <= half)
    h2 = taken & ~h1
    size = torch.as_tensor(size, dtype=torch.float64, device=taken.device)
    size = size[..., None] if size.dim() else size
    whole = t >= size
    f1 = torch.where(whole, taken.double(), h1 * (size / half.clamp_min(1.0)))
    f2 = torch.where(whole, taken.double(), h2 * (size / (t - half).clamp_min(1.0)))
    fu = torch.where(whole, taken.double(), taken * (size / t.clamp_min(1.0)))
    return torch.stack([f1, f2, fu], -2)


def _query_points(data: KnnData, xs: torch.Tensor, xs_idx: torch.Tensor, eps: torch.Tensor):
    """(x0, ε) of queries y = x0 + σε: x0 the source xs (a mixture: its component's mean plus its std times
    z), ε the noise (a mixture's second half of eps)."""
    if data.stds is None:
        return xs, eps
    z, e = query_noise(eps)
    return xs + take_rows(data.stds, xs_idx, eps.device) * z, e


def _rest_factors(st: Strata) -> torch.Tensor:
    """(B, S, 3, n_draw) weights of the query's uniform draws: the first rest_draws outside the searched
    ranks are the rest's draws (`_draw_factors`, the rest's size in samples; each drawn sample counts once)."""
    free = ~st.in_top
    rank = free.cumsum(2)
    n_take = torch.minimum(st.rest_draws[None, :, None].expand_as(rank[..., :1]), rank[..., -1:])
    return _draw_factors(free & (rank <= n_take), st.n_rest)


def _block_terms(data: KnnData, xs: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sig: list[float],
                 C: torch.Tensor, st: Strata) -> torch.Tensor:
    """`knn_terms` of a block of queries y = x0 + σε: their sources xs (B, D) (a mixture: the components'
    means, the reference of f), each query's candidates C (B, n_draw) and kernels `st`."""
    P, mixture = data.points, data.stds is not None
    B, dev = eps.shape[0], eps.device
    S, width = st.R.shape[1:]
    xs64 = xs.double()
    ys = [x0 + sigma * eps for sigma in sig]
    multR = data.mult[st.R] * st.valid  # (B, S, width)
    FC = _rest_factors(st).to(data.mult.dtype)  # (B, S, 3, n_draw)

    out = torch.empty(B, 3, S, dtype=torch.float64, device=dev)
    if mixture:
        PC, SC = take_rows(P, C, dev), take_rows(data.stds, C, dev)  # (B, n_draw, D)
        for i, sigma in enumerate(sig):
            lgR, fR, qR = component_terms(ys[i], xs, take_rows(P, st.R[:, i], dev),
                                          take_rows(data.stds, st.R[:, i], dev), sigma)
            lgC, fC, qC = component_terms(ys[i], xs, PC, SC, sigma)
            tot_f, tot_q = total_f_q(data.totals(sigma), ys[i], xs)

            def vectors(wR, wC, fR=fR, fC=fC):  # (B, 1, 4, width), (B, 1, 6, n_draw) -> (B, 1, 10, D) float64
                return torch.cat([torch.bmm(wR[:, 0], fR), torch.bmm(wC[:, 0], fC)], 1)[:, None].double()
            one = slice(i, i + 1)
            out[:, :, one] = _chunk_terms(lgR[:, None], qR[:, None], multR[:, one], st.valid[:, one],
                                          st.factor[:, one], lgC[:, None], qC[:, None], FC[:, one],
                                          st.cv[one], tot_f[:, None], tot_q[:, None], vectors)
        return out

    # the candidates' σ-independent terms: q = ||x_c - x_s||², ex = ε·(x_c - x_s)
    fC = take_rows(P, C, dev) - xs[:, None]  # (B, n_draw, D)
    qC, exC = (fC * fC).sum(-1), (eps[:, None] * fC).sum(-1)

    def vectors_c(wC):  # Σ_c w_c f_c for every weight row of the chunk: one batched product
        b, s, r, n = wC.shape
        return torch.bmm(wC.reshape(b, s * r, n), fC).view(b, s, r, -1).double()
    N = float(data.n_samples)
    tot_f = (data.sum_x[None, :] - N * xs64)[:, None]  # Σ_all m f, (B, 1, D)
    tot_q = (data.sum_sq - 2.0 * (xs64 @ data.sum_x) + N * (xs64 * xs64).sum(1))[:, None]  # Σ_all m q, (B, 1)
    for c0 in range(0, S, SIGMA_CHUNK):
        ch = slice(c0, min(S, c0 + SIGMA_CHUNK))
        s_ch = torch.tensor(sig[ch], dtype=xs.dtype, device=dev)[None, :, None]  # (1, s, 1)
        rows, pos = _distinct(st.R[:, ch].reshape(B, -1))  # the chunk's distinct kernel rows (B, r)
        fD = take_rows(P, rows, dev) - xs[:, None]  # (B, r, D), direct differences: exact small distances
        qD, exD = (fD * fD).sum(-1), (eps[:, None] * fD).sum(-1)
        pos = pos.view(B, -1, width)  # (B, s, width)
        qR = qD[:, None, :].expand(-1, pos.shape[1], -1).gather(2, pos)
        exR = exD[:, None, :].expand(-1, pos.shape[1], -1).gather(2, pos)
        lgR = (qR - (2.0 * s_ch) * exR) * (-0.5 / s_ch**2)
        lgC = (qC[:, None] - (2.0 * s_ch) * exC[:, None]) * (-0.5 / s_ch**2)

        def vectors(wR, wC, pos=pos, fD=fD):  # (B, s, 4, width), (B, s, 6, n_draw) -> (B, s, 10, D) float64
            b, s, r = wR.shape[:3]
            onto = torch.zeros(b, s, r, fD.shape[1], dtype=wR.dtype, device=dev)
            onto.scatter_add_(3, pos[:, :, None, :].expand(-1, -1, r, -1), wR)  # the weights onto their rows
            vR = torch.bmm(onto.view(b, s * r, -1), fD).view(b, s, r, -1).double()
            return torch.cat([vR, vectors_c(wC)], 2)
        out[:, :, ch] = _chunk_terms(lgR, qR, multR[:, ch], st.valid[:, ch], st.factor[:, ch], lgC, qC[:, None],
                                     FC[:, ch], st.cv[ch], tot_f, tot_q, vectors)
    return out


def _distinct(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of each row of (B, n) indices, ascending and padded with the row's largest:
    (B, r), and each entry's position among them: (B, n)."""
    s, perm = idx.sort(1)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = first.cumsum(1) - 1  # (B, n): the sorted entries' positions among the distinct values
    rows = s[:, -1:].expand(-1, int(slot[:, -1].max()) + 1).clone()
    rows.scatter_(1, slot, s)
    return rows, torch.empty_like(slot).scatter_(1, perm, slot)


def _chunk_terms(lgR, qR, multR, validR, FR, lgC, qC, FC, cv, tot_f, tot_q, vectors) -> torch.Tensor:
    """The channels (B, 3, s) of a chunk of s σ (the estimator of the module docstring).

    lgR, qR, multR, validR: (B, s, width) the σ-dependent kernels' logits, q, multiplicities (0 where
    invalid) and validity, FR (B, s, 3, width) their weights per estimate (half 1, half 2, both);
    lgC, qC: the uniform draws' logits (B, s, n_draw) and q (B, 1, n_draw), FC (B, s, 3, n_draw) their
    weights (0: not drawn for the rest); cv (s,): whether the rest gets the control variate; tot_f (B, ·, D),
    tot_q (B, ·): Σ_all m f, Σ_all m q; vectors(wR (B, s, 4, width), wC (B, s, 6, n_draw)): the weighted sums
    of f, (B, s, 10, D) float64.
    """
    lgR = lgR.masked_fill(~validR, -torch.inf)
    m = torch.maximum(lgR.amax(2), lgC.masked_fill(FC[:, :, 2] == 0, -torch.inf).amax(2))[..., None]
    wR = multR * torch.exp(lgR - m)  # (B, s, width), 0 where invalid
    eC = torch.exp(lgC - m)  # each drawn sample counts once
    wR4 = torch.cat([FR * wR[:, :, None], multR[:, :, None]], 2)  # (B, s, 4, width)
    wC6 = torch.cat([FC * eC[:, :, None], FC], 2)  # (B, s, 6, n_draw)
    # scalar sums in float64: the kernels' [Σ F w, Σ F w q] per estimate and [Σ m, Σ m q]; the rest's draws'
    # [Σ F w, Σ F w q, Σ F w q²] and [Σ F, Σ F q, Σ F q²] per estimate
    sR = wR4.double() @ torch.stack([torch.ones_like(qR), qR], 3).double()  # (B, s, 4, 2)
    qC64 = qC.double()
    sC = wC6.double() @ torch.stack([torch.ones_like(qC64), qC64, qC64 * qC64], 3)  # (B, s, 6, 3)
    V = vectors(wR4, wC6)  # (B, s, 10, D): Σ F w f per estimate, Σ m f (kernels); Σ F w f, Σ F f (rest)
    T_f = tot_f - V[:, :, 3]  # the rest's Σ m f and Σ m q when the kernels are A (no bands)
    T_q = tot_q - sR[..., 3, 1]
    cv = cv[None, :].double()

    deltas, Qs = [], []
    for j in range(3):
        (w, wq, wq2), (m_, mq, mq2) = sC[:, :, j].unbind(-1), sC[:, :, 3 + j].unbind(-1)
        wf, mf = V[:, :, 4 + j], V[:, :, 7 + j]
        drawn = m_ > 0  # none drawn: the rest is empty (A holds every point), its terms are 0
        e_bar = torch.where(drawn, w / torch.where(drawn, m_, 1.0), 0.0)
        beta = cv * _shrinkage(wq / w - _sq(wf / w[..., None]), mq / m_ - _sq(mf / m_[..., None]), w)
        beta_q = cv * _shrinkage(wq2 / w - (wq / w) ** 2, mq2 / m_ - (mq / m_) ** 2, w)
        den = sR[:, :, j, 0] + w
        deltas.append((V[:, :, j] + wf + (beta * e_bar)[..., None] * (T_f - mf)) / den[..., None])
        Qs.append((sR[:, :, j, 1] + wq + beta_q * e_bar * (T_q - mq)) / den)
    d1, d2, d = deltas
    Q = Qs[2]
    cross = Q - (d1 * d2).sum(-1)
    plain = Q - _sq(d)
    rich = Q - 2.0 * _sq(d) + 0.5 * (_sq(d1) + _sq(d2))
    return torch.stack([cross, plain - cross, rich - cross], 1)


def _sq(v: torch.Tensor) -> torch.Tensor:
    return (v * v).sum(-1)


def _shrinkage(var_weighted: torch.Tensor, var_plain: torch.Tensor, w_total: torch.Tensor) -> torch.Tensor:
    """β = min(BETA_MAX, weighted / unweighted variance), 0 where it is undefined (no mass, no spread)."""
    ok = (w_total > 0) & (var_plain > 0)
    ratio = torch.where(ok, var_weighted.clamp_min(0.0) / torch.where(ok, var_plain, 1.0), 0.0)
    return ratio.clamp(max=BETA_MAX)
