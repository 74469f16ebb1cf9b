"""The report as text: table cells, report.md, pareto.csv's frame and the terminal table."""
from __future__ import annotations

import math
import shlex
from typing import Any

import numpy as np
import pandas as pd

from search.cost.budget import BUDGET_KEYS
from search.report.view import COST_NAMES, FRONT_COLUMNS, PLAN_KEYS, StudyView, counts, counts_line, sensitivity_frame
from search.study.database import redact


def csv_frame(view: StudyView) -> pd.DataFrame:
    """The front as written to pareto.csv: the table columns, feasibility and per-layer plan."""
    f = view.front
    # a layer's rank ratio only when some trial factorizes (search --factorize): other studies'
    # pareto.csv keeps its columns
    ranks = [f"{n}.rank" for n in view.layer_names]
    keys = PLAN_KEYS + (("rank", "form") if ranks[0] in view.trials and (view.trials[ranks].to_numpy() < 1).any() else ())
    plan_cols = [f"{n}.{k}" for n in view.layer_names for k in keys]
    return f[list(FRONT_COLUMNS) + ["feasible"] + plan_cols]


def fmt(v: Any, digits: int = 4) -> str:
    """A table cell: floats to `digits` significant digits, NaN/inf as "-"; whole numbers of
    5 digits or more in full (65536, not 6.554e+04); zero (also -0.0) as "0"."""
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "-"
        if v == 0:
            return "0"
        if 10.0 ** digits <= abs(v) < 1e15:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def export_command(view: StudyView, trial: int) -> str:
    """The `hwcompress export` command line that writes trial `trial` of the study the view was
    read from (shell-quoted; a password in the storage URL shows as ***)."""
    return _export_line(view, ["--trial", str(int(trial)), "--out", f"exports/{view.name}-{int(trial)}"])


def within_command(view: StudyView, points: float = 0.5) -> str:
    """The `hwcompress export --within` command line that exports the most compressed front plan
    within `points` of the baseline after the export's retrain (search.export.select)."""
    return _export_line(view, ["--within", f"{points:g}", "--out", f"exports/{view.name}-within-{points:g}"])


def _export_line(view: StudyView, which: list[str]) -> str:
    args = ["hwcompress", "export", "--study", view.name, *which]
    if view.storage:
        args += ["--storage", redact(view.storage)]
    if view.results_dir != "results":
        args += ["--results-dir", str(view.results_dir)]
    return shlex.join(args)


def table_header(view: StudyView) -> list[str]:
    """The front table's column titles in report.md and report.html."""
    metric = str(view.baseline.get("metric_name") or "quality")
    return ["trial", f"val {metric}", f"test {metric}", "latency (ms)", "memory (KB)", "size (KB)", "x fp32",
            "layers", "export it with"]


def table_rows(view: StudyView) -> list[list[str]]:
    """The front table's cells: the dense baseline first (when known) as the reference, then
    the front, best validation quality first (test quality beside it: shown, not ranked on;
    "-" where not measured), each with its export command."""
    d = view.dense
    rows = [["dense", fmt(d.get("quality", math.nan)), fmt(d.get("test_quality", math.nan)),
             *(fmt(d.get(k, math.nan)) for k in BUDGET_KEYS), "1", "fp32 (the trained model, not compressed)", ""]] if d else []
    for _, r in view.front.iterrows():
        rows.append([str(r["trial"]), fmt(r["quality"]), fmt(r["test_quality"]), fmt(r["latency_ms"]),
                     fmt(r["memory_kb"]), fmt(r["size_kb"]), fmt(r["compression_ratio"], 3), r["summary"],
                     export_command(view, r["trial"])])
    return rows


def quality_note(view: StudyView) -> str:
    """What the two quality columns are: one sentence for report.md and report.html."""
    metric = str(view.baseline.get("metric_name") or "quality")
    return (f"The front is ranked on validation {metric}; test {metric} is measured on the same fine-tuned "
            f"weights and shown beside it, never used to rank (\"-\": not measured for that trial).")


