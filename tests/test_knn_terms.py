"""The GEMM-shaped knn batch terms equal a per-query reference implementation of the estimator, to round-off.

`reference_knn_terms` below follows the module docstring of `lossfloor.floor.knn` one query and one σ at a
time, in float64 NumPy: the ranks Z = (source, the depth - 1 nearest) from the same index, A = Z's first k,
each band's draws at the positions the query's own band stream drew (`queries.uniform_subsets`, the shared
random numbers), the rest = every sample outside the searched set with the first draws of the query's
uniform draws that fall there, each drawn kernel weighed by its stratum's size over its draws in the half,
and the sums and the control variate written out term by term. The fast one (`knn.knn_terms`: gathers,
batched products, σ chunks, blocks of queries) must give the same channels on the same kernels: same data,
noise and draws.
"""

import numpy as np
import pytest
import torch

from lossfloor.floor import neighbours
from lossfloor.floor.kernel import take_rows
from lossfloor.floor.knn import (
    BETA_MAX,
    UNIT,
    KnnData,
    Layout,
    banded,
    draw_count,
    knn_terms,
    layout,
    prepare_knn,
    searched,
)
from lossfloor.floor.mixture import component_terms, query_noise, total_f_q
from lossfloor.floor.queries import uniform_subsets
from oracles import product_data


def reference_knn_terms(data: KnnData, xs_idx: torch.Tensor, eps: torch.Tensor, sigmas, *, subset_size: int,
                        draws: torch.Tensor, band_seeds: np.ndarray) -> torch.Tensor:
    """Per-query channels (cross, plain - cross, Richardson - cross) for every σ: (B, 3, S) float64."""
    P, mixture, N, U = data.points, data.stds is not None, data.n_samples, data.n_unique
    B = eps.shape[0]
    everything = subset_size >= U
    lists = data.lists
    lay = layout(U, subset_size, lists is not None)
    xs = take_rows(P, xs_idx, eps.device)
    x0, e = xs, eps
    if mixture:
        z, e = query_noise(eps)
        x0 = xs + take_rows(data.stds, xs_idx, eps.device) * z
    sig = np.asarray(sigmas, dtype=np.float64).tolist()
    on = [i for i, sigma in enumerate(sig) if searched(data, sigma)]
    deep = [i for i in on if (lay.bands or lay.lists) and banded(data, sig[i], lay.k)]  # the others: A and the rest only
    sizes = [lay.band_draws] * len(lay.bands) + [lay.list_draws] * len(lay.lists)
    pos, taken = uniform_subsets(band_seeds, len(deep), [b - a for a, b in lay.bands] + [UNIT] * len(lay.lists), sizes)
    C = data.inverse[draws].numpy()  # (B, n_draw): the draws' distinct points
    mult = data.mult.double().numpy()
    out = np.empty((B, 3, len(sig)))
    for i, sigma in enumerate(sig):
        y = x0 + sigma * e
        g_lay = lay if i in deep else Layout(k=lay.k, bands=(), band_draws=0, rest_draws=subset_size - lay.k)
        ids = data.index.search(y, g_lay.depth - 1, cuts=g_lay.cuts).numpy() if i in on and not everything else None
        if mixture:
            tot = total_f_q(data.totals(sigma), y, xs)
        for b in range(B):
            src = int(xs_idx[b])
            kernels = []  # (point, (factor in half 1, half 2, both)); drawn kernels of the bands
            if everything:
                kernels = [(p, (1.0, 1.0, 1.0)) for p in range(U)]
                top, rest_draws, cv = set(range(U)), 0, True
            elif i in on:
                Z = [src, *ids[b].tolist()]
                ok = [True] + [z >= 0 and z != src for z in Z[1:]]
                kernels = [(Z[r], (1.0, 1.0, 1.0)) for r in range(g_lay.k) if ok[r]]
                for band, (start, stop) in enumerate(g_lay.bands):
                    at = pos[b, deep.index(i), band][taken[b, deep.index(i), band]][:g_lay.band_draws].tolist()
                    for p, f in zip(at, _halves(len(at), stop - start)):
                        if ok[start + p]:
                            kernels.append((Z[start + p], f))
                top = {Z[r] for r in range(len(Z)) if ok[r]}
                if i in deep and lists is not None:  # the list bands: positions in the lists' order, outside Z
                    seq = _list_order(lists, y[b])
                    for band, (start, stop) in enumerate(g_lay.lists, start=len(g_lay.bands)):
                        outside = [p for p in seq[start:stop] if p not in top]  # uniform draws, with replacement
                        t, h, n = g_lay.list_draws, g_lay.list_draws // 2, len(outside)
                        for r, i_u in enumerate(pos[b, deep.index(i), band, :t].tolist()):
                            u = (i_u + 0.5) / UNIT
                            f = (n / h, 0.0, n / t) if r < h else (0.0, n / (t - h), n / t)
                            if n:
                                kernels.append((outside[min(int(u * n), n - 1)], f))
                rest_draws, cv = g_lay.rest_draws, not (g_lay.bands or g_lay.lists)
            else:  # no search: A = {source}, the rest gets L - 1 draws
                kernels, top, rest_draws, cv = [(src, (1.0, 1.0, 1.0))], {src}, subset_size - 1, True
            n_rest = N - sum(mult[p] for p in top)
            free = [c for c in C[b].tolist() if c not in top][:rest_draws]
            drawn = list(zip(free, _halves(len(free), n_rest)))
            out[b, :, i] = _query_channels(data, mixture, y[b], xs[b], e[b], sigma, kernels, drawn, cv, mult,
                                           tot=(tot[0][b], tot[1][b]) if mixture else None)
    return torch.from_numpy(out)


