"""Kernel probes: one-layer ONNX models written in the export's own forms, which
search.export.kernel_timing times in onnxruntime to learn the kernel-level latency predictors of
search.cost.kernels; and the shapes they are sampled at.

A probe is the graph the converter (search.export.onnx) writes for one Dense / Conv / depthwise
layer, then shaped by the same QDQ rewrite (onnx.qdq.integer_kernels) as every export:
- f32: float kernel + bias + ReLU (onnxruntime fuses them);
- q8: Q/DQ input, int8 kernel through DequantizeLinear, bias, ReLU, and the next layer's Q/DQ,
  which the rewrite turns into QuantizeLinear -> QLinearConv / QGemm -> DequantizeLinear;
- i8: the same without a next integer layer: ConvInteger / MatMulInteger + Cast + Mul + bias + ReLU;
- q8u: q8 with 8-bit weights, stored as the export stores them (uint8, zero point 128);
- emul: the float-op rounding of an activation (Div, Round, Add, Clip, Sub, Mul);
- eltwise: the unfused op after a layer: ReLU, 2x2 MaxPool, residual Add, NCHW Transpose (each
  per size; the predictor is their average cost);
- pool_u8: a 2x2 MaxPool on a uint8 input in NCHW, as onnxruntime runs the max pooling between a
  float layer and an integer one (search.cost.runtime_graph.u8_pooled);
- clip: a blocked float chain with ReLU6 (Clip) after each layer, less the same chain with ReLU:
  the pass MLAS's NCHWc kernels make over a conv's output for any activation but ReLU;
- kron: a Kronecker-factorized Dense layer as the export writes it (search.export.onnx.layers.
  kronecker: Reshapes around a broadcast MatMul and a GEMM, then the bias Add and ReLU), float.
Shapes are sampled log-uniformly over channel counts, spatial sizes, kernel sizes and strides,
or taken from a model's layers with their channels cut as channel pruning would cut them.
Each layer probe runs the profile's batch (1, or a server batch such as 32; kernel_timing
times float and QLinear layers in the middle of a chain). Float convolutions' features count the
channels the runtime computes, rounded up to its channel block (nchwc_layout, kernels.blocked);
those off its channel alignment are f32p samples (kernels.on_blocks), and q8 conv and depthwise
layers whose output channels are off the channel block are q8p samples (kernels.q8_on_blocks);
q8u conv and depthwise features count their output channels rounded up to the block
(kernels.q8u_channels).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from search.compression import lowrank
from search.compression.lowrank import kron_split
from search.compression.plan import KRONECKER
from search.cost import kernels as K
from search.export.onnx.graph import OPSET, GraphBuilder
from search.export.onnx.layers import kronecker
from search.export.onnx.qdq import integer_kernels
from search.study.space import FACTORIZE_RANKS, KRONECKER_RANK_SCALE


@dataclass(frozen=True, order=True)
class Shape:
    """One layer's shape for a probe; conv and depthwise inputs are [cin, hw, hw] (NCHW); a kron
    layer is a Dense of fan-in cin and width cout factorized in the Kronecker form at rank `rank`
    (both split by lowrank.kron_split). Shapes sort by their fields in order (kind, channels, ...)."""

    kind: str  # dense | conv | depthwise | kron
    cin: int
    cout: int  # = cin for depthwise
    hw: int = 1  # input height = width (1 for dense)
    k: int = 1  # kernel height = width
    stride: int = 1
    batch: int = 1  # examples per call
    rank: int = 0  # kron: the factorization's rank r

    @property
    def out_elems(self) -> int:
        """Output elements of one call (all `batch` examples)."""
        return self.batch * self.cout * self.out_hw ** 2

    @property
    def out_hw(self) -> int:
        return 1 if self.kind in ("dense", "kron") else (self.hw + self.stride - 1) // self.stride

    def features(self, block: int = 1, out_block: int = 1) -> list[float]:
        """KERNEL_FEATURES for one call: the monomials of M (positions x batch), N (channels), K (fan-in);
        block > 1: with the channels a float convolution computes on `block`-channel blocks
        (search.cost.kernels.blocked; pass it for the f32 form only); out_block > 1: with the
        output channels a q8u conv computes (search.cost.kernels.q8u_channels; the q8u form only).
        A kron layer's are those of its two GEMMs (search.cost.kernels.kron_features): r calls of
        [m1, m2] @ [m2, n2] and one [n1, r*m1] @ [r*m1, n2], M times the batch."""
        if self.kind == "kron":
            (m1, m2), (n1, n2) = kron_split(self.cin), kron_split(self.cout)
            return K.kron_features(self.rank, self.batch * m1, n2, m2, self.batch * n1, m1).tolist()
        n, k = float(self.cout), float(self.k * self.k * (1 if self.kind == "depthwise" else self.cin))
        if self.kind != "dense" and block > 1:
            n, k = K.blocked(self.cout, 1 if self.kind == "depthwise" else self.cin, self.k * self.k, block,
                             self.kind == "depthwise")
        if self.kind != "dense" and out_block > 1:
            n = float(K.q8u_channels(self.cout, out_block))
        return K.features(self.batch * self.out_hw ** 2, n, k, 1 if self.kind == "dense" else self.k * self.k).tolist()


def _model(g: GraphBuilder, x_shape: tuple[int, ...], out: str, out_shape: tuple[int, ...],
           dtype: int = TensorProto.FLOAT) -> bytes:
    g.node("Identity", [out], name="output")
    g.graph.node[-1].output[0] = "output"
    g.graph.input.append(helper.make_tensor_value_info("input", dtype, list(x_shape)))
    g.graph.output.append(helper.make_tensor_value_info("output", dtype, list(out_shape)))
    g.graph.name = "probe"
    model = helper.make_model(g.graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hwcompress-probe")
    model.ir_version = 10
    return model


def _layer(g: GraphBuilder, x: str, shape: Shape, form: str, name: str, rng: np.random.Generator, after_relu: bool,
           clip: bool = False) -> str:
    """Emit one layer as the converter does (layers.py): its input Q/DQ and DQ int8 kernel when
    integer, the kernel, the bias Add and a ReLU (a ReLU6, one Clip to [0, 6], with `clip`);
    returns the output. An input after a ReLU is quantized on [0, hi] (zero point 0), which lets
    onnxruntime drop the ReLU in front of a QuantizeLinear and fuse QLinear kernels, as in an export."""
    if shape.kind == "kron":  # float factors, as the export writes every Kronecker layer
        (m1, m2), (n1, n2) = kron_split(shape.cin), kron_split(shape.cout)
        a = (rng.standard_normal((m1 * n1, shape.rank)) * 0.1).astype(np.float32)
        b = (rng.standard_normal((shape.rank, m2 * n2)) * 0.1).astype(np.float32)
        bias = (rng.standard_normal(shape.cout) * 0.1).astype(np.float32)
        y = g.node("Add", [kronecker(g, name, x, a, b, (shape.cin, shape.cout)), g.const(bias, "bias")])
        return _activation(g, y, clip)
    dense = shape.kind == "dense"
    group = shape.cin if shape.kind == "depthwise" else 1
    w_shape = (shape.cin, shape.cout) if dense else (shape.cout, shape.cin // group, shape.k, shape.k)
    wide = form == "q8u"  # 8-bit weights: codes up to 127, stored as uint8 + 128 as the export does
    q = rng.integers(-127 if wide else -63, 128 if wide else 64, w_shape)
    bias = (rng.standard_normal(shape.cout) * 0.1).astype(np.float32)
    if form == "f32":
        w = g.const((q.astype(np.float32) * 0.01).astype(np.float32), "w")
    else:
        sx, zx = g.const(np.float32(0.02), "act_scale"), g.const(np.uint8(0 if after_relu else 128), "act_zp")
        x = g.node("DequantizeLinear", [g.node("QuantizeLinear", [x, sx, zx]), sx, zx])
        wq, zp = ((q + 128).astype(np.uint8), np.full(shape.cout, 128, np.uint8)) if wide else \
            (q.astype(np.int8), np.zeros(shape.cout, np.int8))
        dq = [g.const(wq, "wq"), g.const(np.full(shape.cout, 0.01, np.float32), "w_scale"), g.const(zp, "w_zp")]
        w = g.node("DequantizeLinear", dq, name=f"{name}_w_dq", axis=1 if dense else 0)
    if dense:
        y = g.node("Add", [g.node("MatMul", [x, w], name=name), g.const(bias, "bias")])
    else:
        p = shape.k // 2
        y = g.node("Conv", [x, w], name=name, kernel_shape=[shape.k, shape.k], strides=[shape.stride] * 2,
                   pads=[p, p, p, p], group=group)
        y = g.node("Add", [y, g.const(bias.reshape(1, -1, 1, 1), "bias")])
    return _activation(g, y, clip)


def _activation(g: GraphBuilder, y: str, clip: bool) -> str:
    """A ReLU after a layer, or with `clip` a ReLU6 (one Clip to [0, 6])."""
    if clip:
        return g.node("Clip", [y, g.const(np.float32(0.0), "clip_lo"), g.const(np.float32(6.0), "clip_hi")])
    return g.node("Relu", [y])


def probe_chain(shapes: Sequence[Shape], form: str, seed: int = 0, clip: bool = False) -> tuple[bytes, tuple[int, ...]]:
    """(serialized ONNX model, input shape) of layers applied in sequence, all in one export form
    (search.cost.kernels.FORMS): f32, q8 (each re-quantized for the next, the last for a following
    integer layer, so all run as QLinear kernels), q8u (the same with 8-bit, uint8 weights) or i8
    (integer kernels with float outputs); each layer's activation a ReLU, or with `clip` a ReLU6
    (one Clip). RuntimeError when the QDQ rewrite does not give the form asked for."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder()
    first, last = shapes[0], shapes[-1]
    dense = first.kind in ("dense", "kron")
    b = first.batch
    x_shape = (b, first.cin) if dense else (b, first.cin, first.hw, first.hw)
    out_shape = (b, last.cout) if dense else (b, last.cout, last.out_hw, last.out_hw)
    y = "input"
    for i, shape in enumerate(shapes):
        y = _layer(g, y, shape, form, f"layer{i}", rng, after_relu=i > 0, clip=clip)
        if form == "i8" and i + 1 < len(shapes):  # a float op between: no QLinear chain (a residual add's place)
            y = g.node("Mul", [y, g.const(np.float32(1.0), "one")])
    if form.startswith("q8"):  # the next integer layer's input quantization
        sn, zn = g.const(np.float32(0.05), "act_scale"), g.const(np.uint8(0), "act_zp")
        y = g.node("DequantizeLinear", [g.node("QuantizeLinear", [y, sn, zn]), sn, zn])
    model = _model(g, x_shape, y, out_shape)
    if form != "f32":
        forms = integer_kernels(model)
        for i in range(len(shapes)):
            got = forms.get(f"layer{i}", "float")
            if form.startswith("q8") != got.startswith("QLinear") or not (got.startswith("QLinear") or got.endswith("Integer")):
                raise RuntimeError(f"probe {shapes[i]} {form}: the QDQ rewrite gave {got}")
    onnx.checker.check_model(model)
    return model.SerializeToString(), x_shape


