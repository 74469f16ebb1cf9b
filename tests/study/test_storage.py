"""Study storage: every way a storage can be unusable is one UserError before any work, and
heartbeats turn a dead worker's trial into a failed one plus a re-queued copy."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from search.errors import UserError
from search.study import database as D
from search.study import storage as S
from tests.support import results_dir, start_search

REPO = Path(__file__).resolve().parents[2]


def _one_line(e: UserError) -> str:
    text = str(e)
    assert "\n" not in text and text
    return text


def test_default_is_sqlite_under_results_dir(tmp_path):
    results = tmp_path / "deep" / "results"
    storage = S.open_storage(None, results)
    assert (results / "studies.db").is_file()
    optuna.create_study(study_name="s1", storage=storage)
    # a second opener (another worker, another command) sees the same study
    again = S.open_storage(D.default_url(results))
    assert S.study_names(again) == ["s1"]
    assert S.load_study("s1", again).study_name == "s1"


@pytest.mark.parametrize("where", ["sqlite", "memory"])
def test_trial_attrs_and_constraints_in_one_write_read_back_as_optunas_own(tmp_path, where):
    """set_trial_attrs (one transaction on an RDB storage, the public calls elsewhere) stores
    what Trial.set_user_attr and Trial.set_constraint store: a second reader and the
    constrained samplers see the same attributes and constraints."""
    storage = S.open_storage(None, tmp_path) if where == "sqlite" else optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="a", storage=storage, directions=["maximize", "minimize"])
    mine, theirs = study.ask(), study.ask()
    attrs, cons = {"plan": {"ratio": [0.5, 0.25]}, "feasible": False, "quality": None}, {"latency_ms": 0.5, "size_kb": -1.0}
    S.set_trial_attrs(mine, attrs, cons)
    for k, v in attrs.items():
        theirs.set_user_attr(k, v)
    for k, v in cons.items():
        theirs.set_constraint(k, v)
    assert mine.user_attrs == attrs  # the trial's own view is updated too
    S.set_trial_attrs(mine, {"quality": 0.9})  # a later write replaces a key, keeps the others
    study.tell(mine, [0.9, 1.0])
    study.tell(theirs, [0.9, 1.0])
    again = optuna.load_study(study_name="a", storage=storage if where == "memory" else D.default_url(tmp_path))
    a, b = again.get_trials()
    assert a.user_attrs == {**attrs, "quality": 0.9} and b.user_attrs == attrs
    assert a.constraints == b.constraints == cons and a.system_attrs == b.system_attrs


def test_sqlite_commits_go_to_a_write_ahead_log(tmp_path):
    """Every connection of an SQLite storage is in WAL mode with synchronous=NORMAL (1):
    a commit does not wait for the disk, and a second process still reads what was written."""
    storage = S.open_storage(None, tmp_path)
    optuna.create_study(study_name="w", storage=storage).enqueue_trial({"x": 1.0})
    with storage.engine.connect() as con:
        assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert con.exec_driver_sql("PRAGMA synchronous").scalar() == 1
    code = (f"import optuna; s = optuna.load_study(study_name='w', storage='sqlite:///{tmp_path}/studies.db'); "
            "print(len(s.get_trials()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_sqlite_url_relative_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    S.open_storage("sqlite:///rel/x.db")
    assert (tmp_path / "rel" / "x.db").is_file()
    S.open_storage(f"sqlite:///{tmp_path}/abs.db")
    assert (tmp_path / "abs.db").is_file()


@pytest.mark.parametrize(
    "make_dir, expect",
    [
        (lambda p: p / "a_file" / "results", "not writable"),  # parent is a regular file
        (lambda p: Path("/proc/hwcompress-results"), "not writable"),  # read-only file system
    ],
)
def test_unwritable_results_dir(tmp_path, make_dir, expect):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match=expect) as e:
        S.open_storage(None, make_dir(tmp_path))
    assert "--results-dir" in _one_line(e.value)


def test_corrupt_sqlite_file_is_refused_and_left_alone(tmp_path):
    db = tmp_path / "studies.db"
    text = "this is a text file someone named studies.db\n" * 20
    db.write_text(text)
    with pytest.raises(UserError, match="not a usable SQLite database") as e:
        S.open_storage(None, tmp_path)
    assert str(db) in _one_line(e.value)
    assert db.read_text() == text  # nothing written into it


def test_sqlite_path_that_is_a_directory(tmp_path):
    (tmp_path / "studies.db").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        S.open_storage(None, tmp_path)


@pytest.mark.parametrize(
    "url, expect",
    [
        ("mysql://u:p@localhost/db", "not supported"),
        ("results/studies.db", "not supported"),  # a path, not a URL
        ("sqlite://", "names no SQLite file"),
        ("sqlite:///:memory:", "names no SQLite file"),
        ("postgresql://u@127.0.0.1:5432/", "names no database"),
    ],
)
def test_bad_urls(url, expect):
    with pytest.raises(UserError, match=expect) as e:
        S.open_storage(url)
    _one_line(e.value)


def test_unreachable_postgres_is_fast_and_hides_password():
    t0 = time.monotonic()
    with pytest.raises(UserError, match="cannot reach PostgreSQL") as e:
        S.open_storage("postgresql://alice:s3cret@127.0.0.1:1/studies")  # port 1: refused
    msg = _one_line(e.value)
    assert "s3cret" not in msg and "alice:***@" in msg and "127.0.0.1:1" in msg
    assert time.monotonic() - t0 < D.CONNECT_TIMEOUT + 5


def test_postgres_url_goes_to_sqlalchemy_as_written(pg_url):
    """The README's postgresql:// URL is used unchanged, with the driver SQLAlchemy picks for
    it (psycopg 3 since SQLAlchemy 2.1): the one that optuna.load_study, Optuna's CLI and
    optuna-dashboard load for the same URL. A private rewrite to another driver made the URL
    work in hwcompress only."""
    storage = S.open_storage(pg_url)
    assert storage.url == pg_url
    assert storage.engine.dialect.driver == sqlalchemy.engine.make_url(pg_url).get_dialect().driver
    # the old spelling SQLAlchemy refuses still opens the same database
    assert S.open_storage(pg_url.replace("postgresql://", "postgres://", 1)).url == pg_url


def test_missing_postgres_driver_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"psycopg driver.*pip install 'hwcompress\[postgres\]'") as e:
        S.open_storage("postgresql://u@127.0.0.1:1/studies")
    _one_line(e.value)


def test_readme_postgres_url_works_in_plain_optuna(pg_url, tmp_path):
    """`hwcompress search --storage URL`, then the same URL, unchanged, in optuna.load_study
    and in Optuna's CLI (both failed with "Failed to import DB access module")."""
    assert start_search(results_dir(tmp_path), "readme", 1, "--storage", pg_url) == 0
    study = optuna.load_study(study_name="readme", storage=pg_url)
    assert len(study.trials) == 1 and study.metric_names[0] == "quality"
    cli = [sys.executable, "-c", "import sys; from optuna.cli import main; sys.exit(main())"]
    out = subprocess.run([*cli, "studies", "--storage", pg_url, "-f", "json"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [s["name"] for s in json.loads(out.stdout)] == ["readme"]


def test_bad_heartbeat_settings():
    with pytest.raises(UserError, match="grace period"):
        S.open_storage(None, heartbeat_interval=5, grace_period=5)


def test_load_study_lists_what_exists(tmp_path):
    storage = S.open_storage(None, tmp_path)
    with pytest.raises(UserError, match="none yet"):
        S.load_study("missing", storage)
    for name in ("beta", "alpha"):
        optuna.create_study(study_name=name, storage=storage)
    with pytest.raises(UserError, match=r"'missing'.*alpha, beta") as e:
        S.load_study("missing", storage)
    _one_line(e.value)


def test_redact():
    assert D.redact("postgresql://u:pw@h:1/d") == "postgresql://u:***@h:1/d"
    assert D.redact("postgresql://u@h/d") == "postgresql://u@h/d"


# A process that takes a trial, beats twice, then waits to be killed (what a worker that
# loses its machine looks like to the storage).
_DYING_WORKER = textwrap.dedent(
    """
    import sys, time
    from search.study import storage as S
    st = S.open_storage(sys.argv[1], heartbeat_interval=1, grace_period=2)
    study = S.load_study("hb", st)
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("plan", {"ratio": [0.5]})
    with S.heartbeat(study, [trial]):
        print("RUNNING", trial.number, flush=True)
        time.sleep(600)
    """
)


def _kill_mid_trial_then_recover(url: str) -> None:
    storage = S.open_storage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="hb", storage=storage)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _DYING_WORKER, url], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().startswith("RUNNING")
        time.sleep(1.5)  # at least one more heartbeat
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [t] = study.get_trials(deepcopy=False)
    assert t.state == optuna.trial.TrialState.RUNNING  # nobody has noticed yet
    time.sleep(3)  # past the grace period
    S.fail_stale_trials(study)
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    # the re-queued copy carries the same plan and is what the next ask() gets
    retry = study.ask()
    assert retry.number == 1
    assert retry.suggest_float("x", 0.0, 1.0) == study.trials[0].params["x"]
    assert study.trials[1].user_attrs["plan"] == {"ratio": [0.5]}
    assert study.trials[1].system_attrs["failed_trial"] == 0


def test_sigkilled_trial_is_failed_and_requeued_sqlite(tmp_path):
    _kill_mid_trial_then_recover(D.default_url(tmp_path))


def test_sigkilled_trial_is_failed_and_requeued_postgres(pg_url):
    _kill_mid_trial_then_recover(pg_url)
