"""What onnxruntime runs around the kernels, read off the traced layer records: which integer
layer re-quantizes for which (QLinear chains), which layer reads which output, and the
unfused ops (poolings, flattens, residual adds, layout reorders, a max pooling moved onto
uint8) charged on each layer's output.

search.cost.kernels predicts each kernel's latency from its shape; this module says which
kernels and ops a plan's export runs between them, as onnxruntime's optimized graphs show them
(its NchwcTransformer and QDQ propagation). Everything here is [L] or [L, L] per model, or
[K, L] arrays per plan, so pricing K plans stays a few numpy operations.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from search.cost.kernels import FLOAT_OUT, FORMS, INT_IN, QLINEAR


def chained_to(layers: Sequence) -> np.ndarray:
    """[L] index of the layer an integer layer re-quantizes for (QLinear chain), -1 when none.

    Layer i chains into the first later layer that reads its group's channels, when that layer
    reads only them, i's output is not in a
    residual add (its channel group has no other non-depthwise member: a depthwise layer joins its
    producer's group without an add), and no global pooling lies between (a Dense reading a conv's
    channels once, not flattened, sees them averaged: ReduceMean is not a chain op). Between them
    the export allows only ReLU, ReLU6, max pooling, flatten and transposes (onnx.qdq). A layer
    called more than once (shared weights) does not chain; layers grouped only because one shared
    layer reads them all are not in an add."""
    n = len(layers)
    out = np.full(n, -1, np.int64)
    calls = [l.macs // max(1, int(np.prod(l.out_shape[:-1], dtype=np.int64)) * int(np.prod(l.kernel_shape, dtype=np.int64)))
             for l in layers]  # a layer called twice (shared weights): its outputs are combined
    for i, layer in enumerate(layers):
        g = layer.group
        nxt = next((l for l in layers[i + 1:] if any(src == g for src, _ in l.reads)), None)  # the first reader after it
        if nxt is None or calls[i] > 1:
            continue
        members = [l for l in layers if l.group == g and l.kind != "depthwise"]
        readers = [l for l in layers if any(src == g for src, _ in l.reads)]
        if len(members) > 1 and all(calls[r.index] > 1 for r in readers):
            members = [layer]  # coupled by one shared layer reading them all, not by an add
        pooled = nxt.kind == "dense" and len(layer.out_shape) > 1 and int(np.prod(layer.out_shape[:-1])) > 1 and nxt.in_repeat == 1
        if all(src == g for src, _ in nxt.reads) and len(members) <= 1 and not pooled:
            out[i] = nxt.index
    return out


def direct_readers(layers: Sequence) -> np.ndarray:
    """[L, L] bool: layer r reads layer i's output (through any ops but another layer): r reads
    i's channel group and i is the group's latest member before r (a depthwise conv joins its
    producer's group, so the conv after it reads the depthwise conv's output, not the producer's)."""
    n = len(layers)
    out = np.zeros((n, n), bool)
    for r in layers:
        for g in {src for src, _ in r.reads}:
            i = max((m.index for m in layers if m.group == g and m.index < r.index), default=-1)
            if i >= 0:
                out[i, r.index] = True
    return out


def reorder_count(direct: np.ndarray, out_nchwc: np.ndarray, in_nchw: np.ndarray, in_nchwc: np.ndarray,
                  skip: np.ndarray) -> np.ndarray:
    """[K, L] layout reorders onnxruntime runs on each layer's output (each one `eltwise` op):
    ReorderOutput (NCHWc -> NCHW) after a layer whose output is NCHWc (out_nchwc [K, L]: a float
    conv on the blocked kernels) when a layer reading it directly (direct [L, L], direct_readers)
    takes NCHW (in_nchw [K, L]: a plain float conv, a blocked one with fewer input channels than
    the block, an integer kernel behind its QuantizeLinear); ReorderInput (NCHW -> NCHWc) after
    one whose output is NCHW when a reader takes NCHWc (in_nchwc [K, L]: a blocked conv with at
    least a block of input channels, a blocked depthwise conv). Layers with `skip` [L] (a pooling
    or flatten after them, whose reorders eltwise_count charges) get none. Read off onnxruntime's
    optimized graphs on an AVX-512 host: resnet20 with 75% of its channels pruned (4 and 8
    channels) runs a ReorderOutput after each of its first 14 convs, MobileNetV2 with 75% pruned
    one after each project conv of fewer than 16 channels; 1.2-1.6x their predicted time before
    these were priced."""
    d = np.asarray(direct, np.float64)
    to_nchw = (np.asarray(in_nchw, np.float64) @ d.T) > 0  # [K, L]: some direct reader takes NCHW
    to_nchwc = (np.asarray(in_nchwc, np.float64) @ d.T) > 0
    out_c = np.asarray(out_nchwc, bool)
    return np.where(np.asarray(skip, bool), 0.0, np.where(out_c, to_nchw, to_nchwc).astype(np.float64))


def unfused_ops(layers: Sequence) -> np.ndarray:
    """[L, 3] what lies between each layer's output and the layers that read it, from the traced
    layer records: (pooling: a conv reader sees a smaller spatial map, or a Dense reader fewer
    positions than the map has (max pooling, global average pooling); flatten: a Dense reads
    several positions of a spatial map; residual add: the layer's group has another
    non-depthwise member), each 0 or 1. A Dense output and a layer nothing reads (the model's
    output) have no pooling or flatten. A reader reads the output of its group's latest member
    before it (a depthwise conv shares its producer's group): MobileNetV2's 1x1 project conv
    reads the stride-2 depthwise conv's map, not the expand conv's, and charging the expand a
    pooling for it priced 3 reorders and a pooling of a 28x28x96 map that onnxruntime never runs."""
    out = np.zeros((len(layers), 3))
    direct = direct_readers(layers)
    for i, layer in enumerate(layers):
        g = layer.group
        readers = [l for l in layers if direct[i, l.index]]
        if len(layer.out_shape) == 3:
            area = int(np.prod(layer.out_shape[:2]))
            out[i, 0] = any(r.in_repeat < area if r.kind == "dense" else tuple(r.in_shape[:2]) != tuple(layer.out_shape[:2])
                            for r in readers)
            out[i, 1] = any(r.kind == "dense" and r.in_repeat > 1 for r in readers)
        out[i, 2] = sum(l.group == g and l.kind != "depthwise" for l in layers) > 1
    return out


def max_pool_reader(layers: Sequence) -> np.ndarray:
    """[L] index of a layer that reads layer i's channel group through a max pooling (the traced
    Layer.max_pooled), -1 when none: where onnxruntime may run that pooling on uint8 (u8_pooled)."""
    out = np.full(len(layers), -1, np.int64)
    for i, layer in enumerate(layers):
        r = next((l for l in layers if l.index != i and l.max_pooled and any(src == layer.group for src, _ in l.reads)), None)
        if r is not None:
            out[i] = r.index
    return out


def u8_pooled(reader: np.ndarray, form: np.ndarray) -> np.ndarray:
    """[K, L] bool: layer i's output is max-pooled on uint8 (the `pool_u8` kernel): its form gives
    a float output (f32, f32p, f32n, i8) and the layer reading it through the max pooling (reader
    [L], max_pool_reader) quantizes its input (q8, i8, q8u, q8p), so onnxruntime moves that
    QuantizeLinear ahead of the MaxPool."""
    reader = np.asarray(reader)
    form = np.asarray(form)
    rf = form[..., np.maximum(reader, 0)]
    return (reader >= 0) & np.isin(form, FLOAT_OUT) & np.isin(rf, INT_IN)


def eltwise_count(unfused: np.ndarray, form: np.ndarray, out_nchwc: np.ndarray, reader_other: np.ndarray) -> np.ndarray:
    """[K, L] unfused ops charged on each layer's output (the `eltwise` kernel), from
    unfused_ops [L, 3], the layers' forms [K, L] (index into FORMS; a factorized conv's B), whether
    each writes onnxruntime's blocked NCHWc layout (out_nchwc [K, L]: a float conv on the blocked
    kernels) and whether a layer reading it takes a layout other than NCHW (reader_other [K, L]:
    a blocked float conv reading NCHWc, a QLinear conv reading NHWC).

    A pooling and a flatten are one op each. A blocked output is reordered to NCHW before either
    (ReorderOutput), and a pooled map is reordered again into its reader's layout (ReorderInput to
    NCHWc, Transpose to NHWC) unless the layer wrote NHWC itself (a QLinear chain pools in NHWC).
    A residual add is an op only after an i8 kernel (float output; a float conv fuses the add as its
    Sum input, a QLinear chain does not reach one). Read off onnxruntime's optimized graphs on an
    AVX-512 host: lenet5 runs ReorderOutput, MaxPool, ReorderInput after a blocked float conv1 read
    by a float conv2; ReorderOutput, QuantizeLinear, MaxPool (uint8), Transpose when conv2 is
    QLinear; ReorderOutput, QuantizeLinear, MaxPool (uint8) when it is ConvInteger (i8, NCHW), where
    three ops were charged. fp32 resnet20 and MobileNetV2 run 3 ops besides their convs and head
    (the input's Transpose, one ReorderOutput, the global pooling's ReduceSum)."""
    pool, flat, add = (np.asarray(unfused, np.float64)[:, j] for j in range(3))
    form = np.asarray(form)
    nhwc = np.isin(form, QLINEAR)
    into = pool * (np.asarray(reader_other, bool) & ~nhwc)
    return np.where(np.asarray(out_nchwc, bool), 2 * pool + 2 * flat, pool + flat) + into \
        + np.where(form == FORMS.index("i8"), add, 0.0)


__all__ = ["chained_to", "direct_readers", "eltwise_count", "max_pool_reader", "reorder_count", "u8_pooled", "unfused_ops"]
