"""report.html: one self-contained file that works offline.

plotly.js is embedded once in a <script> block (no CDN, no network); each figure is a div
drawn by that copy. Many users read reports on machines without internet.
"""
from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from search.report.text import fmt
from search.report.view import FRONT_COLUMNS, StudyView, cost_objectives, counts, heat_data, sensitivity_frame

LABELS = {"latency_ms": "latency (ms)", "memory_kb": "memory (KB)", "size_kb": "size (KB)"}
CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:last-child{text-align:left;font-family:monospace}th{background:#f3f3f3}.note{color:#666}"""


def _hover(rows) -> list[str]:
    return [f"trial {r.trial}<br>quality {fmt(r.quality)}<br>latency {fmt(r.latency_ms)} ms<br>"
            f"memory {fmt(r.memory_kb)} KB<br>size {fmt(r.size_kb)} KB<br>{html.escape(r.summary).replace(' | ', '<br>')}"
            + (f"<br><i>{html.escape(r.reason)}</i>" if r.reason else "") for r in rows.itertuples()]


def pareto_figure(view: StudyView) -> go.Figure:
    """Quality against each cost objective: infeasible, feasible and front points, with hover details."""
    costs = cost_objectives(view)
    fig = make_subplots(rows=1, cols=len(costs), shared_yaxes=True)
    t = view.trials
    groups = (("infeasible", t[t["trained"] & ~t["feasible"]], dict(color="#999", symbol="x", size=7)),
              ("feasible", t[t["feasible"] & ~t["pareto"]], dict(color="#1f77b4", size=7, opacity=0.7)),
              ("Pareto front", view.front, dict(color="#d62728", size=11)))
    for j, c in enumerate(costs, start=1):
        for name, rows, marker in groups:
            rows = rows.sort_values(c)
            fig.add_trace(go.Scatter(x=rows[c], y=rows["quality"], mode="markers", name=name, marker=marker,
                                     legendgroup=name, showlegend=j == 1, text=_hover(rows),
                                     hovertemplate="%{text}<extra></extra>"), row=1, col=j)
        limit = view.budget.get(c)
        if limit is not None:
            fig.add_vline(x=limit, line_dash="dash", line_color="orange", row=1, col=j)
        fig.update_xaxes(title_text=LABELS.get(c, c), row=1, col=j)
    fig.update_yaxes(title_text="quality", row=1, col=1)
    fig.update_layout(title="Pareto front (hover for the per-layer plan)", height=450)
    return fig


def heatmap_figure(view: StudyView) -> go.Figure:
    """Weight bits and prune ratio per layer across the front, best quality first."""
    bits, ratio = heat_data(view)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("weight bits", "prune ratio"), horizontal_spacing=0.12)
    fig.add_trace(go.Heatmap(z=np.log2(bits.values.astype(float)), x=list(bits.columns), y=list(bits.index),
                             colorscale="Viridis", zmin=0, zmax=5, text=bits.values, texttemplate="%{text}",
                             hovertemplate="%{y} %{x}: %{text} bits<extra></extra>",
                             colorbar=dict(x=0.44, tickvals=list(range(6)), ticktext=[str(2**k) for k in range(6)])), 1, 1)
    fig.add_trace(go.Heatmap(z=ratio.values, x=list(ratio.columns), y=list(ratio.index), colorscale="Magma",
                             reversescale=True, zmin=0, zmax=1, texttemplate="%{z:.2f}"), 1, 2)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title="Per-layer plan across the front", height=max(300, 40 * len(bits.index) + 150))
    return fig


def hypervolume_figure(view: StudyView) -> go.Figure:
    t = view.trials
    fig = go.Figure(go.Scatter(x=t["trial"], y=t["hypervolume"], mode="lines", line_shape="hv", name="hypervolume"))
    fig.update_layout(title="Hypervolume of the feasible front over trials (normalised to [ideal, reference])",
                      xaxis_title="trial", yaxis_title="hypervolume", height=350)
    return fig


def sensitivity_figure(view: StudyView) -> go.Figure | None:
    s = sensitivity_frame(view.sensitivity)
    if s.empty:
        return None
    fig = go.Figure([go.Bar(x=g["layer"], y=[v if math.isfinite(v) else None for v in g["loss"]], name=p)
                     for p, g in s.groupby("probe", sort=False)])
    fig.update_layout(title="Layer sensitivity: quality lost with one layer compressed alone (no fine-tuning)",
                      barmode="group", yaxis_title="quality lost", height=380)
    return fig


def _table(view: StudyView) -> str:
    if view.front.empty:
        return "<p>No feasible trial on this profile.</p>"
    head = "".join(f"<th>{h}</th>" for h in FRONT_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r[h]))}</td>" for h in FRONT_COLUMNS) + "</tr>"
                   for _, r in view.front.iterrows())
    return f"<table><tr>{head}</tr>{body}</table>"


def render(view: StudyView) -> str:
    """The whole report page as one HTML string with plotly.js inlined."""
    c = counts(view)
    budget = ", ".join(f"{k} &le; {v:g}" for k, v in view.budget.items() if v is not None) or "none"
    figs = [pareto_figure(view), hypervolume_figure(view)]
    if not view.front.empty:
        figs.insert(1, heatmap_figure(view))
    s = sensitivity_figure(view)
    if s is not None:
        figs.append(s)
    divs = "\n".join(f.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False}) for f in figs)
    title = html.escape(f"{view.name}: Pareto report ({view.profile})")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body><h1>{title}</h1>
<p>model {html.escape(view.model)};
profile <b>{html.escape(view.profile)}</b>{' (re-priced from stored costs, no retraining)' if view.repriced else ''};
budget {budget}; objectives {html.escape(', '.join(f'{o} ({d})' for o, d in zip(view.objectives, view.directions)))}.</p>
<p>{c['trials']} trials priced, {c['trained']} trained, {c['feasible']} feasible, {c['front']} on the Pareto front.</p>
<h2>Pareto front</h2>{_table(view)}
<p class="note">Layer codes: p.90u = 90% pruned (u unstructured, c channel, n N:M); w4 = 4-bit weights (k: codebook); a8 = 8-bit activations; fp32 = untouched.</p>
{divs}
</body></html>
"""
