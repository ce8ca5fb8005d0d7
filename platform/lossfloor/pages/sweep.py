"""Plotly figures of a schedule sweep (lossfloor.train.sweep): which configurations won, and how each
trial's objective moved with training images (where ASHA stopped the weak ones).

    write_html(parallel_coordinates_figure(rows, space, objective="gap"), "parallel_coordinates.html")
    write_html(objective_curves_figure(rows, histories, objective="gap", budget=8192), "objective_vs_images.html")

rows: results.parquet rows (trial_id, is_baseline, the space's fields, objective, n_img, stopped_early, ...);
histories: trial id -> [(n_img, objective)]. Pages are written by `lossfloor.pages.html.write_html` (plotly.js
embedded: they open offline).
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.colors import qualitative

from lossfloor.pages.layout import finish

OBJECTIVE_TITLES = {"gap": "weighted gap (fixed reference weighting)", "fd": "Fréchet distance of samples"}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _dimension(rows: list[dict], key: str, param) -> dict | None:
    """One parallel-coordinates axis: log10 for log-uniform fields, category codes for non-numeric choices."""
    values = [r.get(key) for r in rows]
    if param.kind == "fixed":
        return None
    if all(_finite(v) for v in values):
        if param.kind == "loguniform":
            return {"label": f"log10 {key}", "values": [math.log10(v) for v in values]}
        return {"label": key, "values": values}
    labels = sorted({repr(v) for v in values})
    return {"label": key, "values": [labels.index(repr(v)) for v in values],
            "tickvals": list(range(len(labels))), "ticktext": labels}


def parallel_coordinates_figure(rows: list[dict], space, *, objective: str) -> go.Figure:
    """One line per optimal-loss trial with an objective, across the swept fields and the objective
    (colour = objective, darker = lower = better); the baseline's objective is in the title."""
    trials = [r for r in rows if not r["is_baseline"] and _finite(r.get("objective"))]
    baseline = next((r for r in rows if r["is_baseline"]), None)
    dims = [d for key, p in space.params.items() if (d := _dimension(trials, key, p)) is not None]
    dims.append({"label": objective, "values": [r["objective"] for r in trials]})
    fig = go.Figure(go.Parcoords(
        line={"color": [r["objective"] for r in trials], "colorscale": "Viridis", "showscale": True,
              "colorbar": {"title": {"text": objective}}},
        dimensions=dims,
    ))
    base = "-" if baseline is None or not _finite(baseline.get("objective")) else f"{baseline['objective']:.5g}"
    fig.update_layout(
        title=f"Optimal-loss schedule sweep: {OBJECTIVE_TITLES.get(objective, objective)} (lower is better); "
              f"EDM2 baseline {base}; {len(trials)} trials (ASHA-stopped ones at fewer images)",
        margin={"l": 80, "r": 80, "t": 90, "b": 40}, template="plotly_white",
    )
    return fig


def objective_curves_figure(rows: list[dict], histories: dict, *, objective: str, budget: int) -> go.Figure:
    """The objective against training images, one line per trial; the baseline black and dashed,
    trials stopped early end with a cross."""
    fig = go.Figure()
    colors = qualitative.Plotly
    for i, r in enumerate(rows):
        points = histories.get(r["trial_id"], [])
        if not points:
            continue
        x, y = [p[0] for p in points], [p[1] for p in points]
        baseline = r["is_baseline"]
        name = f"baseline (EDM2) {r['trial_id']}" if baseline else r["trial_id"]
        fig.add_trace(go.Scatter(
            x=x, y=y, name=name, mode="lines+markers",
            line={"color": "black" if baseline else colors[i % len(colors)], "dash": "dash" if baseline else "solid"},
            marker={"symbol": ["circle"] * (len(x) - 1) + ["x" if r.get("stopped_early") else "circle"],
                    "size": [5] * (len(x) - 1) + [10 if r.get("stopped_early") else 5]},
            hovertemplate=f"{name}<br>%{{x}} images<br>{objective} %{{y:.5g}}<extra></extra>",
        ))
    fig.add_vline(x=budget, line={"color": "grey", "dash": "dot"})
    fig.update_layout(
        title=f"{OBJECTIVE_TITLES.get(objective, objective)} at each evaluation (x: stopped early by ASHA)",
        xaxis_title="training images", yaxis_title=objective, template="plotly_white",
        legend={"title": {"text": "trial"}},
    )
    return finish(fig)


__all__ = ["objective_curves_figure", "parallel_coordinates_figure"]
