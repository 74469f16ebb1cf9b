"""Static PNG plots of a report (matplotlib Figures drawn by Agg: no display needed).

matplotlib is imported when a plot is drawn, not with this module, and pyplot never: its
import and figure manager cost a search's report about a second on a 2-core CPU.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search.report.atomic import write_atomically
from search.report.text import fmt
from search.report.view import StudyView, heat_data, rank_data, scatter_axes, sensitivity_frame

if TYPE_CHECKING:
    from matplotlib.figure import Figure

AXES_KEY = "hwcompress:axes"  # PNG text chunk of pareto.png: the x axes as drawn (JSON, ScatterAxis fields)


def pareto_scatter(view: StudyView, path: Path) -> Path:
    """Quality against each cost objective: infeasible x, feasible dots, the front, the dense
    baseline as a star. Axes fit the points (search.report.view.scatter_axes): a budget far
    outside them is named in the panel's title instead of drawn as a line."""
    axes_data = scatter_axes(view)
    fig, axes = _subplots(1, len(axes_data), figsize=(5.2 * len(axes_data), 4.2))
    t = view.trials
    bad = t[t["trained"] & ~t["feasible"]]
    ok = t[t["feasible"] & ~t["pareto"]]
    front = view.front
    d = view.dense
    for ax, a in zip(axes[0], axes_data):
        c = a.cost
        if len(bad):
            ax.scatter(bad[c], bad["quality"], marker="x", color="0.6", label=f"infeasible, trained ({len(bad)})")
        ax.scatter(ok[c], ok["quality"], s=18, color="tab:blue", alpha=0.7, label=f"feasible ({len(ok)})")
        f = front.sort_values(c)
        ax.scatter(f[c], f["quality"], s=40, color="tab:red", zorder=3, label=f"Pareto front ({len(f)})")
        for _, r in f.head(30).iterrows():  # label at most 30 front points
            ax.annotate(f"#{r['trial']}", (r[c], r["quality"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if "quality" in d and c in d:
            ax.scatter([d[c]], [d["quality"]], marker="*", s=160, color="tab:green", edgecolor="darkgreen", zorder=4,
                       label="dense baseline")
        if a.budget_on_axis:
            ax.axvline(a.budget, color="tab:orange", ls="--", lw=1, label=f"budget {a.budget:g}")
            ax.text(a.budget, 0.99, f" budget {a.budget:g}", transform=ax.get_xaxis_transform(), color="tab:orange",
                    fontsize=8, va="top")
        if a.note:
            ax.set_title(a.note, fontsize=8, color="tab:orange")
        if a.log:
            ax.set_xscale("log")
        ax.set_xlim(a.lo, a.hi)
        ax.set_xlabel(a.label)
        ax.set_ylabel(view.baseline.get("metric_name", "quality"))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    stopped = int(t["stopped"].sum())
    untrained = int((~t["trained"]).sum()) - stopped
    hidden = " and ".join(x for x in (f"{untrained} never trained (over budget or failed)" if untrained else "",
                                      f"{stopped} stopped at a rung" if stopped else "") if x)
    fig.suptitle(f"{view.name} on {view.profile}{' (re-priced)' if view.repriced else ''}"
                 + (f"; {hidden} not shown" if hidden else ""), fontsize=10)
    return _save(fig, path, {AXES_KEY: json.dumps([dataclasses.asdict(a) for a in axes_data])})


def layer_heatmap(view: StudyView, path: Path) -> Path:
    """Weight bits (log2 colour scale) and prune ratio per layer (rows) across the front
    (columns, best quality first, labelled with trial and quality)."""
    bits, ratio = heat_data(view)
    ranks = rank_data(view)
    labels = [f"#{t}\n{q:.3g}" for t, q in zip(view.front["trial"], view.front["quality"])]
    w = min(14.0, max(4.0, 0.5 * bits.shape[1] + 2.5))
    h = max(2.5, 0.4 * bits.shape[0] + 1.6)
    fig, axes = _subplots(1, 2 if ranks is None else 3, figsize=((2 if ranks is None else 3) * w, h))
    fmt = lambda a, cell: np.vectorize(cell.format, otypes=[str])(a) if a.size else a.astype(str)
    panels = [(axes[0][0], np.log2(bits.to_numpy(float)), fmt(bits.to_numpy(float), "{:.0f}"), "weight bits", "viridis", (0, 5)),
              (axes[0][1], ratio.to_numpy(float), fmt(ratio.to_numpy(float), "{:.2f}"), "prune ratio", "magma_r", (0, 1))]
    if ranks is not None:  # a factorizing study: the rank ratio (s: spatial, k: Kronecker), blank at rank 1
        panels.append((axes[0][2], ranks[0].to_numpy(float), ranks[1].to_numpy(str), "rank ratio", "cividis", (0, 1)))
    for ax, colour, text, title, cmap, (lo, hi) in panels:
        im = ax.imshow(colour, aspect="auto", cmap=cmap, vmin=lo, vmax=hi)
        ax.set_yticks(range(len(bits.index)), bits.index)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        if text.size <= 400:
            for (i, j), v in np.ndenumerate(text):
                dark = (colour[i, j] - lo) / (hi - lo) > 0.5 if cmap == "magma_r" else (colour[i, j] - lo) / (hi - lo) < 0.5
                ax.text(j, i, v, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_title(f"{title} across the front (columns: trial, quality)", fontsize=9)
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        if title == "weight bits":
            bar.set_ticks(range(6), labels=[str(2**k) for k in range(6)])
    return _save(fig, path)


def hypervolume_curve(view: StudyView, path: Path) -> Path:
    """Normalised hypervolume of the feasible front after each trial."""
    fig, axes = _subplots(1, 1, figsize=(6, 3.5))
    ax = axes[0][0]
    t = view.trials
    ax.step(t["trial"], t["hypervolume"], where="post", color="tab:green")
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume (normalised)")
    ax.set_ylim(0, max(1e-3, float(t["hypervolume"].max()) * 1.1))
    ax.grid(alpha=0.3)
    ax.set_title(f"hypervolume over trials ({' / '.join(view.objectives)})", fontsize=9)
    return _save(fig, path)


def sensitivity_bars(view: StudyView, path: Path) -> Path | None:
    """Quality lost by each layer alone under each probe; None when the study has no analysis."""
    s = sensitivity_frame(view.sensitivity)
    if s.empty:
        return None
    layers, probes = list(dict.fromkeys(s["layer"])), list(dict.fromkeys(s["probe"]))
    fig, axes = _subplots(1, 1, figsize=(max(5, 0.9 * len(layers) + 2), 3.5))
    ax = axes[0][0]
    width = 0.8 / len(probes)
    for k, p in enumerate(probes):
        v = s[s["probe"] == p].set_index("layer").reindex(layers)["loss"].to_numpy(float)
        bars = ax.bar(np.arange(len(layers)) + k * width - 0.4 + width / 2, np.where(np.isfinite(v), v, np.nan), width, label=p)
        ax.bar_label(bars, labels=[fmt(x, 3) for x in v], fontsize=7, padding=2)
    ax.margins(y=0.15)  # room for the bar labels
    ax.set_xticks(range(len(layers)), layers, rotation=30 if len(layers) > 6 else 0)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("quality lost")
    ax.set_title("layer sensitivity (one layer at a time, no fine-tuning)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def write_all(view: StudyView, out_dir: Path) -> list[Path]:
    """All PNGs of a report; returns the paths written."""
    out = [pareto_scatter(view, out_dir / "pareto.png"), hypervolume_curve(view, out_dir / "hypervolume.png")]
    if not view.front.empty:
        out.append(layer_heatmap(view, out_dir / "layers.png"))
    s = sensitivity_bars(view, out_dir / "sensitivity.png")
    return out + ([s] if s else [])


def _subplots(rows: int, cols: int, figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """A new Figure (no pyplot, so nothing to close) and its axes as a 2-D array."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Figure, path: Path, metadata: dict[str, str] | None = None) -> Path:
    fig.tight_layout()
    write_atomically(path, lambda p: fig.savefig(p, dpi=110, metadata=metadata, format="png"))
    return Path(path)
