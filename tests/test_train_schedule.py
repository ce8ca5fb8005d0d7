"""lossfloor.train schedules and losses: the optimal-loss weight, the binned p(sigma), the gap tracker.

Oracles: the weight formula of paper §4 evaluated by hand; a chi-square goodness-of-fit test of the
sampler's bin counts against p; a synthetic loss J(sigma) = J*(sigma) + g(sigma) with known g, whose
tracked gap and p(sigma) are computed by quadrature; the identity w ||D - x0||^2 = ||F - target||^2 for
w = 1/c_out^2 (paper Eq. 12).
"""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from lossfloor.diffusion import get_preconditioning
from lossfloor.errors import InputError
from lossfloor.train import (
    Denoiser,
    EDM2Schedule,
    FMSchedule,
    GapTracker,
    JStarCurve,
    OptimalLossSchedule,
    build_schedule,
    training_loss,
    x0_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# A J* table: zero up to sigma = 0.05, then tv * (s^2 - 0.05^2) / (s^2 + 1), on a log grid
TV = 20.0
GRID = np.geomspace(1e-3, 100.0, 21)


def jstar_formula(s):
    return TV * np.maximum(s**2 - 0.05**2, 0) / (s**2 + 1)


def write_jstar(path, sigmas=GRID, j=None, sigma_star=0.06, tv=TV):
    j = jstar_formula(sigmas) if j is None else j
    n = len(sigmas)
    table = pa.table({
        "sigma": sigmas, "j_star": j, "stderr": np.zeros(n), "j_star_x0": j, "stderr_x0": np.zeros(n),
        "estimator": ["exact"] * n, "target": ["x0"] * n, "n_queries": [1] * n, "subset_size": [1] * n,
        "c": [1.0] * n, "total_variance": [tv] * n, "dataset_fingerprint": ["test"] * n,
    }).replace_schema_metadata({"sigma_star": str(sigma_star), "sigma_star_threshold": "0.001"})
    pq.write_table(table, path)
    return str(path)


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    return JStarCurve.from_path(write_jstar(tmp_path_factory.mktemp("jstar") / "jstar.parquet"))


def interp_jstar(s):
    """J* linear in ln sigma between GRID points (the documented interpolation), by numpy."""
    return np.interp(np.log(s), np.log(GRID), jstar_formula(GRID))


def test_jstar_curve_interpolates_in_log_sigma_and_is_constant_beyond(curve):
    s = torch.tensor([1e-4, 1e-3, 0.3, 1.0, 2.5, 100.0, 1e4], dtype=torch.float64)
    got = curve(s).numpy()
    expected = interp_jstar(s.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert got[0] == got[1] and got[-1] == got[-2]
    assert curve.table.sigma_star == pytest.approx(0.06) and curve.table.total_variance == TV


def test_optimal_weight_equals_the_formula_at_hand_picked_sigmas(curve):
    edm = get_preconditioning("edm")
    cfg = OptimalLossSchedule(a=2.0, w_max=5.0, b=3.0, mu=math.log(0.02), varsigma=0.5, sigma_star=0.06)
    sched = build_schedule(cfg, edm, P_mean=-0.4, P_std=1.0, jstar=curve)
    sigmas = [0.001, 0.01, 0.05, 0.059, 0.061, 0.1, 0.3, 1.0, 3.7, 80.0]
    got = sched.weight(torch.tensor(sigmas, dtype=torch.float64)).numpy()
    for s, w in zip(sigmas, got):
        j = float(interp_jstar(np.array([s]))[0])
        first = 2.0 * min(1 / j, 5.0) if j > 0 else 2.0 * 5.0
        focus = 3.0 * math.exp(-0.5 * ((math.log(s) - math.log(0.02)) / 0.5) ** 2) / (0.5 * math.sqrt(2 * math.pi))
        expected = first + (focus if s < 0.06 else 0.0)
        assert w == pytest.approx(expected, rel=1e-12), s


def test_optimal_weight_defaults_are_resolved_as_documented(curve):
    sched = build_schedule(OptimalLossSchedule(), get_preconditioning("edm"), P_mean=0, P_std=1, jstar=curve)
    assert sched.w_max == pytest.approx(1 / (1e-3 * TV))  # truncation at the sigma* level
    assert sched.sigma_star == pytest.approx(0.06) and sched.mu == pytest.approx(math.log(0.06))
    assert sched.b == pytest.approx(sched.w_max * math.sqrt(2 * math.pi))  # focus peak = a w_max
    w = sched.weight(torch.tensor([0.01, 50.0], dtype=torch.float64)).numpy()
    focus = math.exp(-0.5 * math.log(0.01 / 0.06) ** 2)  # b N(ln s; ln sigma*, 1) = w_max exp(-z^2/2)
    assert w[0] == pytest.approx(sched.w_max * (1 + focus), rel=1e-12)  # J* = 0 there: truncated
    assert w[1] == pytest.approx(1 / interp_jstar(np.array([50.0]))[0])


def test_edm2_and_fm_schedules_weight_by_the_native_loss_and_sample_log_normal():
    g = torch.Generator().manual_seed(0)
    edm = build_schedule(EDM2Schedule(), get_preconditioning("edm"), P_mean=-0.4, P_std=1.0, jstar=None)
    s = torch.tensor([0.01, 0.5, 10.0], dtype=torch.float64)
    np.testing.assert_allclose(edm.weight(s).numpy(), ((s**2 + 0.25) / (s * 0.5) ** 2).numpy(), rtol=1e-12)
    ln = torch.log(edm.sample_sigma(20000, g).double())
    assert ln.mean().item() == pytest.approx(-0.4, abs=0.03) and ln.std().item() == pytest.approx(1.0, abs=0.03)

    fm = build_schedule(FMSchedule(t_mean=0.5, t_std=0.8), get_preconditioning("fm"), P_mean=0, P_std=1, jstar=None)
    np.testing.assert_allclose(fm.weight(s).numpy(), ((1 + s) / s).square().numpy(), rtol=1e-12)
    t = fm.sample_sigma(20000, g).double()
    t = t / (1 + t)  # sigma = t / (1 - t)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.03) and logit.std().item() == pytest.approx(0.8, abs=0.03)
    assert not fm.uncertainty and edm.uncertainty


def _tracker(**kw):
    args = {"sigma_min": 0.002, "sigma_max": 80.0, "n_bins": 12, "halflife_n_img": 10**12, "uniform_mix": 0.1}
    return GapTracker(**{**args, **kw})


def test_sampler_draws_from_the_binned_p_chi_square():
    tr = _tracker()
    # a known, non-uniform weighted gap per bin (one bin negative: clipped to 0)
    wgap = torch.tensor([0.5, 1, 2, 4, 8, 4, 2, 1, 0.5, 0.25, -1, 0.1], dtype=torch.float64)
    stats_ = torch.stack([torch.ones(12), 2 * torch.ones(12), torch.ones(12), wgap])
    tr.update(stats_, 1)
    p = tr.probabilities().numpy()
    q = np.maximum(wgap.numpy(), 0)
    np.testing.assert_allclose(p, 0.9 * q / q.sum() + 0.1 / 12, rtol=1e-12)
    n = 30000
    sigma = tr.sample(n, torch.Generator().manual_seed(1))
    assert sigma.dtype == torch.float32 and sigma.min() >= 0.002 * 0.9999 and sigma.max() <= 80 * 1.0001
    counts = np.bincount(tr.bin_index(sigma).numpy(), minlength=12)
    assert stats.chisquare(counts, n * p).pvalue > 1e-3
    # within a bin, ln sigma is uniform
    x = (np.log(sigma.double().numpy()) - tr.log_edges[0]) / np.diff(tr.log_edges)[0]
    assert stats.kstest(x - np.floor(x), "uniform").pvalue > 1e-3


def test_tracker_follows_a_known_synthetic_gap(curve):
    edm = get_preconditioning("edm")
    cfg = OptimalLossSchedule(n_bins=8, halflife_n_img=16384, uniform_mix=0.2, sigma_min=0.01, sigma_max=10.0)
    sched = build_schedule(cfg, edm, P_mean=0, P_std=1, jstar=curve)
    tr = sched.tracker

    def g(s):  # the known gap, x0 units
        return 0.5 * s / (1 + s)

    gen = torch.Generator().manual_seed(0)
    noise_gen = torch.Generator().manual_seed(1)

    def feed(gap_fn, steps, batch=4096):
        for _ in range(steps):
            s = sched.sample_sigma(batch, gen).double()
            j = curve(s)
            loss = j + gap_fn(s) * (1 + 0.2 * torch.randn(batch, generator=noise_gen, dtype=torch.float64))
            tr.update(tr.batch_stats(s, loss, j, sched.weight(s)), batch)

    feed(g, 30)
    # expected per-bin means: sigma log-uniform within each bin (fine quadrature in ln sigma)
    u = (np.arange(2000) + 0.5) / 2000
    lo, hi = tr.log_edges[:-1, None], tr.log_edges[1:, None]
    s_fine = torch.as_tensor(np.exp(lo + u * (hi - lo)))  # (n_bins, 2000)
    gap_exp = g(s_fine).mean(1).numpy()
    wgap_exp = (sched.weight(s_fine.flatten()).view_as(s_fine) * g(s_fine)).mean(1).numpy()
    np.testing.assert_allclose(tr.gap().numpy(), gap_exp, rtol=0.05)
    np.testing.assert_allclose(tr.weighted_gap().numpy(), wgap_exp, rtol=0.05)
    p_exp = 0.8 * wgap_exp / wgap_exp.sum() + 0.2 / 8
    np.testing.assert_allclose(tr.probabilities().numpy(), p_exp, rtol=0.05)
    # the loss halves: after many half-lives the tracker has followed
    feed(lambda s: g(s) / 2, 40)  # 10 half-lives
    np.testing.assert_allclose(tr.gap().numpy(), gap_exp / 2, rtol=0.05)
    # state round trip
    other = build_schedule(cfg, edm, P_mean=0, P_std=1, jstar=curve)
    other.load_state_dict(sched.state_dict())
    assert torch.equal(other.tracker.probabilities(), tr.probabilities())


def test_tracker_before_observations_and_unobserved_bins():
    tr = _tracker(n_bins=4, uniform_mix=0.0)
    np.testing.assert_allclose(tr.probabilities().numpy(), 0.25)  # nothing observed: uniform
    stats_ = torch.zeros(4, 4, dtype=torch.float64)
    stats_[0, :2] = 1
    stats_[3, :2] = torch.tensor([1.0, 3.0])  # bins 2, 3 unobserved: they get the largest q (3)
    tr.update(stats_, 1)
    np.testing.assert_allclose(tr.probabilities().numpy(), np.array([1, 3, 3, 3]) / 10)
    assert np.isnan(tr.gap().numpy()[2:]).all()


def test_weighted_x0_loss_is_the_native_loss_for_edm_and_fm():
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def forward(self, x, c_noise, labels=None):
            return torch.tanh(x * 1.3 + c_noise.view(-1, 1, 1, 1))

    x0 = torch.randn(6, 1, 4, 4)
    eps = torch.randn(6, 1, 4, 4)
    sigma = torch.exp(torch.randn(6))
    for name in ("edm", "fm"):
        pre = get_preconditioning(name)
        den = Denoiser(Net(), pre)
        w = 1 / pre.c_out(sigma) ** 2
        L, lx0, u = training_loss(den, x0, sigma, eps, None, w, uncertainty=False)
        x_hat = x0 + sigma.view(-1, 1, 1, 1) * eps
        c_in, c_noise = pre.c_in(sigma.view(-1, 1, 1, 1)), pre.c_noise(sigma)
        native = (Net()(c_in * x_hat, c_noise) - pre.native_target(x0, x_hat, sigma.view(-1, 1, 1, 1)))
        np.testing.assert_allclose(L.numpy(), native.square().flatten(1).sum(1).numpy(), rtol=1e-4)
        np.testing.assert_allclose(lx0.numpy(), x0_loss(den(x_hat, sigma), x0).numpy(), rtol=1e-6)
        assert u is None


def test_edm2_uncertainty_loss_is_per_element_w_over_e_u_plus_u():
    class Net(torch.nn.Module):
        def forward(self, x, c_noise, labels=None):
            return 0.5 * x

    class Head(torch.nn.Module):
        def forward(self, c_noise):
            return 0.3 * c_noise

    pre = get_preconditioning("edm")
    den = Denoiser(Net(), pre, Head())
    x0, eps = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    sigma = torch.tensor([0.1, 1.0, 5.0])
    w = 1 / pre.c_out(sigma) ** 2
    L, _, u = training_loss(den, x0, sigma, eps, None, w, uncertainty=True)
    D = den(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma)
    u_exp = 0.3 * torch.log(sigma) / 4
    per_element = (w / torch.exp(u_exp)).view(-1, 1, 1, 1) * (D - x0) ** 2 + u_exp.view(-1, 1, 1, 1)
    np.testing.assert_allclose(L.numpy(), per_element.flatten(1).sum(1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(u.numpy(), u_exp.numpy(), rtol=1e-6)


@pytest.mark.parametrize("kwargs, field", [
    ({"a": -1.0}, "a"), ({"varsigma": 0}, "varsigma"), ({"n_bins": 0}, "n_bins"),
    ({"uniform_mix": 1.5}, "uniform_mix"), ({"sigma_min": 10.0, "sigma_max": 1.0}, "sigma_max"),
    ({"b": -2.0}, "b"), ({"halflife_n_img": 2.5}, "halflife_n_img"),
])
def test_bad_schedule_fields_raise_input_error_naming_the_field(kwargs, field):
    with pytest.raises(InputError, match=field):
        OptimalLossSchedule(**kwargs)
    with pytest.raises(InputError, match="P_std"):
        EDM2Schedule(P_std=-1.0)
    with pytest.raises(TypeError):
        OptimalLossSchedule(1.0)  # keyword-only


def test_optimal_loss_schedule_refuses_a_floor_without_variance(tmp_path):
    # identical samples: J* = 0 at every sigma and J*(inf) = 0; w_max = 1/(threshold J*(inf)) divided by zero
    zero = JStarCurve.from_path(write_jstar(tmp_path / "zero.parquet", j=np.zeros(len(GRID)), sigma_star=0.06, tv=0.0))
    with pytest.raises(InputError, match=r"J\*\(inf\) = 0 .*edm2 schedule"):
        build_schedule(OptimalLossSchedule(), get_preconditioning("edm"), P_mean=-0.4, P_std=1.0, jstar=zero)
