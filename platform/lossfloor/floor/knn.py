"""The query-nearest-neighbour estimator of J*(σ) (`--estimator knn`), with a control variate and
cross-fitting (docs/estimators.md; the kNN-proposal idea of Niedoba et al., ICML 2024,
arXiv 2402.08018, applied to the optimal loss).

Per query (source s, y = x_s + σε) the posterior over the N samples is estimated from L kernels:

1. A = {s} ∪ the k - 1 nearest distinct samples of y from a neighbour index (k = L/2). A may be any
   deterministic function of (s, y): an approximate index lowers efficiency, never validity. Where the
   kernel is flat enough that neighbours no longer help (`searched`: √(2D)·s_x/σ ≤ 2, s_x the distinct
   points' per-coordinate standard deviation), there is no search: A = {s}, k = 1, and the L - 1 others
   are drawn.
2. U = L - k samples drawn uniformly, without replacement, from the samples of the rest (B: the samples
   whose distinct point is not in A; a duplicated point is drawn as often as it occurs, so the draw
   follows the data's mass, not its distinct points), split into halves U₁, U₂. Each query brings its own
   uniform ordered sample of `draw_count` of the N samples, drawn without replacement from (seed, its
   source, its round) only (`queries`), and takes the first L - k of it that are not in its A.
3. With f_n = x_n - x_s, q_n = ||f_n||², multiplicities m_n (duplicates are merged and carried as weights
   in A; a drawn sample counts once) and kernels w_n = m_n exp(ℓ_n - max), ℓ_n = -||y - x_n||²/2σ²: for
   each half j, λ_j = |B|/|U_j| (in samples; 0 when B is empty: A then holds every point and the query
   is exact) and

       δ_j = [Σ_A w f + λ_j Σ_{U_j} w f + β_j ē_j (T_f - λ_j Σ_{U_j} m f)] / [Σ_A w + λ_j Σ_{U_j} w]
       Q_j = [Σ_A w q + λ_j Σ_{U_j} w q + β'_j ē_j (T_q - λ_j Σ_{U_j} m q)] / [Σ_A w + λ_j Σ_{U_j} w]

   where T_f = Σ_B m f and T_q = Σ_B m q are known exactly (from the data's sums), ē_j = Σ_{U_j} w / Σ_{U_j} m
   is the mean kernel, and the control-variate coefficients shrink with how concentrated the weights
   are: β = min(4, weighted variance of f over U_j / unweighted variance), β' the same for q
   (→ 1 for flat weights, exact as σ → ∞; → 0 when a few close points carry the posterior).
4. δ estimates x_s - E[x0|y] up to sign, Q the posterior mean of ||x - x_s||². The query's term is the
   posterior variance Q - ⟨δ₁, δ₂⟩ (cross-fitted: the product of independent halves removes the
   +tr Var(δ̂) bias of ||δ̂||²), with Q and δ from U₁ ∪ U₂ where a single estimate is needed.

Self-check from the same kernels: plain Q - ||δ||² and Richardson Q - (2||δ||² - ½(||δ₁||² + ||δ₂||²)).
The spread of {cross-fitted, plain, Richardson} bounded the true error in every measured case; it is the
estimator's bias allowance (`lossfloor.floor.uncertainty`). The batch returns channels
(cross, plain - cross, Richardson - cross) per σ.

A Gaussian mixture (posterior latents) runs the same estimator with each component's kernel, posterior
mean and variance (`lossfloor.floor.mixture`): f_n = μ_n(y) - m_s, q_n = Σ v_n + ||f_n||², neighbours
searched among the component means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lossfloor.data.duplicates import groups, row_keys
from lossfloor.data.node_cache import read_only_tensor
from lossfloor.floor.kernel import take_rows
from lossfloor.floor.mixture import component_terms, mixture_totals, query_noise, split_rows, total_f_q
from lossfloor.floor.neighbours import NeighbourIndex, build_index

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
    _most_held: tuple[int, int] | None = None
    _coordinate_std: float | None = None

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

    def most_held(self, k: int) -> int:
        """The samples that k distinct points can hold at most: the sum of the k largest multiplicities."""
        if self._most_held is None or self._most_held[0] != k:
            self._most_held = (k, int(torch.topk(self.mult, min(k, self.n_unique)).values.sum()))
        return self._most_held[1]


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


def neighbour_sets(data: KnnData, y: torch.Tensor, src: torch.Tensor, k: int):
    """A per query: (B, k) point indices, the source first, and a (B, k) mask of valid entries.

    The k - 1 nearest distinct samples of y other than the source; repeats that an approximate index may
    return are masked out (A is then smaller; the estimator accounts for |A| per query). The queries of all
    σ of a batch come in one call (one index search).
    """
    nbr = data.index.search(y, k)  # (B, k)
    take = nbr != src[:, None]
    order = torch.argsort((~take).to(torch.int8), dim=1, stable=True)[:, : k - 1]  # non-source first
    others = nbr.gather(1, order)  # (B, k-1)
    A = torch.cat([src[:, None], others], 1)  # (B, k)
    valid = torch.ones_like(A, dtype=torch.bool)
    valid[:, 1:] = take.gather(1, order)  # a row with k non-source neighbours keeps k-1 of them
    if k > 1:
        sorted_a, pos = A.masked_fill(~valid, -1).sort(1)
        dup = torch.zeros_like(valid)
        dup.scatter_(1, pos[:, 1:], (sorted_a[:, 1:] == sorted_a[:, :-1]) & (sorted_a[:, 1:] >= 0))
        valid &= ~dup
    return A, valid


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


def draw_count(data: KnnData, subset_size: int) -> int:
    """Uniform draws per query (sample indices) at L = subset_size: enough that L - k remain outside any A
    (A's k points hold at most the samples of the k largest multiplicities: k without duplicates); one
    when A holds every distinct point (the draw falls in A, keeping the shapes). It also leaves L - 1
    outside A = {source} at a σ without search (the k largest multiplicities exceed the largest by ≥ k - 1)."""
    if subset_size >= data.n_unique:
        return 1
    k = subset_size // 2
    return min(data.n_samples, subset_size - k + data.most_held(k))


SIGMA_CHUNK = 4  # σ per pass: the distinct rows of their A sets are gathered once (at most 4k per query)
# The queries of a batch go through in blocks whose gathered rows take at most this many bytes: on a CPU
# large enough that the per-block Python and dispatch work stays small (8 MiB blocks of 28 queries made it
# a third of the time at N = 10 000), their arrays reused from the heap (`heap`); on a GPU the block bounds
# the memory (three arrays of this size) whatever D.
BLOCK_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
SEARCH_ROWS = 4096  # queries per index search at most (a torch search holds a (rows, 16 384) block)


def knn_terms(data: KnnData, xs_idx: torch.Tensor, eps: torch.Tensor, sigmas, *, subset_size: int,
              draws: torch.Tensor) -> torch.Tensor:
    """Per-query channels (cross, plain - cross, Richardson - cross) for every σ: (B, 3, S) float64.

    xs_idx: (B,) distinct-sample index of each query's source; eps: (B, D) its noise ((B, 2D) for a
    mixture: z then ε); draws: (B, draw_count) each query's uniform sample of sample indices, without
    replacement. L = subset_size; from L >= U distinct points on, A holds all of them: B is empty and
    every query is the exact one.

    The work is shaped as gathers and GEMMs: the candidates' rows and their σ-independent terms once per
    block of queries, the neighbour sets of all searched σ in one search, and per chunk of σ the distinct rows of
    those sets gathered once; every sum of a σ (A's and both halves', weighted and plain) is one batched
    product of stacked weight rows with the rows [1, q, q²] and f (`_chunk_terms`).
    """
    B, dev = eps.shape[0], eps.device
    everything = subset_size >= data.n_unique
    k = data.n_unique if everything else subset_size // 2
    C = data.inverse[draws.to(data.inverse.device)].to(dev)  # (B, n_draw): the distinct points of the draws
    n_draw = C.shape[1]
    row_bytes = (min(len(sigmas), SIGMA_CHUNK) * k + n_draw) * data.points.shape[1] * data.points.element_size()
    step = max(1, BLOCK_BYTES.get(dev.type, BLOCK_BYTES["cuda"]) // row_bytes)
    sig = np.asarray(sigmas, dtype=np.float64).tolist()
    xs = take_rows(data.points, xs_idx, dev)  # (B, D): the sources (a mixture: their components' means)
    x0, e = _query_points(data, xs, xs_idx, eps)
    if everything:
        A = torch.arange(k, device=dev).expand(B, len(sig), -1)  # (B, S, U)
        validA = torch.ones_like(A, dtype=torch.bool)
    else:
        A, validA = _neighbour_sets_of_grid(data, x0, e, xs_idx, sig, k)
    n_u = torch.full((len(sig),), subset_size - k, device=dev)  # uniform draws per σ: L - 1 without search
    if not everything:
        n_u[torch.tensor([not searched(data, sigma) for sigma in sig], device=dev)] = subset_size - 1
    out = torch.empty(B, 3, len(sig), dtype=torch.float64, device=dev)
    for b0 in range(0, B, step):
        blk = slice(b0, min(B, b0 + step))
        out[blk] = _block_terms(data, xs[blk], x0[blk], e[blk], sig, C[blk], A[blk], validA[blk], n_u=n_u)
    return out


def _neighbour_sets_of_grid(data: KnnData, x0, e, xs_idx, sig: list[float], k: int):
    """A and its validity (B, S, k) for every σ: the queries of the searched σ in one search, SEARCH_ROWS
    at a time; at a σ without search A = {source} (the other k - 1 entries invalid)."""
    B, S = len(xs_idx), len(sig)
    A = xs_idx[:, None, None].expand(B, S, k).clone()
    validA = torch.zeros(B, S, k, dtype=torch.bool, device=xs_idx.device)
    validA[:, :, 0] = True
    on = [i for i, sigma in enumerate(sig) if searched(data, sigma)]
    if on:
        y, src = torch.cat([x0 + sig[i] * e for i in on]), xs_idx.repeat(len(on))
        step_y = max(B, SEARCH_ROWS)
        a, v = map(torch.cat, zip(*(neighbour_sets(data, y[i:i + step_y], src[i:i + step_y], k)
                                    for i in range(0, len(y), step_y))))
        A[:, on], validA[:, on] = a.view(len(on), B, k).transpose(0, 1), v.view(len(on), B, k).transpose(0, 1)
    return A, validA


def _query_points(data: KnnData, xs: torch.Tensor, xs_idx: torch.Tensor, eps: torch.Tensor):
    """(x0, ε) of queries y = x0 + σε: x0 the source xs (a mixture: its component's mean plus its std times
    z), ε the noise (a mixture's second half of eps)."""
    if data.stds is None:
        return xs, eps
    z, e = query_noise(eps)
    return xs + take_rows(data.stds, xs_idx, eps.device) * z, e


def _block_terms(data: KnnData, xs: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sig: list[float],
                 C: torch.Tensor, A: torch.Tensor, validA: torch.Tensor, *, n_u: torch.Tensor) -> torch.Tensor:
    """`knn_terms` of a block of queries y = x0 + σε: their sources xs (B, D) (a mixture: the components'
    means, the reference of f), each query's candidates C (B, n_draw), neighbour sets A and their validity
    (B, S, k)."""
    P, mixture = data.points, data.stds is not None
    B, dev = eps.shape[0], eps.device
    S, k = A.shape[1:]
    xs64 = xs.double()
    ys = [x0 + sigma * eps for sigma in sig]
    multA = data.mult[A] * validA  # (B, S, k)
    n_b = data.n_samples - multA.sum(2).round().long()  # |B| per query and σ, in samples
    inA = _members(C, A, validA)  # (B, S, n_draw)

    out = torch.empty(B, 3, S, dtype=torch.float64, device=dev)
    if mixture:
        PC, SC = take_rows(P, C, dev), take_rows(data.stds, C, dev)  # (B, n_draw, D)
        for i, sigma in enumerate(sig):
            lgA, fA, qA = component_terms(ys[i], xs, take_rows(P, A[:, i], dev), take_rows(data.stds, A[:, i], dev),
                                          sigma)
            lgC, fC, qC = component_terms(ys[i], xs, PC, SC, sigma)
            tot_f, tot_q = total_f_q(data.totals(sigma), ys[i], xs)

            def vectors(wA, wC, fA=fA, fC=fC):  # (B, 1, 2, k), (B, 1, 4, n_draw) -> (B, 1, 6, D) float64
                return torch.cat([torch.bmm(wA[:, 0], fA), torch.bmm(wC[:, 0], fC)], 1)[:, None].double()
            out[:, :, i:i + 1] = _chunk_terms(lgA[:, None], qA[:, None], multA[:, i:i + 1], validA[:, i:i + 1],
                                              lgC[:, None], qC[:, None], inA[:, i:i + 1], n_b[:, i:i + 1],
                                              tot_f[:, None], tot_q[:, None], vectors, n_u[i:i + 1])
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
        rows, pos = _distinct(A[:, ch].reshape(B, -1))  # the chunk's distinct A rows (B, r), A -> rows
        fR = take_rows(P, rows, dev) - xs[:, None]  # (B, r, D), direct differences: exact small distances
        qR, exR = (fR * fR).sum(-1), (eps[:, None] * fR).sum(-1)
        pos = pos.view(B, -1, k)  # (B, s, k)
        qA = qR[:, None, :].expand(-1, pos.shape[1], -1).gather(2, pos)
        exA = exR[:, None, :].expand(-1, pos.shape[1], -1).gather(2, pos)
        lgA = (qA - (2.0 * s_ch) * exA) * (-0.5 / s_ch**2)
        lgC = (qC[:, None] - (2.0 * s_ch) * exC[:, None]) * (-0.5 / s_ch**2)

        def vectors(wA, wC, pos=pos, fR=fR):  # (B, s, 2, k), (B, s, 4, n_draw) -> (B, s, 6, D) float64
            b, s = wA.shape[:2]
            onto = torch.zeros(b, s, 2, fR.shape[1], dtype=wA.dtype, device=dev)
            onto.scatter_add_(3, pos[:, :, None, :].expand(-1, -1, 2, -1), wA)  # A's weights onto its rows
            vA = torch.bmm(onto.view(b, s * 2, -1), fR).view(b, s, 2, -1).double()
            return torch.cat([vA, vectors_c(wC)], 2)
        out[:, :, ch] = _chunk_terms(lgA, qA, multA[:, ch], validA[:, ch], lgC, qC[:, None], inA[:, ch],
                                     n_b[:, ch], tot_f, tot_q, vectors, n_u[ch])
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


def _members(C: torch.Tensor, A: torch.Tensor, validA: torch.Tensor) -> torch.Tensor:
    """Whether each candidate (B, n) lies in the valid entries of each σ's A (B, S, k): (B, S, n), by a
    binary search in the sorted A."""
    sorted_a = A.masked_fill(~validA, -1).sort(2).values  # candidates are >= 0: a masked entry never matches
    c = C[:, None, :].expand(-1, A.shape[1], -1).contiguous()
    at = torch.searchsorted(sorted_a, c).clamp_(max=A.shape[2] - 1)
    return sorted_a.gather(2, at) == c


def _chunk_terms(lgA, qA, multA, validA, lgC, qC, inA, n_b, tot_f, tot_q, vectors, n_u: torch.Tensor) -> torch.Tensor:
    """The channels (B, 3, s) of a chunk of s σ (the estimator of the module docstring).

    lgA, qA, multA, validA: (B, s, k) A's logits, q, multiplicities (0 where invalid) and validity;
    lgC, qC: the candidates' logits (B, s, n_draw) and q (B, 1, n_draw); inA: (B, s, n_draw) whether a
    candidate lies in A; n_b: (B, s) |B| in samples; tot_f (B, ·, D), tot_q (B, ·): Σ_all m f, Σ_all m q;
    vectors(wA (B, s, 2, k), wC (B, s, 4, n_draw)): the weighted sums of f, (B, s, 6, D) float64.
    """
    free = ~inA
    rank = free.cumsum(2)
    n_take = torch.minimum(n_u.to(n_b.dtype).expand_as(n_b), free.sum(2))  # (B, s)
    half = n_take // 2
    M1 = free & (rank <= half[..., None])
    M2 = free & (rank > half[..., None]) & (rank <= n_take[..., None])
    lgA = lgA.masked_fill(~validA, -torch.inf)
    m = torch.maximum(lgA.amax(2), lgC.masked_fill(~(M1 | M2), -torch.inf).amax(2))[..., None]
    wA = multA * torch.exp(lgA - m)  # (B, s, k), 0 where masked
    eC = torch.exp(lgC - m)
    M1, M2 = M1.to(eC.dtype), M2.to(eC.dtype)  # each drawn sample counts once
    wA2 = torch.stack([wA, multA], 2)  # (B, s, 2, k)
    wC4 = torch.stack([M1 * eC, M1, M2 * eC, M2], 2)  # (B, s, 4, n_draw)
    # scalar sums in float64: A's [Σ w, Σ w q; Σ m, Σ m q], each half's [Σ w, Σ w q, Σ w q²; Σ m, Σ m q, Σ m q²]
    sA = wA2.double() @ torch.stack([torch.ones_like(qA), qA], 3).double()  # (B, s, 2, 2)
    qC64 = qC.double()
    sC = wC4.double() @ torch.stack([torch.ones_like(qC64), qC64, qC64 * qC64], 3)  # (B, s, 4, 3)
    V = vectors(wA2, wC4)  # (B, s, 6, D): Σ_A w f, Σ_A m f, Σ_U₁ w f, Σ_U₁ m f, Σ_U₂ w f, Σ_U₂ m f
    SA_w, SA_wq, SA_wf = sA[..., 0, 0], sA[..., 0, 1], V[:, :, 0]
    T_f = tot_f - V[:, :, 1]
    T_q = tot_q - sA[..., 1, 1]
    halves = [(sC[:, :, 2 * j], sC[:, :, 2 * j + 1], V[:, :, 2 + 2 * j], V[:, :, 3 + 2 * j]) for j in (0, 1)]
    halves.append(tuple(a + b for a, b in zip(*halves)))  # U₁ ∪ U₂

    deltas, Qs = [], []
    for s_w, s_m, wf, mf in halves:
        (w, wq, wq2), (m_, mq, mq2) = s_w.unbind(-1), s_m.unbind(-1)
        n = m_  # a drawn sample counts once: its plain weight is 1
        drawn = n > 0  # none drawn: B is empty (A holds every point), its terms are 0
        lam = torch.where(drawn, n_b.double() / n.clamp_min(1.0), 0.0)
        e_bar = torch.where(drawn, w / m_.clamp_min(1.0), 0.0)
        beta = _shrinkage(wq / w - _sq(wf / w[..., None]), mq / m_ - _sq(mf / m_[..., None]), w)
        beta_q = _shrinkage(wq2 / w - (wq / w) ** 2, mq2 / m_ - (mq / m_) ** 2, w)
        den = SA_w + lam * w
        deltas.append((SA_wf + lam[..., None] * wf + (beta * e_bar)[..., None] * (T_f - lam[..., None] * mf))
                      / den[..., None])
        Qs.append((SA_wq + lam * wq + beta_q * e_bar * (T_q - lam * mq)) / den)
    d1, d2, d = deltas
    Q = Qs[2]
    whole = (n_take == n_b)[..., None]  # U is all of B (small data): the query is exact, no halves
    d1, d2 = torch.where(whole, d, d1), torch.where(whole, d, d2)
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
