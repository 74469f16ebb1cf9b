"""Channel counts the runtime's blocked kernels take, exported and timed, in two parts:

- channel: channel pruning at a ratio as sampled, against the same ratio with every group's kept
  count rounded up to the runtime's channel alignment (what the search does on a calibrated
  profile: search.study.space.aligned_group_ratio);
- unstructured: unstructured pruning at the ratio (fp32 and w4a8), whose all-zero output channels
  the export drops: every one (a profile without a kernel model), against only down to the
  runtime's alignment (a calibrated profile: search.export.exporter.channel_alignment).

    python -m bench.bench_aligned [--parts channel,unstructured] [--models mobilenetv2,resnet20] [--ratios 0.4,0.6] [--align A]

Every model at Fashion-MNIST shape from its initial variables (latency does not depend on the
weights, and initial weights empty channels under unstructured pruning as trained ones do), every
prunable group at the ratio; each export timed in onnxruntime at batch 1 on one thread, the
fastest run of 3 x 0.3 s (search.export.kernel_timing.fastest_us). The channel block and
alignment default to the ones calibration detects here (kernel_probes.nchwc_layout).
JSON to bench/out/bench_aligned.json (bench_aligned_<part>.json for one part).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from types import MappingProxyType

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def main(argv: list[str] | None = None) -> int:
    from bench.bench_costtruth import _task
    from search.compression.plan import CHANNEL, make_plan
    from search.cost.measure import session
    from search.engine.config import FinetuneConfig
    from search.engine.finetune import Engine
    from search.export.exporter import export_plan
    from search.export.kernel_probes import nchwc_layout
    from search.export.kernel_timing import fastest_us
    from search.study.space import aligned_group_ratio
    from hw_profiles import KERNELS, KernelModel, load_profile
    from hw_profiles.schema import KERNEL_FEATURES
    from search.compression.plan import UNSTRUCTURED

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv2,resnet20")
    ap.add_argument("--ratios", default="0.4,0.6")
    ap.add_argument("--align", type=int, default=None, help="channel alignment (default: detected)")
    ap.add_argument("--parts", default="channel,unstructured")
    args = ap.parse_args(argv)
    block, align = nchwc_layout()
    align = args.align or align
    parts = set(args.parts.split(","))
    # a profile that says only what the runtime's kernels want (the export's channel_alignment)
    runtime = dataclasses.replace(load_profile("xeon"), name="runtime", kernels=KernelModel(
        0.0, MappingProxyType({k: (0.0,) * len(KERNEL_FEATURES) for k in KERNELS}), "bench_aligned",
        channel_block=block, channel_align=align, q8u_block=block))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            task = _task(model)
            variables = task.init_variables()
            engine = Engine(task, variables, FinetuneConfig(steps=0, k=1, eval_batch=256))
            layers = engine.layers
            for r in (float(x) for x in args.ratios.split(",")):
                runs = []  # (label, plan, profile)
                if "channel" in parts:
                    runs += [("as sampled", make_plan([r if l.fixed is None else 0.0 for l in layers], CHANNEL), None),
                             ("aligned", make_plan([aligned_group_ratio(layers[l.group], r, align) if l.fixed is None else 0.0
                                                    for l in layers], CHANNEL), None)]  # as the search stores it
                if "unstructured" in parts:
                    runs.append(("dense", make_plan([0.0] * len(layers)), None))
                    for wb, ab in ((32, 32), (4, 8)):
                        plan = make_plan([r if l.fixed is None else 0.0 for l in layers], UNSTRUCTURED, wb, ab)
                        tag = "unstructured" + ("" if wb == 32 else f" w{wb}a{ab}")
                        runs += [(f"{tag}, every empty channel dropped", plan, None),
                                 (f"{tag}, aligned", plan, runtime)]
                for label, plan, profile in runs:
                    out = Path(tmp) / f"{model}-{r}-{label}".replace(" ", "_").replace(",", "")
                    res = export_plan(task, variables, plan, out, engine=engine, force=True, profile=profile)
                    sess = session((out / "model.onnx").read_bytes(), 1)
                    x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape],
                                                        dtype=np.float32)
                    us = min(fastest_us(sess, x, 0.3) for _ in range(3))
                    kept = [l["onnx_out_channels"] for l in res.config["layers"]]
                    rows.append({"model": model, "ratio": r, "plan": label, "us": us, "out_channels": kept,
                                 "onnx_agreement": res.onnx_agreement})
                    print(f"{model:12s} ratio {r:.2f} {label:40s} {us:8.1f} us  channels {kept[:8]} ...", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / ("bench_aligned.json" if parts >= {"channel", "unstructured"} else f"bench_aligned_{'_'.join(sorted(parts))}.json")
    path.write_text(json.dumps({"channel_block": block, "channel_align": align, "rows": rows}, indent=1, default=float))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
