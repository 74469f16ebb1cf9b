"""Adaptive BN (EagleEye, Li et al., ECCV 2020): does a plan's quality before fine-tuning predict
its quality after, with and without re-estimating BatchNorm statistics after compression?

    PYTHONPATH=. .venv/bin/python -m bench.bench_adaptive_bn [--model resnet20] [--dataset digits]
        [--plans 16] [--steps 60]

For `--plans` random plans (channel or unstructured pruning of every group at 20-80%, 4- to
8-bit weights and activations; seeded), it evaluates each compressed plan on the validation
split before fine-tuning and again after `--steps` fine-tuning steps, once with adaptive BN
(FinetuneConfig.adaptive_bn=True, the default) and once with the dense model's statistics.
Reports Spearman's rank correlation of before with after in each mode (EagleEye's claim:
adaptive BN makes the cheap pre-fine-tuning quality a far better judge of candidates) and the
mean qualities. Saves bench/out/bench_adaptive_bn.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import models
from models.train import train_baseline
from search.compression import plan as P
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine

OUT = Path(__file__).parent / "out"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties by average rank)."""
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for x in np.unique(v):  # average ranks of ties
            r[v == x] = r[v == x].mean()
        return r
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def random_plans(layers, n: int, seed: int) -> list[P.Plan]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = len(layers)
        gran = rng.choice([P.CHANNEL, P.UNSTRUCTURED])
        out.append(P.make_plan(rng.uniform(0.2, 0.8, L).round(2), gran, rng.choice([4, 5, 6, 8], L),
                               rng.choice([6, 8], L)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--plans", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="results/cache")
    args = ap.parse_args()
    task = models.get_task(args.model, args.dataset)
    variables, info = train_baseline(task, cache_dir=args.cache_dir)
    print(f"{args.model}/{args.dataset} baseline: val {info['val_metric']:.4f}")
    result = {"model": args.model, "dataset": args.dataset, "plans": args.plans, "steps": args.steps,
              "baseline_val": info["val_metric"], "modes": {}}
    plans = None
    for adaptive in (True, False):
        t0 = time.perf_counter()
        engine = Engine(task, variables, FinetuneConfig(steps=args.steps, k=1, adaptive_bn=adaptive, seed=args.seed))
        plans = plans or random_plans(engine.layers, args.plans, args.seed)
        before = engine.evaluate(plans).metric
        after = engine.run(plans).metric
        ok = np.isfinite(before) & np.isfinite(after)
        rho = spearman(before[ok], after[ok])
        mode = "adaptive_bn" if adaptive else "dense_bn"
        result["modes"][mode] = {"spearman_before_after": rho, "mean_before": float(np.mean(before[ok])),
                                 "mean_after": float(np.mean(after[ok])), "before": before.tolist(),
                                 "after": after.tolist(), "seconds": time.perf_counter() - t0}
        print(f"{mode:12s} rho(before, after) {rho:+.3f}  mean before {np.mean(before[ok]):.4f}  "
              f"after {np.mean(after[ok]):.4f}  ({time.perf_counter() - t0:.0f} s)")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_adaptive_bn.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
