"""Shape an exported ONNX graph so that onnxruntime really runs integer kernels.

onnxruntime fuses DequantizeLinear -> Conv/Gemm -> QuantizeLinear into QLinearConv / QGemm,
but a QDQ layer whose output is not re-quantized runs as "dequantize the weights, then float",
every call: many times slower than float. So, for every integer layer (Q/DQ input, DQ int8/uint8 kernel):
  * chained: when its output reaches the next int8 layer's QuantizeLinear through only the bias
    add, Relu, MaxPool, Reshape, Transpose and Clip, the bias becomes an int32 DQ input of the
    Conv/Gemm, and the next layer's Q/DQ is repeated right after the layer (after its Relu).
    This is exact: quantization is monotone and maps 0 to 0, so it commutes with Relu and
    max pooling, and re-quantizing on the same grid changes nothing; only the int32 bias is
    rounded (by at most half of s_x * s_w).
  * otherwise Dense runs as MatMulInteger (exact integer accumulation, then one float scale)
    and Conv in float with the dequantized kernel and the same activation rounding in float ops.
Consecutive Adds of constants are merged, so MatMul + bias + Relu fuse as in a float model.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHAIN_OPS = {"Relu", "MaxPool", "Reshape", "Transpose", "Clip", "Identity"}


class _G:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.n = 0

    def arr(self, name: str) -> np.ndarray | None:
        i = self.inits.get(name)
        return None if i is None else numpy_helper.to_array(i)

    def add_init(self, value: np.ndarray, hint: str) -> str:
        self.n += 1
        name = f"{hint}_q{self.n}"
        t = numpy_helper.from_array(np.asarray(value), name)
        self.graph.initializer.append(t)
        self.inits[name] = t
        return name

    def fresh(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_q{self.n}"

    def maps(self):
        prod, cons = {}, defaultdict(list)
        for node in self.graph.node:
            for o in node.output:
                prod[o] = node
            for i in node.input:
                cons[i].append(node)
        return prod, cons


def _replace_input(node, old: str, new: str) -> None:
    for k, name in enumerate(node.input):
        if name == old:
            node.input[k] = new


def merge_const_adds(model: onnx.ModelProto) -> None:
    """Add(Add(x, c1), c2) -> Add(x, c1 + c2) when the inner Add has one consumer."""
    g = _G(model)
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
            node.input[0], node.input[1] = inner.input[0], g.add_init(c.astype(np.float32), "bias")
            g.graph.node.remove(inner)
            changed = True
            break


def _layer_parts(g: _G, node, prod):
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


def _chain(node, prod, cons, g: _G):
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
        if u.op_type not in CHAIN_OPS:
            return None
        ops.append(u)
        out = u.output[0]


def integer_kernels(model: onnx.ModelProto) -> dict[str, str]:
    """Rewrite integer QDQ layers as described in the module docstring; returns {node: form}."""
    merge_const_adds(model)
    g = _G(model)
    forms: dict[str, str] = {}
    names = [n.name for n in g.graph.node if n.op_type in ("Conv", "MatMul")]
    for name in names:  # nodes are looked up again after every rewrite (a sort copies them)
        prod, cons = g.maps()
        node = next(n for n in g.graph.node if n.name == name)
        parts = _layer_parts(g, node, prod)
        if parts is None:
            continue
        xdq, xq, wdq = parts
        sx = float(g.arr(xq.input[1]))
        sw = g.arr(wdq.input[1]).astype(np.float32)
        chain = _chain(node, prod, cons, g)
        bias_ok = chain is not None and (chain[0] is None or _per_channel(g.arr(chain[0].input[1]), node.op_type, sw.size))
        if chain is not None and bias_ok:
            _chained(g, node, chain, sx, sw)
            forms[node.name] = "QLinear" + ("Conv" if node.op_type == "Conv" else "Gemm")
        elif node.op_type == "MatMul":
            _matmul_integer(g, node, xdq, xq, wdq, sx, sw)
            forms[node.name] = "MatMulInteger"
        else:
            _float_conv(g, node, xdq, xq, wdq, prod, cons)
            forms[node.name] = "float"
    _drop_unused(g)
    onnx.checker.check_model(model)
    return forms


def _per_channel(b: np.ndarray, op: str, c: int) -> bool:
    if op == "Conv":
        return b.size == c and (b.ndim == 1 or b.shape == (1, c, 1, 1))
    return b.size == c and b.shape[-1] == c


def _chained(g: _G, node, chain, sx: float, sw: np.ndarray) -> None:
    bias, ops, q_next = chain
    if bias is not None:
        b = g.arr(bias.input[1]).reshape(-1).astype(np.float64)
        sb = (np.float32(sx) * sw).astype(np.float32)
        bq = np.clip(np.round(b / sb), -2**31, 2**31 - 1).astype(np.int32)
        bdq = g.fresh("bias_dq")
        g.graph.node.append(helper.make_node(
            "DequantizeLinear", [g.add_init(bq, "bias_q"), g.add_init(sb, "bias_scale"),
                                 g.add_init(np.zeros(bq.size, np.int32), "bias_zp")], [bdq], axis=0, name=bdq))
        if node.op_type == "MatMul":
            node.op_type = "Gemm"
        node.input.append(bdq)
        _replace_input_all(g, bias.output[0], node.output[0])
        g.graph.node.remove(bias)
    after = ops[0] if ops and ops[0].op_type == "Relu" else node  # after the Relu: fused by onnxruntime
    src = after.output[0]
    qn, dqn = g.fresh("requant"), g.fresh("requant_dq")
    users = [n for n in g.graph.node if src in n.input]
    g.graph.node.append(helper.make_node("QuantizeLinear", [src, q_next.input[1], q_next.input[2]], [qn], name=qn))
    g.graph.node.append(helper.make_node("DequantizeLinear", [qn, q_next.input[1], q_next.input[2]], [dqn], name=dqn))
    for u in users:
        _replace_input(u, src, dqn)
    _toposort(g.graph)


def _replace_input_all(g: _G, old: str, new: str) -> None:
    for n in g.graph.node:
        _replace_input(n, old, new)
    for o in g.graph.output:
        if o.name == old:
            o.name = new


def _matmul_integer(g: _G, node, xdq, xq, wdq, sx: float, sw: np.ndarray) -> None:
    acc, accf = g.fresh("acc"), g.fresh("acc_f")
    scale = g.add_init((np.float32(sx) * sw).astype(np.float32), "mm_scale")
    new = [helper.make_node("MatMulInteger", [xq.output[0], wdq.input[0], xq.input[2], wdq.input[2]], [acc], name=acc),
           helper.make_node("Cast", [acc], [accf], to=TensorProto.FLOAT, name=accf)]
    node.op_type = "Mul"
    del node.input[:]
    node.input.extend([accf, scale])
    g.graph.node.extend(new)
    _drop_unused(g)
    _toposort(g.graph)


def _float_conv(g: _G, node, xdq, xq, wdq, prod, cons) -> None:
    """Dequantized float kernel; the activation rounding as float ops (exactly as Flax)."""
    shape = (-1, *([1] * (g.arr(wdq.input[0]).ndim - 1)))
    q = g.arr(wdq.input[0]).astype(np.float32) - g.arr(wdq.input[2]).astype(np.float32).reshape(shape)
    s = g.arr(wdq.input[1]).astype(np.float32).reshape(shape)
    node.input[1] = g.add_init((q * s).astype(np.float32), "w")
    sx, zx = g.arr(xq.input[1]), g.arr(xq.input[2])
    sc, zc = g.add_init(np.float32(sx), "sx"), g.add_init(np.float32(zx), "zx")
    n = [g.fresh(k) for k in ("div", "round", "addz", "clip", "subz", "mul")]
    lo, hi = g.add_init(np.float32(0), "lo"), g.add_init(np.float32(255), "hi")
    g.graph.node.extend([
        helper.make_node("Div", [xq.input[0], sc], [n[0]], name=n[0]),
        helper.make_node("Round", [n[0]], [n[1]], name=n[1]),
        helper.make_node("Add", [n[1], zc], [n[2]], name=n[2]),
        helper.make_node("Clip", [n[2], lo, hi], [n[3]], name=n[3]),
        helper.make_node("Sub", [n[3], zc], [n[4]], name=n[4]),
        helper.make_node("Mul", [n[4], sc], [n[5]], name=n[5])])
    node.input[0] = n[5]
    _drop_unused(g)
    _toposort(g.graph)


def _drop_unused(g: _G) -> None:
    """Remove nodes and initializers nothing reads any more."""
    outputs = {o.name for o in g.graph.output}
    while True:
        used = {i for n in g.graph.node for i in n.input} | outputs
        dead = [n for n in g.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.graph.node.remove(n)
    used = {i for n in g.graph.node for i in n.input}
    for init in [i for i in g.graph.initializer if i.name not in used]:
        g.graph.initializer.remove(init)
        g.inits.pop(init.name, None)


def _toposort(graph) -> None:
    """Order nodes so that every input is produced before it is read."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes, out = list(graph.node), []
    while nodes:
        rest = []
        for n in nodes:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(nodes):
            raise RuntimeError(f"graph has a cycle or a missing input near {rest[0].name}")
        nodes = rest
    del graph.node[:]
    graph.node.extend(out)
