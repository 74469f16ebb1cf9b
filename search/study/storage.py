"""Where studies live: SQLite under results/ by default, PostgreSQL for many workers.

Every check a user can fail (results directory not writable, database unreachable, a file
that is not a database, a URL we do not know) is made up front (search.study.database), so a
search never trains for minutes and then dies on its first write. Heartbeats are on for every storage:
a worker that dies mid-trial (SIGKILL, a lost machine) has its trial failed once the grace
period passes and re-queued, with the same plan, for whichever worker asks next.

This is the one module that touches Optuna's private modules and attributes (heartbeats, a
study's storage and ids); everything else goes through the functions here.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import socket
import os
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna._hypervolume import compute_hypervolume
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled

from search.errors import UserError
from search.study.database import (
    check_exists, check_results_dir, default_url, first_line, postgres_engine, redact, sqlite_engine,
)

# a worker records a heartbeat this often (seconds) while it trains a trial ...
HEARTBEAT_INTERVAL = 30
# ... and a RUNNING trial with no heartbeat for this long belongs to a dead worker
GRACE_PERIOD = 120
# a trial whose worker died is re-queued this many times at most
MAX_RETRY = 3


def open_storage(
    url: str | None,
    results_dir: str | os.PathLike = "results",
    *,
    create: bool = True,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
) -> BaseStorage:
    """Open the study storage named by `url`.

    None -> SQLite at `results_dir`/studies.db; `sqlite:///path` -> that SQLite file;
    `postgresql://user:pass@host:port/db` -> the PostgreSQL database, shared by workers;
    "memory" -> a study in this process only. With create=False (reports, exports, listing)
    a missing SQLite file is an error instead of a new, empty database.
    Raises UserError, before anything is trained, when the storage cannot be used.
    """
    if heartbeat_interval < 1 or grace_period <= heartbeat_interval:
        raise UserError(
            f"heartbeat interval {heartbeat_interval} s and grace period {grace_period} s: "
            "need interval >= 1 and grace period > interval"
        )
    if url is not None and str(url).strip() == "memory":
        return optuna.storages.InMemoryStorage()
    if not create:
        check_exists(url, results_dir)
    if url is None or not str(url).strip():
        check_results_dir(Path(results_dir))
        url = default_url(results_dir)
    url = str(url).strip()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        sql_url, engine_kwargs = sqlite_engine(url)
    elif scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        sql_url, engine_kwargs = postgres_engine(url)
    else:
        raise UserError(
            f"storage URL {redact(url)!r} is not supported: use postgresql://user:pass@host:port/db, "
            "sqlite:///path/to/studies.db, or leave --storage out for results/studies.db"
        )
    try:
        storage = _rdb(sql_url, engine_kwargs, heartbeat_interval, grace_period)
        if scheme == "sqlite":
            _fast_commits(storage)
        _ENGINES.add(storage.engine)
        return storage
    except RuntimeError as e:  # optuna: schema written by another Optuna version
        raise UserError(
            f"storage {redact(url)!r} was written by another Optuna version ({first_line(e)}): "
            f"run `optuna storage upgrade --storage URL` or use a new storage"
        ) from None
    except Exception as e:  # sqlalchemy errors after our checks: still one line
        raise UserError(f"cannot open storage {redact(url)!r}: {first_line(e)}") from None


# the SQLAlchemy engine of every RDB storage open_storage made (an engine may outlive its storage)
_ENGINES: "weakref.WeakSet" = weakref.WeakSet()


def close_storages() -> None:
    """Close the connections of every storage this process opened (search.cli.run, before it
    exits without the interpreter's teardown): SQLite checkpoints its write-ahead log into the
    database file when the last connection closes, so studies.db alone holds every trial."""
    for engine in list(_ENGINES):
        try:
            engine.dispose()
        except Exception:  # closing is best effort: every commit is already durable
            pass


def _fast_commits(storage: RDBStorage) -> None:
    """Every SQLite connection of `storage` in write-ahead-log mode with synchronous=NORMAL.

    Optuna commits each suggested parameter, user attribute and tell on its own: about 700
    commits for a 16-trial search, and with SQLite's default rollback journal each one waited
    for the disk (3-12 ms each here, seconds per search). In WAL mode a commit appends to the
    log and NORMAL syncs it only at checkpoints: a killed process loses nothing committed, an
    operating-system crash or power cut may lose the last commits but never corrupts the file
    (sqlite.org/wal.html, "synchronous"). Workers on one machine share the file as before; a
    results directory on a network file system needs PostgreSQL anyway (WAL needs shared memory).
    """
    from sqlalchemy import event

    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened while the schema was checked get the pragmas too


def _rdb(sql_url: str, engine_kwargs: dict, heartbeat_interval: int, grace_period: int) -> RDBStorage:
    """RDBStorage with heartbeats. Two processes that create the same new database at once
    race on Optuna's schema tables (a unique-key error in one): the loser tries again and
    finds the schema the winner wrote."""
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    sql_url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRY
                    ),
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def study_names(storage: BaseStorage) -> list[str]:
    """Names of every study in the storage, sorted."""
    return sorted(s.study_name for s in storage.get_all_studies())


def load_study(
    name: str, storage: BaseStorage, *, sampler: optuna.samplers.BaseSampler | None = None
) -> optuna.Study:
    """Load an existing study by name; UserError listing the studies there when unknown."""
    names = study_names(storage)
    if name not in names:
        known = ", ".join(names) if names else "none yet"
        raise UserError(
            f"unknown study {name!r}; studies in this storage: {known} "
            "(start one with `hwcompress search --study NAME ...`)"
        )
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the trials of workers that stopped sending heartbeats, and re-queue them.

    `study.optimize` does this itself; an ask/tell loop calls it before each `ask`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def fail_beatless_trials(study: optuna.Study) -> int:
    """Fail, and re-queue, the RUNNING trials that have no heartbeat at all; returns how many.

    Call it holding the study lock. Every claim records each trial's first heartbeat before it
    releases the lock (search.study.loop.claim_trials), so a RUNNING trial with none belongs to a
    process that died inside the lock, between `ask` and that first beat. Optuna fails only
    trials whose heartbeat went stale, so nothing else would ever fail this one and every
    process would wait for it forever.
    """
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    rdb = getattr(study._storage, "_backend", study._storage)  # optuna's _CachedStorage wraps RDBStorage
    if not isinstance(rdb, RDBStorage) or not heartbeat_enabled(study):
        return 0
    with _create_scoped_session(rdb.scoped_session) as session:
        running = (session.query(models.TrialModel)
                   .filter(models.TrialModel.study_id == study._study_id)
                   .filter(models.TrialModel.state == optuna.trial.TrialState.RUNNING).all())
        ids = [t.trial_id for t in running if not t.heartbeats]
    return _fail_and_requeue(study, ids)


def fail_dead_local_trials(study: optuna.Study) -> int:
    """Fail, and re-queue, the RUNNING trials claimed by a process of this host that is gone;
    returns how many. Call it holding the study lock.

    Every claim stores its claimant as "host:pid" (search.study.loop.worker_id). A search killed
    with SIGKILL leaves its trials RUNNING with fresh heartbeats, so the same command run again
    at once waited up to the grace period (120 s) before Optuna failed them as stale; a pid that
    no longer exists on this host is known dead now. Another host's trials, and a pid that
    exists (perhaps reused), are left to the heartbeat.
    """
    host = socket.gethostname()
    ids = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        name, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if name == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            ids.append(t._trial_id)
    return _fail_and_requeue(study, ids)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fail_and_requeue(study: optuna.Study, ids: list[int]) -> int:
    """Fail RUNNING trials by id and re-queue them with the storage's retry callback (as Optuna
    does for stale ones); returns how many were failed here (not told meanwhile)."""
    failed = []
    for trial_id in ids:
        try:
            if study._storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
                failed.append(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:  # told meanwhile
            pass
    retry = study._storage.get_heartbeat_stale_trial_callback()
    for trial_id in failed if retry is not None else ():
        retry(study, study._storage.get_trial(trial_id))
    return len(failed)


def set_trial_attrs(trial: optuna.Trial, user: dict, constraints: dict[str, float] | None = None) -> None:
    """A running trial's user attributes and constraint values (Trial.set_user_attr and
    Trial.set_constraint), written in one transaction where the storage is an RDBStorage.

    Optuna writes each attribute in a transaction of its own, and each constraint after a read
    of all system attributes: 10 user attributes and 3 constraints per trial were 16 round
    trips, one commit each, to SQLite's disk or a PostgreSQL server shared by every worker.
    Other storages get the public calls. The trial's cached view is updated as Optuna does.
    """
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    system = {f"{_CONSTRAINTS_KEY}:{k}": float(v) for k, v in (constraints or {}).items()}
    if any(math.isnan(v) for v in system.values()):
        raise ValueError(f"a constraint is NaN: {constraints}")
    backend = getattr(trial.storage, "_backend", trial.storage)  # optuna wraps RDBStorage in a cache
    if not isinstance(backend, RDBStorage):
        for key, value in user.items():
            trial.set_user_attr(key, value)
        for key, value in (constraints or {}).items():
            trial.set_constraint(key, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, True) as session:
        for cls, attrs in ((models.TrialUserAttributeModel, user), (models.TrialSystemAttributeModel, system)):
            for key, value in attrs.items():
                backend._set_trial_attr_without_commit(session, cls, trial._trial_id, key, value)
    trial._cached_frozen_trial.user_attrs.update(user)
    trial._cached_frozen_trial.system_attrs.update(system)


def exact_hypervolume(loss: np.ndarray, reference: np.ndarray) -> float:
    """The volume dominated by loss rows [n, m] up to `reference` [m]: Optuna's exact WFG
    algorithm (2-D/3-D fast paths), which has no public API, so it is reached only here."""
    return float(compute_hypervolume(loss, reference))


def heartbeat_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats (RDB storage with an interval)."""
    return is_heartbeat_enabled(study._storage)


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trials: Sequence[optuna.Trial]) -> Iterator[None]:
    """Send heartbeats for `trials` while the block runs (ask/tell loops; `optimize` does
    it itself), so other workers know they are alive. Nothing when the storage has none.

    A worker that dies stops beating; the next batch of any worker fails its trials
    (fail_stale_trials) and the storage's retry callback enqueues them again.
    """
    if not heartbeat_enabled(study):
        yield
        return
    with contextlib.ExitStack() as stack:
        for t in trials:
            stack.enter_context(get_heartbeat_thread(t._trial_id, study._storage))
        yield


