"""Channel dependency groups, traced from the model's jaxpr (DepGraph, Fang et al., CVPR 2023).

The output channels of a Dense/Conv are followed through the program to every consumer: bias
adds, BatchNorm, activations, pooling, reshape/flatten, residual adds, concatenation (with
offsets), split, depthwise convs (whose channels are their producer's) and grouped convs.
What it gives per layer (`Coupling`):

- `leader`: the layer whose pruning decision removes this layer's output channels. Layers whose
  channels meet in an elementwise op (a residual add, a gating multiply) or pass through a
  depthwise conv form one group: one decision, the same channels removed in every member;
  the leader is the group's first layer in forward order (not a depthwise one when possible).
- `fixed`: why a group's channels cannot be removed at all (None when they can): they are the
  model's output, they meet the model input or a constant in an add, or an op the tracer does
  not know reads them. Such channels are kept, and config.json and the report say why.
- `reads` and `in_repeat`: the layer's fan-in channels at one position, as segments
  (leader of the producing group or -1 for a tensor that is not a layer's, channel count), in
  order, repeated `in_repeat` times (a Dense after a flatten reads H*W copies of the segments).
  Pruning a group removes the matching fan-in rows of every reader: the cost model, the size
  breakdown and the export all count exactly these.
- `max_pooled`: the layer's input passed a max pooling (lax.reduce_window_max, or reduce_max
  over windows) since the layer that produced it, through nothing but single-input ops
  (activations, reshapes, transposes, pads). The cost model needs it: onnxruntime moves a
  quantization ahead of a max pooling, never ahead of an average one (search.cost.kernels).
- `clipped`: the layer's output is bounded above and below, through nothing but elementwise ops
  with constants (bias, BatchNorm): a max with a constant, then a min with one (ReLU6, as
  jax.nn.relu6 writes it), or one clamp. The export writes it as one Clip, which onnxruntime
  fuses into a blocked float conv but runs as a pass of its own over the output (its NCHWc
  kernels fuse only ReLU); the cost model charges it (search.cost.kernels, the `clip` kernel).

Pure tracing (jax.make_jaxpr): no FLOPs are run and no parameters change.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.extend.core as jex_core

Segs = tuple[tuple[int, int], ...]  # (source layer or -1, channel count) along the last axis

# elementwise primitives: any number of operands of broadcastable shapes, one output
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem", "nextafter", "select_n", "clamp",
    "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "abs", "sqrt", "rsqrt", "cbrt",
    "integer_pow", "square", "erf", "erfc", "erf_inv", "sign", "floor", "ceil", "round", "sin", "cos",
    "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "convert_element_type", "copy",
    "copy_p", "stop_gradient", "reduce_precision", "is_finite", "not", "and", "or", "xor", "eq", "ne", "lt",
    "le", "gt", "ge", "add_any", "optimization_barrier",
}
# reductions and windows that keep the last (channel) axis unless it is reduced
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin",
           "cumsum", "cummax", "cummin", "cumprod", "cumlogsumexp"}
_WINDOW = {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_MAX_POOL = {"reduce_window_max", "reduce_max"}  # reduce_max over the channel axis is opaque (no _Act kept)


@dataclass(frozen=True)
class Coupling:
    """Per layer (forward order): its group's leader, why its channels are fixed, what it reads."""

    leader: tuple[int, ...]  # [L] layer index of the group's leader (itself when alone)
    fixed: tuple[str | None, ...]  # [L] why the group's channels cannot be removed, None if they can
    reads: tuple[Segs, ...]  # [L] fan-in channel segments at one position
    in_repeat: tuple[int, ...]  # [L] how many times `reads` repeats along the fan-in (flatten)
    depthwise: tuple[bool, ...]  # [L] channels follow the input (depthwise conv)
    max_pooled: tuple[bool, ...] = ()  # [L] the input passed a max pooling since its producing layer
    clipped: tuple[bool, ...] = ()  # [L] the output is bounded (ReLU6) right after the layer


