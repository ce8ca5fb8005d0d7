"""The scaling study's figures and page (Xu et al. 2026, §5, Eq. 13): loss-vs-FLOPs curves with their
envelope, raw vs gap-corrected power-law fits, hold-out predictions, the table of fits, and the dashboard.

Inputs are the study's hand-off tables: the loss curves (`lossfloor.train.curves` schema; the figures use
model, flops, loss, sigma (null = total) and params) and fits, a mapping "total" | "sigma=X" ->
`ScalingFits.to_dict()` (`lossfloor.scaling.fits`, hold-out predictions included: nothing is refitted here).

    fig = loss_vs_flops_figure(curves, fits)     # one panel per σ plus the total, log-log
    fig = fit_lines_figure(fits)                 # per quantity: raw | corrected, |ρ| in the titles
    fig = quality_vs_flops_figure(quality)       # FD / FID / FD_DINOv2 per model against its training FLOPs
    html = build_dashboard(jstar, curves, fits, title="EDM2 scaling, ImageNet-512")   # the whole page

quality: the study's sample-quality stage (quality.json, `lossfloor.tracking.artifacts`): per model its
training FLOPs, parameter count and each metric's mean and spread over seeds.
"""

from __future__ import annotations

import html as html_lib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from lossfloor.errors import InputError
from lossfloor.floor.table import SIGMA_RTOL, outside_grid  # rows, fits and panels of the same σ
from lossfloor.fmt import num
from lossfloor.pages.html import Section, page_html, write_page
from lossfloor.pages.jstar import data_label, jstar_figure
from lossfloor.pages.layout import finish
from lossfloor.scaling.fits import check_fits_json
from lossfloor.train.curves import check_curves

FORM_TITLES = {"raw": "raw J = βF^α", "corrected": "corrected J − J* = βF^α", "free_offset": "free offset J = E + βF^α"}
FORM_COLORS = {"raw": "#d62728", "corrected": "#2ca02c", "free_offset": "#1f77b4"}
ENVELOPE_COLOR = "#222222"
MAX_LINE_POINTS = 300  # envelope points drawn per trace (the fits use up to 1500)
PANEL_HEIGHT = 360


# ---------------------------------------------------------------------------------------------------
# Reading the inputs


def quantity_label(sigma: float | None) -> str:
    return "total loss" if sigma is None else f"σ = {sigma:.4g}"


def ordered_fits(fits: Mapping[str, dict]) -> list[tuple[str, dict]]:
    """(key, fit) by increasing σ, the total loss last."""
    return sorted(fits.items(), key=lambda kv: (kv[1].get("sigma") is None, kv[1].get("sigma") or 0.0))


