"""The scaling dashboard: a page built from synthetic study data (J* table from a tiny exact estimate,
loss curves of 3 models with known laws, fits from lossfloor.scaling), its rebuild from MLflow alone
(`lossfloor dashboard`), bad inputs, and the page rendered by a headless Chromium with the network off."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest
from plotly.offline import get_plotlyjs

import lossfloor.pages.scaling as scaling
from browser import find_chromium, render
from lossfloor.cli import main
from lossfloor.errors import InputError
from lossfloor.floor import EstimatorConfig, build_table, estimate, write_table
from lossfloor.pages.html import is_offline_html
from lossfloor.scaling import fit_all
from lossfloor.tracking import client, log_estimate, start_run
from lossfloor.tracking.artifacts import (
    CURVE_ARTIFACT,
    DASHBOARD_ARTIFACT,
    FITS_ARTIFACT,
    QUALITY_ARTIFACT,
    STAGE_TAG,
    check_quality,
    fits_key,
    log_fits,
    log_quality,
    read_study,
)
from lossfloor.train.curves import CURVE_SCHEMA, to_table, write_rows

SIGMAS = np.geomspace(0.01, 20.0, 10)
FIT_SIGMAS = (float(SIGMAS[5]), float(SIGMAS[7]))  # J* ~ 1.1 and ~ 3.7: a large share of the loss
J_STAR_TOTAL = 0.3
MODELS = {"S": 1e6, "M": 4e6, "L": 1.6e7}  # name -> params
EXPERIMENT = "scaling-test"


# ---------------------------------------------------------------------------------------------------
# Synthetic study


@pytest.fixture(scope="module")
def jstar():
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)  # (N, D)
    est = estimate(x, SIGMAS, EstimatorConfig(estimator="exact", queries_per_sample=2), progress=False)
    table = build_table(est, target="x0", fingerprint="synthetic-gauss")
    assert table.sigma_star is not None
    return table


def curve_rows(jstar) -> list[dict]:
    """Chinchilla-like curves: J = J* + k (3 N^-0.3 + 40 D^-0.3), F = 6 N D, 16 checkpoints per model."""
    j_at = dict(zip(jstar.column("sigma").tolist(), jstar.column("j_star_x0").tolist()))
    rng = np.random.default_rng(1)
    rows = []
    for model, n in MODELS.items():
        d = np.geomspace(1e6, 1e9, 16)  # images seen
        for sigma, js, k in [(None, J_STAR_TOTAL, 1.0)] + [(s, j_at[s], 0.5) for s in FIT_SIGMAS]:
            loss = js + k * (3.0 * n**-0.3 + 40.0 * d**-0.3) * (1 + 0.002 * rng.standard_normal(len(d)))
            rows += [{"run": f"train-{model}", "model": model, "params": int(n), "step": i, "images": int(d[i]),
                      "flops": float(6 * n * d[i]), "sigma": sigma, "loss": float(loss[i]),
                      "gap": float(loss[i] - js), "j_star": None if sigma is None else js}
                     for i in range(len(d))]
    return rows


@pytest.fixture(scope="module")
def curves(jstar) -> pa.Table:
    return to_table(curve_rows(jstar), CURVE_SCHEMA)


@pytest.fixture(scope="module")
def fit_objects(jstar, curves):
    out = [fit_all(curves, j_star=jstar.table, sigma=s, bootstrap=20, seed=0) for s in FIT_SIGMAS]
    return [*out, fit_all(curves, j_star=J_STAR_TOTAL, bootstrap=20, seed=0)]


@pytest.fixture(scope="module")
def fits(fit_objects) -> dict[str, dict]:
    return {fits_key(f.sigma): f.to_dict() for f in fit_objects}


def quality_json(curves) -> dict:
    """A sample-quality stage's quality.json: per model FID and FD_DINOv2 over 3 seeds, at its final FLOPs."""
    rng = np.random.default_rng(2)
    models = {}
    for i, (model, n) in enumerate(MODELS.items()):
        flops = max(r["flops"] for r in curves.to_pylist() if r["model"] == model)
        row = {"params": int(n), "flops": flops}
        for metric, level in (("fid", 30.0), ("fd_dinov2", 400.0)):
            per_seed = level / (i + 1) * (1 + 0.05 * rng.standard_normal(3))
            row[metric] = {"mean": float(per_seed.mean()), "std": float(per_seed.std(ddof=1)),
                           "min": float(per_seed.min()), "max": float(per_seed.max()),
                           "per_seed": per_seed.tolist()}
        models[model] = row
    return {"metrics": ["fid", "fd_dinov2"], "features": {"fid": "inception:inception.pt",
                                                           "fd_dinov2": "dinov2:dinov2.pt"},
            "n_samples": 50000, "seeds": 3, "models": models}


