"""Kernel-level latency: predict what the runtime runs for each layer, from shapes and bits.

After nn-Meter (Zhang et al., MobiSys 2021): latency is predicted per *kernel* (the fused
operator the runtime executes), by a predictor per kernel kind learned from measurements of
that kernel over sampled shapes, plus a per-inference term. For onnxruntime on a CPU the
kernels of an export (search.export.onnx) are, per Dense / Conv / depthwise layer:

- `f32`: a float kernel with its folded BatchNorm, bias and ReLU (FusedConv / FusedGemm); used
  for float, 16-bit and codebook weights, and for activations wider than 8 bits;
- `q8`: an integer kernel whose output is re-quantized for the next integer layer
  (QLinearConv / QGemm), when weights are uniform <= 8 bits, activations <= 8 bits, and the next
  layer (which reads only this layer's channels, no residual add between) is integer too;
- `i8`: an integer kernel with a float output (ConvInteger / MatMulInteger + Cast + Mul by the
  scales), the other integer layers (the last one, those feeding a residual add or a float
  layer, and a factorized layer's A, which runs four of the six ops its probe times: no bias
  Add or ReLU, they follow its B);
- `q8u`: q8 with 8-bit weights, which the export stores as uint8 with zero point 128 (exact on
  AVX2, whose u8s8 instruction saturates) and onnxruntime runs on its u8u8 kernels: 1.7-2x slower
  than int8 weights of <= 7 bits for QLinearConv on an AVX-512 VNNI host (i8 kernels always take
  uint8 weights: one kind);
- `emul`: a float kernel's input activation rounding done in float ops (Div, Round, Add, Clip,
  Sub, Mul), for activations quantized to <= 16 bits in front of a float kernel;
- `eltwise`: an unfused op that follows a layer in the graph (a pooling, a residual Add in
  float, a layout reorder or Transpose, a flatten), on the layer's output; how many each layer
  is charged comes from the graph (search.cost.runtime_graph.unfused_ops) and the layer's form. A
  ReLU is not one: onnxruntime fuses it into the float kernel, and the quantization grid absorbs
  it in an integer one (the probes time each kernel with its ReLU); a ReLU6 after a blocked float
  conv is `clip` below;
- `pool_u8`: a max pooling between a layer with a float output and an integer reader
  (runtime_graph.u8_pooled). onnxruntime's QDQ propagation moves the reader's QuantizeLinear ahead of the
  MaxPool, which then runs on uint8 in NCHW, a plain loop about 10x slower per element than the
  float MaxPool (lenet5 with a float conv1 and an int8 conv2: 10.5 us of 34); it replaces one
  `eltwise` op. Between two integer layers the pooling runs as NhwcMaxPool, as fast as a float one;
- `clip`: a bounded activation (ReLU6, exported as one Clip; Layer.clipped) after a float conv on
  the blocked NCHWc kernels, a pass over the conv's output: onnxruntime fuses the Clip into the
  conv, but MLAS's NCHWc kernels fuse only ReLU and apply any other activation after computing
  each output block. Measured on an AVX-512 host, conv + Clip less conv + ReLU in a chain:
  0.055-0.08 us per 1000 output elements for 1x1 and depthwise convs, 0.14 for a 3x3 one; 18-21%
  of fp32 MobileNetV2 at 28x28 (146 us measured against 124 predicted before it was priced).
  The plain kernels (f32p) apply every activation, ReLU included, as such a pass (the probes
  time it), integer kernels fold it into the quantization grid, a Dense layer's Clip is an
  unfused op (`eltwise`);
- `kron`: a Kronecker-factorized Dense layer as the export writes it (search.export.onnx.layers.
  kronecker): a Reshape, one broadcast MatMul that onnxruntime runs as r GEMMs of [m1, m2] @
  [m2, n2], a Reshape, one GEMM [n1, r*m1] @ [r*m1, n2], a Reshape, then its bias Add and ReLU
  unfused (they follow a Reshape). Its features are `kron_features`, its probes the whole layer.
  Priced as two dense_f32 kernels it measured 1.3-1.6x their prediction (lenet300 at rank 8: 13.8
  us against 9.0): every Dense probe has one row (M = 1), the Kronecker GEMMs 15-28, and the three
  Reshapes and unfused ops were not charged.

A float 2-D convolution runs in onnxruntime's blocked NCHWc layout, on channel counts rounded up
to the runtime's channel block (`blocked`; KernelModel.channel_block, detected at calibration),
when its channel counts are multiples of KernelModel.channel_align (`on_blocks`); otherwise on the
runtime's plain kernels, the `f32p` form (unpadded counts; a depthwise conv 8x slower). A blocked
conv reading fewer input channels than the block takes them in NCHW, on onnxruntime's NCHW-input
kernel (made for image stems, one pass over the output per input channel). A 1x1 one is the
`f32n` form, its own predictor: where a 1x1 conv reading NCHWc runs the pointwise kernel, a 1x1
conv reading 4-12 channels in NCHW, as heavy channel pruning leaves them, measured 3-5x what the
NCHWc-input predictor gave it. A kxk one (3x3 and 5x5 stems, and the convs behind a layer pruned
below the block) is the `f32nk` form: stems measured within 30% of the NCHWc-input predictor and
calibration prices it with that one (the conv_f32 row: predictors of their own, linear in the
same features, fitted them worse, 33% and 15% median error on held-out probes), but it is a kind
of its own, so that a fit on exports (fit_to_models) gives it its own scale: heavily pruned
lenet5 and resnet20 exports measured 1.08-1.23x a fit that shared conv_f32's. A q8
conv or depthwise conv whose kept output channels are not a multiple of the channel block runs
the integer kernels' remainder path, the `q8p` form (`q8_on_blocks`).

Each predictor is linear in KERNEL_FEATURES (1, MACs, weights, input elements, output elements,
after channel removal) with coefficients >= 0, fitted to measured latencies by non-negative least
squares on the relative error (scikit-learn's LinearRegression(positive=True)). Non-negative
coefficients make every predictor monotone: more channels never predict a faster kernel. The
per-channel fixed costs that make an integer kernel with few channels slower than a float one
are in the per-element terms. Pricing K plans stays a few numpy operations on [K, L] arrays.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Sequence

import numpy as np

from hw_profiles.schema import KERNEL_FEATURES, KERNEL_FORMS, KERNELS, LAYER_KINDS, KernelModel, fallback_row

FORMS = KERNEL_FORMS  # f32, q8, i8, q8u (QLinear with 8-bit, uint8 weights), f32p (float off the NCHWc blocks),
# q8p (q8 conv / depthwise off the channel block), f32n (blocked 1x1 float conv reading NCHW: cin < block),
# f32nk (the same, kxk; calibrated as f32)
EMUL, ELTWISE, POOL_U8, CLIP, KRON = (KERNELS.index(k) for k in ("emul", "eltwise", "pool_u8", "clip", "kron"))
FLOAT_OUT = (FORMS.index("f32"), FORMS.index("f32p"), FORMS.index("f32n"), FORMS.index("f32nk"), FORMS.index("i8"))  # float output
INT_IN = (FORMS.index("q8"), FORMS.index("i8"), FORMS.index("q8u"), FORMS.index("q8p"))  # forms whose input is quantized
QLINEAR = (FORMS.index("q8"), FORMS.index("q8u"), FORMS.index("q8p"))  # QLinear kernels: NHWC in onnxruntime
MIN_SAMPLES = 1  # a kernel kind with no usable timing cannot be fitted


def nchw_input_form(taps: np.ndarray) -> np.ndarray:
    """Index into FORMS of a blocked float conv reading fewer channels than the block, in NCHW, by
    its kernel's taps (kh * kw): f32n for a 1x1 conv, f32nk for a kxk one."""
    return np.where(np.asarray(taps) == 1, FORMS.index("f32n"), FORMS.index("f32nk"))