def _same_sigma(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= SIGMA_RTOL * max(abs(a), abs(b))


def fit_at(fits: Mapping[str, dict], sigma: float | None) -> dict | None:
    """The fit of the quantity at `sigma` (None: the total loss), or None."""
    return next((f for _, f in ordered_fits(fits) if _same_sigma(f.get("sigma"), sigma)), None)


def _column(curves: pa.Table, name: str) -> np.ndarray:
    col = curves.column(name)
    return np.asarray(pc.fill_null(col.cast(pa.float64()), math.nan).to_numpy(), dtype=np.float64)


def curve_sigmas(curves: pa.Table) -> tuple[list[float], bool]:
    """(the distinct σ of the per-σ rows, sorted; whether there are total-loss rows)."""
    if "sigma" not in curves.column_names:
        return [], True
    sig = _column(curves, "sigma")
    total = np.isnan(sig)
    distinct: list[float] = []
    for s in np.unique(sig[~total]):
        if not distinct or not _same_sigma(distinct[-1], float(s)):
            distinct.append(float(s))
    return distinct, bool(total.any())


def model_curves(curves: pa.Table, sigma: float | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(model, flops, loss)] of the rows at `sigma` (None: total), sorted by flops; models by size."""
    check_curves(curves)
    models = np.asarray(curves.column("model").to_pylist(), dtype=object)
    flops, loss = _column(curves, "flops"), _column(curves, "loss")
    if "sigma" in curves.column_names:
        sig = _column(curves, "sigma")
        rows = np.isnan(sig) if sigma is None else np.abs(sig - sigma) <= SIGMA_RTOL * sigma
    else:
        rows = np.full(len(flops), sigma is None)
    params = _column(curves, "params") if "params" in curves.column_names else None
    names = list(dict.fromkeys(models[rows].tolist()))
    if params is not None:  # smallest model first, so colours follow size (unknown sizes last)
        def size(m) -> float:
            p = params[rows & (models == m)]
            p = p[np.isfinite(p)]
            return float(p.max()) if len(p) else math.inf

        names.sort(key=size)
    out = []
    for m in names:
        pick = rows & (models == m)
        order = np.argsort(flops[pick], kind="stable")
        out.append((str(m), flops[pick][order], loss[pick][order]))
    return out


def model_colors(curves: pa.Table) -> dict[str, str]:
    """One colour per model, the same in every figure (models ordered by size)."""
    sigmas, has_total = curve_sigmas(curves)
    names: list[str] = []
    for s in ([None] if has_total else []) + sigmas:
        names += [m for m, _, _ in model_curves(curves, s) if m not in names]
    palette = qualitative.Plotly
    return {m: palette[i % len(palette)] for i, m in enumerate(names)}


def envelope_points(fit: dict | None, curves: pa.Table, sigma: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(flops, loss) of the envelope: the fit's own, else computed from the curves (lossfloor.scaling)."""
    if fit is not None and fit.get("envelope"):
        pts = np.asarray(fit["envelope"], dtype=np.float64)  # (n, 2) flops, loss
        return pts[:, 0], pts[:, 1]
    from lossfloor.scaling import as_curves, envelope  # scipy: only when a fit does not carry one

    env = envelope(as_curves(curves, sigma=sigma))
    return env.flops, env.loss


def _thin(*arrays: np.ndarray, n: int = MAX_LINE_POINTS) -> list[np.ndarray]:
    """Every k-th point (and the last) so a line has at most ~n points."""
    size = len(arrays[0])
    if size <= n:
        return list(arrays)
    keep = np.unique(np.r_[np.arange(0, size, math.ceil(size / n)), size - 1])
    return [a[keep] for a in arrays]


def j_star_of(fit: dict | None, jstar=None, sigma: float | None = None) -> float | None:
    """J* of a quantity: the fit's (what was fitted), else the J* table's x0 value at σ (log-σ interp.)."""
    if fit is not None and fit.get("j_star") is not None:
        return float(fit["j_star"])
    if jstar is None or sigma is None:
        return None
    x0 = jstar.x0()
    if outside_grid([sigma], x0.sigma):
        return None
    return x0.at(sigma)[0]


def _grid(rows_n: int, cols: int, titles: list[str]) -> go.Figure:
    """Panels PANEL_HEIGHT px high with ~110 px between rows (room for an axis title and a panel title)."""
    gap = 110 / (PANEL_HEIGHT * rows_n) if rows_n > 1 else 0.0
    return make_subplots(rows=rows_n, cols=cols, subplot_titles=titles, horizontal_spacing=0.1,
                         vertical_spacing=gap)


def _log_axes(fig: go.Figure, n: int, cols: int, y_title: str) -> None:
    for p in range(n):
        row, col = p // cols + 1, p % cols + 1
        fig.update_xaxes(type="log", title_text="training FLOPs F", row=row, col=col)
        fig.update_yaxes(type="log", title_text=y_title, row=row, col=col)


# ---------------------------------------------------------------------------------------------------
# Figures


def loss_vs_flops_figure(
    curves: pa.Table, fits: Mapping[str, dict], *, sigmas: Sequence[float] | None = None, jstar=None,
    title: str = "Loss vs training compute",
) -> go.Figure:
    """Per model, loss against FLOPs (log-log) with the envelope, one panel per σ plus the total loss.

    sigmas: the per-σ panels (default: the σ that have fits, else up to 4 of the curves' σ, spread in
    log σ). The total-loss panel is added when the curves have total rows. A dotted line marks J*.
    """
    available, has_total = curve_sigmas(curves)
    if sigmas is None:
        sigmas = [f["sigma"] for _, f in ordered_fits(fits) if f.get("sigma") is not None]
        if not sigmas and available:
            sigmas = [available[i] for i in np.unique(np.linspace(0, len(available) - 1, 4).round().astype(int))]
    for s in sigmas:
        if not any(_same_sigma(s, a) for a in available):
            shown = ", ".join(f"{a:g}" for a in available) or "none"
            raise InputError(f"sigma {s:g}: the curves have no rows at this σ (column 'sigma' has: {shown})")
    panels: list[float | None] = sorted(float(s) for s in sigmas) + ([None] if has_total else [])
    if not panels:
        raise InputError("curves: no rows to plot (no per-σ rows selected and no total-loss rows)")
    cols = 1 if len(panels) == 1 else 2
    rows_n = math.ceil(len(panels) / cols)
    fig = _grid(rows_n, cols, [quantity_label(s) for s in panels])
    colors = model_colors(curves)
    shown: set[str] = set()
    j_star_shown = False
    for p, sigma in enumerate(panels):
        row, col = p // cols + 1, p % cols + 1
        per_model = model_curves(curves, sigma)
        for model, f, j in per_model:
            fig.add_trace(go.Scatter(
                x=f, y=j, mode="lines+markers", name=model, legendgroup=model, showlegend=model not in shown,
                line={"color": colors[model], "width": 1.5}, marker={"size": 4},
                hovertemplate="F=%{x:.3g}<br>J=%{y:.5g}<extra>" + model + "</extra>",
            ), row=row, col=col)
            shown.add(model)
        fit = fit_at(fits, sigma)
        ef, ej = _thin(*envelope_points(fit, curves, sigma))
        fig.add_trace(go.Scatter(
            x=ef, y=ej, mode="lines", name="envelope", legendgroup="envelope", showlegend=p == 0,
            line={"color": ENVELOPE_COLOR, "width": 2.5, "dash": "dash"},
            hovertemplate="F=%{x:.3g}<br>envelope J=%{y:.5g}<extra></extra>",
        ), row=row, col=col)
        js = j_star_of(fit, jstar, sigma)
        if js is not None and js > 0:  # a trace, not add_hline: its annotation's y would be log10 units
            fig.add_trace(go.Scatter(
                x=[min(f.min() for _, f, _ in per_model), max(f.max() for _, f, _ in per_model)], y=[js, js],
                mode="lines", name="J* (dotted, one per panel)", legendgroup="J*", showlegend=not j_star_shown,
                line={"dash": "dot", "color": "#7f7f7f", "width": 1.5},
                hovertemplate=f"J* = {js:.5g}<extra></extra>",
            ), row=row, col=col)
            j_star_shown = True
    _log_axes(fig, len(panels), cols, "loss J")
    fig.update_layout(
        title={"text": f"{title}<br><sup>one line per model; dashed: envelope (lower frontier over models); "
                       "dotted: J*</sup>"},
        template="plotly_white", height=PANEL_HEIGHT * rows_n + 120, legend={"title": {"text": "model"}},
    )
    return finish(fig)


METRIC_LABELS = {"fid": "FID", "fd_dinov2": "FD_DINOv2", "fd": "FD"}
QUALITY_TITLE = "Sample quality vs training FLOPs"


def quality_vs_flops_figure(quality: Mapping, *, curves: pa.Table | None = None,
                            title: str = QUALITY_TITLE) -> go.Figure:
    """One panel per metric (FD, FID, FD_DINOv2), log-log: per model one point at its training FLOPs, the
    metric's mean over seeds with its standard deviation over seeds as the error bar; the models in the
    colours of the loss panels (`curves`: the same study's loss curves; else by size)."""
    metrics = list(quality["metrics"])
    models = sorted(quality["models"], key=lambda m: (quality["models"][m].get("params") or math.inf, m))
    colors = model_colors(curves) if curves is not None else {}
    palette = qualitative.Plotly
    cols = 1 if len(metrics) == 1 else 2
    rows_n = math.ceil(len(metrics) / cols)
    fig = _grid(rows_n, cols, [METRIC_LABELS.get(k, k) for k in metrics])
    for p, metric in enumerate(metrics):
        row, col = p // cols + 1, p % cols + 1
        for i, model in enumerate(models):
            r = quality["models"][model]
            m = r[metric]
            fig.add_trace(go.Scatter(
                x=[r["flops"]], y=[m["mean"]], mode="markers+text", text=[model], textposition="top center",
                cliponaxis=False,
                name=model, legendgroup=model, showlegend=p == 0,
                error_y={"type": "data", "array": [m["std"]], "visible": True},
                marker={"size": 9, "color": colors.get(model, palette[i % len(palette)])},
                hovertemplate=f"F=%{{x:.3g}}<br>{METRIC_LABELS.get(metric, metric)}=%{{y:.4g}} ± {m['std']:.2g}"
                              f"<extra>{model}</extra>",
            ), row=row, col=col)
    _log_axes(fig, len(metrics), cols, "")
    for p, metric in enumerate(metrics):  # each panel's own metric on its y axis
        fig.update_yaxes(title_text=f"{METRIC_LABELS.get(metric, metric)} (mean ± sd over seeds)", row=p // cols + 1,
                         col=p % cols + 1)
    n, seeds = quality.get("n_samples"), quality.get("seeds")
    features = ", ".join(f"{METRIC_LABELS.get(k, k)}: {v}" for k, v in (quality.get("features") or {}).items())
    fig.update_layout(
        title={"text": f"{title}<br><sup>each model's final checkpoint, {n} samples x {seeds} seed(s); error bar: "
                       f"standard deviation over seeds; features {features}</sup>"},
        template="plotly_white", height=PANEL_HEIGHT * rows_n + 120, legend={"title": {"text": "model"}},
    )
    return finish(fig)


def _form_title(label: str, form: str, fit: dict | None) -> str:
    if fit is None:
        return f"{label} · {FORM_TITLES[form]}<br>not fitted"
    rho = fit.get("abs_rho")
    rho_s = "-" if rho is None else f"{rho:.4f}"
    return f"{label} · {FORM_TITLES[form]}<br>|ρ| = {rho_s}, α = {num(fit.get('alpha'))}"


def fit_lines_figure(fits: Mapping[str, dict], *, title: str = "Raw vs gap-corrected power laws") -> go.Figure:
    """Per quantity (row): the envelope and the fitted line, raw J = βF^α (left) and J − J* = βF^α (right).

    Both on log-log axes, so a power law is a straight line; |ρ| (Pearson, log-log) in each panel's title.
    """
    items = ordered_fits(fits)
    if not items:
        raise InputError("fits: nothing to plot (empty)")
    titles = []
    for _, f in items:
        label = quantity_label(f.get("sigma"))
        titles += [_form_title(label, "raw", f.get("raw")), _form_title(label, "corrected", f.get("corrected"))]
    fig = _grid(len(items), 2, titles)
    for i, (_, f) in enumerate(items):
        pts = np.asarray(f.get("envelope") or [], dtype=np.float64).reshape(-1, 2)  # (n, 2) flops, loss
        flops, loss = _thin(pts[:, 0], pts[:, 1])
        for c, form in enumerate(("raw", "corrected"), start=1):
            fit = f.get(form)
            if fit is None:
                fig.add_annotation(text="no J*: not fitted", showarrow=False, xref="x domain", yref="y domain",
                                   x=0.5, y=0.5, row=i + 1, col=c)
                continue
            offset = 0.0 if form == "raw" else float(fit.get("j_star") or f.get("j_star") or 0.0)
            y = loss - offset
            keep = y > 0
            fig.add_trace(go.Scatter(
                x=flops[keep], y=y[keep], mode="markers", name="envelope points", legendgroup="points",
                showlegend=i == 0 and c == 1, marker={"size": 4, "color": ENVELOPE_COLOR, "opacity": 0.6},
                hovertemplate="F=%{x:.3g}<br>%{y:.5g}<extra></extra>",
            ), row=i + 1, col=c)
            if len(flops) and fit.get("alpha") is not None and fit.get("beta") is not None:
                line_f = np.geomspace(flops.min(), flops.max(), 50)
                fig.add_trace(go.Scatter(
                    x=line_f, y=fit["beta"] * line_f ** fit["alpha"], mode="lines",
                    name=FORM_TITLES[form], legendgroup=form, showlegend=i == 0,
                    line={"color": FORM_COLORS[form], "width": 2.5},
                    hovertemplate="F=%{x:.3g}<br>fit %{y:.5g}<extra>" + form + "</extra>",
                ), row=i + 1, col=c)
        fig.update_yaxes(title_text="J", row=i + 1, col=1)
        fig.update_yaxes(title_text="J − J*", row=i + 1, col=2)
    for i in range(len(items)):
        for c in (1, 2):
            fig.update_xaxes(type="log", title_text="training FLOPs F", row=i + 1, col=c)
            fig.update_yaxes(type="log", row=i + 1, col=c)
    fig.update_annotations(font_size=12)
    fig.update_layout(
        title={"text": f"{title}<br><sup>fitted on the envelope points; |ρ| (ours, in the panel titles): Pearson "
                       "correlation of (ln F, ln(J − offset)); the paper reports |ρ| 0.82 → 0.94 (raw → corrected) "
                       "at a high σ</sup>"},
        template="plotly_white", height=PANEL_HEIGHT * len(items) + 140, margin={"t": 140},  # 2-line panel titles
    )
    return finish(fig)


def holdout_figure(curves: pa.Table, fits: Mapping[str, dict], *,
                   title: str = "Hold-out: predicting the largest model") -> go.Figure | None:
    """Per quantity with a hold-out: each form fitted without the largest model, extrapolated to its
    frontier, against what that model actually reached. None when no fit has a hold-out."""
    items = [(k, f) for k, f in ordered_fits(fits) if f.get("holdout")]
    if not items:
        return None
    titles = []
    for _, f in items:
        h = f["holdout"]
        scores = ", ".join(f"{form} {num(s['log_rmse'], '.3g')}" for form, s in h["scores"].items() if s)
        titles.append(f"{quantity_label(f.get('sigma'))} · held out {h['model']} · best: {h.get('best')}"
                      f"<br>log-RMSE on its frontier: {scores}")
    cols = 1 if len(items) == 1 else 2
    rows_n = math.ceil(len(items) / cols)
    fig = _grid(rows_n, cols, titles)
    for p, (_, f) in enumerate(items):
        row, col = p // cols + 1, p % cols + 1
        h = f["holdout"]
        tf, tj = (np.asarray(v, dtype=np.float64) for v in zip(*h["target_points"]))  # what the model reached
        ef, ej = _thin(*envelope_points(f, curves, f.get("sigma")))
        fig.add_trace(go.Scatter(x=ef, y=ej, mode="lines", name="envelope, all models", legendgroup="env",
                                 showlegend=p == 0, line={"color": "#bbbbbb", "width": 2}), row=row, col=col)
        fig.add_trace(go.Scatter(x=tf, y=tj, mode="lines+markers", name="held-out model (actual)",
                                 legendgroup="actual", showlegend=p == 0,
                                 line={"color": ENVELOPE_COLOR, "width": 3}, marker={"size": 5},
                                 hovertemplate="F=%{x:.3g}<br>actual J=%{y:.5g}<extra>" + h["model"] + "</extra>"),
                      row=row, col=col)
        for form, score in h["scores"].items():
            if score is None or not score.get("prediction"):
                continue
            line_f, line_j = zip(*score["prediction"])  # the form fitted without the held-out model
            fig.add_trace(go.Scatter(
                x=list(line_f), y=list(line_j), mode="lines", name=f"{form} prediction",
                legendgroup=form, showlegend=p == 0, line={"color": FORM_COLORS[form], "dash": "dash", "width": 2},
                hovertemplate="F=%{x:.3g}<br>predicted %{y:.5g}<extra>" + form + "</extra>",
            ), row=row, col=col)
            iv = score.get("predicted_final_interval")
            err = None
            if iv and None not in iv:
                err = {"type": "data", "symmetric": False, "array": [max(iv[1] - score["predicted_final"], 0)],
                       "arrayminus": [max(score["predicted_final"] - iv[0], 0)], "visible": True}
            fig.add_trace(go.Scatter(
                x=[h["final_flops"]], y=[score["predicted_final"]], mode="markers", error_y=err,
                name=f"{form} at final F", legendgroup=form, showlegend=False,
                marker={"color": FORM_COLORS[form], "size": 9, "symbol": "diamond"},
                hovertemplate=f"{form}: predicted %{{y:.5g}} at F=%{{x:.3g}}<br>error "
                              f"{num(100 * score['rel_error'], '+.2f')}%<extra></extra>",
            ), row=row, col=col)
    _log_axes(fig, len(items), cols, "loss J")
    fig.update_annotations(font_size=12)
    fig.update_layout(
        title={"text": f"{title}<br><sup>dashed: each form fitted without the largest model; diamonds: its "
                       "prediction at the held-out model's last point, with the bootstrap 95% interval</sup>"},
        template="plotly_white", height=PANEL_HEIGHT * rows_n + 160, margin={"t": 160},
    )
    return finish(fig)


# ---------------------------------------------------------------------------------------------------
# The fits as table rows


def _with_interval(value, intervals: Mapping | None, name: str, fmt: str = ".4g") -> str:
    iv = (intervals or {}).get(name)
    text = num(value, fmt)
    if iv and None not in iv:
        text += f" [{num(iv[0], fmt)}, {num(iv[1], fmt)}]"
    return text


FIT_TABLE_COLUMNS = ("quantity", "form", "α", "β", "offset", "|ρ|", "R²", "log-RMSE", "hold-out log-RMSE",
                     "hold-out error at final F")


def fit_table_rows(fits: Mapping[str, dict]) -> list[dict[str, str]]:
    """One row per (quantity, form) with FIT_TABLE_COLUMNS as text; intervals are bootstrap 95%."""
    out = []
    for _, f in ordered_fits(fits):
        hold = f.get("holdout") or {}
        for form in ("raw", "corrected", "free_offset"):
            fit = f.get(form)
            row = dict.fromkeys(FIT_TABLE_COLUMNS, "-")
            row["quantity"], row["form"] = quantity_label(f.get("sigma")), form
            if fit is None:
                row["offset"] = "not fitted"
                out.append(row)
                continue
            iv = fit.get("intervals")
            row["α"] = _with_interval(fit.get("alpha"), iv, "alpha")
            row["β"] = _with_interval(fit.get("beta"), iv, "beta")
            if form == "raw":
                row["offset"] = "0"
            elif form == "corrected":
                iv_j = f.get("j_star_interval")
                row["offset"] = f"J* = {num(fit.get('j_star'))}" + (
                    f" [{num(iv_j[0], '.3g')}, {num(iv_j[1], '.3g')}]" if iv_j else "")
            else:
                row["offset"] = "E = " + _with_interval(fit.get("offset"), iv, "offset")
                if fit.get("offset_at_bound"):
                    row["offset"] += " (at bound)"
            if fit.get("abs_rho") is not None and iv and iv.get("rho") and None not in iv["rho"]:
                lo, hi = sorted(abs(v) for v in iv["rho"])
                row["|ρ|"] = f"{fit['abs_rho']:.4f} [{lo:.4f}, {hi:.4f}]"
            else:
                row["|ρ|"] = num(fit.get("abs_rho"), ".4f")
            row["R²"] = _with_interval(fit.get("r2"), iv, "r2", ".4f")
            row["log-RMSE"] = num(fit.get("log_rmse"), ".3g")
            score = (hold.get("scores") or {}).get(form)
            if score:
                best = " ★" if hold.get("best") == form else ""
                if form in (hold.get("unidentified") or {}):
                    best = " (not ranked: not identified)"
                row["hold-out log-RMSE"] = num(score.get("log_rmse"), ".3g") + best
                row["hold-out error at final F"] = num(100 * score["rel_error"], "+.2f") + "%"
                iv_f = score.get("predicted_final_interval")
                if iv_f and None not in iv_f:
                    row["hold-out error at final F"] += f" (J pred. [{num(iv_f[0])}, {num(iv_f[1])}])"
            out.append(row)
    return out


SECTION_TITLES = (
    "Optimal loss J*(σ)",
    "Loss vs compute per σ",
    "Raw vs gap-corrected fits",
    "Hold-out: predicting the largest model",
    "Fits",
)


# ---------------------------------------------------------------------------------------------------
# The dashboard page


def _as_table(curves) -> pa.Table:
    if isinstance(curves, pa.Table):
        return curves
    if hasattr(curves, "to_arrow"):  # a polars DataFrame
        return curves.to_arrow()
    raise InputError(f"curves: expected a pyarrow Table (lossfloor.train.curves schema), got {type(curves).__name__}")


def fits_table_html(fits: Mapping[str, dict]) -> str:
    """The fits as an HTML table (one row per quantity and form), then each quantity's notes."""
    e = html_lib.escape
    head = "".join(f"<th>{e(c)}</th>" for c in FIT_TABLE_COLUMNS)
    body, last = [], None
    for row in fit_table_rows(fits):
        cls = ' class="first"' if row["quantity"] != last else ""
        last = row["quantity"]
        body.append(f"<tr{cls}>" + "".join(f"<td>{e(row[c])}</td>" for c in FIT_TABLE_COLUMNS) + "</tr>")
    notes = []
    for _, f in ordered_fits(fits):
        items = list(f.get("notes") or [])
        cons = f.get("consistency")
        if cons:
            inside = cons.get("j_star_in_offset_interval")
            where = "" if inside is None else (" (J* inside E's interval)" if inside else " (J* outside E's interval)")
            items.append(f"free-offset E = {num(cons.get('offset'))} vs J* = {num(cons.get('j_star'))}{where}")
        boot = f.get("bootstrap") or {}
        items.append(f"{f.get('n_models')} models, {f.get('n_envelope_points')} envelope points, "
                     f"bootstrap {boot.get('n', 0)} over {boot.get('unit', 'model')}s (seed {boot.get('seed')})")
        notes.append(f"<li><b>{e(quantity_label(f.get('sigma')))}</b>: " + "; ".join(e(str(i)) for i in items) + "</li>")
    return (f'<div class="table-wrap"><table class="fits"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>'
            f'<p class="note">Intervals: bootstrap 95% percentile over models. ★: the form that best predicts '
            f'the held-out largest model (lowest log-RMSE) among identified forms — a free offset at its bound (E = min J) '
            f'is not identified and is never ranked; choose forms on that, not on ρ.</p>'
            f'<ul class="note">{"".join(notes)}</ul>')


def build_dashboard(
    jstar,
    curves,
    fits: Mapping[str, dict],
    *,
    title: str = "Scaling study",
    sigmas: Sequence[float] | None = None,
    about: Mapping[str, str] | None = None,
    data: str = "",
    quality: Mapping | None = None,
) -> str:
    """The page as HTML text (module docstring). sigmas: the per-σ loss panels (default: the fitted σ);
    about: key/value lines shown under the title (e.g. where the runs are); data: the data set's name for
    the legend (default: its fingerprint); quality: the sample-quality panel's input (module docstring),
    drawn beside the loss panels when given."""
    curves = check_curves(_as_table(curves))
    fits = check_fits_json(dict(fits), "fits")
    if jstar is None:
        first = Section(SECTION_TITLES[0], ['<p class="note">No J* table was given.</p>'])
    else:
        row = jstar.rows()[0]
        label = data_label(data, row.get("dataset_fingerprint") or "")
        first = Section(SECTION_TITLES[0], [jstar_figure({label: {row["target"]: jstar}}, title="Optimal loss J*(σ)")],
                        intro=f"{row['estimator']} estimator, {row['n_queries']} queries, target {row['target']}.")
    hold = holdout_figure(curves, fits)
    sections = [
        first,
        Section(SECTION_TITLES[1], [loss_vs_flops_figure(curves, fits, sigmas=sigmas, jstar=jstar)]),
        *([Section(QUALITY_TITLE, [quality_vs_flops_figure(quality, curves=curves)])] if quality else []),
        Section(SECTION_TITLES[2], [fit_lines_figure(fits)]),
        Section(SECTION_TITLES[3], [hold] if hold is not None else
                ['<p class="note">No fit has a hold-out (fit_all(..., holdout=True) needs 2 or more models).</p>']),
        Section(SECTION_TITLES[4], [fits_table_html(fits)]),
    ]
    return page_html(title, sections, about=about)


def write_dashboard(jstar, curves, fits: Mapping[str, dict], path: str | os.PathLike, **kwargs) -> Path:
    """`build_dashboard(jstar, curves, fits, **kwargs)` written atomically to `path`."""
    return write_page(build_dashboard(jstar, curves, fits, **kwargs), path)


__all__ = [
    "FIT_TABLE_COLUMNS",
    "QUALITY_TITLE",
    "SECTION_TITLES",
    "build_dashboard",
    "fit_at",
    "fit_lines_figure",
    "fit_table_rows",
    "fits_table_html",
    "holdout_figure",
    "loss_vs_flops_figure",
    "model_curves",
    "ordered_fits",
    "quality_vs_flops_figure",
    "quantity_label",
    "write_dashboard",
]