@pytest.fixture(scope="module")
def quality(curves) -> dict:
    return quality_json(curves)


@pytest.fixture(scope="module")
def page(jstar, curves, fits) -> str:
    return scaling.build_dashboard(jstar, curves, fits, title="Synthetic scaling study")


# ---------------------------------------------------------------------------------------------------
# The page


def shows(text: str, page: str) -> bool:
    """`text` is in the page, as HTML or inside a figure's JSON (where plotly writes ρ as \\u03c1)."""
    return text in page or json.dumps(text)[1:-1] in page


def test_page_embeds_plotly_once_loads_nothing_and_has_every_section(page, fits):
    assert page.count(get_plotlyjs()[:2000]) == 1  # plotly.js source embedded exactly once
    assert page.count("plotly.js v") == 1
    assert re.search(r"<script[^>]*\bsrc\s*=", page, re.IGNORECASE) is None  # nothing fetched, no CDN
    assert is_offline_html(page)
    for title in scaling.SECTION_TITLES:
        assert f"<h2>{title}</h2>" in page
    assert page.count("Plotly.newPlot(") == 4  # J*, loss vs compute, fits, hold-out
    for f in fits.values():  # |ρ| of both forms in the fit panels' titles
        for form in ("raw", "corrected"):
            assert shows(f"|ρ| = {f[form]['abs_rho']:.4f}", page)
        assert f["holdout"]["model"] == "L"
    assert shows("dashed: σ* (largest σ with J*", page)  # the J* figure marks σ*


def test_quality_panel_draws_one_point_per_model_with_its_spread_over_seeds(jstar, curves, fits, quality):
    """Per metric a panel; per model one point at its training FLOPs: the mean over seeds, the standard
    deviation over seeds (numpy's, from the seeds' values) as its error bar, the model's colour of the loss panels."""
    fig = scaling.quality_vs_flops_figure(quality, curves=curves)
    loss_colors = {t.name: t.line.color for t in scaling.loss_vs_flops_figure(curves, fits).data if t.name in MODELS}
    assert [a.text for a in fig.layout.annotations] == ["FID", "FD_DINOv2"]
    for p, (metric, axis) in enumerate((("fid", "x"), ("fd_dinov2", "x2"))):
        points = [t for t in fig.data if t.xaxis == axis]
        assert [t.name for t in points] == ["S", "M", "L"]  # by size
        for t in points:
            seeds = np.asarray(quality["models"][t.name][metric]["per_seed"])
            assert list(t.x) == [max(r["flops"] for r in curves.to_pylist() if r["model"] == t.name)]
            assert t.y[0] == pytest.approx(seeds.mean(), rel=1e-12)
            assert t.error_y.array[0] == pytest.approx(seeds.std(ddof=1), rel=1e-12) and t.error_y.visible
            assert t.marker.color == loss_colors[t.name] and list(t.text) == [t.name]
            assert t.showlegend == (p == 0)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert fig.layout.yaxis.title.text.startswith("FID") and fig.layout.yaxis2.title.text.startswith("FD_DINOv2")
    assert "50000 samples x 3 seed(s)" in fig.layout.title.text


def test_quality_section_only_when_the_study_has_it(jstar, curves, fits, quality, page):
    assert scaling.QUALITY_TITLE not in page
    with_quality = scaling.build_dashboard(jstar, curves, fits, quality=quality)
    heads = re.findall(r"<h2>(.*?)</h2>", with_quality)
    assert heads.index(scaling.QUALITY_TITLE) == heads.index(scaling.SECTION_TITLES[1]) + 1  # beside the loss


