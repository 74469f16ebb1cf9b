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


def assign_nearest(values: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the nearest centroid; centroids sorted ascending, inactive ones +inf at the end.

    A branchless binary search over the SLOTS - 1 midpoints (8 gathers): it compiles in a
    fraction of jnp.searchsorted's time and runs faster on CPU.
    """
    mid = 0.5 * (centroids[:-1] + centroids[1:])
    mid = jnp.concatenate([mid, jnp.full((1,), jnp.inf, mid.dtype)])  # SLOTS entries
    idx = jnp.zeros(values.shape, jnp.int32)
    step = SLOTS // 2
    while step:
        idx = jnp.where(mid[idx + step - 1] < values, idx + step, idx)
        step //= 2
    return idx


def kmeans_codebook(w: jax.Array, mask: jax.Array, bits: jax.Array, iters: int = 15
                    ) -> tuple[jax.Array, jax.Array]:
    """(centroids [SLOTS], assignment int32 like w) from Lloyd's k-means on unpruned weights."""
    v = w.ravel()
    keep = mask.ravel() > 0
    weight = keep.astype(v.dtype)
    n = active_slots(bits)
    slot = jnp.arange(SLOTS)
    active = slot < n
    lo = jnp.min(jnp.where(keep, v, jnp.inf))
    hi = jnp.max(jnp.where(keep, v, -jnp.inf))
    lo, hi = jnp.where(jnp.any(keep), lo, 0.0), jnp.where(jnp.any(keep), hi, 0.0)
    step = (hi - lo) / jnp.maximum(n - 1, 1).astype(v.dtype)
    c0 = jnp.where(active, lo + step * slot, jnp.inf)

    def lloyd(_, c):
        a = assign_nearest(v, c)
        sums = jax.ops.segment_sum(v * weight, a, SLOTS)
        counts = jax.ops.segment_sum(weight, a, SLOTS)
        c = jnp.where(active & (counts > 0), sums / jnp.maximum(counts, 1.0), c)
        return jnp.sort(c)

    c = jax.lax.fori_loop(0, iters, lloyd, c0)
    assign = assign_nearest(v, c).reshape(w.shape)
    return jnp.where(active, c, 0.0), assign


def codebook_weight(centroids: jax.Array, assign: jax.Array, mask: jax.Array) -> jax.Array:
    """The kernel the layer computes with: its centroid per weight, pruned weights exactly 0."""
    return jnp.take(centroids, assign) * mask
