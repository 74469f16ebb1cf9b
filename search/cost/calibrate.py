"""Calibrate a hardware profile to this machine, two ways.

1. `measure_machine` + `calibrated_profile`: micro-benchmarks in onnxruntime, the runtime the
   exports run in, pinned to the same threads as `hwcompress measure`: fp32 and int8 matmul
   throughput (compute-bound shapes), conv and depthwise throughput (-> efficiencies), memory
   bandwidth of a batch-1 MatMul whose weights are far larger than the caches and of one whose
   weights stay in the last-level cache (-> onchip),
   and the fixed cost of one more operator. onnxruntime's CPU kernels are dense, so the profile
   says so: no unstructured or N:M speedup, 8-bit and fp32 kernels only (16 bits compute as 32).
2. `fit_profile(base, samples)`: refit the numbers of a profile to measured latencies of whole
   models, samples = [(layers, plan, measured_ms), ...] (e.g. exports timed by `measure`), by
   minimising the squared log error of the cost model's predictions (Nelder-Mead, scipy).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Sequence

import numpy as np

from hw_profiles import KERNELS, Budget, HardwareProfile, KernelModel, dump_profile, load_profile
from hw_profiles.schema import KERNEL_FEATURES
from search.compression import plan as P
from search.cost import kernels as K
from search.cost.roofline import latency_by_kernel, latency_features, price

MB = 1 << 20


def _model(nodes: list, inputs: list, outputs: list, inits: list) -> bytes:
    from onnx import helper

    graph = helper.make_graph(nodes, "calibrate", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def time_onnx(model: bytes, feeds: dict[str, np.ndarray], threads: int, min_s: float) -> float:
    """Median seconds of one run, after warm-up, over at least `min_s` seconds of runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, feeds)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _tensor(name: str, dtype: Any, shape: tuple[int, ...]) -> Any:
    from onnx import helper
    from onnx.helper import np_dtype_to_tensor_dtype

    return helper.make_tensor_value_info(name, np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


def _init(name: str, value: np.ndarray) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(value, name)


def _matmul_gops(dtype: str, m: int, k: int, n: int, threads: int, min_s: float) -> float:
    from onnx import helper

    rng = np.random.default_rng(0)
    if dtype == "fp32":
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((k, n)).astype(np.float32)
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        out = _tensor("y", np.float32, (m, n))
    else:  # u8 x u8 -> i32, the form the int8 exports use (u8s8 saturates on AVX2)
        x = rng.integers(0, 255, (m, k), dtype=np.uint8)
        w = rng.integers(0, 255, (k, n), dtype=np.uint8)
        node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
        out = _tensor("y", np.int32, (m, n))
    model = _model([node], [_tensor("x", x.dtype, x.shape)], [out], [_init("w", w)])
    return 2.0 * m * k * n / time_onnx(model, {"x": x}, threads, min_s) / 1e9


def _conv_gops(group: int, c: int, hw: int, threads: int, min_s: float) -> float:
    from onnx import helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((c, c // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[1, 1, 1, 1])
    model = _model([node], [_tensor("x", np.float32, x.shape)], [_tensor("y", np.float32, x.shape)], [_init("w", w)])
    macs = hw * hw * c * (c // group) * 9
    return 2.0 * macs / time_onnx(model, {"x": x}, threads, min_s) / 1e9


def _bandwidth_gbs(nbytes: int, threads: int, min_s: float) -> float:
    """A batch-1 fp32 MatMul whose weights are `nbytes`: the read a dense layer does."""
    from onnx import helper

    k = 1024
    n = max(nbytes // (4 * k), 16)
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = _model([node], [_tensor("x", np.float32, (1, k))], [_tensor("y", np.float32, (1, n))], [_init("w", w)])
    return w.nbytes / time_onnx(model, {"x": np.ones((1, k), np.float32)}, threads, min_s) / 1e9


def op_overhead_us(threads: int, min_s: float, n: int = 64) -> float:
    """The fixed cost of one operator: a chain of n tiny Relu ops against one."""
    from onnx import helper

    def chain(k: int) -> bytes:
        names = ["x"] + [f"t{i}" for i in range(k - 1)] + ["y"]
        nodes = [helper.make_node("Relu", [names[i]], [names[i + 1]]) for i in range(k)]
        return _model(nodes, [_tensor("x", np.float32, (1, 16))], [_tensor("y", np.float32, (1, 16))], [])

    x = {"x": np.ones((1, 16), np.float32)}
    return max((time_onnx(chain(n), x, threads, min_s) - time_onnx(chain(1), x, threads, min_s)) / (n - 1) * 1e6, 0.01)


def _cache_kb() -> float | None:
    """Size of this CPU's last-level data/unified cache in KiB, from sysfs."""
    best = None
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (idx / "type").read_text().strip() == "Instruction":
                continue
            size = (idx / "size").read_text().strip().upper()
            kb = float(size[:-1]) * (1024 if size.endswith("M") else 1) if size[-1] in "KM" else float(size) / 1024
        except (OSError, ValueError):
            continue
        best = kb if best is None else max(best, kb)
    return best


def measure_machine(threads: int = 1, min_s: float = 0.3) -> dict[str, float]:
    """Micro-benchmark this machine in onnxruntime; returns the measured numbers."""
    fp32 = _matmul_gops("fp32", 64, 512, 512, threads, min_s)
    int8 = _matmul_gops("int8", 64, 512, 512, threads, min_s)
    llc = _cache_kb() or 8192.0
    return {
        "threads": threads,
        "fp32_gops": fp32,
        "int8_gops": int8,
        "conv_gops": _conv_gops(1, 32, 28, threads, min_s),
        "depthwise_gops": _conv_gops(32, 32, 28, threads, min_s),
        "dram_gbs": _bandwidth_gbs(256 * MB, threads, min_s),
        "cache_gbs": _bandwidth_gbs(int(llc * 1024) // 8, threads, min_s),
        "llc_kb": llc,
        "op_overhead_us": op_overhead_us(threads, min_s),
        "memory_kb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024,
    }


def calibrated_profile(m: dict[str, float], name: str = "this-machine", kernels: KernelModel | None = None) -> HardwareProfile:
    """A cpu profile from measure_machine's numbers (efficiencies relative to the matmul peak);
    with `kernels` (search.export.kernel_timing.calibrate_kernels), latency comes from those
    kernel-level predictors and the roofline numbers serve memory and the lower bounds only."""
    fp32, int8 = m["fp32_gops"], max(m["int8_gops"], m["fp32_gops"])  # "fewer bits never slower"
    cache = max(m["cache_gbs"], m["dram_gbs"])
    return HardwareProfile(
        name=name, kind="cpu",
        description=f"this machine as onnxruntime runs on it ({int(m['threads'])} thread(s)), measured by hwcompress profiles calibrate",
        peak_gops=MappingProxyType({32: round(fp32, 2), 8: round(int8, 2)}),
        efficiency=MappingProxyType({"dense": 1.0, "conv": round(min(1.0, m["conv_gops"] / fp32), 3),
                                     "depthwise": round(min(1.0, m["depthwise_gops"] / fp32), 3)}),
        bandwidth_gbs=round(m["dram_gbs"], 2), bandwidth_efficiency=1.0,
        capacity_kb=round(m["memory_kb"], 0),
        onchip_kb=round(m["llc_kb"] / 2, 0), onchip_bandwidth_gbs=round(cache, 2),
        layer_overhead_us=round(m["op_overhead_us"], 3),
        weight_bits=(8, 32), act_bits=(8, 32), float_policy="native",
        fallback_gops=None, fallback_layer_us=None,
        unstructured_min_sparsity=None, unstructured_work_factor=1.0, nm_patterns=(),
        budget=Budget(), kernels=kernels,
    )


def profile_toml(profile: HardwareProfile, m: dict[str, float] | None = None, note: str = "",
                 command: str = "hwcompress profiles calibrate") -> str:
    """TOML text of a calibrated profile, every number with where it came from (`m`, the
    machine's measurements; without them, as for a fitted profile, no per-field notes), its
    header naming the `command` that wrote it."""
    t = f"onnxruntime, {int(m['threads'])} thread(s)" if m else "fitted"
    how = {
        "compute.fp32_gops": f"measured: fp32 MatMul 64x512x512 ({t})",
        "compute.int8_gops": f"measured: MatMulInteger u8 64x512x512 ({t}); never below fp32",
        "compute.efficiency_dense": "the dense peak is the matmul above",
        "compute.efficiency_conv": "measured: 3x3 Conv 32->32 at 28x28 / fp32 peak",
        "compute.efficiency_depthwise": "measured: 3x3 depthwise Conv 32 ch at 28x28 / fp32 peak",
        "memory.bandwidth_gbs": "measured: batch-1 MatMul reading 256 MiB of fp32 weights",
        "memory.bandwidth_efficiency": "the bandwidth above is what was reached",
        "memory.capacity_kb": "this machine's RAM (sysconf)",
        "memory.onchip_kb": "half the last-level cache (sysfs): a model this small stays cached between runs",
        "memory.onchip_bandwidth_gbs": "measured: batch-1 MatMul reading 1/8 of the last-level cache",
        "overhead.layer_us": "measured: 64 chained Relu ops against one",
        "precision.weight_bits": "onnxruntime CPU: 8-bit integer and fp32 kernels; 16 bits compute as fp32",
        "sparsity.unstructured_work_factor": "onnxruntime CPU has no sparse kernels: no speedup from sparsity",
        "latency_model": "latency from the [kernels] predictors below (learned from timed kernels), not the roofline",
        "kernels.inference_us": "measured: a one-Relu graph minus one operator (session run, input and output copies)",
        "kernels.samples": "one-layer probes in the export's forms, timed in onnxruntime (search.export.kernel_probes)",
        "kernels.channel_block": "detected: the channels onnxruntime pads a float conv's weights to in its NCHWc layout",
        "kernels.channel_align": "detected: the smallest channel step past the block that keeps a conv on NCHWc kernels",
        "kernels.q8u_block": "the channel block: q8u conv and depthwise probes are fitted with their output channels rounded up to it",
        "kernels.batch": "the batch the probes were timed at (--batch): every latency of this profile is one forward pass of it",
    }
    if profile.kernels is not None:
        how.update({f"kernels.{k}": f"us per {', '.join(KERNEL_FEATURES)}: non-negative least squares on the relative "
                    "error of the timed probes" for k in KERNELS})
    header = (f"{profile.description}.\nWritten {time.strftime('%Y-%m-%d %H:%M')} by `{command}`"
              + (f"; {note}" if note else "") + ".")
    return dump_profile(profile, comments=how if m else {}, header=header)


# ------------------------------------------------------------------- fitting to measurements

# the profile fields fit_profile scales, in the order of its log scale factors theta
FIT_FIELDS = ("fp32", "int8", "eff_conv", "eff_depthwise", "bandwidth", "onchip_bw", "layer_us")


def scaled_profile(base: HardwareProfile, theta: np.ndarray) -> HardwareProfile:
    """`base` with each FIT_FIELDS value scaled by exp(theta[i]) (theta: [len(FIT_FIELDS)] logs)."""
    v = dict(zip(FIT_FIELDS, np.exp(theta)))
    peak = {b: g * (v["fp32"] if b == 32 else v["int8"]) for b, g in base.peak_gops.items()}
    if 8 in peak:
        peak[8] = max(peak[8], max(peak.values()))  # "fewer bits never slower" stays true
    bw = base.bandwidth_gbs * v["bandwidth"]
    onchip = None if base.onchip_bandwidth_gbs is None else max(bw, base.onchip_bandwidth_gbs * v["onchip_bw"])
    eff = dict(base.efficiency)
    eff["conv"] = min(1.0, eff["conv"] * v["eff_conv"])
    eff["depthwise"] = min(1.0, eff["depthwise"] * v["eff_depthwise"])
    return dataclasses.replace(
        base, peak_gops=MappingProxyType(peak), efficiency=MappingProxyType(eff), bandwidth_gbs=bw,
        onchip_bandwidth_gbs=onchip, layer_overhead_us=max(base.layer_overhead_us, 1e-3) * v["layer_us"],
    )


KERNEL_FITS = ("scales", "coefficients")  # how fit_profile refits a kernel-level profile


def _fit_kernels(base: HardwareProfile, samples: Sequence[tuple[Sequence[Any], Any, float]], name: str | None,
                 prior: float, kernel_fit: str) -> HardwareProfile:
    """fit_profile for a kernel-level profile: "scales", one scale per kernel kind and for the
    per-inference term (search.cost.kernels.fit_to_models), or "coefficients", every predictor
    coefficient (kernels.fit_coefficients); both keep every coefficient >= 0 (monotone)."""
    measured = np.array([ms for _, _, ms in samples], np.float64)
    if kernel_fit == "coefficients":
        sums = np.concatenate([latency_features(base, layers, P.stack_plans([plan])) for layers, plan, _ in samples])
        model = K.fit_coefficients(base.kernels, sums, measured, prior=0.3 if prior is None else prior)
    else:
        by_kind = np.concatenate([latency_by_kernel(base, layers, P.stack_plans([plan])) for layers, plan, _ in samples])
        model = K.fit_to_models(base.kernels, by_kind, measured, prior=0.5 if prior is None else prior)
    model = dataclasses.replace(model, runtime=f"{base.kernels.runtime}; {kernel_fit} fitted to {len(samples)} measured models")
    return dataclasses.replace(base, kernels=model, name=name or f"{base.name}-fitted",
                               description=f"{base.description}; fitted to {len(samples)} measured latencies")


def fit_profile(base: HardwareProfile | str, samples: Sequence[tuple[Sequence[Any], Any, float]],
                name: str | None = None, iters: int = 3000, prior: float | None = None,
                kernel_fit: str = "scales") -> HardwareProfile:
    """`base` with its throughputs, conv efficiencies, bandwidths and per-layer overhead scaled
    to fit measured latencies: samples = [(layers, plan [L], measured_ms), ...].

    Minimises the mean squared log ratio of predicted to measured latency (Nelder-Mead over
    log scale factors, a few restarts); the form of the profile (kernels, sparsity) is kept.
    A profile with kernel-level predictors instead gets one scale per kernel kind and one for
    the per-inference term (bounded linear least squares on the relative error, each scale pulled
    toward 1 with weight `prior` (None: 0.5): search.cost.kernels.fit_to_models), or with
    kernel_fit = "coefficients" every predictor coefficient (kernels.fit_coefficients; `prior`
    None: 0.3).

    Raises:
        ValueError: kernel_fit not one of KERNEL_FITS.
    """
    if kernel_fit not in KERNEL_FITS:
        raise ValueError(f"kernel_fit {kernel_fit!r} is not one of {KERNEL_FITS}")
    from scipy.optimize import minimize

    base = load_profile(base)
    if base.kernels is not None:
        return _fit_kernels(base, samples, name, prior, kernel_fit)
    groups: dict[int, tuple[Sequence[Any], list[Any], list[float]]] = {}
    for layers, plan, ms in samples:
        g = groups.setdefault(id(layers), (layers, [], []))
        g[1].append(plan)
        g[2].append(float(ms))
    stacked = [(layers, P.stack_plans(plans), np.log(np.asarray(ms))) for layers, plans, ms in groups.values()]

    def loss(theta: np.ndarray) -> float:
        prof = scaled_profile(base, theta)
        err = [np.log(np.asarray(price(prof, layers, plans).latency_ms)) - logms for layers, plans, logms in stacked]
        return float(np.mean(np.concatenate(err) ** 2))

    best = None
    for start in (np.zeros(len(FIT_FIELDS)), np.full(len(FIT_FIELDS), -1.0), np.full(len(FIT_FIELDS), 1.0)):
        res = minimize(loss, start, method="Nelder-Mead", options={"maxiter": iters, "xatol": 1e-4, "fatol": 1e-9})
        if best is None or res.fun < best.fun:
            best = res
    for _ in range(3):  # restart from the best simplex: Nelder-Mead stalls on the roofline's kinks
        res = minimize(loss, best.x, method="Nelder-Mead", options={"maxiter": iters, "xatol": 1e-5, "fatol": 1e-10})
        if res.fun >= best.fun * (1 - 1e-3):
            best = res if res.fun < best.fun else best
            break
        best = res
    fitted = scaled_profile(base, best.x)
    return dataclasses.replace(fitted, name=name or f"{base.name}-fitted",
                               description=f"{base.description}; fitted to {len(samples)} measured latencies")
