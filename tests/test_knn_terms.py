"""The GEMM-shaped knn batch terms equal the per-σ element-wise implementation they replaced, to round-off.

`reference_knn_terms` below is that implementation (only renamed; since each query draws its own
candidates, its per-batch shared draws are gone and it takes the per-query draws), an independent
reference: per σ, one neighbour search (`knn.neighbour_sets`, the rule both share), the neighbours' rows
gathered and reduced one σ at a time, the membership of the draws in A by a (B, n_draw, k) comparison,
and ten separate reductions per half. The fast one (`knn.knn_terms`)
must give the same channels on the same kernels: same data, noise and draws.
"""

import numpy as np
import pytest
import torch

from lossfloor.floor.kernel import take_rows
from lossfloor.floor.knn import (
    BETA_MAX,
    KnnData,
    draw_count,
    knn_terms,
    neighbour_sets,
    prepare_knn,
    searched,
)
from lossfloor.floor.mixture import component_terms, query_noise, total_f_q
from oracles import product_data


def reference_knn_terms(data: KnnData, xs_idx: torch.Tensor, eps: torch.Tensor, sigmas, *, subset_size: int,
                        draws: torch.Tensor) -> torch.Tensor:
    """Per-query channels (cross, plain - cross, Richardson - cross) for every σ: (B, 3, S) float64.

    xs_idx: (B,) distinct-sample index of each query's source; eps: (B, D) its noise ((B, 2D) for a
    mixture: z then ε). L = subset_size; from L >= U distinct points on, A holds all of them: B is empty
    and every query is the exact one.
    """
    P, mixture = data.points, data.stds is not None
    B, dev = eps.shape[0], eps.device
    everything = subset_size >= data.n_unique
    k = data.n_unique if everything else subset_size // 2
    xs = take_rows(P, xs_idx, dev)  # (B, D): the source (a mixture: its component's mean, the reference of f)
    if mixture:
        z, eps = query_noise(eps)
        x0 = xs + take_rows(data.stds, xs_idx, dev) * z
    else:
        x0 = xs
    xs64 = xs.double()
    CB = C = data.inverse[draws]  # (B, n_draw): the draws' distinct points
    multC = torch.ones(CB.shape, dtype=data.mult.dtype, device=dev)  # each drawn sample counts once
    if not mixture:  # the candidates' σ-independent terms
        fC_dirac = take_rows(P, C, dev) - xs[:, None]  # (B, n_draw, D)
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
        elif searched(data, sigma):
            A, validA = neighbour_sets(data, y, xs_idx, k)  # (B, k): the one neighbour-set rule, per σ
        else:  # no search: A = {source}, the L - 1 others drawn
            A = xs_idx[:, None].expand(B, k)
            validA = torch.arange(k, device=dev)[None, :].expand(B, k) == 0
        n_u = subset_size - 1 if not everything and not searched(data, sigma) else subset_size - k
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
            beta = _ref_shrinkage(s["wq"] / s["w"] - _ref_sq(s["wf"] / s["w"][:, None]),
                              s["mq"] / s["m"] - _ref_sq(s["mf"] / s["m"][:, None]), s["w"])
            beta_q = _ref_shrinkage(s["wq2"] / s["w"] - (s["wq"] / s["w"]) ** 2,
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
        plain = Q - _ref_sq(d)
        rich = Q - 2.0 * _ref_sq(d) + 0.5 * (_ref_sq(d1) + _ref_sq(d2))
        out[:, 0, i] = cross
        out[:, 1, i] = plain - cross
        out[:, 2, i] = rich - cross
    return out


def _ref_sq(v: torch.Tensor) -> torch.Tensor:
    return (v * v).sum(1)


def _ref_shrinkage(var_weighted: torch.Tensor, var_plain: torch.Tensor, w_total: torch.Tensor) -> torch.Tensor:
    """β = min(BETA_MAX, weighted / unweighted variance), 0 where it is undefined (no mass, no spread)."""
    ok = (w_total > 0) & (var_plain > 0)
    ratio = torch.where(ok, var_weighted.clamp_min(0.0) / torch.where(ok, var_plain, 1.0), 0.0)
    return ratio.clamp(max=BETA_MAX)


# --- the fast terms against the reference -------------------------------------------------------------

SIGMAS = np.array([0.05, 0.2, 0.5, 1.0, 2.0, 8.0])  # more σ than one chunk of the fast terms


def _points(kind: str, dtype) -> np.ndarray:
    rng = np.random.default_rng(3)
    if kind == "distinct":
        return rng.normal(size=(300, 12)).astype(dtype)
    if kind == "duplicated":  # 230 distinct rows, some 2 and 5 times, and a cluster of near-duplicates
        base = product_data([[-1.0, 1.0]] * 6 + [[-0.5, 0.0, 0.5]]).astype(dtype)  # 192 rows
        x = np.concatenate([base, base[rng.choice(len(base), 60)], np.repeat(base[:5], 4, 0)])
        x[-10:] += 1e-4 * rng.normal(size=(10, x.shape[1]))
        return x.astype(dtype)
    # a Gaussian mixture: [mean, std] rows
    means = rng.normal(size=(200, 8))
    return np.concatenate([means, rng.uniform(0.0, 0.6, size=(200, 8))], 1).astype(dtype)


def _both(x: np.ndarray, L: int, seed: int, index: str = "flat"):
    t = torch.from_numpy(x)
    mixture = _is_mixture(x)
    data = prepare_knn(t, index=index, mixture=mixture)
    rng = torch.Generator().manual_seed(seed)
    src = torch.randperm(len(x), generator=rng)[:64]
    eps = torch.randn(64, x.shape[1], generator=rng, dtype=t.dtype)
    n_draw = draw_count(data, L)  # each query's candidates: a uniform order of the N samples, cut
    draws = torch.rand(64, len(x), generator=rng).argsort(dim=1)[:, :n_draw]
    return [fn(data, data.inverse[src], eps, torch.as_tensor(SIGMAS), subset_size=L, draws=draws).numpy()
            for fn in (reference_knn_terms, knn_terms)]


def _is_mixture(x: np.ndarray) -> bool:
    return x.shape[1] == 16


@pytest.mark.parametrize("kind", ["distinct", "duplicated", "mixture"])
@pytest.mark.parametrize("L", [8, 16, 64, 1000])  # k = 4 .. 32, and L >= U: the exact query
def test_fast_knn_terms_equal_the_reference_to_round_off(kind, L):
    ref, fast = _both(_points(kind, np.float64), L, seed=L)
    assert np.isfinite(fast).all()
    scale = np.abs(ref[:, 0]).max()
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-11 * scale)


