"""Fine-tune plans in rungs: every plan's validation quality at a few intermediate budgets,
and only the plans a caller lets go on are fine-tuned further (multi-fidelity search:
successive halving, Hyperband; the decisions are search.study.pruning's).

The engine's jitted functions serve every rung unchanged: the step runs from one rung to
the next, and the evaluation at a rung is the same compiled `evaluate` as the final one, so
rungs never recompile. Plans run K to a group (one vmapped step). After each rung the plans
that go on are packed again (`regroup`): full groups of K, and the few left over either in one
padded group or, where the engine's measured timings say it costs less, each in a group of its
own (K = 1, whose functions compile once, at the first such rung). A stopped plan no longer
rides along in its group's slot: on a CPU, where K plans cost about K times one, it cost the
full fine-tune of a plan that stopped at a tenth of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np

from search.compression.plan import Plan
from search.errors import UserError

# on_rung(step, metric [P] (NaN: stopped or not finite), live [P] bool) -> [P] bool: go on
RungCallback = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class GroupRun:
    """K plans part-way through fine-tuning: what the engine carries from one rung to the next.

    With K = 1 the state and `frozen` carry no plan axis (search.engine.steps.over_plans);
    `plans` always has one."""

    plans: Plan  # [K, L] plan arrays on the device (the last plan repeated to fill K)
    state: tuple  # (trainable, optimizer state, finite flag), as the jitted step takes and returns it
    t: Any  # device int32: the row of the batch table the next step reads
    frozen: Any  # masks, quantization state and BN statistics (refreshed halfway)
    step: int = 0  # fine-tune steps done

    @property
    def k(self) -> int:
        """Plans per vmapped step of this group."""
        return int(self.plans.batch_shape[0])


def check_rungs(rungs: Sequence[int], steps: int) -> tuple[int, ...]:
    """`rungs` as a tuple of ints, strictly ascending in 1..steps-1; UserError otherwise."""
    out = tuple(int(r) for r in rungs)
    if any(r != float(x) for r, x in zip(out, rungs)) or any(r < 1 or r >= steps for r in out) \
            or any(b <= a for a, b in zip(out, out[1:])):
        raise UserError(f"rungs {list(rungs)} are not fine-tune steps in 1..{steps - 1} (below finetune steps "
                        f"{steps}), strictly ascending: e.g. [{max(1, steps // 9)}, {max(1, steps // 3)}]")
    return out


def run_in_rungs(engine: Any, plans: Plan, rungs: Sequence[int], on_rung: RungCallback | None,
                 split: str = "val", also_test: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Fine-tune `plans` [P, L] to each rung, evaluate them on the validation split, ask
    `on_rung` which go on, and finish those (config.steps, evaluated on `split`). `engine` is
    the search.engine.finetune.Engine whose run() calls this.

    Every group of K plans is prepared first, so the decision at a rung sees every plan of the
    call; after it the plans that go on are packed again (`regroup`). A plan whose loss or
    weights turn non-finite stops at the rung where that is seen (finite False). Returns arrays
    [P]: (metric, NaN where not finite; finite; the fine-tune steps behind each metric; whether
    on_rung stopped the plan; with also_test the finished plans' test metric, NaN for the
    others, else None; the K of the group that last fine-tuned each plan).
    """
    steps_total = engine.config.steps
    rungs = check_rungs(rungs, steps_total)
    p, k = plans.batch_shape[0], engine.k
    # (plan index per slot [K] (padding repeats the last plan), the group)
    groups = [(np.minimum(np.arange(s, s + k), p - 1), engine._start(engine._slice(plans, s))) for s in range(0, p, k)]
    metric = np.full(p, np.nan)
    finite = np.ones(p, bool)
    steps = np.zeros(p, int)
    ks = np.full(p, k)
    live = np.ones(p, bool)  # still fine-tuning: neither stopped nor diverged
    stopped = np.zeros(p, bool)

    test = np.full(p, np.nan) if also_test else None

    def advance(to: int, on: str, with_test: bool = False) -> None:
        for idx, g in groups:
            engine._train(g, to)
            m, ok, _ = engine._evaluate(g, on)
            mine, slots = _own_slots(idx, live)  # a plan already stopped keeps the result of its rung
            metric[mine], finite[mine], steps[mine], ks[mine] = m[slots], ok[slots], to, g.k
            if with_test:
                test[mine] = np.where(ok, engine._evaluate(g, "test")[0], np.nan)[slots]

    for r in rungs:
        advance(r, "val")
        live &= finite
        keep = np.ones(p, bool) if on_rung is None else np.asarray(on_rung(r, np.where(live, metric, np.nan),
                                                                          live.copy()), bool)
        stopped |= live & ~keep
        live &= keep
        groups = regroup(groups, live, k, engine.known_timings)
    advance(steps_total, split, also_test)
    return np.where(finite, metric, np.nan), finite, steps, stopped, test, ks


