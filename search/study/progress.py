"""Terminal progress of a search: trials done / total, feasible count, Pareto size, best
quality within budget, elapsed time and ETA. Silent with --quiet or --json."""
from __future__ import annotations

import time
from typing import Any, Sequence

from optuna.trial import FrozenTrial, TrialState


def summarize(trials: Sequence[FrozenTrial], pareto_size: int) -> dict[str, Any]:
    """Counts and the best quality among feasible, trained trials (None before any)."""
    feasible = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible", True)]
    infeasible = sum(1 for t in trials if t.state == TrialState.PRUNED)
    failed = sum(1 for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
    qualities = [t.user_attrs.get("quality") for t in feasible if t.user_attrs.get("quality") is not None]
    return {
        "feasible": len(feasible),
        "infeasible": infeasible,
        "failed": failed,
        "pareto": pareto_size,
        "best_quality": max(qualities) if qualities else None,
    }


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

    def update(self, study: Any, done: int) -> dict[str, Any]:
        """Refresh the line from the study; returns the summary shown."""
        trials = study.get_trials(deepcopy=False)
        pareto = len(study.best_trials) if any(t.state == TrialState.COMPLETE for t in trials) else 0
        s = summarize(trials, pareto)
        eta = self.eta(done)
        if self._progress is not None:
            best = "-" if s["best_quality"] is None else f"{s['best_quality']:.4g}"
            info = (
                f"feasible {s['feasible']}  infeasible {s['infeasible']}  failed {s['failed']}  "
                f"pareto {s['pareto']}  best {self.metric_name} {best}  "
                f"elapsed {_fmt_seconds(time.monotonic() - self.t0)}  eta {_fmt_seconds(eta)}"
            )
            self._progress.update(self._task, completed=min(done, self.total), info=info)
        return s

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
