"""The paper-claims computations (`lossfloor.claims`) on tiny inputs with known answers."""

import math

import numpy as np
import pytest
from scipy import optimize

from lossfloor.claims import estimators, seeds, survey
from lossfloor.floor import EstimatorConfig, estimate
from oracles import product_data, product_optimal_loss


def test_interval_is_students_t_and_covers():
    iv = seeds.interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.hi - 2.0 == pytest.approx(4.302652729749464 / math.sqrt(3))  # t(0.975, 2)
    assert seeds.interval([5.0]) == seeds.Interval(5.0, 5.0, 5.0, 1)
    rng = np.random.default_rng(0)
    hits = sum(iv.lo <= 1.5 <= iv.hi for iv in (seeds.interval(rng.normal(1.5, 2.0, 5)) for _ in range(4000)))
    assert 0.93 < hits / 4000 < 0.97
    with pytest.raises(ValueError):
        seeds.interval([1.0, math.nan])
    with pytest.raises(ValueError):
        seeds.paired([1.0, 2.0], [1.0])


def test_relative_errors_leave_out_the_floor():
    e = estimators.relative_errors([1.1, 0.5, 2e-4], [1.0, 0.4, 1e-4], total_variance=1.0)
    np.testing.assert_allclose(e[:2], [0.1, 0.25])
    assert math.isnan(e[2])  # J_exact below 1e-3 J*(∞)


def _rows(scores_by_label: dict[str, list[float]], queries: int = 100) -> dict:
    """A sweep result whose per-seed scores are the given ones (one σ, |e| = score)."""
    rows = [{"label": label, "seed": s, "queries": queries, "sigma": 1.0, "rel_error": v}
            for label, vals in scores_by_label.items() for s, v in enumerate(vals)]
    return {"labels": list(scores_by_label), "seeds": list(range(len(next(iter(scores_by_label.values()))))),
            "sigmas": [1.0], "rows": rows}


def test_c_claim_verdicts():
    base = {"DOL (C=1)": [0.5, 0.6, 0.55, 0.52, 0.58], "C=N/L": [0.2, 0.25, 0.22, 0.21, 0.24],
            estimators.PAPER_C: [0.1, 0.12, 0.11, 0.1, 0.13], "C=16N/L": [0.3, 0.33, 0.31, 0.3, 0.35],
            "SNIS (C=∞)": [0.6, 0.7, 0.65, 0.62, 0.66], "knn": [0.01, 0.02, 0.015, 0.01, 0.012]}
    c = estimators.c_claim(_rows(base))
    assert c["verdict"] == seeds.REPRODUCED and c["best_c"] == estimators.PAPER_C
    assert c["knn_minus_paper_c"]["hi"] < 0
    better = dict(base, **{"C=N/L": [0.05, 0.06, 0.055, 0.05, 0.06]})
    c = estimators.c_claim(_rows(better))
    assert c["verdict"] == seeds.NOT_REPRODUCED and c["best_c"] == "C=N/L"
    tied = dict(base, **{"C=N/L": [0.09, 0.14, 0.1, 0.11, 0.12]})
    assert estimators.c_claim(_rows(tied))["verdict"] == seeds.INCONCLUSIVE


def test_queries_claim_verdicts():
    def result(first, last):
        a, b = _rows(first, queries=10), _rows(last, queries=1000)
        return {**a, "rows": a["rows"] + b["rows"]}
    first = {estimators.PAPER_C: [0.3, 0.32, 0.31], "knn": [0.2, 0.22, 0.21]}
    last = {estimators.PAPER_C: [0.1, 0.12, 0.11], "knn": [0.02, 0.03, 0.02]}
    q = estimators.queries_claim(result(first, last))
    assert q["verdict"] == seeds.REPRODUCED and q["queries"] == [10, 1000]
    assert estimators.queries_claim(result(last, first))["verdict"] == seeds.NOT_REPRODUCED


VALUES = [[-1.0, -0.2, 0.5, 1.0], [-0.8, 0.1, 0.9], [-1.0, 0.0, 0.3, 1.0]]