def kernel_index(kind: np.ndarray, form: np.ndarray) -> np.ndarray:
    """Index into KERNELS of layer kinds (index into LAYER_KINDS) and forms (index into FORMS)."""
    return np.asarray(kind) * len(FORMS) + np.asarray(form)


def forms(chained: np.ndarray, weight_bits: np.ndarray, act_bits: np.ndarray, codebook: np.ndarray,
          bias_map: np.ndarray | None = None) -> np.ndarray:
    """[K, L] index into FORMS of the kernel each layer runs as (the export's rules,
    search.export.onnx.layers and qdq): integer when its weights are uniform <= 8 bits (codebook:
    False) and its activations <= 8 bits; then q8 when it chains into an integer layer (chained:
    runtime_graph.chained_to(layers)) and has a bias per channel (bias_map [K, L]: False; True for a conv whose
    bias is a map: a SAME-padded conv reading removed channels that carry a constant, which
    search.engine.steps.zero_removed leaves only behind an activation with f(0) != 0), else i8;
    f32 otherwise; q8u for q8 with 8-bit weights: the export stores weights whose codes pass 63 as
    uint8 with zero point 128 (search.export.onnx.layers), which onnxruntime runs on its slower
    u8u8 kernels."""
    integer = (np.asarray(weight_bits) <= 8) & ~np.asarray(codebook, bool) & (np.asarray(act_bits) <= 8)
    nxt = np.where(chained >= 0, chained, 0)
    chain = integer & (chained >= 0) & integer[..., nxt]
    if bias_map is not None:
        chain = chain & ~np.asarray(bias_map, bool)
    q8 = np.where(np.asarray(weight_bits) == 8, FORMS.index("q8u"), FORMS.index("q8"))  # codes past 63: uint8
    return np.where(integer, np.where(chain, q8, FORMS.index("i8")), FORMS.index("f32"))


