"""Common random numbers per query: the same seed gives the same queries for every estimator, batch size,
budget M and process (`lossfloor.floor.queries`), and the draws are exact uniform samples."""

import numpy as np
import pytest
import torch

from lossfloor.floor import (
    EstimatorConfig,
    estimate,
    estimate_conditional,
    prepare_data,
    query_plan,
    query_terms,
)
from lossfloor.floor.batch import query_noise
from lossfloor.floor.classes import class_plan
from lossfloor.floor.queries import QueryPlan, query_seeds, uniform_without_replacement
from oracles import product_data

X = product_data([[-1.0, 0.2, 1.0], [-0.5, 0.5, 1.5], [0.0, 2.0], [-1.0, 0.3], [0.5, 1.5], [-2.0, 0.0]])  # (144, 6)
SIGMAS = np.array([0.3, 1.0, 3.0])


def _queries(cfg: EstimatorConfig, x=X):
    """{(source, round): (noise row, J* term per σ)} over every query of a config."""
    xt = prepare_data(x, cfg)
    cfg = cfg.resolve(*xt.shape)
    plan = query_plan(cfg, len(xt))
    out = {}
    for b in range(plan.n_batches):
        n, j = plan.sources_and_rounds(b)
        eps = query_noise(cfg, plan, b, xt.shape[1], "cpu")
        _, terms = query_terms(xt, SIGMAS, cfg, plan, b)
        for i, key in enumerate(zip(n.tolist(), j.tolist())):
            out[key] = (eps[i].numpy(), terms[i, 0].double().numpy())
    return out


def test_every_estimator_and_batch_size_sees_the_same_queries():
    exact = _queries(EstimatorConfig(estimator="exact", seed=3, rows_per_batch=7))
    others = {
        "exact, one batch": _queries(EstimatorConfig(estimator="exact", seed=3, rows_per_batch=1000)),
        "knn": _queries(EstimatorConfig(estimator="knn", subset_size=16, seed=3, rows_per_batch=50)),
        "cdol": _queries(EstimatorConfig(estimator="cdol", subset_size=16, seed=3)),
    }
    assert len(exact) == 3 * len(X) and {j for _, j in exact} == {0, 1, 2}
    for name, got in others.items():
        assert got.keys() == exact.keys(), name
        for key, (eps, _) in exact.items():
            assert np.array_equal(got[key][0], eps), (name, key)
    # the terms of a query do not depend on its batch (exact: the same posterior over the same y)
    for key, (_, j) in exact.items():
        np.testing.assert_allclose(others["exact, one batch"][key][1], j, rtol=1e-5, atol=1e-7)
    # another seed: other noise
    assert not np.array_equal(_queries(EstimatorConfig(estimator="exact", seed=4))[(0, 0)][0], exact[(0, 0)][0])


def test_knn_terms_do_not_depend_on_the_batch():
    a = _queries(EstimatorConfig(estimator="knn", subset_size=16, seed=1, rows_per_batch=5))
    b = _queries(EstimatorConfig(estimator="knn", subset_size=16, seed=1, rows_per_batch=432))
    for key, (_, j) in a.items():
        np.testing.assert_allclose(b[key][1], j, rtol=1e-5, atol=1e-7)


def test_a_larger_budget_only_adds_queries():
    small = QueryPlan(n_samples=50, n_queries=70, rows_per_batch=8, seed=2)
    large = QueryPlan(n_samples=50, n_queries=500, rows_per_batch=64, seed=2)
    first = torch.cat([torch.stack(small.sources_and_rounds(b)) for b in range(small.n_batches)], 1)
    every = torch.cat([torch.stack(large.sources_and_rounds(b)) for b in range(large.n_batches)], 1)
    assert torch.equal(first, every[:, :70])
    # sources without replacement: each round is a permutation of the samples, in the same seeded order
    for r in range(10):
        assert sorted(every[0, 50 * r:50 * (r + 1)].tolist()) == list(range(50))
        assert torch.equal(every[1, 50 * r:50 * (r + 1)], torch.full((50,), r))
    assert torch.equal(every[0, :50], every[0, 50:100])
    assert not torch.equal(every[0, :50], QueryPlan(n_samples=50, n_queries=50, rows_per_batch=8, seed=3).order())
    s = small.seeds(0, 0)
    assert np.array_equal(s, query_seeds(2, 0, first[0, :8].numpy(), first[1, :8].numpy(), 0))


