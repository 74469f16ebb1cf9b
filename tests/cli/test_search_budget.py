"""`hwcompress search` and `worker` against the study's budgets: a --trials at or below the
trials already done runs nothing, says so and keeps the stored trial budget (workers too);
a search where every trial broke a bound says which, how close any trial came, and the flag
to relax."""
from __future__ import annotations

import pytest
from optuna.trial import TrialState, create_trial

from hw_profiles import Budget
from search import cli
from search.study import storage as S
from search.study.loop import finished_count
from search.study.progress import over_budget_hint
from tests.support import SEARCH, results_dir, start_search


def _study(results, name):
    return S.load_study(name, S.open_storage(None, results))


def _notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note: ")]


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """A results dir holding study "six": 6 finished trials, budget 6."""
    results = results_dir(tmp_path_factory.mktemp("budget"))
    assert start_search(results, "six", 6, "--k", "1") == 0
    return results


def test_lowering_trials_below_the_done_ones_runs_nothing_and_keeps_the_budget(six, capfd):
    capfd.readouterr()
    assert start_search(six, "six", 2, "--k", "1") == 0
    [note] = _notes(capfd.readouterr().err)
    assert "nothing to do: 6 of 2 trials done in study 'six'" in note
    assert "keeps its budget of 6 trials" in note and "--trials above 6" in note
    study = _study(six, "six")
    assert study.user_attrs["spec"]["n_trials"] == 6  # not 2
    assert len(study.trials) == 6 and finished_count(study.trials) == 6


def test_lowering_trials_with_workers_starts_none_and_keeps_the_budget(six, capfd):
    """--workers: the workers would run to the stored budget, so none is started."""
    capfd.readouterr()
    argv = ["search", *SEARCH, "--study", "six", "--trials", "2", "--results-dir", str(six),
            "--workers", "1", "--k", "1"]
    assert cli.main(argv) == 0
    err = capfd.readouterr().err
    assert "joined study" not in err  # no worker process ran
    [note] = _notes(err)
    assert "nothing to do: 6 of 2 trials done" in note
    assert _study(six, "six").user_attrs["spec"]["n_trials"] == 6


def test_worker_on_a_study_with_its_trials_done_says_nothing_to_do(six, capfd):
    capfd.readouterr()
    assert cli.main(["worker", "--study", "six", "--results-dir", str(six), "--k", "1"]) == 0
    err = capfd.readouterr().err
    assert "nothing to do: 6 of 6 trials done in study 'six'" in err
    assert "ran 0 trials" in err
    assert len(_study(six, "six").trials) == 6


def test_search_where_every_trial_breaks_a_bound_names_it_and_the_flag_to_relax(tmp_path, capfd):
    """--size-kb just above what the most compressed uniform plan reaches (0.2 KB on lenet300:
    reachable, so the search starts, and no budget seed plan is queued), which sampled plans miss."""
    results = results_dir(tmp_path)
    assert start_search(results, "tight", 3, "--size-kb", "0.21", "--k", "1") == 0
    out, err = capfd.readouterr()
    assert "0 on the Pareto front" in out
    [note] = _notes(err)
    trials = _study(results, "tight").trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3  # priced, none trained
    smallest = min(t.user_attrs["costs"]["mobile-cpu"]["size_kb"] for t in trials)
    assert f"all 3 broke size_kb <= 0.21 (the smallest any reached: {smallest:.4g})" in note
    assert f"--size-kb {smallest * 1.05:.4g}" in note
    assert "latency_ms" not in note and "memory_kb" not in note  # bounds every trial met are not named


def _priced(costs: dict[str, float], feasible: bool = False):
    full = {"latency_ms": 1.0, "memory_kb": 1.0, "size_kb": 1.0, **costs}
    return create_trial(state=TrialState.PRUNED, user_attrs={"costs": {"dev": full}, "feasible": feasible})


def test_over_budget_hint_counts_each_bound_and_relaxes_the_one_broken_most():
    budget = Budget(latency_ms=2.0, memory_kb=10.0)
    trials = [_priced({"latency_ms": 3.0}), _priced({"latency_ms": 2.5, "memory_kb": 12.0}),
              _priced({"latency_ms": 4.0})]
    hint = over_budget_hint(trials, budget, "dev")
    assert "all 3 broke latency_ms <= 2 (the smallest any reached: 2.5)" in hint
    assert "1 of 3 broke memory_kb <= 10 (the smallest any reached: 1)" in hint
    assert "--latency-ms 2.625" in hint and "--memory-kb" not in hint
    assert over_budget_hint([*trials, _priced({}, feasible=True)], budget, "dev") is None
    assert over_budget_hint([], budget, "dev") is None
