"""Two `hwcompress search` processes on one study, started at the same moment: they claim
trials under the study lock as workers do, so the study ends with exactly --trials finished
trials, no plan trained twice by accident, and both print the front of what is stored."""
from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from search.api import make_spec
from search.report.view import pareto_frame
from search.study import storage as S
from search.study.create import make_sampler
from search.study.loop import Claimant, claim_trials, finished_count
from search.study.space import suggest_plan
from search.study.workers import worker_env
from tests.support import SEARCH, dense, results_dir

WAIT = 300  # seconds: a generous bound for two searches on a loaded 2-core machine, never hit


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_searches_started_together_share_the_trial_budget(tmp_path, request, backend):
    results = results_dir(tmp_path)
    # PostgreSQL: the server .ci/services.sh starts (skipped without it, as the workers' tests)
    url = "sqlite:///" + str(results / "s.db") if backend == "sqlite" else request.getfixturevalue("pg_url")
    n = 8
    # --k 1: K is this machine's choice; measuring it would only slow the test down
    argv = [sys.executable, "-m", "search.cli", "search", *SEARCH, "--study", "race", "--trials", str(n),
            "--storage", url, "--results-dir", str(results), "--k", "1", "--json"]
    procs = [subprocess.Popen(argv, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outs = [p.communicate(timeout=WAIT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    if backend == "sqlite":  # each process closed its connections before its fast exit (search.cli.run):
        assert not (results / "s.db-wal").exists()  # the last one folded the write-ahead log into s.db
    study = S.load_study("race", S.open_storage(url, results))
    trials = study.get_trials()
    assert finished_count(trials) == n, [t.state.name for t in trials]
    assert len(trials) == n  # nothing asked beyond the budget, nothing failed or retried
    assert not [t for t in trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)]
    plans = [json.dumps(t.user_attrs["plan"], sort_keys=True) for t in trials]
    assert len(set(plans)) == n, "a plan was trained twice"
    stored = [int(r) for r in pareto_frame(study)["trial"]]
    for out, _ in outs:  # each process prints the front of the whole stored study
        summary = json.loads(out)
        assert summary["trials_done"] == n
        assert [r["trial"] for r in summary["pareto"]] == stored


def _claim_one(study, storage, claimant, spec, layers) -> str:
    """Claim one trial, sample its plan, tell it (over budget: no values needed); its params as text."""
    [t] = claim_trials(study, storage, claimant, spec.n_trials, 1).trials
    suggest_plan(t, layers, spec.space)
    study.tell(t, state=TrialState.PRUNED)
    return json.dumps(t.params, sort_keys=True)


def test_claimants_with_one_seed_leave_the_shared_stream_and_one_alone_keeps_it():
    """The mechanism behind the test above, deterministic: two processes that opened one study
    with the same seeded sampler propose the same plans until each sees a trial the other
    claimed, then sample from streams of their own; a process alone keeps the study's seeded
    stream, so one search stays reproducible run to run."""
    spec = make_spec(model="lenet300", dataset="digits", profile="mobile-cpu", n_trials=8)
    layers = [dense(0, 64, 32, -1), dense(1, 32, 10)]
    shared = optuna.storages.InMemoryStorage()
    studies = [optuna.create_study(study_name="race", storage=shared, sampler=make_sampler(spec.sampler, spec.seed))]
    studies.append(optuna.load_study(study_name="race", storage=shared, sampler=make_sampler(spec.sampler, spec.seed)))
    claimants = [Claimant(spec, joined=0, name="host:1"), Claimant(spec, joined=0, name="host:2")]
    plans = [_claim_one(st, shared, c, spec, layers) for _ in range(4) for st, c in zip(studies, claimants)]
    assert len(set(plans)) == len(plans), "two processes proposed the same plan"
    assert all(c.own_stream for c in claimants)

    own = optuna.storages.InMemoryStorage()
    alone = optuna.create_study(storage=own, sampler=make_sampler(spec.sampler, spec.seed))
    solo = Claimant(spec, joined=0, name="host:3")
    plain = optuna.create_study(sampler=make_sampler(spec.sampler, spec.seed))
    expected = []
    for _ in range(4):
        t = plain.ask()
        suggest_plan(t, layers, spec.space)
        plain.tell(t, state=TrialState.PRUNED)
        expected.append(json.dumps(t.params, sort_keys=True))
    assert [_claim_one(alone, own, solo, spec, layers) for _ in range(4)] == expected
    assert not solo.own_stream
