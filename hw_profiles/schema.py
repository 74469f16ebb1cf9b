"""The typed value objects of a hardware profile, and their validation from parsed TOML.

Every field of the TOML file is declared once in `FIELDS` (section, key, what is expected);
`build_profile` walks that table, so a missing field, a wrong type, an out-of-range value and
an unknown key (a typo) all produce the same one-line ProfileError naming the file, the field,
the value and what was expected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

KINDS = ("cpu", "gpu", "mobile", "npu", "mcu")
LAYER_KINDS = ("dense", "conv", "depthwise")
FLOAT_POLICIES = ("native", "fallback", "disallow")
PRECISIONS = {"fp32_gops": 32, "fp16_gops": 16, "int8_gops": 8, "int4_gops": 4}
BIT_WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
LATENCY_MODELS = ("roofline", "kernels")
# kernel-level latency (search.cost.kernels): what the runtime runs for one layer, by layer kind and
# form: f32 (float kernel), q8 (integer kernel chained to the next integer layer: QLinearConv /
# QGemm) with weights of at most 7 bits (int8: onnxruntime's u8s8 kernels), q8u (the same with
# 8-bit weights, stored as uint8 with zero point 128, exact on every x86 CPU: the u8u8 kernels,
# measured 1.7-2x slower on an AVX-512 VNNI host), i8 (integer kernel with float output:
# ConvInteger / MatMulInteger + Cast + Mul, whose weights are always uint8), f32p (a float conv
# off the blocked NCHWc path, on the runtime's plain im2col or grouped kernels: channel counts
# that are not multiples of KernelModel.channel_align; a depthwise one measured 8x slower), f32n
# (a blocked 1x1 float conv reading fewer input channels than the block, in NCHW: onnxruntime's
# NCHW kernel, made for image stems, where such a conv with 4-12 input channels measured 3-5x the
# time the NCHWc-input (pointwise) predictor gives it; heavily channel-pruned layers run it), f32nk
# (the same for a kxk conv: image stems, convs reading a layer pruned below the block; calibrated with
# the f32 predictor, a kind of its own for a fit on exports to scale), q8p
# (a q8 conv or depthwise conv whose output channels are not a multiple of
# KernelModel.channel_block: onnxruntime's int8 kernels then run their per-channel remainder
# path; a depthwise one measured 2-3x slower on an AVX-512 host); and
# `emul`, a float layer's input activation rounding done in float ops (Div, Round, Add, Clip, Sub, Mul);
# `eltwise`, one unfused elementwise or pooling op on a layer's output (MaxPool, Add, Transpose, a
# layout reorder; calibrated on ReLU, MaxPool, Add and Transpose), charged as many times as the
# runtime runs such ops after the layer (search.cost.runtime_graph.eltwise_count); and
# `pool_u8`, a max pooling run on uint8 in NCHW: onnxruntime moves an integer layer's input
# quantization ahead of the max pooling between it and a float producer, and its uint8 MaxPool
# is a plain loop, about 10x slower per element than the float one (search.cost.runtime_graph.u8_pooled);
# `clip`, a bounded activation (ReLU6, one Clip) after a float conv on the blocked NCHWc kernels:
# onnxruntime fuses it into the conv, but MLAS's NCHWc kernels fuse only ReLU and run any other
# activation as a pass of its own over the conv's output (0.05-0.14 us per 1000 elements on an
# AVX-512 host; MobileNetV2's ReLU6s are 18-21% of its float latency)
KERNEL_FORMS = ("f32", "q8", "i8", "q8u", "f32p", "q8p", "f32n", "f32nk")
KERNELS = tuple(f"{k}_{f}" for k in LAYER_KINDS for f in KERNEL_FORMS) + ("emul", "eltwise", "pool_u8", "clip", "kron")
# a profile calibrated before q8u, f32p, q8p, f32n, f32nk, pool_u8, clip and kron existed prices them as its
# q8, f32, q8, f32, f32, eltwise, eltwise and dense_f32 kernels (kron, a Kronecker-factorized Dense layer
# as the export writes it, then costs what its two float matmuls cost as dense_f32 kernels)
# (Dense layers never run f32p, q8p, f32n or f32nk, depthwise convs never f32n or f32nk: they keep the f32 and q8
# coefficients)
KERNEL_FALLBACK = {f"{k}_q8u": f"{k}_q8" for k in LAYER_KINDS} | {f"{k}_f32p": f"{k}_f32" for k in LAYER_KINDS} \
    | {f"{k}_q8p": f"{k}_q8" for k in LAYER_KINDS} | {f"{k}_f32n": f"{k}_f32" for k in LAYER_KINDS} \
    | {f"{k}_f32nk": f"{k}_f32" for k in LAYER_KINDS} \
    | {"pool_u8": "eltwise", "clip": "eltwise", "kron": "dense_f32"}
# what one coefficient multiplies: the monomials of a kernel's GEMM dimensions, per example, after
# channel removal: M output positions (1 for Dense), N output channels, K fan-in (kh*kw*in/groups),
# and MT, positions times the kernel's taps T (kh*kw; 1 for Dense): im2col copies each tap's
# input channels per output position, a cost per tap whatever their count (an image stem with 1
# or 3 input channels pays it at full resolution). Non-negative coefficients on 1, M, N, K, MN,
# MK, NK, MNK, MT are a sum of fixed costs per call, per position, per channel, ..., per MAC:
# saturating efficiencies in each dimension, never non-monotone.
KERNEL_FEATURES = ("1", "M", "N", "K", "MN", "MK", "NK", "MNK", "MT")
# a profile calibrated before MT existed holds 8 coefficients per kernel: its MT term is 0
OLD_FEATURES = 8


def fallback_row(name: str, coef: Mapping[str, Sequence[float]]) -> tuple[float, ...]:
    """The coefficients of a kernel kind a profile has no row for (calibrated before the kind
    existed): its fallback's row (KERNEL_FALLBACK). For `kron`, whose features count the layer on
    "1" and its broadcast GEMM's r calls on "MT" (search.cost.kernels.kron_features), dense_f32's
    row with its per-call term on MT too: the profile then prices a Kronecker layer as r + 1
    dense_f32 GEMM calls, as it did before kron existed."""
    row = list(coef[KERNEL_FALLBACK[name]])
    if name == "kron":
        row += [0.0] * (len(KERNEL_FEATURES) - len(row))
        row[KERNEL_FEATURES.index("MT")] += row[0]
    return tuple(row)


class ProfileError(ValueError):
    """Bad input about a hardware profile: an unknown name, an unreadable or malformed file,
    or a field that is missing, of the wrong type or out of range.

    The message is one line naming the file or profile, the field, its value and the fix.
    The CLI prints `error: <message>` and exits 2.
    """


@dataclass(frozen=True)
class Budget:
    """Default per-device budget; None means unbounded. All for one example (batch 1)."""

    latency_ms: float | None = None  # predicted latency of one forward pass, milliseconds
    memory_kb: float | None = None  # packed weights + peak activations, KiB (1024 bytes)
    size_kb: float | None = None  # packed model size (weights, indices, scales, biases), KiB


@dataclass(frozen=True)
class KernelModel:
    """Kernel-level latency predictors learned from measurements (`hwcompress profiles calibrate`).

    Latency of one inference (microseconds) = inference_us + the sum over layers of
    coef[kernel] . features, features = KERNEL_FEATURES of the layer as exported (search.cost.kernels).
    Every coefficient is >= 0, so more channels, MACs or elements never predict a faster kernel.
    """

    inference_us: float  # per-inference cost: session run, input and output copies, microseconds
    # KERNELS name -> one coefficient per KERNEL_FEATURES (us per unit); rows written before MT
    # existed (OLD_FEATURES long) get a 0 for it
    coef: Mapping[str, tuple[float, ...]]
    runtime: str  # what was measured: runtime, version, execution provider, threads, batch
    samples: int = 0  # kernels timed to fit them
    # channels the runtime's float convolutions compute in blocks of: onnxruntime's CPU provider
    # runs them in its NCHWc layout (MLAS), channel counts rounded up to 16 with AVX-512, 8 with
    # AVX2 (search.cost.kernels.blocked); 1 = no blocking (older profiles)
    channel_block: int = 1
    # the channel multiple that keeps a float conv on those blocks: onnxruntime runs a conv whose
    # channel counts are not multiples of it (input counts below the block excepted) on its plain
    # kernels (kernel form f32p); 4 on the AVX-512 host measured, 1 = every count (older profiles)
    channel_align: int = 1
    # output channels a QLinear conv or depthwise conv with 8-bit (uint8-stored) weights, the q8u
    # form, is priced at, rounded up to this multiple: onnxruntime's u8u8 int8 kernels compute
    # whole SIMD blocks (search.cost.kernels.q8u_channels); the channel block when calibrated,
    # 1 = as kept (profiles calibrated before it, whose q8u predictors were fitted that way)
    q8u_block: int = 1
    # examples per inference the predictors were measured at and every latency of the profile is
    # for (one forward pass of `batch` examples): 1 for a phone or an interactive server, a server
    # batch such as 32 for throughput; the features' M counts positions x batch
    batch: int = 1

    def __post_init__(self) -> None:
        n = len(KERNEL_FEATURES)
        coef = dict(self.coef)
        for k in KERNELS:  # a kind calibrated after the model was made: its fallback's predictor
            if k not in coef and KERNEL_FALLBACK.get(k) in coef:
                coef[k] = fallback_row(k, coef)
        if len(coef) != len(self.coef) or any(len(v) != n for v in coef.values()):  # an older row: no per-tap term
            padded = {k: tuple(v) + (0.0,) * (n - len(v)) for k, v in coef.items()}
            object.__setattr__(self, "coef", MappingProxyType(padded))


@dataclass(frozen=True)
class HardwareProfile:
    """What one device accelerates and how fast; loaded from hw_profiles/<name>.toml."""

    name: str  # registry name, e.g. "mcu"
    kind: str  # cpu | gpu | mobile | npu | mcu
    description: str  # one line: the device this profile models
    peak_gops: Mapping[int, float]  # compute width (32 fp32, 16 fp16/int16, 8 int8, 4 int4) -> peak dense GOPS, 1 MAC = 2 ops
    efficiency: Mapping[str, float]  # layer kind (dense, conv, depthwise) -> fraction of peak reached, (0, 1]
    bandwidth_gbs: float  # main-memory bandwidth, GB/s (1e9 bytes)
    bandwidth_efficiency: float  # fraction of bandwidth reached, (0, 1]
    capacity_kb: float  # memory available to the model, KiB
    onchip_kb: float | None  # on-chip SRAM / cache; a model whose memory fits runs at onchip_bandwidth_gbs
    onchip_bandwidth_gbs: float | None  # bandwidth when the whole model fits on chip, GB/s
    layer_overhead_us: float  # fixed cost per layer (dispatch, kernel launch), microseconds
    weight_bits: tuple[int, ...]  # weight widths with real kernels; others compute at the next wider one
    act_bits: tuple[int, ...]  # activation widths with real kernels; same rule
    float_policy: str  # when no kernel is wide enough: native (fp32 kernels exist) | fallback (host CPU) | disallow (inf)
    fallback_gops: float | None  # host CPU peak GOPS for fallback layers
    fallback_layer_us: float | None  # per-layer cost of a fallback layer (hand-off to the CPU), microseconds
    unstructured_min_sparsity: float | None  # unstructured sparsity speeds up only at or above this; None = never
    unstructured_work_factor: float  # cost of one sparse nonzero MAC relative to a dense MAC (index decoding)
    nm_patterns: tuple[tuple[int, int], ...]  # (N, M): keep N of every M weights, accelerated (e.g. (2, 4))
    budget: Budget  # default budget for searches on this device
    source: str = ""  # the file it was loaded from
    kernels: KernelModel | None = None  # latency_model = "kernels": learned predictors replace the roofline's latency


# ---------------------------------------------------------------- field checks


@dataclass(frozen=True)
class _Field:
    expected: str  # the words an error uses for "what is expected"
    check: Callable[[Any], str | None]  # returns None when fine, else "wrong type" / "out of range"
    required: bool = True


def _number(lo: float, hi: float = math.inf, lo_open: bool = True) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"wrong type {type(v).__name__}"
        if not math.isfinite(v) or (v <= lo if lo_open else v < lo) or v > hi:
            return "out of range"
        return None

    return check


def _count(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"wrong type {type(v).__name__}"
        return None if lo <= v <= hi else "out of range"

    return check


def _string(choices: tuple[str, ...] | None = None) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"wrong type {type(v).__name__}"
        if not v.strip() or (choices is not None and v not in choices):
            return "not allowed"
        return None

    return check


def _bits(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in v):
        return f"wrong type {type(v).__name__}"
    if not v or any(b not in BIT_WIDTHS for b in v) or len(set(v)) != len(v):
        return "not allowed"
    return None


def _coefs(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return f"wrong type {type(v).__name__}"
    if len(v) not in (OLD_FEATURES, len(KERNEL_FEATURES)):
        return f"{len(v)} values"
    if any(not math.isfinite(x) or x < 0 for x in v):
        return "out of range"
    return None


def _patterns(v: Any) -> str | None:
    ok = isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
        for p in v
    )
    if not ok:
        return f"wrong type {type(v).__name__}"
    if any(not 0 < n < m for n, m in v):
        return "out of range"
    return None


_POS = "a positive number"
_FRAC = "a number in (0, 1]"
FIELDS: dict[str, dict[str, _Field]] = {
    "": {
        "name": _Field("a non-empty string", _string()),
        "kind": _Field(f"one of {list(KINDS)}", _string(KINDS)),
        "description": _Field("a non-empty string", _string()),
        "latency_model": _Field(f"one of {list(LATENCY_MODELS)}", _string(LATENCY_MODELS), required=False),
    },
    "compute": {
        "fp32_gops": _Field(f"{_POS} (peak fp32 GOPS)", _number(0), required=False),
        "fp16_gops": _Field(f"{_POS} (peak 16-bit GOPS)", _number(0), required=False),
        "int8_gops": _Field(f"{_POS} (peak int8 GOPS)", _number(0), required=False),
        "int4_gops": _Field(f"{_POS} (peak int4 GOPS)", _number(0), required=False),
        "efficiency_dense": _Field(_FRAC, _number(0, 1)),
        "efficiency_conv": _Field(_FRAC, _number(0, 1)),
        "efficiency_depthwise": _Field(_FRAC, _number(0, 1)),
    },
    "memory": {
        "bandwidth_gbs": _Field(f"{_POS} (GB/s)", _number(0)),
        "bandwidth_efficiency": _Field(_FRAC, _number(0, 1)),
        "capacity_kb": _Field(f"{_POS} (KiB)", _number(0)),
        "onchip_kb": _Field(f"{_POS} (KiB)", _number(0), required=False),
        "onchip_bandwidth_gbs": _Field(f"{_POS} (GB/s)", _number(0), required=False),
    },
    "overhead": {
        "layer_us": _Field("a number >= 0 (microseconds)", _number(0, lo_open=False)),
    },
    "precision": {
        "weight_bits": _Field(f"a non-empty list of distinct widths from {list(BIT_WIDTHS)}", _bits),
        "act_bits": _Field(f"a non-empty list of distinct widths from {list(BIT_WIDTHS)}", _bits),
        "float": _Field(f"one of {list(FLOAT_POLICIES)}", _string(FLOAT_POLICIES)),
        "fallback_gops": _Field(f"{_POS} (host CPU GOPS)", _number(0), required=False),
        "fallback_layer_us": _Field("a number >= 0 (microseconds)", _number(0, lo_open=False), required=False),
    },
    "sparsity": {
        "unstructured_min_sparsity": _Field("a number in [0, 1)", _number(0, 0.999999, lo_open=False), required=False),
        "unstructured_work_factor": _Field("a number >= 1", _number(1, lo_open=False), required=False),
        "nm_patterns": _Field("a list of [N, M] pairs with 0 < N < M", _patterns, required=False),
    },
    "kernels": {
        "runtime": _Field("a non-empty string (what was measured)", _string(), required=False),
        "samples": _Field("a number >= 0 (kernels timed)", _number(0, lo_open=False), required=False),
        "inference_us": _Field("a number >= 0 (microseconds per inference)", _number(0, lo_open=False), required=False),
        "channel_block": _Field("an integer in [1, 1024] (channels per block of the float conv kernels)", _count(1, 1024), required=False),
        "channel_align": _Field("an integer in [1, 1024] (channel multiple of the blocked float conv kernels)", _count(1, 1024), required=False),
        "q8u_block": _Field("an integer in [1, 1024] (channel multiple the uint8-weight int8 conv kernels compute)", _count(1, 1024), required=False),
        "batch": _Field("an integer in [1, 4096] (examples per inference the latency is for)", _count(1, 4096), required=False),
        **{k: _Field(f"a list of {len(KERNEL_FEATURES)} numbers >= 0 (us per {', '.join(KERNEL_FEATURES)}; "
                     f"the first {OLD_FEATURES} in a profile calibrated before MT)", _coefs, required=False)
           for k in KERNELS},
    },
    "budget": {
        "latency_ms": _Field(f"{_POS} in ms (omit for unbounded)", _number(0), required=False),
        "memory_kb": _Field(f"{_POS} in KiB (omit for unbounded)", _number(0), required=False),
        "size_kb": _Field(f"{_POS} in KiB (omit for unbounded)", _number(0), required=False),
    },
}
_MISSING = object()


def _error(source: str, field: str, value: Any, problem: str, expected: str) -> ProfileError:
    shown = "<missing>" if value is _MISSING else repr(value)
    return ProfileError(f"{source}: field '{field}' = {shown} ({problem}); expected {expected}")


def _read(data: dict, source: str) -> dict[str, dict[str, Any]]:
    """Check every section and key against FIELDS; return {section: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    sections = [k for k in FIELDS if k]
    for key, value in data.items():  # unknown top-level keys or sections
        if key not in FIELDS[""] and key not in sections:
            allowed = list(FIELDS[""]) + [f"[{s}]" for s in sections]
            raise _error(source, key, value, "unknown field", f"one of {allowed}")
    for section, fields in FIELDS.items():
        table = data if not section else data.get(section, {})
        if not isinstance(table, dict):
            raise _error(source, section, table, "wrong type", "a [table]")
        if section:
            for key, value in table.items():
                if key not in fields:
                    raise _error(source, f"{section}.{key}", value, "unknown field", f"one of {list(fields)}")
        out[section] = {}
        for key, spec in fields.items():
            path = f"{section}.{key}" if section else key
            value = table.get(key, _MISSING)
            if value is _MISSING:
                if spec.required:
                    raise _error(source, path, value, "missing", spec.expected)
                continue
            problem = spec.check(value)
            if problem:
                raise _error(source, path, value, problem, spec.expected)
            out[section][key] = value
    return out


def build_profile(data: dict, source: str) -> HardwareProfile:
    """Validate parsed TOML into a HardwareProfile; raise ProfileError naming file, field, value."""
    f = _read(data, source)
    c, m, p, s, b = f["compute"], f["memory"], f["precision"], f["sparsity"], f["budget"]
    peak = {bits: float(c[k]) for k, bits in PRECISIONS.items() if k in c}
    if not peak:
        raise _error(source, "compute.fp32_gops", _MISSING, "missing", f"at least one of {list(PRECISIONS)}")
    if p["float"] == "native" and 32 not in peak:
        raise _error(source, "compute.fp32_gops", _MISSING, "missing", "a positive number when precision.float = 'native'")
    if p["float"] == "native" and (32 not in p["weight_bits"] or 32 not in p["act_bits"]):
        raise _error(source, "precision.weight_bits", p["weight_bits"], "no 32", "32 in weight_bits and act_bits when precision.float = 'native'")
    for key in ("weight_bits", "act_bits"):  # every listed width needs a kernel at least that wide
        for bits in p[key]:
            if bits != 32 and not any(w >= bits for w in peak):
                raise _error(source, f"precision.{key}", p[key], f"no peak for {bits} bits", "a compute.*_gops entry at least that wide")
    if p["float"] == "fallback":
        for key in ("fallback_gops", "fallback_layer_us"):
            if key not in p:
                raise _error(source, f"precision.{key}", _MISSING, "missing", "a number when precision.float = 'fallback'")
        if p["fallback_gops"] > min(peak.values()):  # keeps "fewer bits never slower" true
            raise _error(source, "precision.fallback_gops", p["fallback_gops"], "out of range", f"at most the slowest peak ({min(peak.values())})")
        if p["fallback_layer_us"] < f["overhead"]["layer_us"]:
            raise _error(source, "precision.fallback_layer_us", p["fallback_layer_us"], "out of range", f">= overhead.layer_us ({f['overhead']['layer_us']})")
    if ("onchip_kb" in m) != ("onchip_bandwidth_gbs" in m):
        raise _error(source, "memory.onchip_kb", m.get("onchip_kb", _MISSING), "incomplete", "onchip_kb and onchip_bandwidth_gbs together or neither")
    if m.get("onchip_bandwidth_gbs", math.inf) < m["bandwidth_gbs"]:
        raise _error(source, "memory.onchip_bandwidth_gbs", m["onchip_bandwidth_gbs"], "out of range", f">= memory.bandwidth_gbs ({m['bandwidth_gbs']})")
    if b.get("memory_kb", 0) > m["capacity_kb"]:
        raise _error(source, "budget.memory_kb", b["memory_kb"], "out of range", f"at most memory.capacity_kb ({m['capacity_kb']})")
    budget = Budget(*(float(b[k]) if k in b else None for k in ("latency_ms", "memory_kb", "size_kb")))
    kernels = _kernel_model(f["kernels"], f[""].get("latency_model", "roofline"), source)
    return HardwareProfile(
        name=f[""]["name"],
        kind=f[""]["kind"],
        description=f[""]["description"],
        peak_gops=MappingProxyType(dict(sorted(peak.items(), reverse=True))),
        efficiency=MappingProxyType({k: float(c[f"efficiency_{k}"]) for k in LAYER_KINDS}),
        bandwidth_gbs=float(m["bandwidth_gbs"]),
        bandwidth_efficiency=float(m["bandwidth_efficiency"]),
        capacity_kb=float(m["capacity_kb"]),
        onchip_kb=float(m["onchip_kb"]) if "onchip_kb" in m else None,
        onchip_bandwidth_gbs=float(m["onchip_bandwidth_gbs"]) if "onchip_bandwidth_gbs" in m else None,
        layer_overhead_us=float(f["overhead"]["layer_us"]),
        weight_bits=tuple(sorted(p["weight_bits"])),
        act_bits=tuple(sorted(p["act_bits"])),
        float_policy=p["float"],
        fallback_gops=float(p["fallback_gops"]) if "fallback_gops" in p else None,
        fallback_layer_us=float(p["fallback_layer_us"]) if "fallback_layer_us" in p else None,
        unstructured_min_sparsity=float(s["unstructured_min_sparsity"]) if "unstructured_min_sparsity" in s else None,
        unstructured_work_factor=float(s.get("unstructured_work_factor", 1.0)),
        nm_patterns=tuple(tuple(x) for x in s.get("nm_patterns", [])),
        budget=budget,
        source=source,
        kernels=kernels,
    )


def _kernel_model(k: dict[str, Any], model: str, source: str) -> KernelModel | None:
    """The [kernels] table as a KernelModel (latency_model = "kernels"), else None."""
    if model != "kernels":
        if k:
            raise _error(source, "latency_model", model, "kernels given", "'kernels' when a [kernels] table is present (or drop the table)")
        return None
    for key in ("runtime", "inference_us", *KERNELS):
        if key not in k and key not in KERNEL_FALLBACK:
            raise _error(source, f"kernels.{key}", _MISSING, "missing",
                         FIELDS["kernels"][key].expected + "; recalibrate with `hwcompress profiles calibrate`")
    return KernelModel(inference_us=float(k["inference_us"]),
                       coef=MappingProxyType({n: tuple(float(x) for x in (k[n] if n in k else fallback_row(n, k)))
                                              for n in KERNELS}),
                       runtime=k["runtime"], samples=int(k.get("samples", 0)), channel_block=int(k.get("channel_block", 1)),
                       channel_align=int(k.get("channel_align", 1)), q8u_block=int(k.get("q8u_block", 1)),
                       batch=int(k.get("batch", 1)))