def features(m: np.ndarray, n: np.ndarray, k: np.ndarray, taps: np.ndarray | float = 1.0) -> np.ndarray:
    """[..., F] KERNEL_FEATURES (1, M, N, K, MN, MK, NK, MNK, MT) of GEMM dimensions [...]: M output
    positions, N output channels, K fan-in, per example after channel removal, and T the kernel's
    taps (kh * kw; 1 for Dense layers and elementwise ops).

    MT is there for im2col, which copies each tap's input channels per output position: measured
    on an AVX-512 host, 92 QLinear (u8u8) conv probes timed in a chain, one non-negative linear
    predictor cross-validated on the same timings, median error 9.0% without it and 4.4% with it
    (image stems, 1 or 3 input channels at 28-32 pixels: 17.7% -> 9.6%)."""
    m, n, k, t = np.broadcast_arrays(np.asarray(m, np.float64), np.asarray(n, np.float64), np.asarray(k, np.float64),
                                     np.asarray(taps, np.float64))
    return np.stack([np.ones_like(m), m, n, k, m * n, m * k, n * k, m * n * k, m * t], axis=-1)


def kron_features(r: np.ndarray, pa: np.ndarray, nb: np.ndarray, ka: np.ndarray, pb: np.ndarray,
                  kb: np.ndarray) -> np.ndarray:
    """[..., F] the features of a `kron` kernel, a Kronecker-factorized Dense layer at rank r
    (search.compression.lowrank: fan-in m1 * m2, width n1 * n2), from its two GEMMs, all [...]:
    r calls of M = pa (m1 x the batch), N = nb (n2), K = ka (m2), then one of M = pb (n1 x the
    batch), N = nb, K = r * kb (kb = m1). Their monomials summed, except two: "1" is one per layer
    (its Reshapes, unfused bias and ReLU and its GEMMs' fixed costs) and "MT" counts the r calls of
    the broadcast GEMM. Measured on an AVX-512 host, 40 kron probes (pairs of layers timed in a
    chain), the predictor fitted on half and tested on the other: 2.5 us per layer, 0.08 us per
    call, median error 4%; with "1" counting the calls (r + 1) and no per-layer term, 50%."""
    r = np.asarray(r, np.float64)
    f = r[..., None] * features(pa, nb, ka) + features(pb, nb, r * np.asarray(kb, np.float64))
    f[..., KERNEL_FEATURES.index("1")] = 1.0
    f[..., KERNEL_FEATURES.index("MT")] = r
    return f


