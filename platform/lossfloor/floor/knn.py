"""The query-nearest-neighbour estimator of J*(σ) (`--estimator knn`), with a control variate and
cross-fitting (docs/estimators.md; the kNN-proposal idea of Niedoba et al., ICML 2024,
arXiv 2402.08018, applied to the optimal loss).

Per query (source s, y = x_s + σε) the posterior over the N samples is estimated from L kernels:

1. A = {s} ∪ the k - 1 nearest distinct samples of y from a neighbour index (k = L/2). A may be any
   deterministic function of (s, y): an approximate index lowers efficiency, never validity.
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
    return are masked out (A is then smaller; the estimator accounts for |A| per query).
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


def draw_count(data: KnnData, subset_size: int) -> int:
    """Uniform draws per query (sample indices) at L = subset_size: enough that L - k remain outside any A
    (A's k points hold at most the samples of the k largest multiplicities: k without duplicates); one
    when A holds every distinct point (the draw falls in A, keeping the shapes)."""
    if subset_size >= data.n_unique:
        return 1
    k = subset_size // 2
    return min(data.n_samples, subset_size - k + data.most_held(k))


def knn_terms(data: KnnData, xs_idx: torch.Tensor, eps: torch.Tensor, sigmas, *, subset_size: int,
              draws: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Per-query channels (cross, plain - cross, Richardson - cross) for every σ: (B, 3, S) float64.

    xs_idx: (B,) distinct-sample index of each query's source; eps: (B, D) its noise ((B, 2D) for a
    mixture: z then ε); draws: (B, draw_count) each query's uniform sample of sample indices, without
    replacement. L = subset_size; from L >= U distinct points on, A holds all of them: B is empty and
    every query is the exact one.
    """
    P, mixture = data.points, data.stds is not None
    B, dev = eps.shape[0], eps.device
    everything = subset_size >= data.n_unique
    k = data.n_unique if everything else subset_size // 2
    n_u = subset_size - k
    xs = take_rows(P, xs_idx, dev)  # (B, D): the source (a mixture: its component's mean, the reference of f)
    if mixture:
        z, eps = query_noise(eps)
        x0 = xs + take_rows(data.stds, xs_idx, dev) * z
    else:
        x0 = xs
    xs64 = xs.double()
    CB = data.inverse[draws.to(data.inverse.device)].to(dev)  # (B, n_draw) distinct points of the draws
    multC = torch.ones(CB.shape, dtype=data.mult.dtype, device=dev)  # each drawn sample counts once
    if not mixture:  # the candidates' σ-independent terms
        fC_dirac = take_rows(P, CB, dev) - xs[:, None]  # (B, n_draw, D)
        DxxC, DexC = (fC_dirac * fC_dirac).sum(-1), -(eps[:, None] * fC_dirac).sum(-1)

        def wsum_dirac(w):
            return torch.bmm(w[:, None, :], fC_dirac)[:, 0].double()
        N = float(data.n_samples)
        tot_f = data.sum_x[None, :] - N * xs64  # Σ_all m f, (B, D)
        tot_q = data.sum_sq - 2.0 * (xs64 @ data.sum_x) + N * (xs64 * xs64).sum(1)  # Σ_all m q, (B,)

    out = torch.empty(B, 3, len(sigmas), dtype=torch.float64, device=dev)
    for i, sigma in enumerate(np.asarray(sigmas, dtype=np.float64).tolist()):
        y = x0 + sigma * eps
        if everything:
            A = torch.arange(k, device=dev).expand(B, -1)  # (B, U)
            validA = torch.ones_like(A, dtype=torch.bool)
        else:
            A, validA = neighbour_sets(data, y, xs_idx, k)  # (B, k)
        if mixture:
            lgA, fA, qA = component_terms(y, xs, take_rows(P, A, dev), take_rows(data.stds, A, dev), sigma)
            lgC, fC, qC = component_terms(y, xs, take_rows(P, CB, dev), take_rows(data.stds, CB, dev),
                                          sigma)  # (B, n_draw[, D])

            def wsum(w, fC=fC):
                return torch.bmm(w[:, None, :], fC)[:, 0].double()
            tot_f, tot_q = total_f_q(data.totals(sigma), y, xs)
        else:
            fA = take_rows(P, A, dev) - xs[:, None]  # (B, k, D), direct differences: exact small distances
            qA, exA = (fA * fA).sum(-1), (eps[:, None] * fA).sum(-1)
            lgA = (qA - (2.0 * sigma) * exA) * (-0.5 / sigma**2)
            lgC, qC, wsum = (DxxC + (2.0 * sigma) * DexC) * (-0.5 / sigma**2), DxxC, wsum_dirac
        lgA = lgA.masked_fill(~validA, -torch.inf)

        inA = ((CB[:, :, None] == A[:, None, :]) & validA[:, None, :]).any(-1)  # (B, n_draw)
        free = ~inA
        rank = free.cumsum(1)
        multA = data.mult[A] * validA
        n_b = data.n_samples - multA.sum(1).round().long()  # |B| per query, in samples
        n_take = torch.minimum(torch.full_like(n_b, n_u), free.sum(1))
        half = n_take // 2
        M1 = free & (rank <= half[:, None])
        M2 = free & (rank > half[:, None]) & (rank <= n_take[:, None])

        m = torch.maximum(lgA.amax(1), lgC.masked_fill(~(M1 | M2), -torch.inf).amax(1))[:, None]
        wA = multA * torch.exp(lgA - m)  # (B, k), 0 where masked
        eC = torch.exp(lgC - m)
        SA_w = wA.sum(1, dtype=torch.float64)
        SA_wf = torch.bmm(wA[:, None, :], fA)[:, 0].double()
        SA_wq = (wA * qA).sum(1, dtype=torch.float64)
        T_f = tot_f - torch.bmm(multA[:, None, :], fA)[:, 0].double()
        T_q = tot_q - (multA * qA).sum(1, dtype=torch.float64)

        sums = []
        for Mj in (M1, M2):
            mj = multC * Mj  # (B, n_draw)
            wj = mj * eC
            sums.append({
                "n": Mj.sum(1, dtype=torch.float64),
                "w": wj.sum(1, dtype=torch.float64), "wf": wsum(wj),
                "wq": (wj * qC).sum(1, dtype=torch.float64), "wq2": (wj * qC * qC).sum(1, dtype=torch.float64),
                "m": mj.sum(1, dtype=torch.float64), "mf": wsum(mj),
                "mq": (mj * qC).sum(1, dtype=torch.float64), "mq2": (mj * qC * qC).sum(1, dtype=torch.float64),
            })
        sums.append({key: sums[0][key] + sums[1][key] for key in sums[0]})  # U₁ ∪ U₂

        deltas, Qs = [], []
        for s in sums:
            drawn = s["n"] > 0  # none drawn: B is empty (A holds every point), its terms are 0
            lam = torch.where(drawn, n_b.double() / s["n"].clamp_min(1.0), 0.0)
            e_bar = torch.where(drawn, s["w"] / s["m"].clamp_min(1.0), 0.0)
            beta = _shrinkage(s["wq"] / s["w"] - _sq(s["wf"] / s["w"][:, None]),
                              s["mq"] / s["m"] - _sq(s["mf"] / s["m"][:, None]), s["w"])
            beta_q = _shrinkage(s["wq2"] / s["w"] - (s["wq"] / s["w"]) ** 2,
                                s["mq2"] / s["m"] - (s["mq"] / s["m"]) ** 2, s["w"])
            den = SA_w + lam * s["w"]
            deltas.append((SA_wf + lam[:, None] * s["wf"] + (beta * e_bar)[:, None] * (T_f - lam[:, None] * s["mf"]))
                          / den[:, None])
            Qs.append((SA_wq + lam * s["wq"] + beta_q * e_bar * (T_q - lam * s["mq"])) / den)
        d1, d2, d = deltas
        Q = Qs[2]
        whole = (n_take == n_b)[:, None]  # U is all of B (small data): the query is exact, no halves
        d1, d2 = torch.where(whole, d, d1), torch.where(whole, d, d2)
        cross = Q - (d1 * d2).sum(1)
        plain = Q - _sq(d)
        rich = Q - 2.0 * _sq(d) + 0.5 * (_sq(d1) + _sq(d2))
        out[:, 0, i] = cross
        out[:, 1, i] = plain - cross
        out[:, 2, i] = rich - cross
    return out


def _sq(v: torch.Tensor) -> torch.Tensor:
    return (v * v).sum(1)


def _shrinkage(var_weighted: torch.Tensor, var_plain: torch.Tensor, w_total: torch.Tensor) -> torch.Tensor:
    """β = min(BETA_MAX, weighted / unweighted variance), 0 where it is undefined (no mass, no spread)."""
    ok = (w_total > 0) & (var_plain > 0)
    ratio = torch.where(ok, var_weighted.clamp_min(0.0) / torch.where(ok, var_plain, 1.0), 0.0)
    return ratio.clamp(max=BETA_MAX)
