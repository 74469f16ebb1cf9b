"""Deep Compression's trained quantization: 2**bits shared values per layer.

k-means over the layer's unpruned weights with linear initialisation (evenly spaced between
min and max, which Han et al. found best because it keeps the rare large weights). The
assignment of each weight is then fixed and the centroids are fine-tuned by the sum of the
gradients of their weights, which is what the gather's backward pass computes.

Bits are traced: every codebook has SLOTS entries and the ones beyond 2**bits are inactive
(never assigned, held at 0), so one compiled function serves every bit width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SLOTS = 256  # codebook entries allocated per layer: 2**8, the widest codebook


def active_slots(bits: jax.Array) -> jax.Array:
    """Number of centroids in use: 2**bits, capped at SLOTS."""
    return jnp.left_shift(jnp.int32(1), jnp.clip(jnp.asarray(bits, jnp.int32), 0, 8))


def kmeans_codebook(w: jax.Array, mask: jax.Array, bits: jax.Array, iters: int = 15
                    ) -> tuple[jax.Array, jax.Array]:
    """(centroids [SLOTS], assignment int32 like w) from Lloyd's k-means on unpruned weights."""
    cents, (assign,) = kmeans_codebooks([w], [mask], jnp.reshape(bits, (1,)), iters)
    return cents[0], assign


def kmeans_codebooks(ws, masks, bits: jax.Array, iters: int = 15) -> tuple[jax.Array, list[jax.Array]]:
    """`kmeans_codebook` for L kernels in one loop: (centroids [L, SLOTS], [assignment like w]).

    The kernels are concatenated and every layer's codebook is a row of one [L, SLOTS] table,
    so the compiled loop does not grow with the number of layers (one loop per layer made
    k-means most of the engine's compile time).
    """
    L = len(ws)
    v = jnp.concatenate([w.ravel() for w in ws])
    keep = jnp.concatenate([m.ravel() for m in masks]) > 0
    seg = jnp.concatenate([jnp.full((w.size,), i, jnp.int32) for i, w in enumerate(ws)])
    weight = keep.astype(v.dtype)
    n = active_slots(bits)  # [L]
    active = jnp.arange(SLOTS)[None, :] < n[:, None]  # [L, SLOTS]
    has = jax.ops.segment_sum(weight, seg, L) > 0  # a layer with every weight pruned: range [0, 0]
    lo = jnp.where(has, jax.ops.segment_min(jnp.where(keep, v, jnp.inf), seg, L), 0.0)
    hi = jnp.where(has, jax.ops.segment_max(jnp.where(keep, v, -jnp.inf), seg, L), 0.0)
    step = (hi - lo) / jnp.maximum(n - 1, 1).astype(v.dtype)
    c0 = jnp.where(active, lo[:, None] + step[:, None] * jnp.arange(SLOTS), jnp.inf)
    base = seg * SLOTS

    def assign(c):
        mid = 0.5 * (c[:, :-1] + c[:, 1:])
        mid = jnp.concatenate([mid, jnp.full((L, 1), jnp.inf, mid.dtype)], axis=1).ravel()
        return base + _search(mid, base, v)

    def lloyd(i, carry):
        c, _ = carry
        a = assign(c)
        sums = jax.ops.segment_sum(v * weight, a, L * SLOTS).reshape(L, SLOTS)
        counts = jax.ops.segment_sum(weight, a, L * SLOTS).reshape(L, SLOTS)
        new = jnp.sort(jnp.where(active & (counts > 0), sums / jnp.maximum(counts, 1.0), c), axis=1)
        return jnp.where(i < iters, new, c), a  # the last pass only assigns

    c, a = jax.lax.fori_loop(0, iters + 1, lloyd, (c0, jnp.zeros(v.shape, jnp.int32)))
    a = a - base
    out, start = [], 0
    for w in ws:
        out.append(a[start:start + w.size].reshape(w.shape))
        start += w.size
    return jnp.where(active, c, 0.0), out


def _search(mid: jax.Array, base: jax.Array, values: jax.Array) -> jax.Array:
    """Branchless binary search of each value in its own row (offset `base`) of SLOTS midpoints."""
    idx = jnp.zeros(values.shape, jnp.int32)
    step = SLOTS // 2
    while step:
        idx = jnp.where(mid[base + idx + step - 1] < values, idx + step, idx)
        step //= 2
    return idx


def codebook_weight(centroids: jax.Array, assign: jax.Array, mask: jax.Array) -> jax.Array:
    """The kernel the layer computes with: its centroid per weight, pruned weights exactly 0."""
    return jnp.take(centroids, assign) * mask