def blocked(n: np.ndarray, cin: np.ndarray, area: np.ndarray, block: int, depthwise: np.ndarray | bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) a float 2-D convolution computes in onnxruntime's NCHWc layout, from its kept output
    channels n, input channels per group cin and kernel area (kh * kw), all [...].

    onnxruntime's CPU provider rewrites float Conv nodes into NCHWc kernels (MLAS; the
    NchwcTransformer) whose channels are processed in blocks of `block` (MlasNchwcGetBlockSize: 16
    with AVX-512, 8 with AVX2): output channels are rounded up to a multiple of the block, input
    channels too once there are at least `block` of them (fewer are read as NCHW, unpadded); a
    depthwise kernel rounds its channels (N) and keeps K = area. So on an AVX-512 host a 3x3 conv
    with 20, 24 or 32 channels takes the same time, and pruning 32 channels to 24 buys nothing.
    The rounding is monotone: more channels never give a smaller kernel. block <= 1: no rounding."""
    n, cin, area = (np.asarray(v, np.float64) for v in (n, cin, area))
    if block <= 1:
        return n, cin * area
    up = lambda c: np.ceil(np.round(c) / block) * block  # counts arrive as kept fractions x channels
    k = np.where(np.asarray(depthwise, bool), area, np.where(np.round(cin) < block, np.round(cin), up(cin)) * area)
    return up(n), k


def on_blocks(n: np.ndarray, cin: np.ndarray, block: int, align: int, depthwise: np.ndarray | bool = False) -> np.ndarray:
    """[...] bool: whether a float 2-D convolution with n output channels and cin input channels
    per group runs on onnxruntime's blocked NCHWc kernels (else on its plain im2col / grouped
    kernels, form f32p). Read off the graph onnxruntime optimizes on an AVX-512 host (block 16,
    align 4; its NchwcTransformer): a conv's output channels are padded up to the block whatever
    their count (32 -> 22 and 32 -> 50 run blocked), its input channels must be below the block
    (read unpadded) or a multiple of `align` (22 -> 32 and 50 -> 32 run plain: 17 us at 14x14
    where the blocked kernel takes 14); a depthwise conv's channels must be a multiple of `align`
    (86 channels took 33 us where 84 and 88 took 4). block <= 1: no blocked kernels."""
    if block <= 1:
        return np.zeros(np.broadcast_shapes(np.shape(n), np.shape(cin)), bool)
    n, cin = np.round(np.asarray(n, np.float64)), np.round(np.asarray(cin, np.float64))
    dw = np.asarray(depthwise, bool)
    return np.where(dw, np.mod(n, align) == 0, (cin < block) | (np.mod(cin, align) == 0))


def q8_on_blocks(n: np.ndarray, block: int) -> np.ndarray:
    """[...] bool: whether a QLinear conv or depthwise conv (form q8: int8 weights of <= 7 bits)
    with n kept output channels runs onnxruntime's channel-vectorised int8 kernels (else the
    `q8p` form, their per-channel remainder path): n a multiple of the channel block. Measured on
    an AVX-512 host (block 16) from `profiles calibrate`'s own probes, fitted as one q8 predictor:
    depthwise convs with 72, 120 or 376 channels ran 2-3x slower than the predictor (median
    prediction / measurement 0.42 over 25 shapes off the block, 1.27 over 15 on it), 80 or 128
    channels did not; plain convs 0.78 against 1.15-1.3. (A u8-weight q8u depthwise conv moved
    0.89 against 1.11, and i8 kernels not at all: neither has a remainder form.) The block is the
    runtime's float channel block (KernelModel.channel_block), the SIMD width both paths use.
    block <= 1: every count on the fast path."""
    if block <= 1:
        return np.ones(np.shape(n), bool)
    return np.mod(np.round(np.asarray(n, np.float64)), block) == 0


def q8u_channels(n: np.ndarray, block: int) -> np.ndarray:
    """[...] the output channels a q8u conv or depthwise conv (QLinear, 8-bit weights stored as
    uint8) computes: n rounded up to a multiple of `block` (KernelModel.q8u_block; 1: n as is).
    onnxruntime's u8u8 int8 kernels work on whole SIMD blocks of output channels, so 8 or 12
    channels cost what 16 do. Measured on an AVX-512 host (block 16), 72 conv probes timed in
    a chain, one non-negative linear predictor cross-validated 5-fold on the same timings: median
    error 9.7% with the kept count, 6.2% with it rounded up (off the block: 12.7% -> 6.0%);
    depthwise 7.0% -> 5.2%. The int8-weight q8 kernels are split by the block instead (q8p:
    rounding up did not help their depthwise predictor, 8.2% -> 9.8%), Dense layers are not rounded."""
    n = np.asarray(n, np.float64)
    return n if block <= 1 else block * np.ceil(np.round(n) / block)


def predict(model: KernelModel, kernel: np.ndarray, feats: np.ndarray, emul_in: np.ndarray,
            out_elems: np.ndarray, second: tuple[np.ndarray, np.ndarray] | None = None,
            eltwise_n: np.ndarray | float = 1.0, pool_u8: np.ndarray | float = 0.0,
            clip: np.ndarray | float = 0.0, inner: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(per-layer latency [K, L], per-kernel-kind latency [K, len(KERNELS)]), seconds.

    kernel: [K, L] KERNELS index; feats: [K, L, F] KERNEL_FEATURES for one example;
    emul_in: [K, L] input elements rounded in float ops in front of the kernel (0: none), priced
    as an `emul` kernel with M = emul_in, N = K = 1; out_elems: [K, L] the layer's output elements,
    `eltwise_n` [K, L] `eltwise` ops on them (runtime_graph.eltwise_count); pool_u8 [K, L]: 1 where they are
    max-pooled on uint8 (runtime_graph.u8_pooled), a `pool_u8` kernel with M = out_elems; clip
    [K, L]: 1 where a blocked float conv's output passes a Clip, a `clip` kernel with M = out_elems;
    inner [K, L]: elements of one more `eltwise` op inside the layer (0: none; a factorized conv's
    layout reorder between its two kernels). `second`: (kernel
    [K, L], feats [K, L, F]) of a second kernel some layers run (a factorized layer's B; all-zero
    features where none). The per-kind sums are what fit_to_models scales.
    """
    coef = np.array([model.coef[k] for k in KERNELS], np.float64)  # [N, F]
    t = np.einsum("klf,klf->kl", coef[kernel], feats) * 1e-6
    e = np.where(emul_in > 0, features(emul_in, 1.0, 1.0) @ coef[EMUL], 0.0) * 1e-6
    elt = features(out_elems, 1.0, 1.0)
    g = eltwise_n * (elt @ coef[ELTWISE]) * 1e-6
    u = pool_u8 * (elt @ coef[POOL_U8]) * 1e-6
    c = clip * (elt @ coef[CLIP]) * 1e-6
    g = g + np.where(np.asarray(inner) > 0, features(inner, 1.0, 1.0) @ coef[ELTWISE], 0.0) * 1e-6
    by_kind = np.einsum("kl,kln->kn", t, kernel[..., None] == np.arange(len(KERNELS)))
    if second is not None:
        t2 = np.einsum("klf,klf->kl", coef[second[0]], second[1]) * 1e-6
        by_kind += np.einsum("kl,kln->kn", t2, second[0][..., None] == np.arange(len(KERNELS)))
        t = t + t2
    by_kind[:, EMUL] += e.sum(axis=1)
    by_kind[:, ELTWISE] += g.sum(axis=1)
    by_kind[:, POOL_U8] += np.broadcast_to(u, t.shape).sum(axis=1)
    by_kind[:, CLIP] += np.broadcast_to(c, t.shape).sum(axis=1)
    return t + e + g + u + c, by_kind


