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
from search import storage as S
from search import workers as W
from search.study import finished_count
from tests._postgres import pg_url  # noqa: F401  (fixture)
from tests._search_env import results_dir, start_search

HEARTBEAT = {"heartbeat_interval": 1, "grace_period": 3}
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


def test_two_workers_share_one_study(pg_url, results):
    n = 7
    study = _start_study(pg_url, "two", results, n)
    procs = W.spawn_workers(2, "two", pg_url, results, log_dir=results / "logs-two", **HEARTBEAT)
    try:
        codes = [p.wait(timeout=WAIT) for p in procs]
    finally:
        W.stop_workers(procs, grace=5)
    assert codes == [0, 0], (results / "logs-two" / "worker-0.log").read_text()[-2000:]
    trials = _check_complete(study, n)
    # nothing failed here, so the study holds exactly what was asked: no extra trial
    assert len(trials) == n
    by = {t.user_attrs.get("worker") for t in trials[1:]}
    assert by and by <= {_worker_id(p) for p in procs}


def test_sigkilled_worker_trial_is_retried_by_the_other(pg_url, results):
    n = 4
    study = _start_study(pg_url, "kill", results, n)
    [victim] = W.spawn_workers(1, "kill", pg_url, results, log_dir=results / "logs-kill-0", **HEARTBEAT)
    procs = [victim]
    try:
        killed = _wait_running_trial(study, _worker_id(victim), victim)
        # the second worker starts while the first is mid-trial (asked, not told) ...
        procs += W.spawn_workers(1, "kill", pg_url, results, log_dir=results / "logs-kill-1", **HEARTBEAT)
        victim.send_signal(signal.SIGKILL)  # ... and the first dies without a word
        victim.wait(timeout=10)
        survivor = procs[1]
        assert survivor.wait(timeout=WAIT) == 0
    finally:
        W.stop_workers(procs, grace=5)
    trials = _check_complete(study, n)
    dead = trials[killed]
    assert dead.state == TrialState.FAIL and "fail_reason" not in dead.user_attrs  # heartbeat, not code
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.user_attrs["worker"] == _worker_id(survivor)
    assert retry.params == dead.params  # the same plan, run again
    assert len(trials) == n + 1  # the dead attempt is the only extra row


def _worker_id(proc: subprocess.Popen) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def _wait_running_trial(study: optuna.Study, worker: str, proc: subprocess.Popen) -> int:
    """Number of the first trial `worker` is running (asked, not told)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker") == worker:
                return t.number
        assert proc.poll() is None, f"worker exited ({proc.returncode}) before taking a trial"
        time.sleep(0.05)
    raise AssertionError(f"worker {worker} took no trial in {WAIT} s")


def test_worker_joins_from_spec_and_stops_at_budget(pg_url, results):
    """In-process `hwcompress worker`: reads everything from the study; when the budget is
    already reached it runs nothing and says so."""
    study = _start_study(pg_url, "join", results, 2)
    assert cli.main(["worker", "--study", "join", "--storage", pg_url, "--results-dir", str(results),
                     "--batch", "1", "--heartbeat", "1", "--grace", "3"]) == 0
    _check_complete(study, 2)
    assert cli.main(["worker", "--study", "join", "--storage", pg_url,
                     "--results-dir", str(results)]) == 0
    assert len(study.get_trials()) == 2


def test_worker_on_unknown_study_lists_existing(pg_url, results, capsys):
    _start_study(pg_url, "known", results, 1)
    assert cli.main(["worker", "--study", "nope", "--storage", pg_url, "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown study 'nope'") and "known" in err and "\n" not in err
