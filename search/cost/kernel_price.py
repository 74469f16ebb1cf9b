"""Latency of K plans from kernel-level predictors (search.cost.kernels): which kernel the
runtime runs for each layer (its kind, form and GEMM dimensions after channel removal, on the
runtime's channel blocks), the unfused ops and layout reorders around it (search.cost.
runtime_graph), and the predictors' price of each. search.cost.roofline counts what a plan keeps
(channels, factorization ranks) and calls `kernel_latency` for a profile with a [kernels] table;
memory and size stay roofline's."""
from __future__ import annotations

import numpy as np

from hw_profiles import KernelModel
from hw_profiles.schema import LAYER_KINDS
from search.compression import plan as P
from search.cost import kernels as K
from search.cost import runtime_graph as G


I8_A_OPS = 4.0 / 6.0  # the share of an i8 kernel's fixed cost a factorized layer's integer A runs


def emptied_keep(model: KernelModel, la, ratio: np.ndarray, unstructured: np.ndarray, keep_ch: np.ndarray,
                 wb: np.ndarray, ab: np.ndarray, codebook: np.ndarray, keep_out: np.ndarray) -> np.ndarray:
    """[K, L] the kept share of each layer's output channels in the export's kernels: keep_out,
    less the channels unstructured pruning leaves all-zero, which the ONNX export removes
    (search.export.onnx.layers: a constant channel folds into its readers' bias, an unread one
    is dropped from its producer) where the layer's group allows it (la.emptiable: no residual add).

    A channel of a layer pruned unstructured at ratio r, F weights feeding it (its kept fan-in),
    is all-zero with probability r^F when the kept weights fall at random (a depthwise 3x3 at
    90%: 39%; a 1x1 conv reading 64 channels: 0.1%). A group loses a channel when any member's
    is all-zero (MobileNetV2's expand conv and the depthwise conv reading it: the conv's channel
    is constant, or the depthwise one's is unread), so its expected kept count is C times the
    product of its members' (1 - r^F), rounded up as the export rounds it: to the runtime's
    channel alignment, to its channel block for an integer conv (exporter._onnx_exports). On
    MobileNetV2 at 90% that expects 16 of the stem's 32 channels and 48, 84, 84, 116, 116, 116
    and 236 of its blocks' 96-384; its export kept 16 and 48, 84, 92, 104, 120, 112 and 240
    (magnitude pruning is not random, but close). An expectation: a plan's export may keep a
    few more (as here) or fewer. Plans [K, L]: ratio, unstructured (granularity, not
    factorized), keep_ch (the kept share of the fan-in channels), weight and activation bits,
    codebook layers."""
    fan_in = np.maximum(la.fan_in * keep_ch, 1.0)
    alive = np.where(unstructured, 1.0 - np.clip(ratio, 0.0, 1.0) ** fan_in, 1.0)
    members = la.leader[:, None] == np.arange(len(la.leader))[None, :]  # [L, G]: layer i is in group g
    group = np.exp(np.log(np.maximum(alive, 1e-300)) @ members)  # [K, G]: product over members
    share = group[:, la.leader]
    integer = (wb <= 8) & (ab <= 8) & ~codebook
    align = np.where(integer & (la.kind != LAYER_KINDS.index("dense")), model.channel_block,
                     np.where(la.kind == LAYER_KINDS.index("dense"), 1, model.channel_align))
    kept = keep_out * la.out_ch
    n = np.minimum(kept, align * np.ceil(np.ceil(np.round(kept * share, 6)) / align))
    return np.where(la.emptiable & unstructured & (share < 1.0), np.maximum(n, 1.0) / la.out_ch, keep_out)


