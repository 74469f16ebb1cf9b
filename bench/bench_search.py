"""The search's headline numbers (issue 5), printed and saved to bench/out/bench_search.json.

1. lenet300 on digits, mobile-cpu, N trials (TPE): the largest compression ratio among
   trained, feasible trials within 1 point of baseline accuracy (goal: >= 20x).
2. Hypervolume (quality, latency, memory) of TPE after N/2 trials vs random search after
   N (same budget, same seed; one reference box for both).
3. Fashion-MNIST, lenet300 and lenet5: best compression ratio within 0.5 points of the
   baseline (Deep Compression: 40x / 39x on MNIST) and the search time on this CPU.

    python -m bench.bench_search --trials 200 --parts digits,hv,fashion
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

optuna.logging.set_verbosity(optuna.logging.WARNING)
OUT = Path(__file__).parent / "out"


def _search(model: str, dataset: str, trials: int, sampler: str, steps: int, objectives, study: str,
            storage: str, results_dir: str, seed: int = 0, warm: bool = True) -> tuple[optuna.Study, float]:
    from search.api import make_spec, search
    from search.engine.config import FinetuneConfig

    spec = make_spec(model=model, dataset=dataset, profile="mobile-cpu", n_trials=trials, objectives=objectives,
                     sampler=sampler, seed=seed, finetune=FinetuneConfig(steps=steps, seed=seed))
    t0 = time.perf_counter()
    st = search(spec, storage, results_dir, study_name=study, warm_start=warm)
    return st, time.perf_counter() - t0


def _complete(name: str, storage: str) -> int:
    """Complete trials of study `name` in storage (0 when it does not exist)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return 0
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def best_ratio_within(study: optuna.Study, points: float) -> dict:
    """The most compressed trained trial whose quality is within `points` (absolute %) of baseline."""
    base = study.user_attrs["baseline"]["val_metric"]
    ok = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
          if t.user_attrs["quality"] >= base - points / 100]
    if not ok:
        return {"baseline": base, "ratio": None}
    t = max(ok, key=lambda t: t.user_attrs["compression_ratio"])
    return {"baseline": base, "ratio": t.user_attrs["compression_ratio"], "quality": t.user_attrs["quality"],
            "trial": t.number, "plan": t.user_attrs["plan"]}


def deep_compression_stages(study: optuna.Study, trial: int, results_dir: str) -> dict:
    """Export `trial` (same fine-tune as in the search) and return its size breakdown: the
    compression ratio after pruning, after quantization and after Huffman coding, as Deep
    Compression reports them (its 40x / 39x are after Huffman), and the exported test quality."""
    import tempfile

    from search.export.exporter import export_trial

    with tempfile.TemporaryDirectory() as tmp:
        res = export_trial(study, trial, Path(tmp, "export"), results_dir=results_dir)
    size = res.config["size"]
    return {"ratio_by_stage": size["ratio"], "bytes_by_stage": size["bytes_by_stage"],
            "test_quality": res.quality, "onnx_test_quality": res.onnx_quality}


def _losses(study: optuna.Study, first: int | None = None) -> np.ndarray:
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)[:first]
    rows = [[-t.values[0], *t.values[1:]] for t in trials if t.state == TrialState.COMPLETE]
    return np.asarray(rows, np.float64).reshape(-1, len(study.directions))


def hypervolumes(tpe: optuna.Study, n_tpe: int, rnd: optuna.Study) -> dict:
    """HV of TPE's first n_tpe trials and of all random trials in one normalised box."""
    from search.report import pareto

    a, b = _losses(tpe, n_tpe), _losses(rnd)
    both = np.concatenate([a, b])
    ref, ideal = pareto.reference_point(both), pareto.ideal_point(both)
    return {"tpe_trials": n_tpe, "tpe_hv": pareto.hypervolume(a, ref, ideal),
            "random_trials": len(rnd.trials), "random_hv": pareto.hypervolume(b, ref, ideal)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--steps", type=int, default=150, help="fine-tune steps per trial")
    p.add_argument("--fashion-trials", type=int, default=None, help="default: --trials")
    p.add_argument("--fashion-steps", type=int, default=300)
    p.add_argument("--parts", default="digits,hv,fashion")
    p.add_argument("--fashion-models", default="lenet300,lenet5")
    p.add_argument("--results-dir", default="results/bench_search")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    os.makedirs(args.results_dir, exist_ok=True)
    storage = f"sqlite:///{Path(args.results_dir).resolve()}/studies.db"
    tag = f"n{args.trials}-s{args.steps}"
    path = OUT / "bench_search.json"
    out: dict = json.loads(path.read_text()) if path.is_file() else {}  # parts run separately add up
    out.update({"trials": args.trials, "steps": args.steps})
    if parts & {"digits", "hv"}:
        st, sec = _search("lenet300", "digits", args.trials, "tpe", args.steps, ("quality", "latency", "memory"),
                          f"digits-tpe-{tag}", storage, args.results_dir)
        r = best_ratio_within(st, 1.0)
        out["digits"] = {**r, "seconds": sec, "goal_20x": bool(r["ratio"] and r["ratio"] >= 20)}
        print(f"digits lenet300 mobile-cpu {args.trials} trials in {sec:.0f} s: best ratio within 1 point "
              f"{r['ratio'] and round(r['ratio'], 1)}x (quality {r.get('quality')}, baseline {r['baseline']:.4f})")
        if "hv" in parts:
            n = args.trials // 2
            rnd, sec_r = _search("lenet300", "digits", args.trials, "random", args.steps,
                                 ("quality", "latency", "memory"), f"digits-random-{tag}", storage,
                                 args.results_dir, warm=False)
            out["hv"] = {**hypervolumes(st, n, rnd), "random_seconds": sec_r}
            print(f"hypervolume: TPE after {n} trials {out['hv']['tpe_hv']:.4f} vs random after "
                  f"{args.trials} {out['hv']['random_hv']:.4f}")
    if "fashion" in parts:
        n = args.fashion_trials or args.trials
        for model in args.fashion_models.split(","):
            name, key = f"fashion-{model}-n{n}-s{args.fashion_steps}", f"fashion-{model}"
            done_before = _complete(name, storage)
            st, sec = _search(model, "fashion-mnist", n, "tpe", args.fashion_steps, ("quality", "size"),
                              name, storage, args.results_dir)
            if done_before >= n and out.get(key, {}).get("study") == name:
                sec = out[key]["seconds"]  # nothing was searched now: keep the time the search took
            r = best_ratio_within(st, 0.5)
            if r["ratio"]:
                r["export"] = deep_compression_stages(st, r["trial"], args.results_dir)
            out[key] = {**r, "study": name, "seconds": sec, "trials": n, "steps": args.fashion_steps}
            print(f"fashion-mnist {model} {n} trials in {sec:.0f} s: best ratio within 0.5 points "
                  f"{r['ratio'] and round(r['ratio'], 1)}x (quality {r.get('quality')}, baseline {r['baseline']:.4f})")
            if r["ratio"]:
                stage = r["export"]["ratio_by_stage"]
                print(f"  exported: pruned {stage['pruned']:.1f}x, quantized {stage['quantized']:.1f}x, "
                      f"Huffman coded {stage['huffman']:.1f}x; test quality {r['export']['test_quality']:.4f}")
    OUT.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
