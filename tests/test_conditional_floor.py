"""The class-conditional floor J*_cond(σ) = Σ_c π_c J*_c(σ) against ground truth.

Ground truth: each class a product set, whose J*_c is a sum of 1-D quadratures (tests/oracles.py); data
whose classes split a product set by its first coordinate, so that J* of the whole set is a quadrature too
and J* - J*_cond is the first coordinate's 1-D floor (→ the between-class variance at large σ).
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

import lossfloor.cli
from lossfloor.data import labels_fingerprint, load
from lossfloor.errors import InputError
from lossfloor.floor import EstimatorConfig, build_table, estimate, estimate_conditional, read_table
from lossfloor.floor.classes import class_plan
from lossfloor.floor.conditional import combine
from lossfloor.floor.estimate import Estimate
from oracles import optimal_loss_1d, product_data, product_optimal_loss

# two classes of different shapes and sizes, labels 4 and 9 (not 0..K-1), rows interleaved
CLASS_A = [[-1.0], [0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.5, 3.0, 6.0], [0.0, 2.0]]  # 40 samples
CLASS_B = [[1.5], [-1.0, 1.0, 2.0], [0.0, 2.0, 3.0, 5.0, 7.0, 9.0], [0.0, 1.0]]  # 36 samples
SIGMAS = np.array([0.3, 0.8, 2.0, 6.0])


@pytest.fixture(scope="module")
def labelled():
    a, b = product_data(CLASS_A), product_data(CLASS_B)
    x = np.concatenate([a, b])
    labels = np.array([4] * len(a) + [9] * len(b))
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], labels[order]


def truth(sigma: float) -> float:
    """Σ_c π_c J*_c by quadrature."""
    na, nb = len(product_data(CLASS_A)), len(product_data(CLASS_B))
    return (na * product_optimal_loss(CLASS_A, sigma) + nb * product_optimal_loss(CLASS_B, sigma)) / (na + nb)


def within_class_variance(x, labels) -> float:
    return sum((labels == c).mean() * x[labels == c].var(0).sum() for c in np.unique(labels))


@pytest.mark.parametrize("cfg", [
    EstimatorConfig(estimator="exact", queries_per_sample=200, seed=2),
    EstimatorConfig(estimator="knn", subset_size=16, queries_per_sample=100, seed=2, rows_per_batch=400),
], ids=["exact", "knn"])
def test_conditional_floor_matches_quadrature_within_its_interval(labelled, cfg):
    x, labels = labelled
    est = estimate_conditional(x, labels, SIGMAS, cfg, progress=False)
    true = np.array([truth(s) for s in SIGMAS])
    assert np.all((est.ci_low <= true) & (true <= est.ci_high)), (est.ci_low, true, est.ci_high)
    assert np.all(est.ci_high - est.ci_low < 0.25 * true)  # not vacuous
    assert est.total_variance == pytest.approx(within_class_variance(x.astype(np.float64), labels), rel=1e-6)
    assert [(c["label"], c["n"], c["estimator"]) for c in est.classes] == [(4, 40, cfg.estimator), (9, 36, cfg.estimator)]
    assert est.labels_fingerprint == labels_fingerprint(labels) and est.n_queries == len(x) * cfg.queries_per_sample
    if cfg.estimator == "knn":
        assert np.all(est.allowance > 0) and est.config.subset_size == 16  # a real subset, with its bias allowance


def test_below_the_unconditional_floor_and_apart_by_the_between_class_variance():
    # classes = the first coordinate's value (π = 2/3, 1/3): J* - J*_cond = J1(first coordinate) exactly
    first, second = [-1.0, -1.0, 1.5], [0.0, 2.0, 5.0, 5.5]
    x = product_data([first, second])
    labels = (x[:, 0] > 0).astype(np.int64)
    sigmas = np.array([0.2, 0.7, 2.0, 8.0, 1000.0])
    cfg = EstimatorConfig(estimator="exact", queries_per_sample=400, seed=5)
    cond = estimate_conditional(x, labels, sigmas, cfg, progress=False)
    uncond = estimate(x, sigmas, cfg, progress=False)
    oracle_cond = np.array([optimal_loss_1d(second, s) for s in sigmas])
    oracle = oracle_cond + np.array([optimal_loss_1d(sorted(first), s) for s in sigmas])
    assert np.all((cond.ci_low <= oracle_cond) & (oracle_cond <= cond.ci_high))
    assert np.all(oracle_cond < oracle) and np.all(cond.ci_low <= uncond.ci_high)  # equal floors at σ = 0.2
    assert np.all(cond.j_star[1:] < uncond.j_star[1:])  # where the floors differ by more than the noise
    between = np.var(first)  # the between-class variance: the class means are the first coordinate's values
    assert cond.total_variance == pytest.approx(np.var(second), rel=1e-6)  # within-class variance
    assert uncond.total_variance - cond.total_variance == pytest.approx(between, rel=1e-6)
    assert uncond.j_star[-1] - cond.j_star[-1] == pytest.approx(between, rel=1e-3)  # σ = 1000


def test_intervals_combine_in_quadrature_and_allowances_linearly(labelled):
    x, labels = labelled
    plan = class_plan(labels, EstimatorConfig(estimator="knn", subset_size=8), x.shape[1])
    cfgs = plan.configs

    def part(j, se, a, dof, tv, cfg):
        n = len(j)
        return Estimate(sigmas=np.arange(1.0, n + 1), j_star=np.array(j), stderr=np.array(se), bias=np.array(a),
                        ci_low=np.zeros(n), ci_high=np.ones(n), allowance=np.array(a), total_variance=tv, config=cfg,
                        n_queries=10, n_batches=5, subset_size=np.full(n, 8), dof=dof)

    a = part([1.0, 2.0], [0.1, 0.0], [0.05, 0.0], 8, 5.0, cfgs[0])
    b = part([3.0, 4.0], [0.3, 0.0], [0.2, 0.0], 20, 9.0, cfgs[1])
    est = combine(plan, [a, b])
    pa, pb = 40 / 76, 36 / 76
    assert est.j_star == pytest.approx([pa * 1 + pb * 3, pa * 2 + pb * 4])
    se = np.sqrt((pa * 0.1) ** 2 + (pb * 0.3) ** 2)
    allowance = pa * 0.05 + pb * 0.2
    va, vb = (pa * 0.1) ** 2, (pb * 0.3) ** 2
    t = stats.t.ppf(0.975, np.floor((va + vb) ** 2 / (va**2 / 8 + vb**2 / 20)))  # Welch–Satterthwaite
    assert est.stderr[0] == pytest.approx(se) and est.allowance[0] == pytest.approx(allowance)
    assert est.ci_low[0] == pytest.approx(est.j_star[0] - allowance - t * se)
    assert est.ci_high[0] == pytest.approx(est.j_star[0] + allowance + t * se)
    assert est.ci_low[1] == est.ci_high[1] == pytest.approx(est.j_star[1])  # no noise, no allowance
    assert est.total_variance == pytest.approx(pa * 5 + pb * 9)


def test_class_plan_numbers_batches_class_after_class(labelled):
    x, labels = labelled
    plan = class_plan(labels, EstimatorConfig(estimator="knn", subset_size=64, rows_per_batch=9), x.shape[1])
    assert plan.labels.tolist() == [4, 9] and [len(m) for m in plan.members] == [40, 36]
    assert all(np.all(labels[m] == c) for m, c in zip(plan.members, plan.labels))
    assert [c.estimator for c in plan.configs] == ["exact", "exact"]  # L >= N_c: the whole class
    assert [(p.first_batch, p.n_batches) for p in plan.plans] == [(0, 14), (14, 12)] and plan.n_batches == 26
    assert plan.class_of(13) == 0 and plan.class_of(14) == 1 and plan.queries(14) == range(0, 9)  # 9 queries
    with pytest.raises(InputError, match="class 3 has 1 sample"):
        class_plan(np.array([0, 0, 3]), EstimatorConfig(), 2)
    with pytest.raises(InputError, match="--rel-error"):
        class_plan(labels, EstimatorConfig(rel_error=0.1), 2)


class Interrupt(Exception):
    pass


def test_resumes_from_its_work_folder_with_the_same_numbers(labelled, tmp_path):
    x, labels = labelled
    cfg = EstimatorConfig(estimator="knn", subset_size=8, seed=3, rows_per_batch=12)  # 10 + 9 batches of queries
    whole = estimate_conditional(x, labels, SIGMAS, cfg, progress=False)
    seen = []

    def stop(part):
        seen.append(part.batch_index)
        if len(seen) == 12:  # past the first class's 10 batches
            raise Interrupt

    with pytest.raises(Interrupt):
        estimate_conditional(x, labels, SIGMAS, cfg, work_dir=tmp_path / "w", progress=False, on_batch=stop)
    again = estimate_conditional(x, labels, SIGMAS, cfg, work_dir=tmp_path / "w", progress=False)
    (stats,) = again.passes
    assert (stats.reused, stats.computed) == (12, 7)
    for name in ("j_star", "stderr", "ci_low", "ci_high"):
        np.testing.assert_array_equal(getattr(again, name), getattr(whole, name))
    with pytest.raises(InputError, match="labels_fingerprint"):  # other labels: another estimate's folder
        estimate_conditional(x, labels[::-1].copy(), SIGMAS, cfg, work_dir=tmp_path / "w", progress=False)


def test_cli_conditional_table_on_the_digits(tmp_path, capsys):
    out = tmp_path / "cond.parquet"
    argv = ["estimate", "--data", "bundled:digits", "--sigmas", "1,4,20", "--estimator", "exact", "--conditional",
            "--json", "--out", str(out)]
    assert lossfloor.cli.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    digits = load("bundled:digits")
    meta = pq.read_schema(out).metadata
    assert meta[b"class_conditional"] == b"true"
    assert meta[b"labels_fingerprint"].decode() == labels_fingerprint(digits.labels)
    assert [c["n"] for c in json.loads(meta[b"classes"])] == np.bincount(digits.labels).tolist()
    x0 = read_table(out).x0()
    assert x0.class_conditional and x0.fingerprint == digits.fingerprint
    assert x0.total_variance == pytest.approx(within_class_variance(digits.samples.reshape(len(digits), -1)
                                                                    .astype(np.float64), digits.labels), rel=1e-6)
    uncond = build_table(estimate(digits.samples, [1, 4, 20], EstimatorConfig(estimator="exact"), progress=False))
    assert all(r["j_star"] < u["j_star"] for r, u in zip(rows, uncond.rows()))
