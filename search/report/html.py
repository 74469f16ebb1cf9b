"""report.html: one self-contained file that works offline.

plotly.js is embedded once in a <script> block (no CDN, no network); each figure is a div
drawn by that copy. Many users read reports on machines without internet.
"""
from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

import numpy as np

from search.report.text import (baseline_line, finetune_line, fmt, quality_note, table_header, table_rows,
                                within_command)
from search.report.view import StudyView, counts, counts_line, heat_data, rank_data, scatter_axes, sensitivity_frame

if TYPE_CHECKING:  # plotly is imported where a figure is drawn: `import search.api` does not pay for it
    import plotly.graph_objects as go

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td.plan,td.cmd{text-align:left;font-family:monospace}th.plan,th.cmd{text-align:left}td.plan{min-width:16em}
td span{white-space:nowrap}td.cmd{min-width:30em}td.cmd code{user-select:all}.wide{overflow-x:auto}th{background:#f3f3f3}tr.ref td{background:#f6fbf6;color:#2a6a2a}.note{color:#666}"""
PARETO_COLOURS = {"infeasible": "#999999", "feasible": "#1f77b4", "Pareto front": "#d62728"}  # marker colours
BASELINE = "#2ca02c"  # the dense baseline's star, on every scatter
BUDGET = "#ff7f0e"  # budget lines and notes


def _hover(rows) -> list[str]:
    return [f"trial {r.trial}<br>quality {fmt(r.quality)} (test {fmt(r.test_quality)})<br>latency {fmt(r.latency_ms)} ms<br>"
            f"memory {fmt(r.memory_kb)} KB<br>size {fmt(r.size_kb)} KB<br>{html.escape(r.summary).replace(' | ', '<br>')}"
            + (f"<br><i>{html.escape(r.reason)}</i>" if r.reason else "") for r in rows.itertuples()]


def pareto_figure(view: StudyView) -> go.Figure:
    """Quality against each cost objective: infeasible, feasible and front points, the dense
    baseline as a star, with hover details. Axes fit the points (search.report.view.scatter_axes);
    a budget far outside them is named above its panel instead of drawn."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    axes = scatter_axes(view)
    fig = make_subplots(rows=1, cols=len(axes), shared_yaxes=True, subplot_titles=[a.note for a in axes])
    fig.update_annotations(font=dict(size=12, color=BUDGET))  # the subplot titles are the budget notes
    t = view.trials
    groups = (("infeasible", t[t["trained"] & ~t["feasible"]], dict(symbol="x", size=7)),
              ("feasible", t[t["feasible"] & ~t["pareto"]], dict(size=7, opacity=0.7)),
              ("Pareto front", view.front, dict(size=11)))
    d = view.dense
    for j, a in enumerate(axes, start=1):
        for name, rows, marker in groups:
            rows = rows.sort_values(a.cost)
            fig.add_trace(go.Scatter(x=rows[a.cost], y=rows["quality"], mode="markers", name=name,
                                     marker=dict(color=PARETO_COLOURS[name], **marker),
                                     legendgroup=name, showlegend=j == 1, text=_hover(rows),
                                     hovertemplate="%{text}<extra></extra>"), row=1, col=j)
        if "quality" in d and a.cost in d:
            fig.add_trace(go.Scatter(x=[d[a.cost]], y=[d["quality"]], mode="markers", name="dense baseline",
                                     marker=dict(color=BASELINE, symbol="star", size=16, line=dict(color="#145214", width=1)),
                                     legendgroup="dense", showlegend=j == 1,
                                     hovertemplate=f"dense baseline<br>{html.escape(baseline_line(view))}<extra></extra>"),
                          row=1, col=j)
        if a.budget_on_axis:
            fig.add_vline(x=a.budget, line_dash="dash", line_color=BUDGET, row=1, col=j,
                          annotation_text=f"budget {a.budget:g}", annotation_font_color=BUDGET)
        rng = [math.log10(a.lo), math.log10(a.hi)] if a.log else [a.lo, a.hi]
        fig.update_xaxes(title_text=a.label, type="log" if a.log else "linear", range=rng, row=1, col=j)
    fig.update_yaxes(title_text=str(view.baseline.get("metric_name") or "quality"), row=1, col=1)
    fig.update_layout(title="Pareto front (hover for the per-layer plan)", height=450)
    return fig


def heatmap_figure(view: StudyView) -> go.Figure:
    """Weight bits and prune ratio per layer across the front, best quality first."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    bits, ratio = heat_data(view)
    ranks = rank_data(view)
    titles = ("weight bits", "prune ratio") + (() if ranks is None else ("rank ratio (s spatial, k Kronecker)",))
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.12)
    fig.add_trace(go.Heatmap(z=np.log2(bits.values.astype(float)), x=list(bits.columns), y=list(bits.index),
                             colorscale="Viridis", zmin=0, zmax=5, text=bits.values, texttemplate="%{text}",
                             hovertemplate="%{y} %{x}: %{text} bits<extra></extra>",
                             colorbar=dict(x=0.44 if ranks is None else 0.27, tickvals=list(range(6)), ticktext=[str(2**k) for k in range(6)])), 1, 1)
    fig.add_trace(go.Heatmap(z=ratio.values, x=list(ratio.columns), y=list(ratio.index), colorscale="Magma",
                             reversescale=True, zmin=0, zmax=1, texttemplate="%{z:.2f}",
                             colorbar=dict(x=1.02 if ranks is None else 0.64)), 1, 2)
    if ranks is not None:  # a factorizing study; blank where a layer is not factorized
        fig.add_trace(go.Heatmap(z=ranks[0].values, x=list(ranks[0].columns), y=list(ranks[0].index), colorscale="Cividis",
                                 zmin=0, zmax=1, text=ranks[1].values, texttemplate="%{text}",
                                 hovertemplate="%{y} %{x}: rank ratio %{z:.3g} %{text}<extra></extra>"), 1, 3)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title="Per-layer plan across the front", height=max(300, 40 * len(bits.index) + 150))
    return fig


