"""The value types of the jaxpr -> ONNX converter (convert.py, layers.py) and the graph
builder that it and the QDQ rewrite (qdq.py) share."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
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
    # the runtime's fast kernels want output channel counts that are multiples of `align`: the
    # kept count is rounded up to one (all-zero channels kept), but not past `cap` channels (the
    # count the cost model priced), so an export never runs more channels than it was priced at
    align: int = 1
    cap: int | None = None
    # a factorized layer (search.compression.lowrank): (form, A [m, r], B [r, n]) float32 (form a
    # plan.FORMS code), whose product is the kernel's matrix in that form; written as the pair
    # of layers the form is (search.export.onnx.layers)
    factors: tuple[int, np.ndarray, np.ndarray] | None = None
    factor_q: tuple[np.ndarray, np.ndarray] | None = None  # A's integers [m, r] and [r] scales (A = q * scale)


@dataclass
class Sel:
    """Only some channels of an activation's last axis are materialised; the others hold `fill`."""

    keep: np.ndarray  # sorted indices of the materialised channels of the last logical axis
    fill: np.ndarray  # one example's values (shape without batch) where channels are absent (NaN: dead)
    producer: str  # the layer whose pruning made it


@dataclass
class Act:
    """A tensor of the emitted graph, with its logical (Flax) shape and physical layout."""

    name: str  # ONNX tensor name
    shape: tuple[int, ...]  # logical (Flax) shape, batch first
    nchw: bool = False  # physically NCHW while logically NHWC
    sel: Sel | None = None
    src: str | None = None  # the layer that produced it, through elementwise ops and pooling
    window: tuple[int, int] | None = None  # a lazy (B, H/kh, kh, W/kw, kw, C) split of `name`


@dataclass
class Const:
    """A value known at export time: a jaxpr constant, a param leaf, or computed from them."""

    value: np.ndarray
    tag: str | None = None  # "path/kernel" when this is a param leaf


class Drop(Exception):
    """Retry with these output channels of a layer removed (their only reader ignores them)."""

    def __init__(self, layer: str, channels: np.ndarray):
        super().__init__(f"{layer}: drop {channels.tolist()}")
        self.layer, self.channels = layer, channels


class Keep(Exception):
    """Retry with this layer's channels kept (its removal cannot be expressed)."""

    def __init__(self, layer: str, why: str):
        super().__init__(f"{layer}: {why}")
        self.layer = layer


class GraphBuilder:
    """An ONNX graph being emitted (convert.py) or rewritten (qdq.py), edited in place.

    Wraps `graph` (default: a new, empty one). Fresh tensor names are `{hint}_{tag}{n}` and never
    one the graph already has; a rewrite passes tag="q" so that its additions stand out.
    """

    def __init__(self, graph: onnx.GraphProto | None = None, tag: str = ""):
        self.graph = onnx.GraphProto() if graph is None else graph
        self.tag, self.n = tag, 0
        g = self.graph
        self.inits = {i.name: i for i in g.initializer}  # initializer name -> TensorProto
        self.taken = {*self.inits, *(v.name for v in g.input), *(v.name for v in g.output),
                      *(t for node in g.node for t in (*node.input, *node.output))}  # tensor names
        self.node_names = {node.name for node in g.node}

    def fresh(self, hint: str) -> str:
        """A new tensor name."""
        while True:
            self.n += 1
            name = f"{hint}_{self.tag}{self.n}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        """Add `value` (dtype and shape kept) as an initializer; returns its name."""
        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, *, name: str | None = None, **attrs) -> str:
        """Append a one-output `op` node and return its output, a fresh name from `hint` (default:
        `name`, else op in lower case). The node is called `name` while that is free (a layer's node
        carries the layer name; integer_kernels' forms are keyed by it), else like its output."""
        out = self.fresh(hint or name or op.lower())
        name = name if name and name not in self.node_names else out
        self.node_names.add(name)
        self.graph.node.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def arr(self, name: str) -> np.ndarray | None:
        """The value of initializer `name`; None when `name` is not an initializer."""
        i = self.inits.get(name)
        return None if i is None else numpy_helper.to_array(i)

    def maps(self) -> tuple[dict[str, onnx.NodeProto], defaultdict[str, list[onnx.NodeProto]]]:
        """({tensor: the node producing it}, {tensor: the nodes reading it}) of the graph as it is now."""
        prod, cons = {}, defaultdict(list)
        for node in self.graph.node:
            for o in node.output:
                prod[o] = node
            for i in node.input:
                cons[i].append(node)
        return prod, cons

    def rewire(self, old: str, new: str, nodes: list[onnx.NodeProto] | None = None) -> None:
        """Make `nodes` (default: all nodes, and the graph outputs) read `new` instead of `old`."""
        for node in self.graph.node if nodes is None else nodes:
            for k, i in enumerate(node.input):
                if i == old:
                    node.input[k] = new
        for o in self.graph.output if nodes is None else ():
            if o.name == old:
                o.name = new

    def drop_unused(self) -> None:
        """Remove the nodes whose outputs nothing reads (repeatedly), then the initializers no node reads."""
        g = self.graph
        outputs = {o.name for o in g.output}
        while True:
            used = {i for n in g.node for i in n.input} | outputs
            dead = [n for n in g.node if not any(o in used for o in n.output)]
            if not dead:
                break
            for n in dead:
                g.node.remove(n)
        used = {i for n in g.node for i in n.input}
        for init in [i for i in g.initializer if i.name not in used]:
            g.initializer.remove(init)
            self.inits.pop(init.name, None)

    def toposort(self) -> None:
        """Order the nodes so that every input is produced before it is read. The nodes are
        re-added, so NodeProto references taken before this no longer point into the graph."""
        g = self.graph
        ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
        nodes, out = list(g.node), []
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
        del g.node[:]
        g.node.extend(out)


def fake_quant_np(x: np.ndarray, scale: float, zp: int, bits: int) -> np.ndarray:
    """The activation fake quantization of search.compression.quant in numpy (float32)."""
    s, z = np.float32(scale), np.float32(zp)
    q = np.clip(np.round(np.asarray(x, np.float32) / s) + z, 0, 2.0**bits - 1)
    return ((q - z) * s).astype(np.float32)