@dataclass
class _Act:
    segs: Segs | None  # None: channel structure unknown
    max_pooled: bool = False  # passed a max pooling since the layer that produced it
    origin: int = -1  # the layer whose output this is, through elementwise ops with constants only
    floored: bool = False  # ... and it passed a max with a constant (a ReLU) since


@dataclass
class _Kernel:
    layer: int


def plain_convs(next_fun, args, kwargs, context):
    """Linen interceptor: nn.Conv layers built with a custom `conv_general_dilated` (e.g. the
    shifted-view depthwise convs of models.conv that train fast on CPU) are traced as the lax
    convolution they stand for, so tracers and the ONNX export see one conv primitive."""
    m = context.module
    custom = getattr(m, "conv_general_dilated", None)
    if not (isinstance(m, nn.Conv) and context.method_name == "__call__"
            and custom not in (None, jax.lax.conv_general_dilated)):
        return next_fun(*args, **kwargs)
    x = args[0]
    p = m.variables["params"]
    k = len(m.kernel_size)
    strides = (m.strides,) * k if isinstance(m.strides, int) else tuple(m.strides or (1,) * k)
    dil = (m.kernel_dilation,) * k if isinstance(m.kernel_dilation, int) else tuple(m.kernel_dilation or (1,) * k)
    pad = m.padding if isinstance(m.padding, str) else [tuple(q) if not isinstance(q, int) else (q, q) for q in m.padding]
    dn = jax.lax.conv_dimension_numbers(x.shape, p["kernel"].shape, ("NHWC", "HWIO", "NHWC"))
    y = jax.lax.conv_general_dilated(x, p["kernel"], strides, pad, rhs_dilation=dil, dimension_numbers=dn,
                                     feature_group_count=m.feature_group_count)
    if "bias" in p:
        y = y + p["bias"].reshape((1,) * (y.ndim - 1) + (-1,))
    return y