def probe(shape: Shape, form: str, seed: int = 0) -> tuple[bytes, tuple[int, ...]]:
    """One layer alone (probe_chain of one)."""
    return probe_chain([shape], form, seed)


def partner(shape: Shape) -> Shape:
    """The layer that maps `shape`'s output back to its input channels (stride 1, same kernel):
    X -> partner(X) can be repeated, so a chain of both measures them in the middle of a network."""
    return dataclasses.replace(shape, cin=shape.cout, cout=shape.cin, hw=shape.out_hw, stride=1)


def emul_probe(n: int) -> tuple[bytes, tuple[int, ...]]:
    """The float-op rounding of n elements, as the converter writes it (layers.py)."""
    g = GraphBuilder()
    sc, zc = g.const(np.float32(0.02)), g.const(np.float32(3.0))
    r = g.node("Add", [g.node("Round", [g.node("Div", ["input", sc])]), zc])
    r = g.node("Clip", [r, g.const(np.float32(0)), g.const(np.float32(65535.0))])
    y = g.node("Mul", [g.node("Sub", [r, zc]), sc])
    return _model(g, (1, n), y, (1, n)).SerializeToString(), (1, n)


ELTWISE_OPS = ("Relu", "Add", "Transpose", "MaxPool")


def eltwise_probe(n: int, op: str) -> tuple[bytes, tuple[int, ...]]:
    """One unfused op on about n elements: ReLU, a residual Add (x + relu(x)), a layout Transpose
    (NCHW -> NHWC), or a 2x2 MaxPool."""
    c = max(1, int(round(n / 64)))
    shape = (1, c, 8, 8)
    g = GraphBuilder()
    if op == "MaxPool":
        y, out = g.node("MaxPool", ["input"], kernel_shape=[2, 2], strides=[2, 2]), (1, c, 4, 4)
    elif op == "Add":
        y, out = g.node("Add", ["input", g.node("Relu", ["input"])]), shape
    elif op == "Transpose":
        y, out = g.node("Transpose", ["input"], perm=[0, 2, 3, 1]), (1, 8, 8, c)
    else:
        y, out = g.node("Relu", ["input"]), shape
    return _model(g, shape, y, out).SerializeToString(), shape


