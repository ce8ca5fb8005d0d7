"""The estimators against ground truth: quadrature oracles, closed forms and identities between them."""

import logging
import math
import re

import numpy as np
import pytest
import torch

from lossfloor.errors import InputError
from lossfloor.floor import (
    EstimatorConfig,
    build_table,
    estimate,
    prepare_data,
    query_plan,
    query_terms,
    read_table,
    sigma_star,
    write_table,
)
from oracles import optimal_loss_1d, product_data, product_optimal_loss

BINARY10 = [[-1.0, 1.0]] * 10
UNEVEN8 = [[-1.0, 0.2, 1.0], [-0.5, 0.5, 1.5], [0.0, 2.0], [-1.0, 0.3], [0.5, 1.5], [-2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]


def test_oracle_matches_closed_form():
    # {-1, 1}: E[x|y] = tanh(y/σ²), so J1 = 1 - E tanh²; large σ → variance 1, small σ → 0
    s = 0.8
    y = np.linspace(-15, 15, 400001)
    p = 0.5 * (np.exp(-(y - 1) ** 2 / (2 * s * s)) + np.exp(-(y + 1) ** 2 / (2 * s * s))) / np.sqrt(2 * np.pi * s * s)
    direct = np.trapezoid(p * (1 - np.tanh(y / s**2) ** 2), y)
    assert optimal_loss_1d([-1, 1], s) == pytest.approx(direct, rel=1e-8)
    assert optimal_loss_1d([-1, 1], 1e3) == pytest.approx(1.0, rel=1e-5)
    assert optimal_loss_1d([-1, 1], 0.05) < 1e-50


@pytest.mark.parametrize("values", [BINARY10, UNEVEN8], ids=["binary10", "uneven8"])
def test_exact_matches_quadrature(values):
    x = product_data(values)
    sigmas = np.array([0.35, 0.6, 1.0, 2.0, 5.0])
    k = 32768 // len(x)  # about 32k queries
    est = estimate(x, sigmas, EstimatorConfig(estimator="exact", queries_per_sample=k, seed=3), progress=False)
    truth = np.array([product_optimal_loss(values, s) for s in sigmas])
    z = (est.j_star - truth) / est.stderr
    assert np.all(np.abs(z) < 4), z
    assert np.all(est.stderr < 0.03 * truth)  # the check above is not vacuous
    tv = sum(np.var(v) for v in values)
    assert est.total_variance == pytest.approx(tv, rel=1e-6)


def test_gaussian_limit():
    # N(0, s² I) with many samples: J* ≈ D s² σ² / (s² + σ²) away from tiny σ
    rng = np.random.default_rng(0)
    D, s = 2, 1.0
    x = rng.normal(0, s, size=(4000, D)).astype(np.float32)
    sigmas = np.array([0.7, 1.5, 4.0])
    est = estimate(x, sigmas, EstimatorConfig(estimator="exact", queries_per_sample=2), progress=False)
    emp_var = x.astype(np.float64).var(0).mean()
    expected = D * emp_var * sigmas**2 / (emp_var + sigmas**2)
    np.testing.assert_allclose(est.j_star, expected, rtol=0.02)


def test_limits_and_monotone():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(300, 16)).astype(np.float32)
    sigmas = np.geomspace(1e-3, 1e4, 30)
    est = estimate(x, sigmas, EstimatorConfig(estimator="exact", queries_per_sample=4), progress=False)
    j, se = est.j_star, est.stderr
    assert np.all(np.diff(j) >= -3 * (se[1:] + se[:-1]) - 1e-12)
    assert j[0] < 1e-8 * est.total_variance
    assert j[-1] == pytest.approx(est.total_variance, rel=1e-3)


def _terms(x, sigmas, cfg, batch=0):
    """Per-query terms of one batch: the estimator's J* channel (B, S)."""
    xt = prepare_data(x, cfg)
    cfg = cfg.resolve(*xt.shape)
    a, j = query_terms(xt, sigmas, cfg, query_plan(cfg, xt.shape[0]), batch)
    return a.numpy(), j[:, 0].double().numpy()


@pytest.mark.parametrize("name", ["snis", "dol", "cdol", "knn"])
def test_a_subset_of_every_sample_is_the_exact_estimator(name):
    # at L = N the subset holds every sample: the estimator is the exact one (C = 1), never C = 4
    cfg = EstimatorConfig(estimator=name, subset_size=500).resolve(500, 3)
    assert cfg.estimator == "exact" and cfg.c == 1.0 and cfg.subset_size == 500
    # and cDOL's default L = min(4096, N) on the bundled digits (N = 1797) is exact too
    assert EstimatorConfig(estimator="cdol").resolve(1797, 64).estimator == "exact"
    assert EstimatorConfig().resolve(1797, 64).estimator == "exact"  # auto: exact when affordable
    assert EstimatorConfig().resolve(50_000, 64).estimator == "exact"
    assert EstimatorConfig().resolve(50_001, 64).estimator == "knn"
    assert EstimatorConfig().resolve(50_001, 64, compute_device="cuda").estimator == "knn"


