"""Multi-fidelity trials: every trial's validation quality at a few fine-tune budgets
(rungs), and successive halving over them, so plans that fall behind stop early.

Optuna ships the algorithms as `SuccessiveHalvingPruner` (asynchronous successive halving,
Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning") and
`HyperbandPruner` (Li et al. 2018), but `Trial.report` and `Trial.should_prune` refuse
multi-objective studies (Optuna 5: NotImplementedError), and our engine fine-tunes K plans per
call. So the same rules run here, on the rung values each trial stores in its "rungs" user attr:

- a rung's competitors are the trials that reached it (with Hyperband, those of the same bracket);
- a trial goes on when it is among the best max(1, n // eta) of the n competitors, ties kept
  (Optuna's rule: its `_is_trial_promotable_to_next_rung`);
- "best" is Pareto dominance over (quality at the rung, the plan's costs on the study's
  other objectives), so a small plan competes with plans as small, not with the dense ones:
  competitors are ordered by non-dominated front, then within a front by crowding distance
  (NSGA-II, Deb et al. 2002; the order MO-ASHA promotes by, Schmucker et al. 2021), so that
  about one in eta goes on as in the single-objective rule, the ends of each front first.
  With quality the only objective both rules are exactly Optuna's pruners
  (tests/study/test_pruner.py);
- Hyperband: a trial's bracket is the one Optuna's HyperbandPruner picks (CRC-32 of study name
  and trial number, brackets weighted by their budget); bracket b decides from rung b on, the
  last bracket runs every trial to the full budget.

A stopped trial is told PRUNED with its last rung's quality ("quality", "stopped_at"), so it
is never on a front; it counts toward the study's trial budget like any finished trial.
"""
from __future__ import annotations

import binascii
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import optuna

from search.errors import UserError

PRUNERS = ("none", "sha", "hyperband")  # --pruner choices
STOPPED_ATTR = "stopped_at"  # the fine-tune step a stopped trial reached


def is_stopped(t: optuna.trial.FrozenTrial) -> bool:
    """A trial the pruner stopped at a rung (PRUNED with "stopped_at"), not one over the budget
    and never trained (PRUNED without it)."""
    return t.state == optuna.trial.TrialState.PRUNED and STOPPED_ATTR in t.user_attrs
# the pruner of a new study when --pruner is not given; measured by bench/bench_pruner.py (README)
DEFAULT_PRUNER = "none"
RUNG_FRACTIONS = (1 / 9, 1 / 3)  # default rungs, as shares of --finetune-steps (eta = 3 apart, then the full budget)
REDUCTION_FACTOR = 3  # eta: about one in eta trials at a rung goes on
RUNGS_ATTR = "rungs"  # trial user attr: {fine-tune step (str): validation quality there}


@dataclass(frozen=True, kw_only=True)
class PrunerConfig:
    """How a study stops trials that fall behind; part of its record (StudySpec.pruner)."""

    # "none": every trial fine-tunes all steps; "sha": asynchronous successive halving; "hyperband"
    kind: str = "none"
    # fine-tune steps at which each trial's validation quality is measured and compared, ascending,
    # each below the full budget (finetune.steps)
    rungs: tuple[int, ...] = ()
    # eta: at each rung about one in eta trials goes on
    reduction_factor: int = REDUCTION_FACTOR

    @property
    def active(self) -> bool:
        """Whether trials are evaluated at rungs and may stop early."""
        return self.kind != "none" and bool(self.rungs)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rungs": list(self.rungs), "reduction_factor": self.reduction_factor}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PrunerConfig:
        """The stored dict's config; None (a record older than rungs) is no pruner."""
        if d is None:
            return cls()
        return cls(kind=str(d["kind"]), rungs=tuple(int(r) for r in d.get("rungs") or ()),
                   reduction_factor=int(d.get("reduction_factor", REDUCTION_FACTOR)))


def default_rungs(steps: int) -> tuple[int, ...]:
    """RUNG_FRACTIONS of `steps`, rounded, in 1..steps-1 (none for fewer than 2 steps)."""
    return tuple(sorted({r for r in (round(steps * f) for f in RUNG_FRACTIONS) if 1 <= r < steps}))