def feature_sums(kernel: np.ndarray, feats: np.ndarray, emul_in: np.ndarray, out_elems: np.ndarray,
                 second: tuple[np.ndarray, np.ndarray] | None = None, eltwise_n: np.ndarray | float = 1.0,
                 pool_u8: np.ndarray | float = 0.0, clip: np.ndarray | float = 0.0,
                 inner: np.ndarray | float = 0.0) -> np.ndarray:
    """[K, len(KERNELS), F] KERNEL_FEATURES summed per kernel kind over each plan's kernels (the
    arguments are predict's), so that predict's latency of plan k, in microseconds, is
    inference_us + sum(coef * feature_sums[k]) and a fit to whole-model latencies is linear in
    the coefficients (fit_coefficients)."""
    onehot = kernel[..., None] == np.arange(len(KERNELS))  # [K, L, N]
    out = np.einsum("kln,klf->knf", onehot, feats)
    if second is not None:
        out += np.einsum("kln,klf->knf", second[0][..., None] == np.arange(len(KERNELS)), second[1])
    out[:, EMUL] += np.where((emul_in > 0)[..., None], features(emul_in, 1.0, 1.0), 0.0).sum(axis=1)
    elt = features(out_elems, 1.0, 1.0)
    out[:, ELTWISE] += (np.asarray(eltwise_n, np.float64)[..., None] * elt).sum(axis=1)
    inner = np.broadcast_to(np.asarray(inner, np.float64), feats.shape[:2])
    out[:, ELTWISE] += np.where((inner > 0)[..., None], features(inner, 1.0, 1.0), 0.0).sum(axis=1)
    out[:, POOL_U8] += np.broadcast_to(np.asarray(pool_u8, np.float64)[..., None] * elt, feats.shape).sum(axis=1)
    out[:, CLIP] += np.broadcast_to(np.asarray(clip, np.float64)[..., None] * elt, feats.shape).sum(axis=1)
    return out


