"""The most compressed plan within a quality tolerance, judged after the export's retrain.

A search fine-tunes every candidate briefly, so its validation quality under-states what the
most compressed plans reach after the export's longer retrain (`search.export.retrain.retrain_config`):
on Fashion-MNIST, lenet300 pruned 92-96% at 3-4 bits scores 1.5-2 points below the baseline
after 1000 steps and within 0.5-1 point after the 5000-step retrain. Picking the export from
the search's own scores would stop short of them. `select_within` therefore retrains the
front's most compressed candidates, the last and most expensive rung of a multi-fidelity
search (successive halving, Jamieson & Talwalkar 2016; Hyperband, Li et al. 2017), and picks
the most compressed one whose **validation** quality is within the tolerance, as exported: the
better on validation of the retrain and the search's own fine-tune (`search.export.retrain.better`),
both run for each candidate. Test quality is measured beside it for the report and never used
to choose. "Within" holds with a one-sided `confidence` (default CONFIDENCE): the plan's
per-example validation quality minus the baseline's, on the same examples (a paired comparison),
has a lower confidence bound (mean - z * standard error, normal approximation; `margin`) no further below
than the tolerance, so the pick is not merely the plan whose validation sample flattered it most.

Candidates are the complete, feasible trials that no other trial beats on both quality and
compression ratio, most compressed first. Retrained quality falls, roughly, as the ratio
grows, so the boundary is found by bisection (log2 n retrains) over those within `screen` of
the baseline's validation quality at the search's budget, and the rest of the `candidates`
budget goes to the untried plans just beyond it, which the search's noise may have
under-rated. When even the most compressed of them passes, the search goes on the same way
among the more compressed plans outside the screen.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from models.train import per_example_metric
from search.engine.finetune import Engine
from search.errors import UserError
from search.export.defaults import CANDIDATES, CONFIDENCE, SCREEN
from search.export.retrain import better, finetuned, retrain_config, same_finetune, val_examples
from search.study.context import load_context
from search.study.space import plan_from_dict
from search.study.spec import StudySpec


@dataclass(frozen=True)
class Candidate:
    """One front plan and what the export's retrain made of it (val/test None until retrained,
    or when the retrain diverged)."""

    trial: int
    ratio: float  # compression ratio of the plan's packed weights (the search's size objective)
    searched: float  # validation quality after the search's fine-tune
    val: float | None = None  # validation quality of the weights the export keeps
    # the lower confidence bound of val (val less its margin): what is compared with the line
    val_low: float | None = None
    test: float | None = None  # their test quality: reported, never ranked
    retrained: bool = False
    # which weights the export keeps (search.export.retrain.better): "after" the retrain, or
    # "before" it (the search's own fine-tune, run again) where the retrain lowered validation
    kept: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def unit(study: optuna.Study) -> str:
    """What a tolerance on the study's metric counts: "dB" for a PSNR, "points" of an accuracy."""
    return "dB" if study.user_attrs["baseline"].get("metric_name") == "psnr_db" else "points"


def tolerance(study: optuna.Study, points: float) -> float:
    """`points` in the study's metric units: accuracy points as a fraction (0.5 -> 0.005), dB of
    a PSNR as they are."""
    return points if unit(study) == "dB" else points / 100


# slack on quality comparisons: the baseline's metric is stored as float32 and a trial's as
# float64, so 177/180 of each compare unequal without it; far below one example on any split
EPS = 1e-6


def quality_line(study: optuna.Study, points: float) -> float:
    """The lowest validation quality within `points` (accuracy points, dB of PSNR) of the
    baseline's, EPS slack included: a quality q is within when q >= quality_line."""
    return float(study.user_attrs["baseline"]["val_metric"]) - tolerance(study, points) - EPS


