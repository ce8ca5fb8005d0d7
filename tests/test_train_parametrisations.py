"""The NCSN, DDPM-eps and VP-v parametrisations of `lossfloor train` against ground truth.

Oracles not taken from lossfloor: the exact posterior mean of a product data set (diagnose's oracle,
tests/diagnose_models.py) as each network's native output (its noise input c_noise undone by the inverse
of the published formula, written here), J* by quadrature (tests/oracles.py), the native targets by their definitions (NCSN -eps,
DDPM eps, v = a eps - s x0), the closed-form sigma distributions (log-uniform; the VP time t ~ U(t_min, 1)
inverted by hand) and DDPM's discrete linear-beta schedule (Ho et al. 2020) by cumulative product.
"""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from cli_run import cli
from diagnose_models import PosteriorMean
from lossfloor.diffusion import get_preconditioning
from lossfloor.train import (
    Denoiser,
    NCSNSchedule,
    TrainConfig,
    VPSchedule,
    build_schedule,
    evaluate,
    heun_sample,
    resolve,
    training_loss,
)
from oracles import product_data, product_optimal_loss

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = ("ncsn", "ddpm-eps", "vp-v")
VALUES = [[-1.0, 0.5, 1.0], [-0.5, 0.8]]  # a product set of 6 points in 2 dimensions
SIGMAS = (0.1, 0.3, 1.0, 3.0)  # below 0.1 J* is a rare-event tail the draws miss
B_D, B_MIN = 19.9, 0.1  # the linear-beta VP schedule in continuous time (Song et al. 2021; EDM Table 1, VP)


def sigma_of_noise_input(name, c_noise):
    """sigma from each row's published c_noise: ln sigma^2 (NCSN); 999 t of the VP schedule (DDPM);
    the cosine time (2/pi) arctan sigma (VP-v)."""
    if name == "ncsn":
        return torch.exp(c_noise / 2)
    if name == "ddpm-eps":
        t = c_noise / 999
        return torch.sqrt(torch.expm1(B_D * t**2 / 2 + B_MIN * t))
    return torch.tan(math.pi * c_noise / 2)


def native_target(name, x0, eps, sigma):
    """What each network is trained to predict, by its definition: NCSN -eps, DDPM eps, VP v = a eps - s x0."""
    if name == "ncsn":
        return -eps
    if name == "ddpm-eps":
        return eps
    a = 1 / torch.sqrt(1 + sigma**2)
    return a * eps - sigma * a * x0


class PosteriorNet(torch.nn.Module):
    """F(x_in, c_noise, labels): the native target of the exact posterior mean of `data` (diagnose's oracle,
    tests/diagnose_models.py, in the process's x_t: VE x_hat, VP x_hat / sqrt(1 + sigma^2)); NCSN's is -eps."""

    def __init__(self, name, data):
        super().__init__()
        self.name, self.sign = name, -1.0 if name == "ncsn" else 1.0
        self.oracle = PosteriorMean(torch.as_tensor(data), "vp-v" if name == "vp-v" else "eps",
                                    "ve" if name == "ncsn" else "vp")

    def forward(self, x_in, c_noise, labels=None):
        return self.sign * self.oracle(x_in, sigma_of_noise_input(self.name, c_noise.to(torch.float64)))


def target_factor(name, sigma):
    """J*_native / J*_x0 from the target's definition: eps = (x_hat - x0)/sigma, v = (a x_t - x0)/s."""
    return 1 / sigma**2 if name in ("ncsn", "ddpm-eps") else (1 + sigma**2) / sigma**2


@pytest.mark.parametrize("name", NEW)
def test_the_exact_posterior_mean_converts_to_jstar(name):
    data = product_data(VALUES).reshape(-1, 1, 1, 2)  # (6, 1, 1, 2)
    x0 = torch.as_tensor(np.tile(data, (2000, 1, 1, 1)))  # every point 2000 times, fixed noise per sigma
    precond = get_preconditioning(name)
    den = Denoiser(PosteriorNet(name, data), precond)
    one = torch.ones_like
    res = evaluate(den, x0, None, SIGMAS, seed=0, weight=one, reference_density=one, batch=4096,
                   to_native=precond.x0_to_native_loss)
    x_hat = torch.randn(256, 1, 1, 2, generator=torch.Generator().manual_seed(5)) * 1.5
    posterior_mean = PosteriorMean(torch.as_tensor(data), "x0", "ve")
    for sigma in SIGMAS:  # D through the table is the posterior mean itself, point by point
        s = torch.full((256,), sigma)
        torch.testing.assert_close(den(x_hat, s), posterior_mean(x_hat, s), rtol=1e-5, atol=1e-6)
    for k, sigma in enumerate(SIGMAS):
        j_star = product_optimal_loss(VALUES, sigma)
        assert abs(res.loss[k] - j_star) <= 4 * res.stderr[k] + 1e-9, (name, sigma, res.loss[k], j_star)
        factor = target_factor(name, sigma)
        assert abs(res.loss_native[k] - factor * j_star) <= factor * (4 * res.stderr[k] + 1e-9), (name, sigma)