def test_fast_knn_terms_equal_the_reference_in_float32():
    # float32 data: the same kernels, summed in another order (the mean over queries is what an estimate reads)
    for kind in ("duplicated", "mixture"):
        ref, fast = _both(_points(kind, np.float32), 32, seed=7)
        scale = np.abs(ref[:, 0]).mean(0)  # per σ
        np.testing.assert_allclose(fast.mean(0), ref.mean(0), rtol=0, atol=1e-5 * scale.max())
        assert np.abs(fast - ref).max(0).max() <= 1e-3 * scale.max()


# --- knn against exact on real photo patches ------------------------------------------------------------


def _photo_patches(n: int) -> np.ndarray:
    """n 8×8×3 patches (stride 8) of scikit-learn's sample photographs, in [-1, 1]."""
    from lossfloor.data.bundled import patches, sample_photos

    rows = np.concatenate([patches(image, 8, 8).reshape(-1, 192) for image in sample_photos()])
    rows = rows.astype(np.float32) / 127.5 - 1.0
    return rows[np.sort(np.random.default_rng(0).choice(len(rows), n, replace=False))]


def test_knn_is_near_exact_on_photo_patches():
    # the true error of knn at L = 128 against exact on the same queries, on real 8×8×3 photo patches
    from lossfloor.floor import EstimatorConfig, estimate

    x = _photo_patches(500)
    # 0.5-3.7: where knn was furthest from exact on larger sets of these patches; 13: no search there
    sigmas = np.array([0.5, 1.4, 3.7, 13.0])
    exact = estimate(x, sigmas, EstimatorConfig(estimator="exact", seed=1), progress=False)  # the same queries
    knn = estimate(x, sigmas, EstimatorConfig(estimator="knn", subset_size=128, seed=1), progress=False)
    err = np.abs(knn.j_star - exact.j_star) / exact.j_star
    assert np.all((knn.ci_low <= exact.j_star) & (exact.j_star <= knn.ci_high))
    assert err.max() <= 0.01, err


def test_no_search_where_the_kernel_is_flat():
    # √(2D)·s_x/σ ≤ 2: σ = 8 and 40 on 12-D standard normal points (s_x ≈ 1) draw all L - 1 others; only
    # the σ = 0.05 queries reach the index, and the uniform σ still agree with exact on the same queries
    from lossfloor.floor import EstimatorConfig, estimate

    x = _points("distinct", np.float64)
    t = torch.from_numpy(x)
    data = prepare_knn(t, index="flat")
    assert [searched(data, s) for s in (0.05, 8.0, 40.0)] == [True, False, False]
    rows = []
    search = data.index.search
    data.index.search = lambda y, k: rows.append(len(y)) or search(y, k)
    eps = torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(0), dtype=t.dtype)
    draws = torch.rand(64, len(x), generator=torch.Generator().manual_seed(1)).argsort(dim=1)[:, :draw_count(data, 16)]
    knn_terms(data, data.inverse[:64], eps, [0.05, 8.0, 40.0], subset_size=16, draws=draws)
    assert rows == [64]
    sigmas = np.array([8.0, 40.0])
    exact = estimate(x, sigmas, EstimatorConfig(estimator="exact", seed=2), progress=False)
    knn = estimate(x, sigmas, EstimatorConfig(estimator="knn", subset_size=16, seed=2), progress=False)
    assert np.all((knn.ci_low <= exact.j_star) & (exact.j_star <= knn.ci_high))
    assert np.all(np.abs(knn.j_star / exact.j_star - 1.0) <= 0.01), knn.j_star / exact.j_star - 1.0


def test_freed_working_arrays_are_reused_not_faulted_in_again():
    # the batches' large arrays come back from the heap: without `reuse_freed_memory` each 40 MiB array
    # is fresh pages from the kernel, 10 240 minor faults apiece
    import resource

    from lossfloor.floor.heap import reuse_freed_memory

    assert reuse_freed_memory()
    torch.empty(10 * 2**20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(10 * 2**20).fill_(1.0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 10_000
