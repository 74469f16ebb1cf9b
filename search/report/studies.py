"""The studies in a storage, one row each: what `hwcompress studies` lists."""
from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from search.errors import UserError
from search.study.pruning import is_stopped
from search.study.spec import SPEC_ATTR, StudySpec
from search.study.storage import study_trials


def list_studies(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """One dict per study, sorted by name: name, model, dataset, profile, objectives and trial
    counts (trials, complete, infeasible: over the budget, never trained; stopped: fell behind
    at a rung of --pruner; failed, running). Optuna stores the last two kinds as PRUNED; a
    stopped trial has the attribute "stopped_at". A study hwcompress did not start (no record)
    shows None for model, dataset and profile."""
    out = []
    for s in sorted(storage.get_all_studies(), key=lambda s: s.study_name):
        try:
            spec = StudySpec.from_attrs(s.user_attrs.get(SPEC_ATTR), s.study_name)
        except UserError:
            spec = None
        trials = study_trials(storage, s)
        states = [t.state for t in trials]
        stopped = sum(map(is_stopped, trials))
        out.append({
            "name": s.study_name,
            "model": spec.model if spec else None,
            "dataset": spec.dataset if spec else None,
            "profile": spec.profile_name if spec else None,
            "objectives": list(s.system_attrs.get("study:metric_names") or [d.name.lower() for d in s.directions]),
            "trials": len(states),
            "complete": states.count(TrialState.COMPLETE),
            "infeasible": states.count(TrialState.PRUNED) - stopped,
            "stopped": stopped,
            "failed": states.count(TrialState.FAIL),
            "running": states.count(TrialState.RUNNING),
            "waiting": states.count(TrialState.WAITING),
        })
    return out
