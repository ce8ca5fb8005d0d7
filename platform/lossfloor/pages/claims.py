"""The paper-claims page (`studies/paper_claims.py`): one figure per claim and the table of verdicts.

    page = claims_page(parts, title="The paper's claims, side by side")

parts: {part name: {"result": the part's result, "claims": [claim dicts]}} as the study writes them
(`lossfloor.claims`); a part missing from `parts` is left out. Every number drawn is read from the
results, so the page and the table (docs/paper-claims.md) show the same numbers.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import plotly.graph_objects as go

from lossfloor.pages.html import Section, page_html
from lossfloor.pages.layout import finish

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _error_bars(iv: Mapping) -> dict:
    return {"type": "data", "symmetric": False, "array": [iv["hi"] - iv["mean"]],
            "arrayminus": [iv["mean"] - iv["lo"]]}


def estimator_figure(result: Mapping, claim: Mapping) -> go.Figure:
    """Left: each setting's score (mean |relative error| over σ, vs exact on the same queries) with its 95 %
    interval over seeds; right: the RMS relative error per σ of each setting."""
    from plotly.subplots import make_subplots

    from lossfloor.claims.estimators import per_sigma

    fig = make_subplots(rows=1, cols=2, subplot_titles=("error vs C (mean over σ, 95 % interval over seeds)",
                                                        "RMS relative error per σ"))
    for i, label in enumerate(result["labels"]):
        color = COLORS[i % len(COLORS)]
        iv = claim["score"][label]
        fig.add_trace(go.Scatter(x=[label], y=[iv["mean"]], mode="markers", marker={"color": color, "size": 10},
                                 error_y=_error_bars(iv), name=label, legendgroup=label), row=1, col=1)
        ps = per_sigma(result, label)
        fig.add_trace(go.Scatter(x=ps["sigma"], y=ps["rms"], mode="lines+markers", line={"color": color},
                                 name=label, legendgroup=label, showlegend=False), row=1, col=2)
    fig.update_yaxes(type="log", title_text="|Ĵ − J_exact| / J_exact")
    fig.update_xaxes(type="log", title_text="σ", row=1, col=2)
    fig.update_layout(title=f"cDOL's error against C and knn's (N = {result['n']}, L = {result['subset_size']}, "
                            f"{len(result['seeds'])} seeds)", height=460)
    return finish(fig)


def queries_figure(result: Mapping, claim: Mapping) -> go.Figure:
    """Each setting's score against the number of queries M, with its 95 % interval over seeds."""
    fig = go.Figure()
    for i, (label, ivs) in enumerate(claim["score"].items()):
        fig.add_trace(go.Scatter(
            x=claim["queries"], y=[iv["mean"] for iv in ivs], mode="lines+markers", name=label,
            line={"color": COLORS[i % len(COLORS)]},
            error_y={"type": "data", "symmetric": False, "array": [iv["hi"] - iv["mean"] for iv in ivs],
                     "arrayminus": [iv["mean"] - iv["lo"] for iv in ivs]}))
    fig.update_xaxes(type="log", title_text="queries M")
    fig.update_yaxes(type="log", title_text="mean |Ĵ − J_exact| / J_exact over σ")
    fig.update_layout(title="The error as queries are added", height=420)
    return finish(fig)


def survey_figure(rows: list[Mapping]) -> go.Figure:
    """J*(σ)/J*(∞) of each data set with its 95 % interval, and σ*'s bracket as a shaded span."""
    fig = go.Figure()
    for i, r in enumerate(rows):
        color, tv = COLORS[i % len(COLORS)], r["plateau"]
        j = [v / tv for v in r["j_star"]]
        err_hi = [(h - v) / tv for v, h in zip(r["j_star"], r["ci_high"])]
        err_lo = [(v - lo) / tv for v, lo in zip(r["j_star"], r["ci_low"])]
        fig.add_trace(go.Scatter(x=r["sigma"], y=j, mode="lines+markers", line={"color": color},
                                 error_y={"type": "data", "symmetric": False, "array": err_hi, "arrayminus": err_lo},
                                 name=f"{r['data']} (N = {r['n']}, D = {r['dim']})"))
        lo, hi = r["sigma_star_low"], r["sigma_star_high"]
        if lo is not None and hi is not None:
            fig.add_vrect(x0=lo, x1=hi, fillcolor=color, opacity=0.12, line_width=0)
    fig.update_xaxes(type="log", title_text="σ")
    fig.update_yaxes(type="log", title_text="J*(σ) / J*(∞)", range=[-4, 0.2])  # below 1e-4: J* ≈ 0 (σ*: 1e-3)
    fig.update_layout(title="J* of each data set relative to its plateau J*(∞); shaded: where σ* can lie", height=460)
    return finish(fig)


def diagnosis_figure(gaps: Mapping[str, Mapping[str, list[float]]]) -> go.Figure:
    """Each model's gap J − J* (x0 units) per σ with its 95 % interval."""
    fig = go.Figure()
    for i, (model, g) in enumerate(gaps.items()):
        fig.add_trace(go.Scatter(x=g["sigma"], y=g["gap"], mode="lines+markers", name=model,
                                 line={"color": COLORS[i % len(COLORS)]},
                                 error_y={"type": "data", "array": [1.959964 * v for v in g["se"]]}))  # 95 %
    fig.update_xaxes(type="log", title_text="σ")
    fig.update_yaxes(type="log", title_text="J − J* (x0 units)")
    fig.update_layout(title="Loss gap per σ of each parametrisation, converted to x0-prediction", height=460)
    return finish(fig)