def _list_order(lists, y: torch.Tensor) -> list[int]:
    """Every point in the order of its list's centroid distance to y (nearest first), a list's points in
    the list's stored order."""
    c = lists.centroids.numpy()
    dist = ((c - y.double().numpy()[None, :]) ** 2).sum(1)
    ids, start, size = lists.ids.numpy(), lists.start.numpy(), lists.size.numpy()
    return [int(p) for j in np.argsort(dist, kind="stable") for p in ids[start[j]:start[j] + size[j]]]


def _halves(t: int, size: float) -> list[tuple[float, float, float]]:
    """The weights of t ordered draws from a stratum of `size`: the first t//2 are half 1; a stratum drawn
    whole is known (weight 1 in both halves)."""
    if t >= size:
        return [(1.0, 1.0, 1.0)] * t
    h = t // 2
    return [(size / h, 0.0, size / t) if r < h else (0.0, size / (t - h), size / t) for r in range(t)]


def _query_channels(data, mixture, y, xs, e, sigma, kernels, drawn, cv, mult, tot) -> np.ndarray:
    """One query at one σ: the estimator of the knn module docstring from its kernels (point, factors) and
    the rest's draws (sample's point, factors)."""
    pts = [p for p, _ in kernels] + [p for p, _ in drawn]
    idx = torch.tensor(pts, dtype=torch.long)
    if mixture:
        lg, f, q = component_terms(y[None], xs[None], data.points[idx][None], data.stds[idx][None], sigma)
        lg, f, q = lg[0].double().numpy(), f[0].double().numpy(), q[0].double().numpy()
        tot_f, tot_q = tot[0].double().numpy(), float(tot[1])
    else:
        x = data.points[idx].double().numpy()
        xs64, y64 = xs.double().numpy(), y.double().numpy()
        f = x - xs64
        q = (f * f).sum(1)
        lg = -((y64 - x) ** 2).sum(1) / (2.0 * sigma**2)
        N = data.n_samples
        tot_f = data.sum_x.numpy() - N * xs64
        tot_q = data.sum_sq - 2.0 * xs64 @ data.sum_x.numpy() + N * xs64 @ xs64
    nk = len(kernels)
    m = np.concatenate([mult[[p for p, _ in kernels]], np.ones(len(drawn))])  # a drawn sample counts once
    F = np.array([fac for _, fac in kernels] + [fac for _, fac in drawn]).reshape(-1, 3)
    used = F[:, 2] > 0
    w = m * np.exp(lg - lg[used].max())
    T_f = tot_f - (m[:nk, None] * f[:nk]).sum(0)  # the rest's sums when the kernels are A (no bands)
    T_q = tot_q - (m[:nk] * q[:nk]).sum()
    deltas, Qs = [], []
    for j in range(3):
        a, r = F[:nk, j], F[nk:, j]  # the kernels', the rest's draws' weights
        wk, wr, fr, qr = w[:nk], w[nk:], f[nk:], q[nk:]
        S_w = (a * wk).sum() + (r * wr).sum()
        S_wf = ((a * wk)[:, None] * f[:nk]).sum(0) + ((r * wr)[:, None] * fr).sum(0)
        S_wq = (a * wk * q[:nk]).sum() + (r * wr * qr).sum()
        beta = beta_q = e_bar = 0.0
        n_r, w_r = r.sum(), (r * wr).sum()
        if cv and n_r > 0:
            e_bar = w_r / n_r
            if w_r > 0:
                mean_wf, mean_f = (r * wr) @ fr / w_r, r @ fr / n_r
                beta = _ref_shrinkage((r * wr) @ qr / w_r - mean_wf @ mean_wf, r @ qr / n_r - mean_f @ mean_f)
                beta_q = _ref_shrinkage((r * wr) @ qr**2 / w_r - ((r * wr) @ qr / w_r) ** 2,
                                        r @ qr**2 / n_r - (r @ qr / n_r) ** 2)
        deltas.append((S_wf + beta * e_bar * (T_f - r @ fr)) / S_w)
        Qs.append((S_wq + beta_q * e_bar * (T_q - r @ qr)) / S_w)
    d1, d2, d = deltas
    cross = Qs[2] - d1 @ d2
    plain = Qs[2] - d @ d
    rich = Qs[2] - 2.0 * d @ d + 0.5 * (d1 @ d1 + d2 @ d2)
    return np.array([cross, plain - cross, rich - cross])


