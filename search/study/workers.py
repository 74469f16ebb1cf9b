"""Local scale-out: N worker processes on one study storage.

Each worker is a separate `hwcompress worker` process (its own JAX runtime, no shared
Python state), exactly what a user would start by hand on another machine; they meet only
in the storage. So `search --workers N` on one machine and N machines running `worker`
against one PostgreSQL study are the same code path.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna

from search.engine.config import check_k_and_loop
from search.errors import UserError
from search.study import storage as storage_mod
from search.study.database import default_url
from search.study import xla_cache
from search.study.context import SearchContext, load_context
from search.study.create import finished_count
from search.study.loop import IDLE_POLL_S, Claimant, check_timeout, past, run_trials, worker_id
from search.study.progress import nothing_to_do
from search.study.spec import StudySpec

# where `search` and `models` live, so a child finds them even when not pip-installed
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# this process as "host:pid", stored on every trial it claims
WORKER_ID = worker_id()
# seconds a worker gets to finish its trial after SIGINT before it is terminated
STOP_GRACE = 60.0


def worker_argv(
    study: str,
    storage_url: str,
    results_dir: str | os.PathLike = "results",
    *,
    heartbeat_interval: int = storage_mod.HEARTBEAT_INTERVAL,
    grace_period: int = storage_mod.GRACE_PERIOD,
    max_trials: int | None = None,
    k: int | None = None,
    loop: str | None = None,
    timeout: float | None = None,
) -> list[str]:
    """The argv of one worker process: `python -m search.cli worker ...`."""
    cmd = [
        sys.executable, "-m", "search.cli", "worker",
        "--study", study,
        "--storage", storage_url,
        "--results-dir", str(results_dir),
        "--heartbeat", str(heartbeat_interval),
        "--grace", str(grace_period),
    ]
    if max_trials is not None:
        cmd += ["--max-trials", str(max_trials)]
    if k is not None:
        cmd += ["--k", str(k)]
    if loop is not None:
        cmd += ["--loop", loop]
    if timeout is not None:
        cmd += ["--timeout", repr(float(timeout))]
    return cmd


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: ours, with the package root on PYTHONPATH."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    if _PACKAGE_ROOT not in path.split(os.pathsep):
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
    env.update(extra or {})
    return env


def spawn_workers(
    n: int,
    study: str,
    storage_url: str | None,
    results_dir: str | os.PathLike = "results",
    *,
    heartbeat_interval: int = storage_mod.HEARTBEAT_INTERVAL,
    grace_period: int = storage_mod.GRACE_PERIOD,
    max_trials: int | None = None,
    k: int | None = None,
    loop: str | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    log_dir: str | os.PathLike | None = None,
) -> list[subprocess.Popen]:
    """Start `n` worker processes on one study and return them, running.

    `storage_url` None means the default SQLite file under `results_dir`. With `log_dir`,
    worker i writes its output to log_dir/worker-i.log; otherwise it inherits ours. `timeout`:
    seconds from each worker's start after which it claims no more trials (run_worker).
    """
    url = storage_url or default_url(results_dir)
    # workers on one machine compile the same XLA programs: share them through a persistent
    # compilation cache under results/cache/xla, unless the user chose one
    env = {**xla_cache.worker_env(results_dir), **(env or {})}
    cmd = worker_argv(
        study, url, results_dir,
        heartbeat_interval=heartbeat_interval, grace_period=grace_period, max_trials=max_trials, k=k,
        loop=loop, timeout=timeout,
    )
    procs = []
    for i in range(n):
        out = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(log_dir, f"worker-{i}.log"), "ab")
        procs.append(
            subprocess.Popen(
                cmd, env=worker_env(env), stdout=out, stderr=subprocess.STDOUT if out else None,
            )
        )
        if out is not None:
            out.close()  # the child holds its own descriptor
    return procs


def wait_workers(procs: list[subprocess.Popen]) -> int:
    """Wait for every worker; on Ctrl-C pass SIGINT on so each finishes or fails its trial
    cleanly (completed trials stay stored), then re-raise. Returns the worst exit code."""
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        stop_workers(procs)
        raise
    return max(codes, default=0)


def stop_workers(procs: list[subprocess.Popen], grace: float = STOP_GRACE) -> None:
    """SIGINT every live worker, then SIGTERM / SIGKILL those still alive after `grace` s.

    A Ctrl-C at a terminal has already reached the workers (same process group), so they
    get a moment first: a second SIGINT could cut short their own clean-up."""
    deadline = time.monotonic() + 2.0
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_workers(
    n: int,
    study: str,
    storage_url: str | None,
    results_dir: str | os.PathLike = "results",
    **kwargs,
) -> int:
    """Start `n` local workers on an existing study and wait until all stop (the study's
    trial budget is reached). Returns 0 when every worker succeeded, else the worst code."""
    return wait_workers(spawn_workers(n, study, storage_url, results_dir, **kwargs))


# ---------------------------------------------------------------------------------------
# one worker: join a study, rebuild what it needs from the study's spec, run its trials


def context_from_study(study: optuna.Study, results_dir: str | os.PathLike = "results",
                       k: int | None = None, loop: str | None = None) -> SearchContext:
    """Rebuild the trial loop's context from the study's record (search.study.context), so a
    worker on any machine runs exactly the search that `hwcompress search` started; `k`
    (plans per vmapped step) and `loop` (the step driver) are this machine's choice, None to
    measure them."""
    ctx = load_context(StudySpec.of_study(study), results_dir, study=study)
    return SearchContext(ctx, ctx.engine(k=k, loop=loop))


def run_worker(
    study_name: str,
    storage_url: str | None,
    results_dir: str | os.PathLike = "results",
    *,
    heartbeat_interval: int = storage_mod.HEARTBEAT_INTERVAL,
    grace_period: int = storage_mod.GRACE_PERIOD,
    batch: int | None = None,
    k: int | None = None,
    loop: str | None = None,
    max_trials: int | None = None,
    log: bool = True,
    timeout: float | None = None,
) -> int:
    """Join an existing study and run its trials until its trial budget is reached (or this
    worker has run `max_trials`, or `timeout` seconds have passed since it started: no trial is
    claimed after that). Returns how many trials this worker ran."""
    deadline = check_timeout(timeout)
    if batch is not None and batch < 1:
        raise UserError(f"--batch {batch} must be at least 1")
    if max_trials is not None and max_trials < 1:
        raise UserError(f"--max-trials {max_trials} must be at least 1")
    check_k_and_loop(k, loop)
    t0 = time.monotonic()
    xla_cache.use_compilation_cache(results_dir)  # a worker started by hand shares it too
    storage = storage_mod.open_storage(
        storage_url, results_dir, heartbeat_interval=heartbeat_interval, grace_period=grace_period
    )
    study = storage_mod.load_study(study_name, storage)
    ctx = context_from_study(study, results_dir, k=k, loop=loop)
    if log:
        print(f"worker {WORKER_ID}: joined study {study_name} in {time.monotonic() - t0:.1f} s "
              f"(K={ctx.engine.k}, {ctx.engine.loop} loop)", file=sys.stderr, flush=True)
    n_trials = ctx.spec.n_trials
    # every worker its own sampler stream: two workers must not propose the same plans
    claimant = Claimant(ctx.spec, joined=len(study.get_trials(deepcopy=False)))
    claimant.use_own_stream(study, claimant.joined)
    done = finished_count(study.get_trials(deepcopy=False))
    if log and done >= n_trials:
        print(f"worker {claimant.name}: {nothing_to_do(study_name, done, n_trials, n_trials)}; raise its "
              f"budget with `hwcompress search --study {study_name} --trials N` (and the study's other flags)",
              file=sys.stderr, flush=True)

    def report(counts: dict[str, int]) -> None:
        if log:
            print(f"worker {claimant.name}: {time.monotonic() - t0:.1f} s: ran {counts['asked']} trials "
                  f"({counts['trained']} trained, {counts.get('stopped', 0)} of them stopped at a rung, "
                  f"{counts['infeasible']} over budget, {counts['failed']} failed)", file=sys.stderr, flush=True)

    # K, not study.ask_batch: a worker claims only what it fine-tunes in one call, so a killed
    # worker loses the fewest trials (several workers are not reproducible run to run anyway);
    # poll often while others train: waiting a whole heartbeat interval kept a finished
    # study's workers alive up to 30 s after the last trial ended
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    ran = run_trials(study, storage, ctx, claimant, n_trials, batch or ctx.engine.k, max_trials=max_trials,
                     on_batch=report, idle_poll=min(IDLE_POLL_S, heartbeat_interval), deadline=deadline)
    done = finished_count(study.get_trials(deepcopy=False))
    if log and past(deadline) and done < n_trials:
        print(f"worker {claimant.name}: --timeout {timeout:g} s passed; the study holds {done} of its {n_trials} "
              "finished trials, for other workers or a rerun", file=sys.stderr, flush=True)
    return ran
