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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from search import plan as P
from search.errors import UserError
from search.layers import Layer
from search.space import Space, plan_to_dict, suggest_plan

# objective name on the command line -> (metric name in the study, direction)
OBJECTIVES = {
    "quality": ("quality", "maximize"),
    "latency": ("latency_ms", "minimize"),
    "memory": ("memory_kb", "minimize"),
    "size": ("size_kb", "minimize"),
}
BUDGET_KEYS = ("latency_ms", "memory_kb", "size_kb")  # the constraint names, in this order
SAMPLERS = ("tpe", "nsga2", "random")
SPEC_IGNORED_ON_RESUME = ("n_trials",)  # fields a resumed run may change


@dataclass
class SearchContext:
    """Everything one worker needs to run trials of a study (built once per process)."""

    engine: Any  # search.engine.Engine: .layers, .run(plans [K, L])
    layers: tuple[Layer, ...]  # the compressible layers, plan axis order
    profile: Any  # the target HardwareProfile
    profile_name: str  # its name, the key of its costs in "costs"
    budget: dict[str, float | None]  # latency_ms / memory_kb / size_kb, None = unbounded
    objectives: tuple[str, ...]  # study metric names, e.g. ("quality", "latency_ms", "memory_kb")
    space: Space  # per-layer choices
    dense_bytes: int  # float32 size of every compressible layer's params
    price: Callable[[Any, Sequence[Layer], P.Plan], Any] | None = None  # search.cost.price
    price_all: Callable[[Sequence[Layer], P.Plan], dict[str, Any]] | None = None  # search.cost.price_all
    extra: dict[str, Any] = field(default_factory=dict)


def metric_names(objectives: Sequence[str]) -> tuple[list[str], list[str]]:
    """(study metric names, directions) for command-line objective names; UserError on typos."""
    names, directions = [], []
    for o in objectives:
        key = o.strip().lower()
        if key not in OBJECTIVES:
            raise UserError(
                f"unknown objective {o!r}; choose from {', '.join(OBJECTIVES)} (e.g. --objectives quality,latency,memory)"
            )
        name, direction = OBJECTIVES[key]
        if name in names:
            raise UserError(f"objective {o!r} is given twice in --objectives; list each once")
        names.append(name)
        directions.append(direction)
    if "quality" not in names:
        raise UserError("--objectives must include quality, e.g. --objectives quality,latency")
    return names, directions


def make_sampler(name: str, seed: int, n_existing: int = 0) -> optuna.samplers.BaseSampler:
    """A seeded sampler; the seed moves with the trials already done so a resume never repeats."""
    s = None if seed is None else int(seed) + 7919 * int(n_existing)
    if name == "tpe":
        with warnings.catch_warnings():  # multivariate and constant_liar are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=s, multivariate=True, constant_liar=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s, population_size=20)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=s)
    raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