def test_cdol_tends_to_snis_as_c_grows():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 6)).astype(np.float32)
    sigmas = np.array([0.3, 1.0])
    common = dict(subset_size=64, queries_per_sample=4, seed=7)
    # continuity in C: a C far above every kernel ratio is the C = inf (no source term) estimator
    _, j_big = _terms(x, sigmas, EstimatorConfig(estimator="cdol", c=1e80, **common))
    _, j_inf = _terms(x, sigmas, EstimatorConfig(estimator="cdol", c=math.inf, **common))
    np.testing.assert_allclose(j_big, j_inf, rtol=1e-5, atol=1e-7)
    # the source's weight falls as C grows, so J* rises monotonically from DOL (C=1) towards SNIS
    js = [estimate(x, sigmas, EstimatorConfig(estimator="cdol", c=c, **common), progress=False).j_star
          for c in (1.0, 10.0, 100.0, 1e4)]
    assert np.all(np.diff(np.stack(js), axis=0) > 0)
    # C = inf is SNIS on L-1 others: same expectation as SNIS with subset L-1 (Theorem 2), here at a σ
    # where the source rarely dominates
    inf = estimate(x, sigmas, EstimatorConfig(estimator="cdol", c=math.inf, **common), progress=False)
    snis = estimate(x, sigmas, EstimatorConfig(estimator="snis", **{**common, "subset_size": 63, "seed": 8}),
                    progress=False)
    z = (inf.j_star[1] - snis.j_star[1]) / math.hypot(inf.stderr[1], snis.stderr[1])
    assert abs(z) < 4


def test_cdol_close_to_exact_and_better_than_dol():
    x = product_data(BINARY10)
    sigmas = np.array([0.5, 0.8, 1.5])
    exact = estimate(x, sigmas, EstimatorConfig(estimator="exact", queries_per_sample=8), progress=False)
    cfg = dict(subset_size=128, queries_per_sample=8, seed=1)
    cdol = estimate(x, sigmas, EstimatorConfig(estimator="cdol", **cfg), progress=False)
    dol = estimate(x, sigmas, EstimatorConfig(estimator="dol", **cfg), progress=False)
    assert cdol.config.c == pytest.approx(4 * 1024 / 128)
    err_cdol = np.abs(cdol.j_star / exact.j_star - 1)
    err_dol = np.abs(dol.j_star / exact.j_star - 1)
    assert np.all(dol.j_star < exact.j_star)  # DOL is biased low (paper §3)
    assert np.all(err_cdol < err_dol)
    assert np.all(err_cdol[1:] < 0.05)  # at σ = 0.5 the subset of L = N/8 still misses neighbours


def test_same_seed_same_numbers_and_seed_matters():
    x = np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32)
    sig = np.array([0.5, 2.0])
    cfg = EstimatorConfig(estimator="cdol", subset_size=50, seed=11)
    a = estimate(x, sig, cfg, progress=False)
    b = estimate(x, sig, cfg, progress=False)
    c = estimate(x, sig, EstimatorConfig(estimator="cdol", subset_size=50, seed=12), progress=False)
    assert np.array_equal(a.j_star, b.j_star) and np.array_equal(a.stderr, b.stderr)
    assert not np.array_equal(a.j_star, c.j_star)


def test_progress_line_reports_count_rate_and_eta(caplog):
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    cfg = EstimatorConfig(estimator="cdol", subset_size=50, rows_per_batch=25)
    with caplog.at_level(logging.INFO, logger="lossfloor.floor.estimate"):
        estimate(x, np.array([0.5, 2.0]), cfg)  # progress on: at least the final line, whatever the speed
    last = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()][-1]
    assert re.search(r"600/600 queries \(100%\), \d+ queries/s, ETA 00:00:00", last), last