def record_heartbeat(study: optuna.Study, trials: Sequence[optuna.Trial]) -> None:
    """One heartbeat for each trial now: a trial with none can never go stale."""
    for t in trials:
        study._storage.record_heartbeat(t._trial_id)


def study_trials(storage: BaseStorage, study: optuna.study.StudySummary | optuna.study.FrozenStudy) -> list:
    """Every trial (FrozenTrial, not copied) of a study listed by storage.get_all_studies()."""
    return storage.get_all_trials(study._study_id, deepcopy=False)


@contextlib.contextmanager
def study_lock(storage: BaseStorage, study_name: str) -> Iterator[None]:
    """Hold a lock that every worker of this study takes around "count trials, then ask".

    Without it two workers that both see one trial left would both ask one, and the study
    would end with more trials than asked. PostgreSQL: a session advisory lock (released by
    the server if the worker dies); SQLite: an flock on a file next to the database.
    """
    backend = getattr(storage, "_backend", storage)  # optuna's _CachedStorage wraps RDBStorage
    url = str(getattr(backend, "url", ""))
    key = int.from_bytes(hashlib.sha1(study_name.encode()).digest()[:8], "big", signed=True)
    if url.startswith("postgresql"):
        import sqlalchemy

        with backend.engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            con.commit()
            try:
                yield
            finally:
                con.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                con.commit()
    elif url.startswith("sqlite:///"):
        import fcntl

        lock_path = f"{url[len('sqlite:///'):]}.{key & 0xFFFFFFFF:08x}.lock"  # one per study
        with open(lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:  # in-memory or foreign storage: one process, nothing to coordinate
        yield
