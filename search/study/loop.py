"""The batched ask / price / fine-tune / tell loop over an Optuna study.

One batch: claim K trials under the study lock, turn them into a Plan [K, L], price it on
every shipped profile (and on the target profile), tell the plans that break a budget as
PRUNED with their constraint values and no training, fine-tune the rest in one Engine.run
call (with a pruner, in rungs: those that fall behind stop early and are told PRUNED with
their last rung's quality, search.study.pruning), tell them. Optuna owns all search state,
so resume, many workers and reports need nothing else. `hwcompress search` and every worker
run the same loop (`run_trials`), so any number of them on one study stop at its trial
budget together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import socket
import threading
import time
import warnings
import zlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import optuna
from optuna.trial import TrialState

from search.compression import plan as P
from search.errors import UserError
from search.cost import budget as B
from search.cost.roofline import Costs, price, price_all
from search.study import storage
from search.study.storage import set_trial_attrs
from search.study.context import SearchContext
from search.study.create import finished_count, make_sampler
from search.study.progress import SearchProgress
from search.study.pruning import STOPPED_ATTR, RungJudge
from search.study.space import plan_to_dict, suggest_plan
from search.study.spec import TEST_ATTR, StudySpec

IDLE_POLL_S = 2.0  # how often a process with nothing to claim looks again while others still train


def worker_id() -> str:
    """This process as "host:pid", stored on every trial it claims (who ran what)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class NothingToDo(UserWarning):
    """A run asked for no more trials than the study already holds: it runs nothing, and the
    study keeps its stored trial budget."""


def price_plans(ctx: SearchContext, plans: P.Plan) -> tuple[Costs, dict[str, Costs]]:
    """(costs on the target profile, costs on every shipped profile and the target) for plans [K, L]."""
    target = price(ctx.profile, ctx.layers, plans)
    everyone = dict(price_all(ctx.layers, plans))
    everyone[ctx.spec.profile_name] = target
    return target, everyone


def _tell_values(ctx: SearchContext, quality: float, cost: dict[str, float]) -> list[float]:
    return [quality if n == "quality" else cost[n] for n in ctx.objectives]


def _deliver(handler: Any) -> None:
    """Act on a held-back Ctrl-C as `handler`, the SIGINT handler the caller had, would: call it
    (Python's default raises KeyboardInterrupt here), ignore it (SIG_IGN), or end the process
    (SIG_DFL). Called directly rather than raising SIGINT again: a signal raised at this thread
    waits while the thread blocks SIGINT, and a held Ctrl-C would then be lost."""
    if callable(handler):
        handler(signal.SIGINT, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)


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
                _deliver(self.previous)  # now, as the handler the caller had
        return False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Inside `allowed`, Ctrl-C held back again (a rung's decision writes the storage)."""
        if not self.active:
            yield
            return
        signal.signal(signal.SIGINT, self._hold)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, self.previous)
            if self.pending:
                self.pending = False
                _deliver(self.previous)

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
                _deliver(self.previous)
            yield
        finally:
            signal.signal(signal.SIGINT, self._hold)