def test_query_seeds_are_distinct_and_keyed():
    n, j = np.meshgrid(np.arange(2000), np.arange(8), indexing="ij")
    seeds = query_seeds(0, 0, n.ravel(), j.ravel(), 0)
    assert len(np.unique(seeds)) == seeds.size
    for other in (query_seeds(1, 0, n.ravel(), j.ravel(), 0), query_seeds(0, 1, n.ravel(), j.ravel(), 0),
                  query_seeds(0, 0, n.ravel(), j.ravel(), 2)):
        assert len(np.intersect1d(seeds, other)) == 0


def test_classes_have_distinct_queries():
    labels = np.repeat([0, 1], 72)
    plan = class_plan(labels, EstimatorConfig(estimator="exact", seed=5), X.shape[1])
    p0, p1 = plan.plans
    assert p0.key != p1.key and p0.key != 0 and p1.key != 0
    assert not torch.equal(p0.order(), p1.order())
    assert len(np.intersect1d(p0.seeds(p0.first_batch, 0), p1.seeds(p1.first_batch, 0))) == 0
    # and the same class's queries whatever the batch size
    est = [estimate_conditional(X, labels, SIGMAS, EstimatorConfig(estimator="exact", seed=5, rows_per_batch=r),
                                progress=False) for r in (16, 500)]
    np.testing.assert_allclose(est[0].j_star, est[1].j_star, rtol=1e-6)
    np.testing.assert_allclose(est[0].stderr, est[1].stderr, rtol=1e-5)


def test_estimates_do_not_depend_on_the_batch_size():
    for name, L in (("exact", None), ("knn", 16), ("cdol", 24)):
        a, b = (estimate(X, SIGMAS, EstimatorConfig(estimator=name, subset_size=L, seed=7, rows_per_batch=r),
                         progress=False) for r in (36, 432))
        assert a.n_batches > b.n_batches == 1
        for col in ("j_star", "stderr", "bias", "ci_low", "ci_high"):
            np.testing.assert_allclose(getattr(a, col), getattr(b, col), rtol=1e-5, err_msg=(name, col))


@pytest.mark.parametrize("n, size", [(1000, 30), (40, 9), (12, 7), (5, 5)])
def test_draws_are_uniform_samples_without_replacement(n, size):
    seeds = query_seeds(9, 0, np.arange(20000), np.zeros(20000), 2)
    d = uniform_without_replacement(seeds, n, size)
    assert d.shape == (20000, size) and d.min() >= 0 and d.max() < n
    assert all(len(set(row)) == size for row in d[:2000].tolist())
    # every index equally likely, at every position (ordered uniform sample): within 5 binomial sds
    expected = 20000 / n
    for col in (0, size - 1):
        counts = torch.bincount(d[:, col], minlength=n).numpy()
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 1), (col, counts)


def test_draws_follow_one_stream_per_seed_in_the_rare_long_row():
    # a first chunk of `size` integers often holds a repeat: those rows continue their stream; both
    # paths must be the distinct values of the seeded stream in order of first appearance
    seeds = query_seeds(4, 0, np.arange(300), np.zeros(300), 2)
    n, size = 100, 20
    d = uniform_without_replacement(seeds, n, size, chunk=size)
    g = torch.Generator()
    for i, s in enumerate(seeds.tolist()):
        g.manual_seed(s)
        seen: list[int] = []
        while len(seen) < size:
            for v in torch.randint(n, (size,), generator=g).tolist():
                if v not in seen:
                    seen.append(v)
        assert d[i].tolist() == seen[:size], i
