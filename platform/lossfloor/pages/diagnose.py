"""A diagnosis figure: loss J(σ) and J*(σ) on log-log axes with the gap shaded and σ* marked, and the
relative gap (J − J*)/J below; several diagnoses (models) overlay, one colour each.

    fig = diagnose_figure({"my-ddpm": diagnosis})      # lossfloor.diagnose.Diagnosis objects
    lossfloor.pages.html.write_html(fig, "diag.html")  # plotly.js embedded, opens offline
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from lossfloor.pages.layout import finish


def _rgba(color: str, alpha: float) -> str:
    h = color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def diagnose_figure(diagnoses: Mapping[str, object], *, title: str = "Loss gap J − J*") -> go.Figure:
    """Top: J(σ) (solid, ±1.96 stderr bars) and J*(σ) (dotted, its interval shaded), the gap between
    them shaded, σ* dashed; bottom: (J − J*)/J. `diagnoses`: label -> Diagnosis."""
    if not diagnoses:
        raise ValueError("diagnoses: expected at least one, e.g. {'model': diagnosis}")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.65, 0.35],
                        subplot_titles=("loss J(σ) and optimal loss J*(σ), x0 units (shaded: the gap)",
                                        "relative gap (J − J*) / J"))
    palette = qualitative.Plotly
    stars = []
    # a log axis cannot show J* = 0 (far below σ*) or 1e-20: J* and its band are drawn no lower than a
    # tenth of the smallest loss, where the axis starts, so the gap below σ* reads as the whole loss
    losses = np.concatenate([d.column("loss_x0") for d in diagnoses.values()])
    floor = 0.1 * float(losses[losses > 0].min()) if (losses > 0).any() else 1e-12
    for i, (label, d) in enumerate(diagnoses.items()):
        color = palette[i % len(palette)]
        s, loss, se = d.column("sigma"), d.column("loss_x0"), d.column("loss_stderr")
        js, lo, hi = (np.maximum(d.column(c), floor) for c in ("j_star_x0", "j_star_ci_low", "j_star_ci_high"))
        keep = loss > 0
        group = label
        fig.add_trace(go.Scatter(x=s[keep], y=js[keep], mode="lines", line={"color": color, "width": 0},
                                 legendgroup=group, showlegend=False, hoverinfo="skip"), row=1, col=1)  # the fill's base
        fig.add_trace(go.Scatter(  # the gap: filled from J* up to J
            x=s[keep], y=loss[keep], mode="lines+markers", name=label, legendgroup=group, fill="tonexty",
            fillcolor=_rgba(color, 0.18), line={"color": color}, marker={"size": 5},
            error_y={"type": "data", "array": 1.96 * se[keep], "visible": True},
            hovertemplate="σ=%{x:.4g}<br>J=%{y:.4g}<extra>" + label + "</extra>"), row=1, col=1)
        band = np.concatenate([hi[keep], lo[keep][::-1]])
        fig.add_trace(go.Scatter(x=np.concatenate([s[keep], s[keep][::-1]]), y=band,
                                 fill="toself", fillcolor=_rgba(color, 0.10), line={"width": 0},
                                 legendgroup=group, showlegend=False, hoverinfo="skip"), row=1, col=1)
        fig.add_trace(go.Scatter(x=s[keep], y=js[keep], mode="lines+markers", line={"color": color, "dash": "dot"},
                                 marker={"color": color, "size": 4, "symbol": "x"}, name=f"J* of {label} (dotted)",
                                 legendgroup=group,
                                 hovertemplate="σ=%{x:.4g}<br>J*=%{y:.4g}<extra>J* " + label + "</extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=s, y=d.column("rel_gap"), mode="lines+markers", line={"color": color},
                                 legendgroup=group, showlegend=False,
                                 hovertemplate="σ=%{x:.4g}<br>(J−J*)/J=%{y:.3g}<extra>" + label + "</extra>"),
                      row=2, col=1)
        if d.sigma_star is not None:
            stars.append(f"{label}: {d.sigma_star:.3g}")
            for row in (1, 2):  # a shape's x is a data value even on a log axis (plotly.py issue 4012)
                fig.add_vline(x=d.sigma_star, line={"dash": "dash", "color": color, "width": 1}, row=row, col=1)
    fig.update_xaxes(type="log")
    fig.update_xaxes(title_text="σ", row=2, col=1)
    top = max(float(np.max(d.column(c))) for d in diagnoses.values() for c in ("loss_x0", "j_star_ci_high"))
    fig.update_yaxes(type="log", title_text="x0 loss", row=1, col=1,
                     range=[np.log10(floor), np.log10(max(top, floor)) + 0.2])
    fig.update_yaxes(title_text="(J − J*) / J", row=2, col=1)
    sub = "dotted: J* (band: its 95 % interval; at the axis floor where J* ≈ 0); bars: J ± 1.96 stderr; dashed: σ*"
    if stars:
        sub += " (" + ", ".join(stars) + ")"
    fig.update_layout(title={"text": f"{title}<br><sup>{sub}</sup>"}, template="plotly_white", height=760,
                      legend={"title": {"text": "model"}, "traceorder": "grouped"})  # not reversed for fills
    return finish(fig)


def diagnose_page(diagnoses: Mapping[str, object], *, title: str, about: Mapping[str, str] | None = None) -> str:
    """A page of several diagnoses: the figure of all of them and a table of their totals."""
    import html

    from lossfloor.pages.html import Section, page_html

    e = html.escape
    head = ("<tr><th>model</th><th>kind</th><th>predicts / process</th><th>data</th><th>samples, seed</th>"
            "<th>reference total: J, J*, gap, rel gap</th><th>own total: J, J*, gap, rel gap</th></tr>")
    rows = []
    for label, d in diagnoses.items():
        r = d.rows()[0]
        cells = [label, d.meta("model_kind") or "", f"{r['prediction']} / {r['process']}", r["dataset_fingerprint"][:12],
                 f"{r['n_samples']}, {r['seed']}"]
        for key in ("reference", "own"):
            t = d.totals.get(key)
            cells.append("unknown" if t is None else ", ".join(_num(t[k]) for k in ("loss", "j_star", "gap", "rel_gap")))
        rows.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    data = {d.rows()[0]["dataset_fingerprint"] for d in diagnoses.values()}
    note = ("" if len(data) == 1 else
            '<p class="note">These models were diagnosed on different data (fingerprints differ): their J* differ.</p>')
    table = f'<div class="table-wrap"><table class="fits">{head}{"".join(rows)}</table></div>{note}'
    intro = ("Every model's loss J(σ) and the optimal loss J*(σ) of its data in x0 units; the same seed means "
             "the same samples and noise (common random numbers). Totals: the fixed reference weighting "
             "(min(1/J*, w_max), uniform in ln σ) ranks models with different schedules.")
    return page_html(title, [Section("Loss gap per σ", [diagnose_figure(diagnoses, title=title)], intro=intro),
                             Section("Totals", [table])], about=about)


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}"


__all__ = ["diagnose_figure", "diagnose_page"]