def schedule_figure(values: Mapping[str, Mapping[str, list[float]]]) -> go.Figure:
    """Each schedule's weighted gap and FD per seed (points) and their mean (bar)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("weighted loss gap (fixed weighting)", "FD to the data"))
    for col, metric in enumerate(("gap", "fd"), start=1):
        for i, (schedule, by) in enumerate(values.items()):
            v = by[metric]
            color = COLORS[i % len(COLORS)]
            fig.add_trace(go.Bar(x=[schedule], y=[sum(v) / len(v)], marker={"color": color, "opacity": 0.4},
                                 name=schedule, legendgroup=schedule, showlegend=col == 1), row=1, col=col)
            fig.add_trace(go.Scatter(x=[schedule] * len(v), y=v, mode="markers", marker={"color": color, "size": 9},
                                     name=f"{schedule}: per seed", legendgroup=schedule, showlegend=False),
                          row=1, col=col)
    fig.update_layout(title="Schedules at equal training images (bars: mean over seeds; points: each seed)",
                      height=440, barmode="overlay")
    return finish(fig)


def scaling_figure(rows: list[Mapping]) -> go.Figure:
    """|ρ| of each form per fitted quantity, with its bootstrap interval over models."""
    fig = go.Figure()
    labels = [r["quantity"] for r in rows]
    for i, form in enumerate(("raw", "corrected", "free_offset")):
        ys, hi, lo = [], [], []
        for r in rows:
            f = r.get(form)
            ys.append(None if f is None else f["abs_rho"])
            iv = None if f is None else f["abs_rho_interval"]
            hi.append(0.0 if iv is None or f is None else iv[1] - f["abs_rho"])
            lo.append(0.0 if iv is None or f is None else f["abs_rho"] - iv[0])
        fig.add_trace(go.Scatter(x=labels, y=ys, mode="markers", marker={"color": COLORS[i], "size": 10}, name=form,
                                 error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo}))
    fig.update_yaxes(title_text="|ρ| of the log-log fit")
    fig.update_layout(title="Raw, gap-corrected and free-offset power laws (95 % bootstrap interval over models)",
                      height=440)
    return finish(fig)


def verdict_table(claims: list[Mapping]) -> str:
    """The claims as an HTML table: claim, what the paper says, what we measured, verdict (the data of each
    claim head its part's section)."""
    e = html.escape
    keys, widths = ("claim", "paper", "measured", "verdict"), (14, 22, 52, 12)
    cols = "".join(f'<col style="width:{w}%">' for w in widths)
    head = "".join(f"<th>{h}</th>" for h in ("claim", "the paper says", "we measured", "verdict"))
    body = "".join("<tr>" + "".join(f"<td>{e(str(c.get(k, '')))}</td>" for k in keys) + "</tr>" for c in claims)
    return (f'<div class="table-wrap"><table class="claims">{cols}<tr>{head}</tr>{body}'
            "</table></div>")


def claims_page(parts: Mapping[str, Mapping], *, title: str, about: Mapping[str, str] | None = None) -> str:
    """The page: the verdict table first, then a section per part that ran."""
    claims = [c for part in parts.values() for c in part["claims"]]
    sections = [Section("Verdicts", [verdict_table(claims)])]
    if "estimators" in parts:
        res = parts["estimators"]["result"]
        by = {c["id"]: c for c in parts["estimators"]["claims"]}
        blocks = [estimator_figure(res["c_sweep"], by["cdol-c"]["detail"])]
        if "queries-convergence" in by and len(by["queries-convergence"]["detail"]["queries"]) > 1:
            blocks.append(queries_figure(res["queries_sweep"], by["queries-convergence"]["detail"]))
        sections.append(Section("Estimators", blocks, intro=parts["estimators"]["claims"][0]["data"]))
    if "survey" in parts:
        sections.append(Section("Survey", [survey_figure(parts["survey"]["result"]["rows"])],
                                intro=parts["survey"]["claims"][0]["data"]))
    if "diagnosis" in parts:
        sections.append(Section("Diagnosis", [diagnosis_figure(parts["diagnosis"]["result"]["gaps"])],
                                intro=parts["diagnosis"]["claims"][0]["data"]))
    if "schedule" in parts:
        sections.append(Section("Schedule", [schedule_figure(parts["schedule"]["result"]["values"])],
                                intro=parts["schedule"]["claims"][0]["data"]))
    if "scaling" in parts:
        rows = parts["scaling"]["claims"][0]["detail"]["quantities"]
        sections.append(Section("Scaling", [scaling_figure(rows)], intro=parts["scaling"]["claims"][0]["data"]))
    return page_html(title, sections, about=about)


__all__ = ["claims_page", "diagnosis_figure", "estimator_figure", "queries_figure", "scaling_figure", "schedule_figure", "survey_figure",
           "verdict_table"]
