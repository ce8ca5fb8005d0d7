"""What every figure of lossfloor shares: one number format on every axis, and a legend that shows every entry.

    fig.update_layout(...)                 # a page's own title, template, height
    finish(fig)                            # last: axes numbered alike, height grown to fit the legend

Axes: every x and y axis writes its numbers as powers of ten (10⁻¹⁸, never SI prefixes such as µ or m
beside them; plotly's default mixes the two on log axes).

Legend: plotly draws it right of the plot, as tall as the plot area at most (gs.h = height − margin.t −
margin.b), and scrolls the rest out of sight, cut off in a screenshot. `finish` grows the figure's height
until the plot area holds every entry (LEGEND_ROW_PX each, a group gap included) and the legend's title.
"""

from __future__ import annotations

import plotly.graph_objects as go

EXPONENT_FORMAT = "power"
LEGEND_ROW_PX = 30  # one legend entry (~20 px at plotly's 12 px font) plus its group gap (tracegroupgap 10 px)
DEFAULT_MARGIN = {"t": 100, "b": 80}  # plotly's own, when a figure sets none
DEFAULT_HEIGHT = 480  # px, of a figure that sets none (on a page: lossfloor.pages.html)


def legend_entries(fig: go.Figure) -> int:
    """How many entries the legend lists: the traces that can have one and do not set showlegend=False."""
    return sum(1 for t in fig.data if "showlegend" in t and t.showlegend is not False)


def legend_height(fig: go.Figure) -> int:
    """The height (px) the legend needs: its entries and, if it has one, its title."""
    title = 1 if fig.layout.legend.title.text else 0
    return LEGEND_ROW_PX * (legend_entries(fig) + title)


def finish(fig: go.Figure) -> go.Figure:
    """Every axis in EXPONENT_FORMAT; the height grown (never shrunk) so the plot area holds the whole
    legend (module docstring). Call it once every trace and the layout's height and margins are set."""
    fig.update_xaxes(exponentformat=EXPONENT_FORMAT)
    fig.update_yaxes(exponentformat=EXPONENT_FORMAT)
    margin = fig.layout.margin
    top = DEFAULT_MARGIN["t"] if margin.t is None else margin.t
    bottom = DEFAULT_MARGIN["b"] if margin.b is None else margin.b
    height = fig.layout.height or DEFAULT_HEIGHT
    fig.update_layout(height=max(height, top + bottom + legend_height(fig)))
    return fig


__all__ = ["DEFAULT_HEIGHT", "EXPONENT_FORMAT", "LEGEND_ROW_PX", "finish", "legend_entries", "legend_height"]
