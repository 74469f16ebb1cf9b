"""Compression as a pure function: (params, masks, plan, quant state) -> effective params,
plus the activation quantization that runs on the input of every Dense/Conv.

Per-layer choices are read from the plan arrays inside the trace (`jnp.where` between float,
uniform, 1-bit and codebook kernels; the gradient is a straight-through custom VJP), so a
single compiled function serves every plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from search.compression import codebook
from search.compression import lowrank
from search.compression import quant
from search.compression.layers import Layer, Model, get_path, set_path
from search.compression.plan import CODEBOOK, FLOAT, FORMS, Plan

# weight transform codes picked per layer by `weight_branch`
W_FLOAT, W_UNIFORM, W_BINARY, W_CODEBOOK = 0, 1, 2, 3


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantState:
    """What a trial fixes before fine-tuning, besides the masks."""

    assign: dict[str, jax.Array]  # codebook index per weight (int32, like the kernel)
    w_scale: dict[str, jax.Array]  # [C] weight scale per output channel, fixed per trial (`weight_scales`)
    act_lo: jax.Array  # [L] calibrated minimum of each layer's input
    act_hi: jax.Array  # [L] calibrated maximum of each layer's input


def weight_branch(bits: jax.Array, mode: jax.Array) -> jax.Array:
    """The weight transform of a layer: codebook needs bits <= 8, else uniform rules apply."""
    return jnp.where(bits >= FLOAT, W_FLOAT, jnp.where(
        (mode == CODEBOOK) & (bits <= 8), W_CODEBOOK, jnp.where(bits == 1, W_BINARY, W_UNIFORM)))


def weight_scales(ws: Sequence[jax.Array], bits: jax.Array) -> list[jax.Array]:
    """[C] per kernel: the scale of each output channel's quantization grid, fixed for a trial.

    Uniform b >= 2: max|w| / B (`quant.weight_bound`), as `quant.uniform_weight`; 1 bit: the mean |w|
    of the channel's non-zero weights, as `quant.binary_weight`; float and codebook layers
    do not use it. Computed once per trial from the masked pretrained kernels, for all layers
    in one pass over the concatenated kernels, and kept while fine-tuning (static encodings,
    as AIMET's quantization-aware training keeps them): the step then quantizes a kernel with
    one elementwise expression, where a reduction and a scale per layer and step were a fifth
    of its compiled kernels. A fine-tuned weight beyond the grid clips to its end; the
    exporter packs with these scales (`CompressedModel.weight_scales`).
    """
    chans = [w.shape[-1] for w in ws]
    offset = np.cumsum([0] + chans[:-1])
    v = jnp.concatenate([jnp.abs(w).ravel() for w in ws])
    seg = jnp.concatenate([jnp.broadcast_to(jnp.arange(c) + o, w.shape).ravel()
                           for w, c, o in zip(ws, chans, offset)])
    n = sum(chans)
    total = jax.ops.segment_sum(v, seg, n)
    count = jax.ops.segment_sum((v != 0).astype(v.dtype), seg, n)
    amax = jax.ops.segment_max(v, seg, n)
    b = jnp.concatenate([jnp.full((c,), bits[i]) for i, c in enumerate(chans)])
    scale = jnp.where(b == 1, total / jnp.maximum(count, 1.0), quant.scale_from_amax(amax, quant.weight_bound(b)))
    return [scale[o:o + c] for c, o in zip(chans, offset)]


def _kernel_forward(w, scale, qmax, bits, keep) -> jax.Array:
    """The value of the effective kernel (w already masked), one elementwise expression on
    the trial's fixed scale. `keep`: float, or a codebook layer, whose kernel already holds
    its centroids (see `effective_kernels`) and so computes with w as a float one does."""
    return jnp.where(keep, w, jnp.where(bits == 1, jnp.sign(w) * scale, quant.on_grid(w, scale, qmax)))


@jax.custom_vjp
def effective_kernels(ws, masks, assigns, scales, bits, mode, any_codebook=None) -> list[jax.Array]:
    """The kernels the layers compute with (lists over layers; bits and mode [L]), quantized
    as the plan says. The kernels ws must already be masked (pruned weights exactly 0): the
    engine masks them once per trial and again after every optimizer update, so the hot path
    reads each mask once per step instead of once per use.

    A codebook layer keeps its codebook in the kernel itself: the engine sets every weight to
    its centroid once per trial, and the gradient below gives every weight of a cluster the
    sum of the cluster's gradients (Deep Compression's centroid gradient). The optimizer is
    elementwise, so equal weights with equal gradients stay equal: the kernel remains
    2**bits shared values and each cluster moves exactly as its centroid would. The forward
    pass then needs no gather and no branch, only plans with a codebook pay for one.

    Gradients are the straight-through estimator's, written out as a custom VJP: a kernel gets
    its output gradient as is (the re-masking keeps pruned weights at 0); codebook layers get
    their cluster sums, for all layers in one scatter and gather behind one `lax.cond` that
    plans without a codebook skip. Differentiating through per-layer branches instead made
    JAX carry every branch's residuals through a conditional per layer and direction, which
    cost more per step than the quantization itself.

    `any_codebook` (a scalar bool, or None: this plan's layers decide): whether the cluster sums
    are computed at all. Under `vmap` over plans a predicate that differs per plan turns the
    `lax.cond` into a select, so every plan paid for the scatter-add (K times the kernels'
    size into K * L * SLOTS bins); the engine passes one flag for its whole group of K plans,
    unbatched, and a group without codebook plans skips it.
    """
    keep = (bits >= FLOAT) | (weight_branch(bits, mode) == W_CODEBOOK)  # [L], for all layers at once
    qmax = quant.weight_qmax(bits)
    return [_kernel_forward(w, s, qmax[i], bits[i], keep[i]) for i, (w, s) in enumerate(zip(ws, scales))]


def _kernels_fwd(ws, masks, assigns, scales, bits, mode, any_codebook=None):
    return effective_kernels(ws, masks, assigns, scales, bits, mode), (masks, assigns, bits, mode, any_codebook)


def _cluster_grads(gs, masks, assigns, is_cb):
    """Per kernel: for a codebook layer, each unpruned weight's cluster sum of the masked
    gradients (one scatter-add into an [L * SLOTS] table and one gather back); else as is."""
    slots = codebook.SLOTS
    at = [a + i * slots for i, a in enumerate(assigns)]
    g = jnp.concatenate([(g * m).ravel() for g, m in zip(gs, masks)])
    table = jnp.zeros(len(gs) * slots, g.dtype).at[jnp.concatenate([a.ravel() for a in at])].add(g)
    return [jnp.where(is_cb[i], table[a] * m, g) for i, (g, m, a) in enumerate(zip(gs, masks, at))]


def _kernels_bwd(res, gs):
    masks, assigns, bits, mode, any_codebook = res
    is_cb = weight_branch(bits, mode) == W_CODEBOOK  # [L]
    use = jnp.any(is_cb) if any_codebook is None else any_codebook
    g_ws = jax.lax.cond(use, lambda gs, ms, as_: _cluster_grads(gs, ms, as_, is_cb),
                        lambda gs, ms, as_: gs, list(gs), list(masks), list(assigns))
    return g_ws, None, None, None, None, None, None


effective_kernels.defvjp(_kernels_fwd, _kernels_bwd)


def codebook_kernels(ws, masks, centroids: jax.Array, assigns, use: jax.Array) -> list[jax.Array]:
    """The kernels with every codebook layer's weights set to their centroids (centroids
    [L, SLOTS], use [L]: the layers that use a codebook), pruned weights 0."""
    return [jnp.where(use[i], codebook.codebook_weight(centroids[i], a, m), w)
            for i, (w, m, a) in enumerate(zip(ws, masks, assigns))]


def effective_params(params: Any, masks: dict, qstate: QuantState, layers: Sequence[Layer],
                     plan: Plan, any_codebook: jax.Array | None = None, bases: dict | None = None,
                     any_lowrank: jax.Array | None = None) -> Any:
    """The params tree with every kernel replaced by its compressed version (plan of shape [L]);
    `any_codebook`: see `effective_kernels`.

    `bases` ({lowrank.basis_key(layer, form): Q_m [d, d]}, `lowrank.masked_basis` of the plan's
    rank): a layer whose plan.rank < 1 computes, in its plan.form, with its rank-r projection
    A @ B, factors fake-quantized at its weight bits (`lowrank.project`), then masked (channel
    pruning zeroes B's columns); its product is not quantized again. `any_lowrank` (bool [F],
    F = len(plan.FORMS), or None: this plan decides): whether any plan of the engine's group
    factorizes a layer in each form; unbatched flags, so that a group skips the projections of
    the forms none of its plans use (a `lax.cond` per form, as `any_codebook`)."""
    nodes = [get_path(params, l.path) for l in layers]
    ws = [n["kernel"] for n in nodes]
    ms = [masks[l.name] for l in layers]
    bits = plan.weight_bits
    if bases:
        fact = plan.rank < 1  # [L]
        use = lowrank_flags(plan) if any_lowrank is None else any_lowrank
        for f in FORMS.values():
            fl = [l for l in layers if lowrank.basis_key(l.name, f) in bases]
            if not fl:
                continue

            def projected(ws, f=f, fl=fl):
                out = list(ws)
                for l in fl:
                    k, _, _ = lowrank.project(ws[l.index], bases[lowrank.basis_key(l.name, f)], bits[l.index], l, f)
                    on = fact[l.index] & (plan.form[l.index] == f)
                    out[l.index] = jnp.where(on, k * ms[l.index], ws[l.index])
                return out

            ws = jax.lax.cond(use[f], projected, lambda ws: list(ws), ws)
        # the factors are quantized already: the product passes through as a float kernel
        bits = jnp.where(fact, FLOAT, bits)
    ks = effective_kernels(ws, ms, [qstate.assign[l.name] for l in layers], [qstate.w_scale[l.name] for l in layers],
                           bits, plan.quant_mode, any_codebook)
    out = params
    for l, node, k in zip(layers, nodes, ks):
        out = set_path(out, l.path, {**node, "kernel": k})
    return out


def lowrank_flags(plans: Plan) -> jax.Array:
    """bool [F]: whether any of the plans ([L] or [K, L]) factorizes a layer in each form
    (plan.FORMS codes); unbatched, for `effective_params`' per-form conditionals."""
    fact = plans.rank < 1
    return jnp.stack([jnp.any(fact & (plans.form == f)) for f in FORMS.values()])


def quantized_apply(model: Model, layers: Sequence[Layer], params: Any, act_lo: jax.Array,
                    act_hi: jax.Array, act_bits: jax.Array, x: jax.Array, bn: Any = None,
                    learned: bool = False) -> jax.Array:
    """Run the model with the input of every layer fake-quantized to its act_bits (`bn`: the
    BatchNorm statistics to use, Model.apply). `learned`: the ranges are trained, so they get
    gradients (quant.fake_quant_act_learned, LSQ); the values are the same either way."""
    index = {l.path: l.index for l in layers}
    if learned:
        def around_learned(path, call, v):
            i = index.get(path)
            return call(v if i is None else quant.fake_quant_act_learned(v, act_lo[i], act_hi[i], act_bits[i]))

        return model.apply(params, x, around_learned, bn=bn)
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

    return model.apply(params, x, around, bn=bn)


def calibrate_ranges(model: Model, layers: Sequence[Layer], params: Any, x: jax.Array, bn: Any = None
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

    model.apply(params, x, around, bn=bn)
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in lo]), jnp.stack([jnp.asarray(v, jnp.float32) for v in hi])
