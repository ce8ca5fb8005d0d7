"""lossfloor.scaling against known truth: synthetic ladders with a known frontier J* + beta F^alpha."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lossfloor import cli
from lossfloor.errors import InputError, JStarNotBelowLoss
from lossfloor.scaling import (
    as_curves,
    envelope,
    fit_all,
    fit_corrected,
    fit_free_offset,
    fit_raw,
    load_j_star_table,
)

GRID = 200  # envelope grid for the tests (the default is 1500); fits are insensitive to it


def ladder(
    *, j_star=0.3, noise=0.0, seed=0, n_models=8, per=20, a=0.3, b=0.3, coef=28.0, ratio=2.0, sigma=None
):
    """Chinchilla-form ladder L(N, D) = J* + A N^-a + B D^-b with F = 6 N D (A = B = coef).

    Minimising over N at fixed F gives the frontier J* + beta F^alpha exactly, with alpha = -ab/(a+b),
    N_opt = g (F/6)^(b/(a+b)), g = (aA/(bB))^(1/(a+b)), beta = (A g^-a + B g^b) 6^(ab/(a+b)). Model k
    (N = 1.3e8 ratio^k) is evaluated at `per` log-spaced F in [F_opt/4, 4 F_opt]: the curves cross and
    the discrete envelope sits within ~0.5 % of the gap above the frontier. Noise: multiplicative, per
    checkpoint, lognormal with sd `noise`. Returns (columns, (beta, alpha)).
    """
    rng = np.random.default_rng(seed)
    g = (a * coef / (b * coef)) ** (1 / (a + b))
    gamma = a * b / (a + b)
    beta = (coef * g**-a + coef * g**b) * 6**gamma
    cols = {"model": [], "flops": [], "loss": [], "params": []}
    for k in range(n_models):
        n = 1.3e8 * ratio**k
        f = np.geomspace(6 * (n / g) ** ((a + b) / b) / 4, 6 * (n / g) ** ((a + b) / b) * 4, per)
        j = (j_star + coef * n**-a + coef * (f / (6 * n)) ** -b) * np.exp(noise * rng.standard_normal(per))
        cols["model"] += [f"m{k}"] * per
        cols["flops"] += f.tolist()
        cols["loss"] += j.tolist()
        cols["params"] += [int(n)] * per
    out = {k: np.asarray(v) for k, v in cols.items()}
    if sigma is not None:
        out["sigma"] = np.full(len(out["loss"]), float(sigma))
    return out, (beta, -gamma)


# ---------------------------------------------------------------------------------------------------
# The forms


def test_raw_recovers_a_pure_power_law_exactly():
    beta, alpha = 3.7, -0.08
    f1, f2 = np.geomspace(1e15, 1e19, 9), np.geomspace(1e17, 1e21, 7)
    data = {  # two runs on the same line plus one run everywhere above it
        "model": ["a"] * 9 + ["b"] * 7 + ["c"] * 5,
        "flops": np.r_[f1, f2, np.geomspace(1e16, 1e20, 5)],
        "loss": np.r_[beta * f1**alpha, beta * f2**alpha, 2 * beta * np.geomspace(1e16, 1e20, 5) ** alpha],
    }
    fits = fit_all(data, bootstrap=0, holdout=False, n_grid=GRID)
    raw = fits.raw.fit
    assert raw.alpha == pytest.approx(alpha, abs=1e-8)
    assert raw.beta == pytest.approx(beta, rel=1e-8)
    assert raw.rho == pytest.approx(-1.0, abs=1e-12) and raw.abs_rho == pytest.approx(1.0, abs=1e-12)
    assert raw.r2 == pytest.approx(1.0, abs=1e-12)
    assert fits.corrected is None and any("no J*" in n for n in fits.notes)
    assert fits.free_offset.fit.offset == pytest.approx(0.0, abs=1e-6)  # no offset in the data
    assert fits.free_offset.fit.alpha == pytest.approx(alpha, abs=1e-5)


def test_a_flat_curve_has_no_goodness_of_fit():
    # a constant loss (float32 round-off in its last digits) printed R² = 0.90: the free offset E near min J
    # magnifies those digits into a "trend". A line through round-off has any R²: rho and R² are undefined
    flops = np.geomspace(1e15, 1e19, 12)
    loss = np.float32(0.5) * (1 + 1e-7 * np.random.default_rng(0).standard_normal(12)).astype(np.float32)
    data = {"model": [f"m{i // 3}" for i in range(12)], "flops": flops, "loss": loss.astype(np.float64)}
    fits = fit_all(data, j_star=0.1, bootstrap=0, holdout=False, n_grid=GRID)
    for form in (fits.raw, fits.corrected, fits.free_offset):
        assert math.isnan(form.fit.r2) and math.isnan(form.fit.rho), (form.fit.form, form.fit.r2)


def test_forms_as_pure_functions():
    f = np.geomspace(1e16, 1e20, 30)
    j = 0.2 + 5.0 * f**-0.1
    c = fit_corrected(f, j, 0.2)
    assert (c.alpha, c.beta, c.offset) == pytest.approx((-0.1, 5.0, 0.2), rel=1e-10)
    assert c.predict(f) == pytest.approx(j, rel=1e-12)
    e = fit_free_offset(f, j)
    assert (e.alpha, e.beta, e.offset) == pytest.approx((-0.1, 5.0, 0.2), rel=1e-5)
    assert abs(fit_raw(f, j).rho) < abs(c.rho)
    with pytest.raises(ValueError):
        fit_corrected(f, j, float(j.min()))


def test_envelope_of_two_crossing_power_laws_is_their_pointwise_minimum():
    def j1(f):
        return 2.0 * f**-0.05

    def j2(f):
        return 9.0 * f**-0.09

    fa, fb = np.geomspace(1e15, 1e19, 6), np.geomspace(1e16, 1e21, 8)  # cross at F ~ 2.1e16
    curves = as_curves(
        {"model": ["a"] * 6 + ["b"] * 8, "flops": np.r_[fa, fb], "loss": np.r_[j1(fa), j2(fb)]}
    )
    env = envelope(curves, n_grid=GRID)
    f, lf, eps = env.flops, np.log(env.flops), 1e-12  # grid is in ln F: compare there

    def covered(fr):
        return (lf >= np.log(fr[0]) - eps) & (lf <= np.log(fr[-1]) + eps)

    covered_a, covered_b = covered(fa), covered(fb)
    expect = np.minimum(np.where(covered_a, j1(f), np.inf), np.where(covered_b, j2(f), np.inf))
    np.testing.assert_allclose(env.loss, expect, rtol=1e-12)
    assert env.n_uncovered == 0 and len(env) == GRID
    assert [m for m, _, _ in env.segments()] == ["a", "b"]
    cross = (9.0 / 2.0) ** (1 / 0.04)
    assert env.segments()[0][2] <= cross <= env.segments()[1][1]


def test_envelope_gap_between_runs_is_reported_not_hidden():
    fa, fb = np.geomspace(1e15, 1e16, 5), np.geomspace(1e18, 1e19, 5)
    data = {"model": ["a"] * 5 + ["b"] * 5, "flops": np.r_[fa, fb], "loss": np.r_[fa, fb] ** -0.05}
    fits = fit_all(data, bootstrap=0, holdout=False, n_grid=GRID)
    assert fits.envelope.n_uncovered > 0
    assert len(fits.envelope) + fits.envelope.n_uncovered == GRID
    assert any("left out" in n for n in fits.notes)


def test_envelope_never_jumps_up_where_the_frontier_run_ends():
    # a small model trained to F = 1e16 reaches 0.30; the large model covers 1e15..1e17 but is above 0.30
    # until F = 3e16 (its early checkpoints are under-trained): those points are on no frontier
    fa, fb = np.geomspace(1e15, 1e16, 8), np.geomspace(1e15, 1e17, 16)
    la = 0.5 * (fa / 1e15) ** -0.22
    lb = 0.9 * (fb / 1e15) ** -0.3
    data = {"model": ["a"] * 8 + ["b"] * 16, "flops": np.r_[fa, fb], "loss": np.r_[la, lb]}
    fits = fit_all(data, bootstrap=0, holdout=False, n_grid=GRID)
    env = fits.envelope
    assert np.all(np.diff(env.loss) <= 1e-12)  # monotone: the best loss reached with at most F compute
    assert env.n_superseded > 0 and len(env) + env.n_superseded + env.n_uncovered == GRID
    assert env.loss[env.flops > 1e16].max() <= la[-1] * (1 + 1e-12)  # b is used only once below a's end
    assert [m for m, _, _ in env.segments()] == ["b", "a", "b"] or [m for m, _, _ in env.segments()] == ["a", "b"]
    assert any("never jumps up" in n for n in fits.notes)


def test_an_unidentified_free_offset_is_never_ranked_best():
    # loss = 0.3 + 0.5 F^-1 (in units of 1e15): the free offset predicts the held-out model best ...
    from lossfloor.scaling.data import as_curves
    from lossfloor.scaling.envelope import envelope_from_runs, interpolate_runs, log_grid
    from lossfloor.scaling.fits import holdout_largest

    f = np.geomspace(1e15, 1e18, 40)
    data = {"model": np.repeat(["a", "b", "c", "d"], 10), "flops": f, "loss": 0.3 + 0.5 * (f / 1e15) ** -1.0}
    assert fit_all(data, j_star=0.25, bootstrap=0, n_grid=200).holdout.best == "free_offset"
    # ... but when its offset is not identified (E on its bound) it is scored, shown, and never chosen
    curves = as_curves(data)
    grid = log_grid(curves, 200)
    log_loss = interpolate_runs(curves, grid)
    env = envelope_from_runs(grid, log_loss, range(curves.n_models), curves.models)
    hold, _ = holdout_largest(curves, grid, log_loss, env, j_star=None, bootstrap=0, rng=np.random.default_rng(0),
                              unidentified={"free_offset": "E at its upper bound min J"})
    assert hold.scores["free_offset"] is not None and hold.best not in (None, "free_offset")
    assert hold.to_dict()["unidentified"] == {"free_offset": "E at its upper bound min J"}


def test_corrected_recovers_truth_and_raises_rho_over_raw():
    data, (beta, alpha) = ladder(noise=0.002, seed=1)
    fits = fit_all(data, j_star=0.3, bootstrap=0, holdout=False, n_grid=GRID)
    corrected, raw, free = fits.corrected.fit, fits.raw.fit, fits.free_offset.fit
    assert corrected.alpha == pytest.approx(alpha, abs=0.004)
    assert corrected.beta == pytest.approx(beta, rel=0.06)
    assert corrected.abs_rho >= raw.abs_rho and corrected.r2 >= raw.r2
    assert raw.rho < 0 and corrected.rho < 0  # falling power law
    assert free.offset == pytest.approx(0.3, abs=0.005)  # free-offset E ~ J*
    assert corrected.log_rmse < raw.log_rmse
    d = fits.to_dict()
    assert d["consistency"]["difference"] == pytest.approx(free.offset - 0.3)


def test_rho_gain_is_paired_over_the_same_replicates():
    from lossfloor.scaling.fits import STATS, rho_gain

    data, _ = ladder(noise=0.002, seed=1)
    fits = fit_all(data, j_star=0.3, bootstrap=80, holdout=False, seed=2, n_grid=GRID)
    gain = fits.to_dict()["rho_gain"]
    assert gain["value"] == pytest.approx(fits.corrected.fit.abs_rho - fits.raw.fit.abs_rho)
    assert gain["n_valid"] == 80 and gain["interval"][0] <= gain["interval"][1]
    assert gain["interval"][0] > 0  # data with an offset: correcting it raises |ρ| in every replicate's run subset
    # the interval is the percentile interval of the per-replicate difference, not of each form's own |ρ|
    i = STATS.index("rho")
    reps = {"raw": np.full((5, len(STATS)), np.nan), "corrected": np.full((5, len(STATS)), np.nan)}
    reps["raw"][:, i] = [-0.80, -0.90, -0.70, -0.85, np.nan]
    reps["corrected"][:, i] = [-0.95, -0.96, -0.90, -0.97, -0.99]
    forms = {"raw": fits.raw.fit, "corrected": fits.corrected.fit}
    got = rho_gain(forms, reps)
    diffs = np.array([0.15, 0.06, 0.20, 0.12])  # the 4 replicates where both forms could be fitted
    assert got["n_valid"] == 4 and got["interval"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])))
    assert rho_gain({"raw": fits.raw.fit, "corrected": None}, reps) is None


def test_bootstrap_intervals_cover_truth_and_shrink_with_less_noise():
    widths = {}
    for noise in (0.01, 0.001):
        data, (beta, alpha) = ladder(noise=noise, seed=2)
        fits = fit_all(data, j_star=0.3, bootstrap=150, holdout=False, seed=3, n_grid=GRID)
        assert fits.corrected.n_valid == 150
        widths[noise] = {k: v[1] - v[0] for k, v in fits.free_offset.intervals.items()}
        widths[noise]["corrected alpha"] = np.ptp(fits.corrected.intervals["alpha"])
        if noise == 0.01:  # at tiny noise the envelope's discreteness (~0.5 % of the gap) dominates
            for lo, hi, truth in (
                (*fits.corrected.intervals["alpha"], alpha),
                (*fits.corrected.intervals["beta"], beta),
                (*fits.free_offset.intervals["alpha"], alpha),
                (*fits.free_offset.intervals["offset"], 0.3),
            ):
                assert lo <= truth <= hi, (lo, truth, hi)
    for name in ("corrected alpha", "alpha", "beta", "offset"):
        assert widths[0.001][name] < 0.5 * widths[0.01][name], name


def test_default_bootstrap_is_1000_resamples_over_models():
    data, _ = ladder(noise=0.005, n_models=4, per=6, ratio=3.0)
    fits = fit_all(data, j_star=0.3, holdout=False, n_grid=40)
    assert fits.bootstrap == 1000 and fits.raw.n_valid == 1000 and fits.corrected.n_valid == 1000
    lo, hi = fits.corrected.intervals["alpha"]
    assert lo < fits.corrected.fit.alpha < hi
    assert set(fits.free_offset.intervals) == {"alpha", "beta", "offset", "rho", "r2"}
    assert set(fits.corrected.intervals) == {"alpha", "beta", "rho", "r2"}


def test_j_star_stderr_widens_the_corrected_intervals():
    data, _ = ladder(noise=0.002, n_models=5)
    kw = {"bootstrap": 100, "holdout": False, "seed": 0, "n_grid": GRID}
    narrow = fit_all(data, j_star=0.3, **kw).corrected.intervals["alpha"]
    wide = fit_all(data, j_star=0.3, j_star_stderr=0.01, **kw).corrected.intervals["alpha"]
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])


def test_one_and_two_models_are_explained():
    data, _ = ladder(n_models=1)
    one = fit_all(data, j_star=0.3, bootstrap=50, n_grid=GRID)
    assert one.raw.intervals is None and one.holdout is None
    assert any("only 1 model" in n for n in one.notes) and any("hold-out" in n for n in one.notes)
    data, _ = ladder(n_models=2)
    two = fit_all(data, j_star=0.3, bootstrap=50, holdout=False, n_grid=GRID)
    assert two.raw.intervals is not None and any("only 2 models" in n for n in two.notes)


# ---------------------------------------------------------------------------------------------------
# Hold-out


def test_holdout_prefers_an_offset_form_when_data_have_an_offset():
    data, _ = ladder(noise=0.002, seed=4)
    fits = fit_all(data, j_star=0.3, bootstrap=0, holdout=True, n_grid=GRID)
    h = fits.holdout
    assert h.model == "m7" and h.chosen_by == "params" and h.target == "frontier"
    assert h.best in ("corrected", "free_offset")
    assert h.scores["raw"].log_rmse > 3 * h.scores[h.best].log_rmse
    assert h.scores["raw"].rel_error < 0  # a straight line in log-log undershoots a flattening loss
    del data["params"]
    assert fit_all(data, bootstrap=0, n_grid=GRID).holdout.chosen_by == "max flops"


def test_holdout_prediction_intervals():
    data, _ = ladder(noise=0.002, n_models=5)
    h = fit_all(data, j_star=0.3, bootstrap=60, holdout=True, n_grid=GRID).holdout
    lo, hi = h.scores["corrected"].predicted_final_interval
    assert lo <= h.scores["corrected"].predicted_final <= hi


# ---------------------------------------------------------------------------------------------------
# J* and sigma


def test_j_star_at_or_above_the_smallest_loss_is_rejected():
    data, _ = ladder(n_models=3)
    for j_star in (float(data["loss"].min()), 1.0):
        with pytest.raises(JStarNotBelowLoss, match="smallest loss"):  # a typed InputError callers can catch
            fit_all(data, j_star=j_star, bootstrap=0)


def test_j_star_round_off_below_zero_reads_as_zero_but_a_negative_estimate_is_an_error():
    # an exact estimate at tiny sigma: J* ~ 1e-19 whose noise can put it just below 0
    exact = {"target": ["x0", "x0"], "estimator": ["exact", "exact"]}
    table = pl.DataFrame({"sigma": [0.002, 1.0], "j_star": [-3e-19, 0.2], "stderr": [1e-19, 1e-3], **exact})
    t = load_j_star_table(table)
    assert t.j_star[0] == 0.0 and t.j_star[1] == 0.2
    bad = pl.DataFrame({"sigma": [0.002, 1.0], "j_star": [-0.01, 0.2], "stderr": [1e-4, 1e-3], **exact})
    with pytest.raises(InputError, match="'j_star' must be finite and >= 0"):
        load_j_star_table(bad)
    # a biased estimator's table without an interval (an older lossfloor's) is refused, not trusted
    old_cdol = pl.DataFrame({"sigma": [0.002, 1.0], "j_star": [0.0, 0.2], "stderr": [1e-4, 1e-3],
                             "target": ["x0", "x0"], "estimator": ["cdol", "cdol"]})
    with pytest.raises(InputError, match="no ci_low/ci_high"):
        load_j_star_table(old_cdol)
    with pytest.raises(InputError, match="no 'target' column"):
        load_j_star_table(pl.DataFrame({"sigma": [1.0], "j_star": [0.2], "stderr": [1e-3]}))


def test_per_sigma_fit_reads_j_star_log_interpolated_from_the_table(tmp_path):
    table = pl.DataFrame({"sigma": [8.0, 0.5, 2.0], "j_star": [0.3, 0.01, 0.1], "stderr": [3e-3, 1e-4, 1e-3],
                          "ci_low": [0.29, 0.009, 0.098], "ci_high": [0.31, 0.011, 0.102], "target": ["x0"] * 3,
                          "estimator": ["knn"] * 3})
    path = tmp_path / "j_star.parquet"
    table.write_parquet(path)
    # sigma = 1 lies halfway between 0.5 and 2 in ln sigma: J* = 0.01 + 0.09 / 2, the interval likewise
    assert load_j_star_table(path).at(1.0) == pytest.approx((0.055, 0.0535, 0.0565), rel=1e-12)
    assert load_j_star_table(table).at(2.0) == (0.1, 0.098, 0.102)  # a table row: exact

    at1, (_, alpha) = ladder(j_star=0.055, noise=0.001, n_models=5, sigma=1.0)
    at4, _ = ladder(j_star=0.2, n_models=5, sigma=4.0)
    total, _ = ladder(j_star=0.5, n_models=5)
    at16, _ = ladder(j_star=0.35, n_models=2, sigma=16.0)
    total["sigma"] = np.full(len(total["loss"]), np.nan)
    curves = pl.concat([pl.DataFrame(at1), pl.DataFrame(at4), pl.DataFrame(at16), pl.DataFrame(total)])
    fits = fit_all(curves, j_star=path, sigma=1.0, bootstrap=0, holdout=False, n_grid=GRID)
    assert fits.j_star == pytest.approx(0.055) and fits.j_star_interval == pytest.approx((0.0535, 0.0565))
    assert fits.j_star_stderr == pytest.approx(0.0015 / 1.959964)  # what the bootstrap draws with
    assert fits.sigma == 1.0 and fits.n_points == 100
    assert fits.corrected.fit.alpha == pytest.approx(alpha, abs=0.004)
    assert fits.corrected.fit.abs_rho > fits.raw.fit.abs_rho
    tot = fit_all(curves.to_arrow(), j_star=0.5, bootstrap=0, holdout=False, n_grid=GRID)  # sigma null rows
    assert tot.sigma is None and tot.n_points == 100 and tot.j_star == 0.5
    assert tot.corrected.fit.alpha == pytest.approx(alpha, abs=0.004)
    with pytest.raises(InputError, match=r"outside its grid"):
        fit_all(curves, j_star=path, sigma=16.0, bootstrap=0)
    with pytest.raises(InputError, match="no rows with sigma = 3"):
        fit_all(curves, j_star=path, sigma=3.0, bootstrap=0)
    with pytest.raises(InputError, match="total loss has no sigma"):
        fit_all(curves, j_star=path, bootstrap=0)


# ---------------------------------------------------------------------------------------------------
# Bad curves


def _table(**overrides):
    cols = {"model": ["a", "a", "b", "b"], "flops": [1e17, 1e18, 1e18, 1e19], "loss": [0.9, 0.8, 0.82, 0.7]}
    cols.update(overrides)
    return {k: v for k, v in cols.items() if v is not None}


@pytest.mark.parametrize(
    ("curves", "match"),
    [
        (_table(flops=None), r"missing column\(s\) flops"),
        (_table(loss=[0.9, 0.0, 0.8, 0.7]), "'loss' must be finite and > 0"),
        (_table(flops=[1e17, -1.0, 1e18, 1e19]), "'flops' must be finite and > 0"),
        (_table(loss=[0.9, math.nan, 0.8, 0.7]), "'loss' has 1 NaN"),
        (_table(model=["a"], flops=[1e17], loss=[0.9]), "two distinct 'flops'"),
        (_table(flops=[1e17, 1e17, 1e18, 1e19]), "repeated 'flops'"),
        (_table(params=[1, 2, 3, 3]), "several 'params'"),
        (_table(sigma=[1.0, 1.0, 1.0, 1.0]), "no null rows"),
        (pa.table({"model": ["a", None], "flops": [1e17, 1e18], "loss": [0.9, 0.8]}), "'model' has 1 null"),
        (pa.table({"model": ["a", "a"], "flops": ["x", "y"], "loss": [0.9, 0.8]}), "'flops' must be numeric"),
        ("/nonexistent/curves.parquet", "file not found"),
    ],
)
def test_bad_curves_raise_input_error_naming_the_column(curves, match):
    with pytest.raises(InputError, match=match):
        fit_all(curves, bootstrap=0)


# ---------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def fit_cli(monkeypatch):
    """`lossfloor ...` with only the fit command registered (other commands' imports stay out)."""
    assert "lossfloor.cli.fit" in cli.COMMANDS
    monkeypatch.setattr(cli, "COMMANDS", ["lossfloor.cli.fit"])
    return cli.main


def test_cli_end_to_end_and_same_seed_same_json(tmp_path, fit_cli, capsys):
    data, _ = ladder(noise=0.003, n_models=4, per=8)
    curves = tmp_path / "curves.parquet"
    pq.write_table(pa.table(data), curves)
    outs = []
    for name in ("a.json", "b.json"):
        out = tmp_path / "fits" / name
        argv = [
            "fit",
            "--curves",
            str(curves),
            "--j-star-value",
            "0.3",
            "--j-star-stderr",
            "0.001",
            "--bootstrap",
            "40",
            "--holdout-largest",
            "--seed",
            "7",
            "--out",
            str(out),
        ]
        assert fit_cli(argv) == 0
        outs.append(out.read_text())
    stdout = capsys.readouterr().out
    assert "corrected" in stdout and "hold-out 'm3'" in stdout and "wrote" in stdout
    assert outs[0] == outs[1]
    assert sorted(p.name for p in (tmp_path / "fits").iterdir()) == ["a.json", "b.json"]  # no temp files
    d = json.loads(outs[0])
    for key in (
        "raw",
        "corrected",
        "free_offset",
        "envelope",
        "holdout",
        "j_star",
        "sigma",
        "n_points",
        "n_models",
    ):
        assert key in d
    assert d["n_models"] == 4 and d["n_points"] == 32 and d["j_star"] == 0.3 and d["sigma"] is None
    for form in ("raw", "corrected", "free_offset"):
        assert {"alpha", "beta", "rho", "r2", "intervals"} <= set(d[form])
        assert len(d[form]["intervals"]["alpha"]) == 2
    assert "offset" in d["free_offset"] and "offset" in d["free_offset"]["intervals"]
    assert d["holdout"]["best"] in ("raw", "corrected", "free_offset")
    assert len(d["envelope"][0]) == 2


def test_cli_without_j_star_fits_raw_and_free_offset(tmp_path, fit_cli):
    data, _ = ladder(n_models=3, per=6)
    curves = tmp_path / "c.parquet"
    pl.DataFrame(data).write_parquet(curves)
    out = tmp_path / "f.json"
    assert fit_cli(["fit", "--curves", str(curves), "--bootstrap", "0", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["corrected"] is None and d["j_star"] is None and d["holdout"] is None
    assert d["raw"]["intervals"] is None and d["free_offset"]["offset"] >= 0
    assert any("no J*" in n for n in d["notes"])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--curves", "{missing}"], "file not found"),
        (["--curves", "{curves}", "--j-star-value", "5"], "smallest loss"),
        (["--curves", "{curves}", "--j-star-stderr", "0.1"], "--j-star-stderr"),
        (["--curves", "{curves}", "--j-star", "{jstar}"], "total loss has no sigma"),
        (["--curves", "{curves}", "--j-star", "{jstar}", "--j-star-value", "0.1"], "not allowed with"),
        (["--curves", "{bad}"], "'loss' must be finite"),
        (["--curves", "{curves}", "--bootstrap", "-3"], "bootstrap"),
        (["--curves", "{curves}", "--j-star-value", "-1"], "--j-star-value"),
        (["--curves", "{curves}", "--j-star-value", "0.1", "--j-star-stderr", "-1"], "--j-star-stderr"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, fit_cli, capsys, extra, match):
    curves, bad, jstar = tmp_path / "c.parquet", tmp_path / "bad.parquet", tmp_path / "j.parquet"
    pq.write_table(pa.table(_table()), curves)
    pq.write_table(pa.table(_table(loss=[0.9, -1.0, 0.8, 0.7])), bad)
    pq.write_table(pa.table({"sigma": [1.0, 2.0], "j_star": [0.1, 0.2], "stderr": [0.0, 0.0], "target": ["x0"] * 2,
                             "estimator": ["exact"] * 2}), jstar)
    paths = {"curves": curves, "bad": bad, "jstar": jstar, "missing": tmp_path / "nope.parquet"}
    out = tmp_path / "out.json"
    argv = ["fit", *[a.format(**paths) for a in extra], "--out", str(out)]
    if "not allowed" in match:  # argparse's own usage error
        with pytest.raises(SystemExit) as exit_info:
            fit_cli(argv)
        assert exit_info.value.code == 2
    else:
        assert fit_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("target", ["x0", "eps", "score", "vp-v", "fm-velocity"])
def test_j_star_tables_of_every_target_are_read_in_x0_units(tmp_path, fit_cli, target):
    # the same estimate written in each target: `lossfloor fit` and the training schedule read the x0
    # floor (the old `j_star` column would be 1/σ² too large below σ = 1 for eps, and so on)
    from lossfloor.diffusion import convert_jstar
    from lossfloor.floor import EstimatorConfig, build_table, estimate, write_table
    from lossfloor.train.schedules import JStarCurve

    x = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    sig = np.array([0.1, 0.5, 1.0, 2.0])
    est = estimate(x, sig, EstimatorConfig(estimator="exact"), progress=False)
    table = build_table(est, target=target)
    np.testing.assert_allclose(table.column("j_star"), convert_jstar(est.j_star, sig, target), rtol=1e-12)
    path = write_table(table, tmp_path / "j.parquet")
    no_x0 = tmp_path / "no_x0.parquet"  # only the target columns: converted back to x0 on reading
    pq.write_table(table.table.drop_columns([c for c in table.table.column_names if c.endswith("_x0")]), no_x0)
    data, _ = ladder(j_star=0.0, n_models=3, per=6, sigma=0.5)
    data["loss"] = np.asarray(data["loss"]) + 2 * float(est.j_star[1])  # every loss above the floor
    curves = tmp_path / "c.parquet"
    pl.DataFrame(data).write_parquet(curves)
    for p in (path, no_x0):
        out = tmp_path / f"{p.stem}.json"
        assert fit_cli(["fit", "--curves", str(curves), "--j-star", str(p), "--sigma", "0.5", "--bootstrap", "0",
                        "--out", str(out)]) == 0
        d = json.loads(out.read_text())
        assert d["j_star"] == pytest.approx(est.j_star[1], rel=1e-9)
        assert d["j_star_interval"] == pytest.approx([est.ci_low[1], est.ci_high[1]], rel=1e-9)
        curve = JStarCurve.from_path(p)
        np.testing.assert_allclose(curve.table.j_star, np.maximum(est.j_star, 0), rtol=1e-9)
        np.testing.assert_allclose(curve.table.ci_high, est.ci_high, rtol=1e-9)
