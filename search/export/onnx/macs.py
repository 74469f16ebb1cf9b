"""Multiply-accumulates of an exported ONNX model, read from its graph: what the cost model's
MACs are checked against (tests, bench/bench_lowrank.py).

Shapes come from onnx's shape inference (`onnx.shape_inference.infer_shapes`), batch 1 (a
symbolic dimension counts 1). A Conv / ConvInteger node does output elements x its weight's
elements per output channel (cin / groups x kh x kw); a MatMul / MatMulInteger node output
elements x its inner dimension; a Gemm output elements x its inner dimension. Other nodes do no
MACs here (elementwise ops, pooling and reshapes are not multiply-accumulates of weights).
"""
from __future__ import annotations

import math

import onnx


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """{node name: MACs for one example} of every Conv, ConvInteger, MatMul, MatMulInteger and
    Gemm node. ValueError when shape inference leaves a node's shapes unknown."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    shapes = {v.name: tuple(d.dim_value or 1 for d in v.type.tensor_type.shape.dim)
              for v in [*g.value_info, *g.output, *g.input]}
    shapes.update({i.name: tuple(i.dims) for i in g.initializer})
    out = {}
    for node in g.node:
        if node.op_type not in ("Conv", "ConvInteger", "MatMul", "MatMulInteger", "Gemm"):
            continue
        try:
            y = shapes[node.output[0]]
            if node.op_type.startswith("Conv"):
                inner = math.prod(shapes[node.input[1]][1:])
            elif node.op_type == "Gemm":
                trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
                inner = shapes[node.input[0]][0 if trans_a else -1]
            else:
                inner = shapes[node.input[0]][-1]
        except KeyError as e:
            raise ValueError(f"ONNX node {node.name} ({node.op_type}): shape of {e.args[0]} unknown after shape inference") from None
        out[node.name] = int(math.prod(y) * inner)
    return out