def make_pruner(kind: str | None, rungs: Sequence[int] | None, steps: int) -> PrunerConfig | None:
    """The pruner of `--pruner kind --rungs r1,r2` for `steps` fine-tune steps per trial.

    kind None with rungs None is None: the study's own on a resume, the default
    (default_pruner) for a new study. UserError naming the flag and the valid range when
    kind is unknown, rungs come without a pruner, or a rung is not a step in 1..steps-1.
    """
    if kind is None and rungs is None:
        return None
    kind = DEFAULT_PRUNER if kind is None else str(kind).strip().lower()
    if kind not in PRUNERS:
        raise UserError(f"--pruner {kind!r} is unknown: use one of {', '.join(PRUNERS)}")
    if kind == "none":
        if rungs:
            raise UserError(f"--rungs {_csv(rungs)} needs --pruner sha or hyperband (rungs are where trials may stop)")
        return PrunerConfig()
    if rungs is None:
        rungs = default_rungs(steps)
        if not rungs:
            raise UserError(f"--pruner {kind} needs --finetune-steps of at least 2 (got {steps}): rungs are "
                            "fine-tune steps below it; use --pruner none for shorter fine-tunes")
    bad = [r for r in rungs if not (isinstance(r, (int, np.integer)) and 1 <= r < steps)]
    if bad or not rungs or any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise UserError(f"--rungs {_csv(rungs)}: each rung must be a fine-tune step in 1..{steps - 1} (below "
                        f"--finetune-steps {steps}), strictly ascending, e.g. --rungs {_csv(default_rungs(steps))}")
    return PrunerConfig(kind=kind, rungs=tuple(int(r) for r in rungs))


def default_pruner(steps: int) -> PrunerConfig:
    """The pruner of a new study that named none: DEFAULT_PRUNER at the default rungs (no
    pruner when the fine-tune is too short to have a rung)."""
    if DEFAULT_PRUNER == "none" or not default_rungs(steps):
        return PrunerConfig()
    return PrunerConfig(kind=DEFAULT_PRUNER, rungs=default_rungs(steps))


def _csv(values: Sequence[Any]) -> str:
    return ",".join(str(v) for v in values)


# ---------------------------------------------------------------------------------------- the rules


def promotion_ranks(loss: np.ndarray) -> np.ndarray:
    """[n] each row's place in the order successive halving promotes by, from `loss` [n, m]
    (lower is better): non-dominated sorting into fronts, then within a front decreasing
    crowding distance (NSGA-II, Deb et al. 2002: a front's two ends on each objective first,
    then the points with the widest gaps around them). Lower is better; identical rows share a
    rank, and with one objective the order is the values' own.

    Why not the number of dominators alone (Fonseca & Fleming 1993), as before: in two
    objectives most trials at a rung are dominated by no one or by one or two, so the ties kept
    let half of them go on where one in eta should (lenet300 on Fashion-MNIST: 96 of 184
    trials stopped; the fine-tune saved 15-30% of a batch's time instead of 60-70%)."""
    loss = np.asarray(loss, np.float64)
    n = len(loss)
    if n == 0:
        return np.zeros(0, int)
    uniq, inverse = np.unique(loss, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    u = len(uniq)
    dominates = np.zeros((u, u), bool)  # [i, j]: row i dominates row j
    for s in range(0, u, 512):  # rows compared 512 at a time: the [b, u, m] comparisons stay small
        blk = uniq[s:s + 512, None, :]
        dominates[s:s + 512] = np.all(blk <= uniq, axis=2) & np.any(blk < uniq, axis=2)
    left = dominates.sum(axis=0)  # [u] dominators of each unique row
    front = np.full(u, -1)
    level, current = 0, np.flatnonzero(left == 0)
    while current.size:
        front[current] = level
        left = left - dominates[current].sum(axis=0)
        left[front >= 0] = -1
        current = np.flatnonzero(left == 0)
        level += 1
    crowd = np.zeros(u)
    for f in range(level):
        idx = np.flatnonzero(front == f)
        for col in range(uniq.shape[1]):
            v = uniq[idx, col]
            order = idx[np.argsort(v, kind="stable")]
            crowd[order[0]] = crowd[order[-1]] = np.inf
            span = v.max() - v.min()
            if len(idx) > 2 and np.isfinite(span) and span > 0:
                sv = uniq[order, col]
                crowd[order[1:-1]] += (sv[2:] - sv[:-2]) / span
    keys = np.stack([front.astype(np.float64), -crowd], axis=1)  # by front, then widest gap first; equal keys tie
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)[inverse]