def fit_coefficients(model: KernelModel, sums: np.ndarray, measured_ms: np.ndarray, prior: float = 0.3) -> KernelModel:
    """`model` with every predictor coefficient and the per-inference term refitted to whole-model
    latencies: measured_ms [S] ~ inference + sum(coef * sums [S, N, F]) (feature_sums, in us).

    Bounded linear least squares on the relative error (scipy.optimize.lsq_linear, coefficients
    >= 0, so every predictor stays monotone), with a ridge row per coefficient of weight `prior`
    on the change of its mean share of the measured latencies: a term moves only as far as the
    measurements ask, and a term the calibration left at 0 can grow. Unlike fit_to_models (one
    scale per kind), this can move a kind's cost between its fixed, per-channel and per-MAC terms
    (e.g. a runtime whose convolutions are faster per MAC but dearer per call than the
    micro-benchmarks said)."""
    from scipy.optimize import lsq_linear

    y = np.asarray(measured_ms, np.float64) * 1e3  # us
    s = np.asarray(sums, np.float64).reshape(len(y), -1)
    c0 = np.array([model.coef[k] for k in KERNELS], np.float64).reshape(-1)
    a = np.concatenate([np.ones((len(y), 1)), s], axis=1) / y[:, None]  # relative: a @ x = pred / y
    x0 = np.concatenate([[model.inference_us], c0])
    share = a.mean(axis=0)  # mean share of the latency per unit of each coefficient
    used = share > 0
    lhs = np.concatenate([a[:, used], prior * np.diag(share[used])])
    rhs = np.concatenate([np.ones(len(y)), prior * share[used] * x0[used]])
    res = lsq_linear(lhs, rhs, bounds=(0.0, np.inf))
    x = x0.copy()
    x[used] = res.x
    coef = {k: tuple(float(v) for v in x[1:].reshape(len(KERNELS), -1)[i]) for i, k in enumerate(KERNELS)}
    return dataclasses.replace(model, coef=MappingProxyType(coef), inference_us=float(x[0]))


def fit_to_models(model: KernelModel, by_kind: np.ndarray, measured_ms: np.ndarray,
                  bounds: tuple[float, float] = (0.25, 4.0), prior: float = 0.5) -> KernelModel:
    """`model` with one scale factor per kernel kind and one for the per-inference term, fitted
    to whole-model latencies: measured_ms [S] ~ s_0 * inference + sum_n s_n * by_kind [S, N] (ms).

    Bounded least squares on the relative error (scipy.optimize.lsq_linear), scales within
    `bounds`, each pulled toward 1 (the calibration) by a ridge row of weight `prior` (a scale
    moves only as far as the measurements ask: a kind few exports use keeps its calibration);
    a kind that no sample uses keeps scale 1. Scaling keeps every coefficient >= 0."""
    from scipy.optimize import lsq_linear

    y = np.asarray(measured_ms, np.float64)
    a = np.concatenate([np.full((len(y), 1), model.inference_us * 1e-3), np.asarray(by_kind, np.float64)], axis=1)
    w = 1.0 / y
    rel = a * w[:, None]
    used = np.abs(rel).sum(axis=0) > 0
    k = int(used.sum())
    lhs = np.concatenate([rel[:, used], prior * np.eye(k)])
    rhs = np.concatenate([np.ones(len(y)), prior * np.ones(k)])
    res = lsq_linear(lhs, rhs, bounds=bounds)
    scale = np.ones(a.shape[1])
    scale[used] = res.x
    return scaled(model, dict(zip(KERNELS, scale[1:])), float(scale[0]))


