"""Trials per hour with 1 and 2 workers on one PostgreSQL study (this machine).

For each worker count: `hwcompress search` creates a fresh study (one trial, which also
trains or loads the baseline), its trial budget is raised by --trials, and N local
`hwcompress worker` processes run those trials. Two rates are reported:
  steady: trials run by the workers / (last trial end - first trial start), start-up excluded
  wall:   the same trials / wall time from spawning the workers to the last one exiting
Needs a PostgreSQL URL: --storage, or HWCOMPRESS_TEST_POSTGRES (`source .ci/services.sh`).
Writes bench/out/scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def _create(url: str, name: str, results: str, steps: int, trials: int) -> None:
    from search.study import storage as S

    cmd = [sys.executable, "-m", "search.cli", "search", "--model", "lenet300", "--dataset", "digits",
           "--profile", "mobile-cpu", "--finetune-steps", str(steps), "--no-warm-start", "--quiet",
           "--study", name, "--storage", url, "--trials", "1", "--results-dir", results]
    from search.study.workers import worker_env

    subprocess.run(cmd, check=True, env=worker_env(), cwd=ROOT)
    study = S.load_study(name, S.open_storage(url))
    study.set_user_attr("spec", {**study.user_attrs["spec"], "n_trials": 1 + trials})


def measure(url: str, workers: int, trials: int, steps: int, results: str) -> dict:
    """Run `trials` trials with `workers` local workers; rates in trials per hour."""
    from optuna.trial import TrialState

    from search.study import storage as S
    from search.study import workers as W

    name = f"scaling-{workers}w-{int(time.time())}"
    _create(url, name, results, steps, trials)
    t0 = time.time()
    procs = W.spawn_workers(workers, name, url, results, log_dir=OUT / "scaling-logs" / name)
    codes = W.wait_workers(procs)
    wall = time.time() - t0
    if codes:
        raise RuntimeError(f"a worker failed (exit {codes}); see {OUT / 'scaling-logs' / name}")
    done = [t for t in S.load_study(name, S.open_storage(url)).get_trials()
            if t.user_attrs.get("worker") and t.state != TrialState.RUNNING]
    start = min(t.datetime_start for t in done).timestamp()
    end = max(t.datetime_complete for t in done).timestamp()
    by_worker: dict[str, int] = {}
    for t in done:
        by_worker[t.user_attrs["worker"]] = by_worker.get(t.user_attrs["worker"], 0) + 1
    return {
        "workers": workers,
        "trials": len(done),
        "finetune_steps": steps,
        "steady_seconds": round(end - start, 2),
        "wall_seconds": round(wall, 2),
        "steady_trials_per_hour": round(len(done) / (end - start) * 3600, 1),
        "wall_trials_per_hour": round(len(done) / wall * 3600, 1),
        "trials_by_worker": sorted(by_worker.values(), reverse=True),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage", default=os.environ.get("HWCOMPRESS_TEST_POSTGRES"))
    p.add_argument("--trials", type=int, default=24, help="trials per worker count")
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--results-dir", default=str(ROOT / "results"))
    args = p.parse_args(argv)
    if not args.storage:
        print("bench_scaling: no PostgreSQL URL (pass --storage or `source .ci/services.sh`); skipped")
        return 0
    sys.path.insert(0, str(ROOT))
    rows = [measure(args.storage, int(n), args.trials, args.finetune_steps, args.results_dir)
            for n in args.workers.split(",")]
    print(f"{'workers':>7} {'trials':>6} {'steady s':>9} {'wall s':>8} {'steady /h':>10} {'wall /h':>8}  per worker")
    for r in rows:
        print(f"{r['workers']:>7} {r['trials']:>6} {r['steady_seconds']:>9} {r['wall_seconds']:>8} "
              f"{r['steady_trials_per_hour']:>10} {r['wall_trials_per_hour']:>8}  {r['trials_by_worker']}")
    OUT.mkdir(parents=True, exist_ok=True)
    info = {"cpus": os.cpu_count(), "note": "CPU shared with other processes while measured", "rows": rows}
    (OUT / "scaling.json").write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
