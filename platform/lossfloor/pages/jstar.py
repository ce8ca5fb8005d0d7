"""The J*(σ) figure: one panel per target, each J* with its 95 % interval as error bars and σ* dashed.
Each panel's y axis spans what the estimate resolves (`resolution_floor`); a J* below it (≈ 0, e.g. 1e-49 at
tiny σ) is marked on the axis floor, and an interval reaching below it (ci_low = 0) is cut there.

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
from lossfloor.pages.layout import finish

TARGET_TITLES = {
    "x0": "x0 target",
    "eps": "ε target (J*/σ²)",
    "score": "score target (J*/σ⁴)",
    "vp-v": "VP v-prediction ((1+σ²)/σ² · J*)",
    "fm-velocity": "flow-matching velocity ((1+σ)²/σ² · J*)",
}


ZERO_LABEL = "J* ≈ 0 (below resolution)"
RESOLVED_DECADES = 7  # a loss in float32 (relative precision ~1e-7) resolves no J* further below the largest


def resolution_floor(tables: Sequence[JStarTable]) -> float | None:
    """The lowest J* a panel shows (its y axis starts there): half the smallest J* whose 95 % interval
    excludes 0 (ci_low > 0: told apart from 0), but no more than RESOLVED_DECADES below the panel's largest
    J*. Below it a J* is ≈ 0: positive in floating point (e.g. 1e-49 at tiny σ), but not resolved. None
    when no J* of `tables` is positive."""
    j = np.concatenate([t.column("j_star") for t in tables])
    low = np.concatenate([_interval(t)[0] for t in tables])
    if not (j > 0).any():
        return None
    floor = float(j.max()) * 10.0**-RESOLVED_DECADES
    resolved = j[low > 0]
    return max(0.5 * float(resolved.min()), floor) if len(resolved) else floor


def data_label(name: str, fingerprint: str) -> str:
    """How a legend names a data set: its name as given (bundled:digits -> digits, a path -> its last
    part), else the first 12 characters of its fingerprint."""
    if name:
        text = name.split(":", 1)[1] if name.startswith("bundled:") else name.rstrip("/\\").replace("\\", "/")
        return text.rsplit("/", 1)[-1] or name
    return fingerprint[:12] or "data"


def zero_markers(sigma, j, floor: float, color: str, show_legend: bool, **where) -> go.Scatter | None:
    """J* below `floor` (≈ 0: see `resolution_floor`; exactly 0 far below σ*) drawn at `floor` as open
    down-triangles, so they are marked rather than silently missing; None when there are none."""
    zero = np.asarray(j) < floor
    if not zero.any():
        return None
    return go.Scatter(
        x=np.asarray(sigma)[zero], y=np.full(int(zero.sum()), floor), mode="markers", name=ZERO_LABEL,
        legendgroup="zero", showlegend=show_legend, marker={"symbol": "triangle-down-open", "size": 9, "color": color},
        customdata=np.asarray(j)[zero],
        hovertemplate="σ=%{x:.4g}<br>J* = %{customdata:.3g} ≈ 0 (below resolution; drawn at the axis floor)"
                      "<extra></extra>", **where,
    )


def _interval(table: JStarTable) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of J*'s 95 % interval (bias allowance included), in the table's target units."""
    j = table.column("j_star")
    if "ci_low" in table.table.column_names and "ci_high" in table.table.column_names:
        return table.column("ci_low"), table.column("ci_high")
    return j - 1.96 * table.column("stderr"), j + 1.96 * table.column("stderr")


def _trace(table: JStarTable, label: str, color: str, show_legend: bool, floor: float) -> go.Scatter:
    """J* at or above `floor` with its 95 % interval as error bars, cut at `floor` (a log axis has no 0)."""
    sigma, j = table.column("sigma"), table.column("j_star")
    low, high = _interval(table)
    keep = j >= floor
    error = {"type": "data", "symmetric": False, "array": (high - j)[keep],
             "arrayminus": (j - np.maximum(low, floor))[keep], "visible": True}
    return go.Scatter(
        x=sigma[keep], y=j[keep], error_y=error,
        mode="lines+markers", name=label, legendgroup=label, showlegend=show_legend,
        line={"color": color}, marker={"size": 5},
        customdata=np.stack([low, high], axis=-1)[keep],
        hovertemplate="σ=%{x:.4g}<br>J*=%{y:.4g} [%{customdata[0]:.3g}, %{customdata[1]:.3g}]<extra>"
                      + label + "</extra>",
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
    zero_shown, shown = False, set()
    for p, target in enumerate(targets):
        row, col = p // cols + 1, p % cols + 1
        panel = {label: by_target[target] for label, by_target in tables.items() if target in by_target}
        floor = resolution_floor(list(panel.values())) if panel else None
        at = 1e-12 if floor is None else floor  # no J* > 0 in the panel: its markers at an arbitrary height
        for i, (label, table) in enumerate(tables.items()):
            if label not in panel:
                continue
            color = palette[i % len(palette)]
            table = panel[label]
            fig.add_trace(_trace(table, label, color, show_legend=label not in shown, floor=at),
                          row=row, col=col)
            shown.add(label)
            marks = zero_markers(table.column("sigma"), table.column("j_star"), at, color, show_legend=not zero_shown)
            if marks is not None:
                fig.add_trace(marks, row=row, col=col)
                zero_shown = True
            s_star = table.sigma_star
            if s_star is not None:
                # a shape's x is a data value even on a log axis (plotly.py issue 4012)
                fig.add_vline(x=s_star, line={"dash": "dash", "color": color, "width": 1}, row=row, col=col)
        fig.update_xaxes(type="log", title_text="σ", row=row, col=col)
        fig.update_yaxes(type="log", title_text="J*(σ)", row=row, col=col)
        if floor is not None:  # the resolvable range, the ≈ 0 markers half-shown on its floor
            top = max(float(np.max(np.maximum(_interval(t)[1], t.column("j_star")))) for t in panel.values())
            fig.update_yaxes(range=[math.log10(floor) - 0.1, math.log10(top) + 0.1], row=row, col=col)
    first = next(iter(next(iter(tables.values())).values()))
    threshold = json.loads((first.table.schema.metadata or {}).get(b"sigma_star_threshold", b"null"))
    level = "a threshold" if threshold is None else f"{threshold:g}"
    stars = ", ".join(
        f"{label}: σ*={_fmt(next(iter(by_target.values())).sigma_star)}" for label, by_target in tables.items()
    )
    zeros = "; ▽ on the axis floor: J* ≈ 0, below what the estimate resolves" if zero_shown else ""
    fig.update_layout(
        title={"text": f"{title}<br><sup>dashed: σ* (largest σ with J* ≤ {level}·J*(∞)); {stars}{zeros}</sup>"},
        template="plotly_white", height=420 * rows + 80, legend={"title": {"text": "data set"}},
    )
    return finish(fig)


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3g}"


__all__ = ["RESOLVED_DECADES", "TARGET_TITLES", "ZERO_LABEL", "data_label", "jstar_figure", "resolution_floor",
           "zero_markers"]