SPEC_ORDER = ("model", "dataset", "data_dir", "hparams", "seed", "profile", "profile_name", "budget",
              "objectives", "sampler", "finetune", "space")  # the order differences are reported in


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    """(dotted field, stored value, new value) of the first difference, None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in SPEC_ORDER if k in a or k in b] + sorted((set(a) | set(b)) - set(SPEC_ORDER))
        for key in keys:
            if path == "" and key in SPEC_IGNORED_ON_RESUME:
                continue
            d = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if d:
                return d
        return None
    return None if _jsonable(a) == _jsonable(b) else (path, a, b)


def check_spec(stored: dict[str, Any], new: dict[str, Any], study_name: str) -> None:
    """Raise UserError naming the first field where a resumed run disagrees with the study."""
    d = _first_difference(_jsonable(stored), _jsonable(new), "")
    if d:
        key, old, want = d
        raise UserError(
            f"study {study_name!r} was created with {key}={old!r} but this run asks for {key}={want!r}; "
            f"use the same value to resume, or a new --study name"
        )


def _jsonable(v: Any) -> Any:
    """Normalise tuples to lists and numpy scalars to Python (what storage gives back)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def open_study(
    name: str,
    storage: Any,
    spec: dict[str, Any],
    directions: Sequence[str],
    names: Sequence[str],
    sampler: str,
    seed: int,
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it and check its spec; returns (study, resumed)."""
    spec = _jsonable(spec)
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        stored = existing.user_attrs.get("spec")
        if stored is not None:
            check_spec(stored, spec, name)
        if list(existing.directions) != [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE for d in directions]:
            raise UserError(f"study {name!r} has other objectives than {list(names)}; use a new --study name")
        n = len(existing.get_trials(deepcopy=False))
        study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(sampler, seed, n))
        study.set_user_attr("spec", {**(stored or spec), "n_trials": spec.get("n_trials")})
        return study, True
    study = optuna.create_study(
        study_name=name, storage=storage, directions=list(directions), sampler=make_sampler(sampler, seed, 0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(names))
    study.set_user_attr("spec", spec)
    return study, False


def finished_count(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count toward --trials: complete, infeasible (PRUNED) or failed with a reason.

    Trials failed by an interrupt or by a dead worker (retried by the heartbeat callback)
    are not counted: their work is done again.
    """
    n = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        elif t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") and not t.user_attrs.get("interrupted"):
            n += 1
    return n


def costs_dict(costs: Any, i: int) -> dict[str, float]:
    """Trial i of a Costs value as {latency_ms, memory_kb, size_kb} floats."""
    return {k: float(np.asarray(getattr(costs, k))[i]) for k in BUDGET_KEYS}


def constraint_values(cost: dict[str, float], budget: dict[str, float | None]) -> dict[str, float]:
    """value - budget per bounded budget: feasible when every value is <= 0 (Optuna's rule)."""
    return {k: cost[k] - float(budget[k]) for k in BUDGET_KEYS if budget.get(k) is not None}


def violation_message(cons: dict[str, float], cost: dict[str, float], budget: dict[str, float | None]) -> str:
    """One line naming every broken budget, e.g. "latency_ms 3.1 > 2.0"."""
    parts = [f"{k} {cost[k]:.4g} > {float(budget[k]):.4g}" for k, v in cons.items() if v > 0]
    return "over budget: " + ", ".join(parts)


def _price(ctx: SearchContext, plans: P.Plan) -> tuple[Any, dict[str, Any]]:
    """(costs on the target profile, costs on every shipped profile) for plans [K, L]."""
    if ctx.price is None or ctx.price_all is None:
        from search import cost

        ctx.price, ctx.price_all = ctx.price or cost.price, ctx.price_all or cost.price_all
    target = ctx.price(ctx.profile, ctx.layers, plans)
    everyone = dict(ctx.price_all(ctx.layers, plans))
    everyone[ctx.profile_name] = target
    return target, everyone


def _heartbeat_enabled(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


@contextlib.contextmanager
def _heartbeats(study: optuna.Study, trials: Sequence[optuna.Trial]) -> Iterator[None]:
    """Heartbeats for the trials being trained (RDB storage with a heartbeat interval).

    A worker that dies stops beating; the next batch of any worker fails its trials
    (fail_stale_trials) and the storage's retry callback enqueues them again.
    """
    if not _heartbeat_enabled(study):
        yield
        return
    from search.storage import heartbeat

    with heartbeat(study, trials):
        yield


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
        if _heartbeat_enabled(study):
            from search.storage import fail_stale_trials

            fail_stale_trials(study)
        with warnings.catch_warnings():  # our own heartbeats run around the training
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trials = [study.ask() for _ in range(k)]
    trials = list(trials)
    k = len(trials)
    told: set[int] = set()
    try:
        plans = [suggest_plan(t, ctx.layers, ctx.space) for t in trials]
        stacked = P.stack_plans(plans)
        target, everyone = _price(ctx, stacked)
        feasible_idx = []
        for i, t in enumerate(trials):
            cost = costs_dict(target, i)
            cons = constraint_values(cost, ctx.budget)
            feasible = all(v <= 0 for v in cons.values())
            size_bytes = int(round(cost["size_kb"] * 1024))
            t.set_user_attr("plan", plan_to_dict(plans[i]))
            t.set_user_attr("costs", {name: costs_dict(c, i) for name, c in everyone.items()})
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
                t.set_user_attr("infeasible_reason", violation_message(cons, cost, ctx.budget))
                study.tell(t, state=TrialState.PRUNED)
                told.add(i)
        failed = 0
        if feasible_idx:
            batch = P.stack_plans([plans[i] for i in feasible_idx])
            beats = _heartbeats(study, [trials[i] for i in feasible_idx]) if own else contextlib.nullcontext()
            with beats:
                with ctrl_c.allowed():
                    result = ctx.engine.run(batch)
            metric = np.asarray(result.metric, np.float64)
            finite = np.asarray(result.finite, bool)
            reasons = list(result.reason) if result.reason is not None else [None] * len(feasible_idx)
            # which K fine-tuned them: K vmapped plans and K separate runs differ by float rounding
            engine_k = int(getattr(ctx.engine, "k", 1) or 1)
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
                    study.tell(t, _tell_values(ctx, q, costs_dict(target, i)))
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
    progress: Any = None,
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


def layers_attr(layers: Sequence[Layer]) -> list[dict[str, Any]]:
    """Layers as JSON-able dicts for the study attr "layers"."""
    return [_jsonable(asdict(layer)) for layer in layers]
