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
from pathlib import Path

from search import storage as storage_mod

# where `search` and `models` live, so a child finds them even when not pip-installed
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
# seconds a worker gets to finish its trial after SIGINT before it is terminated
STOP_GRACE = 60.0


def worker_command(
    study: str,
    storage_url: str,
    results_dir: str | os.PathLike = "results",
    *,
    heartbeat_interval: int = storage_mod.HEARTBEAT_INTERVAL,
    grace_period: int = storage_mod.GRACE_PERIOD,
    max_trials: int | None = None,
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
    env: dict[str, str] | None = None,
    log_dir: str | os.PathLike | None = None,
) -> list[subprocess.Popen]:
    """Start `n` worker processes on one study and return them, running.

    `storage_url` None means the default SQLite file under `results_dir`. With `log_dir`,
    worker i writes its output to log_dir/worker-i.log; otherwise it inherits ours.
    """
    url = storage_url or storage_mod.default_url(results_dir)
    cmd = worker_command(
        study, url, results_dir,
        heartbeat_interval=heartbeat_interval, grace_period=grace_period, max_trials=max_trials,
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
