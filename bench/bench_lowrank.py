"""Low-rank factorization (Weight SVD, issue 18) on lenet300/digits: plans factorized at rank
ratios, fine-tuned, exported; predicted against exported MACs and bytes, ONNX agreement, and
predicted against measured latency on this machine.

    python -m bench.bench_lowrank [--steps 200] [--profile xeon] [--runs 300]

The cached lenet300/digits baseline (results/cache; trained when absent). Per plan: test accuracy
compressed before fine-tuning and after `--steps` steps (the exported weights), ONNX accuracy and
agreement, the cost model's MACs (per example) and size against the ONNX model's Conv/MatMul MACs
and size.json's quantized stage, and `search.cost.measure` (onnxruntime, one thread, batch 1)
against the profile's prediction. JSON to bench/out/bench_lowrank.json.
"""
from __future__ import annotations

import argparse
import json
import math
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

OUT = Path(__file__).resolve().parent / "out"
U, C = P.UNSTRUCTURED, P.CHANNEL
PLANS = {  # lenet300 on digits: fc1 64x300 (d = 64), fc2 300x100 (d = 100), fc3 100x10 (d = 10)
    "dense-fp32": P.make_plan(np.zeros(3)),
    "fc1-r.25-fp32": P.make_plan(np.zeros(3), rank=[0.25, 1, 1]),
    "fc1-r.25-w8a8": P.make_plan(np.zeros(3), U, 8, 8, rank=[0.25, 1, 1]),
    "dense-w8a8": P.make_plan(np.zeros(3), U, 8, 8),
    "fc1-r.25+fc2-r.5-c.5-fp32": P.make_plan([0, 0.5, 0], [U, C, U], 32, 32, rank=[0.25, 0.5, 1]),
    "fc1-r.25+fc2-r.5-c.5-w8a8": P.make_plan([0, 0.5, 0], [U, C, U], 8, 8, rank=[0.25, 0.5, 1]),
}


def onnx_macs(path: Path, positions: int = 1) -> int:
    """MACs of every MatMul/Gemm node of an ONNX model (an MLP: one position), from its weight's dims."""
    m = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    total = 0
    for n in m.graph.node:
        w = {"MatMul": 1, "MatMulInteger": 1, "Gemm": 1}.get(n.op_type)  # a chained int8 layer is a QDQ Gemm
        if w is None:
            continue
        name = n.input[w]
        total += positions * math.prod(inits.get(name) or inits[prod[name].input[0]])
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="fine-tune steps per plan (default 200)")
    ap.add_argument("--profile", default="xeon", help="profile to predict with (default xeon)")
    ap.add_argument("--runs", type=int, default=300, help="timed onnxruntime runs per export (default 300)")
    args = ap.parse_args(argv)
    task = models.get_task("lenet300", "digits")
    params, info = train_baseline(task)
    engine = Engine(task, params, FinetuneConfig(steps=args.steps, k=1, loop="python"))
    rows = {}
    print(f"lenet300/digits, baseline test accuracy {info['test_metric']:.4f}; {args.steps} fine-tune steps; {args.profile}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in PLANS.items():
            before = float(engine.evaluate([plan], split="test").metric[0])
            out = Path(tmp) / name
            r = export_plan(task, params, plan, out, engine=engine, profile=args.profile)
            cost = price(args.profile, engine.layers, P.stack_plans([plan]))
            size = json.loads((out / "size.json").read_text())["total"]["bits_by_stage"]["quantized"] / 8
            t = measure(out, runs=args.runs, warmup=30, profile=args.profile)
            rows[name] = {"test_before": before, "test_after": r.quality, "test_onnx": r.onnx_quality,
                          "onnx_agreement": r.onnx_agreement, "onnx_max_abs_diff": r.onnx_max_abs_diff,
                          "macs_predicted": float(cost.layer_macs[0].sum()), "macs_onnx": onnx_macs(out / "model.onnx"),
                          "bytes_predicted": float(cost.size_kb[0] * 1024), "bytes_size_json": size,
                          "latency_predicted_us": t["predicted_ms"] * 1e3, "latency_measured_us": t["median_ms"] * 1e3}
            w = rows[name]
            print(f"{name:27s} acc {before:.4f} -> {r.quality:.4f} (onnx {r.onnx_quality:.4f}, agree {r.onnx_agreement:.3f}) "
                  f"MACs {w['macs_predicted']:.0f}/{w['macs_onnx']} bytes {w['bytes_predicted']:.0f}/{size:.0f} "
                  f"latency {w['latency_predicted_us']:.1f}/{w['latency_measured_us']:.1f} us (predicted/exported)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_lowrank.json").write_text(json.dumps({"steps": args.steps, "profile": args.profile, "plans": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
