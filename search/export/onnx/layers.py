"""How the ONNX converter writes a Dense/Conv layer: its input quantization, its kernel (float,
or integers + DequantizeLinear), removed output channels, and the constant contribution of the
input channels its producer removed (a bias, or a bias map after a padded conv).

A factorized layer (`LayerExport.factors`, search.compression.lowrank) is written as the pair it
is, in its form:
- SVD: a Dense as MatMul(x, A) then MatMul(., B); a conv as a kxk Conv with r filters (the
  layer's strides, padding and dilation, no bias) then a 1x1 Conv r -> out ("Weight SVD");
- spatial: a kh x 1 Conv cin -> r (the vertical stride, padding and dilation) then a 1 x kw Conv
  r -> out (the horizontal ones);
- Kronecker (Dense): x as [N, 1, m1, m2], MatMul with the stacked B_i [r, m2, n2], reshaped to
  [N, r*m1, n2], MatMul of the stacked A_i^T [n1, r*m1] with it, reshaped to [N, n1*n2].
The second node carries the layer's name, so the bias, a folded BatchNorm and removed channels
land on it; A loses the fan-in rows of removed input channels, B the removed output channels.
A runs on integer kernels when it has integers (`factor_q`; SVD and spatial forms) and its input
is quantized to <= 8 bits, as any layer; B's input (A's output) is not quantized in the model,
so B runs in float32 (its fake-quantized values), and so do both Kronecker factors."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from search.compression.lowrank import kron_split
from search.compression.plan import KRONECKER, SPATIAL
from search.export.onnx.graph import (
    NHWC_TO_NCHW,
    Act,
    Const,
    Drop,
    GraphBuilder,
    Keep,
    LayerExport,
    Sel,
    fake_quant_np,
)


class LayerRules:
    """Mixin of convert._Converter: the rules for dot_general and conv_general_dilated."""

    def _layer(self, rhs: Const) -> tuple[str | None, LayerExport | None]:
        name = self.layer_of_path.get(rhs.tag or "")
        if name is None:
            return None, None
        return name, self.exports.get(name, LayerExport(name))

    def _quant_input(self, x: Act, spec: LayerExport | None, int_weights: bool) -> Act:
        """The layer's input activation quantization: Q/DQ (uint8 grid) or float emulation."""
        if spec is None or spec.act is None:
            return x
        s, z, bits = spec.act
        g = self.g
        sel = x.sel
        if sel is not None:
            with np.errstate(invalid="ignore"):
                sel = Sel(sel.keep, np.where(np.isnan(sel.fill), np.nan, fake_quant_np(np.nan_to_num(sel.fill), s, z, bits)), sel.producer)
        name = x.name
        if bits <= 8 and int_weights:  # int8 x int8: onnxruntime fuses this into integer kernels
            if bits < 8:  # the b-bit grid is a sub-range of uint8: clip to it first
                lo, hi = np.float32((0 - z) * s), np.float32(((1 << bits) - 1 - z) * s)
                name = g.node("Clip", [name, g.const(lo), g.const(hi)])
            sc, zp = g.const(np.float32(s), "act_scale"), g.const(np.uint8(z), "act_zp")
            name = g.node("DequantizeLinear", [g.node("QuantizeLinear", [name, sc, zp]), sc, zp])
        else:  # float weights (or 16 bits): the same rounding in float ops, as the model does
            sc, zc = g.const(np.float32(s)), g.const(np.float32(z))
            r = g.node("Add", [g.node("Round", [g.node("Div", [name, sc])]), zc])
            r = g.node("Clip", [r, g.const(np.float32(0)), g.const(np.float32(2.0**bits - 1))])
            name = g.node("Mul", [g.node("Sub", [r, zc]), sc])
        return Act(name, x.shape, x.nchw, sel, x.src)

    def _out_keep(self, name: str | None, spec: LayerExport | None, w2: np.ndarray) -> np.ndarray:
        """Output channels to materialise: all-zero kernel columns go (when allowed), then some
        come back so that the count is a multiple of spec.align, up to spec.cap (the lowest
        dead channels first, those nobody reads last)."""
        n = w2.shape[1]
        live = np.any(w2 != 0, axis=0)
        if name is None or spec is None or not spec.prune:
            return np.arange(n)
        live[list(spec.drop)] = False
        keep = np.flatnonzero(live) if live.any() else np.arange(1)
        cap = n if spec.cap is None else max(int(spec.cap), keep.size)
        target = min(-(-keep.size // spec.align) * spec.align, cap, n)
        if target > keep.size:
            dropped = np.zeros(n, bool)
            dropped[list(spec.drop)] = True
            dead = np.setdiff1d(np.arange(n), keep)
            dead = np.concatenate([dead[~dropped[dead]], dead[dropped[dead]]])
            keep = np.sort(np.concatenate([keep, dead[: target - keep.size]]))
        return keep

    def _weight(self, spec: LayerExport | None, w: np.ndarray, q: np.ndarray | None,
                scale: np.ndarray | None, axis: int) -> str:
        """The kernel tensor (already cut and in ONNX layout): float, or int8 + DequantizeLinear."""
        g = self.g
        if q is None or spec is None or spec.act is None or spec.act[2] > 8:
            return g.const(w.astype(np.float32), "w")
        # the same weights on a finer grid (q * k, scale / k): the int32 bias, rounded to
        # s_x * scale, then loses next to nothing even for 1- to 4-bit weights
        amax = np.abs(q.reshape(q.shape[0], -1) if axis == 0 else q).max(axis=tuple(i for i in range(q.ndim) if i != axis) if axis else 1)
        k = np.maximum(63 // np.maximum(amax, 1), 1)
        kb = k.reshape((-1,) + (1,) * (q.ndim - 1)) if axis == 0 else k
        q, scale = q * kb, (scale / k).astype(np.float32)
        if np.abs(q).max(initial=0) <= 63:  # int8: onnxruntime's fast u8s8 kernels cannot overflow
            wq, zp = q.astype(np.int8), np.zeros(scale.shape, np.int8)
        else:  # 8-bit weights: u8s8 on AVX2 saturates int16 pair sums (VPMADDUBSW); u8u8 is exact
            wq, zp = (q + 128).astype(np.uint8), np.full(scale.shape, 128, np.uint8)
        dq = [g.const(wq, "wq"), g.const(scale.astype(np.float32), "w_scale"), g.const(zp, "w_zp")]
        return g.node("DequantizeLinear", dq, name="w_dq", axis=axis)

    def op_dot_general(self, eqn, x, rhs):
        ((lc, rc), (lb, rb)) = eqn.params["dimension_numbers"]
        if not isinstance(rhs, Const) or len(x.shape) != 2 or tuple(lc) != (1,) or tuple(rc) != (0,) or lb or rb:
            raise NotImplementedError("dot_general other than [B, in] @ [in, out] const")
        name, spec = self._layer(rhs)
        w = rhs.value
        qfull = spec.q if spec is not None and spec.weight == "int" else None
        x = self._quant_input(x, spec, qfull is not None or _int_factor(spec))
        rows, fill = np.arange(w.shape[0]), None
        if x.sel is not None:
            absent = np.setdiff1d(np.arange(w.shape[0]), x.sel.keep)
            fa = x.sel.fill[absent]
            used = np.any(w[absent] != 0, axis=1)
            if np.any(np.isnan(fa) & used):
                raise Keep(x.sel.producer, f"{name} reads a removed channel")
            fill = np.where(np.isnan(fa), 0, fa) @ w[absent]
            rows = x.sel.keep
        keep = self._out_keep(name, spec, w)
        wc = w[np.ix_(rows, keep)]
        qc = None if qfull is None else qfull[np.ix_(rows, keep)]
        scale = None if qfull is None else spec.scale[keep]
        if spec is not None and spec.factors is not None and spec.factors[0] == KRONECKER:
            out = self._kronecker(name, x, spec.factors[1], spec.factors[2], w.shape)
        elif spec is not None and spec.factors is not None:
            _, a, b = spec.factors
            qa, sa = spec.factor_q or (None, None)
            wa = self._weight(spec, a[rows], None if qa is None else qa[rows], sa, axis=1)
            mid = self.g.node("MatMul", [x.name, wa], name=f"{name}.svd_a")
            out = self.g.node("MatMul", [mid, self.g.const(b[:, keep].astype(np.float32), "w")], name=name)
        else:
            out = self.g.node("MatMul", [x.name, self._weight(spec, wc, qc, scale, axis=1)], name=name)
        if fill is not None and np.any(fill[keep] != 0):
            out = self.g.node("Add", [out, self.g.const(fill[keep].astype(np.float32))])
        return self._layer_out(name, out, tuple(eqn.outvars[0].aval.shape), False, keep, w.shape[1])

    def _kronecker(self, name, x, a, b, shape):
        return kronecker(self.g, name, x.name, a, b, shape)

    def _layer_out(self, name, out, shape, nchw, keep, c):
        if name is not None:
            self.kept[name] = int(keep.size)
        sel = None
        if keep.size != c:
            fill = np.zeros(shape[1:], np.float32)
            spec = self.exports.get(name)
            if spec is not None and spec.drop:
                fill[..., np.setdiff1d(list(spec.drop), keep)] = np.nan  # dropped: never read
            sel = Sel(keep, fill, name)
        return Act(out, shape, nchw, sel, name)

    def op_conv_general_dilated(self, eqn, x, rhs):
        p = eqn.params
        dn = p["dimension_numbers"]
        if not isinstance(rhs, Const) or tuple(dn.lhs_spec) != (0, 3, 1, 2) or tuple(dn.rhs_spec) != (3, 2, 0, 1) \
                or any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise NotImplementedError("conv other than NHWC x HWIO with a const kernel")
        name, spec = self._layer(rhs)
        w = rhs.value  # [kh, kw, cin/g, cout]
        groups = groups_in = int(p["feature_group_count"])
        cin = x.shape[-1]
        qfull = spec.q if spec is not None and spec.weight == "int" else None
        x = self._quant_input(self.nchw(x), spec, qfull is not None or (_int_factor(spec) and groups_in == 1))
        w2 = w.reshape(-1, w.shape[-1])
        if groups == 1:
            keep = self._out_keep(name, spec, w2)
            rows, bias = np.arange(cin), None
            if x.sel is not None:
                absent = np.setdiff1d(np.arange(cin), x.sel.keep)
                fa = x.sel.fill[..., absent]
                used = np.any(w[:, :, absent, :] != 0, axis=(0, 1, 3))
                if np.any(np.isnan(fa[..., used])):
                    raise Keep(x.sel.producer, f"{name} reads a removed channel")
                if np.any(fa[..., used] != 0):  # input-independent channels: their exact contribution map
                    img = np.zeros((1, *x.shape[1:]), np.float32)
                    img[0][..., absent] = np.nan_to_num(fa)
                    bias = np.asarray(eqn.primitive.bind(jnp.asarray(img), jnp.asarray(w), **p))
                rows = x.sel.keep
            wc = w[:, :, rows][..., keep]
            out_sel_c = w.shape[-1]
        elif groups == cin and w.shape[2] == 1 and w.shape[3] == cin:  # depthwise
            keep = np.arange(cin) if x.sel is None else x.sel.keep
            zero = ~np.any(w2 != 0, axis=0)  # pruned filters: their input channel is never read
            src_spec = self.exports.get(x.src or "", LayerExport(x.src or "")) if x.src else None
            unread = np.setdiff1d(keep[zero[keep]], src_spec.drop) if src_spec is not None else keep[:0]
            if spec is not None and spec.prune and src_spec is not None and src_spec.prune \
                    and unread.size and src_spec.name != name:  # (not those the producer keeps for its alignment)
                raise Drop(x.src, unread)
            bias = None
            if x.sel is not None:  # absent channels stay absent: their fill goes through the conv
                dead = np.isnan(x.sel.fill).any(axis=(0, 1)) & ~zero
                img = np.nan_to_num(x.sel.fill)[None]
                bias = np.array(eqn.primitive.bind(jnp.asarray(img), jnp.asarray(w), **p))[0]
                bias[..., dead] = np.nan
            wc = w[..., keep]
            groups = int(keep.size)
            out_sel_c = cin
        else:
            raise NotImplementedError(f"grouped conv with {groups} groups")
        qc, scale = None, None
        if qfull is not None:
            qc = qfull[:, :, rows][..., keep] if p["feature_group_count"] == 1 else qfull[..., keep]
            qc, scale = qc.transpose(3, 2, 0, 1), spec.scale[keep]
        pads = [int(p["padding"][0][0]), int(p["padding"][1][0]), int(p["padding"][0][1]), int(p["padding"][1][1])]
        conv = dict(kernel_shape=[int(w.shape[0]), int(w.shape[1])], strides=[int(s) for s in p["window_strides"]],
                    pads=pads, dilations=[int(d) for d in p["rhs_dilation"]])
        if spec is not None and spec.factors is not None and groups_in == 1 and spec.factors[0] == SPATIAL:
            _, a, b = spec.factors  # A [kh*cin, r] -> a kh x 1 conv to r; B [r, kw*out] -> a 1 x kw conv
            kh, kw, r = w.shape[0], w.shape[1], a.shape[1]
            a4 = a.reshape(kh, w.shape[2], r)[:, rows].transpose(2, 1, 0)[..., None]  # [r, cin, kh, 1]
            qa, sa = spec.factor_q or (None, None)
            qa4 = None if qa is None else qa.reshape(kh, w.shape[2], r)[:, rows].transpose(2, 1, 0)[..., None]
            wa = self._weight(spec, a4, qa4, sa, axis=0)
            mid = self.g.node("Conv", [x.name, wa], name=f"{name}.svd_a", group=1, kernel_shape=[kh, 1],
                              strides=[conv["strides"][0], 1], pads=[pads[0], 0, pads[2], 0],
                              dilations=[conv["dilations"][0], 1])
            b4 = b.reshape(r, kw, w.shape[3])[..., keep].transpose(2, 0, 1)[:, :, None, :].astype(np.float32)
            out = self.g.node("Conv", [mid, self.g.const(np.ascontiguousarray(b4), "w")], name=name,
                              kernel_shape=[1, kw], strides=[1, conv["strides"][1]], pads=[0, pads[1], 0, pads[3]],
                              dilations=[1, conv["dilations"][1]], group=1)
        elif spec is not None and spec.factors is not None and groups_in == 1:
            _, a, b = spec.factors  # A [kh*kw*cin, r] -> r kxk filters; B [r, out] -> a 1x1 conv
            a4 = a.reshape(w.shape[0], w.shape[1], w.shape[2], a.shape[1])[:, :, rows]
            qa, sa = spec.factor_q or (None, None)
            qa4 = None if qa is None else qa.reshape(a4.shape[:2] + (w.shape[2], a.shape[1]))[:, :, rows].transpose(3, 2, 0, 1)
            wa = self._weight(spec, a4.transpose(3, 2, 0, 1), qa4, sa, axis=0)
            mid = self.g.node("Conv", [x.name, wa], name=f"{name}.svd_a", group=1, **conv)
            b4 = b[:, keep].T.reshape(keep.size, b.shape[0], 1, 1).astype(np.float32)
            out = self.g.node("Conv", [mid, self.g.const(b4, "w")], name=name, kernel_shape=[1, 1], strides=[1, 1],
                              pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
        else:
            wname = self._weight(spec, wc.transpose(3, 2, 0, 1), qc, scale, axis=0)
            out = self.g.node("Conv", [x.name, wname], name=name, group=groups, **conv)
        res = self._layer_out(name, out, tuple(eqn.outvars[0].aval.shape), True, keep, out_sel_c)
        if bias is not None and groups_in == 1:  # [1, H, W, O] map from constant channels
            b = bias[..., keep].transpose(NHWC_TO_NCHW)
            if np.all(b == b[:, :, :1, :1]):
                b = b[:, :, :1, :1]
            if np.any(b != 0):
                res = Act(self.g.node("Add", [res.name, self.g.const(b.astype(np.float32))]), res.shape, True, res.sel, res.src)
        elif bias is not None and res.sel is not None:  # depthwise: absent channels' new values
            res.sel.fill = bias.astype(np.float32)
        if x.sel is not None and p["feature_group_count"] != 1 and res.sel is not None:
            res.sel.producer = x.sel.producer
        return res


def _int_factor(spec: LayerExport | None) -> bool:
    """Whether a factorized layer's first factor has integers (its input then goes through Q/DQ)."""
    return spec is not None and spec.factors is not None and spec.factor_q is not None


def kronecker(g: GraphBuilder, name: str, x: str, a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> str:
    """Write a Kronecker-factorized Dense layer of kernel shape (fan_in, out) = `shape` into `g`
    (A [m1*n1, r], B [r, m2*n2]: lowrank's rearrangement; m = kron_split(fan_in), n =
    kron_split(out)) reading `x` [N, fan_in]; returns its output [N, n1*n2] before the bias. Every
    channel is kept (lowrank.check_plan). The kernel probes (search.export.kernel_probes) time it."""
    (m1, m2), (n1, n2) = kron_split(shape[0]), kron_split(shape[1])
    r = a.shape[1]
    x4 = g.node("Reshape", [x, g.const(np.array([-1, 1, m1, m2], np.int64), "shape")])
    bst = b.reshape(r, m2, n2).astype(np.float32)  # B_i = row i of B as [m2, n2]
    t = g.node("MatMul", [x4, g.const(bst, "w")], name=f"{name}.svd_a")  # [N, r, m1, n2]
    t3 = g.node("Reshape", [t, g.const(np.array([-1, r * m1, n2], np.int64), "shape")])
    at = a.T.reshape(r, m1, n1).reshape(r * m1, n1).T.astype(np.float32)  # A_i = column i of A as [m1, n1]
    y = g.node("MatMul", [g.const(np.ascontiguousarray(at), "w"), t3], name=name)  # [N, n1, n2]
    return g.node("Reshape", [y, g.const(np.array([-1, n1 * n2], np.int64), "shape")])
