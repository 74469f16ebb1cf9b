"""Fine-tuning ingredients side by side on the same plans, budget and batches (issue 16):

- `--compare pruning` (item 2): one-shot masks, fixed from the pretrained weights before
  fine-tuning, against gradual pruning, ramped from dense to the plan's ratio on Zhu & Gupta's
  cubic schedule with masks recomputed from the current weights, ending at each of `--ends` of
  the steps (search.engine.schedule). Uniform plans at high sparsity for each granularity, float
  weights and activations, so that only pruning differs.
- `--compare act-ranges` (item 3): calibrated activation ranges against ranges learned with
  the weights (LSQ; quant.fake_quant_act_learned), on plans with 4- and 5-bit activations.
- `--compare retrain` (item 5): the export's retrain of a plan searched with `--steps` steps
  (search.export.retrain.retrain_config: RETRAIN_FACTOR x the steps, cosine), at the search's learning rate
  or RETRAIN_LR_FACTOR x it, with one-shot or gradual pruning, on Deep Compression's per-layer
  ratios (Han et al. 2016, Table 2/3) at 4-bit weights and nearby plans.
- `--compare distill`: the export's default retrain of the same plans, with and without Hinton
  distillation from the dense model (Hinton et al. 2015; FinetuneConfig.distill, at each of
  `--alphas`, temperature 4).
- `--compare retrain-length`: the export's default retrain of the same plans at each of
  `--factors` times `--steps` (search.export.defaults.RETRAIN_FACTOR).

Test accuracy after fine-tuning per seed (batch order), printed and saved to
bench/out/bench_finetune_modes_<compare>.json. FinetuneConfig's defaults for `pruning` and
`act_ranges` are read off these tables.

    PYTHONPATH=. .venv/bin/python -m bench.bench_finetune_modes --compare pruning --models lenet300 --steps 1000 --seeds 0,1 --ends 0.25,0.5,0.75
    PYTHONPATH=. .venv/bin/python -m bench.bench_finetune_modes --compare act-ranges --models lenet5 --steps 300 --seeds 0,1,2
    PYTHONPATH=. .venv/bin/python -m bench.bench_finetune_modes --compare retrain --models lenet300 --steps 1000 --seeds 0,1
    PYTHONPATH=. .venv/bin/python -m bench.bench_finetune_modes --compare retrain --models lenet5 --steps 300 --seeds 0
    PYTHONPATH=. .venv/bin/python -m bench.bench_finetune_modes --compare distill --models lenet300 --steps 1000 --seeds 0,1 --alphas 0.5,0.9
    PYTHONPATH=. .venv/bin/python -m bench.bench_finetune_modes --compare retrain-length --models lenet300 --steps 1000 --seeds 0,1 --factors 5,10,20
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "out"
# (label, ratio, granularity, weight bits, activation bits): the same for every layer
PRUNING_PLANS = (("unstructured 90%", 0.90, "unstructured", 32, 32), ("unstructured 95%", 0.95, "unstructured", 32, 32),
                 ("unstructured 98%", 0.98, "unstructured", 32, 32), ("channel 50%", 0.50, "channel", 32, 32),
                 ("channel 75%", 0.75, "channel", 32, 32), ("2:4", 0.50, "nm", 32, 32), ("1:4", 0.75, "nm", 32, 32))
# --compare retrain, per model: (label, per-layer ratios, per-layer weight bits), float activations;
# the first is Deep Compression's pruning of LeNet-300-100 / LeNet-5 (Han et al. 2016, Tables 2-3)
RETRAIN_PLANS = {
    "lenet300": (("DC 92/91/74% w4", (0.92, 0.91, 0.74), (4, 4, 4)), ("95/90/50% w4", (0.95, 0.90, 0.5), (4, 4, 6)),
                 ("94/90/50% w3", (0.94, 0.90, 0.5), (3, 3, 6)), ("96/92/60% w4", (0.96, 0.92, 0.6), (4, 4, 6))),
    "lenet5": (("DC 66/88/92/81% w5", (0.66, 0.88, 0.92, 0.81), (8, 5, 5, 5)),
               ("50/85/95/80% w4", (0.5, 0.85, 0.95, 0.8), (6, 4, 4, 6)),
               ("60/90/96/80% w3", (0.6, 0.9, 0.96, 0.8), (6, 4, 3, 6)))}
RANGE_PLANS = (("w8a4", 0.0, "unstructured", 8, 4), ("w4a4", 0.0, "unstructured", 4, 4),
               ("w2a4", 0.0, "unstructured", 2, 4), ("w8a5", 0.0, "unstructured", 8, 5),
               ("90% w4a4", 0.9, "unstructured", 4, 4))


def variants(compare: str, ends: list[float], steps: int = 0, alphas: tuple[float, ...] = (0.5,),
             factors: tuple[float, ...] = (5, 10)) -> list[tuple[str, dict]]:
    """(label, FinetuneConfig fields) of each variant compared."""
    if compare == "pruning":
        return [("one-shot", {"pruning": "one-shot"})] + [
            (f"gradual {e:g}", {"pruning": "gradual", "gradual_end": e}) for e in ends]
    if compare in ("retrain", "distill", "retrain-length"):
        from search.engine.config import FinetuneConfig
        from search.export.retrain import RETRAIN_LR_FACTOR, retrain_config

        searched = FinetuneConfig(steps=steps)
        fields = lambda c: {k: getattr(c, k) for k in ("steps", "schedule", "learning_rate", "pruning")}
        if compare == "retrain":
            return [(f"{pruning} {f}x lr", fields(retrain_config(searched, None, f * searched.learning_rate, pruning)))
                    for f in (1, RETRAIN_LR_FACTOR) for pruning in ("one-shot", "gradual")]
        if compare == "distill":
            c = fields(retrain_config(searched))
            return [("retrain", c)] + [(f"distill a{a:g}", {**c, "distill": True, "alpha": a}) for a in alphas]
        return [(f"{f:g}x steps", fields(retrain_config(searched, int(f * steps)))) for f in factors]
    return [("calibrated", {"act_ranges": "calibrated"}), ("learned", {"act_ranges": "learned"})]


def plans_of(compare: str, model: str, n: int) -> list:
    """(label, Plan) of the plans compared on a model with n layers."""
    from search.compression.plan import GRANULARITIES, make_plan

    if compare in ("retrain", "distill", "retrain-length"):
        return [(label, make_plan(np.asarray(r), GRANULARITIES["unstructured"], np.asarray(w), 32))
                for label, r, w in RETRAIN_PLANS[model]]
    return [(label, make_plan(np.full(n, r), GRANULARITIES[g], w, a))
            for label, r, g, w, a in (PRUNING_PLANS if compare == "pruning" else RANGE_PLANS)]


def run_model(model: str, args, seeds: list[int], modes: list[tuple[str, dict]]) -> list[dict]:
    import models
    from models.train import train_baseline
    from search.compression.plan import stack_plans
    from search.engine.config import FinetuneConfig
    from search.engine.finetune import Engine

    task = models.get_task(model, args.dataset)
    variables, info = train_baseline(task, cache_dir=args.cache_dir)
    rows = []
    for seed in seeds:
        for label_mode, fields in modes:
            eng = Engine(task, variables, FinetuneConfig(**{"steps": args.steps, "batch_size": 128, "k": 1,
                                                            "seed": seed, **fields}))
            plans = plans_of(args.compare, model, len(eng.layers))
            t0 = time.perf_counter()
            r = eng.run(stack_plans([p for _, p in plans]), also_test=True)
            secs = time.perf_counter() - t0
            for (label, _), val, test in zip(plans, r.metric, r.test_metric):
                rows.append({"model": model, "dataset": args.dataset, "plan": label, "variant": label_mode,
                             "seed": seed, "steps": eng.config.steps, "val": float(val), "test": float(test),
                             "baseline_test": info["test_metric"], "seconds": secs / len(plans)})
            print(f"{model} seed {seed} {label_mode:12s}: " + ", ".join(
                f"{label} {100 * t:.2f}" for (label, _), t in zip(plans, r.test_metric)), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", choices=("pruning", "act-ranges", "retrain", "distill", "retrain-length"), default="pruning")
    ap.add_argument("--models", default="lenet300,lenet5")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--ends", default="0.5", help="--compare pruning: comma list of gradual_end values")
    ap.add_argument("--alphas", default="0.5", help="--compare distill: comma list of distillation weights")
    ap.add_argument("--factors", default="5,10", help="--compare retrain-length: comma list of retrain steps / --steps")
    ap.add_argument("--cache-dir", default="results/cache")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = variants(args.compare, [float(e) for e in args.ends.split(",")], args.steps,
                     tuple(float(a) for a in args.alphas.split(",")), tuple(float(f) for f in args.factors.split(",")))
    rows = []
    for m in args.models.split(","):
        rows += run_model(m, args, seeds, modes)
    names = [label for label, _ in modes]
    print(f"\nmean test accuracy over seeds {seeds}, {rows[0]['steps']} fine-tune steps")
    print(f"{'model':10s} {'plan':18s} " + " ".join(f"{m:>12s}" for m in names))
    summary = []
    for m in args.models.split(","):
        for label in dict.fromkeys(r["plan"] for r in rows if r["model"] == m):
            got = {v: float(np.mean([r["test"] for r in rows if r["model"] == m and r["plan"] == label
                                     and r["variant"] == v])) for v in names}
            summary.append({"model": m, "plan": label, **got})
            print(f"{m:10s} {label:18s} " + " ".join(f"{100 * got[v]:12.2f}" for v in names))
        mean = {v: float(np.mean([s[v] for s in summary if s["model"] == m])) for v in names}
        print(f"{m:10s} {'mean':18s} " + " ".join(f"{100 * mean[v]:12.2f}" for v in names))
        base = sorted({r["baseline_test"] for r in rows if r["model"] == m})
        print(f"{m:10s} {'baseline':18s} " + ", ".join(f"{100 * b:.2f}" for b in base))
    out = args.out or OUT / f"bench_finetune_modes_{args.compare}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "args": {**vars(args), "out": str(out)}, "rows": rows, "summary": summary}, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
