"""Pareto logic as pure functions over rows of objective values.

Everything here works on plain arrays (one row per trial), so a report can re-price a
finished study for another device, recompute feasibility against that device's budget and
find the new front without touching Optuna or retraining anything. Conventions follow
Optuna: constraint values are feasible when <= 0; objectives are turned into losses
(minimised) before any comparison.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from search.study.storage import exact_hypervolume

MINIMIZE = "minimize"
MAXIMIZE = "maximize"


def to_loss(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Objective values [n, m] -> losses [n, m]: maximised columns are negated; NaN stays NaN."""
    v = np.asarray(values, np.float64).reshape(-1, len(directions))
    sign = np.array([-1.0 if d.lower().endswith("maximize") else 1.0 for d in directions])
    return v * sign


def violation(constraints: np.ndarray) -> np.ndarray:
    """Total constraint violation [n]: sum of the positive parts (inf when a value is NaN)."""
    c = np.asarray(constraints, np.float64)
    if c.ndim == 1:
        c = c[:, None]
    v = np.where(np.isnan(c), np.inf, np.maximum(c, 0.0))
    return v.sum(axis=1) if c.shape[1] else np.zeros(c.shape[0])


def budget_constraints(costs: Mapping[str, np.ndarray], budget: Mapping[str, float | None]) -> np.ndarray:
    """Constraint values [n, c], one column per bounded budget field: cost - limit (<= 0 is ok).

    `costs` maps a field (latency_ms, memory_kb, size_kb) to a column [n]; `budget` maps the
    same fields to a limit or None (unbounded, no column).
    """
    n = len(next(iter(costs.values()))) if costs else 0
    cols = [np.asarray(costs[k], np.float64) - float(lim) for k, lim in budget.items() if lim is not None]
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0))


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """True when loss vector a is no worse than b everywhere and better somewhere."""
    a, b = np.asarray(a), np.asarray(b)
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated(loss: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Bool [n]: rows on the Pareto front of the rows selected by `mask` (default: all).

    Rows with a NaN loss never take part. Duplicates of a front point are all on the front.
    O(n^2 m) comparisons in vectorised blocks: fine for the thousands of trials a study holds.
    """
    loss = np.asarray(loss, np.float64)
    ok = ~np.any(np.isnan(loss), axis=1)
    if mask is not None:
        ok &= np.asarray(mask, bool)
    idx = np.flatnonzero(ok)
    pts = loss[idx]
    front = np.zeros(len(loss), bool)
    step = max(1, 2_000_000 // max(1, pts.size))  # rows per block: about 2M comparisons at once
    for s in range(0, len(pts), step):
        blk = pts[s:s + step, None, :]  # [b, 1, m] against all [n, m]
        dominated = np.any(np.all(pts <= blk, axis=2) & np.any(pts < blk, axis=2), axis=1)
        front[idx[s:s + step]] = ~dominated
    return front


def nondominated_rank(loss: np.ndarray, feasible: np.ndarray | None = None,
                      constraints: np.ndarray | None = None) -> np.ndarray:
    """Constrained non-dominated sorting (Deb): rank [n], 0 = the feasible Pareto front.

    Feasible rows come first, sorted into successive fronts; infeasible rows follow, ranked
    by total violation (when constraints are given) so a feasible row always beats an
    infeasible one. Rows with a NaN loss get the last rank.
    """
    loss = np.asarray(loss, np.float64)
    n = len(loss)
    feas = np.ones(n, bool) if feasible is None else np.asarray(feasible, bool)
    valid = ~np.any(np.isnan(loss), axis=1)
    rank = np.full(n, -1, int)
    left = feas & valid
    r = 0
    while left.any():
        f = non_dominated(loss, left)
        rank[f] = r
        left &= ~f
        r += 1
    infeas = ~feas & valid
    if infeas.any():
        v = violation(constraints)[infeas] if constraints is not None else np.zeros(infeas.sum())
        _, order = np.unique(v, return_inverse=True)
        rank[infeas] = r + order.reshape(-1)
        r = rank.max() + 1
    rank[rank < 0] = r
    return rank


def reference_point(loss: np.ndarray, mask: np.ndarray | None = None, margin: float = 0.1) -> np.ndarray:
    """A reference point for hypervolume: the worst selected loss per objective plus
    `margin` times that objective's range (so extreme front points still add volume)."""
    loss = np.asarray(loss, np.float64)
    sel = ~np.any(np.isnan(loss), axis=1) if mask is None else np.asarray(mask, bool) & ~np.any(np.isnan(loss), axis=1)
    if not sel.any():
        return np.full(loss.shape[1], np.nan)
    lo, hi = loss[sel].min(axis=0), loss[sel].max(axis=0)
    span = np.where(hi > lo, hi - lo, np.maximum(np.abs(hi), 1.0))
    return hi + margin * span


def ideal_point(loss: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The best selected loss per objective (the corner the front reaches toward)."""
    loss = np.asarray(loss, np.float64)
    sel = ~np.any(np.isnan(loss), axis=1) if mask is None else np.asarray(mask, bool) & ~np.any(np.isnan(loss), axis=1)
    return loss[sel].min(axis=0) if sel.any() else np.full(loss.shape[1], np.nan)


def hypervolume(loss: np.ndarray, reference: np.ndarray, ideal: np.ndarray | None = None) -> float:
    """Hypervolume dominated by the rows of `loss` up to `reference`.

    With `ideal`, each objective is first scaled so that ideal -> 0 and reference -> 1, so
    the result is the share of the box [ideal, reference] the front covers (in [0, 1]) and
    objectives in different units weigh the same. Rows not strictly better than the
    reference in every objective add nothing and are dropped.
    """
    loss = np.asarray(loss, np.float64)
    ref = np.asarray(reference, np.float64)
    if ideal is not None:
        ideal = np.asarray(ideal, np.float64)
        span = np.where(ref > ideal, ref - ideal, 1.0)
        loss, ref = (loss - ideal) / span, np.ones_like(ref)
    keep = ~np.any(np.isnan(loss), axis=1) & np.all(loss < ref, axis=1) if len(loss) else np.zeros(0, bool)
    pts = loss[keep]
    if len(pts) == 0:
        return 0.0
    return float(exact_hypervolume(pts, ref))


def hypervolume_history(loss: np.ndarray, feasible: np.ndarray, reference: np.ndarray,
                        ideal: np.ndarray | None = None) -> np.ndarray:
    """Hypervolume [n] of the feasible rows among the first i+1 rows, for every i.

    Recomputed only when a new feasible row is not dominated by the front so far.
    """
    loss = np.asarray(loss, np.float64)
    feasible = np.asarray(feasible, bool) & ~np.any(np.isnan(loss), axis=1)
    out = np.zeros(len(loss))
    front: list[np.ndarray] = []
    hv = 0.0
    for i in range(len(loss)):
        if feasible[i] and not any(dominates(p, loss[i]) or np.array_equal(p, loss[i]) for p in front):
            front = [p for p in front if not dominates(loss[i], p)] + [loss[i]]
            hv = hypervolume(np.stack(front), reference, ideal)
        out[i] = hv
    return out
