"""The value types of the jaxpr -> ONNX converter (search.onnx_export) and its graph builder."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import helper, numpy_helper

OPSET = 21
NHWC_TO_NCHW = (0, 3, 1, 2)
NCHW_TO_NHWC = (0, 2, 3, 1)


@dataclass(frozen=True)
class LayerExport:
    """How one Dense/Conv layer is written; kernels are the effective (compressed) ones."""

    name: str  # layer name, e.g. "conv1"
    weight: str = "float"  # "float" | "int" (q int8 + scale) | "codebook" (index + codebook)
    q: np.ndarray | None = None  # int kernel like the Flax kernel ("int")
    scale: np.ndarray | None = None  # [out] float32 per-channel scales ("int")
    act: tuple[float, float, int] | None = None  # input quantization (scale, zero point, bits)
    prune: bool = True  # remove all-zero output channels
    drop: tuple[int, ...] = ()  # output channels nobody reads (a depthwise consumer's zero filters)


@dataclass
class _Sel:
    keep: np.ndarray  # sorted indices of the materialised channels of the last logical axis
    fill: np.ndarray  # one example's values (shape without batch) where channels are absent (NaN: dead)
    producer: str  # the layer whose pruning made it


@dataclass
class _Act:
    name: str  # ONNX tensor name
    shape: tuple[int, ...]  # logical (Flax) shape, batch first
    nchw: bool = False  # physically NCHW while logically NHWC
    sel: _Sel | None = None
    src: str | None = None  # the layer that produced it, through elementwise ops and pooling
    window: tuple[int, int] | None = None  # a lazy (B, H/kh, kh, W/kw, kw, C) split of `name`


@dataclass
class _Const:
    value: np.ndarray
    tag: str | None = None  # "path/kernel" when this is a param leaf


class _Drop(Exception):
    """Retry with these output channels of a layer removed (their only reader ignores them)."""

    def __init__(self, layer: str, channels: np.ndarray):
        super().__init__(f"{layer}: drop {channels.tolist()}")
        self.layer, self.channels = layer, channels


class _Keep(Exception):
    """Retry with this layer's channels kept (its removal cannot be expressed)."""

    def __init__(self, layer: str, why: str):
        super().__init__(f"{layer}: {why}")
        self.layer = layer


@dataclass
class _Graph:
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    names: set = field(default_factory=set)
    n: int = 0

    def fresh(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.fresh(hint or op.lower())
        name = hint if hint and hint not in self.names else out  # layer nodes are named as the layer
        self.names.add(name)
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out


def fake_quant_np(x: np.ndarray, scale: float, zp: int, bits: int) -> np.ndarray:
    """The activation fake quantization of search.quant in numpy (float32)."""
    s, z = np.float32(scale), np.float32(zp)
    q = np.clip(np.round(np.asarray(x, np.float32) / s) + z, 0, 2.0**bits - 1)
    return ((q - z) * s).astype(np.float32)
