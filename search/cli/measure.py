"""`hwcompress measure DIR`: time an exported model.onnx in onnxruntime beside its prediction."""
from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("measure", help="time an export's model.onnx in onnxruntime; show the predicted latency beside it",
                              description="Run DIR/model.onnx in onnxruntime on this machine (at the batch the "
                              "profile prices: 1, or the batch a calibrated profile was timed at with "
                              "`profiles calibrate --batch`; warm-up, "
                              "repeated runs, 1 intra-op thread by default) and print the median and spread beside "
                              "the latency the cost model predicts for the profile named in DIR/config.json.")
    p.add_argument("dir", help="an export directory (written by `hwcompress export`)")
    p.add_argument("--runs", type=int, default=200, help="timed runs (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed warm-up runs (default 20)")
    p.add_argument("--profile", default=None, help="predict for this profile instead of the export's")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=measure_command)


def measure_command(args: argparse.Namespace) -> int:
    from search.cost.measure import measure

    r = measure(args.dir, runs=args.runs, warmup=args.warmup, profile=args.profile, threads=args.threads)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"measured  {r['median_ms']:.4f} ms median (p10 {r['p10_ms']:.4f}, p90 {r['p90_ms']:.4f}, "
          f"IQR {r['iqr_ms']:.4f}; {r['runs']} runs, batch {r['batch']}, {r['threads']} thread(s), onnxruntime CPU)")
    if r["predicted_ms"] is None:
        print(f"predicted n/a (no prediction for profile {r['profile']!r})")
    else:
        print(f"predicted {r['predicted_ms']:.4f} ms on profile {r['profile']} "
              f"(measured / predicted = {r['measured_over_predicted']:.2f})")
    return 0