def run_batch(study: optuna.Study, ctx: SearchContext, trials: Sequence[optuna.Trial],
              ctrl_c: _CtrlC) -> dict[str, int]:
    """Price the claimed `trials` (claim_trials), reject the infeasible ones untrained,
    fine-tune the rest, tell all; returns counts {"asked", "infeasible", "trained", "failed",
    "stopped"} (stopped: trained, then stopped at a rung by the study's pruner).

    Ctrl-C (held by `ctrl_c` while the storage is written) interrupts the fine-tuning at once;
    trials not yet told are then failed as interrupted, and do not count.
    """
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
            set_trial_attrs(t, {
                "plan": plan_to_dict(plans[i]),
                "costs": {name: B.costs_at(c, i) for name, c in everyone.items()},
                "constraints": cons, "feasible": feasible, "size_bytes": size_bytes,
                "compression_ratio": ctx.dense_bytes / max(size_bytes, 1)}, cons)
            if feasible:
                feasible_idx.append(i)
            else:
                with _finished_elsewhere(t):
                    set_trial_attrs(t, {"quality": None, "infeasible_reason": B.violation_message(cost, ctx.budget)})
                    study.tell(t, state=TrialState.PRUNED)
                told.add(i)
        failed = stopped_n = 0
        if feasible_idx:
            batch = P.stack_plans([plans[i] for i in feasible_idx])
            with ctrl_c.allowed():
                result = ctx.engine.run(batch, also_test=True, **_rungs(study, ctx, [trials[i] for i in feasible_idx],
                                                        [B.costs_at(target, i) for i in feasible_idx], ctrl_c))
            metric = np.asarray(result.metric, np.float64)
            finite = np.asarray(result.finite, bool)
            stopped = np.zeros(len(feasible_idx), bool) if result.stopped is None else np.asarray(result.stopped)
            reasons = list(result.reason) if result.reason is not None else [None] * len(feasible_idx)
            # which K fine-tuned them: K vmapped plans and K separate runs differ by float rounding
            # (with rungs, the K of the group that finished the plan: search.engine.rungs.regroup)
            ks = np.full(len(feasible_idx), int(ctx.engine.k)) if result.k is None else np.asarray(result.k)
            engine_loop = str(ctx.engine.loop)
            for j, i in enumerate(feasible_idx):
                t = trials[i]
                q = float(metric[j])
                engine_k = int(ks[j])
                with _finished_elsewhere(t):
                    if not finite[j] or not math.isfinite(q):
                        set_trial_attrs(t, {"quality": None, "fail_reason": reasons[j]
                                            or f"fine-tuning gave a non-finite metric ({q})"})
                        study.tell(t, state=TrialState.FAIL)
                        failed += 1
                    elif stopped[j]:  # fell behind at a rung: its last quality, never on a front
                        set_trial_attrs(t, {"quality": q, STOPPED_ATTR: int(result.steps[j]), "engine_k": engine_k,
                                            "engine_loop": engine_loop})
                        study.tell(t, state=TrialState.PRUNED)
                        stopped_n += 1
                    else:
                        # the test metric is shown beside quality, never ranked on
                        set_trial_attrs(t, {"quality": q, TEST_ATTR: _finite(result.test_metric[j]), "engine_k": engine_k,
                                            "engine_loop": engine_loop})
                        study.tell(t, _tell_values(ctx, q, B.costs_at(target, i)))
                told.add(i)
        return {"asked": k, "infeasible": k - len(feasible_idx), "trained": len(feasible_idx), "failed": failed,
                "stopped": stopped_n}
    except BaseException as e:  # Ctrl-C or a crash: completed trials stay, open ones are closed
        for i, t in enumerate(trials):
            if i not in told:
                interrupted = isinstance(e, KeyboardInterrupt)
                with _finished_elsewhere(t):
                    t.set_user_attr("fail_reason", "interrupted" if interrupted else f"{type(e).__name__}: {e}")
                    t.set_user_attr("interrupted", True)
                    study.tell(t, state=TrialState.FAIL)
        raise


@contextlib.contextmanager
def _finished_elsewhere(t: optuna.Trial) -> Iterator[None]:
    """Tell a trial unless another process has finished it: one that failed it as stale while
    this process still trained it (heartbeats that came late on an overloaded machine) and
    re-queued its plan. Its result here is then dropped and the batch goes on, where the
    storage's UpdateFinishedTrialError used to end the worker."""
    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        warnings.warn(f"trial {t.number} was finished by another process (failed as stale and re-queued) "
                      "while this one trained it: its result here is dropped", RuntimeWarning, stacklevel=3)


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(float(v)) else None


def _rungs(study: optuna.Study, ctx: SearchContext, trials: Sequence[optuna.Trial], costs: Sequence[dict],
           ctrl_c: _CtrlC) -> dict:
    """Engine.run's rungs and on_rung for the study's pruner ({} without one)."""
    pruner = ctx.spec.pruner
    if pruner is None or not pruner.active:
        return {}
    judge = RungJudge(study, pruner, ctx.objectives, ctx.spec.profile_name, trials, costs)

    def on_rung(step: int, metric: np.ndarray, live: np.ndarray) -> np.ndarray:
        with ctrl_c.held():
            return judge.decide(step, metric, live)

    return {"rungs": pruner.rungs, "on_rung": on_rung}


ASK_BATCH = 4  # trials asked at once unless the engine fine-tunes more in one call (K)


def ask_batch(engine_k: int | None, batch: int | None = None) -> int:
    """Trials asked, fine-tuned and told together: `batch` if given, else max(ASK_BATCH, K).

    Not K itself: K is measured on the machine (1 or 4 on a CPU, and a noisy machine flips
    between them), and TPE's proposals follow the batches, so the same command with the same
    seed found different fronts. With K <= 4 the engine runs the batch in groups of K.
    """
    return int(batch) if batch else max(ASK_BATCH, int(engine_k or 1))


