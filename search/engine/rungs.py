"""Fine-tune plans in rungs: every plan's validation quality at a few intermediate budgets,
and only the plans a caller lets go on are fine-tuned further (multi-fidelity search:
successive halving, Hyperband; the decisions are search.study.pruning's).

The engine's jitted functions serve every rung unchanged: the step runs from one rung to
the next, and the evaluation at a rung is the same compiled `evaluate` as the final one, so
rungs never recompile. Plans run K to a group (one vmapped step); a group is fine-tuned on
while any of its plans goes on (a stopped plan in it rides along in its slot at no extra
cost, its result is the rung's) and freed once none does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from search.compression.plan import Plan
from search.errors import UserError

# on_rung(step, metric [P] (NaN: stopped or not finite), live [P] bool) -> [P] bool: go on
RungCallback = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class GroupRun:
    """K plans part-way through fine-tuning: what the engine carries from one rung to the next."""

    plans: Plan  # [K, L] plan arrays on the device (the last plan repeated to fill K)
    state: tuple  # (trainable, optimizer state, finite flag), as the jitted step takes and returns it
    t: Any  # device int32: the row of the batch table the next step reads
    frozen: Any  # masks, quantization state and BN statistics (refreshed halfway)
    step: int = 0  # fine-tune steps done


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
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Fine-tune `plans` [P, L] to each rung, evaluate them on the validation split, ask
    `on_rung` which go on, and finish those (config.steps, evaluated on `split`). `engine` is
    the search.engine.finetune.Engine whose run() calls this.

    Every group of K plans is prepared first and kept until its plans stop or finish, so the
    decision at a rung sees every plan of the call. A plan whose loss or weights turn
    non-finite stops at the rung where that is seen (finite False). Returns arrays [P]:
    (metric, NaN where not finite; finite; the fine-tune steps behind each metric; whether
    on_rung stopped the plan; with also_test the finished plans' test metric, NaN for the others,
    else None).
    """
    steps_total = engine.config.steps
    rungs = check_rungs(rungs, steps_total)
    p, k = plans.batch_shape[0], engine.k
    groups = {s: engine._start(engine._slice(plans, s)) for s in range(0, p, k)}
    metric = np.full(p, np.nan)
    finite = np.ones(p, bool)
    steps = np.zeros(p, int)
    live = np.ones(p, bool)  # still fine-tuning: neither stopped nor diverged
    stopped = np.zeros(p, bool)

    test = np.full(p, np.nan) if also_test else None

    def advance(to: int, on: str, with_test: bool = False) -> None:
        for s, g in groups.items():
            engine._train(g, to)
            m, ok, _ = engine._evaluate(g, on)
            idx = np.arange(s, min(s + k, p))
            mine = idx[live[idx]]  # a plan already stopped keeps the result of its rung
            metric[mine], finite[mine], steps[mine] = m[mine - s], ok[mine - s], to
            if with_test:
                test[mine] = np.where(ok, engine._evaluate(g, "test")[0], np.nan)[mine - s]

    for r in rungs:
        advance(r, "val")
        live &= finite
        keep = np.ones(p, bool) if on_rung is None else np.asarray(on_rung(r, np.where(live, metric, np.nan),
                                                                          live.copy()), bool)
        stopped |= live & ~keep
        live &= keep
        for s in [s for s in groups if not live[s:s + k].any()]:
            del groups[s]  # no plan of the group goes on: its state is freed
    advance(steps_total, split, also_test)
    return np.where(finite, metric, np.nan), finite, steps, stopped, test