def _ref_shrinkage(var_weighted: float, var_plain: float) -> float:
    """β = min(BETA_MAX, weighted / unweighted variance), 0 where it is undefined (no spread)."""
    return min(BETA_MAX, max(var_weighted, 0.0) / var_plain) if var_plain > 0 else 0.0


# --- the fast terms against the reference -------------------------------------------------------------

SIGMAS = np.array([0.05, 0.2, 0.5, 1.0, 2.0, 8.0])  # more σ than one chunk of the fast terms


def _points(kind: str, dtype) -> np.ndarray:
    rng = np.random.default_rng(3)
    if kind == "distinct":
        return rng.normal(size=(300, 12)).astype(dtype)
    if kind == "wide":  # enough points for IVF lists beyond the rank bands
        return rng.normal(size=(2000, 12)).astype(dtype)
    if kind == "duplicated":  # 230 distinct rows, some 2 and 5 times, and a cluster of near-duplicates
        base = product_data([[-1.0, 1.0]] * 6 + [[-0.5, 0.0, 0.5]]).astype(dtype)  # 192 rows
        x = np.concatenate([base, base[rng.choice(len(base), 60)], np.repeat(base[:5], 4, 0)])
        x[-10:] += 1e-4 * rng.normal(size=(10, x.shape[1]))
        return x.astype(dtype)
    # a Gaussian mixture: [mean, std] rows
    means = rng.normal(size=(200, 8))
    return np.concatenate([means, rng.uniform(0.0, 0.6, size=(200, 8))], 1).astype(dtype)


def _both(x: np.ndarray, L: int, seed: int, index: str = "flat", drop: bool = False):
    t = torch.from_numpy(x)
    mixture = _is_mixture(x)
    data = prepare_knn(t, index=index, mixture=mixture)
    if drop:  # an approximate index that comes back short: every other query misses its last third
        search = data.index.search

        def short(y, k, cuts=None):
            ids = search(y, k, cuts).clone()
            ids[::2, k - k // 3:] = -1
            return ids
        data.index.search = short
    rng = torch.Generator().manual_seed(seed)
    src = torch.randperm(len(x), generator=rng)[:64]
    eps = torch.randn(64, x.shape[1], generator=rng, dtype=t.dtype)
    n_draw = draw_count(data, L)  # each query's candidates: a uniform order of the N samples, cut
    draws = torch.rand(64, len(x), generator=rng).argsort(dim=1)[:, :n_draw]
    band_seeds = np.arange(64, dtype=np.uint64) + np.uint64(1000 * seed)
    return [fn(data, data.inverse[src], eps, torch.as_tensor(SIGMAS), subset_size=L, draws=draws,
               band_seeds=band_seeds).numpy() for fn in (reference_knn_terms, knn_terms)]


def _is_mixture(x: np.ndarray) -> bool:
    return x.shape[1] == 16


@pytest.mark.parametrize("kind", ["distinct", "duplicated", "mixture"])
@pytest.mark.parametrize("L", [8, 16, 64, 1000])  # k = 4 .. 32, and L >= U: the exact query
def test_fast_knn_terms_equal_the_reference_to_round_off(kind, L):
    ref, fast = _both(_points(kind, np.float64), L, seed=L)
    assert np.isfinite(fast).all()
    scale = np.abs(ref[:, 0]).max()
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-11 * scale)


