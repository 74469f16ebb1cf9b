"""A budgeted search on this machine's calibrated profile, checked in onnxruntime (issue 19, the
third target: the exported winner's measured latency within 10% of its prediction, and no plan
predicted feasible measuring more than 10% over the budget).

For each model: `hwcompress profiles calibrate` (once, shared by the models; again, up to
`--calibrations` times, while its held-out check says the timing was noisy), a latency budget
of `--fraction` of the dense model's latency predicted on that profile, `hwcompress search
--profile <it> --objectives quality,latency --latency-ms <budget>` (Fashion-MNIST), then every
trial predicted feasible is exported (compressed only, `--finetune-steps 0`: latency does not
depend on the weights' values) and timed in onnxruntime at batch 1 on one thread, in interleaved
rounds (bench_costtruth.measure_interleaved; the fastest run, which other work on a shared
machine can only slow down). Reported per plan: predicted and measured latency, their ratio,
whether it measures over the budget; and per model the winner (the most accurate feasible
plan), the share of plans within +-10% of their prediction, and how many measure more than 10%
over the budget. JSON to bench/out/bench_budgeted.json.

    PYTHONPATH=. .venv/bin/python -m bench.bench_budgeted [--models lenet5,resnet20] [--trials 24] [--steps 60]

Baselines come from `--results-dir`'s cache (trained there first when missing: resnet20 takes
about 17 minutes on this CPU).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np

from search.export.kernel_timing import NOISY_HELD_OUT_ERROR

OUT = Path(__file__).resolve().parent / "out"


def held_out_error(profile: Path) -> float | None:
    """The held-out check's median error `profiles calibrate` wrote in the profile's header
    (a fraction), None when it wrote none."""
    m = re.search(r"held-out check: median error ([0-9.]+)%", profile.read_text())
    return float(m.group(1)) / 100 if m else None


def dense_latency_ms(model: str, profile: str) -> float:
    """The dense model's latency on `profile`, predicted (ms, batch 1, Fashion-MNIST's input)."""
    from bench.bench_costtruth import _layers
    from search.compression import plan as P
    from search.cost.roofline import price

    layers = _layers(model)
    return float(np.asarray(price(profile, layers, P.stack_plans([P.dense_plan(len(layers))])).latency_ms)[0])


def run_model(model: str, profile: Path, args: argparse.Namespace) -> dict:
    """Search `model` under a budget on `profile`, export and time every plan predicted feasible."""
    import optuna
    from optuna.trial import TrialState

    from bench.bench_costtruth import measure_interleaved
    from hw_profiles import load_profile
    from search import cli
    from search.export.exporter import export_trial
    from search.study.database import default_url

    budget = args.fraction * dense_latency_ms(model, str(profile))
    name = f"budgeted-{model}-{profile.stem}-f{args.fraction:g}-n{args.trials}-s{args.steps}"
    t0 = time.perf_counter()
    rc = cli.main(["search", "--model", model, "--dataset", "fashion-mnist", "--profile", str(profile),
                   "--objectives", "quality,latency", "--latency-ms", f"{budget:.6g}", "--trials", str(args.trials),
                   "--finetune-steps", str(args.steps), "--results-dir", args.results_dir, "--study", name, "--quiet"])
    if rc != 0:
        raise RuntimeError(f"search of {model} exited {rc}")
    search_s = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=default_url(args.results_dir))
    prof = load_profile(profile).name  # the key of its costs in every trial (a file may be renamed)
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.user_attrs.get("feasible") and t.user_attrs.get("costs", {}).get(prof)]
    over = sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("feasible") is False)
    where = Path(args.results_dir, name + "-exports")
    paths, rows = [], []
    for t in trials[:args.max_exports]:
        out = where / f"trial-{t.number}"
        r = export_trial(study, t.number, out, finetune_steps=0, force=True, results_dir=args.results_dir)
        paths.append(out / "model.onnx")
        rows.append({"trial": t.number, "quality": t.user_attrs.get("quality"),
                     "predicted_ms": float(t.user_attrs["costs"][prof]["latency_ms"]),
                     "onnx_agreement": r.onnx_agreement})
    timing = measure_interleaved(paths, args.rounds, args.runs, spread_s=args.spread)
    for row, m in zip(rows, timing):
        row["measured_ms"] = m["fastest_ms"]
        row["measured_over_predicted"] = m["fastest_ms"] / row["predicted_ms"]
        row["over_budget"] = m["fastest_ms"] / budget - 1
    ratio = np.array([r["measured_over_predicted"] for r in rows])
    winner = max(rows, key=lambda r: r["quality"]) if rows else None
    out = {"budget_ms": budget, "fraction": args.fraction, "study": name, "search_seconds": search_s,
           "trials": args.trials, "steps": args.steps, "over_budget_trials": over, "plans": rows,
           "within_10pct": float(np.mean(np.abs(ratio - 1) <= 0.10)) if rows else None,
           "over_budget_by_10pct": int(sum(r["over_budget"] > 0.10 for r in rows)),
           "winner": winner}
    print(f"{model}: budget {budget * 1e3:.1f} us ({args.fraction:g} x the dense prediction); {len(rows)} plans "
          f"predicted feasible, {over} over budget (never trained); search {search_s:.0f} s")
    for r in rows:
        print(f"  trial {r['trial']:3d}: predicted {r['predicted_ms'] * 1e3:7.1f} us, measured {r['measured_ms'] * 1e3:7.1f} us "
              f"(x{r['measured_over_predicted']:.2f}){'  OVER budget' if r['over_budget'] > 0 else ''}, val {r['quality']:.4f}")
    if winner:
        print(f"  winner trial {winner['trial']}: measured / predicted {winner['measured_over_predicted']:.2f}; "
              f"{100 * out['within_10pct']:.0f}% of plans within +-10%; {out['over_budget_by_10pct']} measure over "
              "the budget by more than 10%")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,resnet20")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--steps", type=int, default=60, help="fine-tune steps per trial (quality only picks the winner)")
    ap.add_argument("--fraction", type=float, default=0.6, help="the budget, as a fraction of the dense model's predicted latency")
    ap.add_argument("--max-exports", type=int, default=12, help="at most this many feasible plans exported and timed per model")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--spread", type=float, default=90.0,
                    help="seconds the timing rounds are spread over (a shared host's slow phases last seconds to minutes)")
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--profile", default=None, help="a calibrated profile TOML to reuse (default: calibrate now)")
    ap.add_argument("--calibrations", type=int, default=3,
                    help="calibrate up to this many times until the held-out check is not noisy (above 15%%)")
    args = ap.parse_args(argv)
    if args.calibrations < 1:
        ap.error(f"--calibrations {args.calibrations} must be >= 1")
    from models.data import FASHION_MNIST_DIR, load_fashion_mnist
    from models.errors import ModelError

    try:  # the searches need it: a missing dataset fails now, not after minutes of calibration
        load_fashion_mnist()
    except ModelError:
        raise SystemExit(f"error: this bench searches Fashion-MNIST, which is not in {FASHION_MNIST_DIR}: "
                         "install the Debian package dataset-fashion-mnist") from None
    from search import cli

    t0 = time.perf_counter()
    profile = Path(args.profile) if args.profile else Path(args.results_dir, "bench-budgeted-own.toml")
    if args.profile is None:
        for attempt in range(args.calibrations):
            if cli.main(["profiles", "calibrate", "--out", str(profile), "--force"]) != 0:
                raise RuntimeError("profiles calibrate failed")
            held_out = held_out_error(profile)
            if held_out is None or held_out <= NOISY_HELD_OUT_ERROR:
                break
            print(f"calibration {attempt + 1} of {args.calibrations} was noisy (held-out error {held_out:.1%})", flush=True)
        else:  # a search priced on a noisy calibration measures nothing but the noise
            raise SystemExit("every calibration was noisy: run the bench when the machine is quiet, or pass --profile")
    calibrate_s = time.perf_counter() - t0
    out = {"machine": platform.processor() or platform.machine(), "profile": str(profile),
           "calibrate_seconds": calibrate_s if args.profile is None else None,
           "models": {m: run_model(m, profile, args) for m in args.models.split(",")}}
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_budgeted.json").write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