def test_sweep_on_a_product_set():
    x = product_data(VALUES)  # 48 samples
    sigmas = [0.05, 0.3, 1.0]
    res = estimators.sweep(x, sigmas, subset_size=16, seeds=[0, 1])
    assert res["labels"] == ["DOL (C=1)", "C=N/L", "C=4N/L", "C=16N/L", "SNIS (C=∞)", "knn"]
    assert estimators.c_grid(48, 16)["C=4N/L"] == 12.0
    dol = estimate(x, sigmas, EstimatorConfig(estimator="dol", subset_size=16, seed=1), progress=False)
    rows = [r for r in res["rows"] if r["label"] == "DOL (C=1)" and r["seed"] == 1]
    np.testing.assert_array_equal([r["j"] for r in rows], dol.j_star)  # C = 1 is DOL, the same draws
    exact = estimate(x, sigmas, EstimatorConfig(estimator="exact", seed=1), progress=False)
    np.testing.assert_array_equal([r["j_exact"] for r in rows], exact.j_star)
    tv = exact.total_variance
    for r in rows:  # σ = 0.05: J* ≈ 5e-5 < 1e-3 J*(∞), no relative error
        want = (r["j"] - r["j_exact"]) / r["j_exact"] if r["j_exact"] > 1e-3 * tv else math.nan
        assert r["rel_error"] == pytest.approx(want, nan_ok=True)
    assert math.isnan(rows[0]["rel_error"]) and not math.isnan(rows[1]["rel_error"])


def test_subsets_holding_every_sample_are_exact_on_the_same_queries():
    x = product_data(VALUES)
    res = estimators.sweep(x, [0.1, 1.0], subset_size=48, seeds=[0, 1, 2], cs={"C=4N/L": 4.0}, knn=True)
    assert all(r["rel_error"] == 0.0 for r in res["rows"])  # L = N: every estimator is the exact one
    assert estimators.c_claim({**res, "labels": ["C=4N/L", "knn"]})["verdict"] == seeds.INCONCLUSIVE


def _sigma_star_truth(values, level: float) -> float:
    tv = sum(np.var(v) for v in values)
    return optimize.brentq(lambda s: product_optimal_loss(values, s) - level * tv, 1e-4, 10.0, xtol=1e-10)


def test_survey_row_brackets_the_quadrature_sigma_star():
    from lossfloor.floor.table import SIGMA_STAR_THRESHOLD

    x = product_data(VALUES)
    sigmas = np.geomspace(0.01, 3.0, 12)
    est = estimate(x, sigmas, EstimatorConfig(estimator="exact", queries_per_sample=20), progress=False)
    row = survey.survey_row("product", est, n=len(x), dim=3)
    truth = _sigma_star_truth(VALUES, SIGMA_STAR_THRESHOLD)
    assert (row["sigma_star_low"] or 0.0) <= truth <= (row["sigma_star_high"] or math.inf)
    assert row["plateau"] == pytest.approx(sum(np.var(v) for v in VALUES), rel=1e-6)  # J*(∞) exactly
    assert row["plateau_per_value"] == pytest.approx(row["plateau"] / 3)


def test_survey_claim_verdicts():
    def row(name, lo, hi, plateau):
        return {"data": name, "sigma_star_low": lo, "sigma_star_high": hi, "sigma_star": lo, "plateau_per_value": plateau}
    apart = [row("a", 0.01, 0.02, 0.3), row("b", 0.05, 0.1, 0.2), row("c", 0.2, 0.4, 0.1)]
    assert survey.survey_claim(apart)["verdict"] == seeds.REPRODUCED
    same = [row("a", 0.01, 0.05, 0.3), row("b", 0.02, 0.1, 0.3005)]
    assert survey.survey_claim(same)["verdict"] == seeds.NOT_REPRODUCED
    open_end = [row("a", None, 0.05, 0.3), row("b", 0.01, None, 0.1)]
    assert survey.survey_claim(open_end)["verdict"] == seeds.INCONCLUSIVE
    assert survey.brackets_disjoint(row("a", 0.1, 0.2, 1), row("b", 0.3, None, 1))


def test_schedule_claim_is_paired_over_seeds():
    from lossfloor.claims import schedule

    values = {"optimal-loss": {"gap": [1.0, 1.1, 0.9], "fd": [10.0, 11.0, 9.0]},
              "edm2": {"gap": [1.5, 1.6, 1.4], "fd": [12.0, 13.5, 10.5]},
              "fm": {"gap": [1.2, 1.0, 1.0], "fd": [9.0, 12.0, 9.5]}}
    c = schedule.schedule_claim(values)
    d = c["difference"]["fd vs edm2"]  # differences -2, -2.5, -1.5: mean -2, sd 0.5
    assert d["mean"] == pytest.approx(-2.0) and d["hi"] == pytest.approx(-2.0 + 4.302652729749464 * 0.5 / math.sqrt(3))
    assert d["relative"] == pytest.approx(-2.0 / 12.0)
    assert c["verdicts"] == {"edm2": seeds.REPRODUCED, "fm": seeds.INCONCLUSIVE} and c["verdict"] == seeds.REPRODUCED
    worse = {**values, "optimal-loss": {"gap": [2.0, 2.1, 1.9], "fd": [14.0, 15.0, 13.0]}}
    assert schedule.schedule_claim(worse)["verdict"] == seeds.NOT_REPRODUCED
    (row,) = schedule.describe(values, "digits")
    assert "fd vs edm2: -2 [" in row["measured"] and "(-16.7 %)" in row["measured"]