def test_fast_knn_terms_equal_the_reference_when_the_index_misses():
    for kind, L in (("distinct", 64), ("duplicated", 16), ("mixture", 16)):
        ref, fast = _both(_points(kind, np.float64), L, seed=5, drop=True)
        np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-11 * np.abs(ref[:, 0]).max())


@pytest.mark.parametrize("kind, L", [("wide", 32), ("wide", 64), ("duplicated", 8), ("duplicated", 16), ("mixture", 16)])
def test_fast_knn_terms_with_ivf_lists_equal_the_reference(kind, L):
    # an IVF index: rank bands from its search, then bands of positions in the query's order of its lists
    x = _points(kind, np.float64)
    assert prepare_knn(torch.from_numpy(x), index="ivf", mixture=_is_mixture(x)).lists is not None
    ref, fast = _both(x, L, seed=L, index="ivf")
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-11 * np.abs(ref[:, 0]).max())
    ref, fast = _both(x, L, seed=3, index="ivf", drop=True)  # and where the search comes back short
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-11 * np.abs(ref[:, 0]).max())


@pytest.mark.parametrize("kind, L", [("wide", 32), ("duplicated", 16)])
def test_fast_knn_terms_equal_the_reference_with_the_ivf_lists_own_scan(kind, L, monkeypatch):
    # every search through `ListScan`: Z ordered only at the strata's edges, in any batch the same
    monkeypatch.setattr(neighbours, "SCAN_MIN_K", 1)
    calls, scan = [], neighbours.ListScan.search
    monkeypatch.setattr(neighbours.ListScan, "search", lambda self, *a: calls.append(a[1]) or scan(self, *a))
    ref, fast = _both(_points(kind, np.float64), L, seed=L, index="ivf")
    assert calls and min(calls) > 1
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-11 * np.abs(ref[:, 0]).max())


def test_layout_bands_of_neighbour_ranks():
    # L = 128: A = 64 nearest, then bands [64, 256), [256, 1 024), [1 024, 4 096), ... to the depth N/20 (at
    # least 4 096, at most 65 536 and half the distinct points), the last band cut there; as many bands as
    # keep 4 draws each; the rest takes what is left
    assert layout(20_000, 128) == Layout(k=64, bands=((64, 256), (256, 1024), (1024, 4096)), band_draws=16,
                                         rest_draws=16)
    assert layout(3_000, 128) == Layout(k=64, bands=((64, 256), (256, 1024), (1024, 1500)), band_draws=16,
                                        rest_draws=16)
    assert layout(320_000, 128) == Layout(k=64, bands=((64, 256), (256, 1024), (1024, 4096), (4096, 16000)),
                                          band_draws=12, rest_draws=16)
    assert layout(10**7, 128).depth == 65536
    assert layout(10**6, 512).bands == ((256, 1024), (1024, 4096), (4096, 16384), (16384, 50000))
    assert layout(100, 128) == Layout(k=64, bands=(), band_draws=0, rest_draws=64)  # U/2 < k: no band
    assert layout(300, 8) == Layout(k=4, bands=(), band_draws=0, rest_draws=4)
    assert layout(20_000, 32).bands == ((16, 64), (64, 256), (256, 1024)) and layout(20_000, 32).band_draws == 4