def pool_u8_probe(n: int) -> tuple[bytes, tuple[int, ...]]:
    """A 2x2 MaxPool over about n uint8 elements in NCHW (the model's input is uint8)."""
    c = max(1, int(round(n / 64)))
    g = GraphBuilder()
    y = g.node("MaxPool", ["input"], kernel_shape=[2, 2], strides=[2, 2])
    return _model(g, (1, c, 8, 8), y, (1, c, 4, 4), TensorProto.UINT8).SerializeToString(), (1, c, 8, 8)


def _nchwc_out(shape: Shape, threads: int) -> int:
    """The output channels of the NCHWc kernel onnxruntime runs a one-conv f32 probe of `shape`
    on (read from the optimized graph it saves), 0 when it keeps the plain Conv."""
    import os
    import tempfile

    import onnxruntime as ort

    model, _ = probe(shape, "f32")
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3  # the warning that an optimized model is host-specific is the point here
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Conv" and node.domain.endswith("nchwc") and len(dims.get(node.input[1], [])) == 4:
            return int(dims[node.input[1]][0])
    return 0


def nchwc_layout(threads: int = 1) -> tuple[int, int]:
    """(channel block, channel alignment) of the runtime's float convolutions (search.cost.kernels.
    blocked, on_blocks): the block is the output channels onnxruntime pads a one-channel conv's
    weights to when it rewrites the conv into its NCHWc layout (16 with AVX-512, 8 with AVX2); the
    alignment the smallest a for which a conv with block + a channels still gets that layout.
    (1, 1) when it keeps the plain Conv (no NCHWc kernels on this CPU or build)."""
    block = _nchwc_out(Shape("conv", 1, 1, 8, 3, 1), threads)
    if block <= 1:
        return 1, 1
    align = next((a for a in (1, 2, 4, 8) if a < block and _nchwc_out(Shape("conv", block + a, block + a, 8, 3, 1), threads)),
                 block)
    return block, align


