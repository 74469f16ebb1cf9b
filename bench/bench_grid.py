"""Low-bit weight grids: the bound qmax + 0.5 (qwix) against qmax, at 2, 3 and 4 bits.

    PYTHONPATH=. .venv/bin/python -m bench.bench_grid [--model lenet5] [--dataset fashion-mnist]
        [--steps 300] [--seeds 0,1,2] [--bits 2,3,4,8]

The same baseline (results/cache), the same batches and the same fine-tuning (Adam 5e-4,
`--steps` steps, activations at 8 bits) for plans that quantize every layer's weights at b
bits, once with each grid: scale = max|w| / qmax (the restricted symmetric grid, what every
width used before) and scale = max|w| / (qmax + 0.5) (search.compression.quant's bound up to
EXTENDED_BOUND_MAX_BITS). Each grid runs in its own process (the bound is read when the
engine's functions are traced). Reports test accuracy before and after fine-tuning, the
fraction of weights on code 0, mean and range over the seeds; saves bench/out/bench_grid.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def _run(bound_max_bits: int, args: dict) -> list[dict]:
    """One grid: every (bits, seed) plan, fine-tuned and tested; runs in a fresh process."""

    import models
    from models.train import train_baseline
    from search.compression import quant
    from search.compression.layers import get_path
    from search.compression.plan import make_plan
    from search.engine.config import FinetuneConfig
    from search.engine.finetune import Engine

    quant.EXTENDED_BOUND_MAX_BITS = bound_max_bits  # before anything is traced
    task = models.get_task(args["model"], args["dataset"])
    variables, _ = train_baseline(task, cache_dir=args["cache_dir"])
    rows = []
    for seed in args["seeds"]:
        engine = Engine(task, variables, FinetuneConfig(steps=args["steps"], k=1, seed=seed))
        n = len(engine.layers)
        for bits in args["bits"]:
            plan = make_plan(np.zeros(n), 0, bits, 8)
            before = engine.run(plan, split="test", finetune=False, return_models=True)
            after = engine.run(plan, split="test")
            params = before.models[0].params
            zero = [float(np.mean(np.asarray(get_path(params, l.path)["kernel"]) == 0)) for l in engine.layers]
            rows.append({"bound_max_bits": bound_max_bits, "bits": bits, "seed": seed,
                         "before": float(before.metric[0]), "after": float(after.metric[0]),
                         "zero_fraction": dict(zip((l.name for l in engine.layers), zero))})
            print(f"  bound qmax{' + 0.5' if bits <= bound_max_bits else ''}  w{bits}a8 seed {seed}: "
                  f"before {rows[-1]['before']:.4f} after {rows[-1]['after']:.4f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--cache-dir", default="results/cache")
    a = ap.parse_args(argv)
    args = {"model": a.model, "dataset": a.dataset, "steps": a.steps, "cache_dir": a.cache_dir,
            "seeds": [int(s) for s in a.seeds.split(",")], "bits": [int(b) for b in a.bits.split(",")]}
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    rows = []
    for bound_max_bits in (0, 8):  # 0: qmax at every width; 8: qmax + 0.5 at every width measured
        print(f"grid bound {'qmax' if bound_max_bits == 0 else 'qmax + 0.5'}:", flush=True)
        with ctx.Pool(1) as pool:
            rows += pool.apply(_run, (bound_max_bits, args))
    table = []
    for bits in args["bits"]:
        for bound_max_bits, name in ((0, "qmax"), (8, "qmax + 0.5")):
            rs = [r for r in rows if r["bits"] == bits and r["bound_max_bits"] == bound_max_bits]
            after, before = np.array([r["after"] for r in rs]), np.array([r["before"] for r in rs])
            zero = float(np.mean([np.mean(list(r["zero_fraction"].values())) for r in rs]))
            table.append({"bits": bits, "bound": name, "after_mean": float(after.mean()),
                          "after_min": float(after.min()), "after_max": float(after.max()),
                          "before_mean": float(before.mean()), "zero_fraction_mean": zero})
            print(f"w{bits}a8 bound {name:10s} test after {after.mean():.4f} [{after.min():.4f}, {after.max():.4f}]  "
                  f"before {before.mean():.4f}  weights on code 0: {zero:.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "bench_grid.json"
    path.write_text(json.dumps({**args, "rows": rows, "table": table, "seconds": time.perf_counter() - t0}, indent=1))
    print(f"saved {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