def test_layout_list_bands_take_the_rests_draws():
    # with an IVF index's lists the rest's draws go to list bands of DRAWS_MIN draws: [0, 2·depth), then
    # geometric widths to U; the rank bands are those without lists
    lay = layout(320_000, 256, lists=True)
    assert lay.bands == layout(320_000, 256).bands and lay.band_draws == 25 and lay.rest_draws == 0
    assert lay.list_draws == 4 and len(lay.lists) == 7  # the 28 draws the rest had
    starts, stops = zip(*lay.lists)
    assert starts[0] == 0 and stops[0] == 32_000 and stops[-1] == 320_000 and starts[1:] == stops[:-1]
    ratios = np.diff(np.log(stops))
    assert np.allclose(ratios, ratios[0], atol=1e-4)  # geometric
    assert lay.width == 128 + 4 * 25 + 7 * 4
    assert len(layout(320_000, 512, lists=True).lists) == 16  # LIST_BANDS_MAX
    assert layout(3_000, 128, lists=True).lists == ((0, 3000),) and layout(3_000, 128, lists=True).list_draws == 16
    assert layout(100, 128, lists=True) == layout(100, 128)  # no bands: the rest keeps its draws


def test_bands_only_where_the_posterior_reaches_beyond_a():
    # r_k against a brute-force count: the 5th percentile over the 256 sampled points of the distance to
    # their k-th nearest other point; bands from σ = r_k / 14.5 on
    x = _photo_patches(3000).astype(np.float64)
    data = prepare_knn(torch.from_numpy(x), index="flat")
    k = layout(len(x), 128).k
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:256].numpy()
    dist = np.sqrt(((x[pick, None, :] - x[None, :, :]) ** 2).sum(-1))
    dist[np.arange(256), pick] = np.inf  # not itself
    r_k = np.percentile(np.sort(dist, 1)[:, k - 1], 5)
    assert data.rank_distance(k) == pytest.approx(r_k, rel=1e-9)
    assert not banded(data, 0.99 * r_k / 14.5, k) and banded(data, 1.01 * r_k / 14.5, k)


def test_band_draws_are_uniform_ordered_samples_per_query():
    seeds = np.arange(20_000, dtype=np.uint64) * np.uint64(7919)
    pos, taken = uniform_subsets(seeds, 2, [10, 40], 4)
    assert pos.shape == (20_000, 2, 2, 4) and taken.all()
    for band, width in enumerate((10, 40)):
        p = pos[:, :, band].reshape(-1, 4)
        assert ((p >= 0) & (p < width)).all()
        assert all(len(set(row)) == 4 for row in p[:500].tolist())  # without replacement
        for half in (p[:, :2], p[:, 2:]):  # either half: every position with probability 2/width
            freq = torch.bincount(half.flatten(), minlength=width).double() / len(p)
            assert (freq - 2.0 / width).abs().max() <= 5.0 * (2.0 / width / len(p)) ** 0.5
    # common random numbers: a query's draws depend on its seed only, not on its batch
    sub_pos, _ = uniform_subsets(seeds[7:9], 2, [10, 40], 4)
    assert torch.equal(sub_pos, pos[7:9])


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


@pytest.mark.parametrize("n, index", [(500, "auto"), (3000, "auto"), (3000, "ivf")])  # 3 000: A, bands of
def test_knn_is_near_exact_on_photo_patches(n, index):  # neighbour ranks, the rest (IVF: a list band)
    # the true error of knn at L = 128 against exact on the same queries, on real 8×8×3 photo patches
    from lossfloor.floor import EstimatorConfig, estimate

    x = _photo_patches(n)
    # 0.5-3.7: where knn was furthest from exact on larger sets of these patches; 13: no search there;
    # 0.03: searched without bands (the posterior sits on the nearest)
    sigmas = np.array([0.03, 0.5, 1.4, 3.7, 13.0])
    m = min(n, 1000)  # queries: the error is paired (the same queries), so a thousand show it
    exact = estimate(x, sigmas, EstimatorConfig(estimator="exact", seed=1, queries=m), progress=False)
    knn = estimate(x, sigmas, EstimatorConfig(estimator="knn", subset_size=128, seed=1, queries=m, index=index),
                   progress=False)
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
    data.rank_distance(layout(len(x), 16).k)  # the bands' calibration searches its own 256 points, once
    rows = []
    search = data.index.search
    data.index.search = lambda y, k, cuts=None: rows.append(len(y)) or search(y, k, cuts)
    eps = torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(0), dtype=t.dtype)
    draws = torch.rand(64, len(x), generator=torch.Generator().manual_seed(1)).argsort(dim=1)[:, :draw_count(data, 16)]
    knn_terms(data, data.inverse[:64], eps, [0.05, 8.0, 40.0], subset_size=16, draws=draws,
              band_seeds=np.arange(64, dtype=np.uint64))
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
