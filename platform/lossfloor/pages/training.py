"""A training run's figure: the evaluation loss per σ against images (J* dotted) and the training loss."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from lossfloor.pages.layout import finish

J_STAR_LABEL = "J* (dotted, one per σ)"


def loss_curve_figure(curve_rows: list[dict], log_rows: list[dict], *, title: str = ""):
    """Eval loss per σ (with J* dotted) and the training loss, against images seen; log y axes. One legend
    entry per σ and one for all the J* lines (it shows or hides them together)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("eval loss J(σ) per σ (dotted: J*)", "training loss"))
    sigmas = sorted({r["sigma"] for r in curve_rows if r["sigma"] is not None})
    colors = sample_colorscale("Viridis", [i / max(len(sigmas) - 1, 1) for i in range(len(sigmas))])
    j_star_shown = False
    for s, color in zip(sigmas, colors):
        rows = sorted((r for r in curve_rows if r["sigma"] == s), key=lambda r: r["images"])
        x = [r["images"] for r in rows]
        fig.add_trace(go.Scatter(x=x, y=[r["loss"] for r in rows], mode="lines+markers", name=f"σ={s:.3g}",
                                 legendgroup=f"{s}", line={"color": color}), row=1, col=1)
        js = [r["j_star"] for r in rows]
        if all(j is not None and j > 0 for j in js):
            fig.add_trace(go.Scatter(x=x, y=js, mode="lines", name=J_STAR_LABEL, legendgroup="J*", legendrank=1001,
                                     showlegend=not j_star_shown, line={"color": color, "dash": "dot"},
                                     hovertemplate=f"σ={s:.3g}<br>J*=%{{y:.4g}}<extra></extra>"), row=1, col=1)
            j_star_shown = True
    fig.add_trace(go.Scatter(x=[r["images"] for r in log_rows], y=[r["loss"] for r in log_rows], mode="lines",
                             name="training loss", line={"color": "#444"}), row=1, col=2)
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="images")
    fig.update_layout(title={"text": title}, template="plotly_white", height=480)
    return finish(fig)


__all__ = ["J_STAR_LABEL", "loss_curve_figure"]
