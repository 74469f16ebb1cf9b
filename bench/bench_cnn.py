"""Real CNNs on a real runtime: resnet20 / mobilenetv2 plans exported and timed in onnxruntime.

    PYTHONPATH=. .venv/bin/python -m bench.bench_cnn [--model resnet20] [--dataset fashion-mnist]
        [--steps 200] [--rounds 10] [--runs 30]

The trained baseline (results/cache; trained first when absent, which on a 2-core CPU takes
long for fashion-mnist: see the README) and a profile calibrated on this machine
(search.cost.calibrate, as `hwcompress profiles calibrate`). Variants: dense fp32, int8
(w8a8), and every prunable channel group at 25/50/75% (the traced groups of
search.compression.graph: residual stages pruned as one), float and int8; each fine-tuned
`--steps` steps (adaptive BN on), exported (BatchNorm folded, channels removed), checked in
onnxruntime and timed at batch 1 on one thread in interleaved rounds (fastest round's median).
Reports the fastest variant within 1 point of the baseline's test accuracy and its speed-up over
the fp32 ONNX export, and the calibrated profile's predicted latency next to the measured one
(Kendall tau over the variants). Saves bench/out/bench_cnn_<model>_<dataset>.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_costtruth import measure_interleaved
from bench.costtruth_scores import kendall_tau

OUT = Path(__file__).resolve().parent / "out"


def main(argv: list[str] | None = None) -> int:
    import models
    from models.train import train_baseline
    from search.compression.plan import CHANNEL, make_plan, stack_plans
    from search.cost.calibrate import calibrated_profile, measure_machine
    from search.cost.roofline import price
    from search.engine.config import FinetuneConfig
    from search.engine.finetune import Engine
    from search.export.exporter import export_plan

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps per variant")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--cache-dir", default="results/cache")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset, e.g. fp32,ch50 (default: all; fp32 is always run)")
    ap.add_argument("--ratios", default="0.25,0.5,0.75", help="channel-pruning ratios of the ch variants")
    ap.add_argument("--mixed", default="",
                    help="comma list of RES/INNER channel-pruning ratio pairs, e.g. 0.25/0.625: variants "
                         "r<RES>i<INNER> prune the groups a residual add couples (several members) at RES "
                         "and the block-internal groups (one member) at INNER, float")
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/bench_cnn_<model>_<dataset>.json)")
    ap.add_argument("--distill", action="store_true", help="fine-tune with distillation from the baseline")
    ap.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate (peak with --schedule cosine)")
    ap.add_argument("--schedule", default="constant", help="constant or cosine (FinetuneConfig.schedule)")
    ap.add_argument("--export-dir", default=None,
                    help="keep each variant's export in DIR/<variant> (default: a temporary folder), "
                         "to time it again on a quiet machine")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    task = models.get_task(args.model, args.dataset)
    variables, info = train_baseline(task, cache_dir=args.cache_dir, log_every=100)
    base = float(info["test_metric"])
    print(f"{args.model}/{args.dataset}: baseline test accuracy {base:.4f}", flush=True)
    machine = measure_machine(threads=1)
    profile = calibrated_profile(machine, name="this-machine")
    engine = Engine(task, variables, FinetuneConfig(steps=args.steps, k=1, distill=args.distill,
                                                    learning_rate=args.lr, schedule=args.schedule))
    layers = engine.layers
    free = np.array([layer.fixed is None for layer in layers])
    members = {}
    for layer in layers:
        if layer.kind != "depthwise":
            members[layer.group] = members.get(layer.group, 0) + 1
    coupled = np.array([members.get(layer.group, 0) > 1 for layer in layers])  # in a residual add

    def ch(r, inner=None):  # `inner`: the ratio of the groups no residual add couples (default r)
        return np.where(free, np.where(coupled, r, r if inner is None else inner), 0.0)

    variants = [("fp32", make_plan(np.zeros(len(layers)))), ("w8a8", make_plan(np.zeros(len(layers)), 0, 8, 8))]
    for r in map(float, args.ratios.split(",")):
        variants += [(f"ch{int(r * 100)}", make_plan(ch(r), CHANNEL)),
                     (f"ch{int(r * 100)}-w8a8", make_plan(ch(r), CHANNEL, 8, 8))]
    for pair in filter(None, args.mixed.split(",")):
        res, inner = map(float, pair.split("/"))
        variants.append((f"r{round(res * 100)}i{round(inner * 100)}", make_plan(ch(res, inner), CHANNEL)))
    if args.variants:
        keep = {"fp32", *args.variants.split(",")}
        unknown = keep - {name for name, _ in variants}
        if unknown:
            raise SystemExit(f"unknown --variants {sorted(unknown)}: choose from {[n for n, _ in variants]}")
        variants = [(n, p) for n, p in variants if n in keep]
    rows, paths = [], []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.export_dir or scratch
        for name, plan in variants:
            out = Path(tmp, name)
            steps = 0 if name == "fp32" else args.steps
            r = export_plan(task, variables, plan, out, engine=engine if steps else Engine(
                task, variables, FinetuneConfig(steps=0, k=1)))
            predicted = float(price(profile, layers, stack_plans([plan])).latency_ms[0])
            rows.append({"variant": name, "test_accuracy": r.quality, "onnx_accuracy": r.onnx_quality,
                         "onnx_agreement": r.onnx_agreement, "kept_back": r.config["onnx_kept_back"],
                         "forms": sorted({c["onnx_form"] for c in r.config["layers"]}),
                         "onnx_out_channels": [c["onnx_out_channels"] for c in r.config["layers"]],
                         "predicted_ms": predicted})
            paths.append(out / "model.onnx")
            print(f"  {name:12s} acc {r.quality:.4f} (onnx {r.onnx_quality:.4f}, agree {r.onnx_agreement:.4f}) "
                  f"forms {rows[-1]['forms']}", flush=True)
        for row, m in zip(rows, measure_interleaved(paths, args.rounds, args.runs)):
            row.update(measured_ms=m["robust_ms"], median_all_ms=m["median_ms"])
    fp32 = rows[0]
    ok = [r for r in rows if r["test_accuracy"] >= base - 0.01]
    best = min(ok, key=lambda r: r["measured_ms"]) if ok else None
    for r in rows:
        print(f"{r['variant']:12s} acc {r['test_accuracy']:.4f}  measured {r['measured_ms']:.3f} ms  "
              f"predicted {r['predicted_ms']:.3f} ms  x{fp32['measured_ms'] / r['measured_ms']:.2f}")
    tau = kendall_tau([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows])
    result = {"model": args.model, "dataset": args.dataset, "baseline_test_accuracy": base, "steps": args.steps,
              "distill": args.distill, "learning_rate": args.lr, "schedule": args.schedule,
              "machine": machine, "rows": rows, "fastest_within_1pt": best,
              "speedup_over_fp32_onnx": None if best is None else fp32["measured_ms"] / best["measured_ms"],
              "kendall_tau_predicted_measured": tau, "seconds": time.perf_counter() - t0}
    if best is not None:
        print(f"fastest within 1 point of {base:.4f}: {best['variant']} (acc {best['test_accuracy']:.4f}), "
              f"{result['speedup_over_fp32_onnx']:.2f}x faster than fp32 ONNX; Kendall tau {tau:.2f}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else OUT / f"bench_cnn_{args.model}_{args.dataset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