def _fits(n_models: int, gains: list[tuple[float, float]]) -> dict:
    out = {}
    for i, (lo, hi) in enumerate(gains):
        key = "total" if i == 0 else f"sigma={i}"
        form = {"abs_rho": 0.9, "intervals": {"rho": [-0.95, -0.85]}}
        out[key] = {"quantity": key, "sigma": None if i == 0 else float(i), "n_models": n_models,
                    "raw": form, "corrected": form, "free_offset": None,
                    "rho_gain": {"value": (lo + hi) / 2, "interval": [lo, hi], "n_valid": 100},
                    "holdout": {"scores": {"raw": {"log_rmse": 0.1}}, "best": "raw"}}
    return out


def test_scaling_claim_verdicts():
    from lossfloor.claims import scaling

    assert scaling.scaling_claim(_fits(3, [(0.01, 0.05), (0.02, 0.1)]))["verdict"] == seeds.REPRODUCED
    assert scaling.scaling_claim(_fits(3, [(0.01, 0.05), (-0.1, -0.02)]))["verdict"] == seeds.NOT_REPRODUCED
    assert scaling.scaling_claim(_fits(3, [(-0.01, 0.05)]))["verdict"] == seeds.INCONCLUSIVE
    assert scaling.scaling_claim(_fits(2, [(0.01, 0.05)]))["verdict"] == seeds.INCONCLUSIVE  # too few models
    rows = scaling.quantities(_fits(3, [(0.01, 0.05), (0.02, 0.1)]))
    assert [r["quantity"] for r in rows] == ["total", "sigma=1"]
    assert rows[0]["raw"]["abs_rho_interval"] == [0.85, 0.95]  # |ρ| from ρ's interval
    assert scaling._abs([-0.1, 0.2]) == [0.0, 0.2]  # an interval across 0: |ρ| from 0


def _gap(sigmas, shape, se=0.01):
    return {"sigma": list(sigmas), "gap": [float(shape(s)) for s in sigmas], "se": [se] * len(sigmas)}


def test_diagnosis_verdicts_on_gaps_known_by_construction():
    from lossfloor.claims import diagnosis

    s = np.geomspace(0.01, 40, 9)
    bump = lambda v: np.exp(-np.log(v / 0.5) ** 2)  # noqa: E731  a gap largest at σ = 0.5
    gaps = {"edm": _gap(s, bump), "fm": _gap(s, bump),
            "ncsn": _gap(s, lambda v: bump(v) + 0.2 * (v / 40)),  # ε-prediction: 0.2 more at σ = 40
            "ddpm-eps": _gap(s, lambda v: bump(v) + 0.1 * (v / 40))}
    e = diagnosis.eps_claim(gaps)
    assert e["verdict"] == seeds.REPRODUCED and e["sigma"] == pytest.approx(40)
    ncsn = e["models"]["ncsn"]["at_largest_sigma"]
    assert ncsn["mean"] == pytest.approx(0.2) and ncsn["hi"] - ncsn["mean"] == pytest.approx(1.959964 * math.hypot(0.01, 0.01))
    assert e["models"]["ncsn"]["sigma_of_largest_ratio"] == pytest.approx(40)
    p = diagnosis.peak_claim(gaps)
    assert p["verdict"] == seeds.REPRODUCED and p["models"]["edm"]["sigma_of_peak"] == pytest.approx(s[4])
    # an ε-model that is better than EDM at high σ, and a model whose gap grows to the top of the grid
    gaps2 = {**gaps, "ncsn": _gap(s, lambda v: bump(v) - 0.2 * (v / 40)), "vp-v": _gap(s, lambda v: v)}
    assert diagnosis.eps_claim(gaps2)["verdict"] == seeds.NOT_REPRODUCED
    assert diagnosis.peak_claim(gaps2)["verdict"] == seeds.NOT_REPRODUCED
    noisy = {m: {**g, "se": [1.0] * len(s)} for m, g in gaps.items()}  # errors far above the effects
    assert diagnosis.eps_claim(noisy)["verdict"] == seeds.INCONCLUSIVE
    assert diagnosis.peak_claim(noisy)["verdict"] == seeds.INCONCLUSIVE
    rows = diagnosis.describe(gaps, "digits")
    assert [r["id"] for r in rows] == ["eps-high-sigma", "intermediate-peak"]
    assert "ncsn − edm: 0.2 [" in rows[0]["measured"]