def hypervolume_figure(view: StudyView) -> go.Figure:
    """Hypervolume after each trial, from 0 (as pareto.png's), so a tiny gain looks tiny."""
    import plotly.graph_objects as go

    t = view.trials
    fig = go.Figure(go.Scatter(x=t["trial"], y=t["hypervolume"], mode="lines+markers", line_shape="hv",
                               marker=dict(size=4), name="hypervolume"))
    fig.update_layout(title="Hypervolume of the feasible front over trials (normalised to [ideal, reference])",
                      xaxis_title="trial", yaxis_title="hypervolume", height=350)
    fig.update_yaxes(range=[0, max(1e-3, float(t["hypervolume"].max()) * 1.08)])
    fig.update_xaxes(tick0=0, dtick=max(1, math.ceil((int(t["trial"].max()) + 1) / 10)))  # whole trial numbers
    return fig


def sensitivity_figure(view: StudyView) -> go.Figure | None:
    import plotly.graph_objects as go

    s = sensitivity_frame(view.sensitivity)
    if s.empty:
        return None
    fig = go.Figure([go.Bar(x=g["layer"], y=[v if math.isfinite(v) else None for v in g["loss"]], name=p,
                            text=[fmt(v, 3) for v in g["loss"]], textposition="outside", cliponaxis=False)
                     for p, g in s.groupby("probe", sort=False)])
    fig.update_layout(title="Layer sensitivity: quality lost with one layer compressed alone (no fine-tuning)",
                      barmode="group", yaxis_title="quality lost", height=380)
    return fig


def _table(view: StudyView) -> str:
    """The front as an HTML table: the dense baseline first, then a row per front trial with
    its export command (a click selects the whole command)."""
    if view.front.empty:
        return "<p>No feasible trial on this profile.</p>"
    head = list(table_header(view))
    cls = [""] * (len(head) - 2) + [' class="plan"', ' class="cmd"']
    out = ['<div class="wide"><table><tr>' + "".join(f"<th{c}>{html.escape(h)}</th>" for c, h in zip(cls, head)) + "</tr>"]
    for row in table_rows(view):
        cells = [html.escape(v) for v in row]
        cells[-2] = " | ".join(f"<span>{p}</span>" for p in cells[-2].split(" | "))  # wrap between layers only
        flags = cells[-1].split(" --")  # the command wraps between flags, never inside one
        cells[-1] = "<code>" + " ".join(f"<span>{'--' * (i > 0)}{f}</span>" for i, f in enumerate(flags)) + "</code>" \
            if cells[-1] else ""
        ref = ' class="ref"' if row[0] == "dense" else ""
        out.append(f"<tr{ref}>" + "".join(f"<td{c}>{v}</td>" for c, v in zip(cls, cells)) + "</tr>")
    return "".join(out) + "</table></div>"


def render(view: StudyView) -> str:
    """The whole report page as one HTML string with plotly.js inlined."""
    from plotly.offline import get_plotlyjs

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
<p>{counts_line(c)}.
{f'Fine-tuning: {html.escape(finetune_line(view.spec))}.' if view.spec is not None else ''}</p>
{f'<p>Dense baseline: {html.escape(baseline_line(view))}.</p>' if view.baseline or view.dense else ''}
<h2>Pareto front</h2>{_table(view)}
<p class="note">{html.escape(quality_note(view))}
Export a row with its command: it fine-tunes the plan again for longer than the search did (<code>--finetune-steps N</code> sets how long).
That retrain lifts the most compressed plans most: <code>{html.escape(within_command(view))}</code> retrains the front's most compressed plans and exports the most compressed one within 0.5 points of the baseline's validation quality after it.
Layer codes: p.90u = 90% pruned (u unstructured, c channel, n N:M); w4 = 4-bit weights (k: codebook); a8 = 8-bit activations; r.50 = factorized at rank ratio 0.5 (SVD; r.50s spatial, r.06k Kronecker); fp32 = untouched.</p>
{divs}
</body></html>
"""
