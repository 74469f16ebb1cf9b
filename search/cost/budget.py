"""Budgets: the bounds a plan must meet on the target profile, as Optuna constraints.

One home for the budget's keys, resolving it from a profile and the user's overrides, the
constraint values a trial stores (feasible when every value is <= 0, Optuna's rule), the
over-budget message, and the smallest latency, memory and size any plan can reach (from the
cost model's per-layer minimum costs, roofline.min_costs), which refuses an impossible budget before training.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from hw_profiles import Budget, HardwareProfile
from search.compression import plan as P
from search.compression.layers import Layer
from search.cost.roofline import cheapest_plan, min_costs, price
from search.errors import UserError

BUDGET_KEYS = ("latency_ms", "memory_kb", "size_kb")  # the constraint names, in this order


def as_budget(value: Budget | Mapping[str, float | None] | None) -> Budget:
    """A Budget from a Budget, a dict with any of BUDGET_KEYS (missing: unbounded) or None.

    Raises UserError for a key that is not a budget or a bound that is not a positive number.
    """
    if value is None:
        return Budget()
    if isinstance(value, Budget):
        items = dataclasses.asdict(value)
    else:
        unknown = sorted(set(value) - set(BUDGET_KEYS))
        if unknown:
            raise UserError(f"unknown budget {unknown[0]!r}; budgets are {', '.join(BUDGET_KEYS)}")
        items = {k: value.get(k) for k in BUDGET_KEYS}
    out = {}
    for k, v in items.items():
        if v is not None:
            try:
                v = float(v)
            except (TypeError, ValueError):
                v = float("nan")
            if not v > 0:
                raise UserError(f"budget {k}={items[k]} must be a positive number (or leave it out for no bound)")
        out[k] = v
    return Budget(**out)


def resolve_budget(profile: HardwareProfile, budget: Budget | Mapping[str, float | None] | None = None) -> Budget:
    """The profile's default budget, each bound replaced by the one `budget` gives.

    A dict replaces only the keys it holds (a key with None removes that bound); a Budget
    replaces the bounds it sets.
    """
    base = dataclasses.asdict(profile.budget)
    if isinstance(budget, Budget):
        base.update({k: v for k, v in dataclasses.asdict(budget).items() if v is not None})
    elif budget is not None:
        as_budget(budget)  # names and values checked before they are merged
        base.update(dict(budget))
    return as_budget(base)


def constraint_values(cost: Mapping[str, float], budget: Budget) -> dict[str, float]:
    """cost - bound for every bounded key: feasible when every value is <= 0 (Optuna's rule)."""
    return {k: float(cost[k]) - getattr(budget, k) for k in BUDGET_KEYS if getattr(budget, k) is not None}


def broken_bounds(cost: Mapping[str, float], budget: Budget) -> list[str]:
    """Each bound the cost breaks (or cannot be compared with), e.g. "latency_ms 3.1 > 2"."""
    out = []
    for k in BUDGET_KEYS:
        bound = getattr(budget, k)
        if bound is not None and not float(cost.get(k, float("nan"))) <= bound:
            out.append(f"{k} {float(cost.get(k, float('nan'))):.4g} > {bound:.4g}")
    return out


def violation_message(cost: Mapping[str, float], budget: Budget) -> str:
    """One line naming every broken budget, e.g. "over budget: latency_ms 3.1 > 2"."""
    return "over budget: " + ", ".join(broken_bounds(cost, budget))


def check_reachable(profile: HardwareProfile, layers: Sequence[Layer], budget: Budget,
                    candidates: P.Plan) -> dict[str, float]:
    """Raise UserError, before any training, when a bound is below every plan's cost.

    `candidates` [K, L]: one plan per discrete choice at the largest prune ratio of the search
    space (search.study.space.extreme_plans); a layer may take a different one than its
    neighbours, so what one plan with per-layer choices reaches is accepted. Returns the
    smallest reachable values (stored with the study as "min_costs").
    """
    best = min_costs(profile, layers, candidates)
    broken = [k for k in BUDGET_KEYS if getattr(budget, k) is not None and best[k] > getattr(budget, k)]
    if broken:
        want = ", ".join(f"{k} <= {getattr(budget, k):.4g}" for k in broken)
        can = ", ".join(f"{k} {best[k]:.4g}" for k in broken)
        flags = " ".join(f"--{k.replace('_', '-')} {best[k] * 1.05:.4g}" for k in broken)
        raise UserError(
            f"budget cannot be met on {profile.name}: {want} asked, but the smallest any plan reaches is "
            f"{can}; relax it (e.g. {flags})"
        )
    return best


def seed_plans(profile: HardwareProfile, layers: Sequence[Layer], budget: Budget, candidates: P.Plan,
               tried: P.Plan | None = None, ratio_step: float = 0.02) -> list[P.Plan]:
    """Plans to try first for bounds a sampler would rarely meet: a bound below every uniform
    candidate's cost (only per-layer choices meet it), or one that none of the plans tried
    first (`tried` [W, L], the warm-start plans) meets. When a uniform plan meets every bound,
    the least compressed ones (fitting_plans: a tight latency budget gets the uniform channel
    ratio that just meets it, which a sampler drawing every layer's ratio at random rarely
    does); otherwise, for each such bound, the plan whose every layer takes its cheapest
    candidate choice for that key (cheapest_plan)."""
    uniform = price(profile, layers, candidates, check=False)  # per-layer choices, as min_costs prices them
    first = None if tried is None or tried.batch_shape[0] == 0 else price(profile, layers, tried)
    keys = [k for k in BUDGET_KEYS if getattr(budget, k) is not None and (
        float(np.min(getattr(uniform, k))) > getattr(budget, k)
        or (first is not None and float(np.min(getattr(first, k))) > getattr(budget, k)))]
    fits = fitting_plans(profile, layers, budget, candidates, ratio_step) if keys else []
    return fits or [cheapest_plan(profile, layers, candidates, k) for k in keys]


def fitting_plans(profile: HardwareProfile, layers: Sequence[Layer], budget: Budget, candidates: P.Plan,
                  ratio_step: float = 0.02) -> list[P.Plan]:
    """The least compressed uniform plans [L] that meet every bound of `budget` (none when no
    uniform plan does: only per-layer choices may): one that prunes least, one that rounds
    least (the same plan once when they agree).

    Each row of `candidates` (uniform choices at the largest ratio: space.extreme_plans) is
    priced with its ratio lowered to every point of the `ratio_step` grid; of the (row, ratio)
    pairs that meet every bound, the one with the smallest ratio (then the widest weights and
    activations, then full rank), and the one with the widest weights and activations (then the
    smallest ratio): as first guesses of the most accurate plan within the budget (NetAdapt,
    Yang et al. 2018, starts from a uniform plan and refines it per layer, as the sampler does
    here). Two, because whether fewer bits or fewer channels buy the budget with less loss
    depends on the model and on the device's kernels (int8 ran slower than float for resnet20
    on an AVX2 CPU)."""
    cand = P.Plan(*(np.asarray(getattr(candidates, f.name)) for f in dataclasses.fields(P.Plan)))
    top = cand.ratio  # [K, L]
    grid = np.round(np.arange(0.0, float(top.max()) + 1e-9, ratio_step), 6)  # [S]
    k, n = top.shape
    ratio = np.minimum(grid[:, None, None], top[None]).reshape(-1, n).astype(np.float32)  # [S*K, L]
    tile = lambda a: np.broadcast_to(a[None], (len(grid), k, n)).reshape(-1, n)
    plans = P.Plan(ratio, *(tile(getattr(cand, f.name)) for f in dataclasses.fields(P.Plan)[1:]))
    costs = price(profile, layers, plans, check=False)
    ok = np.ones(len(ratio), bool)
    for key in BUDGET_KEYS:
        if getattr(budget, key) is not None:
            ok &= np.asarray(getattr(costs, key)) <= getattr(budget, key)
    if not ok.any():
        return []
    r, wb, ab, rank = (plans.ratio.max(axis=1), -plans.weight_bits.min(axis=1), -plans.act_bits.min(axis=1),
                       -plans.rank.min(axis=1))
    picks = []
    for keys in ((rank, ab, wb, r), (rank, r, ab, wb)):  # np.lexsort: the last key is the primary one
        best = next(int(i) for i in np.lexsort(keys) if ok[i])
        if best not in picks:
            picks.append(best)
    return [P.Plan(*(np.asarray(getattr(plans, f.name))[i] for f in dataclasses.fields(P.Plan))) for i in picks]


def budget_dict(budget: Budget) -> dict[str, float | None]:
    """The budget as {latency_ms, memory_kb, size_kb: float | None}, as studies store it."""
    return {k: getattr(budget, k) for k in BUDGET_KEYS}


def costs_at(costs: Any, i: int) -> dict[str, float]:
    """Plan i of a search.cost.roofline.Costs as {latency_ms, memory_kb, size_kb} floats."""
    return {k: float(np.asarray(getattr(costs, k))[i]) for k in BUDGET_KEYS}