def promotable(own: int, ranks: Sequence[int], reduction_factor: int) -> bool:
    """Whether a competitor of rank `own` is among the best max(1, n // eta) of the n ranks
    (its own included; lower is better, ties go on): Optuna's successive-halving rule."""
    ranks = sorted(ranks)
    return own <= ranks[max(len(ranks) // reduction_factor, 1) - 1]


def bracket_budgets(n_rungs: int, reduction_factor: int) -> list[int]:
    """Hyperband's trial share of each bracket (n_rungs + 1 brackets, bracket 0 the most
    aggressive), as Optuna's HyperbandPruner allocates them: ceil(B * eta^s / (s + 1))."""
    n = n_rungs + 1
    return [math.ceil(n * reduction_factor ** s / (s + 1)) for s in range(n - 1, -1, -1)]


def bracket_of(study_name: str, number: int, n_rungs: int, reduction_factor: int) -> int:
    """The Hyperband bracket of trial `number`: the first rung it can stop at."""
    budgets = bracket_budgets(n_rungs, reduction_factor)
    n = binascii.crc32(f"{study_name}_{number}".encode()) % sum(budgets)
    for b, share in enumerate(budgets):
        n -= share
        if n < 0:
            return b
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------- a batch


class RungJudge:
    """Successive-halving decisions for one batch of trials, at each rung the engine reaches.

    `costs[j]` are trial j's costs on the study's profile (the objectives other than quality
    come from there); each decision stores the batch's rung values first, then reads the
    other trials' from the storage, so workers on one study judge against each other's.
    """

    def __init__(self, study: optuna.Study, config: PrunerConfig, objectives: Sequence[str], profile_name: str,
                 trials: Sequence[optuna.Trial], costs: Sequence[Mapping[str, float]]) -> None:
        self.study, self.config, self.trials = study, config, list(trials)
        self.objectives, self.profile_name = tuple(objectives), profile_name
        self.signs = np.array([-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0 for d in study.directions])
        self.costs = [dict(c) for c in costs]
        n_rungs = len(config.rungs)
        self.brackets = [bracket_of(study.study_name, t.number, n_rungs, config.reduction_factor)
                         if config.kind == "hyperband" else 0 for t in self.trials]
        self.values: list[dict[str, float]] = [{} for _ in self.trials]

    def decide(self, step: int, metric: np.ndarray, live: np.ndarray) -> np.ndarray:
        """[P] whether each trial goes on after `step` (engine.rungs' on_rung)."""
        rung = self.config.rungs.index(step)
        for j, t in enumerate(self.trials):
            if live[j]:
                self.values[j][str(step)] = float(metric[j])
                t.set_user_attr(RUNGS_ATTR, dict(self.values[j]))
                if self.config.kind == "hyperband":
                    t.set_user_attr("bracket", self.brackets[j])
        mine = {t.number for t in self.trials}
        others = [t for t in self.study.get_trials(deepcopy=False)
                  if t.number not in mine and str(step) in (t.user_attrs.get(RUNGS_ATTR) or {})]
        keep = np.ones(len(self.trials), bool)
        for b in sorted({self.brackets[j] for j in range(len(self.trials)) if live[j]}):
            if rung < b:  # this bracket does not stop trials at this rung yet
                continue
            rivals = [self._point(t.user_attrs[RUNGS_ATTR][str(step)], (t.user_attrs.get("costs") or {})
                                  .get(self.profile_name) or {}) for t in others if self._bracket(t) == b]
            batch = [j for j in range(len(self.trials)) if live[j] and self.brackets[j] == b]
            points = rivals + [self._point(metric[j], self.costs[j]) for j in batch]
            ranks = promotion_ranks(np.array(points))
            for i, j in enumerate(batch):
                keep[j] = promotable(int(ranks[len(rivals) + i]), ranks, self.config.reduction_factor)
        return keep

    def _point(self, quality: float, costs: Mapping[str, float]) -> list[float]:
        """The loss vector of a trial at a rung (every objective lower-is-better)."""
        values = [float(quality) if n == "quality" else float(costs.get(n, math.nan)) for n in self.objectives]
        return list(np.nan_to_num(np.array(values) * self.signs, nan=math.inf))

    def _bracket(self, t: optuna.trial.FrozenTrial) -> int:
        if self.config.kind != "hyperband":
            return 0
        return bracket_of(self.study.study_name, t.number, len(self.config.rungs), self.config.reduction_factor)