@pytest.mark.parametrize("name", NEW)
def test_the_native_weighting_is_the_loss_on_the_networks_own_target(name):
    # w ||D - x0||^2 with the process's default schedule = ||F - target||^2, target by its definition
    gen = torch.Generator().manual_seed(1)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    torch.nn.init.normal_(net.weight, generator=gen)

    class F(torch.nn.Module):
        def forward(self, x, c_noise, labels=None):
            return net(x) + c_noise.view(-1, 1, 1, 1)

    precond = get_preconditioning(name)
    R = resolve(TrainConfig(process=name))
    schedule = build_schedule(R.schedule, precond, P_mean=0.0, P_std=1.0, jstar=None)
    assert type(R.schedule) is {"ncsn": NCSNSchedule, "ddpm-eps": VPSchedule, "vp-v": VPSchedule}[name]
    assert not schedule.uncertainty
    x0 = torch.randn(64, 1, 4, 4, generator=gen)
    eps = torch.randn(64, 1, 4, 4, generator=gen)
    sigma = schedule.sample_sigma(64, torch.Generator().manual_seed(2))
    L, _, _ = training_loss(Denoiser(F(), precond), x0, sigma, eps, None, schedule.weight(sigma), uncertainty=False)
    s = sigma.view(-1, 1, 1, 1).to(torch.float64)
    c_in = 1.0 if name == "ncsn" else 1 / torch.sqrt(1 + s**2)
    out = F()(((x0 + s * eps) * c_in).to(torch.float32), precond.c_noise(sigma)).to(torch.float64)
    direct = (out - native_target(name, x0.double(), eps.double(), s)).square().flatten(1).sum(1)
    torch.testing.assert_close(L.double(), direct, rtol=2e-4, atol=1e-4)


def _draws(schedule, n=200_000):
    return schedule.sample_sigma(n, torch.Generator().manual_seed(3)).double().numpy()


