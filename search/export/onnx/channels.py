"""How the ONNX converter writes concatenate, split and slice, with removed channels.

A concatenation along the channel (last logical) axis keeps what its inputs removed: the
result's materialised channels are the inputs' kept channels, each offset by the channels
before it, and its `fill` is the inputs' fills side by side. Split and slice cut the kept
channels (and the fill) to their range. Convolution outputs run NCHW: when every input is,
the concatenation runs on the physical channel axis; otherwise all go to the logical NHWC
layout first (as elementwise ops do). A constant input is broadcast to the batch (Expand).
"""
from __future__ import annotations

import numpy as np

from search.export.onnx.graph import NHWC_TO_NCHW, Act, Keep, Sel


class ChannelRules:
    """Mixin of convert._Converter: the rules for concatenate, split and slice."""

    def _phys_axis(self, a: Act, axis: int) -> int:
        return NHWC_TO_NCHW.index(axis) if a.nchw else axis

    def _batched(self, value: np.ndarray, ref: Act) -> str:
        """A constant [1, ...] (physical layout) repeated over the batch of `ref`."""
        g = self.g
        batch = g.node("Shape", [ref.name], "batch", end=1)
        shape = g.node("Concat", [batch, g.const(np.array(value.shape[1:], np.int64), "dims")], "shape", axis=0)
        return g.node("Expand", [g.const(value.astype(np.float32)), shape], "const")

    def op_concatenate(self, eqn, *ins):
        dim = int(eqn.params["dimension"])
        shape = tuple(eqn.outvars[0].aval.shape)
        nd = len(shape)
        acts = [a for a in ins if isinstance(a, Act)]
        if dim == 0:
            raise NotImplementedError("concatenate along the batch axis")
        if dim != nd - 1:  # spatial: every input in full
            acts = [self.materialise(a) for a in acts]
        nchw = nd == 4 and all(a.nchw for a in acts)
        ref = acts[0] if nchw else self.logical(acts[0])
        names, keeps, fills, producer, off = [], [], [], None, 0
        for v, x in zip(eqn.invars, ins):
            in_shape = tuple(v.aval.shape)
            c = in_shape[-1]
            if isinstance(x, Act):
                x = x if nchw else self.logical(x)
                names.append(x.name)
                keep = np.arange(c) if x.sel is None else x.sel.keep
                fill = np.zeros(in_shape[1:], np.float32) if x.sel is None else x.sel.fill
                producer = producer or (x.sel.producer if x.sel is not None else None)
            else:
                val = np.broadcast_to(np.asarray(x.value, np.float32), (1, *in_shape[1:]))
                names.append(self._batched(val.transpose(NHWC_TO_NCHW) if nchw else val, ref))
                keep, fill = np.arange(c), np.zeros(in_shape[1:], np.float32)
            keeps.append(keep + off)
            fills.append(fill)
            off += c
        axis = 1 if nchw and dim == nd - 1 else (NHWC_TO_NCHW.index(dim) if nchw else dim)
        out = self.g.node("Concat", names, axis=axis)
        sel = None
        if producer is not None:
            sel = Sel(np.concatenate(keeps), np.concatenate(fills, axis=-1).astype(np.float32), producer)
        return Act(out, shape, nchw, sel)

    def _slice(self, x: Act, ranges: list[tuple[int, int, int]], shape: tuple[int, ...]) -> Act:
        """x[..., start:limit:step per logical axis], channels cut to the kept ones in range."""
        nd = len(x.shape)
        if ranges[0] != (0, x.shape[0], 1):
            raise NotImplementedError("slicing the batch axis")
        sel, phys = x.sel, list(ranges)
        if sel is not None:
            a, b, st = ranges[-1]
            if st != 1:
                raise Keep(sel.producer, f"a strided slice {a}:{b}:{st} of its channels")
            lo, hi = int(np.searchsorted(sel.keep, a)), int(np.searchsorted(sel.keep, b))
            if lo == hi:
                raise Keep(sel.producer, f"a slice {a}:{b} of its channels with none of them kept")
            fill = sel.fill[tuple(slice(s, e, t) for s, e, t in ranges[1:])]
            keep = sel.keep[lo:hi] - a
            sel = None if keep.size == b - a else Sel(keep, fill, sel.producer)
            phys[-1] = (lo, hi, 1)
        axes = [k for k in range(1, nd) if ranges[k] != (0, x.shape[k], 1)]
        src = x.src if ranges[-1] == (0, x.shape[-1], 1) else None  # channel indices are no longer x.src's
        if not axes:
            return Act(x.name, shape, x.nchw, sel, src)
        g = self.g
        pick = [phys[k] for k in axes]
        ins = [x.name] + [g.const(np.array(v, np.int64), h) for v, h in
                          (([p[0] for p in pick], "starts"), ([p[1] for p in pick], "ends"),
                           ([self._phys_axis(x, k) for k in axes], "axes"), ([p[2] for p in pick], "steps"))]
        return Act(g.node("Slice", ins), shape, x.nchw, sel, src)

    def op_slice(self, eqn, x):
        p = eqn.params
        strides = p["strides"] or (1,) * len(x.shape)
        ranges = [(int(s), int(e), int(t)) for s, e, t in zip(p["start_indices"], p["limit_indices"], strides)]
        return self._slice(x, ranges, tuple(eqn.outvars[0].aval.shape))

    def op_split(self, eqn, x):
        axis = int(eqn.params["axis"])
        outs, start = [], 0
        for v, size in zip(eqn.outvars, eqn.params["sizes"]):
            ranges = [(0, d, 1) for d in x.shape]
            ranges[axis] = (start, start + int(size), 1)
            outs.append(self._slice(x, ranges, tuple(v.aval.shape)))
            start += int(size)
        return outs