@dataclasses.dataclass
class Claimant:
    """One process's share of a study: its name, when it joined, and its sampler's stream.

    Two processes on one study with the same seeded sampler propose the same plans (a seeded
    random stream does not depend on the other's trials). So a search keeps the study's seeded
    stream, reproducible run to run, only until it sees a trial that another process claimed
    after it joined; from then on it samples from a stream of its own, as a worker always does.
    """

    spec: StudySpec  # the study's record: sampler name and seed
    joined: int  # trials in the study when this process opened it (its sampler was seeded with it)
    name: str = dataclasses.field(default_factory=worker_id)  # stored as the "worker" of its trials
    own_stream: bool = False  # whether the sampler is already this process's own

    def use_own_stream(self, study: optuna.Study, n_existing: int) -> None:
        """Give `study` a sampler seeded for this process alone (moving with the trials stored)."""
        seed = self.spec.seed + zlib.crc32(self.name.encode())
        study.sampler = make_sampler(self.spec.sampler, seed, n_existing)
        self.own_stream = True

    def separate(self, study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
        """Switch to an own stream once a trial claimed by someone else since we joined is seen."""
        if not self.own_stream and any(
            t.number >= self.joined and t.state != TrialState.WAITING
            and t.user_attrs.get("worker") not in (None, self.name) for t in trials
        ):
            self.use_own_stream(study, len(trials))


@dataclasses.dataclass(frozen=True)
class Claim:
    """What one claim found: the trials asked, and the study's count at that moment."""

    trials: list  # optuna.Trial, asked for this process (empty when nothing is left to claim)
    done: int  # trials that count toward the budget (create.finished_count)
    running: int  # trials running elsewhere (another process, or a dead one not yet stale)


def claim_trials(study: optuna.Study, lock_storage: optuna.storages.BaseStorage, claimant: Claimant,
                 n_trials: int, batch: int) -> Claim:
    """Under the study lock: fail dead processes' trials (stale heartbeats, no heartbeat at all, or
    a claimant on this host that no longer exists), count, and ask at most what is left.

    Counting RUNNING trials as taken is what keeps N processes from overshooting n_trials; a
    dead process's RUNNING trial is failed here (heartbeat) and its re-queued copy is what the
    next ask() returns. Each asked trial records its claimant and a first heartbeat before the
    lock is released, so the next claimant sees it as someone else's, and it can go stale.
    """
    beats = storage.heartbeat_enabled(study)
    with storage.study_lock(lock_storage, study.study_name):
        if beats:
            storage.fail_stale_trials(study)
            storage.fail_beatless_trials(study)  # its claimant died inside this lock
            storage.fail_dead_local_trials(study)  # its claimant was a process of this host that is gone
        stored = study.get_trials(deepcopy=False)
        done = finished_count(stored)
        running = sum(1 for t in stored if t.state == TrialState.RUNNING)
        claimant.separate(study, stored)
        with warnings.catch_warnings():  # our own heartbeats run around the batch
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trials = [study.ask() for _ in range(max(0, min(batch, n_trials - done - running)))]
        for t in trials:
            t.set_user_attr("worker", claimant.name)
        if beats:
            storage.record_heartbeat(study, trials)  # a trial with no beat would never go stale
    return Claim(trials, done, running)


def check_timeout(timeout: float | None) -> float | None:
    """The deadline (time.monotonic()) `timeout` seconds from now, None for none; UserError
    naming the flag for a timeout that is not a positive number."""
    if timeout is None:
        return None
    if not (math.isfinite(timeout) and timeout > 0):
        raise UserError(f"--timeout {timeout:g} must be a positive number of seconds (e.g. 600), or leave it out "
                        "to run until the study's trials are done")
    return time.monotonic() + timeout


def past(deadline: float | None) -> bool:
    """Whether a deadline from check_timeout has passed (never for None)."""
    return deadline is not None and time.monotonic() >= deadline


def run_trials(
    study: optuna.Study,
    lock_storage: optuna.storages.BaseStorage,
    ctx: SearchContext,
    claimant: Claimant,
    n_trials: int,
    batch: int,
    *,
    progress: SearchProgress | None = None,
    max_trials: int | None = None,
    on_batch: Callable[[dict[str, int]], None] | None = None,
    idle_poll: float = IDLE_POLL_S,
    deadline: float | None = None,
) -> int:
    """Claim and run batches of at most `batch` trials until the study holds n_trials finished
    ones (or this process has run `max_trials`, or time.monotonic() has passed `deadline`: no
    batch is claimed after it, the one in flight finishes); returns how many ran here.

    While the budget is taken up only by trials running elsewhere this waits (polling every
    `idle_poll` s): they may die and come back, and a search then prints the front of every
    stored trial. `on_batch` gets each batch's counts (run_batch).
    """
    ran = 0
    while (max_trials is None or ran < max_trials) and not past(deadline):
        limit = batch if max_trials is None else min(batch, max_trials - ran)
        with _CtrlC() as ctrl_c:  # a Ctrl-C while claiming fails the claimed trials as interrupted
            claim = claim_trials(study, lock_storage, claimant, n_trials, limit)
            if progress is not None:
                progress.update(study, claim.done, running=claim.running)
            counts = None
            if claim.trials:
                with storage.heartbeat(study, claim.trials):  # from the claim: a death before training is seen too
                    counts = run_batch(study, ctx, claim.trials, ctrl_c)
        if counts is not None:
            ran += counts["asked"]
            if on_batch is not None:
                on_batch(counts)
        elif claim.done < n_trials and claim.running:
            time.sleep(idle_poll)
        else:
            break
    if progress is not None and ran:  # a --timeout or max_trials ends without another claim: count the last batch
        progress.update(study, finished_count(study.get_trials(deepcopy=False)))
    return ran
