"""Fine-tune throughput per plan (plan-steps/s, FLOP/s) for each K and loop driver.

For lenet300, lenet5 and resnet20 on Fashion-MNIST (issue 15's table):

    PYTHONPATH=. .venv/bin/python -m bench.bench_steps [--models lenet300,lenet5,resnet20]
        [--ks 1,2,4] [--loops python,fused] [--steps 40] [--rounds 3] [--budget-s S]
        [--data-dir DIR] [--out bench/out/bench_steps.json]

Every cell is the engine's own jitted functions (search.engine.finetune.Engine with
FinetuneConfig k=K, loop=...), fine-tuning K random plans (every layer pruned 20-80%,
unstructured / channel / N:M, uniform 4-bit weights, 8-bit activations) on the dataset's
training split: one warm-up run of `--steps` steps (compiles), then the best of `--rounds`
timed runs of `--steps` steps each. "python" calls the jitted step once per step; "fused"
runs the steps inside one jitted `lax.while_loop` per chunk (Engine._run_fused). FLOP/s
counts the dense model's multiply-accumulates, 2 FLOPs each, times 3 for the forward and
backward passes, per example of the batch: what the hardware would have to do unpruned.

The default Ks are 1, 2, 4 on a CPU and 1, 8, 32, 128 on an accelerator. Batches: 256 for
lenet300 and 128 for the CNNs, on Fashion-MNIST (28x28). resnet20 is the zoo's CIFAR-style
depth-20 network at width 1 (16/32/64 channels); on a 2-core CPU a step of it takes
about a second, so --steps 10 is enough there. Saves JSON; prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import models
from search.compression.plan import CHANNEL, NM, UNIFORM, UNSTRUCTURED, make_plan
from search.engine.config import LOOPS, FinetuneConfig
from search.engine.finetune import Engine

OUT = Path(__file__).parent / "out"
BATCH = {"lenet300": 256, "lenet5": 128, "resnet20": 128, "mobilenetv2": 128}


def random_plans(n: int, num_layers: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [make_plan(rng.uniform(0.2, 0.8, num_layers), rng.choice([UNSTRUCTURED, CHANNEL, NM], num_layers),
                      4, 8, UNIFORM) for _ in range(n)]


def measure(engine: Engine, steps: int, rounds: int) -> float:
    """Seconds per step of one group of K plans (best of `rounds` runs of `steps` steps)."""
    plans = engine._check_plans(random_plans(engine.k, len(engine.layers)))
    g = engine._start(engine._slice(plans, 0))
    best = np.inf
    for r in range(rounds + 1):  # round 0 compiles
        t0 = time.perf_counter()
        engine._train(g, g.step + steps)
        jax.block_until_ready(g.state)
        if r:
            best = min(best, (time.perf_counter() - t0) / steps)
    return float(best)


def bench_model(model: str, ks, loops, steps: int, rounds: int, data_dir: str | None,
                deadline: float = np.inf) -> list[dict]:
    """One row per (K, loop), K outermost; no new cell starts after `deadline` (time.time())."""
    task = models.get_task(model, "fashion-mnist", data_dir=data_dir)
    batch = BATCH[model]
    variables = task.init_variables()  # every collection (BatchNorm statistics); the values do not matter here
    rows = []
    for k in ks:
        for loop in loops:
            if time.time() > deadline:
                print(f"{model:9s} {loop:6s} K={k:<4d} skipped: --budget-s spent", flush=True)
                continue
            # steps large enough that no halfway re-estimate or mask update falls in a timed run
            cfg = FinetuneConfig(steps=10 ** 6, batch_size=batch, k=k, loop=loop)
            try:
                eng = Engine(task, variables, cfg)
                per_step = measure(eng, steps, rounds)
            except Exception as e:  # e.g. out of device memory at a large K: record it, go on
                rows.append({"model": model, "batch": batch, "loop": loop, "k": k, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"{model:9s} {loop:6s} K={k:<4d} failed: {type(e).__name__}", flush=True)
                continue
            macs = sum(l.macs for l in eng.layers)
            plan_steps = k / per_step
            flops = 3 * 2 * macs * batch * plan_steps
            rows.append({"model": model, "batch": batch, "loop": loop, "k": k, "seconds_per_step": per_step,
                         "plan_steps_per_s": plan_steps, "flop_per_s": flops, "macs_per_example": macs})
            print(f"{model:9s} {loop:6s} K={k:<4d} {plan_steps:10.1f} plan-steps/s  {flops / 1e9:8.2f} GFLOP/s",
                  flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet300,lenet5,resnet20", help="comma list of zoo models")
    ap.add_argument("--ks", default=None, help="comma list (default 1,2,4 on a CPU, 1,8,32,128 elsewhere)")
    ap.add_argument("--loops", default=",".join(LOOPS), help="comma list of loop drivers (default python,fused)")
    ap.add_argument("--steps", type=int, default=40, help="steps per timed run")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per cell (the best is kept)")
    ap.add_argument("--data-dir", default=None, help="directory with Fashion-MNIST's IDX files (default Debian's)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new cell after this many seconds, models split it evenly (default: no limit)")
    ap.add_argument("--out", default=str(OUT / "bench_steps.json"), help="where the JSON goes")
    args = ap.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    ks = [int(k) for k in (args.ks or ("1,2,4" if cpu else "1,8,32,128")).split(",")]
    rows = []
    t0 = time.time()
    names = args.models.split(",")
    for i, model in enumerate(names):
        # each model its share of what is left, so that a slow one cannot starve the next
        deadline = np.inf if args.budget_s is None else \
            time.time() + (t0 + args.budget_s - time.time()) / (len(names) - i)
        rows += bench_model(model, ks, args.loops.split(","), args.steps, args.rounds, args.data_dir, deadline)
    best = {}
    for r in rows:
        if "plan_steps_per_s" in r and r["plan_steps_per_s"] > best.get(r["model"], {}).get("plan_steps_per_s", 0):
            best[r["model"]] = r
    out = {
        "command": "python -m bench.bench_steps " + " ".join(argv or os.sys.argv[1:]),
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "wall_s": time.time() - t0, "rows": rows,
        "best": {m: {"loop": r["loop"], "k": r["k"], "plan_steps_per_s": r["plan_steps_per_s"]} for m, r in best.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for m, r in best.items():
        print(f"best {m}: {r['loop']} K={r['k']}: {r['plan_steps_per_s']:.0f} plan-steps/s")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
