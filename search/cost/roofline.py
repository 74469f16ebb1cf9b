"""The cost model: latency, memory and size of K plans on one hardware profile.

Latency comes from one of two models, as the profile says (`latency_model`):
- "kernels" (profiles calibrated on a machine): learned predictors of the kernels the runtime
  runs, one per kernel kind, plus a per-inference term (search.cost.kernels; nn-Meter's idea),
  for one forward pass of the batch they were calibrated at (KernelModel.batch: 1, or a server
  batch such as 32) on the channels the export keeps, less those unstructured
  pruning is expected to leave all-zero (kernel_price.emptied_keep: an expectation, where
  channel pruning's counts are exact);
- "roofline" (the shipped, analytic profiles of devices we cannot measure), below.
Memory and size are always the counts below.

Roofline per layer, for one example (batch 1):

    latency_l = max(2 * work_l / (peak[c_l] * 1e9 * efficiency[kind_l]),
                    bytes_l / (bandwidth * 1e9 * bandwidth_efficiency)) + layer_overhead

- c_l, the compute width: weights and activations each round UP to the next width the profile
  has kernels for (an unsupported width gives no compute speedup); c = the wider of the two; the
  throughput is the best peak among widths >= c. No kernel wide enough: the profile's float
  policy decides (fallback to the host CPU at fallback_gops, or disallow: latency = inf).
  Codebook weights (Deep Compression) are decoded to 16-bit values before the MAC.
- work_l, the effective MACs: channel pruning keeps C - round(ratio * C) output channels of
  each layer of a channel group (compression.graph: layers whose channels meet in an add or
  pass through a depthwise conv share one decision), and of every reader's fan-in the rows
  those groups keep (`Layer.reads`: concatenations and flattens included), exactly as the
  masks and the ONNX export remove them; a depthwise layer's input channels are its output
  channels. Unstructured sparsity gives
  macs * min(1, density * work_factor) only at or above the profile's threshold; N:M keeps
  N_kept of every M and is accelerated when the profile has a pattern that covers it.
- bytes_l: weights as the device holds them (packed at their bit width; sparse formats only
  where the device runs sparse kernels) + biases and scales + input and output activations at
  the width the kernels use. A model whose whole memory fits on chip uses onchip bandwidth.

Factorized layers (plan.rank < 1, search.compression.lowrank) are priced as the pair of layers
their form becomes (`lowrank.geometry`): SVD, A [fan_in, r] then B [r, out], MACs
positions * (fan_in_kept * r + r * out_kept); spatial, a kh x 1 conv to r channels at
H_out x W_in positions then a 1 x kw conv; Kronecker, r * (m1*m2*n2 + n1*m1*n2) MACs. Weights:
both factors at the layer's width (each with its own per-column scales, each stored float32 when
that is smaller), dense (they take channel pruning only), and the intermediate activation is
written and read between the two (float32). Kernel-level profiles price the kernels the export
runs: A integer where weights and input are <= 8 bits (SVD and spatial), B and both Kronecker
matmuls in float. SVD pays only when r < fan_in * out / (fan_in + out); any rank may be priced.

memory = weights in memory + peak over layers of (input + output activation) bytes.
size = packed model: values at their bit width, sparse index overhead (the smaller of a bitmask
and 5-bit relative indices with their expected padding entries, as in Deep Compression; 2 bits per
kept weight for N:M), per-channel
float32 scales, float32 biases, codebooks. KiB = 1024 bytes.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hw_profiles import HardwareProfile, list_profiles, load_profile
from search.compression import lowrank
from search.compression import plan as P
from search.compression.groups import kept_channels, tie_plan
from search.compression.layers import Layer
from search.cost import runtime_graph as G
from search.cost.kernel_price import emptied_keep, kernel_latency

REL_INDEX_BITS = 5  # Deep Compression relative index width (fully connected layers)
NM_INDEX_BITS = 2  # log2(M) bits per kept weight for M = 4 (NVIDIA 2:4 metadata)
CODEBOOK_COMPUTE_BITS = 16  # codebook weights are looked up into 16-bit values
_UNSUPPORTED = 64  # sentinel width: no kernel is wide enough
_KINDS = ("dense", "conv", "depthwise")


def relative_padding(nnz: np.ndarray, density: np.ndarray) -> np.ndarray:
    """[...] whole padding entries that REL_INDEX_BITS-bit relative indices need for `nnz` kept
    weights at `density` (kept / held), in expectation over random positions (Deep Compression,
    Han et al. 2016, Sec. 2: a gap longer than 2^bits is split by padding zeros): a gap G is
    geometric with parameter density, and a gap needs floor((G - 1) / 2^bits) pads, whose mean is
    q / (1 - q) with q = (1 - density)^(2^bits). At 96% sparsity that is 0.37 pads per kept
    weight (lenet5's fc1, magnitude-pruned, had 0.43), a 37% larger relative format; at 75% it
    is 1e-4, and the floor leaves none, as the export (search.export.size) counts on its masks."""
    q = (1.0 - np.clip(np.asarray(density, np.float64), 0.0, 1.0)) ** (2 ** REL_INDEX_BITS)
    return np.floor(np.asarray(nnz, np.float64) * q / np.maximum(1.0 - q, 1e-12))


@dataclass(frozen=True)
class Costs:
    """Predicted costs of K plans on one profile (arrays [K], per-layer [K, L])."""

    latency_ms: np.ndarray  # one forward pass: batch 1, or a kernel profile's batch (KernelModel.batch)
    memory_kb: np.ndarray  # packed weights in memory + peak activations, KiB
    size_kb: np.ndarray  # packed model size, KiB
    layer_latency_ms: np.ndarray  # [K, L]
    layer_macs: np.ndarray | None = None  # [K, L] MACs after channel removal (what the export's kernels compute)


@dataclass(frozen=True)
class _LayerArrays:
    macs: np.ndarray
    weights: np.ndarray
    out_ch: np.ndarray
    fan_in: np.ndarray
    bias: np.ndarray
    in_elems: np.ndarray
    out_elems: np.ndarray
    kind: np.ndarray  # index into _KINDS
    area: np.ndarray  # kernel positions (kh * kw; 1 for Dense)
    nchwc: np.ndarray  # [L] bool: a 2-D convolution (one onnxruntime may run in its blocked NCHWc layout)
    reads: np.ndarray  # [L, L + 1]: share of layer i's fan-in channels from group j (column L: not a layer's)
    chained: np.ndarray  # [L]: the layer an integer layer re-quantizes for (runtime_graph.chained_to), -1 none
    unfused: np.ndarray  # [L, 3]: pooling, flatten, residual add after each layer (runtime_graph.unfused_ops)
    pool_reader: np.ndarray  # [L]: the layer reading each layer's output through a max pooling, -1 none
    direct: np.ndarray  # [L, L] bool: layer r reads layer i's output directly (runtime_graph.direct_readers)
    clipped: np.ndarray  # [L] bool: the output passes a bounded activation (ReLU6, one Clip; Layer.clipped)
    leader: np.ndarray  # [L] the index of each layer's group leader (Layer.group)
    emptiable: np.ndarray  # [L] bool: the export removes output channels pruning left all-zero (kernel_price.emptied_keep)
    geo: dict  # {name: [F, L]} of every factorization form (lowrank.geometry)


@functools.lru_cache(maxsize=256)
def _layer_arrays(layers: tuple[Layer, ...]) -> _LayerArrays:
    f = lambda g: np.array([g(l) for l in layers], np.float64)
    unfused = G.unfused_ops(layers)
    return _LayerArrays(
        macs=f(lambda l: l.macs), weights=f(lambda l: l.weight_count), out_ch=f(lambda l: l.out_channels),
        fan_in=f(lambda l: l.fan_in),
        bias=f(lambda l: l.out_channels if l.has_bias else 0),
        in_elems=f(lambda l: np.prod(l.in_shape)), out_elems=f(lambda l: np.prod(l.out_shape)),
        kind=np.array([_KINDS.index(l.kind) for l in layers], np.int64),
        area=f(lambda l: np.prod(l.kernel_shape[:-2]) if l.kind != "dense" else 1),
        nchwc=np.array([l.kind != "dense" and len(l.out_shape) == 3 for l in layers], bool),
        reads=_reads_matrix(layers),
        chained=G.chained_to(layers),
        unfused=unfused,
        pool_reader=G.max_pool_reader(layers),
        direct=G.direct_readers(layers),
        clipped=np.array([l.clipped for l in layers], bool),
        leader=np.array([l.group for l in layers], np.int64),
        emptiable=_emptiable(layers, unfused),
        geo=lowrank.geometry(layers),
    )


def _emptiable(layers: Sequence[Layer], unfused: np.ndarray) -> np.ndarray:
    """[L] bool: layers whose all-zero output channels the ONNX export removes
    (search.export.onnx.layers): those of a group that may lose channels (not `Layer.fixed`) and
    meets no residual add (unfused [L, 3], runtime_graph.unfused_ops: column 2). Where two
    members meet in an add, a channel goes only when both addends lose it, and the export keeps
    it (search.export.onnx.convert._binary)."""
    fixed = {l.group for l in layers if l.fixed is not None}
    return (unfused[:, 2] == 0) & np.array([l.group not in fixed for l in layers], bool)


def _kept_fan_in(la: _LayerArrays, keep_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep_in, keep_ch) [K, L]: the kept share of each layer's input channels, as the groups
    producing them keep their output channels (keep_out [K, L]), and of its fan-in channels (a
    depthwise layer's are its output channels: counted once, in keep_out)."""
    keep_in = np.concatenate([keep_out, np.ones_like(keep_out[:, :1])], axis=1) @ la.reads.T
    return keep_in, np.where(la.kind == _KINDS.index("depthwise"), 1.0, keep_in)


def _factor_keeps(kron: np.ndarray, keep_ch: np.ndarray, keep_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep_a, keep_b) [K, L]: the kept share of a factorized layer's A (its fan-in channels)
    and B (its output channels); a Kronecker layer keeps every channel."""
    return np.where(kron, 1.0, keep_ch), np.where(kron, 1.0, keep_out)


def _reads_matrix(layers: Sequence[Layer]) -> np.ndarray:
    """[L, L + 1]: the share of each layer's fan-in channels that group j produces (j = L: a
    tensor that is not a layer's, or a layer whose inputs the tracer did not see)."""
    n = len(layers)
    m = np.zeros((n, n + 1))
    for layer in layers:
        total = sum(c for _, c in layer.reads)
        if not total:
            m[layer.index, n] = 1.0
            continue
        for src, c in layer.reads:
            m[layer.index, src if src >= 0 else n] += c / total
    return m


def _tables(profile: HardwareProfile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables indexed by bit width 0..64: effective weight width, activation width,
    and throughput (GOPS) of a compute width (0 when no kernel is wide enough)."""
    def eff(supported: tuple[int, ...]) -> np.ndarray:
        return np.array([min([s for s in supported if s >= b], default=_UNSUPPORTED) for b in range(_UNSUPPORTED + 1)])

    tput = np.array([max([g for w, g in profile.peak_gops.items() if w >= c], default=0.0) for c in range(_UNSUPPORTED + 1)])
    return eff(profile.weight_bits), eff(profile.act_bits), tput


def _plan_arrays(plans: P.Plan) -> tuple[np.ndarray, ...]:
    r = np.atleast_2d(np.asarray(plans.ratio, np.float64))
    g, wb, ab, qm = (np.atleast_2d(np.asarray(getattr(plans, k), np.int64)) for k in ("granularity", "weight_bits", "act_bits", "quant_mode"))
    return (r, g, wb, ab, qm, np.atleast_2d(np.asarray(plans.rank, np.float32)),
            np.atleast_2d(np.asarray(plans.form, np.int64)))


def _parts(profile: HardwareProfile, layers: Sequence[Layer], plans: P.Plan, feature_sums: bool = False) -> dict[str, np.ndarray]:
    """Per-layer pieces [K, L]: latency (s), weight memory bits, weight size bits, act bytes."""
    la = _layer_arrays(tuple(layers))
    r, g, wb, ab, qm, rank, form_code = _plan_arrays(tie_plan(plans, layers))
    weff_t, aeff_t, tput_t = _tables(profile)
    # factorized layers (lowrank.check_plan keeps them dense, uniform, channel-pruned at most), in
    # their form: geo[name] [K, L] is the form's figure of each layer (lowrank.geometry)
    cols = np.arange(len(layers))
    fi = np.clip(form_code, 0, len(P.FORMS) - 1)
    geo = {k: v[fi, cols] for k, v in la.geo.items()}
    fact = (rank < 1) & geo["ok"]
    kron = fact & (form_code == P.KRONECKER)
    rk = np.where(fact, lowrank.achieved_rank(rank, geo["d"].astype(np.float32)), 0.0).astype(np.float64)
    chan, unst, nm = g == P.CHANNEL, (g == P.UNSTRUCTURED) & ~fact, (g == P.NM) & ~fact
    codebook = (qm == P.CODEBOOK) & (wb <= 8) & ~fact  # wider codebooks run as uniform (compress.weight_branch)

    # kept fractions: output channels as the masks count them (one decision per group, see
    # compression.graph), input channels as the producing groups keep them
    keep_out = np.where(chan, kept_channels(r, la.out_ch[None, :]) / la.out_ch, 1.0)
    keep_in, keep_ch = _kept_fan_in(la, keep_out)
    pruned_nm = np.clip(np.round(r * P.NM_GROUP), 0, P.NM_GROUP - 1)
    nm_kept = P.NM_GROUP - pruned_nm
    density = np.where(nm, nm_kept / P.NM_GROUP, np.where(unst, 1.0 - r, 1.0))  # of the kept channels

    # effective MACs; a factorized layer's pair, its A part with the kept fan-in, its B part with
    # the kept output channels (a Kronecker layer keeps every channel)
    keep_a, keep_b = _factor_keeps(kron, keep_ch, keep_out)
    n_a, n_b = rk * geo["wa"] * keep_a, rk * geo["wb"] * keep_b
    dense_work = np.where(fact, rk * (geo["ma"] * keep_a + geo["mb"] * keep_b), la.macs * keep_out * keep_ch)
    sparsity = 1.0 - density
    thr = profile.unstructured_min_sparsity
    sparse_ok = (sparsity > 0) & (thr is not None) & (sparsity >= (thr if thr is not None else 2.0))
    frac = np.where(sparse_ok, np.minimum(1.0, density * profile.unstructured_work_factor), 1.0)
    nm_frac = np.ones_like(r)
    for n, m in profile.nm_patterns:
        if m == P.NM_GROUP:
            nm_frac = np.where(nm & (nm_kept <= n), np.minimum(nm_frac, n / m), nm_frac)
    nm_ok = nm_frac < 1.0
    frac = np.minimum(frac, nm_frac)
    work = dense_work * frac
    runs_sparse = (sparse_ok | nm_ok) & (frac < 1.0)

    # precision
    w_need = np.where(codebook, np.maximum(CODEBOOK_COMPUTE_BITS, wb), wb)
    w_eff, a_eff = weff_t[w_need], aeff_t[ab]
    tput = tput_t[np.maximum(w_eff, a_eff)]
    on_device = tput > 0

    # weights: values, sparse indices, codebook or per-channel scales, biases (bits). A layer
    # whose quantized form would be larger than float32 (tiny layers, huge codebooks) is kept float.
    n_w = np.where(fact, n_a + n_b, la.weights * keep_out * keep_ch)
    nnz = n_w * density
    kept_ch = la.out_ch * keep_out
    pads = relative_padding(nnz, density)
    sparse = density < 1.0

    def stored(value_bits: np.ndarray, as_sparse: np.ndarray) -> np.ndarray:
        dense_b = n_w * value_bits
        relative = (nnz + pads) * (value_bits + REL_INDEX_BITS)  # padding entries hold a value and a gap too
        bitmask = nnz * value_bits + n_w
        sparse_b = np.where(nm, nnz * value_bits + np.minimum(n_w, nnz * NM_INDEX_BITS), np.minimum(relative, bitmask))
        return np.where(as_sparse, np.minimum(dense_b, sparse_b), dense_b)

    quant_extra = np.where(codebook, np.minimum(2.0 ** wb, n_w) * 32, np.where(wb < P.FLOAT, kept_ch * 32, 0))
    bias_bits = la.bias * keep_out * 32
    # the two factors, each at the layer's width with a scale per column, or float32 when smaller
    scaled = wb < P.FLOAT
    pair_bits = (np.minimum(n_a * wb + np.where(scaled, rk * 32, 0), n_a * 32)
                 + np.minimum(n_b * wb + np.where(scaled, geo["bcols"] * keep_b * 32, 0), n_b * 32))
    size_bits = np.where(fact, pair_bits, np.minimum(stored(wb, sparse) + quant_extra, stored(32, sparse))) + bias_bits
    mem_bits = np.where(fact, pair_bits, np.minimum(stored(wb, runs_sparse) + quant_extra, stored(32, runs_sparse))) + bias_bits
    dense_bits = np.where(fact, pair_bits, np.minimum(stored(wb, False) + quant_extra, stored(32, False)))  # what the host CPU reads
    extra = bias_bits

    # activations: input at the width its kernel reads, output at the next layer's input width
    a_store = np.where(on_device, np.minimum(a_eff, P.FLOAT), P.FLOAT)
    out_w = np.concatenate([a_store[:, 1:], np.full_like(a_store[:, :1], P.FLOAT)], axis=1)
    in_bytes = la.in_elems * keep_in * a_store / 8
    out_bytes = la.out_elems * keep_out * out_w / 8
    # a factorized layer's intermediate, float32 (the pair is one layer: no re-quantization)
    mid_bytes = geo["mid"] * rk * P.FLOAT / 8
    act_peak = np.max(np.where(fact, np.maximum(in_bytes, out_bytes) + mid_bytes, in_bytes + out_bytes), axis=1)
    memory_bytes = mem_bits.sum(axis=1) / 8 + act_peak

    # latency
    bw = np.full(r.shape[0], profile.bandwidth_gbs)
    if profile.onchip_kb is not None:
        bw = np.where(memory_bytes <= profile.onchip_kb * 1024, profile.onchip_bandwidth_gbs, bw)
    eff = np.array([profile.efficiency[k] for k in _KINDS])[la.kind]
    moved = mem_bits / 8 + in_bytes + out_bytes + 2 * mid_bytes
    t_mem = moved / (bw[:, None] * 1e9 * profile.bandwidth_efficiency)
    with np.errstate(divide="ignore"):
        t_dev = np.maximum(2 * work / (tput * 1e9 * eff), t_mem) + profile.layer_overhead_us * 1e-6
    if profile.float_policy == "fallback":
        host_bw = profile.bandwidth_gbs * 1e9 * profile.bandwidth_efficiency
        fb = 2 * dense_work / (profile.fallback_gops * 1e9 * eff)  # the host has no sparse kernels
        t_host = np.maximum(fb, (dense_bits + extra) / 8 / host_bw + (in_bytes + out_bytes + 2 * mid_bytes) / host_bw) + profile.fallback_layer_us * 1e-6
    else:
        t_host = np.inf
    lat = np.where(on_device, t_dev, t_host)
    if profile.kernels is not None:  # learned kernel predictors (search.cost.kernels) replace the roofline
        # the kernels the export runs: without the channels unstructured pruning emptied
        k_out = emptied_keep(profile.kernels, la, r, unst, keep_ch, wb, ab, codebook, keep_out)
        k_in, k_ch = _kept_fan_in(la, k_out)
        k_a, k_b = _factor_keeps(kron, k_ch, k_out)
        lat, by_kind, sums = kernel_latency(profile.kernels, la, geo, wb=wb, ab=ab, codebook=codebook, fact=fact,
                                            kron=kron, rk=rk, keep_in=k_in, keep_out=k_out, keep_ch=k_ch,
                                            keep_a=k_a, keep_b=k_b, feature_sums=feature_sums)
    else:
        by_kind = sums = None
    return {"lat": lat, "by_kind": by_kind, "feature_sums": sums, "macs": dense_work, "mem_bits": mem_bits, "size_bits": size_bits, "act_peak": act_peak, "memory_bytes": memory_bytes}


def _inference_ms(profile: HardwareProfile) -> float:
    """The per-inference term (session run, input and output copies) of a kernel-level profile."""
    return 0.0 if profile.kernels is None else profile.kernels.inference_us * 1e-3


def price(profile: HardwareProfile | str, layers: Sequence[Layer], plans: P.Plan, *, check: bool = True) -> Costs:
    """Costs of plans ([L] or [K, L]) on a profile (object, shipped name or TOML path).
    ValueError (one line, naming the field or the layer) for a plan out of range
    (plan.validate_plan) or factorizing a layer it cannot (lowrank.check_plan), as the engine
    and the export refuse it, instead of a price for a plan nothing can run. `check=False`
    prices rows of per-layer choices that are not plans to run (the search space's uniform
    candidates, search.study.space.extreme_plans, as min_costs does): a layer given a form
    its shape does not take is priced unfactorized."""
    if np.ndim(plans.ratio) == 0 or plans.num_layers != len(layers):
        got = "no per-layer values" if np.ndim(plans.ratio) == 0 else f"{plans.num_layers} layers"
        raise ValueError(f"plan has {got} but the model has {len(layers)} ({', '.join(l.name for l in layers)}); "
                         "give make_plan one value per layer (or a list of that length)")
    if check:  # as the engine checks: the factorization's errors first, naming the layer and its forms
        lowrank.check_plan(plans, layers)
        P.validate_plan(plans, layers)
    profile = load_profile(profile)
    parts = _parts(profile, layers, plans)
    lat_ms = parts["lat"] * 1e3
    return Costs(
        latency_ms=lat_ms.sum(axis=1) + _inference_ms(profile),
        memory_kb=parts["memory_bytes"] / 1024,
        size_kb=parts["size_bits"].sum(axis=1) / 8 / 1024,
        layer_latency_ms=lat_ms,
        layer_macs=parts["macs"],
    )


def latency_by_kernel(profile: HardwareProfile | str, layers: Sequence[Layer], plans: P.Plan) -> np.ndarray:
    """[K, len(KERNELS)] predicted milliseconds of each kernel kind (search.cost.kernels) in K
    plans, on a profile with kernel-level predictors; ValueError for a roofline profile."""
    profile = load_profile(profile)
    if profile.kernels is None:
        raise ValueError(f"profile {profile.name} has no kernel-level predictors (latency_model = 'roofline')")
    return _parts(profile, layers, plans)["by_kind"] * 1e3


def latency_features(profile: HardwareProfile | str, layers: Sequence[Layer], plans: P.Plan) -> np.ndarray:
    """[K, len(KERNELS), len(KERNEL_FEATURES)] the kernel features of K plans summed per kernel
    kind (search.cost.kernels.feature_sums): predicted latency in microseconds is the profile's
    inference_us + sum(coef * this); ValueError for a roofline profile."""
    profile = load_profile(profile)
    if profile.kernels is None:
        raise ValueError(f"profile {profile.name} has no kernel-level predictors (latency_model = 'roofline')")
    return _parts(profile, layers, plans, feature_sums=True)["feature_sums"]


def price_all(layers: Sequence[Layer], plans: P.Plan) -> dict[str, Costs]:
    """Costs of the plans on every shipped profile, by profile name."""
    return {name: price(name, layers, plans) for name in list_profiles()}


def min_costs(
    profile: HardwareProfile | str,
    layers: Sequence[Layer],
    candidates: P.Plan | None = None,
    *,
    max_ratio: float = P.MAX_RATIO,
    weight_bits: Sequence[int] = P.WEIGHT_BITS,
    act_bits: Sequence[int] = P.ACT_BITS,
    granularities: Sequence[int] = tuple(P.GRANULARITIES.values()),
) -> dict[str, float]:
    """Lower bounds on latency_ms, memory_kb and size_kb over plans whose every layer takes one
    of the candidate plans' choices for that layer (`candidates` [K, L]; None: every uniform
    plan at `max_ratio` over the given widths, granularities and both quant modes). Each layer's
    cheapest candidate is summed, so a budget below these is infeasible before any training,
    and one that a plan with per-layer choices meets is not refused."""
    if candidates is None:
        L = len(layers)
        candidates = P.stack_plans([P.make_plan(np.full(L, max_ratio), g, w, a, q)
                                    for g in granularities for w in weight_bits for a in act_bits
                                    for q in P.QUANT_MODES.values()])
    profile = load_profile(profile)
    parts = _parts(profile, layers, candidates)
    return {
        "latency_ms": float(parts["lat"].min(axis=0).sum() * 1e3 + _inference_ms(profile)),
        "memory_kb": float((parts["mem_bits"].min(axis=0).sum() / 8 + parts["act_peak"].min()) / 1024),
        "size_kb": float(parts["size_bits"].min(axis=0).sum() / 8 / 1024),
    }


def cheapest_plan(profile: HardwareProfile | str, layers: Sequence[Layer], candidates: P.Plan, key: str) -> P.Plan:
    """The plan [L] whose every layer takes the candidate choice (a row of `candidates` [K, L])
    that is cheapest for that layer in `key` (latency_ms, memory_kb or size_kb): the per-layer
    plan behind `min_costs`. A layer's cost also depends on its producer's kept channels, so
    this plan's total is close to, not always equal to, min_costs[key]."""
    parts = _parts(load_profile(profile), layers, candidates)
    per_layer = {"latency_ms": parts["lat"], "memory_kb": parts["mem_bits"], "size_kb": parts["size_bits"]}[key]
    rows = np.argmin(per_layer, axis=0)  # [L]: the best candidate of each layer
    cols = np.arange(len(layers))
    return P.Plan(*(np.asarray(getattr(candidates, f.name))[rows, cols] for f in dataclasses.fields(P.Plan)))
