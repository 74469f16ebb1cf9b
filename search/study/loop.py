"""The batched ask / price / fine-tune / tell loop over an Optuna study.

One batch: ask K trials, turn them into a Plan [K, L], price it on every shipped profile
(and on the target profile), tell the plans that break a budget as PRUNED with their
constraint values and no training, fine-tune the rest in one Engine.run call, tell them.
Optuna owns all search state, so resume, many workers and reports need nothing else.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import warnings
from typing import Iterator, Sequence

import numpy as np
import optuna
from optuna.trial import TrialState

from search.compression import plan as P
from search.cost import budget as B
from search.cost.roofline import Costs, price, price_all
from search.study import storage
from search.study.context import SearchContext
from search.study.create import finished_count
from search.study.progress import SearchProgress
from search.study.space import plan_to_dict, suggest_plan


def price_plans(ctx: SearchContext, plans: P.Plan) -> tuple[Costs, dict[str, Costs]]:
    """(costs on the target profile, costs on every shipped profile and the target) for plans [K, L]."""
    target = price(ctx.profile, ctx.layers, plans)
    everyone = dict(price_all(ctx.layers, plans))
    everyone[ctx.spec.profile_name] = target
    return target, everyone


def _tell_values(ctx: SearchContext, quality: float, cost: dict[str, float]) -> list[float]:
    return [quality if n == "quality" else cost[n] for n in ctx.objectives]


class _CtrlC:
    """Ctrl-C held back while the storage is written, delivered at the next safe point.

    A KeyboardInterrupt raised inside a SQLite commit left that connection holding the write
    lock, so failing the open trials afterwards hit "database is locked" and the search ended
    with an internal error instead of exit code 130. Only the main thread receives signals;
    elsewhere this does nothing.
    """

    def __enter__(self):
        self.pending = False
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self.pending = True

    def __exit__(self, kind, value, tb):
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
            if self.pending and kind is None:
                signal.raise_signal(signal.SIGINT)  # now, with the handler the caller had
        return False

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        """Ctrl-C acts at once inside (the long fine-tuning), and one held back acts here."""
        if not self.active:
            yield
            return
        signal.signal(signal.SIGINT, self.previous)
        try:
            if self.pending:
                self.pending = False
                signal.raise_signal(signal.SIGINT)
            yield
        finally:
            signal.signal(signal.SIGINT, self._hold)


def run_batch(
    study: optuna.Study, ctx: SearchContext, k: int, trials: Sequence[optuna.Trial] | None = None
) -> dict[str, int]:
    """Ask k trials, reject the infeasible ones untrained, fine-tune the rest, tell all.

    `trials`: already asked (search.workers claims them under a lock so that concurrent
    workers never overshoot the study's trial budget); k is then len(trials).
    The caller then owns their heartbeats. Returns counts {"asked", "infeasible", "trained", "failed"}.
    Ctrl-C interrupts the fine-tuning at once; while the storage is written it waits for the
    write to finish (`_CtrlC`).
    """
    with _CtrlC() as ctrl_c:
        return _run_batch(study, ctx, k, trials, ctrl_c)


def _run_batch(study: optuna.Study, ctx: SearchContext, k: int, trials: Sequence[optuna.Trial] | None,
               ctrl_c: _CtrlC) -> dict[str, int]:
    own = trials is None
    if own:
        if storage.heartbeat_enabled(study):
            storage.fail_stale_trials(study)
        with warnings.catch_warnings():  # our own heartbeats run around the training
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trials = [study.ask() for _ in range(k)]
    trials = list(trials)
    k = len(trials)
    told: set[int] = set()
    try:
        plans = [suggest_plan(t, ctx.layers, ctx.space) for t in trials]
        stacked = P.stack_plans(plans)
        target, everyone = price_plans(ctx, stacked)
        feasible_idx = []
        for i, t in enumerate(trials):
            cost = B.costs_at(target, i)
            cons = B.constraint_values(cost, ctx.budget)
            feasible = all(v <= 0 for v in cons.values())
            size_bytes = int(round(cost["size_kb"] * 1024))
            t.set_user_attr("plan", plan_to_dict(plans[i]))
            t.set_user_attr("costs", {name: B.costs_at(c, i) for name, c in everyone.items()})
            t.set_user_attr("constraints", cons)
            t.set_user_attr("feasible", feasible)
            t.set_user_attr("size_bytes", size_bytes)
            t.set_user_attr("compression_ratio", ctx.dense_bytes / max(size_bytes, 1))
            for key, value in cons.items():
                t.set_constraint(key, value)
            if feasible:
                feasible_idx.append(i)
            else:
                t.set_user_attr("quality", None)
                t.set_user_attr("infeasible_reason", B.violation_message(cost, ctx.budget))
                study.tell(t, state=TrialState.PRUNED)
                told.add(i)
        failed = 0
        if feasible_idx:
            batch = P.stack_plans([plans[i] for i in feasible_idx])
            beats = storage.heartbeat(study, [trials[i] for i in feasible_idx]) if own else contextlib.nullcontext()
            with beats:
                with ctrl_c.allowed():
                    result = ctx.engine.run(batch)
            metric = np.asarray(result.metric, np.float64)
            finite = np.asarray(result.finite, bool)
            reasons = list(result.reason) if result.reason is not None else [None] * len(feasible_idx)
            # which K fine-tuned them: K vmapped plans and K separate runs differ by float rounding
            engine_k = int(ctx.engine.k)
            for j, i in enumerate(feasible_idx):
                t = trials[i]
                q = float(metric[j])
                if not finite[j] or not math.isfinite(q):
                    t.set_user_attr("quality", None)
                    t.set_user_attr("fail_reason", reasons[j] or f"fine-tuning gave a non-finite metric ({q})")
                    study.tell(t, state=TrialState.FAIL)
                    failed += 1
                else:
                    t.set_user_attr("quality", q)
                    t.set_user_attr("engine_k", engine_k)
                    study.tell(t, _tell_values(ctx, q, B.costs_at(target, i)))
                told.add(i)
        return {"asked": k, "infeasible": k - len(feasible_idx), "trained": len(feasible_idx), "failed": failed}
    except BaseException as e:  # Ctrl-C or a crash: completed trials stay, open ones are closed
        for i, t in enumerate(trials):
            if i not in told:
                interrupted = isinstance(e, KeyboardInterrupt)
                t.set_user_attr("fail_reason", "interrupted" if interrupted else f"{type(e).__name__}: {e}")
                t.set_user_attr("interrupted", True)
                study.tell(t, state=TrialState.FAIL)
        raise


ASK_BATCH = 4  # trials asked at once unless the engine fine-tunes more in one call (K)


def ask_batch(engine_k: int | None, batch: int | None = None) -> int:
    """Trials asked, fine-tuned and told together: `batch` if given, else max(ASK_BATCH, K).

    Not K itself: K is measured on the machine (1 or 4 on a CPU, and a noisy machine flips
    between them), and TPE's proposals follow the batches, so the same command with the same
    seed found different fronts. With K <= 4 the engine runs the batch in groups of K.
    """
    return int(batch) if batch else max(ASK_BATCH, int(engine_k or 1))


def run_trials(
    study: optuna.Study,
    ctx: SearchContext,
    n_trials: int,
    batch: int,
    progress: SearchProgress | None = None,
) -> int:
    """Run batches until the study holds n_trials finished trials; returns how many ran now."""
    ran = 0
    while True:
        done = finished_count(study.get_trials(deepcopy=False))
        if progress is not None:
            progress.update(study, done)
        left = n_trials - done
        if left <= 0:
            return ran
        counts = run_batch(study, ctx, min(batch, left))
        ran += counts["asked"]