@pytest.mark.parametrize(("change", "message"), [
    (lambda q: q.pop("models"), "'models'"),
    (lambda q: q["models"]["S"].pop("flops"), "model 'S': expected a positive number 'flops'"),
    (lambda q: q["models"]["M"]["fid"].pop("std"), "model 'M': expected 'fid' with numbers 'mean' and 'std'"),
])
def test_bad_quality_json_is_refused(quality, change, message):
    bad = json.loads(json.dumps(quality))
    change(bad)
    with pytest.raises(InputError, match=re.escape(message)):
        check_quality(bad, "quality.json")


def test_zero_j_star_is_marked_and_the_legend_names_the_data(jstar, curves, fits):
    from lossfloor.pages.jstar import ZERO_LABEL, data_label, jstar_figure

    zeros = int((jstar.column("j_star") <= 0).sum())
    assert zeros > 0  # σ = 0.01 on this data: J* is 0 in floating point
    fig = jstar_figure({"gauss": {"x0": jstar}})
    (marks,) = [t for t in fig.data if t.name == ZERO_LABEL]
    (line,) = [t for t in fig.data if t.name == "gauss"]
    # every σ is drawn, as J* or as ≈ 0 (J* = 0 and 7e-11 at σ = 0.054, below what the estimate resolves)
    assert len(marks.x) >= zeros and len(marks.x) + len(line.x) == len(jstar.column("sigma"))
    assert np.all(np.asarray(marks.y) <= np.min(line.y))  # at the axis floor, not missing
    page = scaling.build_dashboard(jstar, curves, fits, data="bundled:digits")
    assert shows(ZERO_LABEL, page) and '"name":"digits"' in page.replace(" ", "")
    assert data_label("", "b21c7228fc4a2c28") == "b21c7228fc4a" and data_label("/x/img512.zip", "f") == "img512.zip"


def test_fits_table_has_every_form_and_the_holdout_scores(page, fits):
    table = page[page.index('<table class="fits">'):page.index("</table>")]
    assert table.count("<tr") == 1 + 3 * len(fits)  # header + (raw, corrected, free_offset) per quantity
    for column in ("α", "β", "offset", "|ρ|", "R²", "hold-out log-RMSE", "hold-out error at final F"):
        assert f"<th>{column}</th>" in table
    total = fits["total"]
    assert f"{total['corrected']['alpha']:.4g} [{total['corrected']['intervals']['alpha'][0]:.4g}" in table
    assert f"{total['holdout']['scores']['raw']['log_rmse']:.3g}" in table
    assert table.count("★") == len(fits)  # the best hold-out form of each quantity


def test_holdout_predictions_come_from_fits_json_and_are_fit_alls(curves, fits):
    """The hold-out panel draws the predictions fits.json stores (nothing refitted for drawing): each form's
    line, fitted without the largest model, reaches fit_all's predicted final loss at the final F."""
    for f in fits.values():
        h = f["holdout"]
        assert len(h["target_points"]) == h["n_target_points"]
        for form, score in h["scores"].items():
            line = np.asarray(score["prediction"])  # (80, 2): F, J_hat
            assert line.shape == (80, 2) and line[0, 0] <= h["final_flops"] <= line[-1, 0] * (1 + 1e-12)
            at_final = np.exp(np.interp(np.log(h["final_flops"]), np.log(line[:, 0]), np.log(line[:, 1])))
            assert at_final == pytest.approx(score["predicted_final"], rel=1e-3), form


def test_write_dashboard_is_atomic_and_per_sigma_panels_are_chosen(jstar, curves, fits, tmp_path):
    out = scaling.write_dashboard(jstar, curves, fits, tmp_path / "sub" / "page.html", sigmas=[FIT_SIGMAS[1]])
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["page.html"]
    assert shows("σ = 3.694", out.read_text(encoding="utf-8"))
    no_jstar = scaling.build_dashboard(None, curves, {"total": fits["total"]})
    assert "No J* table was given." in no_jstar and no_jstar.count("Plotly.newPlot(") == 3