def test_batches_are_independent_of_batch_order():
    # a batch's numbers depend on (seed, batch index) only: what Ray workers rely on
    from lossfloor.floor import reduce_estimate, run_batches, total_variance

    x = np.random.default_rng(0).normal(size=(400, 5)).astype(np.float32)
    sig = np.array([0.3, 1.0])
    cfg = EstimatorConfig(estimator="cdol", subset_size=40, rows_per_batch=30).resolve(400, 5)
    xt = prepare_data(x, cfg)
    forward = run_batches(xt, sig, cfg, progress=False)
    backward = run_batches(xt, sig, cfg, batches=list(reversed(range(len(forward)))), progress=False)
    tv = total_variance(xt)
    e1, e2 = reduce_estimate(forward, sig, cfg, tv), reduce_estimate(backward, sig, cfg, tv)
    assert np.array_equal(e1.j_star, e2.j_star) and np.array_equal(e1.stderr, e2.stderr)


def test_float64_reference_agrees_with_float32():
    x = product_data(UNEVEN8)
    sig = np.array([0.2, 0.5, 2.0])
    common = dict(estimator="exact", queries_per_sample=2, seed=0, rng_device="cpu")
    e32 = estimate(x, sig, EstimatorConfig(dtype="float32", **common), progress=False)
    e64 = estimate(x, sig, EstimatorConfig(dtype="float64", **common), progress=False)
    # float32 and float64 noise streams differ, so compare statistically against the oracle instead
    truth = np.array([product_optimal_loss(UNEVEN8, s) for s in sig])
    for e in (e32, e64):
        assert np.all(np.abs(e.j_star - truth) < 4 * e.stderr + 1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    x = product_data(UNEVEN8)
    sig = np.array([0.2, 0.5, 2.0])
    for name in ("exact", "cdol", "knn"):
        common = dict(estimator=name, subset_size=None if name == "exact" else 100, rng_device="cpu", seed=4,
                      index="torch")  # the torch search runs on both devices (FAISS may have no GPU build)
        cpu = estimate(x, sig, EstimatorConfig(device="cpu", **common), progress=False)
        gpu = estimate(x, sig, EstimatorConfig(device="cuda", **common), progress=False)
        np.testing.assert_allclose(gpu.j_star, cpu.j_star, rtol=1e-4)
        np.testing.assert_allclose(gpu.ci_high, cpu.ci_high, rtol=1e-3)


def test_subset_bias_levels_are_the_estimator_at_l_half_and_quarter():
    # the L/2 and L/4 channels of one pass are cDOL on the first L/2 and L/4 of the same subset:
    # the kernel's levels equal separate kernel calls on those prefixes, query by query
    from lossfloor.floor.kernel import Level, optimal_loss_terms

    g = torch.Generator().manual_seed(1)
    B, L, D = 24, 32, 6
    xs, eps = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64)
    refs = torch.randn(L, D, generator=g, dtype=torch.float64)
    sig = torch.tensor([0.2, 1.0, 6.0], dtype=torch.float64)
    levels = [Level(n, torch.full((B,), n - 1), torch.full((B,), -math.log(4 * 1000 / n), dtype=torch.float64))
              for n in (L, L // 2, L // 4)]
    together = optimal_loss_terms(xs, eps, refs, sig, levels=levels)
    for i, lvl in enumerate(levels):
        alone = optimal_loss_terms(xs, eps, refs[: lvl.size], sig, levels=[lvl])[:, 0]
        np.testing.assert_allclose(together[:, i].numpy(), alone.numpy(), rtol=1e-12, atol=1e-12)


def test_sigma_star_interpolates_crossing():
    s = np.array([0.1, 0.2, 0.4, 0.8])
    j = np.array([0.0, 1e-4, 1e-2, 1.0])
    # level 1e-3 (threshold 1e-3 of J*(∞) = 1): between 0.2 and 0.4 in log-log, at the geometric midpoint
    assert sigma_star(s, j, 1.0) == pytest.approx(math.sqrt(0.2 * 0.4), rel=1e-12)
    assert sigma_star(s, j + 1.0, 1.0) is None
    assert sigma_star(s, j * 0, 1.0) == 0.8


def test_table_round_trip_and_target_conversion(tmp_path):
    x = product_data(BINARY10)
    sig = np.array([0.5, 1.0, 2.0])
    est = estimate(x, sig, EstimatorConfig(estimator="exact", queries_per_sample=2), progress=False)
    t = build_table(est, target="eps", fingerprint="abc")
    path = write_table(t, tmp_path / "j.parquet")
    back = read_table(path)
    np.testing.assert_allclose(back.column("j_star"), est.j_star / sig**2)
    np.testing.assert_allclose(back.column("j_star_x0"), est.j_star)
    assert back.rows()[0]["dataset_fingerprint"] == "abc"
    assert back.sigma_star == t.sigma_star
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_an_estimate_with_nan_or_inf_is_never_a_table():
    import dataclasses

    x = product_data(BINARY10)
    sig = np.array([0.5, 1.0, 2.0])
    est = estimate(x, sig, EstimatorConfig(estimator="exact", queries_per_sample=1), progress=False)
    for name in ("j_star", "ci_high", "stderr"):
        bad = getattr(est, name).copy()
        bad[1] = math.nan if name != "ci_high" else math.inf
        with pytest.raises(InputError, match=f"{name} = (nan|inf) at sigma = 1, from the exact estimator"):
            build_table(dataclasses.replace(est, **{name: bad}))
    with pytest.raises(InputError, match=r"total_variance = inf at J\*\(inf\)"):
        build_table(dataclasses.replace(est, total_variance=math.inf))


def test_data_without_values_is_refused():
    # a (40, 0) array gave a J* = 0 table
    with pytest.raises(InputError, match=r"hold no values \(got shape \(40, 0\)\)"):
        estimate(np.zeros((40, 0), np.float32), [1.0], progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(estimator="nope"), "estimator"),
        (dict(subset_size=1), "subset_size"),
        (dict(c=0.0), "c:"),
        (dict(c=-2.0), "c:"),
        (dict(queries_per_sample=0), "queries_per_sample"),
        (dict(seed=-1), "seed"),
        (dict(rel_error=1.5), "rel_error"),
        (dict(index="kd-tree"), "index"),
        (dict(index_pca=0), "index_pca"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(InputError, match=match):
        EstimatorConfig(**kwargs)


def test_bad_data_and_sigmas():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(InputError, match="at most N"):
        estimate(x, [1.0], EstimatorConfig(estimator="cdol", subset_size=11), progress=False)
    with pytest.raises(InputError, match="at least 2"):
        estimate(x[:1], [1.0], EstimatorConfig(estimator="exact"), progress=False)
    with pytest.raises(InputError, match="NaN"):
        estimate(np.full((4, 2), np.nan, np.float32), [1.0], progress=False)
    with pytest.raises(InputError, match="sigmas"):
        estimate(x, [0.0], progress=False)


@pytest.mark.parametrize("form", ["paper", "posterior-variance"])
@pytest.mark.parametrize("use_dref", [True, False])
def test_kernel_equals_naive_reference_in_float64(use_dref, form):
    # the multi-σ kernel (shared distance GEMMs, S-scaled terms) and the naive per-σ softmax agree
    from lossfloor.floor.kernel import Level, optimal_loss_terms
    from lossfloor.floor.reference import naive_optimal_loss_terms

    g = torch.Generator().manual_seed(0)
    B, L, D = 40, 30, 20
    xs = torch.randn(B, D, generator=g, dtype=torch.float64)
    refs = torch.randn(L, D, generator=g, dtype=torch.float64)
    refs[:10] = xs[:10]  # some sources are references too
    eps = torch.randn(B, D, generator=g, dtype=torch.float64)
    exclude = torch.full((B,), L - 1)
    exclude[:10] = torch.arange(10)
    log_factor = torch.full((B,), -math.log(7.0), dtype=torch.float64)
    log_factor[30:] = -math.inf  # SNIS-like queries: no source term
    exclude[35:] = -1
    sigmas = torch.tensor([0.05, 0.3, 1.0, 5.0, 100.0], dtype=torch.float64)
    fast = optimal_loss_terms(xs, eps, refs, sigmas, levels=[Level(L, exclude, log_factor)], form=form,
                              use_dref=use_dref)[:, 0]
    slow = naive_optimal_loss_terms(xs, eps, refs, sigmas, exclude=exclude, source_log_factor=log_factor, form=form)
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), rtol=1e-9, atol=1e-9)


def test_float32_matmul_turns_tf32_off():
    from lossfloor.floor.kernel import matmul

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (TF32 exists only there)")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # a global setting some other code left on
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(256, 4096, generator=g, device="cuda")
        b = torch.randn(4096, 256, generator=g, device="cuda")
        exact = a.double() @ b.double()
        err = ((matmul(a, b, "fp32").double() - exact).abs().max() / exact.abs().max()).item()
        assert err < 1e-5  # TF32 would give ~1e-3
        assert torch.backends.cuda.matmul.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_split_tf32_matmul_is_float32_accurate():
    from lossfloor.floor.kernel import _round_to_tf32, matmul

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 300, generator=g), torch.randn(300, 50, generator=g)
    head = _round_to_tf32(a)
    assert torch.all((head.view(torch.int32) & 0x1FFF) == 0)  # 10 mantissa bits left
    assert torch.all((a - head).abs() <= a.abs() * 2.0**-11)
    exact = a.double() @ b.double()
    err = (matmul(a, b, "3xtf32").double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-6
