"""Compression as a pure function: (params, masks, plan, quant state) -> effective params,
plus the activation quantization that runs on the input of every Dense/Conv.

Per-layer choices are read from the plan arrays inside the trace (`jnp.where` between float,
uniform and 1-bit kernels, a `lax.cond` for the codebook; the gradient is a straight-through
custom VJP), so a single compiled function serves every plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from search import codebook, quant
from search.layers import Layer, Model, get_path, set_path
from search.plan import CODEBOOK, FLOAT, Plan

# weight transform codes picked per layer by `weight_branch`
W_FLOAT, W_UNIFORM, W_BINARY, W_CODEBOOK = 0, 1, 2, 3


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantState:
    """What a trial fixes before fine-tuning, besides the masks."""

    assign: dict[str, jax.Array]  # codebook index per weight (int32, like the kernel)
    bin_scale: dict[str, jax.Array]  # [C] scale of a 1-bit kernel per output channel (`binary_scales`)
    act_lo: jax.Array  # [L] calibrated minimum of each layer's input
    act_hi: jax.Array  # [L] calibrated maximum of each layer's input


def weight_branch(bits: jax.Array, mode: jax.Array) -> jax.Array:
    """The weight transform of a layer: codebook needs bits <= 8, else uniform rules apply."""
    return jnp.where(bits >= FLOAT, W_FLOAT, jnp.where(
        (mode == CODEBOOK) & (bits <= 8), W_CODEBOOK, jnp.where(bits == 1, W_BINARY, W_UNIFORM)))


def binary_scales(ws: Sequence[jax.Array]) -> list[jax.Array]:
    """[C] per kernel: the mean |w| of each output channel's non-zero weights (1-bit weights).

    Computed once per trial from the masked pretrained kernels and fixed while fine-tuning,
    so the step's 1-bit kernel is one elementwise sign; for all layers in one pass over the
    concatenated kernels (a reduction per layer was a sizeable part of the engine's compile).
    """
    chans = [w.shape[-1] for w in ws]
    offset = np.cumsum([0] + chans[:-1])
    v = jnp.concatenate([jnp.abs(w).ravel() for w in ws])
    seg = jnp.concatenate([jnp.broadcast_to(jnp.arange(c) + o, w.shape).ravel()
                           for w, c, o in zip(ws, chans, offset)])
    total = jax.ops.segment_sum(v, seg, sum(chans))
    count = jax.ops.segment_sum((v != 0).astype(v.dtype), seg, sum(chans))
    scale = total / jnp.maximum(count, 1.0)
    return [scale[o:o + c] for c, o in zip(chans, offset)]


def _kernel_forward(w, mask, centroids, assign, bin_scale, bits, mode) -> jax.Array:
    """The value of the effective kernel. w is already masked; only the codebook, whose
    centroids are not zero, needs the mask. Float, uniform and 1-bit are one elementwise
    expression (and the uniform scale's reduction); the codebook's gather sits behind a
    `lax.cond`, so a layer runs only one of the two."""
    def direct(w, mask, centroids, assign, bin_scale, bits):
        u = quant.uniform_weight(w, bits)
        return jnp.where(bits >= FLOAT, w, jnp.where(bits == 1, jnp.sign(w) * bin_scale, u))

    def shared(w, mask, centroids, assign, bin_scale, bits):
        return codebook.codebook_weight(centroids, assign, mask)

    return jax.lax.cond(weight_branch(bits, mode) == W_CODEBOOK, shared, direct,
                        w, mask, centroids, assign, bin_scale, bits)


@jax.custom_vjp
def effective_kernels(ws, masks, centroids, assigns, bin_scales, bits, mode) -> list[jax.Array]:
    """The kernels the layers compute with (lists over layers; centroids [L, SLOTS], bits and
    mode [L]), quantized as the plan says. The kernels ws must already be masked (pruned
    weights exactly 0): the engine masks them once per trial and again after every optimizer
    update, so the hot path reads each mask once per step instead of once per use.

    Gradients are the straight-through estimator's, written out as a custom VJP: a kernel gets
    its output gradient as is (zero for a codebook layer; the engine's re-masking keeps pruned
    weights at 0), a codebook's centroids get the sum of their unpruned weights' gradients
    (Deep Compression), for all layers in one scatter behind one `lax.cond` that plans
    without a codebook skip. Differentiating through the branches instead made JAX carry
    every branch's residuals through a conditional per layer and direction, which cost more
    per step than the quantization itself.
    """
    return [_kernel_forward(w, m, centroids[i], a, s, bits[i], mode[i])
            for i, (w, m, a, s) in enumerate(zip(ws, masks, assigns, bin_scales))]


def _kernels_fwd(ws, masks, centroids, assigns, bin_scales, bits, mode):
    out = effective_kernels(ws, masks, centroids, assigns, bin_scales, bits, mode)
    return out, (masks, assigns, bits, mode, centroids.shape)


def _centroid_grads(gs, masks, assigns, is_cb, shape):
    """[L, SLOTS]: per layer, the sum of the masked gradients of the weights at each slot."""
    n, slots = shape
    g = jnp.concatenate([(g * m).ravel() for g, m in zip(gs, masks)])
    at = jnp.concatenate([(a + i * slots).ravel() for i, a in enumerate(assigns)])
    table = jnp.zeros(n * slots, g.dtype).at[at].add(g).reshape(n, slots)
    return jnp.where(is_cb[:, None], table, 0.0)


def _kernels_bwd(res, gs):
    masks, assigns, bits, mode, shape = res
    is_cb = weight_branch(bits, mode) == W_CODEBOOK  # [L]
    # the masked products are formed inside the cond, not before it: an operand of the cond
    # would be written out in full, where the kernels' gradients fuse into the optimizer
    g_cent = jax.lax.cond(jnp.any(is_cb), lambda gs, ms, as_: _centroid_grads(gs, ms, as_, is_cb, shape),
                          lambda gs, ms, as_: jnp.zeros(shape, gs[0].dtype), list(gs), list(masks), list(assigns))
    g_ws = [jnp.where(is_cb[i], 0.0, g) for i, g in enumerate(gs)]
    return g_ws, None, g_cent, None, None, None, None


effective_kernels.defvjp(_kernels_fwd, _kernels_bwd)


def effective_params(params: Any, masks: dict, centroids: jax.Array, qstate: QuantState,
                     layers: Sequence[Layer], plan: Plan) -> Any:
    """The params tree with every kernel replaced by its compressed version (plan of shape
    [L], centroids [L, SLOTS] in layer order)."""
    nodes = [get_path(params, l.path) for l in layers]
    ks = effective_kernels([n["kernel"] for n in nodes], [masks[l.name] for l in layers], centroids,
                           [qstate.assign[l.name] for l in layers], [qstate.bin_scale[l.name] for l in layers],
                           plan.weight_bits, plan.quant_mode)
    out = params
    for l, node, k in zip(layers, nodes, ks):
        out = set_path(out, l.path, {**node, "kernel": k})
    return out


def quantized_apply(model: Model, layers: Sequence[Layer], params: Any, act_lo: jax.Array,
                    act_hi: jax.Array, act_bits: jax.Array, x: jax.Array) -> jax.Array:
    """Run the model with the input of every layer fake-quantized to its act_bits."""
    index = {l.path: l.index for l in layers}
    # every layer's grid at once ([L] each): per-layer scalar arithmetic compiled as a small
    # kernel of its own per layer
    s, z, levels = quant.act_qparams(act_lo, act_hi, act_bits)
    is_float = act_bits >= FLOAT

    def around(path, call, v):
        i = index.get(path)
        if i is None:
            return call(v)
        # a where, not a cond: FLOAT passes x through exactly, and the elementwise
        # quantization fuses with its neighbours instead of compiling branches
        return call(quant.fake_quant_act_grid(v, s[i], z[i], levels[i], is_float[i]))

    return model.apply(params, x, around)


def calibrate_ranges(model: Model, layers: Sequence[Layer], params: Any, x: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """([L] min, [L] max) of every layer's input over the batch x (float activations)."""
    index = {l.path: l.index for l in layers}
    lo = [jnp.inf] * len(layers)
    hi = [-jnp.inf] * len(layers)

    def around(path, call, v):
        i = index.get(path)
        if i is not None:
            lo[i] = jnp.minimum(lo[i], jnp.min(v))
            hi[i] = jnp.maximum(hi[i], jnp.max(v))
        return call(v)

    model.apply(params, x, around)
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in lo]), jnp.stack([jnp.asarray(v, jnp.float32) for v in hi])