def _log_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))


def sampled_shapes(n: int, seed: int = 0) -> list[Shape]:
    """n shapes of each layer kind, log-uniform channels, spatial sizes 4..32, kernels 1 and 3.
    Conv shapes cycle so that a chain of the shape and its partner (which reads its output:
    kernel_timing.measure_kernels) runs on each of the runtime's float paths (kernels.on_blocks) and each int8
    path (kernels.q8_on_blocks, a channel block of 8 or 16): every other one has both counts
    rounded to multiples of 16 (blocked, int8 on the block), every fourth both counts odd and
    above 16 (the plain float kernels, the int8 remainder path), the rest as sampled (image stems
    among them); every other shape adds a 1x1 conv reading 1-15 channels (the NCHW-input kernel,
    f32n, that heavily pruned 1x1 layers run) with output channels a multiple of 4 from 16 up (so
    that the partner reading them runs blocked). Every other depthwise shape has its channels
    rounded to a multiple of 16. Every other shape adds a Kronecker-factorized Dense (kind kron):
    fan-in 64-2048 and width 16-1024, multiples of 4, at a rank of 1-32 (the search offers ranks of
    3-9% of the full rank: 4-11 for lenet300's layers)."""
    rng, rng1, rng2 = np.random.default_rng(seed), np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    out: list[Shape] = []
    up16 = lambda c: max(16, 16 * round(c / 16))
    odd = lambda c: max(17, c | 1)
    for i in range(n):
        out.append(Shape("dense", _log_int(rng, 8, 2048), _log_int(rng, 8, 1024)))
        hw, k, s = int(rng.choice([4, 7, 8, 14, 16, 28, 32])), int(rng.choice([1, 3, 3, 5])), int(rng.choice([1, 1, 2]))
        budget = 6e6  # keep a probe under a few ms: MACs <= budget
        cin, cout = _log_int(rng, 1, 256), _log_int(rng, 2, 256)
        while cin * cout * k * k * (hw // s) ** 2 > budget and max(cin, cout) > 4:
            cin, cout = max(cin * 3 // 4, 1), max(cout * 3 // 4, 2)
        cin, cout = ((up16(cin), up16(cout)), (cin, cout), (up16(cin), up16(cout)), (odd(cin), odd(cout)))[i % 4]
        out.append(Shape("conv", cin, cout, hw, k, s))
        if i % 2 == 0:  # a 1x1 conv reading 1-15 channels in NCHW (f32n), its partner blocked; from a
            # generator of its own, so that the other shapes stay those a seed gave before (a shifted
            # sample priced lenet5's int8 stem 30% faster than it runs)
            cin, cout, hw = _log_int(rng1, 1, 15), _log_int(rng1, 2, 256), int(rng1.choice([4, 7, 8, 14, 16, 28, 32]))
            out.append(Shape("conv", cin, cout if cout < 16 else 4 * round(cout / 4), hw, 1, 1))
        c = _log_int(rng, 8, 768)
        c = up16(c) if i % 2 == 0 else c
        out.append(Shape("depthwise", c, c, int(rng.choice([4, 7, 8, 14, 16, 28])), 3, int(rng.choice([1, 1, 2]))))
        if i % 2 == 1:  # a Kronecker layer, from a generator of its own (the shapes above stay a seed's)
            fi, fo = 4 * _log_int(rng2, 16, 512), 4 * _log_int(rng2, 4, 256)
            (m1, m2), (n1, n2) = kron_split(fi), kron_split(fo)
            out.append(Shape("kron", fi, fo, rank=_log_int(rng2, 1, min(32, m1 * n1, m2 * n2))))
    return out


def layer_shapes(layers: Sequence, keeps: Iterable[float] = (1.0, 0.5)) -> list[Shape]:
    """The shapes a model's layers take under channel pruning: every pair of kept fractions of
    their input and output channels from `keeps` (default all and half); and a Dense layer that
    takes the Kronecker form, in it at each rank the search offers (every channel kept)."""
    out: set[Shape] = set()
    keeps = tuple(keeps)
    for l in layers:
        if l.kind == "dense" and lowrank.form_problem(l, KRONECKER) is None:
            d = lowrank.full_rank(l, KRONECKER)
            for ratio in FACTORIZE_RANKS:
                if ratio < 1:
                    r = int(lowrank.achieved_rank(ratio * KRONECKER_RANK_SCALE, d))
                    out.add(Shape("kron", int(l.fan_in), int(l.out_channels), rank=r))
        cin, cout = int(l.kernel_shape[-2]) * (l.groups if l.kind == "depthwise" else 1), l.out_channels
        for ki in keeps:
            for ko in keeps:
                i, o = max(1, round(cin * ki)), max(1, round(cout * ko))
                if l.kind == "dense":
                    out.add(Shape("dense", int(l.kernel_shape[0] * ki) or 1, o))
                elif l.kind == "depthwise":
                    out.add(Shape("depthwise", o, o, int(l.in_shape[0]), int(l.kernel_shape[0]),
                                  max(1, int(l.in_shape[0]) // max(int(l.out_shape[0]), 1))))
                else:
                    out.add(Shape("conv", i, o, int(l.in_shape[0]), int(l.kernel_shape[0]),
                                  max(1, int(l.in_shape[0]) // max(int(l.out_shape[0]), 1))))
    return sorted(out)


def relu_chain(n: int) -> bytes:
    """n chained ReLUs on 16 elements (the per-inference and per-op costs: kernel_timing.measure_kernels)."""
    g = GraphBuilder()
    y = "input"
    for _ in range(n):
        y = g.node("Relu", [y])
    return _model(g, (1, 16), y, (1, 16)).SerializeToString()