def margin(plan: np.ndarray, base: np.ndarray, confidence: float) -> float:
    """How far below mean(plan) the one-sided `confidence` lower bound of a plan's quality lies,
    from plan [N] and base [N], the per-example quality of the plan and of the baseline on the
    same examples: z * sd(plan - base) / sqrt(N) (normal approximation of the paired mean
    difference), z the normal quantile of `confidence` (0.5: 0). A paired bound is far tighter
    than one on each mean alone: the two models agree on most examples."""
    d = np.asarray(plan, np.float64) - np.asarray(base, np.float64)
    if len(d) < 2:
        return 0.0
    return statistics.NormalDist().inv_cdf(confidence) * float(np.std(d, ddof=1)) / math.sqrt(len(d))


def check_selection(within: float, screen: float | None, candidates: int, confidence: float = CONFIDENCE) -> float:
    """The screen to use (None: SCREEN, or `within` if larger), after checking the arguments;
    UserError naming the flag otherwise."""
    if not (math.isfinite(within) and within >= 0):
        raise UserError(f"--within {within} must be >= 0 (points of accuracy, dB of PSNR below the baseline)")
    if not (math.isfinite(confidence) and 0.5 <= confidence < 1):
        raise UserError(f"--confidence {confidence} must be in [0.5, 1): the one-sided confidence that the pick is "
                        "within --within of the baseline (0.5: the validation score as measured)")
    screen = max(SCREEN, within) if screen is None else screen
    if not (math.isfinite(screen) and screen >= 0):
        raise UserError(f"--screen {screen} must be >= 0: the bisection starts among the plans that far below the "
                        "baseline at the search's budget")
    if candidates < 1:
        raise UserError(f"--candidates {candidates} must be >= 1")
    return screen


def front_by_ratio(study: optuna.Study, screen: float) -> list[Candidate]:
    """The complete, feasible trials within `screen` points of the baseline's validation quality
    that no other such trial beats on both quality and compression ratio, most compressed first."""
    floor = quality_line(study, screen)
    rows = [(t.number, float(t.user_attrs["compression_ratio"]), float(t.user_attrs["quality"]))
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("feasible", True) and t.user_attrs.get("plan") is not None
            and t.user_attrs.get("quality") is not None and t.user_attrs.get("compression_ratio") is not None
            and math.isfinite(t.user_attrs["quality"]) and t.user_attrs["quality"] >= floor]
    rows.sort(key=lambda r: (-r[1], -r[2], r[0]))
    front, best_q = [], -math.inf
    for n, ratio, q in rows:  # a plan stays if it is better than every more compressed one
        if q > best_q:
            front.append(Candidate(n, ratio, q))
            best_q = q
    return front


def probe_order(n: int, budget: int, passes: Callable[[int], bool]) -> list[int]:
    """Indices of a list ordered most compressed first that are retrained, in order: bisection
    for the first index that passes (assuming later ones pass too), then the untried indices
    just before it, nearest first, until `budget` retrains are spent (none when no index
    passed). `passes(i)` retrains i."""
    tried: list[int] = []
    lo, hi, first = 0, n - 1, n
    while lo <= hi and len(tried) < budget:
        mid = (lo + hi) // 2
        tried.append(mid)
        if passes(mid):
            first, hi = mid, mid - 1
        else:
            lo = mid + 1
    for i in range(first - 1, -1, -1) if first < n else ():  # none passed: nothing beyond is worth a retrain
        if len(tried) >= budget:
            break
        if i not in tried:
            tried.append(i)
            passes(i)
    return tried