def baseline_line(view: StudyView) -> str:
    """One sentence on the dense baseline, e.g. "accuracy 0.9833 on validation, 0.9778 on test;
    latency 0.01607 ms, memory 199.3 KB, size 197.7 KB on mobile-cpu"."""
    b, d = view.baseline, view.dense
    metric = str(b.get("metric_name") or "quality")
    parts = [f"{fmt(float(b[k]))} on {split}" for k, split in (("val_metric", "validation"), ("test_metric", "test"))
             if isinstance(b.get(k), (int, float))]
    costs = [f"{COST_NAMES[k][0]} {fmt(d[k])} {COST_NAMES[k][1]}" for k in BUDGET_KEYS if k in d]
    head = f"{metric} {', '.join(parts)}" if parts else ""
    return "; ".join(p for p in (head, f"{', '.join(costs)} on {view.profile}" if costs else "") if p)


def finetune_line(spec: Any) -> str:
    """How each candidate was fine-tuned, e.g. "150 steps of 128 examples, one-shot pruning,
    calibrated activation ranges, pruner none"."""
    f = spec.finetune
    parts = [f"{f.steps} steps of {f.batch_size} examples", f"{f.pruning} pruning",
             f"{f.act_ranges} activation ranges"]
    if f.distill:
        parts.append("distilled from the dense model")
    parts.append(f"pruner {spec.pruner.kind if spec.pruner is not None else 'none'}")
    return ", ".join(parts)


def markdown(view: StudyView) -> str:
    """report.md: what was searched, the budget, the counts, and the front as a table."""
    c = counts(view)
    budget = ", ".join(f"{k} <= {v:g}" for k, v in view.budget.items() if v is not None) or "none"
    lines = [f"# Study {view.name}: Pareto report", "",
             f"- model: {view.model}",
             f"- profile: {view.profile}" + (" (re-priced from stored costs, no retraining)" if view.repriced else ""),
             f"- budget: {budget}", "- objectives: " + ", ".join(f"{o} ({d})" for o, d in zip(view.objectives, view.directions)),
             f"- {counts_line(c)}"]
    if view.spec is not None:
        lines.append(f"- fine-tuning: {finetune_line(view.spec)}")
        sp = view.spec.space
        lines.append(f"- space: pruning {', '.join(sp.granularities)}; weight bits {', '.join(map(str, sp.weight_bits))}; "
                     f"activation bits {', '.join(map(str, sp.act_bits))}; "
                     + (f"factorization (--factorize) at rank ratios {', '.join(f'{r:g}' for r in sp.ranks if r < 1)}, "
                        f"forms {', '.join(sp.forms)}" if sp.factorize else "no factorization"))
    if view.baseline:
        lines.append(f"- quality: {quality_note(view)}")
    if view.baseline or view.dense:
        lines.append(f"- dense baseline: {baseline_line(view)}")
    hv = view.trials["hypervolume"]
    lines += [f"- hypervolume (normalised): {fmt(float(hv.iloc[-1]) if len(hv) else 0.0)}", "", "## Pareto front", ""]
    if view.front.empty:
        lines.append("No feasible trial on this profile.")
    else:
        head = table_header(view)
        lines += ["| " + " | ".join(head) + " |", "|" + "--:|" * (len(head) - 2) + ":--|:--|"]
        for row in table_rows(view):
            *cells, command = (c.replace("|", "\\|") for c in row)
            lines.append("| " + " | ".join(cells) + f" | {'`' + command + '`' if command else ''} |")
        lines += ["", ("An export command fine-tunes the plan again for longer than the search did "
                       "(`--finetune-steps N` sets how long) and reports validation and test quality before and after. "
                       "That retrain lifts the most compressed plans most: `" + within_command(view) + "` retrains "
                       "the front's most compressed plans and exports the most compressed one within 0.5 points "
                       "of the baseline's validation quality after it.")]
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
    """The front as a rich Table for the terminal: the rows of report.md (the dense baseline
    first, as the reference), without the export commands."""
    from rich.table import Table

    c = counts(view)
    title = (f"{view.name} on {view.profile}{' (re-priced)' if view.repriced else ''}: "
             f"{c['front']} on the front of {c['feasible']} feasible / {c['trials']} trials"
             + (f" ({c['stopped']} stopped at a rung)" if c["stopped"] else ""))
    table = Table(title=title)
    metric = str(view.baseline.get("metric_name") or "quality")
    for h, j in zip(("trial", f"val {metric}", f"test {metric}", "latency ms", "memory KB", "size KB", "x fp32",
                     "layers"), "rrrrrrrl"):
        table.add_column(h, justify={"r": "right", "l": "left"}[j], overflow="fold")
    for i, (*cells, _command) in enumerate(table_rows(view)):  # the dense baseline first, as in report.md
        table.add_row(*cells, end_section=i == 0 and bool(view.dense))
    return table


