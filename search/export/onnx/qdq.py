"""Shape an exported ONNX graph so that onnxruntime really runs integer kernels.

onnxruntime fuses DequantizeLinear -> Conv/Gemm -> QuantizeLinear into QLinearConv / QGemm,
but a QDQ layer whose output is not re-quantized runs as "dequantize the weights, then float",
every call: many times slower than float. So, for every integer layer (Q/DQ input, DQ int8/uint8 kernel):
  * chained: when its output reaches the next int8 layer's QuantizeLinear through only the bias
    add, Relu, MaxPool, Reshape, Transpose, Clip and Max / Min with constant bounds (ReLU6), the
    bias becomes an int32 DQ input of the Conv/Gemm, and the next layer's Q/DQ is repeated right
    after the layer (after its Relu); a ReLU6's Min whose bound the next grid saturates below is
    dropped instead, so the Relu feeds that QuantizeLinear directly. This is exact: quantization is monotone, so it commutes
    with Relu, clipping and max pooling (Q(max(a, c)) = max(Q(a), Q(c))), and re-quantizing on
    the same grid changes nothing; only the int32 bias is rounded (by at most half of s_x * s_w).
  * otherwise Dense runs as MatMulInteger and Conv as ConvInteger (uint8 input with its zero
    point, uint8 kernel with zero point 128, exact int32 accumulation; onnxruntime pads with
    the input zero point, i.e. with real zeros), then Cast and one float scale s_x * s_w per
    output channel, the bias Add after it as before. onnxruntime's CPU ConvInteger takes only a
    per-tensor kernel zero point; a kernel with several (never written by layers.py) runs in
    float with the dequantized kernel and the same activation rounding in float ops.
Consecutive Adds of constants are merged, so MatMul + bias + Relu fuse as in a float model.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from search.export.onnx.graph import GraphBuilder

CHAIN_OPS = {"Relu", "MaxPool", "Reshape", "Transpose", "Clip", "Identity"}
BOUND_OPS = {"Max", "Min"}  # with constant bounds only


def merge_const_adds(model: onnx.ModelProto) -> None:
    """Add(Add(x, c1), c2) -> Add(x, c1 + c2) when the inner Add has one consumer."""
    g = GraphBuilder(model.graph, tag="q")
    changed = True
    while changed:
        changed = False
        prod, cons = g.maps()
        for node in list(g.graph.node):
            if node.op_type != "Add" or g.arr(node.input[1]) is None:
                continue
            inner = prod.get(node.input[0])
            if inner is None or inner.op_type != "Add" or g.arr(inner.input[1]) is None or len(cons[inner.output[0]]) != 1:
                continue
            c = g.arr(inner.input[1]) + g.arr(node.input[1])
            node.input[0], node.input[1] = inner.input[0], g.const(c.astype(np.float32), "bias")
            g.graph.node.remove(inner)
            changed = True
            break


def _layer_parts(g: GraphBuilder, node, prod):
    """(x DQ node, x Q node, W DQ node) when `node` is an int8 QDQ Conv/MatMul, else None."""
    if node.op_type not in ("Conv", "MatMul") or len(node.input) < 2:
        return None
    wdq, xdq = prod.get(node.input[1]), prod.get(node.input[0])
    if wdq is None or wdq.op_type != "DequantizeLinear" or xdq is None or xdq.op_type != "DequantizeLinear":
        return None
    w = g.inits.get(wdq.input[0])
    xq = prod.get(xdq.input[0])
    if w is None or w.data_type not in (TensorProto.INT8, TensorProto.UINT8) or xq is None or xq.op_type != "QuantizeLinear":
        return None
    return xdq, xq, wdq


def _chain(node, prod, cons, g: GraphBuilder):
    """(bias Add or None, ops after it, the next layer's QuantizeLinear) or None."""
    out = node.output[0]
    users = cons[out]
    bias = None
    if len(users) == 1 and users[0].op_type == "Add" and g.arr(users[0].input[1]) is not None:
        bias = users[0]
        out = bias.output[0]
    ops = []
    while True:
        users = cons[out]
        if len(users) != 1:
            return None
        u = users[0]
        if u.op_type == "QuantizeLinear":
            return bias, ops, u
        if u.op_type in BOUND_OPS and all(g.arr(i) is not None for i in u.input[1:]):
            pass  # max(x, c) / min(x, c): ReLU6 as jnp.clip writes it
        elif u.op_type not in CHAIN_OPS:
            return None
        ops.append(u)
        out = u.output[0]


def integer_kernels(model: onnx.ModelProto) -> dict[str, str]:
    """Rewrite integer QDQ layers as described in the module docstring; returns {node: form}."""
    merge_const_adds(model)
    g = GraphBuilder(model.graph, tag="q")
    forms: dict[str, str] = {}
    names = [n.name for n in g.graph.node if n.op_type in ("Conv", "MatMul")]
    for name in names:  # nodes are looked up again after every rewrite (a sort copies them)
        prod, cons = g.maps()
        node = next(n for n in g.graph.node if n.name == name)
        parts = _layer_parts(g, node, prod)
        if parts is None:
            continue
        _, xq, wdq = parts
        sx = float(g.arr(xq.input[1]))
        sw = g.arr(wdq.input[1]).astype(np.float32)
        chain = _chain(node, prod, cons, g)
        bias_ok = chain is not None and (chain[0] is None or _per_channel(g.arr(chain[0].input[1]), node.op_type, sw.size))
        if chain is not None and bias_ok:
            _chained(g, node, chain, sx, sw)
            forms[node.name] = "QLinear" + ("Conv" if node.op_type == "Conv" else "Gemm")
        elif node.op_type == "MatMul":
            _matmul_integer(g, node, xq, wdq, sx, sw)
            forms[node.name] = "MatMulInteger"
        elif _uint8_able(g.arr(wdq.input[0]), g.arr(wdq.input[2])):
            _conv_integer(g, node, xq, wdq, sx, sw)
            forms[node.name] = "ConvInteger"
        else:
            _float_conv(g, node, xq, wdq)
            forms[node.name] = "float"
    g.drop_unused()
    onnx.checker.check_model(model)
    return forms


def _uint8_able(w: np.ndarray, zp: np.ndarray) -> bool:
    """Whether the kernel has one zero point and fits uint8 with zero point 128."""
    if np.unique(zp).size != 1:
        return False
    v = w.astype(np.int32) - int(zp.reshape(-1)[0])
    return bool(v.min(initial=0) >= -128 and v.max(initial=0) <= 127)


def _per_channel(b: np.ndarray, op: str, c: int) -> bool:
    if op == "Conv":
        return b.size == c and (b.ndim == 1 or b.shape == (1, c, 1, 1))
    return b.size == c and b.shape[-1] == c


def _chained(g: GraphBuilder, node, chain, sx: float, sw: np.ndarray) -> None:
    bias, ops, q_next = chain
    if bias is not None:
        b = g.arr(bias.input[1]).reshape(-1).astype(np.float64)
        sb = (np.float32(sx) * sw).astype(np.float32)
        bq = np.clip(np.round(b / sb), -2**31, 2**31 - 1).astype(np.int32)
        dq = [g.const(bq, "bias_q"), g.const(sb, "bias_scale"), g.const(np.zeros(bq.size, np.int32), "bias_zp")]
        bdq = g.node("DequantizeLinear", dq, "bias_dq", axis=0)
        if node.op_type == "MatMul":
            node.op_type = "Gemm"
        node.input.append(bdq)
        g.rewire(bias.output[0], node.output[0])
        g.graph.node.remove(bias)
    after = ops[0] if ops and ops[0].op_type == "Relu" else node  # after the Relu: fused by onnxruntime
    rest = ops[1:] if after is not node else ops
    if len(rest) == 1 and _saturated_min(g, rest[0], q_next):  # ReLU6 whose 6 the next grid cannot reach
        g.rewire(rest[0].output[0], after.output[0], [q_next])
        g.graph.node.remove(rest[0])
        g.toposort()
        return
    src = after.output[0]
    users = [n for n in g.graph.node if src in n.input]
    qn = g.node("QuantizeLinear", [src, q_next.input[1], q_next.input[2]], "requant")
    dqn = g.node("DequantizeLinear", [qn, q_next.input[1], q_next.input[2]], "requant_dq")
    g.rewire(src, dqn, users)
    g.toposort()


def _saturated_min(g: GraphBuilder, op, q) -> bool:
    """Whether `op` is Min(x, c) whose bound c quantizes, on QuantizeLinear `q`'s grid, to the
    grid's largest code: then Q(min(x, c)) = min(Q(x), Q(c)) = Q(x) (quantization is monotone and
    saturates), so the Min can go. A ReLU6 (Relu then Min(x, 6)) whose output range was calibrated
    (at most 6) is one. Left in, the Min runs in float between a DequantizeLinear and a
    QuantizeLinear after every such layer: MobileNetV2 w4a8 at 28x28 spent 61 us of its 286 in
    Min alone (onnxruntime's profile, one thread, AVX-512)."""
    if op.op_type != "Min" or len(op.input) != 2:
        return False
    c, s = g.arr(op.input[1]), g.arr(q.input[1])
    z = g.arr(q.input[2]) if len(q.input) > 2 else np.asarray(np.uint8(0))  # ONNX: uint8 zero point by default
    if c is None or s is None or z is None or c.size != 1 or s.size != 1 or z.size != 1:
        return False
    top = np.iinfo(z.dtype).max
    code = np.round(np.float32(c.reshape(())) / np.float32(s.reshape(()))) + int(z.reshape(()))
    return bool(code >= top)


def _matmul_integer(g: GraphBuilder, node, xq, wdq, sx: float, sw: np.ndarray) -> None:
    scale = g.const((np.float32(sx) * sw).astype(np.float32), "mm_scale")
    acc = g.node("MatMulInteger", [xq.output[0], wdq.input[0], xq.input[2], wdq.input[2]], "acc", name=node.name + "_int")
    accf = g.node("Cast", [acc], "acc_f", to=TensorProto.FLOAT)
    node.op_type = "Mul"
    del node.input[:]
    node.input.extend([accf, scale])
    g.drop_unused()
    g.toposort()


def _conv_integer(g: GraphBuilder, node, xq, wdq, sx: float, sw: np.ndarray) -> None:
    """ConvInteger (same attributes) -> Cast -> Mul by s_x * s_w, as [1, C, 1, 1]; in place of `node`.

    The kernel goes in as uint8 with zero point 128 (int8 q -> q + 128, exact): onnxruntime
    1.32's CPU ConvInteger ran int8 kernels about 6x slower than uint8 ones (measured, AVX2)."""
    scale = g.const((np.float32(sx) * sw).astype(np.float32).reshape(1, -1, 1, 1), "conv_scale")
    w = g.arr(wdq.input[0]).astype(np.int32) - int(g.arr(wdq.input[2]).reshape(-1)[0]) + 128
    ins = [xq.output[0], g.const(w.astype(np.uint8), "wq"), xq.input[2], g.const(np.uint8(128), "w_zp")]
    acc = g.node("ConvInteger", ins, "acc", name=node.name + "_int")
    g.graph.node[-1].attribute.extend(node.attribute)
    accf = g.node("Cast", [acc], "acc_f", to=TensorProto.FLOAT)
    node.op_type = "Mul"
    del node.input[:]
    del node.attribute[:]
    node.input.extend([accf, scale])
    g.drop_unused()
    g.toposort()


def _float_conv(g: GraphBuilder, node, xq, wdq) -> None:
    """Dequantized float kernel; the activation rounding as float ops (exactly as Flax)."""
    shape = (-1, *([1] * (g.arr(wdq.input[0]).ndim - 1)))
    q = g.arr(wdq.input[0]).astype(np.float32) - g.arr(wdq.input[2]).astype(np.float32).reshape(shape)
    s = g.arr(wdq.input[1]).astype(np.float32).reshape(shape)
    node.input[1] = g.const((q * s).astype(np.float32), "w")
    sx, zx = g.arr(xq.input[1]), g.arr(xq.input[2])
    sc, zc = g.const(np.float32(sx), "sx"), g.const(np.float32(zx), "zx")
    lo, hi = g.const(np.float32(0), "lo"), g.const(np.float32(255), "hi")
    r = g.node("Round", [g.node("Div", [xq.input[0], sc], "div")], "round")
    r = g.node("Clip", [g.node("Add", [r, zc], "addz"), lo, hi], "clip")
    node.input[0] = g.node("Mul", [g.node("Sub", [r, zc], "subz"), sc], "mul")
    g.drop_unused()
    g.toposort()
