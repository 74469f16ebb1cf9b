"""Low-rank factorization by SVD as a per-layer plan choice (plan.rank, plan.form).

A factorizable layer's kernel, as a matrix M [fan_in, out] (a conv's [kh*kw*cin, cout]), is
replaced by a product A @ B of rank r: A [fan_in, r], B [r, out]. A Dense becomes two matmuls;
a kxk conv becomes r kxk filters followed by a 1x1 conv r -> cout, the "Weight SVD" form
(AIMET's name; Denton et al., NeurIPS 2014, "Exploiting Linear Structure Within Convolutional
Networks"; Jaderberg et al., BMVC 2014, "Speeding up Convolutional Neural Networks with Low
Rank Expansions"). The form code (plan.form, plan.FORMS) leaves room for the spatial (kx1 then
1xk) and Kronecker forms, which are not built yet.

One compile per study, with a traced rank: the SVD of every factorizable layer's pretrained
kernel is taken once per engine (`bases`), and its orthonormal basis Q [d, d] is kept on the
smaller side, d = min(fan_in, out): the right singular vectors V when out <= fan_in, else the
left ones U, ordered by singular value. A plan's rank ratio gives r = max(1, round(rank * d))
(`achieved_rank`) and the column mask m_j = [j < r]; Q_m = Q * m (`masked_basis`). The layer
then computes with (`project`)

    right side (out <= fan_in):  A = M @ Q_m  [fan_in, d],  B = Q_m^T     [d, out]
    left side  (out >  fan_in):  A = Q_m      [fan_in, d],  B = Q_m^T @ M [d, out]

and M_eff = A @ B = M Q_m Q_m^T (or Q_m Q_m^T M): a linear projection onto the top r singular
directions, so gradients flow to M without a straight-through estimator, and at r = d it is M
(Q Q^T = I; the engine skips it where rank is 1). The columns (rows) of A (B) past r are zero,
so the shapes never change with r. Fine-tuning trains M and so A (right side) or B (left side);
the basis stays the pretrained one. Quantization (weight_bits < 32) fake-quantizes both factors
(symmetric, per output column, scales from each step's max |value|, straight-through gradient:
`quant.fake_quant_weight`), never their product, so the product keeps rank r and the export can
write the pair. Channel pruning removes output channels, i.e. columns of B; unstructured and N:M
pruning, codebooks and depthwise or grouped convs do not combine with it (`check_plan`).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from search.compression import quant
from search.compression.groups import tie_plan
from search.compression.layers import Layer, get_path
from search.compression.plan import CHANNEL, CODEBOOK, FLOAT, FORMS

FORM_NAMES = {v: k for k, v in FORMS.items()}


def factorizable(layer: Layer) -> bool:
    """Whether the layer's kernel is one matrix [fan_in, out]: a Dense, or a conv with one group."""
    return layer.kind == "dense" or (layer.kind == "conv" and layer.groups == 1)


def full_rank(layer: Layer) -> int:
    """d = min(fan_in, out): the largest rank of the layer's kernel matrix."""
    return int(min(layer.fan_in, layer.out_channels))


def right_side(layer: Layer) -> bool:
    """True when the basis is the right singular vectors V [out, out] (out <= fan_in)."""
    return layer.out_channels <= layer.fan_in


def achieved_rank(rank: Any, d: Any, xp: Any = np) -> Any:
    """r = max(1, round(rank * d)), half up, in float32 (numpy or jax.numpy as `xp`), the rank
    the layer computes at: d at rank 1. Every count (engine, cost model, export) uses this."""
    v = xp.asarray(rank, xp.float32) * xp.asarray(d, xp.float32)
    return xp.clip(xp.floor(v + xp.float32(0.5)), 1, xp.asarray(d, xp.float32))


def bases(layers: Sequence[Layer], params: Any) -> dict[str, np.ndarray]:
    """{layer name: Q [d, d] float32} for every factorizable layer: the orthonormal singular
    vectors of its kernel matrix M [fan_in, out] on the smaller side (columns ordered by
    singular value, largest first). numpy's SVD, once per engine, on one BLAS thread: next to
    JAX's threads OpenBLAS's own spun, and the SVD of a 64x300 kernel took 0.6 s instead of 2 ms
    (2-core machine under load)."""
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for l in layers:
            if not factorizable(l):
                continue
            m = np.asarray(get_path(params, l.path)["kernel"], np.float64).reshape(-1, l.out_channels)
            u, _, vt = np.linalg.svd(m, full_matrices=False)  # u [fan_in, d], vt [d, out]
            out[l.name] = np.ascontiguousarray(vt.T if right_side(l) else u).astype(np.float32)
    return out


def masked_basis(q: jax.Array, rank: jax.Array) -> jax.Array:
    """Q_m = Q * [j < r] over its columns: the basis cut to the achieved rank of a traced ratio."""
    d = q.shape[-1]
    return q * (jnp.arange(d) < achieved_rank(rank, d, jnp)).astype(q.dtype)


