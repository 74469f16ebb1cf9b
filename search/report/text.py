"""The report as text: table cells, report.md, pareto.csv's frame and the terminal table."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from search.report.view import FRONT_COLUMNS, PLAN_KEYS, StudyView, counts, sensitivity_frame


def csv_frame(view: StudyView) -> pd.DataFrame:
    """The front as written to pareto.csv: the table columns, feasibility and per-layer plan."""
    f = view.front
    plan_cols = [f"{n}.{k}" for n in view.layer_names for k in PLAN_KEYS]
    return f[list(FRONT_COLUMNS) + ["feasible"] + plan_cols]


def fmt(v: Any, digits: int = 4) -> str:
    """A table cell: floats to `digits` significant digits, NaN/inf as "-"."""
    if isinstance(v, (float, np.floating)):
        return "-" if not math.isfinite(v) else f"{v:.{digits}g}"
    return str(v)


def markdown(view: StudyView) -> str:
    """report.md: what was searched, the budget, the counts, and the front as a table."""
    c = counts(view)
    budget = ", ".join(f"{k} <= {v:g}" for k, v in view.budget.items() if v is not None) or "none"
    lines = [f"# Study {view.name}: Pareto report", "",
             f"- model: {view.model}",
             f"- profile: {view.profile}" + (" (re-priced from stored costs, no retraining)" if view.repriced else ""),
             f"- budget: {budget}", "- objectives: " + ", ".join(f"{o} ({d})" for o, d in zip(view.objectives, view.directions)),
             f"- trials: {c['trials']} priced, {c['trained']} trained, {c['feasible']} feasible, {c['front']} on the front"]
    if view.baseline:
        lines.append(f"- quality is {view.baseline.get('metric_name', 'the task metric')} on the validation split")
        lines.append("- baseline: " + ", ".join(f"{k} {fmt(v)}" for k, v in view.baseline.items() if not isinstance(v, (dict, list))))
    hv = view.trials["hypervolume"]
    lines += [f"- hypervolume (normalised): {fmt(float(hv.iloc[-1]) if len(hv) else 0.0)}", "", "## Pareto front", ""]
    if view.front.empty:
        lines.append("No feasible trial on this profile.")
    else:
        head = list(FRONT_COLUMNS)
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in view.front.iterrows():
            lines.append("| " + " | ".join(fmt(r[h]).replace("|", "\\|") for h in head) + " |")
    if view.channel_groups:
        lines += ["", "## Channel groups (traced from the graph)", ""] + [f"- {g}" for g in view.channel_groups]
    s = sensitivity_frame(view.sensitivity)
    if not s.empty:
        lines += ["", "## Layer sensitivity (quality lost, one layer at a time)", "",
                  "| layer | " + " | ".join(s["probe"].unique()) + " |", "|---|" + "---|" * s["probe"].nunique()]
        for layer, g in s.groupby("layer", sort=False):
            lines.append(f"| {layer} | " + " | ".join(fmt(v) for v in g["loss"]) + " |")
    lines += ["", "Files: report.html (interactive, offline), pareto.csv, pareto.png, layers.png, hypervolume.png, sensitivity.png", ""]
    return "\n".join(lines)


def front_table(view: StudyView) -> Any:
    """The front as a rich Table for the terminal."""
    from rich.table import Table

    c = counts(view)
    title = (f"{view.name} on {view.profile}{' (re-priced)' if view.repriced else ''}: "
             f"{c['front']} on the front of {c['feasible']} feasible / {c['trials']} trials")
    table = Table(title=title)
    metric = str(view.baseline.get("metric_name") or "quality")
    for h, j in zip(("trial", metric, "latency ms", "memory KB", "size KB", "x fp32", "layers"), "rrrrrrl"):
        table.add_column(h, justify={"r": "right", "l": "left"}[j], overflow="fold")
    for _, r in view.front.iterrows():
        table.add_row(str(r["trial"]), fmt(r["quality"]), fmt(r["latency_ms"]), fmt(r["memory_kb"]),
                      fmt(r["size_kb"]), fmt(r["compression_ratio"], 3), r["summary"])
    return table


