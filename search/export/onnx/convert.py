"""Flax model -> ONNX, by interpreting its jaxpr, with pruned channels really removed.

`jax.make_jaxpr` of `module.apply` with the params as inputs gives the primitive program; each
equation whose inputs are all constants is evaluated in numpy (bias reshapes, broadcasts), the
others become ONNX nodes. Dense/Conv layers (dot_general / conv_general_dilated whose kernel is
a param leaf) are emitted from a `LayerExport`: integer weights with DequantizeLinear, the
input activation through QuantizeLinear/DequantizeLinear (so onnxruntime's QDQ fusion can pick
integer kernels; qdq.py then shapes them for onnxruntime), codebook and float layers
as float (layers.py holds these rules; graph.py the value types and the graph builder).

Channel removal: a value carries a `Sel` when only some channels of its last axis are
materialised; every absent channel holds known values that do not depend on the input (`fill`,
one example's shape: a constant such as relu(bias), or a spatial map after a padded conv; NaN =
dead, never read). Elementwise ops, pooling and reductions update `fill` in numpy, the consuming
Dense/Conv slices its input axis and folds the fill's contribution into a bias (a bias map
for a padded conv). Where that is impossible (a residual add of tensors with different
channels) the producer is re-emitted unpruned (`Keep`, a retry). Concatenations, splits and
slices carry the kept channels along (channels.py).
Per-channel affine ops right after a layer (an eval-mode BatchNorm) are folded into it, and
ReLU6 (Relu then Min) becomes one Clip that onnxruntime fuses into the conv (fold.py).
Inputs and outputs are NHWC like the Flax model; convolutions run NCHW inside.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper

from search.export.onnx.channels import ChannelRules
from search.export.onnx.fold import clip_activations, fold_affine
from search.compression.graph import plain_convs
from search.export.onnx.graph import (
    NCHW_TO_NHWC,
    NHWC_TO_NCHW,
    OPSET,
    Act,
    Const,
    Drop,
    GraphBuilder,
    Keep,
    LayerExport,
    Sel,
    fake_quant_np,
)
from search.export.onnx.layers import LayerRules
from search.export.onnx.qdq import integer_kernels

__all__ = ["LayerExport", "fake_quant_np", "to_onnx"]


def to_onnx(apply: Any, params: Any, input_shape: tuple[int, ...],
            exports: Mapping[str, LayerExport] | None = None,
            layer_of_path: Mapping[str, str] | None = None) -> tuple[onnx.ModelProto, dict]:
    """Build the ONNX model of `apply(params, x)` (or of a Linen module's apply).

    `exports` maps layer names to LayerExport (missing = float, pruned where zero);
    `layer_of_path` maps "path/kernel" param keys to layer names (default: the path itself).
    Returns (model, info) with info["kept"] = {layer: kept output channels}, info["kept_back"].
    """
    exports = dict(exports or {})
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    keys = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
    leaves = [np.asarray(v, np.float32) for _, v in flat]
    layer_of_path = dict(layer_of_path or {k: k[: -len("/kernel")] for k in keys if k.endswith("/kernel")})
    x0 = np.zeros((1, *input_shape), np.float32)
    fn = (lambda p, x: apply.apply({"params": p}, x)) if hasattr(apply, "apply") else apply
    with nn.intercept_methods(plain_convs):
        closed = jax.make_jaxpr(fn)(params, x0)
    kept_back: list[str] = []
    for _ in range(4 * len(layer_of_path) + 2):
        try:
            conv = _Converter(exports, layer_of_path)
            model = conv.build(closed, keys, leaves, input_shape)
            fold_affine(model)  # BN folding
            forms = integer_kernels(model)  # shape the QDQ layers for onnxruntime's integer kernels
            clip_activations(model)  # ReLU6 as one Clip, which onnxruntime fuses into the conv
            return model, {"kept": conv.kept, "kept_back": kept_back, "forms": forms}
        except Keep as k:
            kept_back.append(str(k))
            e = exports.get(k.layer, LayerExport(k.layer))
            exports[k.layer] = LayerExport(**{**e.__dict__, "prune": False})
        except Drop as d:
            e = exports.get(d.layer, LayerExport(d.layer))
            drop = tuple(sorted(set(e.drop) | {int(c) for c in d.channels}))
            exports[d.layer] = LayerExport(**{**e.__dict__, "drop": drop})
    raise RuntimeError(f"channel removal did not settle: {kept_back}")


class _Converter(LayerRules, ChannelRules):
    def __init__(self, exports: Mapping[str, LayerExport], layer_of_path: Mapping[str, str]):
        self.exports, self.layer_of_path = exports, layer_of_path
        self.g = GraphBuilder()
        self.kept: dict[str, int] = {}  # layer -> output channels in the graph

    # ------------------------------------------------------------ driver
    def build(self, closed, keys, leaves, input_shape) -> onnx.ModelProto:
        jaxpr = closed.jaxpr
        env: dict[Any, Any] = {}
        for v, c in zip(jaxpr.constvars, closed.consts):
            env[v] = Const(np.asarray(c))
        *pvars, xvar = jaxpr.invars
        for v, k, leaf in zip(pvars, keys, leaves):
            env[v] = Const(leaf, k)
        env[xvar] = Act("input", (1, *input_shape))
        (out,) = self.run(jaxpr, env)
        out = self.materialise(self.logical(out))
        g = self.g
        g.node("Identity", [out.name], name="output")
        g.graph.node[-1].output[0] = "output"
        g.graph.name = "hwcompress"
        g.graph.input.append(helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_shape]))
        g.graph.output.append(helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *out.shape[1:]]))
        model = helper.make_model(g.graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="hwcompress")
        model.ir_version = 10
        onnx.checker.check_model(model)
        return model

    def read(self, env, a):
        if isinstance(a, jex_core.Literal):
            return Const(np.asarray(a.val))
        return env[a]

    def run(self, jaxpr, env) -> list:
        for eqn in jaxpr.eqns:
            ins = [self.read(env, a) for a in eqn.invars]
            sub = next((eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params), None)
            if sub is not None:  # jit, custom_jvp_call, ...: inline
                inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
                consts = getattr(sub, "consts", [])
                senv = {v: Const(np.asarray(c)) for v, c in zip(inner.constvars, consts)}
                senv.update(zip(inner.invars, ins))
                outs = self.run(inner, senv)
            elif all(isinstance(i, Const) for i in ins):
                vals = eqn.primitive.bind(*[jnp.asarray(i.value) for i in ins], **eqn.params)
                vals = vals if eqn.primitive.multiple_results else [vals]
                tag = ins[0].tag if eqn.primitive.name in ("convert_element_type", "copy") else None
                outs = [Const(np.asarray(v), tag) for v in vals]
            else:
                if eqn.primitive.name != "reduce_max":
                    ins = [self.unwindow(i) for i in ins]
                fn = getattr(self, f"op_{eqn.primitive.name}", None)
                if fn is None:
                    raise NotImplementedError(f"ONNX export has no rule for primitive {eqn.primitive.name!r}")
                res = fn(eqn, *ins)
                outs = res if eqn.primitive.multiple_results else [res]
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [self.read(env, a) for a in jaxpr.outvars]

    # ------------------------------------------------------------ layout and channels
    def logical(self, a: Act) -> Act:
        if not a.nchw:
            return a
        return Act(self.g.node("Transpose", [a.name], perm=list(NCHW_TO_NHWC)), a.shape, False, a.sel, a.src)

    def nchw(self, a: Act) -> Act:
        if a.nchw or len(a.shape) != 4:
            return a
        return Act(self.g.node("Transpose", [a.name], perm=list(NHWC_TO_NCHW)), a.shape, True, a.sel, a.src)

    def unwindow(self, a):
        """Emit a pending window split as the real 6-D reshape (for any reader but a max)."""
        if not isinstance(a, Act) or a.window is None:
            return a
        if a.sel is not None:
            raise Keep(a.sel.producer, "a pooling window split read by something else than a max")
        x = self.logical(Act(a.name, (a.shape[0], a.shape[1] * a.shape[2], a.shape[3] * a.shape[4], a.shape[5]), a.nchw))
        shape = self.g.const(np.array([-1, *a.shape[1:]], np.int64), "shape")
        return Act(self.g.node("Reshape", [x.name, shape]), a.shape, False, None, a.src)

    def materialise(self, a: Act) -> Act:
        if a.sel is None:
            return a
        raise Keep(a.sel.producer, "its channels are needed in full")

    def phys_const(self, a: Act, c: np.ndarray) -> np.ndarray:
        """A constant operand broadcast against `a`, cut to its channels and layout."""
        c = np.asarray(c, np.float32)
        if c.ndim == 0:
            return c
        c = c.reshape((1,) * (len(a.shape) - c.ndim) + c.shape)
        if a.sel is not None and c.shape[-1] != 1:
            c = np.take(c, a.sel.keep, axis=-1)
        return c.transpose(NHWC_TO_NCHW) if a.nchw else c

    # ------------------------------------------------------------ elementwise
    def _binary(self, op: str, np_op: Callable, eqn, x, y):
        if isinstance(x, Act) and isinstance(y, Act):
            differ = x.sel is None or y.sel is None or not np.array_equal(x.sel.keep, y.sel.keep)
            if (x.sel is not None or y.sel is not None) and differ:
                raise Keep((x.sel or y.sel).producer, f"{op} of two tensors with different channels")
            if x.nchw != y.nchw:
                x, y = self.logical(x), self.logical(y)
            sel = None if x.sel is None else Sel(x.sel.keep, np_op(x.sel.fill, y.sel.fill), x.sel.producer)
            return Act(self.g.node(op, [x.name, y.name]), tuple(eqn.outvars[0].aval.shape), x.nchw, sel)
        act, cst, act_first = (x, y, True) if isinstance(x, Act) else (y, x, False)
        shape = tuple(eqn.outvars[0].aval.shape)
        if shape != act.shape:
            act = self.materialise(self.logical(act))
            raise NotImplementedError(f"broadcasting an activation {act.shape} to {shape}")
        c = np.asarray(cst.value, np.float32)
        sel = act.sel
        if sel is not None:
            cc = c.reshape((1,) * (len(shape) - c.ndim) + c.shape) if c.ndim else c
            vec = np.broadcast_to(cc, (1, *sel.fill.shape))[0] if cc.ndim else cc
            with np.errstate(all="ignore"):
                fill = np_op(sel.fill, vec) if act_first else np_op(vec, sel.fill)
            sel = Sel(sel.keep, fill.astype(np.float32), sel.producer)
        if op == "Max" and c.ndim == 0 and float(c) == 0.0:
            return Act(self.g.node("Relu", [act.name]), shape, act.nchw, sel, act.src)
        cname = self.g.const(self.phys_const(act, c))
        ins = [act.name, cname] if act_first else [cname, act.name]
        return Act(self.g.node(op, ins), shape, act.nchw, sel, act.src)

    def op_add(self, eqn, x, y):
        return self._binary("Add", np.add, eqn, x, y)

    def op_sub(self, eqn, x, y):
        return self._binary("Sub", np.subtract, eqn, x, y)

    def op_mul(self, eqn, x, y):
        return self._binary("Mul", np.multiply, eqn, x, y)

    def op_div(self, eqn, x, y):
        return self._binary("Div", np.divide, eqn, x, y)

    def op_max(self, eqn, x, y):
        return self._binary("Max", np.maximum, eqn, x, y)

    def op_min(self, eqn, x, y):
        return self._binary("Min", np.minimum, eqn, x, y)

    def op_convert_element_type(self, eqn, x):
        return x

    def op_copy(self, eqn, x):
        return x

    # ------------------------------------------------------------ shapes
    def op_reshape(self, eqn, x):
        new = tuple(eqn.params["new_sizes"])
        if len(x.shape) == 4 and len(new) == 6 and new[2] * new[1] == x.shape[1] and new[4] * new[3] == x.shape[2] \
                and new[5] == x.shape[3]:  # (B, H/kh, kh, W/kw, kw, C): a pooling window split, see op_reduce_max
            return Act(x.name, new, x.nchw, x.sel, x.src, window=(int(new[2]), int(new[4])))
        x = self.logical(x)
        sel = None
        if x.sel is not None:  # only a flatten of everything after the batch axis keeps channels
            if len(new) != 2:
                raise Keep(x.sel.producer, f"reshape to {new}")
            reps = int(np.prod(x.shape[1:-1]))
            c = x.shape[-1]
            keep = (np.arange(reps)[:, None] * c + x.sel.keep[None, :]).ravel()
            sel = Sel(keep, x.sel.fill.reshape(-1), x.sel.producer)
        n_phys = int(np.prod(x.shape[1:-1])) * (len(x.sel.keep) if x.sel is not None else x.shape[-1])
        rest = [int(d) for d in new[1:]]
        if sel is not None:
            rest = [n_phys]
        shape = self.g.const(np.array([-1, *rest], np.int64), "shape")
        return Act(self.g.node("Reshape", [x.name, shape]), new, False, sel)

    def op_transpose(self, eqn, x):
        x = self.materialise(self.logical(x))
        perm = [int(p) for p in eqn.params["permutation"]]
        return Act(self.g.node("Transpose", [x.name], perm=perm), tuple(eqn.outvars[0].aval.shape))

    def op_squeeze(self, eqn, x):
        x = self.materialise(self.logical(x))
        axes = self.g.const(np.array(eqn.params["dimensions"], np.int64), "axes")
        return Act(self.g.node("Squeeze", [x.name, axes]), tuple(eqn.outvars[0].aval.shape))

    def op_reduce_sum(self, eqn, x):
        return self._reduce("ReduceSum", eqn, x)

    def op_reduce_max(self, eqn, x):
        if x.window is not None and tuple(eqn.params["axes"]) == (2, 4):  # max over windows: MaxPool
            kh, kw = x.window
            x = self.nchw(Act(x.name, (x.shape[0], x.shape[1] * kh, x.shape[3] * kw, x.shape[5]), x.nchw, x.sel, x.src))
            name = self.g.node("MaxPool", [x.name], kernel_shape=[kh, kw], strides=[kh, kw])
            sel = None
            if x.sel is not None:
                h, w, c = x.sel.fill.shape
                f = x.sel.fill[: h // kh * kh, : w // kw * kw].reshape(h // kh, kh, w // kw, kw, c)
                sel = Sel(x.sel.keep, f.max(axis=(1, 3)), x.sel.producer)
            return Act(name, tuple(eqn.outvars[0].aval.shape), True, sel, x.src)
        return self._reduce("ReduceMax", eqn, x)

    def _reduce(self, op, eqn, x):
        axes = tuple(int(a) for a in eqn.params["axes"])
        nd = len(x.shape)
        if nd - 1 in axes:
            x = self.materialise(x)
        if x.nchw and set(axes) <= {1, 2}:
            phys = [NHWC_TO_NCHW.index(a) for a in axes]
            out_shape = tuple(eqn.outvars[0].aval.shape)
            nchw_out = len(out_shape) == 4
        else:
            x, phys, nchw_out = self.logical(x), list(axes), False
        sel = None if x.sel is None else Sel(x.sel.keep, _on_fill(eqn, x.sel.fill), x.sel.producer)
        name = self.g.node(op, [x.name, self.g.const(np.array(phys, np.int64), "axes")], keepdims=0)
        return Act(name, tuple(eqn.outvars[0].aval.shape), nchw_out, sel)

    def op_reduce_window_max(self, eqn, x):
        return self._pool("MaxPool", eqn, x)

    def op_reduce_window_sum(self, eqn, x):
        win = eqn.params["window_dimensions"]
        out = self._pool("AveragePool", eqn, x)
        k = float(np.prod(win))
        sel = out.sel
        return Act(self.g.node("Mul", [out.name, self.g.const(np.float32(k))]), out.shape, out.nchw, sel, out.src)

    def _pool(self, op, eqn, x):
        p = eqn.params
        win, strides, pad = p["window_dimensions"], p["window_strides"], p["padding"]
        if len(win) != 4 or win[0] != 1 or win[3] != 1 or any(d != 1 for d in p["base_dilation"]) \
                or any(d != 1 for d in p["window_dilation"]):
            raise NotImplementedError(f"pooling window {win} (only spatial NHWC windows are exported)")
        x = self.nchw(x)
        pads = [int(pad[1][0]), int(pad[2][0]), int(pad[1][1]), int(pad[2][1])]
        extra = {"count_include_pad": 1} if op == "AveragePool" else {}
        name = self.g.node(op, [x.name], kernel_shape=[int(win[1]), int(win[2])],
                           strides=[int(strides[1]), int(strides[2])], pads=pads, **extra)
        sel = None if x.sel is None else Sel(x.sel.keep, _on_fill(eqn, x.sel.fill), x.sel.producer)
        return Act(name, tuple(eqn.outvars[0].aval.shape), True, sel, x.src)

    # ------------------------------------------------------------ layers


def _on_fill(eqn, fill: np.ndarray) -> np.ndarray:
    """Apply a one-input primitive (pooling, reduction) to one example's fill values."""
    with np.errstate(all="ignore"):
        return np.asarray(eqn.primitive.bind(jnp.asarray(fill[None]), **eqn.params))[0].astype(np.float32)