def fit(samples: Sequence[tuple[str, Sequence[float], float]], inference_us: float, runtime: str,
        channel_block: int = 1, channel_align: int = 1, q8u_block: int = 1, batch: int = 1) -> KernelModel:
    """Predictors from measured kernels: samples = [(KERNELS name, KERNEL_FEATURES values, us)],
    the float convolutions' features computed with `channel_block` (blocked), the q8u conv and
    depthwise ones with output channels rounded up to `q8u_block` (q8u_channels), all at `batch`
    examples per call (M counts positions x batch).

    Per kernel kind, non-negative least squares on the relative error (each row weighted by
    1 / measured^2; scikit-learn LinearRegression(positive=True, fit_intercept=False)). The f32
    kinds (onnxruntime's blocked NCHWc kernels and float GEMMs, which convolve without im2col)
    get no MT term: fitted on chained probes it took cost from the per-MAC terms and priced
    lenet5's 1-channel 5x5 stem at 3x its time.
    A kind the runtime never runs (dense_f32p, dense_q8p, dense_f32n, depthwise_f32n; f32p, q8p,
    f32n and clip on a runtime without channel blocks; pool_u8 and clip in samples timed before
    they had probes) or that has no probes of its own (f32nk, priced as f32 until a fit on exports)
    takes the coefficients of the kind it falls back to (hw_profiles.schema.fallback_row).
    ValueError naming the kind when another kind has fewer than MIN_SAMPLES samples.
    """
    coef: dict[str, tuple[float, ...]] = {}
    for name in KERNELS:
        rows = [(f, y) for k, f, y in samples if k == name]
        if not rows and name.endswith(("_f32p", "_q8p", "_f32n", "_f32nk", "pool_u8", "clip", "kron")):  # the last three: samples calibrated before them
            coef[name] = fallback_row(name, coef)
            continue
        coef[name] = fit_kind(name, rows)
    return KernelModel(inference_us=float(inference_us), coef=MappingProxyType(coef), runtime=runtime, samples=len(samples),
                       channel_block=int(channel_block), channel_align=int(channel_align), q8u_block=int(q8u_block),
                       batch=int(batch))


def fit_kind(name: str, rows: Sequence[tuple[Sequence[float], float]]) -> tuple[float, ...]:
    """One kernel kind's coefficients from its [(KERNEL_FEATURES values, us)] (fit's rule).
    ValueError naming the kind with fewer than MIN_SAMPLES rows."""
    from sklearn.linear_model import LinearRegression

    if len(rows) < MIN_SAMPLES:
        raise ValueError(f"kernel {name}: {len(rows)} measurements, need at least {MIN_SAMPLES}; time more shapes")
    x = np.array([f for f, _ in rows], np.float64)
    y = np.array([v for _, v in rows], np.float64)
    if name.endswith("_f32"):  # blocked NCHWc kernels convolve directly: no im2col, no per-tap copies
        x[:, KERNEL_FEATURES.index("MT")] = 0.0
    scale = np.maximum(x.max(axis=0), 1e-12)  # well-conditioned columns; undone below
    reg = LinearRegression(positive=True, fit_intercept=False).fit(x / scale, y, sample_weight=1.0 / y ** 2)
    return tuple(float(c) for c in np.maximum(reg.coef_, 0.0) / scale)


def scaled(model: KernelModel, kernel_scale: dict[str, float], inference_scale: float) -> KernelModel:
    """`model` with each kernel's coefficients and the per-inference term multiplied (>= 0)."""
    coef = {k: tuple(c * kernel_scale.get(k, 1.0) for c in v) for k, v in model.coef.items()}
    return dataclasses.replace(model, coef=MappingProxyType(coef), inference_us=model.inference_us * inference_scale)


def relative_errors(model: KernelModel, samples: Sequence[tuple[str, Sequence[float], float]]) -> np.ndarray:
    """(predicted - measured) / measured of each sample, for checking a fit on held-out kernels."""
    out = []
    for name, f, y in samples:
        out.append((float(np.dot(model.coef[name], f)) - y) / y)
    return np.array(out)


__all__ = ["FORMS", "KERNELS", "KERNEL_FEATURES", "LAYER_KINDS", "blocked", "on_blocks", "q8_on_blocks", "q8u_channels",
           "feature_sums", "features", "fit", "fit_coefficients", "fit_kind", "fit_to_models", "forms", "kernel_index", "nchw_input_form",
           "predict", "relative_errors", "scaled"]