def trace_coupling(apply: Callable[[Any, Any], Any], params: Any, sample_input: Any,
                   kernel_paths: Sequence[tuple]) -> Coupling:
    """Trace `apply(params, x)` and group the channels of the layers whose kernels sit at
    `kernel_paths` (each a params path ending at the layer, "kernel" appended here).

    Raises nothing for unknown ops: the channels they read are fixed, with the reason.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    keys = [tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in flat]
    index = {tuple(str(p) for p in path) + ("kernel",): i for i, path in enumerate(kernel_paths)}
    with nn.intercept_methods(plain_convs):
        closed = jax.make_jaxpr(apply)(params, sample_input)
    t = _Tracer(len(kernel_paths))
    jaxpr = closed.jaxpr
    *pvars, xvar = jaxpr.invars
    env: dict[Any, Any] = {}
    for v, k in zip(pvars, keys):
        if k in index:
            env[v] = _Kernel(index[k])
    env[xvar] = _Act(((-1, int(xvar.aval.shape[-1])),) if xvar.aval.shape else None)
    for out in t.run(jaxpr, env):
        if isinstance(out, _Act):
            t.fix_segs(out.segs, "the model's output")
    return t.result()


class _Tracer:
    def __init__(self, n: int):
        self.n = n
        self.parent = list(range(n))
        self.reason: dict[int, str] = {}  # layer -> why its channels are fixed (merged at the end)
        self.reads: list[Segs | None] = [None] * n
        self.depthwise = [False] * n
        self.seen = [False] * n
        self.channels = [0] * n  # output channels of each layer
        self.max_pooled = [False] * n  # a layer's input passed a max pooling
        self.clipped = [False] * n  # a layer's output is bounded below and above (ReLU6)

    # ---- union-find ------------------------------------------------------------------------
    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def fix(self, layer: int, why: str) -> None:
        self.reason.setdefault(layer, why)

    def fix_segs(self, segs: Segs | None, why: str) -> None:
        for src, _ in segs or ():
            if src >= 0:
                self.fix(src, why)

    def join(self, a: Segs, b: Segs, why: str) -> Segs:
        """Two tensors whose channels meet elementwise: their sources are one group."""
        if [c for _, c in a] != [c for _, c in b]:
            if sum(c for _, c in a) != sum(c for _, c in b):
                raise ValueError("channel counts differ")
            self.fix_segs(a, why)
            self.fix_segs(b, why)
            return a
        for (sa, c), (sb, _) in zip(a, b):
            if sa >= 0 and sb >= 0 and c == self.channels[sa] == self.channels[sb]:
                self.union(sa, sb)
            elif sa >= 0 and sb >= 0:  # parts of groups (after a split) meet: keep both whole
                self.fix(sa, why)
                self.fix(sb, why)
            elif sa >= 0 or sb >= 0:
                self.fix(max(sa, sb), why)
        return a

    # ---- the interpreter ------------------------------------------------------------------
    def run(self, jaxpr, env) -> list:
        read = lambda a: None if isinstance(a, jex_core.Literal) else env.get(a)
        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            sub = next((eqn.params[k] for k in _CALLS if k in eqn.params), None)
            if sub is not None and any(isinstance(i, (_Act, _Kernel)) for i in ins):
                inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
                senv = {v: i for v, i in zip(inner.invars, ins) if i is not None}
                outs = self.run(inner, senv)
            else:
                outs = self.eqn(eqn, ins)
            for v, o in zip(eqn.outvars, outs):
                if o is not None:
                    env[v] = o
        return [read(a) for a in jaxpr.outvars]

    def eqn(self, eqn, ins) -> list:
        name = eqn.primitive.name
        outs = eqn.outvars
        acts = [i for i in ins if isinstance(i, _Act)]
        if not acts:  # parameters and constants; a kernel keeps its tag through casts and reshapes
            k = next((i for i in ins if isinstance(i, _Kernel)), None)
            keep = name in ("convert_element_type", "copy", "reshape", "transpose", "squeeze", "expand_dims")
            return [k if (k is not None and keep) else None for _ in outs]
        if name in ("dot_general", "conv_general_dilated") and isinstance(ins[1], _Kernel) and isinstance(ins[0], _Act):
            return [self.layer(eqn, ins[0], ins[1].layer)]
        shapes = [tuple(v.aval.shape) for v in eqn.invars]
        out_shape = tuple(outs[0].aval.shape)
        try:
            outs = self.op(name, eqn, ins, shapes, out_shape)
        except ValueError:
            pass
        else:  # a max pooling marks its output; single-input ops pass the mark on
            pooled = name in _MAX_POOL or (len(acts) == 1 and acts[0].max_pooled)
            origin, floored = self.bound(name, acts)
            return [dataclasses.replace(o, max_pooled=pooled, origin=origin, floored=floored) if isinstance(o, _Act) else o
                    for o in outs]
        why = f"op {name!r}, which the channel tracer does not follow"
        for a in acts:
            self.fix_segs(a.segs, why)
        return [_opaque(v) for v in outs]

    def bound(self, name: str, acts: list) -> tuple[int, bool]:
        """(origin, floored) of an elementwise op's output on `acts` (its operands that are
        activations): a layer's output stays its own through ops with constants only; a max with
        a constant floors it, a min with a constant after that (or a clamp) marks the layer clipped."""
        if name not in _ELEMENTWISE or len(acts) != 1 or acts[0].origin < 0:
            return -1, False
        a = acts[0]
        if name == "clamp" or (name == "min" and a.floored):
            self.clipped[a.origin] = True
        return a.origin, name == "max" or (a.floored and name in ("convert_element_type", "copy", "copy_p"))

    def op(self, name, eqn, ins, shapes, out_shape) -> list:
        """The rule of one primitive; ValueError for a case it does not cover."""
        p = eqn.params
        nd = len(out_shape)
        c_out = out_shape[-1] if nd else 1
        acts = [(i, s) for i, s in zip(ins, shapes) if isinstance(i, _Act)]
        if name in _ELEMENTWISE:
            if not nd:
                raise ValueError
            segs = None
            for a, shape in acts:
                if not shape or shape[-1] == 1 and c_out != 1:  # broadcast along channels: no coupling
                    continue
                if a.segs is None or shape[-1] != c_out:
                    raise ValueError
                segs = a.segs if segs is None else self.join(segs, a.segs, f"{name} with a tensor that is not a layer's")
            return [_Act(segs if segs is not None else ((-1, c_out),))]
        if name == "concatenate":
            return [self.concat(p["dimension"], ins, shapes, out_shape)]
        if len(acts) != 1:  # the remaining rules read one activation
            raise ValueError
        (a, shape), = acts
        last = len(shape) - 1
        if name in _REDUCE:
            axes = tuple(p.get("axes", (p.get("axis"),)))
            if last in axes or -1 in axes:
                self.fix_segs(a.segs, f"{name} over the channel axis")
                return [_opaque(v) for v in eqn.outvars]
            return [_Act(a.segs)]
        if name in _WINDOW:
            if p["window_dimensions"][-1] != 1 or p["window_strides"][-1] != 1:
                raise ValueError
            return [_Act(a.segs)]
        if name == "pad":
            if tuple(p["padding_config"][-1]) != (0, 0, 0):
                raise ValueError
            return [_Act(a.segs)]
        if name in ("slice", "dynamic_slice", "rev"):
            if out_shape[-1] != shape[-1] or (name == "rev" and last in p["dimensions"]):
                raise ValueError
            if name == "slice" and (p["start_indices"][-1] != 0 or (p.get("strides") or [1])[-1] not in (1, None)):
                raise ValueError
            return [_Act(a.segs)]
        if name == "reshape":
            if a.segs is not None and out_shape[-1] == shape[-1] and math.prod(out_shape[:-1]) == math.prod(shape[:-1]):
                return [_Act(a.segs)]
            if a.segs is not None and nd == 2 and out_shape[0] == shape[0] and out_shape[1] == math.prod(shape[1:]):
                return [_Act(a.segs * math.prod(shape[1:-1]))]  # flatten: position-major, channels minor
            raise ValueError
        if name == "transpose":
            if tuple(p["permutation"])[-1] != last:
                raise ValueError
            return [_Act(a.segs)]
        if name in ("squeeze", "expand_dims", "broadcast_in_dim"):
            if not shape or out_shape[-1] != shape[-1]:
                raise ValueError
            if name == "broadcast_in_dim" and tuple(p["broadcast_dimensions"])[-1] != nd - 1:
                raise ValueError
            if name == "squeeze" and (last in p["dimensions"] or -1 in p["dimensions"]):
                raise ValueError
            return [_Act(a.segs)]
        if name == "split":
            return self.split(p, a, shape)
        raise ValueError

    def concat(self, dim, ins, shapes, out_shape) -> _Act:
        nd = len(out_shape)
        if dim not in (nd - 1, -1):  # along space or batch: the channels of all inputs meet
            segs = None
            for i, s in zip(ins, shapes):
                if isinstance(i, _Act):
                    if i.segs is None:
                        raise ValueError
                    segs = i.segs if segs is None else self.join(segs, i.segs, "concatenated with a non-layer tensor")
            return _Act(segs)
        segs: list = []
        for i, s in zip(ins, shapes):
            if isinstance(i, _Act):
                if i.segs is None:
                    raise ValueError
                segs += i.segs
            else:
                segs.append((-1, int(s[-1])))
        return _Act(tuple(segs))

    def split(self, p, a: _Act, shape) -> list:
        axis = p["axis"] % len(shape)
        sizes = [int(s) for s in p["sizes"]]
        if axis != len(shape) - 1:
            return [_Act(a.segs) for _ in sizes]
        if a.segs is None:
            raise ValueError
        outs, seg_iter = [], list(a.segs)
        for size in sizes:
            part, left = [], size
            while left > 0 and seg_iter:
                src, c = seg_iter[0]
                if c <= left:
                    part.append((src, c))
                    left -= c
                    seg_iter.pop(0)
                else:  # the split cuts a group: which of its channels are removed matters
                    self.fix_segs(((src, c),), "split inside a layer's channels")
                    part.append((src, left))
                    seg_iter[0] = (src, c - left)
                    left = 0
            outs.append(_Act(tuple(part)))
        return outs

    def layer(self, eqn, x: _Act, i: int) -> _Act:
        name = eqn.primitive.name
        p = eqn.params
        k_shape = tuple(eqn.invars[1].aval.shape)
        c_out = int(eqn.outvars[0].aval.shape[-1])
        self.seen[i] = True
        self.channels[i] = c_out
        self.max_pooled[i] = self.max_pooled[i] or x.max_pooled
        reads = x.segs
        if name == "dot_general":
            ((lc, rc), (lb, rb)) = p["dimension_numbers"]
            x_nd = len(eqn.invars[0].aval.shape)
            if tuple(lc) != (x_nd - 1,) or tuple(rc) != (0,) or lb or rb:
                self.fix_segs(x.segs, "a matmul the channel tracer does not follow")
                self.fix(i, "a matmul the channel tracer does not follow")
                reads = None
        else:
            dn = p["dimension_numbers"]
            groups = int(p["feature_group_count"])
            c_in = int(eqn.invars[0].aval.shape[-1])
            if tuple(dn.lhs_spec) != (0, 3, 1, 2) or tuple(dn.out_spec) != (0, 3, 1, 2):
                self.fix_segs(x.segs, "a conv that is not NHWC")
                self.fix(i, "a conv that is not NHWC")
                return _Act(((i, c_out),), origin=i)
            if groups > 1 and groups == c_in and k_shape[-2] == 1 and c_out == c_in:  # depthwise
                self.depthwise[i] = True
                self.reads[i] = x.segs
                if x.segs is None or len(x.segs) != 1 or x.segs[0][0] < 0 or x.segs[0][1] != self.channels[x.segs[0][0]]:
                    self.fix(i, "a depthwise conv whose input channels are not one layer's")
                    self.fix_segs(x.segs, "read by a depthwise conv over several groups")
                    return _Act(((i, c_out),), origin=i)
                self.union(i, x.segs[0][0])
                return _Act(x.segs, origin=i)
            if groups > 1:
                self.fix_segs(x.segs, "read by a grouped conv")
                self.fix(i, "a grouped conv")
        if self.reads[i] is None:
            self.reads[i] = reads
        elif reads is not None:  # a layer called twice: both inputs' channels meet its rows
            try:
                self.reads[i] = self.join(self.reads[i], reads, "read by a layer called twice")
            except ValueError:
                self.fix_segs(self.reads[i], "read by a layer called twice")
        return _Act(((i, c_out),), origin=i)

    def result(self) -> Coupling:
        roots = [self.find(i) for i in range(self.n)]
        members: dict[int, list[int]] = {}
        for i, r in enumerate(roots):
            members.setdefault(r, []).append(i)
        leader, why = {}, {}
        for r, ms in members.items():
            plain = [m for m in ms if not self.depthwise[m]]
            leader[r] = min(plain or ms)
            reasons = [self.reason[m] for m in ms if m in self.reason]
            why[r] = reasons[0] if reasons else None
        for i in range(self.n):
            if not self.seen[i]:
                why[roots[i]] = why[roots[i]] or "its layer was not seen by the channel tracer"
        reads, repeat = [], []
        for i in range(self.n):
            segs = tuple((leader[roots[s]] if s >= 0 else -1, c) for s, c in (self.reads[i] or ()))
            rep = _period(segs)
            reads.append(segs[: len(segs) // rep] if segs else ())
            repeat.append(rep)
        return Coupling(tuple(leader[roots[i]] for i in range(self.n)), tuple(why[roots[i]] for i in range(self.n)),
                        tuple(reads), tuple(repeat), tuple(self.depthwise), tuple(self.max_pooled),
                        tuple(self.clipped))


def _opaque(var) -> _Act:
    """The output of an op the tracer does not follow: its channels come from groups that are
    fixed already (the op fixed what it read), so they are nobody's to remove (-1)."""
    shape = tuple(var.aval.shape)
    return _Act(((-1, int(shape[-1])),) if shape else None)


def _period(segs: Segs) -> int:
    """The largest n such that segs is one block repeated n times."""
    n = len(segs)
    for p in range(1, n + 1):
        if n % p == 0 and segs == segs[:p] * (n // p):
            return n // p
    return 1
