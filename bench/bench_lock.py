"""Load on one shared PostgreSQL study: many workers whose trials cost almost nothing, a few
SIGKILLed at random moments. What the study lock costs, and that nothing is lost or doubled.

`hwcompress search` creates the study (lenet300 on digits, --finetune-steps 0: a trial is
pricing, one evaluation and its storage writes), its trial budget is raised to --trials, and
--workers `hwcompress worker` processes (K=1: one trial per claim, the most claims per trial)
run it. Each worker runs in-process behind a thin wrapper that times search.study.storage's
study_lock: the wait (asking for it until holding it, pool checkout included) and the hold
(holding it until release). Once the study is 20-70 % done, at --kills random progress points,
a random live worker is SIGKILLed wherever it is (training, telling, waiting, inside the lock).

Reported: trials per second (steady: the middle 80 % of trial ends), the longest and the
p50/p99 lock wait, the lock hold (wall) and, per claim that asked a trial, the claiming
thread's CPU time and SQL statements under the lock (what a claim costs on a machine with a
core free), the lock's busy share of the wall time, the most PostgreSQL connections open at
once, and the checks: every trial number stored once, none RUNNING or WAITING at the end,
exactly --trials trials counted toward the budget, every killed trial retried exactly once,
no trial failed by heartbeat but a killed worker's, every surviving worker exited 0. A study
that stops progressing (a trial RUNNING that nobody will finish) ends the run after STALL_S.

Needs PostgreSQL: --storage, or HWCOMPRESS_TEST_POSTGRES (`source .ci/services.sh`).
Writes bench/out/bench_lock.json (per-worker lock logs under bench/out/lock-logs/).

    source .ci/services.sh && python -m bench.bench_lock --workers 16 --trials 120 --kills 3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
HEARTBEAT = 1  # seconds between heartbeats: a killed worker's trial goes stale quickly ...
GRACE = 30  # ... but not falsely: 10 s was too short for 16 workers on a 2-core machine at load 20
STALL_S = 180  # no trial finished for this long (after the first): the study is stuck, stop


# ---------------------------------------------------------------------------------------
# the child: one `hwcompress worker` with its study lock timed


def child(log_path: str, worker_args: list[str]) -> int:
    """Run `hwcompress worker worker_args` in this process, logging every study-lock use to
    log_path as JSON lines: {"ev": "acq", "t", "wait"} on acquiring, {"ev": "rel", "t",
    "hold", "cpu", "sql", "asked"} on release (a worker killed inside the lock leaves an
    "acq" without "rel")."""
    import threading

    import optuna
    import sqlalchemy

    from search import cli
    from search.study import storage

    real = storage.study_lock
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 (open for the process; line-buffered: a SIGKILL loses at most a partial line)
    main_thread = threading.get_ident()
    statements = [0]  # SQL statements this worker's main thread sent (heartbeat threads not counted)

    def count(*_args) -> None:
        if threading.get_ident() == main_thread:
            statements[0] += 1

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", count)
    asks = [0]  # trials asked: a claim that asks none is a worker polling while others train
    real_ask = optuna.Study.ask

    def counted_ask(self, *args, **kwargs):
        asks[0] += 1
        return real_ask(self, *args, **kwargs)

    optuna.Study.ask = counted_ask

    @contextlib.contextmanager
    def timed_lock(*args, **kwargs):
        t0 = time.perf_counter()
        with real(*args, **kwargs):
            t1, cpu, sql, asked = time.perf_counter(), time.thread_time(), statements[0], asks[0]
            log.write(json.dumps({"ev": "acq", "t": time.time(), "wait": t1 - t0}) + "\n")
            try:
                yield
            finally:
                # hold: wall time holding the lock; cpu: of it, this thread's CPU time (what a
                # quiet machine would spend too); sql: statements sent while holding it
                log.write(json.dumps({"ev": "rel", "t": time.time(), "hold": time.perf_counter() - t1,
                                      "cpu": time.thread_time() - cpu, "sql": statements[0] - sql,
                                      "asked": asks[0] - asked}) + "\n")

    storage.study_lock = timed_lock  # every caller looks it up on the module at each claim
    return cli.main(["worker", *worker_args])


# ---------------------------------------------------------------------------------------
# the parent: create the study, start the workers, kill some, check and report


def _create(url: str, name: str, results: str, trials: int) -> None:
    from search.study import storage as S
    from search.study.workers import worker_env

    cmd = [sys.executable, "-m", "search.cli", "search", "--model", "lenet300", "--dataset", "digits",
           "--profile", "mobile-cpu", "--finetune-steps", "0", "--no-warm-start", "--quiet",
           "--study", name, "--storage", url, "--trials", "1", "--results-dir", results]
    subprocess.run(cmd, check=True, env=worker_env(), cwd=ROOT)
    shutil.rmtree(Path(results, name), ignore_errors=True)  # its one-trial report: not what is measured
    study = S.load_study(name, S.open_storage(url))
    study.set_user_attr("spec", {**study.user_attrs["spec"], "n_trials": trials})


def _spawn(n: int, name: str, url: str, results: str, logs: Path, grace: int) -> list[subprocess.Popen]:
    from search.study.workers import worker_env

    env = worker_env({"JAX_COMPILATION_CACHE_DIR": str(Path(results, "cache", "xla").resolve()),
                      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    args = ["--study", name, "--storage", url, "--results-dir", results, "--k", "1",
            "--heartbeat", str(HEARTBEAT), "--grace", str(grace)]
    procs = []
    for i in range(n):
        with open(logs / f"worker-{i}.log", "ab") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.bench_lock", "--child", str(logs / f"lock-{i}.jsonl"), "--", *args],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def _drive(study, procs: list[subprocess.Popen], n_trials: int, kills: int, rng: random.Random,
           count_connections) -> tuple[list[dict], int, bool]:
    """Poll the study until every worker has exited; SIGKILL a random live worker at each of
    `kills` random progress points. Returns (what each kill hit, most connections seen,
    whether it stalled: no trial finished for STALL_S seconds while workers still ran)."""
    from optuna.trial import TrialState

    from search.study.create import finished_count

    points = sorted(rng.uniform(0.2, 0.7) for _ in range(kills))
    killed: list[dict] = []
    most_connections = 0
    first = finished_count(study.get_trials(deepcopy=False))  # the study's own first trial
    last_done, last_change = first, time.monotonic()
    while any(p.poll() is None for p in procs):
        trials = study.get_trials(deepcopy=False)
        most_connections = max(most_connections, count_connections())
        done = finished_count(trials)
        if done != last_done:
            last_done, last_change = done, time.monotonic()
        elif done > first and time.monotonic() - last_change > STALL_S:  # (start-up may take minutes)
            # the workers wait for a trial that never ends
            print(f"bench_lock: no trial finished in {STALL_S} s at {done}/{n_trials}: stalled; stopping",
                  flush=True)
            return killed, most_connections, True
        if points and done >= points[0] * n_trials:
            live = [p for p in procs if p.poll() is None]
            victim = rng.choice(live)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            worker = f"{socket.gethostname()}:{victim.pid}"
            holding = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if t.user_attrs.get("worker") == worker]
            killed.append({"at_done": done, "worker": worker, "index": procs.index(victim),
                           "running_trials": holding})
            print(f"bench_lock: {done}/{n_trials} done: SIGKILL worker {procs.index(victim)} "
                  f"({worker}), running trials {holding}", flush=True)
            points.pop(0)
        time.sleep(0.2)
    return killed, most_connections, False


def _lock_events(logs: Path, n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        path = logs / f"lock-{i}.jsonl"
        events = []
        for line in (path.read_text().splitlines() if path.exists() else []):
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by SIGKILL
                events.append(json.loads(line))
        out.append(events)
    return out


def _check(study, n_trials: int, killed: list[dict], procs: list[subprocess.Popen]) -> dict:
    """Every trial stored once, none left open, the budget exactly met, each kill retried once."""
    from optuna.trial import TrialState

    from search.study.create import finished_count

    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    workers = {f"{socket.gethostname()}:{p.pid}" for p in procs}
    victims = {k["index"] for k in killed}
    retries: dict[int, list[int]] = {}
    for t in trials:
        if "failed_trial" in t.system_attrs:
            retries.setdefault(t.system_attrs["failed_trial"], []).append(t.number)
    stale = [t.number for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("fail_reason")]
    checks = {
        "stored_once": numbers == list(range(len(trials))),
        "none_open": not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)],
        "budget_exact": finished_count(trials) == n_trials,
        "killed_trials_retried_once": all(len(retries.get(n, [])) == 1 for n in stale),
        "every_trial_by_a_worker": {t.user_attrs.get("worker") for t in trials[1:]} <= workers,
        "survivors_exit_0": all(p.returncode == 0 for i, p in enumerate(procs) if i not in victims),
        # a trial fails by heartbeat only when its worker was killed (a late beat would show here)
        "only_killed_trials_went_stale": (
            {n for k in killed for n in k["running_trials"]} <= set(stale)
            and {trials[n].user_attrs.get("worker") for n in stale} <= {k["worker"] for k in killed} | {None}
        ),
    }
    # RUNNING at the end: no worker left will finish them (no "worker": its claimant died
    # between asking for it and recording its name and first heartbeat, inside the lock)
    stuck = {t.number: t.user_attrs.get("worker") for t in trials if t.state == TrialState.RUNNING}
    return {"rows": len(trials), "counted": finished_count(trials), "stale_failed": stale, "stuck_running": stuck,
            "retries": {str(k): v for k, v in sorted(retries.items())},
            "states": {s.name: sum(t.state == s for t in trials) for s in TrialState
                       if any(t.state == s for t in trials)},
            "ok": all(checks.values()), **checks}


def _stats(study, events: list[list[dict]], t_start: float, t_end: float) -> dict:
    trials = [t for t in study.get_trials(deepcopy=False)[1:] if t.datetime_complete is not None]
    ends = np.sort([t.datetime_complete.timestamp() for t in trials])
    lo, hi = ends[int(0.1 * len(ends))], ends[int(0.9 * len(ends)) - 1]
    steady = (int(0.9 * len(ends)) - int(0.1 * len(ends)) - 1) / max(hi - lo, 1e-9)
    durations = np.array([(t.datetime_complete - t.datetime_start).total_seconds() for t in trials])
    acq = sorted((e for ev in events for e in ev if e["ev"] == "acq"), key=lambda e: e["t"])
    rel = sorted((e for ev in events for e in ev if e["ev"] == "rel"), key=lambda e: e["t"])
    waits = np.array([e["wait"] for e in acq])
    holds = np.array([e["hold"] for e in rel])
    claims = [e for e in rel if e["asked"]]  # not the polls of workers waiting for others' trials
    cpu = np.array([e["cpu"] for e in claims])
    sql = np.array([e["sql"] for e in claims])
    tenth = max(1, len(rel) // 10)
    busy = float(holds.sum())
    ms = lambda x: round(float(x) * 1000, 2)
    return {
        "trials_per_second_steady": round(float(steady), 2),
        "trials_per_second_wall": round(len(trials) / (t_end - t_start), 2),
        "wall_seconds": round(t_end - t_start, 1),
        "trial_seconds_median": round(float(np.median(durations)), 3),
        "lock_acquisitions": len(acq),
        "lock_wait_ms": {"max": ms(waits.max()), "p99": ms(np.quantile(waits, 0.99)),
                         "p50": ms(np.median(waits))},
        "lock_hold_ms": {"mean": ms(holds.mean()), "p99": ms(np.quantile(holds, 0.99)), "max": ms(holds.max()),
                         "mean_first_10pct": ms(holds[:tenth].mean()), "mean_last_10pct": ms(holds[-tenth:].mean())},
        # the lock held this share of the time from the first acquisition to the last release
        "lock_busy_share": round(busy / max(rel[-1]["t"] - acq[0]["t"], 1e-9), 3),
        # what a claim that asks a trial costs wherever it runs: CPU under the lock (its own
        # thread's, not inflated by waiting for a core) and SQL statements (round trips)
        "claims": len(claims), "idle_polls": len(rel) - len(claims),
        "claim_cpu_ms": {"median": ms(np.median(cpu)), "p90": ms(np.quantile(cpu, 0.9)),
                         "median_first_20pct": ms(np.median(cpu[:len(cpu) // 5])),
                         "median_last_20pct": ms(np.median(cpu[-(len(cpu) // 5):]))},
        "claim_sql_statements": {"median": float(np.median(sql)), "max": int(sql.max())},
        "killed_inside_lock": sum(1 for ev in events if ev and ev[-1]["ev"] == "acq"),
    }


def measure(url: str, workers: int, trials: int, kills: int, results: str, seed: int, grace: int) -> dict:
    import sqlalchemy

    from search.study import storage as S

    name = f"lock-{workers}w-{int(time.time())}"
    logs = OUT / "lock-logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    _create(url, name, results, trials)
    study = S.load_study(name, S.open_storage(url))
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    def count_connections() -> int:
        with engine.connect() as con:
            return int(con.execute(sqlalchemy.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")).scalar())

    t0 = time.time()
    procs = _spawn(workers, name, url, results, logs, grace)
    try:
        killed, most_connections, stalled = _drive(study, procs, trials, kills, random.Random(seed),
                                                   count_connections)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    t1 = time.time()
    codes = [p.returncode for p in procs]
    events = _lock_events(logs, workers)
    for k in killed:  # where the kill landed: inside the lock (an "acq" with no "rel") or not
        k["inside_lock"] = bool(events[k["index"]]) and events[k["index"]][-1]["ev"] == "acq"
    return {
        "study": name, "workers": workers, "trials": trials, "kills": kills, "seed": seed,
        "finetune_steps": 0, "heartbeat_s": HEARTBEAT, "grace_s": grace,
        "exit_codes": sorted(codes), "killed": killed, "stalled": stalled,
        "most_pg_connections": most_connections,
        **_stats(study, events, t0, t1),
        "check": _check(study, trials, killed, procs),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage", default=os.environ.get("HWCOMPRESS_TEST_POSTGRES"))
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--trials", type=int, default=300, help="the study's trial budget")
    p.add_argument("--kills", type=int, default=3, help="workers SIGKILLed at random moments")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments and victims")
    p.add_argument("--grace", type=int, default=GRACE, help="seconds without a heartbeat before a trial is dead")
    p.add_argument("--results-dir", default=str(ROOT / "results"))
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # --child LOCK_LOG -- WORKER_ARGS...: one timed worker (_spawn)
        return child(argv[1], argv[3:])
    args = p.parse_args(argv)
    if not args.storage:
        print("bench_lock: no PostgreSQL URL (pass --storage or `source .ci/services.sh`); skipped")
        return 0
    sys.path.insert(0, str(ROOT))
    r = measure(args.storage, args.workers, args.trials, args.kills, args.results_dir, args.seed, args.grace)
    print(json.dumps({k: v for k, v in r.items() if k not in ("check",)}, indent=1))
    print("check:", json.dumps(r["check"], indent=1))
    OUT.mkdir(parents=True, exist_ok=True)
    info = {"cpus": os.cpu_count(), "load_average_after": [round(x, 1) for x in os.getloadavg()],
            "command": "python -m bench.bench_lock " + " ".join(argv),
            **r}
    (OUT / "bench_lock.json").write_text(json.dumps(info, indent=2))
    return 0 if r["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
