"""Channel counts the runtime's blocked kernels take: channel pruning at a ratio as sampled, against
the same ratio with every group's kept count rounded up to the runtime's channel alignment (what
the search does on a calibrated profile: search.study.space.aligned_group_ratio), exported and timed.

    python -m bench.bench_aligned [--models mobilenetv2,resnet20] [--ratios 0.4,0.6] [--align A]

Every model at Fashion-MNIST shape from its initial variables (latency does not depend on the
weights), every prunable channel group at the ratio, fp32; each export timed in onnxruntime at
batch 1 on one thread, the fastest run of 3 x 0.3 s (search.export.kernel_probes.fastest_us).
The alignment defaults to the one calibration detects here (kernel_probes.nchwc_layout).
JSON to bench/out/bench_aligned.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def main(argv: list[str] | None = None) -> int:
    from bench.bench_costtruth import _task
    from search.compression.plan import CHANNEL, make_plan
    from search.cost.measure import session
    from search.engine.config import FinetuneConfig
    from search.engine.finetune import Engine
    from search.export.exporter import export_plan
    from search.export.kernel_probes import fastest_us, nchwc_layout
    from search.study.space import aligned_group_ratio

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv2,resnet20")
    ap.add_argument("--ratios", default="0.4,0.6")
    ap.add_argument("--align", type=int, default=None, help="channel alignment (default: detected)")
    args = ap.parse_args(argv)
    block, align = nchwc_layout()
    align = args.align or align
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            task = _task(model)
            variables = task.init_variables()
            engine = Engine(task, variables, FinetuneConfig(steps=0, k=1, eval_batch=256))
            layers = engine.layers
            for r in (float(x) for x in args.ratios.split(",")):
                plans = {"as sampled": [r if l.fixed is None else 0.0 for l in layers],
                         "aligned": [aligned_group_ratio(layers[l.group], r, align) if l.fixed is None else 0.0
                                     for l in layers]}  # as the search stores it
                for label, ratio in plans.items():
                    out = Path(tmp) / f"{model}-{r}-{label}"
                    res = export_plan(task, variables, make_plan(ratio, CHANNEL), out, engine=engine, force=True)
                    sess = session((out / "model.onnx").read_bytes(), 1)
                    x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape],
                                                        dtype=np.float32)
                    us = min(fastest_us(sess, x, 0.3) for _ in range(3))
                    kept = [l["onnx_out_channels"] for l in res.config["layers"]]
                    rows.append({"model": model, "ratio": r, "plan": label, "us": us, "out_channels": kept})
                    print(f"{model:12s} ratio {r:.2f} {label:10s} {us:8.1f} us  channels {kept[:6]} ...", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "bench_aligned.json"
    path.write_text(json.dumps({"channel_block": block, "channel_align": align, "rows": rows}, indent=1, default=float))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
