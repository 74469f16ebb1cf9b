"""How long an export should fine-tune a plan the search found (issue 16, item 5).

A small search (lenet300 and lenet5 on digits, mobile-cpu, `--steps` fine-tune steps per
trial), then a few of its front plans fine-tuned again as an export would: with the search's own
fine-tune (constant learning rate, 1x its steps: what the study measured) and with the
export's retrain (cosine decay) at each of `--factors` times the search's steps, on
`--seeds` batch orders. Validation and test quality of each, and the seconds it took, printed
and saved to bench/out/bench_retrain.json. The default RETRAIN_FACTOR of
search/export/retrain.py is read off this table.

    python -m bench.bench_retrain --models lenet300 --trials 24 --steps 200 --plans 5 --factors 1,3,5,10 --seeds 2
    python -m bench.bench_retrain --models lenet5 --trials 16 --steps 100 --plans 3 --factors 1,3,5 --seeds 1

Measured on the shared 2-core CPU (mean over front plans within 10 points of the baseline and
seeds; digits' test split has 360 examples, so one example is 0.28 points):

    lenet300 (4 plans x 2 seeds)   val     test    test vs the search's fine-tune
      search's, 200 steps          0.9611  0.9448
      retrain 1x (cosine)          0.9222  0.9062  -3.85 (4 plans worse: half the mean learning rate)
      retrain 3x                   0.9674  0.9528  +0.80 (3 better, 1 worse)
      retrain 5x                   0.9688  0.9552  +1.04 (4 better)
      retrain 10x                  0.9639  0.9483  +0.35 (3 better, 1 worse)
    lenet5 (3 plans x 1 seed)
      search's, 100 steps          0.9630  0.9639
      retrain 1x / 3x / 5x         0.9648 / 0.9722 / 0.9685 val, 0.9611 / 0.9611 / 0.9639 test

So 5x (search.export.retrain.RETRAIN_FACTOR): the best on lenet300, no loss on lenet5.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)
OUT = Path(__file__).parent / "out"


def pick_plans(study: optuna.Study, n: int, within: float) -> list[tuple[int, dict, float]]:
    """Up to n front trials within `within` (absolute) of the baseline's validation quality,
    spread evenly from the best to the most compressed: (trial, plan, searched quality)."""
    from search.report.view import pareto_frame

    base = float(study.user_attrs["baseline"]["val_metric"])
    front = pareto_frame(study)
    front = front[front["quality"] >= base - within].reset_index(drop=True)
    idx = sorted(set(np.linspace(0, len(front) - 1, min(n, len(front))).round().astype(int))) if len(front) else []
    return [(int(front.loc[i, "trial"]), front.loc[i, "plan"], float(front.loc[i, "quality"])) for i in idx]


def measure_model(model: str, args, storage: str) -> dict:
    import dataclasses

    from search.api import make_spec, search
    from search.engine.config import FinetuneConfig
    from search.export.retrain import finetuned_quality, retrain_config
    from search.study.context import load_context
    from search.study.space import plan_from_dict

    name = f"retrain-{model}-n{args.trials}-s{args.steps}"
    spec = make_spec(model=model, dataset="digits", profile="mobile-cpu", n_trials=args.trials,
                     finetune=FinetuneConfig(steps=args.steps))
    t0 = time.perf_counter()
    study = search(spec, storage, args.results_dir, study_name=name)
    search_s = time.perf_counter() - t0
    ctx = load_context(spec, args.results_dir, study=study)
    base = dict(study.user_attrs["baseline"])
    rows = []
    for trial, plan_d, searched_q in pick_plans(study, args.plans, args.within):
        plan = plan_from_dict(plan_d)
        row = {"trial": trial, "searched_val": searched_q, "runs": {}}
        for seed in range(args.seeds):
            searched = dataclasses.replace(ctx.spec.finetune, k=1, seed=seed)
            configs = {"search 1x": searched, **{f"retrain {f}x": retrain_config(searched, f * args.steps)
                                                 for f in args.factors}}
            for label, cfg in configs.items():
                t1 = time.perf_counter()
                q = finetuned_quality(ctx.task, ctx.params, plan, cfg)
                row["runs"].setdefault(label, []).append({**q, "seed": seed, "seconds": time.perf_counter() - t1})
        rows.append(row)
        print(f"  {model} trial {trial} (searched val {searched_q:.4f}): " + ", ".join(
            f"{k} val {np.mean([r['val'] for r in v]):.4f} test {np.mean([r['test'] for r in v]):.4f}"
            for k, v in row["runs"].items()), flush=True)
    return {"study": name, "search_seconds": search_s, "baseline": base, "plans": rows,
            "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    """Per configuration: mean val and test over plans and seeds, the mean change in test
    against the search's fine-tune, how many plans gained / lost test quality, mean seconds."""
    out = {}
    labels = list(rows[0]["runs"]) if rows else []
    for label in labels:
        val = [np.mean([r["val"] for r in row["runs"][label]]) for row in rows]
        test = [np.mean([r["test"] for r in row["runs"][label]]) for row in rows]
        ref = [np.mean([r["test"] for r in row["runs"]["search 1x"]]) for row in rows]
        d = np.asarray(test) - np.asarray(ref)
        out[label] = {"val": float(np.mean(val)), "test": float(np.mean(test)), "test_gain": float(np.mean(d)),
                      "plans_better": int((d > 0).sum()), "plans_worse": int((d < 0).sum()),
                      "seconds": float(np.mean([r["seconds"] for row in rows for r in row["runs"][label]]))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lenet300,lenet5")
    p.add_argument("--trials", type=int, default=24, help="trials of each search")
    p.add_argument("--steps", type=int, default=200, help="the search's fine-tune steps per trial")
    p.add_argument("--plans", type=int, default=5, help="front plans re-fine-tuned per model")
    p.add_argument("--within", type=float, default=0.1, help="only front plans within this of the baseline's val quality")
    p.add_argument("--factors", default="1,3,5,10", help="retrain lengths, in multiples of --steps")
    p.add_argument("--seeds", type=int, default=2, help="batch orders per plan and length")
    p.add_argument("--results-dir", default="results", help="baseline cache; the studies go to bench_retrain.db in it")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.factors = [int(f) for f in args.factors.split(",")]
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{Path(args.results_dir).resolve()}/bench_retrain.db"
    path = OUT / "bench_retrain.json"
    out = json.loads(path.read_text()) if path.is_file() else {}  # models run separately add up
    out.setdefault("models", {})
    for model in args.models.split(","):
        r = measure_model(model, args, storage)
        out["models"][model] = {"command": "python -m bench.bench_retrain " + " ".join(argv), "steps": args.steps,
                                "trials": args.trials, "factors": args.factors, "seeds": args.seeds, **r}
        OUT.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        print(f"{model}/digits, {len(r['plans'])} front plans x {args.seeds} seeds (search {r['search_seconds']:.0f} s; "
              f"baseline val {r['baseline']['val_metric']:.4f}, test {r['baseline']['test_metric']:.4f}):")
        for label, s in r["summary"].items():
            print(f"  {label:12s} val {s['val']:.4f}  test {s['test']:.4f}  test vs search {100 * s['test_gain']:+.2f} pts "
                  f"({s['plans_better']} plans better, {s['plans_worse']} worse)  {s['seconds']:.1f} s per fine-tune")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