def kernel_latency(model: KernelModel, la, geo: dict[str, np.ndarray], *, wb: np.ndarray, ab: np.ndarray,
                   codebook: np.ndarray, fact: np.ndarray, kron: np.ndarray, rk: np.ndarray, keep_in: np.ndarray,
                   keep_out: np.ndarray, keep_ch: np.ndarray, keep_a: np.ndarray, keep_b: np.ndarray,
                   feature_sums: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(per-layer latency [K, L] seconds, per-kernel-kind latency [K, len(KERNELS)] seconds,
    KERNEL_FEATURES summed per kind [K, len(KERNELS), F] or None) of K plans.

    la: the layers' arrays (roofline._layer_arrays); geo: each factorization figure [K, L] in the
    plans' forms (lowrank.geometry); the rest [K, L]: weight and activation bits, codebook layers,
    factorized and Kronecker layers, their achieved rank, and the kept fractions of the input
    channels (keep_in), output channels (keep_out), fan-in channels (keep_ch; a depthwise layer's
    are its outputs) and of a factorized layer's A and B (keep_a, keep_b)."""
    # removed channels are exactly 0 (search.engine.steps.zero_removed): no bias maps
    # a Kronecker layer runs in float (its activations rounded in float ops), so a layer feeding
    # it is not re-quantized for it: an i8 kernel, not a QLinear one (lenet5's conv2 before a
    # Kronecker fc1: ConvInteger, 1.25-1.33x a QLinearConv's prediction)
    form = K.forms(la.chained, wb, ab, codebook | kron)
    # a factorized layer is two kernels of its kind, as the export writes them: A (SVD and
    # spatial: N = r, K = its kept fan-in), integer (i8: its output is not re-quantized) where
    # its weights and input are <= 8 bits, then B (N = kept out, K = r, kw * r in the spatial
    # form) in f32 (its input is not quantized); Kronecker: two f32 batched matmuls, the first
    # r GEMMs of [m1, m2] @ [m2, n2] per example (onnxruntime runs a broadcast MatMul as one
    # GEMM call per batch entry: r calls, each with its fixed cost), the second one GEMM, priced
    # together as one `kron` kernel (below)
    int_a = (wb <= 8) & (ab <= 8) & ~codebook & ~kron
    form = np.where(fact, np.where(int_a, K.FORMS.index("i8"), K.FORMS.index("f32")), form)
    integer = form != K.FORMS.index("f32")
    # GEMM dimensions of one call: positions x the profile's batch, kept output channels, kept
    # fan-in; every element count below is per call too
    bt = float(model.batch)
    m, n, k = la.out_elems / la.out_ch * bt, la.out_ch * keep_out, la.fan_in * keep_ch
    block, align = model.channel_block, model.channel_align
    q8u = (form == K.FORMS.index("q8u")) & (la.kind != LAYER_KINDS.index("dense")) & ~fact
    n = np.where(q8u, K.q8u_channels(n, model.q8u_block), n)  # whole SIMD blocks of channels
    blocked = nchw_in = np.zeros(rk.shape, bool)
    if block > 1:  # float 2-D convolutions run on channel blocks (kernels.blocked) or the plain path (f32p)
        dw = la.kind == LAYER_KINDS.index("depthwise")
        q8_off = (form == K.FORMS.index("q8")) & (la.kind != LAYER_KINDS.index("dense")) & ~fact & ~K.q8_on_blocks(n, block)
        form = np.where(q8_off, K.FORMS.index("q8p"), form)  # int8 kernels' remainder path
        f32_conv = la.nchwc & (form == K.FORMS.index("f32")) & ~fact
        cin = np.round(k / la.area)
        blocked = f32_conv & K.on_blocks(n, cin, block, align, dw)
        nb, kb = K.blocked(n, cin, la.area, block, dw)
        n, k = np.where(blocked, nb, n), np.where(blocked, kb, k)
        form = np.where(f32_conv & ~blocked, K.FORMS.index("f32p"), form)
        # read in NCHW: onnxruntime's NCHW-input kernel, f32n for a 1x1 conv, f32nk for a kxk one (stems,
        # heavily pruned layers; calibrated as f32, given a scale of its own by a fit on exports)
        nchw_in = blocked & ~dw & (cin < block)
        form = np.where(nchw_in, K.nchw_input_form(la.area), form)
    # a factorized conv's two kernels are float convs too (A unless it is i8), blocked or plain
    # by their own channel counts: A writes r channels, B reads them (a rank of 25 runs B plain)
    na, ka = rk, geo["ka"] * keep_a
    nb2, kb2 = geo["nb"] * keep_b, rk * geo["kb"]
    b_form = np.full(rk.shape, K.FORMS.index("f32"))
    b_blk = np.zeros(rk.shape, bool)
    reorders = inner = 0.0
    in_nchwc = np.zeros(rk.shape, bool)
    if block > 1:
        conv_fact = fact & la.nchwc & ~kron
        ta, tb = np.maximum(geo["ta"], 1), np.maximum(geo["tb"], 1)
        a_f32 = conv_fact & (form == K.FORMS.index("f32"))
        a_blk = a_f32 & K.on_blocks(na, ka / ta, block, align)
        b_blk = conv_fact & K.on_blocks(nb2, kb2 / tb, block, align)
        (na_b, ka_b), (nb_b, kb_b) = K.blocked(na, ka / ta, ta, block), K.blocked(nb2, kb2 / tb, tb, block)
        na, ka = np.where(a_blk, na_b, na), np.where(a_blk, ka_b, ka)
        nb2, kb2 = np.where(b_blk, nb_b, nb2), np.where(b_blk, kb_b, kb2)
        # a factor reading fewer channels than the block runs f32n (1x1) or f32nk, as an unfactorized conv
        a_n = a_blk & (np.round(geo["ka"] * keep_a / ta) < block)
        b_n = b_blk & (np.round(rk) < block)
        form = np.where(a_f32 & ~a_blk, K.FORMS.index("f32p"), np.where(a_n, K.nchw_input_form(ta), form))
        b_form = np.where(conv_fact & ~b_blk, K.FORMS.index("f32p"), np.where(b_n, K.nchw_input_form(tb), b_form))
        # the layouts each conv reads and writes, for the reorders between them (runtime_graph.reorder_count);
        # a factorized conv reads as its A does and writes as its B does
        conv = la.nchwc & ~fact
        a_cin = np.round(geo["ka"] * keep_a / ta)
        in_nchw = conv & ((form == K.FORMS.index("f32p")) | np.isin(form, K.INT_IN) | nchw_in) \
            | conv_fact & (~a_blk | (a_cin < block))
        in_nchwc = blocked & (dw | (cin >= block)) | a_blk & (a_cin >= block)
        reorders = G.reorder_count(la.direct, np.where(fact, b_blk, blocked), in_nchw, in_nchwc,
                                   la.unfused[:, :2].sum(axis=1) > 0)
        # and inside it: A's output (mid x r elements) reordered when B reads the other layout
        # (onnxruntime's graph of lenet5 at rank 5 and 13: a ReorderOutput between A and its 1x1 B)
        inner = np.where(conv_fact & (a_blk != (b_blk & (np.round(rk) >= block))), geo["mid"] * rk * bt, 0.0)
    # a Kronecker layer is one `kron` kernel (its probes time the layer as exported, Reshapes and
    # unfused bias and ReLU included), from its two GEMMs (K.kron_features)
    fa = np.where(kron[..., None], K.kron_features(rk, geo["pa"] * bt, geo["nb"], geo["ka"], geo["pb"] * bt, geo["kb"]),
                  K.features(geo["pa"] * bt, na, ka, geo["ta"]))
    feats = np.where(fact[..., None], fa, K.features(m, n, k, la.area))
    # an i8 kernel's fixed cost is its probe's six ops (QuantizeLinear, the integer kernel, Cast,
    # scale Mul, bias Add, ReLU); a factorized layer's i8 A runs four: its bias and ReLU follow B
    feats[..., 0] *= np.where(fact & int_a, I8_A_OPS, 1.0)
    second = (K.kernel_index(la.kind, b_form),
              np.where((fact & ~kron)[..., None], K.features(geo["pb"] * bt, nb2, kb2, geo["tb"]), 0.0))
    emul = np.where(~integer & (ab < P.FLOAT), la.in_elems * keep_in * bt, 0.0)
    kernel = np.where(kron, K.KRON, K.kernel_index(la.kind, form))
    out_elems = np.broadcast_to(la.out_elems * keep_out * bt, rk.shape)
    u8 = G.u8_pooled(la.pool_reader, form).astype(np.float64)  # a MaxPool on uint8 replaces one unfused op
    # the ops after a factorized conv are those after its B (a float kernel, blocked or plain);
    # after a pooling, its reader's layout: NCHWc (a blocked float conv), NHWC (a QLinear conv)
    qlinear = np.isin(form, K.QLINEAR) & la.nchwc & ~fact
    other = ((in_nchwc | qlinear).astype(np.float64) @ la.direct.T.astype(np.float64)) > 0
    n_elt = np.maximum(G.eltwise_count(la.unfused, np.where(fact, b_form, form), np.where(fact, b_blk, blocked), other)
                       - u8, 0.0) + reorders
    # a ReLU6 (Clip) after a conv whose last kernel runs blocked: a pass over its output (the
    # `clip` kernel); after a float Dense layer an unfused op; folded into integer kernels
    dense_f32 = (la.kind == LAYER_KINDS.index("dense")) & ~integer
    clip = (la.clipped & np.where(fact, b_blk, blocked)).astype(np.float64)
    n_elt = n_elt + (la.clipped & dense_f32)
    lat, by_kind = K.predict(model, kernel, feats, emul, out_elems, second, n_elt, u8, clip, inner)
    sums = K.feature_sums(kernel, feats, emul, out_elems, second, n_elt, u8, clip, inner) if feature_sums else None
    return lat, by_kind, sums
