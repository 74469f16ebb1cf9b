"""Faults lose nothing: Ctrl-C keeps every completed trial and the same command resumes;
a fine-tune that diverges fails only its own trial, with the reason; a storage that cannot
be used is reported before anything is trained."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search import cli
from search.study import storage as S
from search.study.loop import finished_count
from tests.support import SEARCH, results_dir, start_search

REPO = Path(__file__).resolve().parents[2]
WAIT = 240  # seconds: a generous bound on a loaded 2-core machine, never hit


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_sigint_keeps_completed_trials_and_same_command_resumes(tmp_path, capsys):
    """Ctrl-C in the middle of `hwcompress search` (a real SIGINT to this process, sent once
    two trials are complete), then the same command again; fine-tuning runs as fused chunks,
    which give the host control back between them."""
    results = results_dir(tmp_path)
    n = 8
    argv = ["search", *SEARCH, "--study", "intr", "--trials", str(n), "--results-dir", str(results),
            "--loop", "fused"]
    seen: dict[int, list[float]] = {}
    searching = threading.Event()

    def on_sigint(signum, frame):  # only while the search runs: never interrupt pytest itself
        if searching.is_set():
            raise KeyboardInterrupt

    def interrupt_after_two_trials() -> None:
        deadline = time.monotonic() + WAIT
        storage = None
        while searching.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
            if storage is None and not (results / "studies.db").exists():
                continue
            storage = storage or S.open_storage(None, results)
            if "intr" not in S.study_names(storage):
                continue
            trials = S.load_study("intr", storage).get_trials()
            done = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}
            if len(done) >= 2:
                seen.update(done)
                os.kill(os.getpid(), signal.SIGINT)
                return

    old = signal.signal(signal.SIGINT, on_sigint)
    searching.set()
    helper = threading.Thread(target=interrupt_after_two_trials, daemon=True)
    helper.start()
    try:
        rc = cli.main(argv)
    finally:
        searching.clear()
        signal.signal(signal.SIGINT, old)
        helper.join()
    err = capsys.readouterr().err
    assert len(seen) >= 2, "the search ended before two trials were complete"
    assert rc == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    after = S.load_study("intr", S.open_storage(None, results)).get_trials()
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    kept = {t.number: t.values for t in after if t.state == TrialState.COMPLETE}
    for number, values in seen.items():  # every trial completed before Ctrl-C is still there
        assert kept[number] == values
    for t in after:  # trials cut short are failed as interrupted and do not count
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get("interrupted") and t.user_attrs.get("fail_reason") == "interrupted"
    assert finished_count(after) < n
    # the same command again: it resumes and stops at n counted trials
    assert cli.main(argv) == 0
    final = S.load_study("intr", S.open_storage(None, results)).get_trials()
    assert finished_count(final) == n
    for number, values in kept.items():
        assert final[number].state == TrialState.COMPLETE and final[number].values == values


def test_diverging_finetune_fails_its_trial_with_reason_and_search_goes_on(tmp_path):
    from search.api import make_spec, search
    from search.engine.config import FinetuneConfig

    results = results_dir(tmp_path)
    # Adam steps of 1e38: the weights overflow to inf within the three steps
    ft = FinetuneConfig(steps=3, learning_rate=1e38)
    spec = make_spec(model="lenet300", dataset="digits", profile="mobile-cpu", n_trials=3, finetune=ft)
    study = search(spec, None, str(results), batch=1, study_name="nan", warm_start=False)
    trials = study.get_trials()
    trained = [t for t in trials if t.state != TrialState.PRUNED]  # over-budget plans are not trained
    assert trained, "every plan was over budget: nothing was fine-tuned"
    for t in trained:
        assert t.state == TrialState.FAIL
        assert "nan" in t.user_attrs["fail_reason"].lower() or "inf" in t.user_attrs["fail_reason"].lower()
    assert finished_count(trials) == 3  # the search went on past the first failure


def test_unwritable_results_dir_is_reported_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = start_search(tmp_path / "file" / "results", "w")
    assert rc == 2
    assert "not writable" in _one_line_error(capsys)


@pytest.mark.parametrize("url", ["postgresql://u:pw@127.0.0.1:1/studies", "mysql://u@localhost/db"])
def test_bad_storage_is_reported_before_training(tmp_path, capsys, url):
    results = tmp_path / "results"  # a fresh dir: a trained baseline would land in cache/
    rc = start_search(results, "w", 1, "--storage", url)
    assert rc == 2
    err = _one_line_error(capsys)
    assert "pw" not in err
    assert not (results / "cache").exists()


def test_a_trial_whose_claimant_died_inside_the_lock_is_failed_and_requeued(tmp_path):
    """A process killed between `ask` and its first heartbeat (inside the study lock) leaves a
    RUNNING trial with no heartbeat: Optuna never fails it, so every process waited for it
    forever (bench_lock hung on one). The next claim fails it and the retry callback re-queues it."""
    import optuna

    storage = S.open_storage(None, tmp_path)
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    study.ask()  # claimed, then killed before record_heartbeat
    live = study.ask()
    S.record_heartbeat(study, [live])  # a live claimant's trial keeps running
    with S.study_lock(storage, "s"):
        assert S.fail_beatless_trials(study) == 1
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING], states


def test_a_trial_of_a_dead_process_on_this_host_is_failed_and_requeued_at_once(tmp_path):
    """A search killed with SIGKILL leaves RUNNING trials with fresh heartbeats: the same command
    run again waited out the 120 s grace period before they went stale. A claimant pid that is
    gone from this host is dead now; a live one, and another host's, keep their trials."""
    import socket
    import subprocess

    import optuna

    storage = S.open_storage(None, tmp_path)
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    gone = subprocess.Popen(["true"])
    gone.wait()  # exited and reaped: its pid names no process
    host = socket.gethostname()
    owners = [f"{host}:{gone.pid}", f"{host}:{os.getpid()}", f"elsewhere:{gone.pid}"]
    trials = [study.ask() for _ in owners]
    for t, owner in zip(trials, owners):
        t.set_user_attr("worker", owner)
    S.record_heartbeat(study, trials)  # fresh beats: nothing is stale
    with S.study_lock(storage, "s"):
        S.fail_stale_trials(study)
        assert S.fail_dead_local_trials(study) == 1
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING, TrialState.WAITING], states


def test_a_trial_failed_as_stale_while_still_training_does_not_end_the_worker(tmp_path):
    """On an overloaded machine another process may fail a live trial as stale and re-queue it;
    telling it afterwards raised UpdateFinishedTrialError and ended the worker (bench_lock at a
    10 s grace). Its result is now dropped with a warning and the batch goes on."""
    import optuna

    from search.study.loop import _finished_elsewhere

    storage = S.open_storage(None, tmp_path)
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    t = study.ask()
    optuna.load_study(study_name="s", storage=storage).tell(t.number, state=TrialState.FAIL)  # "stale"
    with pytest.warns(RuntimeWarning, match="finished by another process"):
        with _finished_elsewhere(t):
            t.set_user_attr("quality", 0.9)
            study.tell(t, [0.9])
    assert [x.state for x in study.get_trials(deepcopy=False)] == [TrialState.FAIL]
