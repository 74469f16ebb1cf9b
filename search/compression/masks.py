"""Pruning masks from the pretrained weights and a plan whose ratio and granularity are traced.

Computed once per trial (a rank by argsort, i.e. top-k with a traced count, not a sort per
step) and then fixed during fine-tuning, or, with gradual pruning, recomputed from the current
weights a few times at a rising share of the ratio (search.engine.schedule). All three
granularities are computed and one is selected by the plan, so one compiled function serves
every plan.

Counts (the cost model and the exporter can rely on them, see `pruned_counts`):
- unstructured: round(ratio * n) weights with the smallest |w|, at most n - 1;
- channel: round(ratio * C) output channels with the smallest L1 norm, at most C - 1;
- N:M: round(ratio * M) of every M consecutive fan-in weights (M = NM_GROUP), at most M - 1.
A layer always keeps something, so no plan disconnects the network.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from search.compression.groups import group_members, tie_plan
from search.compression.layers import Layer, get_path
from search.compression.plan import CHANNEL, NM, NM_GROUP, Plan


def _count(ratio: jax.Array, n: int) -> jax.Array:
    """How many of n to prune: round(ratio * n), kept in [0, n - 1]."""
    return jnp.clip(jnp.round(ratio * n), 0, max(n - 1, 0)).astype(jnp.int32)


def _ranks(v: jax.Array, axis: int = -1) -> jax.Array:
    """Rank of every element along `axis` (0 = smallest; ties broken by position)."""
    order = jnp.argsort(v, axis=axis, stable=True)
    return jnp.argsort(order, axis=axis, stable=True)


def _small_ranks(a: jax.Array) -> jax.Array:
    """`_ranks(a, axis=-1)` for a short last axis by pairwise comparisons: elementwise code
    that fuses, where two argsorts per layer compiled as sorts."""
    m = a.shape[-1]
    ai, aj = a[..., :, None], a[..., None, :]
    before = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # [i, j]: j comes before i
    return jnp.sum((aj < ai) | ((aj == ai) & before), axis=-1)


def unstructured_mask(w: jax.Array, ratio: jax.Array) -> jax.Array:
    """Keep all but the round(ratio * n) smallest-magnitude weights (exact count)."""
    ranks = _ranks(jnp.abs(w).ravel()).reshape(w.shape)
    return (ranks >= _count(ratio, w.size)).astype(w.dtype)


def channel_mask(w: jax.Array, ratio: jax.Array) -> jax.Array:
    """Prune whole output channels (last axis) with the smallest L1 norm."""
    norms = jnp.abs(w).reshape(-1, w.shape[-1]).sum(axis=0)
    keep = _ranks(norms) >= _count(ratio, w.shape[-1])
    return jnp.broadcast_to(keep, w.shape).astype(w.dtype)


def nm_mask(w: jax.Array, ratio: jax.Array, m: int = NM_GROUP) -> jax.Array:
    """In every group of m consecutive fan-in weights, prune the round(ratio * m) smallest.

    The fan-in (all axes but the last, flattened in order) is padded to a multiple of m
    with +inf magnitudes, which are never pruned.
    """
    out = w.shape[-1]
    a = jnp.abs(w).reshape(-1, out).T  # [out, fan_in]
    fan_in = a.shape[1]
    pad = (-fan_in) % m
    a = jnp.pad(a, ((0, 0), (0, pad)), constant_values=jnp.inf).reshape(out, -1, m)
    keep = _small_ranks(a) >= _count(ratio, m)
    keep = keep.reshape(out, -1)[:, :fan_in].T.reshape(w.shape)
    return keep.astype(w.dtype)


def layer_mask(w: jax.Array, ratio: jax.Array, granularity: jax.Array) -> jax.Array:
    """The mask of one kernel for a traced ratio and granularity code."""
    u, c, n = unstructured_mask(w, ratio), channel_mask(w, ratio), nm_mask(w, ratio)
    return jnp.where(granularity == CHANNEL, c, jnp.where(granularity == NM, n, u))


def compute_masks(params: Any, layers: Sequence[Layer], plan: Plan) -> dict[str, jax.Array]:
    """{layer.name: 0/1 mask shaped like its kernel} for one plan of shape [L].

    The plan is first tied to the channel groups (`groups.tie_plan`: one ratio and
    granularity per group). Channel pruning ranks a group's channels by their L1 norms summed
    over every member (DepGraph's group importance, with L1 in place of its L2), so every
    member of a group (a residual stage, a conv and the depthwise conv after it) loses the
    same channels. Otherwise the same masks as `layer_mask` per layer, but the unstructured
    and channel ranks of all layers come from one sort each (keyed by layer, then magnitude;
    stable, so ties go by position as in `_ranks`): two argsorts per layer and granularity
    made most of the compiled code.
    """
    plan = tie_plan(plan, layers)
    ws = [get_path(params, l.path)["kernel"] for l in layers]
    ratios = [plan.ratio[l.index] for l in layers]
    unstructured = _grouped_keep([jnp.abs(w).ravel() for w in ws], ratios)
    norms = [jnp.abs(w).reshape(-1, w.shape[-1]).sum(axis=0) for w in ws]
    for members in group_members(layers).values():
        if len(members) > 1:
            total = sum(norms[i] for i in members)
            for i in members:
                norms[i] = total
    channels = _grouped_keep(norms, ratios)
    out = {}
    for l, w, r, u, c in zip(layers, ws, ratios, unstructured, channels):
        u = u.reshape(w.shape).astype(w.dtype)
        c = jnp.broadcast_to(c, w.shape).astype(w.dtype)
        g = plan.granularity[l.index]
        out[l.name] = jnp.where(g == CHANNEL, c, jnp.where(g == NM, nm_mask(w, r), u))
    return out


def _grouped_keep(values: Sequence[jax.Array], ratios: Sequence[jax.Array]) -> list[jax.Array]:
    """For each 1-d array, `_ranks(v) >= _count(ratio, v.size)`, from one sort of them all."""
    sizes = [int(v.size) for v in values]
    group = jnp.concatenate([jnp.full((n,), i, jnp.int32) for i, n in enumerate(sizes)])
    start = jnp.concatenate([jnp.full((n,), sum(sizes[:i]), jnp.int32) for i, n in enumerate(sizes)])
    count = jnp.concatenate([jnp.full((n,), _count(r, n)) for r, n in zip(ratios, sizes)])
    pos = jnp.arange(sum(sizes), dtype=jnp.int32)
    _, _, order = jax.lax.sort((group, jnp.concatenate(values), pos), num_keys=2, is_stable=True)
    # sorted by group first, so sorted position p belongs to the group laid out at p
    keep = jnp.zeros(pos.shape, bool).at[order].set(pos - start >= count, unique_indices=True)
    out, at = [], 0
    for n in sizes:
        out.append(keep[at:at + n])
        at += n
    return out


def pruned_counts(layers: Sequence[Layer], plan: Plan) -> np.ndarray:
    """Weights removed per layer ([..., L] int), exactly as `compute_masks` removes them
    (from a layer's own kernel; the fan-in rows its producers' channel pruning removes are
    the cost model's and the size breakdown's business)."""
    plan = tie_plan(plan, layers)
    ratio = np.asarray(plan.ratio, np.float32)
    gran = np.asarray(plan.granularity)
    out = np.zeros(ratio.shape, np.int64)
    for l in layers:
        r = ratio[..., l.index]
        n = l.weight_count
        cnt = lambda k: np.clip(np.round(r * np.float32(k)), 0, max(k - 1, 0)).astype(np.int64)
        groups_full, rest = divmod(l.fan_in, NM_GROUP)
        nm = l.out_channels * (groups_full * cnt(NM_GROUP) + (np.minimum(cnt(NM_GROUP), rest) if rest else 0))
        g = gran[..., l.index]
        out[..., l.index] = np.where(g == CHANNEL, cnt(l.out_channels) * l.fan_in,
                                     np.where(g == NM, nm, cnt(n)))
    return out
