"""Compression as a pure function: (params, masks, plan, quant state) -> effective params,
plus the activation quantization that runs on the input of every Dense/Conv.

Per-layer choices are read from the plan arrays inside the trace (`jnp.where` between float,
uniform and binary, a `lax.cond` for the codebook), so a single compiled function serves
every plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp

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
    act_lo: jax.Array  # [L] calibrated minimum of each layer's input
    act_hi: jax.Array  # [L] calibrated maximum of each layer's input


def weight_branch(bits: jax.Array, mode: jax.Array) -> jax.Array:
    """The weight transform of a layer: codebook needs bits <= 8, else uniform rules apply."""
    return jnp.where(bits >= FLOAT, W_FLOAT, jnp.where(
        (mode == CODEBOOK) & (bits <= 8), W_CODEBOOK, jnp.where(bits == 1, W_BINARY, W_UNIFORM)))


def effective_kernel(w, mask, centroids, assign, bits, mode) -> jax.Array:
    """The kernel a layer computes with: masked, then quantized as the plan says (STE).

    Float, uniform and binary are one elementwise expression picked by `jnp.where` (a few
    fused loops over a small kernel); only the codebook (a gather, and a scatter-add in the
    backward pass) sits behind a `lax.cond`. Four `lax.switch` branches per layer compiled
    in about twice the time and ran no faster.
    """
    def direct():
        wm = w * mask
        w_hat = jnp.where(bits >= FLOAT, wm, jnp.where(bits == 1, quant.binary_weight(wm),
                                                       quant.uniform_weight(wm, bits)))
        return quant.ste(wm, w_hat)

    def shared():
        return codebook.codebook_weight(centroids, assign, mask)

    return jax.lax.cond(weight_branch(bits, mode) == W_CODEBOOK, shared, direct)


def effective_params(params: Any, masks: dict, centroids: dict, qstate: QuantState,
                     layers: Sequence[Layer], plan: Plan) -> Any:
    """The params tree with every kernel replaced by its compressed version (plan of shape [L])."""
    out = params
    for l in layers:
        node = get_path(params, l.path)
        k = effective_kernel(node["kernel"], masks[l.name], centroids[l.name], qstate.assign[l.name],
                             plan.weight_bits[l.index], plan.quant_mode[l.index])
        out = set_path(out, l.path, {**node, "kernel": k})
    return out


def quantized_apply(model: Model, layers: Sequence[Layer], params: Any, act_lo: jax.Array,
                    act_hi: jax.Array, act_bits: jax.Array, x: jax.Array) -> jax.Array:
    """Run the model with the input of every layer fake-quantized to its act_bits."""
    index = {l.path: l.index for l in layers}

    def around(path, call, v):
        i = index.get(path)
        if i is None:
            return call(v)
        # a where, not a cond: FLOAT passes x through exactly (fake_quant_act selects it), and
        # the elementwise quantization fuses with its neighbours instead of compiling branches
        return call(quant.fake_quant_act(v, act_lo[i], act_hi[i], act_bits[i]))

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
