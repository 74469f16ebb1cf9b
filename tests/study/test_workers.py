"""Many workers on one PostgreSQL study: every trial recorded once, none lost or duplicated,
the total exactly what was asked, and a worker killed mid-trial costs nothing but time.

These run against the real PostgreSQL that .ci/services.sh starts (HWCOMPRESS_TEST_POSTGRES);
without it they are skipped with the reason, and in CI (CI set) they fail instead.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import time

import optuna
import pytest
from optuna.trial import TrialState

from search import cli
from search.study import storage as S
from search.study import workers as W
from search.study.loop import finished_count
from tests.support import results_dir, start_search

# short heartbeats so a dead worker's trial comes back within seconds; the grace period
# leaves room for a loaded 2-core machine where a beat can be late
HEARTBEAT = {"heartbeat_interval": 1, "grace_period": 8}
WAIT = 240  # seconds: a generous bound for workers on a loaded 2-core machine, never hit


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One results dir for the module, so the baseline is trained (or loaded) once."""
    return results_dir(tmp_path_factory.mktemp("workers"))


def _start_study(url: str, name: str, results, n_trials: int) -> optuna.Study:
    """Create a study the way a user does (`hwcompress search`, one trial), then raise its
    trial budget to n_trials, as a resumed `search --trials n_trials` would."""
    assert start_search(results, name, 1, "--storage", url) == 0
    study = S.load_study(name, S.open_storage(url, **HEARTBEAT))
    study.set_user_attr("spec", {**study.user_attrs["spec"], "n_trials": n_trials})
    return study


def _check_complete(study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # each trial stored once, no gaps
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert finished_count(trials) == n_trials
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["plan"] and t.user_attrs["quality"] is not None
    return trials


def test_two_workers_share_one_study_and_survive_a_sigkill(pg_url, results):
    """Two worker processes on one study. Once both have run trials, one is SIGKILLed in the
    middle of its next trial: the heartbeat marks that trial failed, the other worker runs it
    again, and the study ends with exactly the trials asked, each stored once."""
    n = 16
    study = _start_study(pg_url, "two", results, n)
    # K=1 plan per step (a machine's choice, not the study's): a kill then takes exactly one
    # trial with it, and no worker spends a minute measuring the best K on this CPU
    procs = W.spawn_workers(2, "two", pg_url, results, k=1, log_dir=results / "logs-two", **HEARTBEAT)
    try:
        for p in procs:  # both share the study ...
            _wait_trials_by(study, _worker_id(p), 1, p)
        killed, victim = _kill_mid_trial(study, procs)  # ... then one dies mid-trial
        [survivor] = [p for p in procs if p is not victim]
        log = results / "logs-two" / f"worker-{procs.index(survivor)}.log"
        assert survivor.wait(timeout=WAIT) == 0, _log(log)
    finally:
        W.stop_workers(procs, grace=5)
    trials = _check_complete(study, n)
    # the dead attempt is the only row beyond what was asked
    assert len(trials) == n + 1, _summary(trials)
    dead = trials[killed]
    assert dead.state == TrialState.FAIL and "fail_reason" not in dead.user_attrs  # heartbeat, not code
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.user_attrs["worker"] == _worker_id(survivor)
    # the same plan, run again (a trial killed while sampling had only its first params)
    assert {k: retry.params[k] for k in dead.params} == dead.params
    ran_by = [t.user_attrs.get("worker") for t in trials[1:] if t.number != killed]
    assert set(ran_by) == {_worker_id(victim), _worker_id(survivor)}


def _summary(trials) -> str:
    return "\n".join(f"{t.number} {t.state.name} {t.user_attrs.get('worker')} {t.user_attrs.get('fail_reason')} "
                     f"{t.system_attrs.get('failed_trial')} {t.datetime_start} {t.datetime_complete}" for t in trials)


def _log(path) -> str:
    return path.read_text()[-3000:] if path.exists() else "(no log)"


def _wait_trials_by(study: optuna.Study, worker: str, count: int, proc: subprocess.Popen) -> None:
    """Wait until `worker` has finished `count` trials."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        done = [t for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("worker") == worker and t.state.is_finished()]
        if len(done) >= count:
            return
        assert proc.poll() is None, f"worker {worker} exited ({proc.returncode}) early"
        time.sleep(0.1)
    raise AssertionError(f"worker {worker} finished no trial in {WAIT} s")


def _worker_id(proc: subprocess.Popen) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def _kill_mid_trial(study: optuna.Study, procs: list[subprocess.Popen]) -> tuple[int, subprocess.Popen]:
    """SIGKILL a worker while it holds a RUNNING trial; returns (trial number, that worker).

    The worker is frozen with SIGSTOP first and the trial re-read: only if it is still
    running (not told in between) does SIGKILL follow, so the kill is surely mid-trial.
    """
    ids = {_worker_id(p): p for p in procs}
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            proc = ids.get(t.user_attrs.get("worker"))
            if proc is None:
                continue
            proc.send_signal(signal.SIGSTOP)
            if study.get_trials(deepcopy=False)[t.number].state == TrialState.RUNNING:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                return t.number, proc
            proc.send_signal(signal.SIGCONT)  # told just before the stop: try the next one
        assert all(p.poll() is None for p in procs), "a worker exited before it could be killed"
        time.sleep(0.02)
    raise AssertionError(f"no worker took a trial in {WAIT} s")


def test_worker_joins_from_spec_and_stops_at_budget(pg_url, results):
    """In-process `hwcompress worker`: reads everything from the study; when the budget is
    already reached it runs nothing and says so."""
    study = _start_study(pg_url, "join", results, 2)
    assert cli.main(["worker", "--study", "join", "--storage", pg_url, "--results-dir", str(results),
                     "--batch", "1", "--heartbeat", "1", "--grace", "8"]) == 0
    _check_complete(study, 2)
    assert cli.main(["worker", "--study", "join", "--storage", pg_url,
                     "--results-dir", str(results)]) == 0
    assert len(study.get_trials()) == 2


def test_worker_on_unknown_study_lists_existing(pg_url, results, capsys):
    _start_study(pg_url, "known", results, 1)
    assert cli.main(["worker", "--study", "nope", "--storage", pg_url, "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown study 'nope'") and "known" in err and "\n" not in err
