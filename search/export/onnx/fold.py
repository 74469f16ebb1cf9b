"""BN folding in the exported graph: per-output-channel affine ops after a Dense/Conv go into it.

A BatchNorm in eval mode (Linen `use_running_average=True`, its statistics jaxpr constants)
reaches the ONNX graph as elementwise Sub/Mul/Add with per-channel constants after the layer's
MatMul/Conv; so does any per-channel affine (a bias, a scale). Those ops, read by nothing
else, become part of the layer (Jacob et al., CVPR 2018, section 3.2; what TFLite, AIMET and NNCF do):

    y = conv(x, W) * s + t   ->   y = conv(x, W * s) + t      (s, t per output channel; t may be a map)

so the layer is one Conv/MatMul and one bias Add, which qdq.py can turn into integer kernels.
An integer kernel (DequantizeLinear(q, scale, zp), symmetric per output channel) keeps its
integers: scale' = scale * |s| and q' = -q where s < 0. Per-channel symmetric quantization is
invariant to a per-channel scaling, so the kernel runs exactly the weights the model was
fine-tuned with (fake-quantized, then scaled by the BN). A channel with s == 0 is the constant
t: its kernel column is set to 0 (scale kept, so no zero scale reaches a runtime) and it stays,
so the export holds exactly the channels the cost model and the size breakdown count.
The fold runs on the graph convert.py emitted, where consumers are known, before qdq.py.
"""
from __future__ import annotations

import numpy as np
import onnx

from search.export.onnx.graph import GraphBuilder

# not Div: the float emulation of a layer's input quantization (layers.py) starts with a Div by
# the scale, and folding it into the producer would move values across Round's boundaries
AFFINE_OPS = ("Add", "Sub", "Mul")


