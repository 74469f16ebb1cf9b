"""Cost-model speed: plans priced per second for a 20-layer model (target >= 10,000/s).

    python -m bench.bench_cost [--plans K]

A 20-layer CNN-like stack (convs, depthwise convs and dense layers), K random plans priced in
one vectorised call on every shipped profile (roofline latency) and on a profile with
kernel-level predictors (search.cost.kernels; `--profile FILE` adds calibrated ones, e.g. from
`hwcompress profiles calibrate`: the work does not depend on the coefficients' values, so without
one a synthetic set stands in); JSON to bench/out/bench_cost.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from types import MappingProxyType

import numpy as np

from hw_profiles import KERNELS, KernelModel, list_profiles, load_profile
from search.compression import plan as P
from search.cost.roofline import price
from search.compression.layers import Layer

OUT = Path(__file__).resolve().parent / "out"


def twenty_layers() -> tuple[Layer, ...]:
    layers, c, hw = [], 3, 32
    for i in range(20):
        if i >= 17:  # dense head
            n_in, n_out = (c * hw * hw if i == 17 else 256), (256 if i < 19 else 10)
            layers.append(Layer(i, f"fc{i}", (f"fc{i}",), "dense", (n_in, n_out), (n_in,), (n_out,), 1, True,
                                n_in * n_out, n_in * n_out + n_out))
            c = n_out
            continue
        if i % 2 == 1:  # depthwise 3x3
            layers.append(Layer(i, f"dw{i}", (f"dw{i}",), "depthwise", (3, 3, 1, c), (hw, hw, c), (hw, hw, c), c, True,
                                hw * hw * c * 9, 9 * c + c))
            continue
        out = min(32 * (1 + i // 4), 128)
        if i % 4 == 0 and i:
            hw //= 2
        layers.append(Layer(i, f"conv{i}", (f"conv{i}",), "conv", (3, 3, c, out), (hw, hw, c), (hw, hw, out), 1, True,
                            hw * hw * out * 9 * c, 9 * c * out + out))
        c = out
    return tuple(layers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", type=int, default=4096, help="plans per call (default 4096)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="append", default=[], help="also a profile TOML (repeatable)")
    args = ap.parse_args(argv)
    layers = twenty_layers()
    rng = np.random.default_rng(0)
    k, n = args.plans, len(layers)
    plans = P.Plan(ratio=rng.uniform(0, P.MAX_RATIO, (k, n)).astype(np.float32),
                   granularity=rng.integers(0, 3, (k, n)).astype(np.int32),
                   weight_bits=rng.choice(P.WEIGHT_BITS, (k, n)).astype(np.int32),
                   act_bits=rng.choice(P.ACT_BITS, (k, n)).astype(np.int32),
                   quant_mode=rng.integers(0, 2, (k, n)).astype(np.int32),
                   rank=np.ones((k, n), np.float32), form=np.zeros((k, n), np.int32))
    rows = {}
    kernels = KernelModel(inference_us=10.0, coef=MappingProxyType({k: (1.0,) + (1e-3,) * 7 for k in KERNELS}), runtime="synthetic")
    profiles = [load_profile(n) for n in list_profiles()] + [dataclasses.replace(load_profile("xeon"), name="kernels", kernels=kernels)]
    profiles += [load_profile(f) for f in args.profile]
    for prof in profiles:
        name = prof.name
        price(prof, layers, plans)  # warm the layer-array cache
        best = min(_timed(lambda: price(prof, layers, plans)) for _ in range(args.repeats))
        first = P.Plan(*(np.asarray(getattr(plans, f))[:1] for f in ("ratio", "granularity", "weight_bits", "act_bits", "quant_mode", "rank", "form")))
        one = min(_timed(lambda: price(prof, layers, first)) for _ in range(20))
        rows[name] = {"plans_per_s": k / best, "batch_seconds": best, "single_plan_us": one * 1e6}
        print(f"{name:11s} {k / best:12,.0f} plans/s in batches of {k}; one plan {one * 1e6:7.1f} us")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_cost.json").write_text(json.dumps({"layers": n, "plans": k, "profiles": rows}, indent=1))
    worst = min(r["plans_per_s"] for r in rows.values())
    print(f"slowest profile: {worst:,.0f} plans/s (target >= 10,000) -> bench/out/bench_cost.json")
    return 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    raise SystemExit(main())