def test_ncsn_sigma_is_log_uniform():
    cfg = NCSNSchedule()
    s = _draws(build_schedule(cfg, get_preconditioning("ncsn"), P_mean=0, P_std=1, jstar=None))
    lo, hi = math.log(0.02), math.log(100.0)  # EDM Table 1, VE
    assert s.min() >= 0.02 * (1 - 1e-6) and s.max() <= 100 * (1 + 1e-6)
    assert stats.kstest(np.log(s), stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3


def vp_time_by_hand(sigma):
    """t of sigma = sqrt(exp(b_d t^2 / 2 + b_min t) - 1): the root of b_d t^2 / 2 + b_min t = ln(1 + sigma^2)."""
    return (np.sqrt(B_MIN**2 + 2 * B_D * np.log1p(sigma**2)) - B_MIN) / B_D


@pytest.mark.parametrize("name", ("ddpm-eps", "vp-v"))
def test_vp_sigma_follows_the_uniform_time_of_the_linear_beta_schedule(name):
    cfg = VPSchedule()
    schedule = build_schedule(cfg, get_preconditioning(name), P_mean=0, P_std=1, jstar=None)
    s = _draws(schedule)
    t_min = 1e-5
    assert stats.kstest(s, lambda x: (vp_time_by_hand(x) - t_min) / (1 - t_min)).pvalue > 1e-3
    # its density of ln sigma is the derivative of that CDF, and integrates to 1
    ln = np.linspace(math.log(0.0011), math.log(150.0), 4001)
    dens = schedule.reference_density(torch.as_tensor(np.exp(ln))).numpy()
    cdf = vp_time_by_hand(np.exp(ln)) / (1 - t_min)
    np.testing.assert_allclose(dens[1:-1], np.gradient(cdf, ln)[1:-1], rtol=1e-4)
    grid = np.linspace(math.log(1e-4), math.log(1e3), 200_001)
    total = np.trapezoid(schedule.reference_density(torch.as_tensor(np.exp(grid))).numpy(), grid)
    assert total == pytest.approx(1.0, abs=2e-3)


def test_the_vp_sigma_is_ddpms_discrete_schedule_in_continuous_time():
    # DDPM (Ho et al. 2020): beta linear from 1e-4 to 0.02 over T = 1000 steps, sigma_i = sqrt(1/abar_i - 1)
    T = 1000
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    sigma_ddpm = np.sqrt(1 / abar - 1)
    schedule = build_schedule(VPSchedule(), get_preconditioning("ddpm-eps"), P_mean=0, P_std=1, jstar=None)
    q = np.quantile(_draws(schedule), np.arange(1, T + 1) / T - 0.5 / T)  # the sigma of step i's time
    np.testing.assert_allclose(q[9:], sigma_ddpm[9:], rtol=0.06)  # O(beta) discretisation: 3.4 % at t = 1


@pytest.mark.parametrize("name", NEW)
def test_the_sampler_lands_on_the_data_through_each_table(name):
    # the probability-flow ODE in sigma with D from the network through the preconditioning table
    data = np.array([[-1.0, 0.5], [1.0, -0.5]], dtype=np.float32).reshape(2, 1, 1, 2)
    den = Denoiser(PosteriorNet(name, data), get_preconditioning(name))
    noise = torch.randn(64, 1, 1, 2, generator=torch.Generator().manual_seed(4))
    x = heun_sample(den, noise, num_steps=32).flatten(1).numpy()
    dist = np.abs(x[:, None, :] - data.reshape(1, 2, 2)).max(-1)  # (64, 2)
    assert dist.min(1).max() < 1e-2, dist.min(1).max()
    assert 10 <= int((dist[:, 0] < dist[:, 1]).sum()) <= 54  # both points, neither dropped


@pytest.mark.parametrize("name", NEW)
def test_a_tiny_run_trains_and_diagnoses_in_its_parametrisation(name, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(["train", "--data", "bundled:digits", "--process", name, "--images", "32", "--batch", "16",
                        "--eval-samples", "16", "--eval-sigmas", "0.05,0.5,5", "--unconditional", "--out", str(out)],
                       capsys)
    assert code == 0, err
    curve = pq.read_table(out / "loss_curve.parquet").to_pylist()
    per_sigma = [r for r in curve if r["sigma"] is not None]
    assert per_sigma and all(math.isfinite(r["loss"]) and math.isfinite(r["loss_native"]) for r in per_sigma)
    for r in per_sigma:  # the native loss is the x0 loss over c_out^2 of the table (written out here)
        s = r["sigma"]
        c_out2 = {"ncsn": s**2, "ddpm-eps": s**2, "vp-v": s**2 / (1 + s**2)}[name]
        assert r["loss_native"] == pytest.approx(r["loss"] / c_out2, rel=1e-9)
    config = json.loads(pq.read_schema(out / "loss_curve.parquet").metadata[b"config"])
    assert config["process"] == name
    assert config["schedule"]["kind"] == {"ncsn": "ncsn", "ddpm-eps": "vp", "vp-v": "vp"}[name]
    # diagnose reads the parametrisation from the run folder and measures the run's own evaluation
    d = tmp_path / "d.parquet"
    code, _, err = cli(["diagnose", "--model", str(out), "--data", "bundled:digits", "--estimator", "exact",
                        "--sigmas", "0.05,0.5,5", "--n-samples", "16", "--out", str(d), "--figure", "none"], capsys)
    assert code == 0, err
    table = pq.read_table(d)
    assert set(table.column("process").to_pylist()) == {"ve" if name == "ncsn" else "vp"}
    last = max(r["images"] for r in per_sigma)
    np.testing.assert_allclose(table.column("loss_x0").to_numpy(),
                               [r["loss"] for r in per_sigma if r["images"] == last], rtol=1e-5)
    assert config["schedule"]["kind"] in table.schema.metadata[b"weighting_own"].decode()


def test_a_config_names_its_parametrisation_and_round_trips():
    for name in NEW:
        cfg = TrainConfig(process=name, schedule=NCSNSchedule(sigma_min=0.01, sigma_max=50.0))
        back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and back.config_hash() == cfg.config_hash()
        assert resolve(back).preconditioning().name == name
    from lossfloor.errors import InputError

    for bad, words in ((lambda: TrainConfig(process="ve"), "process: expected one of edm, fm, ncsn, ddpm-eps, vp-v"),
                       (lambda: NCSNSchedule(sigma_min=10.0, sigma_max=1.0), "NCSNSchedule.sigma_max"),
                       (lambda: NCSNSchedule(sigma_min=0.0), "NCSNSchedule.sigma_min"),
                       (lambda: VPSchedule(t_min=1.0), "VPSchedule.t_min"),
                       (lambda: TrainConfig.from_dict({"schedule": {"kind": "ddpm"}}), "schedule.kind")):
        with pytest.raises(InputError, match=words.replace(".", r"\.")):
            bad()