def select_within(study: optuna.Study, within: float, *, screen: float | None = None, candidates: int = CANDIDATES,
                  finetune_steps: int | None = None, learning_rate: float | None = None,
                  confidence: float = CONFIDENCE, results_dir: str = "results",
                  log: Callable[[str], Any] | None = None) -> tuple[Candidate | None, list[Candidate]]:
    """(pick, retrained candidates): the most compressed front plan whose validation quality
    as exported (the better of the export's retrain, `retrain_config` with `finetune_steps` and
    `learning_rate`, and the search's own fine-tune) is within `within` points (dB for PSNR) of
    the baseline's with one-sided `confidence` (validation quality less its `margin` against the
    baseline's per-example quality; 0.5: as measured), or None when none is; and every
    candidate retrained, most compressed first. The bisection starts among the front plans
    within `screen` points of the baseline at the search's budget (None: SCREEN, or `within` if
    larger) and goes on among the more compressed ones when the most compressed of those passes;
    at most `candidates` retrains. `log` gets one line per retrain.

    Raises UserError for a negative `within` or `screen`, `candidates` < 1, `confidence` outside
    [0.5, 1), or a study with no complete, feasible trial within `screen` of the baseline.
    """
    screen = check_selection(within, screen, candidates, confidence)
    front = front_by_ratio(study, math.inf)
    outside = sum(c.searched < quality_line(study, screen) for c in front)  # the most compressed plans, further below than the screen
    if outside == len(front):
        raise UserError(f"study {study.study_name!r} has no complete, feasible trial within {screen:g} of the baseline's "
                        "validation quality: raise --screen, or search longer")
    ctx = load_context(StudySpec.of_study(study), results_dir, study=study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    # as export_trial does, so the pick's export retrains it to the same weights
    searched = dataclasses.replace(ctx.spec.finetune, k=1, loop=ctx.spec.finetune.loop
                                   or trials[front[0].trial].user_attrs.get("engine_loop") or "python")
    config = retrain_config(searched, finetune_steps, learning_rate)
    engine = Engine(ctx.task, ctx.params, config)
    # the search's own fine-tune, run again beside the retrain as the export does (1/RETRAIN_FACTOR of its cost)
    again = None if same_finetune(searched, config) else Engine(ctx.task, ctx.params, searched)
    line = quality_line(study, within)
    base = per_example_metric(ctx.task, ctx.params, ctx.task.data.x_val, ctx.task.data.y_val) if confidence > 0.5 else None
    done: dict[int, Candidate] = {}

    def text(q: dict) -> str:
        return "diverged" if q["val"] is None else f"val {q['val']:.4f} (test {q['test']:.4f})"

    def passes(i: int) -> bool:
        c = front[i]
        plan = plan_from_dict(trials[c.trial].user_attrs["plan"])
        after = finetuned(ctx.task, ctx.params, plan, config, engine)
        before = None if again is None else finetuned(ctx.task, ctx.params, plan, searched, again)
        kept = better(None if before is None else before[1], after[1])
        (cm, q), eng = (before, again) if kept == "before" else (after, engine)
        low = q["val"]
        if low is not None and base is not None:  # the bound, from the kept weights' own validation outputs
            low -= margin(val_examples(ctx.task, eng, cm), base, confidence)
        done[i] = dataclasses.replace(c, val=q["val"], val_low=low, test=q["test"], retrained=True, kept=kept)
        ok = low is not None and low >= line
        if log:
            keep = f"; keeps the search's fine-tune, {text(before[1])}" if kept == "before" else ""
            bound = f", {confidence:.0%} bound {low:.4f}" if base is not None and low is not None else ""
            log(f"trial {c.trial}: {c.ratio:.2f}x, searched val {c.searched:.4f} -> retrained {text(after[1])}{keep}"
                f"{bound}{'  within' if ok else ''}")
        return ok

    def within_line(c: Candidate) -> bool:
        return c.val_low is not None and c.val_low >= line

    tried = probe_order(len(front) - outside, candidates, lambda i: passes(outside + i))
    if outside and tried and 0 in tried and within_line(done[outside]):
        probe_order(outside, candidates - len(tried), passes)  # the screen's most compressed passed: go beyond it
    tried = [done[i] for i in sorted(done)]
    ok = [c for c in tried if within_line(c)]
    return (max(ok, key=lambda c: c.ratio) if ok else None), tried
