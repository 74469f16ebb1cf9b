"""Multi-fidelity search at equal time (issue 16.1): the same lenet300/digits search with
--pruner none, sha and hyperband, each given the same seconds after its set-up (baseline,
sensitivity, compiles), interleaved so that load from other processes falls on all of them.
The clock is wall time, or with --clock cpu this process's CPU time (every thread), which
other processes on a shared machine disturb far less.

Per run: trials finished, trained, stopped at a rung, the fine-tune steps spent; the
hypervolume of the feasible front (quality, latency, memory) in one fixed box for every run
(quality from a perfect score down to 10 points below the baseline's validation quality, costs from the
smallest any plan reaches up to the dense model's), and the best compression ratio within
0.5 and 1 point of the baseline's validation quality. Printed, with the median and range per
pruner over the seeds, and saved to bench/out/bench_pruner.json.

    python -m bench.bench_pruner --seconds 20 --steps 600 --seeds 0,1 [--clock cpu]      # the defaults
    python -m bench.bench_pruner --seconds 60 --clock cpu --steps 1000 --seeds 3,4,5    # README
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from search.api import make_spec, search
from search.compression.plan import dense_plan, stack_plans
from search.cost import budget as B
from search.cost.roofline import price
from search.engine.config import FinetuneConfig
from search.report import pareto
from search.report.view import pareto_frame
from search.study.loop import Claimant, run_trials
from search.study.spec import StudySpec
from search.study.workers import context_from_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
OUT = Path(__file__).parent / "out"
QUALITY_SPAN = 0.10  # the box's quality axis ends 10 points below the baseline's validation quality
BATCH = 4  # trials asked together (search's default on this CPU)


def run_one(pruner: str, seed: int, seconds: float, steps: int, results_dir: str, clock=time.perf_counter) -> dict:
    """One search on a fresh in-memory study, given `seconds` of trials after its set-up
    (on `clock`; the last batch may run past them)."""
    spec = make_spec(model="lenet300", dataset="digits", profile="mobile-cpu", n_trials=100_000, seed=seed,
                     finetune=FinetuneConfig(steps=steps, seed=seed), pruner=pruner)
    storage = optuna.storages.InMemoryStorage()
    study = search(spec, storage, results_dir, study_name=f"{pruner}-{seed}", run=False)
    ctx = context_from_study(study, results_dir)
    ctx.engine.run([dense_plan(len(ctx.layers))])  # every function compiled before the clock starts
    claimant = Claimant(StudySpec.of_study(study), joined=len(study.get_trials(deepcopy=False)))
    t0, c0 = time.perf_counter(), clock()
    while clock() - c0 < seconds:
        run_trials(study, storage, ctx, claimant, spec.n_trials, BATCH, max_trials=BATCH)
    wall, spent = time.perf_counter() - t0, clock() - c0
    return {"pruner": pruner, "seed": seed, "wall_s": wall, "clock_s": spent, **_measure(study, ctx, steps)}


def _measure(study: optuna.Study, ctx, steps: int) -> dict:
    trials = study.get_trials(deepcopy=False)
    stopped = [t for t in trials if t.user_attrs.get("stopped_at") is not None]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    base = float(study.user_attrs["baseline"]["val_metric"])
    front = pareto_frame(study)
    dense = B.costs_at(price(ctx.profile, ctx.layers, stack_plans([dense_plan(len(ctx.layers))])), 0)
    low = study.user_attrs["min_costs"]
    ideal = np.array([-1.0, low["latency_ms"], low["memory_kb"]])  # quality: a perfect score
    ref = np.array([-(base - QUALITY_SPAN), dense["latency_ms"], dense["memory_kb"]])
    loss = np.c_[-front["quality"].to_numpy(float), front["latency_ms"].to_numpy(float),
                 front["memory_kb"].to_numpy(float)]
    hv = pareto.hypervolume(loss, ref, ideal) if len(front) else 0.0

    def best(points: float) -> float | None:
        ok = front[front["quality"] >= base - points / 100 - 1e-9]
        return float(ok["compression_ratio"].max()) if len(ok) else None

    return {"trials": len(trials), "complete": len(complete), "stopped": len(stopped),
            "over_budget": sum(1 for t in trials if t.state == TrialState.PRUNED and t.user_attrs.get("quality") is None),
            "finetune_steps_spent": int(len(complete) * steps + sum(t.user_attrs["stopped_at"] for t in stopped)),
            "front": len(front), "hypervolume": hv, "baseline_val": base,
            "front_points": front[["trial", "quality", "latency_ms", "memory_kb", "compression_ratio"]].to_dict("records"),
            "best_ratio_0.5pt": best(0.5), "best_ratio_1pt": best(1.0)}


def _stat(values: list) -> dict:
    v = [x for x in values if x is not None]
    return {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v))} if v else {"median": None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="time of trials per run (after set-up)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="what --seconds counts: wall time, or this process's CPU time (a shared machine)")
    ap.add_argument("--steps", type=int, default=600, help="--finetune-steps of every trial")
    ap.add_argument("--seeds", default="0,1", help="comma list of seeds (sampler, data split, fine-tuning)")
    ap.add_argument("--pruners", default="none,sha,hyperband", help="comma list of --pruner values to compare")
    ap.add_argument("--results-dir", default="results", help="where the baseline cache lives")
    ap.add_argument("--out", default=str(OUT / "bench_pruner.json"), help="the JSON file written")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    pruners = [p.strip() for p in args.pruners.split(",")]
    runs = []
    for seed in seeds:  # interleaved: a burst of load from other processes hits every pruner alike
        for p in pruners:
            r = run_one(p, seed, args.seconds, args.steps, args.results_dir,
                        time.process_time if args.clock == "cpu" else time.perf_counter)
            runs.append(r)
            print(f"{p:9s} seed {seed}: {r['trials']:3d} trials ({r['complete']} complete, {r['stopped']} stopped, "
                  f"{r['over_budget']} over budget) in {r['clock_s']:.1f} s {args.clock} ({r['wall_s']:.1f} s wall), "
                  f"{r['finetune_steps_spent']} steps; "
                  f"front {r['front']}, hypervolume {r['hypervolume']:.4f}, best ratio within 0.5 pt "
                  f"{r['best_ratio_0.5pt'] or float('nan'):.1f}x, within 1 pt {r['best_ratio_1pt'] or float('nan'):.1f}x",
                  flush=True)
    summary = {p: {key: _stat([r[key] for r in runs if r["pruner"] == p])
                   for key in ("hypervolume", "best_ratio_0.5pt", "best_ratio_1pt", "trials", "finetune_steps_spent")}
               for p in pruners}
    for p, s in summary.items():
        hv, r05 = s["hypervolume"], s["best_ratio_0.5pt"]
        print(f"{p:9s}: hypervolume median {hv['median']:.4f} [{hv['min']:.4f}, {hv['max']:.4f}]; best ratio within "
              f"0.5 pt median {r05['median']}; trials median {s['trials']['median']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summary}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