def _own_slots(idx: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the live plans of a group, the slot holding each): a plan's first slot (padding repeats it)."""
    plan_ids, first = np.unique(idx, return_index=True)
    on = live[plan_ids]
    return plan_ids[on], first[on]


def regroup(groups: list[tuple[np.ndarray, GroupRun]], live: np.ndarray, k: int,
            timings: dict[int, float]) -> list[tuple[np.ndarray, GroupRun]]:
    """The groups that fine-tune the `live` plans [P] on from a rung, packed to cost the least.

    Groups without a live plan are dropped. With K > 1 the live plans of the groups of K go
    into full groups of K, and the r < K left over into one padded group of K, or each into a
    group of its own (K = 1) when `timings` (seconds per plan-step per K, the engine's K choice)
    say r plans alone cost less than one group of K (r * t[1] < K * t[K]). The layout changes only
    when it costs less than the one it replaces; the plans' fine-tuning state moves with them
    unchanged (slot gathers: the same weights, optimizer moments, masks, ranges and step).
    """
    kept = [(idx, g) for idx, g in groups if live[idx].any()]
    if k == 1:
        return kept
    singles = [(idx, g) for idx, g in kept if g.k == 1]
    members = [(i, g, slot) for idx, g in kept if g.k > 1 for i, slot in zip(*_own_slots(idx, live))]
    full, rest = divmod(len(members), k)
    t1, tk = timings.get(1), timings.get(k)
    alone = bool(rest and t1 and tk and rest * t1 < k * tk)
    # the plans alone cost less than the padded group they replace, so any layout with them is
    # cheaper; without them, only fewer groups than now are
    if not alone and full + (rest > 0) == sum(1 for _, g in kept if g.k > 1):
        return kept
    packed = [members[s:s + k] for s in range(0, full * k, k)]
    if rest and not alone:
        packed.append(members[full * k:])
    out = [_pack(m, k) for m in packed]
    if alone:
        out += [_pack([m], 1) for m in members[full * k:]]
    return singles + out


def _pack(members: list[tuple[int, GroupRun, int]], k: int) -> tuple[np.ndarray, GroupRun]:
    """A group of K from (plan index, group of K > 1, slot) members, padded by repeating the
    last; members come group by group (as regroup lists them), so each source is one gather."""
    members = members + [members[-1]] * (k - len(members))
    sources: dict[int, tuple[GroupRun, list[int]]] = {}
    for _, g, slot in members:
        sources.setdefault(id(g), (g, []))[1].append(slot)

    # on the host: device-side gathers compiled a small XLA program per leaf shape and slot count
    # (43 for lenet300's state), where a copy of a few plans' state costs milliseconds
    def gather(pick):  # every leaf: the members' slots, one gather per source, sources in member order
        parts = [jax.tree.map(lambda a: np.asarray(a)[np.asarray(slots)], pick(g)) for g, slots in sources.values()]
        return parts[0] if len(parts) == 1 else jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

    plans, state, frozen = gather(lambda g: g.plans), gather(lambda g: g.state), gather(lambda g: g.frozen)
    if k == 1:  # one plan: no plan axis on the state (search.engine.steps.over_plans), one on the plans
        state, frozen = jax.tree.map(lambda a: a[0], (state, frozen))
    first = members[0][1]
    plans, state, frozen = jax.device_put((plans, state, frozen))
    return np.array([i for i, _, _ in members]), GroupRun(plans, state, first.t, frozen, first.step)
