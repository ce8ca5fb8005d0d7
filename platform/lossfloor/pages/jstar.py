"""The J*(σ) figure: one panel per target, each J* with its 95 % interval as error bars and σ* dashed.

    fig = jstar_figure({"digits": {"x0": table_x0, "eps": table_eps}})   # one panel per target
    lossfloor.pages.html.write_html(fig, "jstar.html")                   # plotly.js embedded, no CDN
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from lossfloor.floor import JStarTable

TARGET_TITLES = {
    "x0": "x0 target",
    "eps": "ε target (J*/σ²)",
    "score": "score target (J*/σ⁴)",
    "vp-v": "VP v-prediction ((1+σ²)/σ² · J*)",
    "fm-velocity": "flow-matching velocity ((1+σ)²/σ² · J*)",
}


ZERO_LABEL = "J* = 0 (below resolution)"


def data_label(name: str, fingerprint: str) -> str:
    """How a legend names a data set: its name as given (bundled:digits -> digits, a path -> its last
    part), else the first 12 characters of its fingerprint."""
    if name:
        text = name.split(":", 1)[1] if name.startswith("bundled:") else name.rstrip("/\\").replace("\\", "/")
        return text.rsplit("/", 1)[-1] or name
    return fingerprint[:12] or "data"


def zero_markers(sigma, j, floor: float, color: str, show_legend: bool, **where) -> go.Scatter | None:
    """J* = 0 points (σ far below σ*, exactly zero in floating point) drawn at `floor` on a log axis as
    open down-triangles, so they are marked rather than silently missing; None when there are none."""
    zero = np.asarray(j) <= 0
    if not zero.any():
        return None
    return go.Scatter(
        x=np.asarray(sigma)[zero], y=np.full(int(zero.sum()), floor), mode="markers", name=ZERO_LABEL,
        legendgroup="zero", showlegend=show_legend, marker={"symbol": "triangle-down-open", "size": 9, "color": color},
        hovertemplate="σ=%{x:.4g}<br>J* = 0 (below resolution; drawn at the axis floor)<extra></extra>", **where,
    )


def _trace(table: JStarTable, label: str, color: str, show_legend: bool) -> go.Scatter:
    """J* in the table's target units with its 95 % interval (bias allowance included) as error bars."""
    sigma, j = table.column("sigma"), table.column("j_star")
    names = table.table.column_names
    if "ci_low" in names and "ci_high" in names:
        below, above = j - table.column("ci_low"), table.column("ci_high") - j
    else:
        below = above = 1.96 * table.column("stderr")
    keep = j > 0  # a log axis cannot show J* = 0 (σ far below σ*)
    error = {"type": "data", "symmetric": False, "array": above[keep], "arrayminus": below[keep], "visible": True}
    return go.Scatter(
        x=sigma[keep], y=j[keep], error_y=error,
        mode="lines+markers", name=label, legendgroup=label, showlegend=show_legend,
        line={"color": color}, marker={"size": 5},
        hovertemplate="σ=%{x:.4g}<br>J*=%{y:.4g}<extra>" + label + "</extra>",
    )


def jstar_figure(
    tables: Mapping[str, Mapping[str, JStarTable]], *, targets: Sequence[str] | None = None, title: str = "J*(σ)"
) -> go.Figure:
    """J*(σ) on log-log axes with 95 % interval bars and σ* (dashed line), one panel per target.

    tables: data-set label -> target -> J* table (e.g. {"digits": {"x0": t0, "eps": t1}}).
    targets: the panels, in order (default: the targets of the first data set).
    """
    if not tables:
        raise ValueError("tables: expected at least one data set, e.g. {'digits': {'x0': table}}")
    targets = list(targets or next(iter(tables.values())))
    cols = 1 if len(targets) == 1 else 2
    rows = math.ceil(len(targets) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[TARGET_TITLES.get(t, t) for t in targets],
                        horizontal_spacing=0.09, vertical_spacing=0.12)
    palette = qualitative.Plotly
    zero_shown = False
    for i, (label, by_target) in enumerate(tables.items()):
        color = palette[i % len(palette)]
        for p, target in enumerate(targets):
            if target not in by_target:
                continue
            row, col = p // cols + 1, p % cols + 1
            table = by_target[target]
            fig.add_trace(_trace(table, label, color, show_legend=p == 0), row=row, col=col)
            j = table.column("j_star")
            floor = 0.3 * float(j[j > 0].min()) if (j > 0).any() else 1e-12
            marks = zero_markers(table.column("sigma"), j, floor, color, show_legend=not zero_shown)
            if marks is not None:
                fig.add_trace(marks, row=row, col=col)
                zero_shown = True
            s_star = table.sigma_star
            if s_star is not None:
                # a shape's x is a data value even on a log axis (plotly.py issue 4012)
                fig.add_vline(x=s_star, line={"dash": "dash", "color": color, "width": 1}, row=row, col=col)
    for p in range(len(targets)):
        row, col = p // cols + 1, p % cols + 1
        fig.update_xaxes(type="log", title_text="σ", exponentformat="power", row=row, col=col)
        fig.update_yaxes(type="log", title_text="J*(σ)", exponentformat="power", row=row, col=col)
    first = next(iter(next(iter(tables.values())).values()))
    threshold = json.loads((first.table.schema.metadata or {}).get(b"sigma_star_threshold", b"null"))
    level = "a threshold" if threshold is None else f"{threshold:g}"
    stars = ", ".join(
        f"{label}: σ*={_fmt(next(iter(by_target.values())).sigma_star)}" for label, by_target in tables.items()
    )
    fig.update_layout(
        title={"text": f"{title}<br><sup>dashed: σ* (largest σ with J* ≤ {level}·J*(∞)); {stars}</sup>"},
        template="plotly_white", height=420 * rows + 80, legend={"title": {"text": "data set"}},
    )
    return fig


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3g}"


__all__ = ["TARGET_TITLES", "ZERO_LABEL", "data_label", "jstar_figure", "zero_markers"]
