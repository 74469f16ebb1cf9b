"""Terminal progress of a search: trials done / total, feasible count, Pareto size, best
quality within budget, elapsed time and ETA (silent with --quiet or --json); and the lines a
finished search adds when it had nothing to do or no trial met the budget."""
from __future__ import annotations

import time
from typing import Any, Sequence

from optuna.trial import FrozenTrial, TrialState

from hw_profiles import Budget
from search.cost.budget import BUDGET_KEYS
from search.study.pruning import is_stopped

RELAX = 1.05  # a suggested bound: the smallest value any trial reached, plus 5%


def summarize(trials: Sequence[FrozenTrial], pareto_size: int) -> dict[str, Any]:
    """Counts and the best quality among feasible, trained trials (None before any)."""
    feasible = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible", True)]
    # PRUNED is either over a budget (never trained) or stopped at a rung by the study's pruner
    stopped = sum(map(is_stopped, trials))
    infeasible = sum(1 for t in trials if t.state == TrialState.PRUNED) - stopped
    failed = sum(1 for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
    qualities = [t.user_attrs.get("quality") for t in feasible if t.user_attrs.get("quality") is not None]
    return {
        "feasible": len(feasible),
        "infeasible": infeasible,
        "stopped": stopped,
        "failed": failed,
        "pareto": pareto_size,
        "best_quality": max(qualities) if qualities else None,
    }


def nothing_to_do(study_name: str, done: int, asked: int, stored: int) -> str:
    """The line of a run that asked for `asked` trials when `done` already count toward the
    study's budget: it runs none, and the study keeps its `stored` trial budget."""
    kept = f"; the study keeps its budget of {stored} trials" if stored != asked else ""
    return f"nothing to do: {done} of {asked} trials done in study {study_name!r}{kept}"


def over_budget_hint(trials: Sequence[FrozenTrial], budget: Budget, profile_name: str) -> str | None:
    """When trials were priced and none met the budget: one line naming the bound every trial
    broke (or how many broke each), the smallest value any trial reached, and the flag to relax,
    e.g. "no trial met the budget on mobile-cpu: all 8 broke latency_ms <= 0.005 (the smallest
    any reached: 0.0061); relax it, e.g. --latency-ms 0.0064, or run more trials".
    None when a trial is feasible, or none was priced."""
    costs = [t.user_attrs["costs"][profile_name] for t in trials
             if profile_name in (t.user_attrs.get("costs") or {})]
    if not costs or any(t.user_attrs.get("feasible") for t in trials):
        return None
    parts, relax = [], []
    for key in BUDGET_KEYS:
        bound = getattr(budget, key)
        if bound is None:
            continue
        values = [float(c[key]) for c in costs]
        broke = sum(1 for v in values if not v <= bound)
        if broke:
            who = f"all {broke}" if broke == len(costs) else f"{broke} of {len(costs)}"
            parts.append((broke, f"{who} broke {key} <= {bound:.4g} (the smallest any reached: {min(values):.4g})"))
            relax.append((broke, f"--{key.replace('_', '-')} {min(values) * RELAX:.4g}"))
    if not parts:
        return None
    top = max(b for b, _ in parts)  # the bounds broken most often are the ones to relax
    flags = ", ".join(f for b, f in relax if b == top)
    return (f"no trial met the budget on {profile_name}: " + "; ".join(text for _, text in parts)
            + f"; relax it, e.g. {flags}, or run more trials")


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


class SearchProgress:
    """A rich progress line updated after every batch; does nothing when disabled."""

    def __init__(self, total: int, enabled: bool = True, metric_name: str = "quality") -> None:
        self.total = total
        self.enabled = enabled
        self.metric_name = metric_name
        self.t0 = time.monotonic()
        self.first_done: int | None = None
        self._progress = None
        self._task = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            console = Console()
            if not console.is_terminal:  # piped (make demo | tee): keep the whole line
                console = Console(width=160)
            self._progress = Progress(
                TextColumn("[bold]search"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
                console=console,
            )
            self._task = self._progress.add_task("search", total=total, info="")
            self._progress.start()

    def eta(self, done: int) -> float | None:
        """Seconds left from the rate of trials finished by this process."""
        if self.first_done is None:
            self.first_done = done
        ran = done - self.first_done
        if ran <= 0:
            return None
        rate = (time.monotonic() - self.t0) / ran
        return max(self.total - done, 0) * rate

    def update(self, study: Any, done: int, running: int = 0) -> dict[str, Any]:
        """Refresh the line from the study (`running`: trials that other processes run now);
        returns the summary shown."""
        trials = study.get_trials(deepcopy=False)
        pareto = len(study.best_trials) if any(t.state == TrialState.COMPLETE for t in trials) else 0
        s = summarize(trials, pareto)
        eta = self.eta(done)
        if self._progress is not None:
            best = "-" if s["best_quality"] is None else f"{s['best_quality']:.4g}"
            elsewhere = f"running elsewhere {running}  " if running else ""
            info = (
                f"feasible {s['feasible']}  infeasible {s['infeasible']}  "
                + (f"stopped {s['stopped']}  " if s["stopped"] else "") + f"failed {s['failed']}  "
                f"pareto {s['pareto']}  best {self.metric_name} {best}  {elsewhere}"
                f"elapsed {_fmt_seconds(time.monotonic() - self.t0)}  eta {_fmt_seconds(eta)}"
            )
            self._progress.update(self._task, completed=min(done, self.total), info=info)
        return s

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
