"""lossfloor.diffusion against ground truth, not against its own formulas.

Oracle: data uniform on {-1, +1} (one coordinate; a product data set's J* is the sum over coordinates).
In VE coordinates x_hat = x0 + sigma eps the posterior mean is E[x0|x_hat] = tanh(x_hat / sigma^2), so
J*_x0(sigma) = 1 - E[tanh^2(x_hat / sigma^2)] = E[sech^2(x_hat / sigma^2)], integrated by scipy quad.
Every other optimal loss is computed here from its target's definition, in the process's own x_t.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import expit

from lossfloor.diffusion import (
    PRECONDITIONINGS,
    PROCESSES,
    TARGETS,
    check_target,
    convert_jstar,
    edm,
    get_preconditioning,
    get_process,
    jstar_factor,
    log_grid,
    parse_sigma_grid,
    parse_sigmas,
)
from lossfloor.errors import InputError

SIGMAS = [0.05, 0.1, 0.3, 1.0, 2.5, 7.0, 20.0]
RTOL = 1e-6


# --- Quadrature oracles ---------------------------------------------------------------------------


def _quad(f, lo, hi, points=(), epsrel=1e-11):
    """Integral of f over [lo, hi] split at `points`, to `epsrel` relative (no absolute floor)."""
    edges = [lo, *sorted(p for p in points if lo < p < hi), hi]
    return sum(quad(f, a, b, epsabs=0.0, epsrel=epsrel, limit=500)[0] for a, b in itertools.pairwise(edges))


def _normal_pdf(x, mean=0.0, std=1.0):
    """N(x; mean, std^2) for a python float (scipy.stats is slow per scalar call)."""
    z = (x - mean) / std
    return math.exp(-0.5 * z * z) / (std * math.sqrt(2.0 * math.pi))


def _sech2(u):
    """sech^2(u) = 1 - tanh^2(u), computed without cancellation."""
    e = math.exp(-2.0 * abs(u))
    return 4.0 * e / (1.0 + e) ** 2


def jstar_x0_oracle(sigma):
    """J*_x0 = integral of p(x_hat) (1 - tanh^2(x_hat / sigma^2)) over the mixture density of x_hat."""

    def integrand(x):  # symmetric in x, so integrate over x >= 0 and double
        p = 0.5 * (_normal_pdf(x, 1.0, sigma) + _normal_pdf(x, -1.0, sigma))
        return p * _sech2(x / sigma**2)

    return 2.0 * _quad(integrand, 0.0, 1.0 + 40.0 * sigma, points=(sigma**2, 10 * sigma**2, 1.0))


def one_minus_tanh2_oracle(sigma):
    """1 - E[tanh^2(x_hat / sigma^2)], the literal Theorem 1 form (A - B); accurate where J* is not tiny."""

    def integrand(x):
        p = 0.5 * (_normal_pdf(x, 1.0, sigma) + _normal_pdf(x, -1.0, sigma))
        return p * math.tanh(x / sigma**2) ** 2

    return 1.0 - 2.0 * _quad(integrand, 0.0, 1.0 + 40.0 * sigma, points=(sigma**2, 1.0))


def _expect(f, peak, epsrel=1e-11):
    """E_eps f(eps) for eps ~ N(0, 1), split at `peak` (where x_t = 0 and the posterior is uncertain)."""
    lo, hi = min(-40.0, peak - 40.0), max(40.0, peak + 40.0)
    return _quad(
        lambda e: _normal_pdf(e) * f(e), lo, hi, points=(peak, peak - 1.0, peak + 1.0), epsrel=epsrel
    )


def jstar_by_definition(target, a, s):
    """min_F E (F(x_t) - target(x0, eps))^2 for x_t = a x0 + s eps, data uniform on {-1, +1}.

    The minimiser is E[target | x_t] = sum_x0' p(x0' | x_t) target(x0', eps'), eps' = (x_t - a x0') / s,
    with p(x0' | x_t) proportional to N(x_t; a x0', s^2). So target - E[target | x_t] is
    p(other | x_t) (target(x0, eps) - target(other, eps_other)), evaluated without cancellation.
    """
    total = 0.0
    for x0 in (-1.0, 1.0):
        other = -x0

        def squared_error(eps, x0=x0, other=other):
            xt = a * x0 + s * eps
            eps_other = (xt - a * other) / s
            p_other = expit((eps**2 - eps_other**2) / 2.0)  # log N(x_t; a other, s^2) - log N(x_t; a x0, s^2)
            return (p_other * (target(x0, eps) - target(other, eps_other))) ** 2

        total += 0.5 * _expect(squared_error, peak=-a * x0 / s)
    return total


# Each process's scales at VE noise level sigma, written out here (not taken from the library).
def ve_scales(sigma):
    return 1.0, sigma


def vp_scales(sigma):
    a = 1.0 / (1.0 + sigma**2) ** 0.5
    return a, sigma * a


def fm_scales(sigma):
    t = sigma / (1.0 + sigma)
    return 1.0 - t, t


# Named targets by their definitions: (process scales, target(x0, eps) at sigma).
TARGET_DEFINITIONS = {
    "x0": (ve_scales, lambda sigma: lambda x0, eps: x0),
    "eps": (ve_scales, lambda sigma: lambda x0, eps: eps),
    "score": (ve_scales, lambda sigma: lambda x0, eps: -eps / sigma),
    "fm-velocity": (fm_scales, lambda sigma: lambda x0, eps: eps - x0),
    "vp-v": (vp_scales, lambda sigma: lambda x0, eps: vp_scales(sigma)[0] * eps - vp_scales(sigma)[1] * x0),
}


@pytest.fixture(scope="module")
def jstar_x0():
    return {sigma: jstar_x0_oracle(sigma) for sigma in SIGMAS}


def test_oracle_forms_agree(jstar_x0):
    for sigma in SIGMAS:
        by_definition = jstar_by_definition(lambda x0, eps: x0, *ve_scales(sigma))
        assert by_definition == pytest.approx(jstar_x0[sigma], rel=1e-9)
        if sigma >= 0.3:  # 1 - E tanh^2 loses digits when J* is tiny
            assert one_minus_tanh2_oracle(sigma) == pytest.approx(jstar_x0[sigma], rel=1e-9)
    # limits: 0 at small sigma, the data variance 1 at large sigma, non-decreasing between
    values = [jstar_x0[sigma] for sigma in SIGMAS]
    assert values[0] < 1e-80 and values[-1] == pytest.approx(1.0, abs=5e-3)
    assert all(a < b for a, b in itertools.pairwise(values))
    # small sigma: p(x_hat) ~ phi(1/sigma) cosh(x_hat/sigma^2) / sigma near 0, so J* ~ pi sigma phi(1/sigma)
    assert jstar_x0[0.05] == pytest.approx(math.pi * 0.05 * _normal_pdf(1 / 0.05), rel=1e-2)


# --- Targets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_jstar_factor_matches_definition(target, jstar_x0):
    scales, definition = TARGET_DEFINITIONS[target]
    for sigma in SIGMAS:
        expected = jstar_by_definition(definition(sigma), *scales(sigma))
        assert jstar_factor(target, sigma) * jstar_x0[sigma] == pytest.approx(expected, rel=RTOL)
        assert convert_jstar(jstar_x0[sigma], sigma, target) == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("scales", [vp_scales, fm_scales])
def test_x0_and_eps_floors_do_not_depend_on_the_process(scales, jstar_x0):
    for sigma in (0.1, 1.0, 7.0):
        assert jstar_by_definition(lambda x0, eps: x0, *scales(sigma)) == pytest.approx(
            jstar_x0[sigma], rel=RTOL
        )
        assert jstar_by_definition(lambda x0, eps: eps, *scales(sigma)) == pytest.approx(
            jstar_factor("eps", sigma) * jstar_x0[sigma], rel=RTOL
        )


def test_jstar_factor_types_and_names():
    sigma = np.array([0.5, 2.0])
    for target in TARGETS:
        assert isinstance(jstar_factor(target, 2.0), float)
        np.testing.assert_allclose(jstar_factor(target, sigma), [jstar_factor(target, s) for s in sigma])
        got = jstar_factor(target, torch.tensor(sigma))
        assert isinstance(got, torch.Tensor)
        np.testing.assert_allclose(got.numpy(), jstar_factor(target, sigma))
    with pytest.raises(InputError, match=r"^target: expected one of .*'fm-velocity'.*'vp-v', got 'v'$"):
        jstar_factor("v", 1.0)
    with pytest.raises(InputError):
        convert_jstar(0.1, 1.0, "velocity")
    assert check_target("vp-v") == "vp-v"
    with pytest.raises(
        InputError, match=r"^--target: expected one of 'x0', 'eps', 'score', 'fm-velocity', 'vp-v'"
    ):
        check_target("X0", field="--target")


# --- Preconditioning tables -----------------------------------------------------------------------

TABLES = [get_preconditioning(name) for name in PRECONDITIONINGS] + [edm(sigma_data=1.7)]
TABLE_IDS = [f"{p.name}-sd{p.sigma_data}" if p.sigma_data else p.name for p in TABLES]


def documented_target(table, x0, eps, sigma):
    """What the parametrisation is documented to predict, built from (x0, eps) and its process."""
    if table.name == "edm":  # -1 x VP v-prediction of x0 / sd at noise level sigma / sd
        sd = table.sigma_data
        a, s = vp_scales(sigma / sd)
        return -(a * eps - s * x0 / sd)
    if table.name == "fm":
        return eps - x0
    if table.name == "ncsn":
        return -eps
    if table.name == "ddpm-eps":
        return eps
    if table.name == "vp-v":
        a, s = vp_scales(sigma)
        return a * eps - s * x0
    raise AssertionError(table.name)


PROCESS_SCALES = {"ve": ve_scales, "vp": vp_scales, "fm": fm_scales}


@pytest.mark.parametrize("table", TABLES, ids=TABLE_IDS)
def test_native_target_is_documented_target(table):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, dtype=torch.float64, generator=gen)
    eps = torch.randn(64, 3, dtype=torch.float64, generator=gen)
    sigma = torch.exp(torch.empty(64, 1, dtype=torch.float64).uniform_(-4.0, 4.0, generator=gen))  # (B, 1)
    x_hat = x0 + sigma * eps
    native = table.native_target(x0, x_hat, sigma)
    torch.testing.assert_close(native, documented_target(table, x0, eps, sigma), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(table.denoise(native, x_hat, sigma), x0, rtol=1e-10, atol=1e-10)
    # the network sees the process's own x_t (EDM: the VP x_t of x0 / sd at sigma / sd)
    sd = table.sigma_data or 1.0
    a, s = vp_scales(sigma / sd) if table.name == "edm" else PROCESS_SCALES[table.process](sigma)
    torch.testing.assert_close(table.c_in(sigma) * x_hat, a * x0 / sd + s * eps, rtol=1e-10, atol=1e-10)
    if table.target is not None:  # F* = target_sign * named target, whose floor scales by 1/c_out^2
        _, definition = TARGET_DEFINITIONS[table.target]
        for sig in (0.3, 2.0):
            x0_, eps_ = 0.7, -1.3
            assert documented_target(table, x0_, eps_, sig) == pytest.approx(
                table.target_sign * definition(sig)(x0_, eps_), rel=1e-12
            )
            assert jstar_factor(table.target, sig) == pytest.approx(1 / table.c_out(sig) ** 2, rel=1e-12)


# quad reports roundoff at sigma = 0.1, where f_star - target cancels; the result still agrees to ~1e-14
@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("table", TABLES, ids=TABLE_IDS)
def test_optimal_network_native_loss_converts_to_jstar(table, sigma, jstar_x0):
    c_skip, c_out, _, _ = table.coefficients(sigma)

    def native_error(eps, x0):
        x_hat = x0 + sigma * eps
        f_star = (math.tanh(x_hat / sigma**2) - c_skip * x_hat) / c_out  # posterior mean through D^-1
        return (f_star - table.native_target(x0, x_hat, sigma)) ** 2

    # (f_star - target) cancels to roundoff where tanh saturates: ask quad for 1e-9 only
    loss_native = sum(
        0.5 * _expect(lambda e, x0=x0: native_error(e, x0), -x0 / sigma, epsrel=1e-9) for x0 in (-1, 1)
    )
    assert table.native_to_x0_loss(loss_native, sigma) == pytest.approx(jstar_x0[sigma], rel=RTOL)

    # and the floor of the documented target, from its definition, converts the same way
    scales = PROCESS_SCALES[table.process]
    floor_native = jstar_by_definition(
        lambda x0, eps: documented_target(table, x0, eps, sigma), *scales(sigma)
    )
    assert table.native_to_x0_loss(floor_native, sigma) == pytest.approx(jstar_x0[sigma], rel=RTOL)
    assert table.x0_to_native_loss(jstar_x0[sigma], sigma) == pytest.approx(floor_native, rel=RTOL)


def test_published_coefficients_and_noise_inputs():
    sd = 0.5
    for sigma in (0.1, 1.0, 3.0):
        assert get_preconditioning("edm").coefficients(sigma) == pytest.approx(
            (sd**2 / (sigma**2 + sd**2), sigma * sd / math.hypot(sigma, sd), 1 / math.hypot(sigma, sd),
             math.log(sigma) / 4)
        )  # fmt: skip
        assert get_preconditioning("fm").coefficients(sigma) == pytest.approx(
            (1 / (1 + sigma), -sigma / (1 + sigma), 1 / (1 + sigma), sigma / (1 + sigma))
        )
        assert get_preconditioning("ncsn").coefficients(sigma) == pytest.approx(
            (1, sigma, 1, math.log(sigma**2))
        )
    # DDPM eps: EDM Table 1 VP schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), c_noise = 999 t
    for t in (1e-3, 0.3, 1.0):
        sigma = math.sqrt(math.expm1(19.9 * t**2 / 2 + 0.1 * t))
        assert get_preconditioning("ddpm-eps").c_noise(sigma) == pytest.approx(999 * t, rel=1e-9)
        # VP v: cosine schedule s_t = sin(pi t / 2), a_t = cos(pi t / 2), so sigma = tan(pi t / 2)
        assert get_preconditioning("vp-v").c_noise(math.tan(math.pi * t / 2)) == pytest.approx(t, rel=1e-9)


@pytest.mark.parametrize("table", TABLES, ids=TABLE_IDS)
def test_coefficients_on_floats_numpy_and_torch(table):
    sigma = np.array([0.02, 0.7, 40.0])
    as_numpy = table.coefficients(sigma)
    as_torch = table.coefficients(torch.tensor(sigma))
    for i, s in enumerate(sigma):
        assert all(isinstance(c, float) for c in table.coefficients(float(s)))
        np.testing.assert_allclose([c[i] for c in as_numpy], table.coefficients(float(s)), rtol=1e-12)
    for n, t in zip(as_numpy, as_torch):
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
        np.testing.assert_allclose(t.numpy(), n, rtol=1e-12)


def test_table_registry_records_process_and_target():
    assert PRECONDITIONINGS == ("edm", "fm", "ncsn", "ddpm-eps", "vp-v")
    recorded = {p.name: (p.process, p.target, p.target_sign) for p in TABLES[:5]}
    assert recorded == {
        "edm": ("ve", None, 1.0),
        "fm": ("fm", "fm-velocity", 1.0),
        "ncsn": ("ve", "eps", -1.0),
        "ddpm-eps": ("vp", "eps", 1.0),
        "vp-v": ("vp", "vp-v", 1.0),
    }
    assert get_preconditioning("edm").sigma_data == 0.5
    assert get_preconditioning("edm", sigma_data=0.25) == edm(0.25) != edm(0.5)
    with pytest.raises(InputError, match=r"^preconditioning: expected one of 'edm'.*got 'sd3'$"):
        get_preconditioning("sd3")
    with pytest.raises(InputError, match=r"^sigma_data: "):
        get_preconditioning("fm", sigma_data=0.5)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(InputError, match=r"^sigma_data: expected a positive number"):
            edm(bad)


# --- Processes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROCESSES)
def test_process_scales_and_round_trips(name):
    process = get_process(name)
    sigmas = np.geomspace(1e-3, 1e3, 25)
    for sigma in sigmas:
        a, s = process.scales(float(sigma))
        assert (a, s) == pytest.approx(PROCESS_SCALES[name](float(sigma)), rel=1e-12)
        assert process.sigma(process.t(float(sigma))) == pytest.approx(sigma, rel=1e-12)
    np.testing.assert_allclose(process.sigma(process.t(sigmas)), sigmas, rtol=1e-12)
    ts = process.t(torch.tensor(sigmas))
    assert isinstance(ts, torch.Tensor)
    torch.testing.assert_close(process.t(process.sigma(ts)), ts, rtol=1e-12, atol=0)
    if name == "vp":
        np.testing.assert_allclose(process.a(sigmas) ** 2 + process.s(sigmas) ** 2, 1.0, rtol=1e-14)
    if name == "fm":
        np.testing.assert_allclose(process.a(ts.numpy()) + process.s(ts.numpy()), 1.0, rtol=1e-14)
    # x_hat = x_t / a = x0 + sigma eps
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 8, 5, dtype=torch.float64, generator=gen)
    sigma = torch.tensor([[0.01], [0.4], [1.0], [2.0], [9.0], [30.0], [100.0], [500.0]], dtype=torch.float64)
    t = process.t(sigma)
    xt = process.a(t) * x0 + process.s(t) * eps
    torch.testing.assert_close(process.x_hat(xt, t), x0 + sigma * eps, rtol=1e-12, atol=1e-12)


def test_process_registry():
    assert PROCESSES == ("ve", "vp", "fm")
    with pytest.raises(InputError, match=r"^process: expected one of 've', 'vp', 'fm', got 'edm'$"):
        get_process("edm")


# --- Sigma grids ----------------------------------------------------------------------------------


def test_log_grid():
    grid = log_grid(0.002, 80.0, 64)
    assert grid.dtype == np.float64 and grid.shape == (64,)
    assert grid[0] == 0.002 and grid[-1] == 80.0
    assert np.all(np.diff(grid) > 0)
    np.testing.assert_allclose(grid[1:] / grid[:-1], (80.0 / 0.002) ** (1 / 63), rtol=1e-12)
    np.testing.assert_allclose(log_grid(0.1, 10.0, 3), [0.1, 1.0, 10.0], rtol=1e-15)
    for args in [(0.0, 1.0, 5), (-1.0, 1.0, 5), (1.0, 1.0, 5), (2.0, 1.0, 5), (0.1, math.inf, 5),
                 (math.nan, 1.0, 5), (0.1, 1.0, 1), (0.1, 1.0, 0), (0.1, 1.0, 2.5)]:  # fmt: skip
        with pytest.raises(InputError):
            log_grid(*args)


def test_parse_sigmas():
    parsed = parse_sigmas("2, 0.1,0.5,0.1,2e0")
    assert parsed.dtype == np.float64
    np.testing.assert_array_equal(parsed, [0.1, 0.5, 2.0])
    np.testing.assert_array_equal(parse_sigmas("0.5"), [0.5])
    bad = ["", "abc", "0.1,,2", "0.1,abc", "0", "0.1,-1", "nan", "inf", "0.1;0.5", "1:2:3", "1e400", "1e-300,1",
           "1e300", "5e-11"]
    for text in bad:
        with pytest.raises(
            InputError, match=r"^--sigmas: expected numbers in \[1e-10, 1e\+10\] like 0.1,0.5,2, got "
        ) as err:
            parse_sigmas(text)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"^--noise: "):
        parse_sigmas("x", flag="--noise")


def test_parse_sigma_grid():
    np.testing.assert_array_equal(parse_sigma_grid("0.002:80:64"), log_grid(0.002, 80.0, 64))
    np.testing.assert_allclose(parse_sigma_grid(" 0.1 : 10 : 3 "), [0.1, 1.0, 10.0], rtol=1e-15)
    bad = ["", "0.1:1", "0.1:1:5:6", "1:0.1:5", "1:1:3", "0:1:5", "-1:1:5", "a:1:5", "0.1:b:5", "0.1:1:c",
           "0.1:1:1", "0.1:1:0", "0.1:1:-3", "0.1:1:2.5", "0.1:inf:5", "nan:1:5", "0.1,1,5"]  # fmt: skip
    for text in bad:
        with pytest.raises(InputError, match=r"^--sigma-grid: expected MIN:MAX:COUNT") as err:
            parse_sigma_grid(text)
        assert "\n" not in str(err.value)