@pytest.mark.parametrize("case, message", [
    ("no loss column", "curves: missing column(s) loss"),
    ("bad fits key", "expected 'total' or 'sigma=<number>'"),
    ("key of another sigma", "holds a fit at sigma="),
    ("sigma not in curves", "the curves have no rows at this σ"),
])
def test_bad_inputs_raise_input_error(jstar, curves, fits, case, message):
    kwargs = {}
    if case == "no loss column":
        curves = curves.drop_columns(["loss"])
    elif case == "bad fits key":
        fits = {"sigma=abc": fits["total"]}
    elif case == "key of another sigma":
        fits = {"sigma=5": fits[fits_key(FIT_SIGMAS[0])]}
    else:
        kwargs["sigmas"] = [123.0]
    with pytest.raises(InputError, match=re.escape(message)):
        scaling.build_dashboard(jstar, curves, fits, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Every figure: the J* floor, one number format, whole legends, J* in the legend, whose |ρ|

LEGEND_ITEM_PX = 29  # one legend entry with its group gap, measured in Chromium (986 px for 34 entries)


def tiny_jstar_table(low):
    """A J* table as an estimate at tiny σ gives it: 1e-49 and 1e-20, positive but with ci_low = 0."""
    from lossfloor.floor.estimate import Estimate

    j = np.array([1e-49, 1e-20, 3e-6, 1e-3, 0.1, 0.8, 1.0, 1.0])
    low = np.asarray(low, dtype=np.float64)
    est = Estimate(sigmas=np.geomspace(0.002, 80.0, 8), j_star=j, stderr=(j - low) / 1.96, bias=np.zeros(8),
                   ci_low=low, ci_high=j + (j - low), allowance=np.zeros(8), total_variance=1.0,
                   config=EstimatorConfig(estimator="exact"), n_queries=64, n_batches=1,
                   subset_size=np.full(8, 64, dtype=np.int64))
    return build_table(est, target="x0", fingerprint="tiny")


def test_jstar_panel_shows_the_resolvable_range_and_marks_the_rest_as_zero():
    from lossfloor.pages.jstar import RESOLVED_DECADES, ZERO_LABEL, jstar_figure

    fig = jstar_figure({"tiny": {"x0": tiny_jstar_table([0.0, 0.0, 0.0, 4e-4, 0.08, 0.75, 0.98, 0.99])}})
    low, high = fig.layout.yaxis.range
    floor = 0.5 * 1e-3  # half the smallest J* whose interval excludes 0 (3e-6's does not)
    assert low == pytest.approx(np.log10(floor) - 0.1) and high == pytest.approx(np.log10(1.01) + 0.1, abs=0.01)
    assert high - low <= RESOLVED_DECADES + 0.2  # not 1e-49 … 1
    (line,) = [t for t in fig.data if t.name == "tiny"]
    (marks,) = [t for t in fig.data if t.name == ZERO_LABEL]
    assert "≈ 0" in ZERO_LABEL and list(marks.y) == [floor] * 3  # 1e-49, 1e-20, 3e-6 (ci_low 0): ≈ 0
    bottoms = np.asarray(line.y) - np.asarray(line.error_y.arrayminus)
    assert np.all(bottoms >= floor * (1 - 1e-12)) and bottoms.min() == pytest.approx(floor)  # capped, no spike

    # no interval excludes 0: the floor is RESOLVED_DECADES below the largest J*, 3e-6 drawn with a capped bar
    fig = jstar_figure({"tiny": {"x0": tiny_jstar_table(np.zeros(8))}})
    assert fig.layout.yaxis.range[0] == pytest.approx(-RESOLVED_DECADES - 0.1)
    (line,) = [t for t in fig.data if t.name == "tiny"]
    assert line.y[0] == 3e-6 and line.y[0] - line.error_y.arrayminus[0] == pytest.approx(10.0**-RESOLVED_DECADES)


def _figures(jstar, curves, fits) -> dict:
    """One of each figure lossfloor draws with axes (16 σ in the training run's)."""
    from lossfloor.diagnose import Diagnosis
    from lossfloor.pages.diagnose import diagnose_figure
    from lossfloor.pages.jstar import jstar_figure
    from lossfloor.pages.sweep import objective_curves_figure
    from lossfloor.pages.training import loss_curve_figure

    s = jstar.column("sigma")
    j, lo, hi = (jstar.column(c) for c in ("j_star_x0", "ci_low_x0", "ci_high_x0"))
    loss = j + 1e-3
    diag = Diagnosis(pa.table({"sigma": s, "loss_x0": loss, "loss_stderr": 1e-4 * loss, "j_star_x0": j,
                               "j_star_ci_low": lo, "j_star_ci_high": hi, "rel_gap": (loss - j) / loss}))
    rows = [{"trial_id": "t0", "is_baseline": True}, {"trial_id": "t1", "is_baseline": False, "stopped_early": True}]
    history = {"t0": [(100, 2e-18), (200, 1e-18)], "t1": [(100, 3e-3), (200, 2e-6)]}
    return {
        "jstar": jstar_figure({"gauss": {"x0": jstar}}),
        "loss vs flops": scaling.loss_vs_flops_figure(curves, fits, jstar=jstar),
        "fit lines": scaling.fit_lines_figure(fits),
        "hold-out": scaling.holdout_figure(curves, fits),
        "quality": scaling.quality_vs_flops_figure(quality_json(curves), curves=curves),
        "training": loss_curve_figure(*training_rows(16)),
        "diagnose": diagnose_figure({"m": diag}),
        "sweep": objective_curves_figure(rows, history, objective="gap", budget=200),
    }


def training_rows(n_sigma: int) -> tuple[list[dict], list[dict]]:
    """A training run's eval rows at `n_sigma` σ (J* known) and its training-loss rows, from 1e-18 to 1."""
    curve = [{"sigma": float(s), "images": im, "loss": float(s) * 1e-18 ** (1 - k / 2) + 1e-18,
              "j_star": float(s) * 1e-18} for s in np.geomspace(0.002, 80, n_sigma) for k, im in enumerate((64, 128, 256))]
    return curve, [{"images": 64 * k, "loss": 10.0 ** -k} for k in range(1, 19)]


def test_every_axis_of_every_figure_writes_powers_of_ten(jstar, curves, fits):
    """No axis mixes SI prefixes (µ, m: plotly's default) with 10⁻¹⁸: one format on every axis."""
    for name, fig in _figures(jstar, curves, fits).items():
        layout = fig.to_dict()["layout"]
        axes = {k: v for k, v in layout.items() if re.fullmatch(r"[xy]axis\d*", k)}
        assert axes and {k: v.get("exponentformat") for k, v in axes.items()} == dict.fromkeys(axes, "power"), name


def _plot_area_px(fig) -> float:
    margin = fig.layout.margin
    return fig.layout.height - (100 if margin.t is None else margin.t) - (80 if margin.b is None else margin.b)


@pytest.mark.parametrize("n_sigma", [16, 32])
def test_every_legend_entry_fits_and_the_j_star_lines_have_one(n_sigma):
    """plotly scrolls a legend taller than the plot area (cut off on a page or a screenshot): the figure grows
    with its entries. The J* lines: one entry for all of them, not one per σ, and not none."""
    from lossfloor.pages.training import J_STAR_LABEL, loss_curve_figure

    fig = loss_curve_figure(*training_rows(n_sigma))
    in_legend = [t for t in fig.data if t.showlegend is not False]
    names = [t.name for t in in_legend]
    assert [n for n in names if n.startswith("σ=")] == [f"σ={s:.3g}" for s in np.geomspace(0.002, 80, n_sigma)]
    assert names.count(J_STAR_LABEL) == 1 and "training loss" in names and len(names) == n_sigma + 2
    j_lines = [t for t in fig.data if t.line.dash == "dot"]
    assert len(j_lines) == n_sigma and {t.legendgroup for t in j_lines} == {"J*"}  # one entry toggles them all
    assert fig.layout.legend.orientation in (None, "v") and _plot_area_px(fig) >= LEGEND_ITEM_PX * len(names)


def test_j_star_lines_have_a_legend_entry_in_every_figure(jstar, curves, fits):
    figs = _figures(jstar, curves, fits)
    flops_j = [t for t in figs["loss vs flops"].data if t.legendgroup == "J*"]
    assert flops_j and [t.showlegend for t in flops_j].count(True) == 1 and flops_j[0].name.startswith("J*")
    diag_j = [t for t in figs["diagnose"].data if t.line.dash == "dot"]
    assert [t.name for t in diag_j] == ["J* of m (dotted)"] and diag_j[0].showlegend is not False
    for name, fig in figs.items():  # and every legend fits its figure
        entries = sum(t.showlegend is not False for t in fig.data) + bool(fig.layout.legend.title.text)
        assert _plot_area_px(fig) >= LEGEND_ITEM_PX * entries, name


def test_the_papers_correlation_is_labelled_as_the_papers(fits):
    sub = scaling.fit_lines_figure(fits).layout.title.text.split("<br>", 1)[1]
    assert "the paper reports |ρ| 0.82 → 0.94" in sub and "|ρ| (ours, in the panel titles)" in sub


# ---------------------------------------------------------------------------------------------------
# From MLflow alone


def _log_jstar_only(run, table, tmp_path) -> None:
    """An estimate child as the contract needs it: just jstar.parquet (log_estimate also adds more)."""
    write_table(table, tmp_path / "jstar.parquet")
    run.log_artifact(tmp_path / "jstar.parquet")


def _log_curves(run, rows, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    run.log_artifact(write_rows(rows, CURVE_SCHEMA, folder / CURVE_ARTIFACT))


@pytest.fixture(scope="module")
def store(tmp_path_factory, jstar, fit_objects, quality):
    """A sqlite store with: a complete study (plus a FAILED fit child and a later unrelated top-level run)
    in EXPERIMENT, a study without a fit child in 'no-fit', one whose train child lacks its artifact in
    'no-curve'."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    rows = curve_rows(jstar)
    study_tags = {"lossfloor.kind": "study", "lossfloor.study": "scaling-test"}
    ids = {}
    with start_run(experiment=EXPERIMENT, run_name="scaling-smoke", tags=study_tags, tracking_uri=uri) as parent:
        ids["parent"] = parent.run_id
        ids["estimate"] = log_estimate(jstar, params={"data": "synthetic"}, parent_run_id=parent.run_id,
                                       experiment=EXPERIMENT, tracking_uri=uri, tags={STAGE_TAG: "estimate"})
        for model in MODELS:
            with start_run(experiment=EXPERIMENT, run_name=f"train-{model}", parent_run_id=parent.run_id,
                           tags={STAGE_TAG: "train"}, tracking_uri=uri) as run:
                _log_curves(run, [r for r in rows if r["model"] == model], tmp / model)
        with pytest.raises(RuntimeError), start_run(experiment=EXPERIMENT, parent_run_id=parent.run_id,
                                                    tags={STAGE_TAG: "fit"}, tracking_uri=uri):
            raise RuntimeError("a fit that failed: ignored")
        with start_run(experiment=EXPERIMENT, run_name="fit", parent_run_id=parent.run_id,
                       tags={STAGE_TAG: "fit"}, tracking_uri=uri) as run:
            log_fits(run, fit_objects)
        with start_run(experiment=EXPERIMENT, run_name="quality", parent_run_id=parent.run_id,
                       tags={STAGE_TAG: "quality"}, tracking_uri=uri) as run:
            (tmp / "q").mkdir()
            (tmp / "q" / QUALITY_ARTIFACT).write_text(json.dumps(quality), encoding="utf-8")
            log_quality(run, quality, tmp / "q" / QUALITY_ARTIFACT)
            ids["quality"] = run.run_id
    with start_run(experiment=EXPERIMENT, run_name="unrelated", tracking_uri=uri):
        pass  # a later top-level run without stage children: --experiment skips it

    for exp in ("no-fit", "no-curve"):
        with start_run(experiment=exp, tracking_uri=uri) as parent:
            ids[exp] = parent.run_id
            with start_run(experiment=exp, parent_run_id=parent.run_id, tags={STAGE_TAG: "estimate"},
                           tracking_uri=uri) as run:
                _log_jstar_only(run, jstar, tmp)
            with start_run(experiment=exp, parent_run_id=parent.run_id, tags={STAGE_TAG: "train"},
                           tracking_uri=uri) as run:
                if exp == "no-fit":
                    _log_curves(run, rows, tmp / exp)
                ids[f"{exp}-train"] = run.run_id
            if exp == "no-curve":
                with start_run(experiment=exp, parent_run_id=parent.run_id, tags={STAGE_TAG: "fit"},
                               tracking_uri=uri) as run:
                    log_fits(run, fit_objects)
    return uri, ids


def test_cli_rebuilds_the_page_from_mlflow_and_logs_it(store, fits, tmp_path, capsys):
    uri, ids = store
    out = tmp_path / "f.html"
    assert main(["dashboard", "--experiment", EXPERIMENT, "--out", str(out), "--tracking-uri", uri]) == 0
    stdout = capsys.readouterr().out
    assert ids["parent"] in stdout and "3 train run(s)" in stdout
    page = out.read_text(encoding="utf-8")
    assert is_offline_html(page) and page.count("plotly.js v") == 1
    for title in scaling.SECTION_TITLES:
        assert f"<h2>{title}</h2>" in page
    assert ids["parent"] in page and ids["estimate"] in page  # the header names the runs
    for f in fits.values():
        assert shows(f"|ρ| = {f['corrected']['abs_rho']:.4f}", page)
    c = client(uri)
    assert DASHBOARD_ARTIFACT in {a.path for a in c.list_artifacts(ids["parent"])}
    logged = c.download_artifacts(ids["parent"], DASHBOARD_ARTIFACT, str(tmp_path / "dl"))
    with open(logged, encoding="utf-8") as fh:
        assert fh.read() == page


def test_quality_child_is_read_back_and_drawn(store, quality, tmp_path):
    uri, ids = store
    study = read_study(experiment=EXPERIMENT, tracking_uri=uri)
    assert study.quality == quality and study.runs["quality"] == (ids["quality"],)
    metrics = client(uri).get_run(ids["quality"]).data.metrics
    assert metrics["fid/L"] == quality["models"]["L"]["fid"]["mean"]
    assert metrics["fd_dinov2_std/S"] == quality["models"]["S"]["fd_dinov2"]["std"]
    out = tmp_path / "q.html"
    assert main(["dashboard", "--experiment", EXPERIMENT, "--out", str(out), "--tracking-uri", uri, "--no-log"]) == 0
    assert f"<h2>{scaling.QUALITY_TITLE}</h2>" in out.read_text(encoding="utf-8")


def test_cli_run_id_of_a_child_finds_its_study(store, tmp_path, capsys):
    uri, ids = store
    out = tmp_path / "g.html"
    argv = ["dashboard", "--run", ids["estimate"], "--out", str(out), "--tracking-uri", uri, "--no-log"]
    assert main(argv) == 0
    assert f"study run {ids['parent']}" in capsys.readouterr().out and out.is_file()


@pytest.mark.parametrize("case, message", [
    ("unknown experiment", "no experiment 'nope'"),
    ("experiment without a study", "no study found"),
    ("no fit child", "has no child with lossfloor.stage=fit"),
    ("train child without curves", f"has no artifact {CURVE_ARTIFACT}"),
    ("unknown run", "no run 'abc'"),
    ("not html", "expected an .html file"),
    ("no database", "no MLflow database at"),
])
def test_cli_bad_inputs_exit_2_with_one_line(store, tmp_path, capsys, case, message):
    uri, ids = store
    out = tmp_path / "x.html"
    which = {
        "unknown experiment": ["--experiment", "nope"],
        "experiment without a study": ["--experiment", "Default"],
        "no fit child": ["--experiment", "no-fit"],
        "train child without curves": ["--run", ids["no-curve"]],
        "unknown run": ["--run", "abc"],
    }.get(case, ["--experiment", EXPERIMENT])
    if case == "not html":
        out = tmp_path / "x.png"
    if case == "no database":
        uri = f"sqlite:///{tmp_path}/missing/mlflow.db"
    assert main(["dashboard", *which, "--out", str(out), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lossfloor dashboard: error:") and message in err, err
    assert not out.exists()
    if case == "no fit child":
        assert ids["no-fit"] in err
    if case == "train child without curves":
        assert ids["no-curve-train"] in err
    if case == "no database":
        assert not (tmp_path / "missing").exists()


def test_cli_needs_experiment_or_run(capsys):
    with pytest.raises(SystemExit) as e:
        main(["dashboard", "--out", "x.html"])
    assert e.value.code == 2 and "--experiment" in capsys.readouterr().err


def test_fits_artifact_follows_the_contract(store, fits, tmp_path):
    """fits.json keys are 'total' and 'sigma=<σ:.6g>', values ScalingFits.to_dict()."""
    uri, ids = store
    c = client(uri)
    fit_run = next(r for r in c.search_runs([c.get_run(ids["parent"]).info.experiment_id],
                                            f"tags.`{STAGE_TAG}` = 'fit' and attributes.status = 'FINISHED'"))
    with open(c.download_artifacts(fit_run.info.run_id, FITS_ARTIFACT, str(tmp_path)), encoding="utf-8") as fh:
        logged = json.load(fh)
    assert set(logged) == {"total", *(f"sigma={s:.6g}" for s in FIT_SIGMAS)}
    assert logged == json.loads(json.dumps(fits))


# ---------------------------------------------------------------------------------------------------
# In a browser, offline


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()  # installed by the set-up of `make test-e2e` (scripts/setup_browser.sh)
    if path is None:
        pytest.fail("headless Chromium is required for this test: run `make test-e2e` (its set-up installs it) "
                    "or scripts/setup_browser.sh")
    return path


def _body_marker(dom: str) -> str:
    m = re.search(r'<body[^>]*\bdata-rendered="([^"]*)"', dom)
    assert m, "no <body data-rendered=...> in the dumped DOM"
    return m.group(1)


@pytest.mark.e2e
def test_page_renders_offline_in_headless_chromium(chromium, page, tmp_path):
    from PIL import Image

    path = tmp_path / "page.html"
    path.write_text(page, encoding="utf-8")
    shot = render(chromium, path, tmp_path / "chromium", width=1200, height=2000)
    assert _body_marker(shot.dom) == "ok: 4 plots", shot.log[-3000:]  # every Plotly.newPlot resolved, no error
    assert shot.dom.count('class="main-svg"') >= 8  # plotly drew its SVG layers in every figure
    img = Image.open(shot.png).convert("RGB")
    assert img.size == (1200, 2000)
    colors = img.getcolors(maxcolors=1 << 24)
    white = next((n for n, c in colors if c == (255, 255, 255)), 0)
    assert len(colors) > 200, f"the screenshot has only {len(colors)} colours: blank page?"
    assert 1 - white / (1200 * 2000) > 0.02, "the screenshot is almost all white"

    # the same page with plotly.js from a CDN instead of embedded: with the network off it must fail
    cdn = page.replace(f'<script type="text/javascript">{get_plotlyjs()}</script>',
                       '<script src="https://cdn.plot.ly/plotly-3.0.1.min.js"></script>')
    assert cdn != page
    (tmp_path / "cdn.html").write_text(cdn, encoding="utf-8")
    failed = render(chromium, tmp_path / "cdn.html", tmp_path / "chromium-cdn", screenshot=False)
    assert _body_marker(failed.dom).startswith("error: plotly.js is not loaded")


@pytest.mark.e2e
def test_legends_of_16_and_32_sigma_are_whole_in_headless_chromium(chromium, tmp_path):
    """plotly.js scrolls a legend taller than its plot area (a scrollbar rect of non-zero height): none does."""
    from lossfloor.pages.html import Section, page_html
    from lossfloor.pages.training import loss_curve_figure

    figs = [loss_curve_figure(*training_rows(n)) for n in (16, 32)]
    (tmp_path / "legends.html").write_text(page_html("legends", [Section("", figs)]), encoding="utf-8")
    shot = render(chromium, tmp_path / "legends.html", tmp_path / "chromium", screenshot=False)
    assert _body_marker(shot.dom) == "ok: 2 plots", shot.log[-3000:]
    bars = re.findall(r'<rect class="scrollbar"[^>]*\bheight="([^"]*)"', shot.dom)
    assert len(bars) == 2 and all(float(h) == 0 for h in bars), bars
    assert shot.dom.count('<g class="traces"') == (16 + 2) + (32 + 2)  # every legend entry drawn: σ, J*, training
