"""Low-rank factorization (issue 18: SVD, spatial SVD and Kronecker forms) on lenet300 and
lenet5 on digits: plans factorized at rank ratios, fine-tuned, exported; predicted against
exported MACs and bytes, ONNX agreement, and predicted against measured latency on this machine.

    python -m bench.bench_lowrank [--models lenet300,lenet5] [--steps 200] [--profile xeon] [--runs 300]

The cached baselines (results/cache; trained when absent). Per plan: test accuracy compressed
before fine-tuning and after `--steps` steps (the exported weights), ONNX accuracy and agreement,
the cost model's MACs (per example) and size against the ONNX model's MACs (from its graph's
shapes, search.export.onnx.macs) and size.json's quantized stage, and `search.cost.measure`
(onnxruntime, one thread, batch 1) against the profile's prediction. JSON to
bench/out/bench_lowrank.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx

import models
from models.train import train_baseline
from search.compression import plan as P
from search.cost.measure import measure
from search.cost.roofline import price
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.export.exporter import export_plan
from search.export.onnx.macs import node_macs

OUT = Path(__file__).resolve().parent / "out"
U, C = P.UNSTRUCTURED, P.CHANNEL
SVD, SP, KR = P.SVD, P.SPATIAL, P.KRONECKER
PLANS = {"lenet300": {  # on digits: fc1 64x300 (d = 64; Kronecker 8x8 -> 15x20, d = 120), fc2 300x100, fc3 100x10
    "dense-fp32": P.make_plan(np.zeros(3)),
    "fc1-r.25-fp32": P.make_plan(np.zeros(3), rank=[0.25, 1, 1]),
    "fc1-r.25-w8a8": P.make_plan(np.zeros(3), U, 8, 8, rank=[0.25, 1, 1]),
    "dense-w8a8": P.make_plan(np.zeros(3), U, 8, 8),
    "fc1-r.25+fc2-r.5-c.5-fp32": P.make_plan([0, 0.5, 0], [U, C, U], 32, 32, rank=[0.25, 0.5, 1]),
    "fc1-r.25+fc2-r.5-c.5-w8a8": P.make_plan([0, 0.5, 0], [U, C, U], 8, 8, rank=[0.25, 0.5, 1]),
    "fc1-kron-r8-fp32": P.make_plan(np.zeros(3), rank=[8 / 120, 1, 1], form=KR),
    "fc1-kron-r8-w8a8": P.make_plan(np.zeros(3), U, 8, 8, rank=[8 / 120, 1, 1], form=KR),
}, "lenet5": {  # on digits (SAME): conv1 5x5 1->20, conv2 5x5 20->50 (SVD d = 50; spatial [100, 250], d = 100),
    # fc1 200->500 (Kronecker 10x20 -> 20x25, d = 200), fc2 500->10
    "dense-fp32": P.make_plan(np.zeros(4)),
    "dense-w8a8": P.make_plan(np.zeros(4), U, 8, 8),
    "conv2-svd-r.25-w8a8": P.make_plan(np.zeros(4), U, 8, 8, rank=[1, 0.25, 1, 1]),
    "conv2-spatial-r.25-w8a8": P.make_plan(np.zeros(4), U, 8, 8, rank=[1, 0.25, 1, 1], form=SP),
    "conv2-spatial-r.25-c.5-fp32": P.make_plan([0, 0.5, 0, 0], [U, C, U, U], 32, 32, rank=[1, 0.25, 1, 1], form=SP),
    "fc1-kron-r8-w8a8": P.make_plan(np.zeros(4), U, 8, 8, rank=[1, 1, 8 / 200, 1], form=KR),
}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="fine-tune steps per plan (default 200)")
    ap.add_argument("--profile", default="xeon", help="profile to predict with (default xeon)")
    ap.add_argument("--runs", type=int, default=300, help="timed onnxruntime runs per export (default 300)")
    ap.add_argument("--models", default="lenet300,lenet5", help="models on digits (default lenet300,lenet5)")
    args = ap.parse_args(argv)
    out_rows = {}
    for model in args.models.split(","):
        out_rows[model] = _run(model, args)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_lowrank.json").write_text(json.dumps({"steps": args.steps, "profile": args.profile, "models": out_rows},
                                                       indent=1))
    return 0


def _run(model: str, args) -> dict:
    task = models.get_task(model, "digits")
    params, info = train_baseline(task)
    engine = Engine(task, params, FinetuneConfig(steps=args.steps, k=1, loop="python"), factorize=True)
    rows = {}
    print(f"{model}/digits, baseline test accuracy {info['test_metric']:.4f}; {args.steps} fine-tune steps; {args.profile}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in PLANS[model].items():
            before = float(engine.evaluate([plan], split="test").metric[0])
            out = Path(tmp) / name
            r = export_plan(task, params, plan, out, engine=engine, profile=args.profile)
            cost = price(args.profile, engine.layers, P.stack_plans([plan]))
            size = json.loads((out / "size.json").read_text())["total"]["bits_by_stage"]["quantized"] / 8
            t = measure(out, runs=args.runs, warmup=30, profile=args.profile)
            rows[name] = {"test_before": before, "test_after": r.quality, "test_onnx": r.onnx_quality,
                          "onnx_agreement": r.onnx_agreement, "onnx_max_abs_diff": r.onnx_max_abs_diff,
                          "macs_predicted": float(cost.layer_macs[0].sum()),
                          "macs_onnx": sum(node_macs(onnx.load(str(out / "model.onnx"))).values()),
                          "bytes_predicted": float(cost.size_kb[0] * 1024), "bytes_size_json": size,
                          "latency_predicted_us": t["predicted_ms"] * 1e3, "latency_measured_us": t["median_ms"] * 1e3}
            w = rows[name]
            print(f"{name:29s} acc {before:.4f} -> {r.quality:.4f} (onnx {r.onnx_quality:.4f}, agree {r.onnx_agreement:.3f}) "
                  f"MACs {w['macs_predicted']:.0f}/{w['macs_onnx']} bytes {w['bytes_predicted']:.0f}/{size:.0f} "
                  f"latency {w['latency_predicted_us']:.1f}/{w['latency_measured_us']:.1f} us (predicted/exported)")
    return {"baseline_test": info["test_metric"], "plans": rows}


if __name__ == "__main__":
    raise SystemExit(main())