def fold_affine(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Fold every Conv/MatMul's following per-channel affine chain into it (in place).

    Returns {layer node name: output channels (of the emitted kernel) whose folded scale is 0}.
    """
    g = GraphBuilder(model.graph, tag="f")
    zero: dict[str, np.ndarray] = {}
    for name in [n.name for n in g.graph.node if n.op_type in ("Conv", "MatMul")]:
        prod, cons = g.maps()
        node = next(n for n in g.graph.node if n.name == name)
        weight = _weight_of(g, node, prod)
        if weight is None:
            continue
        rank = 4 if node.op_type == "Conv" else 2
        chain, s, t = _affine_chain(g, node, cons, rank, weight[0].shape[0 if node.op_type == "Conv" else -1])
        if not chain or (np.any(s != 1) and not _fold_weight(g, node, weight, s)):
            continue
        out = node.output[0]
        t = _compact(t, node.op_type)
        if np.any(t != 0):
            last = chain[-1]  # reused as the bias Add: keeps the chain's output name
            last.op_type, last.input[:] = "Add", [out, g.const(t.astype(np.float32), "bias")]
            del last.attribute[:]
        else:
            g.rewire(chain[-1].output[0], out)
        g.drop_unused()
        if np.any(s == 0):
            zero[name] = np.flatnonzero(s == 0)
    return zero


def _weight_of(g: GraphBuilder, node, prod):
    """(kernel array, its DequantizeLinear node or None) of a layer node, else None."""
    if len(node.input) != 2:
        return None
    w = g.arr(node.input[1])
    if w is not None:
        return (w, None) if w.dtype == np.float32 else None
    dq = prod.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or g.arr(dq.input[0]) is None or len(dq.input) < 3:
        return None
    return g.arr(dq.input[0]), dq


def _affine_chain(g: GraphBuilder, node, cons, rank: int, c: int):
    """The single-reader chain of Add/Sub/Mul with constants after `node`, and its
    composed (s [c], t broadcastable to [1, c, ...]) in float64."""
    shape = (1, c) + (1,) * (rank - 2)
    s, t = np.ones(c), np.zeros(shape)
    chain, out = [], node.output[0]
    while len(cons[out]) == 1 and cons[out][0].op_type in AFFINE_OPS:
        op = cons[out][0]
        first = op.input[0] == out
        k = g.arr(op.input[1 if first else 0])
        if k is None or op.input[0] == op.input[1] or k.ndim > rank:
            break
        k = k.astype(np.float64).reshape((1,) * (rank - k.ndim) + k.shape)
        if k.shape[0] != 1 or any(a not in (1, b) for a, b in zip(k.shape[1:], (c,))):
            break
        per_channel = all(d == 1 for i, d in enumerate(k.shape) if i != 1)
        kc = np.broadcast_to(k, shape).reshape(c) if per_channel else None
        if op.op_type == "Add":
            t = t + k
        elif op.op_type == "Sub":
            s, t = (s, t - k) if first else (-s, k - t)
        elif op.op_type == "Mul" and per_channel:
            s, t = s * kc, t * kc.reshape(shape)
        else:
            break
        chain.append(op)
        out = op.output[0]
    return chain, s, t


def _fold_weight(g: GraphBuilder, node, weight, s: np.ndarray) -> bool:
    """Scale the kernel's output channels by s (axis 0 of a Conv kernel, the last of a MatMul's)."""
    w, dq = weight
    axis = 0 if node.op_type == "Conv" else w.ndim - 1
    bshape = [1] * w.ndim
    bshape[axis] = -1
    if dq is None:
        node.input[1] = g.const((w * s.reshape(bshape)).astype(np.float32), "w")
        return True
    scale, zp = g.arr(dq.input[1]).astype(np.float64), g.arr(dq.input[2])
    if scale.shape != s.shape and scale.size != 1:
        return False
    sign = np.sign(s).astype(np.int64)
    v = (w.astype(np.int64) - zp.astype(np.int64).reshape(bshape if zp.size > 1 else ())) * sign.reshape(bshape)
    q = v + zp.astype(np.int64).reshape(bshape if zp.size > 1 else ())
    info = np.iinfo(w.dtype)
    if q.min(initial=0) < info.min or q.max(initial=0) > info.max:
        return False
    new_scale = np.broadcast_to(scale, s.shape) * np.where(s == 0, 1.0, np.abs(s))
    dq.input[0] = g.const(q.astype(w.dtype), "wq")
    dq.input[1] = g.const(new_scale.astype(np.float32), "w_scale")
    if zp.size == 1 and s.size > 1:
        dq.input[2] = g.const(np.full(s.shape, zp.reshape(()), zp.dtype), "w_zp")
    if not any(a.name == "axis" for a in dq.attribute):
        dq.attribute.append(onnx.helper.make_attribute("axis", axis))
    return True


def _compact(t: np.ndarray, op: str) -> np.ndarray:
    """The bias in the shape qdq.py reads as per-channel: [c] for MatMul, [1, c, 1, 1] for a
    Conv whose bias is the same at every position, else the [1, c, H, W] map."""
    if op == "MatMul":
        return t.reshape(-1) if t.shape[0] == 1 and t.ndim == 2 else t
    if t.shape[2:] != (1, 1) and np.all(t == t[:, :, :1, :1]):
        t = t[:, :, :1, :1]
    return t


def clip_activations(model: onnx.ModelProto) -> int:
    """Rewrite every Relu -> Min(x, c) (ReLU6 as jax writes it: min(max(x, 0), 6), the Max
    already a Relu) into one Clip(x, 0, c), in place; returns how many.

    onnxruntime fuses Relu and Clip into the Conv before them (and into its NCHWc kernels), but
    not Min: a Min left behind costs the Min and, in the NCHWc layout, a ReorderOutput before and
    a ReorderInput after it. MobileNetV2 at 28x28, fp32, one thread on an AVX-512 host: 176 us
    with Relu -> Min, 119 us with Clip. Runs after qdq.integer_kernels, so integer layers (whose
    Relu feeds the next layer's QuantizeLinear) keep their shape; the values are identical."""
    g = GraphBuilder(model.graph, tag="c")
    prod, cons = g.maps()
    outputs = {o.name for o in g.graph.output}
    done = 0
    for node in list(g.graph.node):
        if node.op_type != "Min" or len(node.input) != 2:
            continue
        hi, relu = g.arr(node.input[1]), prod.get(node.input[0])
        if hi is None or hi.size != 1 or relu is None or relu.op_type != "Relu" or len(cons[relu.output[0]]) != 1 \
                or relu.output[0] in outputs or float(hi.reshape(())) < 0:
            continue
        node.op_type = "Clip"
        node.input[:] = [relu.input[0], g.const(np.float32(0.0), "clip_lo"), g.const(hi.astype(np.float32).reshape(()), "clip_hi")]
        done += 1
    if done:
        g.drop_unused()
    return done