@pytest.mark.parametrize("c, kept", [(math.inf, "others"), (1.0, "with source")])
def test_cdol_limits_are_snis_on_the_other_draws_and_dol(c, kept):
    """The C sweep's ends, computed independently per query from the same subset and noise: C = ∞ is SNIS
    on the L - 1 subset samples other than the source (the source's copy hidden when drawn, else the last
    draw), C = 1 is DOL (those L - 1 plus the source at weight 1); the term is ||x_s||² - ||μ̂||²."""
    import torch

    from lossfloor.floor import query_plan, query_terms
    from lossfloor.floor.batch import block_subset, query_noise
    from lossfloor.floor.queries import subset_block

    x = torch.from_numpy(product_data(VALUES))  # 48 samples
    sigmas = np.array([0.2, 0.7])
    cfg = EstimatorConfig(estimator="cdol", subset_size=12, c=c, seed=5).resolve(48, 3)
    plan = query_plan(cfg, 48)
    _, j = query_terms(x, sigmas, cfg, plan, 0)
    src = plan.sources(0)
    eps = query_noise(cfg, plan, 0, 3, "cpu").double()
    xd = x.double()
    q0 = plan.queries(0).start
    for i in range(len(src)):
        R = block_subset(cfg, plan, (q0 + i) // subset_block(48)).tolist()
        s = int(src[i])
        others = [r for r in R if r != s] if s in R else R[:-1]
        assert len(others) == 11
        for k, sigma in enumerate(sigmas):
            y = xd[s] + sigma * eps[i]
            pts = others + ([s] if kept == "with source" else [])
            logw = -((y - xd[pts]) ** 2).sum(1) / (2 * sigma**2)
            w = torch.softmax(logw, 0)
            mu = (w[:, None] * xd[pts]).sum(0)
            want = float((xd[s] ** 2).sum() - (mu**2).sum())
            assert float(j[i, 0, k]) == pytest.approx(want, rel=1e-5, abs=1e-6)


def _perturbed_oracle(data, prediction: str, bump: bool, path) -> str:
    """The exact posterior mean (VE process) with a known error added: x0-prediction plus b(σ)·u with
    b = exp(-ln²(σ/0.5)) (x0 gap b², largest at σ = 0.5), or ε-prediction plus 0.05·u (x0 gap 0.0025·σ²,
    largest at the top of the grid); u a unit vector."""
    import torch

    from diagnose_models import PosteriorMean

    class Perturbed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = PosteriorMean(torch.as_tensor(data), prediction, "ve")
            self.bump = bump

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self.inner(x, t).flatten(1)
            sigma = t.to(out.dtype).view(-1, 1)
            size = torch.exp(-torch.log(sigma / 0.5) ** 2) if self.bump else 0.05 * torch.ones_like(sigma)
            u = torch.zeros_like(out)
            u[:, 0] = 1.0
            return (out + size * u).view(x.shape)

    torch.jit.save(torch.jit.script(Perturbed()), str(path))
    return str(path)


def test_diagnosis_verdicts_on_models_with_known_gaps(tmp_path):
    """Oracle models whose gap is known by construction, through `lossfloor diagnose`: an x0-model whose
    gap peaks at σ = 0.5 and an ε-model whose gap grows as σ²: ε worst at high σ (reproduced), and not
    every gap interior (the ε-model's is at the top: not reproduced)."""
    from lossfloor.claims import diagnosis
    from lossfloor.jobs.diagnose import DiagnoseSpec, diagnose

    data = product_data(VALUES)
    np.save(tmp_path / "data.npy", data)
    sigmas = np.geomspace(0.05, 20.0, 7)
    gaps = {}
    for name, prediction, bump in (("edm", "x0", True), ("ncsn", "eps", False)):
        model = _perturbed_oracle(data, prediction, bump, tmp_path / f"{name}.pt")
        d = diagnose(DiagnoseSpec(model=model, prediction=prediction, process="ve", data=str(tmp_path / "data.npy"),
                                  sigmas=sigmas, out=str(tmp_path / f"{name}.parquet"), estimator="exact",
                                  n_samples=48, seed=0))
        gaps[name] = diagnosis.gaps_of(d.table)
    want_edm = np.exp(-np.log(sigmas / 0.5) ** 2) ** 2
    want_ncsn = (0.05 * sigmas) ** 2
    for name, want in (("edm", want_edm), ("ncsn", want_ncsn)):  # the gap is b² up to its standard error
        g, se = np.array(gaps[name]["gap"]), np.array(gaps[name]["se"])
        assert np.all(np.abs(g - want) <= 4 * se + 0.05 * want + 1e-6), (name, g, want, se)
    assert diagnosis.eps_claim(gaps)["verdict"] == seeds.REPRODUCED
    p = diagnosis.peak_claim(gaps)
    assert p["models"]["edm"]["interior"] and not p["models"]["ncsn"]["interior"]
    assert p["verdict"] == seeds.NOT_REPRODUCED