def project(w: jax.Array, qm: jax.Array, bits: jax.Array, right: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(M_eff like w, A [fan_in, d], B [d, out]) of a kernel w and a masked basis qm [d, d]
    (`masked_basis`); A and B fake-quantized at `bits` (FLOAT: untouched)."""
    w2 = w.reshape(-1, w.shape[-1])
    a, b = (w2 @ qm, qm.T) if right else (qm, qm.T @ w2)
    a, b = quant.fake_quant_weight(a, bits), quant.fake_quant_weight(b, bits)
    return (a @ b).reshape(w.shape), a, b


def factors(w: np.ndarray, qm: np.ndarray, bits: int, right: bool, rank: float, mask: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """The pair a factorized layer is exported as: (A [fan_in, r], B [r, out]) float32, from the
    trained kernel w and its masked basis qm (`masked_basis`), as `project` computes them, in
    numpy (on the host, no compile); B's removed output channels (all-zero columns of `mask`,
    like w) set to 0."""
    w2 = np.asarray(w, np.float32).reshape(-1, np.shape(w)[-1])
    qm = np.asarray(qm, np.float32)
    a, b = (w2 @ qm, qm.T.copy()) if right else (qm.copy(), qm.T @ w2)
    a, b = _fake_quant_np(a, bits), _fake_quant_np(b, bits)
    r = int(achieved_rank(rank, qm.shape[-1]))
    a, b = a[:, :r], b[:r]
    if mask is not None:
        b = b * np.asarray(mask).reshape(-1, b.shape[1]).any(axis=0)
    return np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)


def _fake_quant_np(x: np.ndarray, bits: int) -> np.ndarray:
    """`quant.fake_quant_weight`'s values in numpy: per column, 1 bit sign * mean |nonzero|,
    b >= 2 the uniform grid max|x| / bound, FLOAT untouched."""
    bits = int(bits)
    if bits >= FLOAT:
        return x
    if bits == 1:
        n = np.maximum((x != 0).sum(axis=0), 1).astype(np.float32)
        return (np.sign(x) * (np.abs(x).sum(axis=0) / n)).astype(np.float32)
    amax = np.abs(x).max(axis=0)
    scale = np.where(amax > 0, amax / np.float32(max(quant.grid_bound(bits), 1.0)), np.float32(1.0)).astype(np.float32)
    qmax = np.float32((1 << (bits - 1)) - 1)
    return (np.clip(np.round(x / scale), -qmax, qmax) * scale).astype(np.float32)


def check_plan(plan: Any, layers: Sequence[Layer]) -> None:
    """ValueError (one line, naming the layer) when a rank lies outside (0, 1] or a plan
    factorizes a layer it cannot: a depthwise or grouped conv, a layer pruned weight by weight (unstructured or N:M at a
    ratio > 0, after its group's decision), or a codebook layer. Plans [L] or [K, L]."""
    rank = np.asarray(plan.rank)
    bad = ~(np.isfinite(rank) & (rank > 0) & (rank <= 1))
    if np.any(bad):
        i = int(np.argwhere(bad)[0][-1])
        name = layers[i].name if i < len(layers) else f"#{i}"
        raise ValueError(f"plan.rank of layer {name} is {rank[bad].ravel()[0]}; a rank ratio lies in (0, 1] (1 = not factorized)")
    tied = tie_plan(plan, layers)
    fact = rank < 1
    if not np.any(fact):
        return
    ratio, gran = np.asarray(tied.ratio), np.asarray(tied.granularity)
    bits, mode = np.asarray(plan.weight_bits), np.asarray(plan.quant_mode)
    for l in layers:
        f = fact[..., l.index]
        if not np.any(f):
            continue
        r = float(rank[..., l.index][f].ravel()[0])
        if not factorizable(l):
            raise ValueError(f"plan.rank {r} factorizes layer {l.name}, a {l.kind} layer with {l.groups} groups; "
                             f"only Dense and ungrouped conv layers factorize: give it rank 1")
        if np.any(f & (gran[..., l.index] != CHANNEL) & (ratio[..., l.index] > 0)):
            raise ValueError(f"plan.rank {r} factorizes layer {l.name}, which its group prunes weight by weight; "
                             f"a factorized layer takes channel pruning only: use granularity channel, ratio 0 or rank 1")
        if np.any(f & (mode[..., l.index] == CODEBOOK) & (bits[..., l.index] <= 8)):
            raise ValueError(f"plan.rank {r} factorizes layer {l.name}, a codebook layer; its factors are quantized "
                             f"uniformly: use quant_mode uniform or rank 1")


def describe(layer: Layer, rank: float, form: int) -> dict:
    """What config.json records about a layer's factorization: the plan's ratio, the achieved
    rank r, the form and which side the basis is on."""
    fact = factorizable(layer) and rank < 1
    return {"rank_ratio": float(rank), "rank": int(achieved_rank(rank, full_rank(layer))) if fact else None,
            "form": FORM_NAMES.get(int(form), str(form)) if fact else None, "full_rank": full_rank(layer)}

