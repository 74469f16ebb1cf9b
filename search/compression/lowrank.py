"""Low-rank factorization as a per-layer plan choice (plan.rank, plan.form): three forms.

Each form views a layer's kernel as a matrix R(W) [m, n] and replaces it by a product A @ B of
rank r: A [m, r], B [r, n]. The forms differ in the view R and in the pair of layers it becomes:

- SVD ("Weight SVD", AIMET's name; Denton et al., NeurIPS 2014, "Exploiting Linear Structure
  Within Convolutional Networks"): R(W) = the kernel as [fan_in, out] (a conv's
  [kh*kw*cin, cout]). A Dense becomes two matmuls; a kxk conv becomes r kxk filters, then a 1x1
  conv r -> cout.
- SPATIAL ("Spatial SVD", AIMET; Jaderberg et al., BMVC 2014, "Speeding up Convolutional Neural
  Networks with Low Rank Expansions"), kxk convs with kh, kw > 1: R(W)[(y, c), (x, o)] =
  W[y, x, c, o], [kh*cin, kw*cout]. The conv becomes a kh x 1 conv cin -> r (the layer's vertical
  stride, padding and dilation), then a 1 x kw conv r -> cout (the horizontal ones).
- KRONECKER (Van Loan and Pitsianis, 1993, "Approximation with Kronecker Products"), Dense
  layers whose fan-in and width both split into two factors >= 2 (`kron_split`): with
  fan_in = m1*m2 and out = n1*n2, W = sum_i A_i (x) B_i (A_i [m1, n1], B_i [m2, n2]) and the
  rearrangement R(W)[(a, c), (b, d)] = W[a*m2 + b, c*n2 + d], [m1*n1, m2*n2], turns the sum of r
  Kronecker products into a rank-r matrix: column i of A is vec(A_i), row i of B vec(B_i). The
  layer computes, for the input as X [m1, m2], Y = sum_i A_i^T (X B_i) [n1, n2]: two batched
  matmuls and reshapes. MACs r*(m1*m2*n2 + n1*m1*n2) and weights r*(m1*n1 + m2*n2): it pays in
  memory at small r, hence its own small rank ratios in the search space.

One compile per study, with a traced rank and form: the SVD of every layer's R(W), for every
form it can take, is taken once per engine (`bases`, keyed by `basis_key`), and its orthonormal
basis Q [d, d] is kept on the smaller side, d = min(m, n): the right singular vectors V when
n <= m, else the left ones U, ordered by singular value. A plan's rank ratio gives
r = max(1, round(rank * d)) (`achieved_rank`) and the column mask m_j = [j < r];
Q_m = Q * m (`masked_basis`). The layer then computes with (`project`)

    right side (n <= m):  A = R @ Q_m  [m, d],  B = Q_m^T     [d, n]
    left side  (n >  m):  A = Q_m      [m, d],  B = Q_m^T @ R [d, n]

and R_eff = A @ B = R Q_m Q_m^T (or Q_m Q_m^T R), W_eff = R^-1(R_eff): a linear projection onto
the top r singular directions, so gradients flow to W without a straight-through estimator, and
at r = d it is W (Q Q^T = I; the engine skips it where rank is 1). The columns (rows) of A (B)
past r are zero, so the shapes never change with r. Fine-tuning trains W and so A (right side)
or B (left side); the basis stays the pretrained one. Quantization (weight_bits < 32)
fake-quantizes both factors (symmetric, per column, scales from each step's max |value|,
straight-through gradient: `quant.fake_quant_weight`), never their product, so the product keeps
rank r and the export can write the pair. Channel pruning removes output channels (B's columns
of those channels) and input channels (A's rows of them) in the SVD and spatial forms; the
Kronecker form, unstructured and N:M pruning, codebooks and depthwise or grouped convs do not
combine with it (`check_plan`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from search.compression import quant
from search.compression.groups import kept_channels, tie_plan
from search.compression.layers import Layer, get_path
from search.compression.plan import CHANNEL, CODEBOOK, FLOAT, FORMS, KRONECKER, SPATIAL, SVD

FORM_NAMES = {v: k for k, v in FORMS.items()}


def kron_split(n: int) -> tuple[int, int] | None:
    """(a, b) with a * b = n, 2 <= a <= b and a as large as possible (the most balanced split),
    or None when n has no such split (n prime or below 4)."""
    n = int(n)
    for a in range(math.isqrt(n), 1, -1):
        if n % a == 0:
            return a, n // a
    return None


def form_problem(layer: Layer, form: int) -> str | None:
    """Why a layer cannot take a form (one clause naming what it needs), None when it can."""
    form = int(form)
    if form not in FORM_NAMES:
        return f"form {form} is not a factorization form ({', '.join(f'{v} = {k}' for k, v in FORMS.items())})"
    if layer.kind not in ("dense", "conv") or layer.groups != 1:
        return f"it is a {layer.kind} layer with {layer.groups} groups; only Dense and ungrouped conv layers factorize"
    if form == SPATIAL and (layer.kind != "conv" or min(layer.kernel_shape[:2]) < 2):
        return (f"the spatial form needs a conv with a kernel of at least 2x2, and its kernel is "
                f"{'x'.join(str(d) for d in layer.kernel_shape[:-2]) or 'a Dense matrix'}")
    if form == KRONECKER:
        if layer.kind != "dense":
            return "the Kronecker form factorizes Dense layers only"
        if kron_split(layer.fan_in) is None or kron_split(layer.out_channels) is None:
            return (f"the Kronecker form needs fan-in and width that split into two factors >= 2, "
                    f"and {layer.fan_in} x {layer.out_channels} does not")
    return None


def forms_of(layer: Layer) -> tuple[int, ...]:
    """The forms (plan.FORMS codes) the layer can take, SVD first; () when it cannot factorize."""
    return tuple(f for f in FORMS.values() if form_problem(layer, f) is None)


def factorizable(layer: Layer) -> bool:
    """Whether the layer's kernel is one matrix [fan_in, out]: a Dense, or a conv with one group."""
    return form_problem(layer, SVD) is None


def matrix_shape(layer: Layer, form: int = SVD) -> tuple[int, int]:
    """(m, n) of the matrix R(W) the form factorizes (module docstring)."""
    form = int(form)
    if form == SPATIAL:
        kh, kw, cin, cout = layer.kernel_shape
        return int(kh * cin), int(kw * cout)
    if form == KRONECKER:
        (m1, m2), (n1, n2) = kron_split(layer.fan_in), kron_split(layer.out_channels)
        return m1 * n1, m2 * n2
    return int(layer.fan_in), int(layer.out_channels)


def full_rank(layer: Layer, form: int = SVD) -> int:
    """d = min(m, n): the largest rank of the layer's matrix R(W) in a form."""
    return int(min(matrix_shape(layer, form)))


def right_side(layer: Layer, form: int = SVD) -> bool:
    """True when the basis is the right singular vectors V [n, n] (n <= m)."""
    m, n = matrix_shape(layer, form)
    return n <= m


def to_matrix(w: Any, layer: Layer, form: int = SVD) -> Any:
    """R(W) [m, n] of a kernel w (numpy or jax array, the layer's kernel shape)."""
    form = int(form)
    if form == SPATIAL:
        kh, kw, cin, cout = layer.kernel_shape
        return w.transpose(0, 2, 1, 3).reshape(kh * cin, kw * cout)
    if form == KRONECKER:
        (m1, m2), (n1, n2) = kron_split(layer.fan_in), kron_split(layer.out_channels)
        return w.reshape(m1, m2, n1, n2).transpose(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    return w.reshape(-1, layer.out_channels)


def from_matrix(r: Any, layer: Layer, form: int = SVD) -> Any:
    """The kernel (the layer's kernel shape) whose R(W) is r: the inverse of `to_matrix`."""
    return kernel_from_matrix(r, layer.kernel_shape, form)


def kernel_from_matrix(r: Any, shape: Sequence[int], form: int = SVD) -> Any:
    """`from_matrix` from the kernel's shape alone (Dense [in, out], conv [kh, kw, cin, cout])."""
    form = int(form)
    shape = tuple(int(d) for d in shape)
    if form == SPATIAL:
        kh, kw, cin, cout = shape
        return r.reshape(kh, cin, kw, cout).transpose(0, 2, 1, 3)
    if form == KRONECKER:
        (m1, m2), (n1, n2) = kron_split(int(np.prod(shape[:-1]))), kron_split(shape[-1])
        return r.reshape(m1, n1, m2, n2).transpose(0, 2, 1, 3).reshape(shape)
    return r.reshape(shape)


def basis_key(name: str, form: int) -> str:
    """The key of a layer's basis in a form (`bases`): its name for SVD, "name@form" otherwise."""
    return name if int(form) == SVD else f"{name}@{FORM_NAMES[int(form)]}"


def achieved_rank(rank: Any, d: Any, xp: Any = np) -> Any:
    """r = max(1, round(rank * d)), half up, in float32 (numpy or jax.numpy as `xp`), the rank
    the layer computes at: d at rank 1. Every count (engine, cost model, export) uses this."""
    v = xp.asarray(rank, xp.float32) * xp.asarray(d, xp.float32)
    return xp.clip(xp.floor(v + xp.float32(0.5)), 1, xp.asarray(d, xp.float32))


def bases(layers: Sequence[Layer], params: Any) -> dict[str, np.ndarray]:
    """{basis_key(layer, form): Q [d, d] float32} for every layer and every form it can take
    (`forms_of`): the orthonormal singular vectors of R(W) [m, n] on the smaller side (columns
    ordered by singular value, largest first). numpy's SVD, once per engine, on one BLAS thread:
    next to JAX's threads OpenBLAS's own spun, and the SVD of a 64x300 kernel took 0.6 s instead
    of 2 ms (2-core machine under load)."""
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for l in layers:
            w = np.asarray(get_path(params, l.path)["kernel"], np.float64)
            for f in forms_of(l):
                u, _, vt = np.linalg.svd(to_matrix(w, l, f), full_matrices=False)  # u [m, d], vt [d, n]
                out[basis_key(l.name, f)] = np.ascontiguousarray(vt.T if right_side(l, f) else u).astype(np.float32)
    return out


def masked_basis(q: jax.Array, rank: jax.Array) -> jax.Array:
    """Q_m = Q * [j < r] over its columns: the basis cut to the achieved rank of a traced ratio."""
    d = q.shape[-1]
    return q * (jnp.arange(d) < achieved_rank(rank, d, jnp)).astype(q.dtype)


def project(w: jax.Array, qm: jax.Array, bits: jax.Array, layer: Layer, form: int = SVD
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(W_eff like w, A [m, d], B [d, n]) of a kernel w in a form and a masked basis qm [d, d]
    (`masked_basis`); A and B fake-quantized at `bits` (FLOAT: untouched)."""
    r = to_matrix(w, layer, form)
    a, b = (r @ qm, qm.T) if right_side(layer, form) else (qm, qm.T @ r)
    a, b = quant.fake_quant_weight(a, bits), quant.fake_quant_weight(b, bits)
    return from_matrix(a @ b, layer, form), a, b


def factors(w: np.ndarray, qm: np.ndarray, bits: int, layer: Layer, form: int, rank: float,
            mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The pair a factorized layer is exported as: (A [m, r], B [r, n]) float32, from the trained
    kernel w and its masked basis qm (`masked_basis`), as `project` computes them, in numpy (on
    the host, no compile); B's columns of removed output channels (all-zero channels of `mask`,
    like w) set to 0."""
    qm = np.asarray(qm, np.float32)
    rm = to_matrix(np.asarray(w, np.float32), layer, form)
    a, b = (rm @ qm, qm.T.copy()) if right_side(layer, form) else (qm.copy(), qm.T @ rm)
    a, b = _fake_quant_np(a, bits), _fake_quant_np(b, bits)
    r = int(achieved_rank(rank, qm.shape[-1]))
    a, b = a[:, :r], b[:r]
    if mask is not None:
        kept = np.asarray(mask).reshape(-1, layer.out_channels).any(axis=0)
        b = b * factor_keeps(layer, form, kept, None)[1]
    return np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)


def factor_keeps(layer: Layer, form: int, out_keep: np.ndarray | None, in_keep: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(A's rows bool [m], B's columns bool [n]) that a layer's kept output channels (bool [out])
    and kept fan-in rows (bool [fan_in], the kernel's flattened leading axes) keep in a form;
    None keeps all. Kronecker layers keep everything (`check_plan` refuses pruning them)."""
    m, n = matrix_shape(layer, form)
    ok = np.ones(layer.out_channels, bool) if out_keep is None else np.asarray(out_keep, bool).ravel()
    ik = np.ones(layer.fan_in, bool) if in_keep is None else np.asarray(in_keep, bool).ravel()
    form = int(form)
    if form == SPATIAL:
        kh, kw, cin, _ = layer.kernel_shape
        return ik.reshape(kh, kw, cin).any(axis=1).ravel(), np.tile(ok, kw)
    if form == KRONECKER:
        return np.ones(m, bool), np.ones(n, bool)
    return ik, ok


def geometry(layers: Sequence[Layer]) -> dict[str, np.ndarray]:
    """What the cost model needs of every form, arrays [F, L] float64 (F = len(FORMS), zeros where
    a layer cannot take the form), for one example, per unit of rank r:
    "ok" (bool) the layer takes the form; "d" full rank; "wa", "wb" weights of A and B per rank
    (A's part scales with the kept fan-in, B's with the kept output channels, except Kronecker);
    "ma", "mb" MACs of the first and second kernel per rank; "mid" elements of the intermediate
    activation per rank; "bcols" B's columns (its per-column scales) at full width;
    "pa", "pb" GEMM rows (M) of the two kernels, "ka" the first's K and "nb" the second's N at
    full width, "kb" the second's K per rank (Kronecker: the first kernel is r GEMMs of M = pa,
    N = nb, K = ka; see `search.cost.roofline`); "ta", "tb" the two kernels' taps (kh * kw of
    each factor's convolution, 1 for a matmul)."""
    F, L = len(FORMS), len(layers)
    z = lambda: np.zeros((F, L))
    g = {k: z() for k in ("d", "wa", "wb", "ma", "mb", "mid", "bcols", "pa", "pb", "ka", "nb", "kb", "ta", "tb")}
    g["ok"] = np.zeros((F, L), bool)
    for l in layers:
        for f in forms_of(l):
            i = l.index
            g["ok"][f, i] = True
            g["d"][f, i] = full_rank(l, f)
            for k, v in _form_geometry(l, f).items():
                g[k][f, i] = v
    return g


def _form_geometry(l: Layer, f: int) -> dict[str, float]:
    """One layer's `geometry` figures in form f (except "ok" and "d")."""
    pos = l.macs / max(l.weight_count, 1)  # output positions per example (every call)
    if f == SPATIAL:
        kh, kw, cin, cout = l.kernel_shape
        mid_pos = pos * l.in_shape[-2] / l.out_shape[-2]  # kh x 1 output: H_out x W_in
        return dict(wa=kh * cin, wb=kw * cout, ma=mid_pos * kh * cin, mb=pos * kw * cout, mid=mid_pos,
                    bcols=kw * cout, pa=mid_pos, pb=pos, ka=kh * cin, nb=cout, kb=kw, ta=kh, tb=kw)
    if f == KRONECKER:
        (m1, m2), (n1, n2) = kron_split(l.fan_in), kron_split(l.out_channels)
        return dict(wa=m1 * n1, wb=m2 * n2, ma=pos * m1 * m2 * n2, mb=pos * n1 * m1 * n2, mid=pos * m1 * n2,
                    bcols=m2 * n2, pa=pos * m1, pb=pos * n1, ka=m2, nb=n2, kb=m1, ta=1, tb=1)
    return dict(wa=l.fan_in, wb=l.out_channels, ma=pos * l.fan_in, mb=pos * l.out_channels, mid=pos,
                bcols=l.out_channels, pa=pos, pb=pos, ka=l.fan_in, nb=l.out_channels, kb=1,
                ta=int(np.prod(l.kernel_shape[:-2])), tb=1)


def pays(layer: Layer, layers: Sequence[Layer], form: int, rank: float, ratio: np.ndarray,
         granularity: np.ndarray) -> bool:
    """Whether factorizing `layer` at a rank ratio in a form holds fewer weights than the layer
    unfactorized with the same kept channels: r (wa k_in + wb k_out) < fan_in out k_in k_out, the
    cost model's counts (search.cost.roofline), where k_out and k_in are the kept fractions of its
    output and input channels under the tied plan (ratio, granularity [L], groups.tie_plan;
    a Kronecker layer keeps every channel). A 300 x 100 Dense at rank ratio 0.75 (r = 75) holds
    30,000 weights either way; with 54 of its 100 outputs pruned, rank 0.5 (50 x 346 = 17,300)
    holds more than the pruned layer (13,800)."""
    if rank >= 1 or form_problem(layer, form) is not None:
        return False
    ratio, granularity = np.asarray(ratio, np.float64), np.asarray(granularity)
    keep = lambda i: (kept_channels(ratio[i], layers[i].out_channels) / layers[i].out_channels
                      if granularity[i] == CHANNEL else 1.0)
    k_out = keep(layer.index)
    total = sum(c for _, c in layer.reads)
    k_in = sum(c * (keep(src) if src >= 0 else 1.0) for src, c in layer.reads) / total if total else 1.0
    if int(form) == KRONECKER:
        k_out = k_in = 1.0
    g = _form_geometry(layer, int(form))
    r = float(achieved_rank(rank, full_rank(layer, form)))
    return r * (g["wa"] * k_in + g["wb"] * k_out) < layer.fan_in * layer.out_channels * k_in * k_out


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
    factorizes a layer it cannot: a form the layer's shape does not allow (`form_problem`: a
    depthwise or grouped conv, the spatial form on a 1x1 conv or a Dense, the Kronecker form on a
    conv or on a fan-in or width with no split), a layer pruned weight by weight (unstructured or
    N:M at a ratio > 0, after its group's decision), a codebook layer, or a Kronecker layer whose
    own or input channels are pruned. Plans [L] or [K, L]."""
    rank = np.asarray(plan.rank)
    bad = ~(np.isfinite(rank) & (rank > 0) & (rank <= 1))
    if np.any(bad):
        i = int(np.argwhere(bad)[0][-1])
        name = layers[i].name if i < len(layers) else f"#{i}"
        raise ValueError(f"plan.rank of layer {name} is {float(rank[bad].ravel()[0]):.6g}; a rank ratio lies in (0, 1] (1 = not factorized)")
    tied = tie_plan(plan, layers)
    fact = rank < 1
    if not np.any(fact):
        return
    ratio, gran = np.asarray(tied.ratio), np.asarray(tied.granularity)
    bits, mode, form = np.asarray(plan.weight_bits), np.asarray(plan.quant_mode), np.asarray(plan.form)
    for l in layers:
        f = fact[..., l.index]
        if not np.any(f):
            continue
        r = round(float(rank[..., l.index][f].ravel()[0]), 6)  # the float32's decimal, not its binary noise
        for fm in np.unique(form[..., l.index][f]):
            why = form_problem(l, int(fm))
            if why is not None:
                allowed = ", ".join(FORM_NAMES[x] for x in forms_of(l)) or "none: give it rank 1"
                raise ValueError(f"plan.rank {r} factorizes layer {l.name} in form "
                                 f"{FORM_NAMES.get(int(fm), int(fm))}, but {why}; its forms: {allowed}")
        if np.any(f & (gran[..., l.index] != CHANNEL) & (ratio[..., l.index] > 0)):
            raise ValueError(f"plan.rank {r} factorizes layer {l.name}, which its group prunes weight by weight; "
                             f"a factorized layer takes channel pruning only: use granularity channel, ratio 0 or rank 1")
        if np.any(f & (mode[..., l.index] == CODEBOOK) & (bits[..., l.index] <= 8)):
            raise ValueError(f"plan.rank {r} factorizes layer {l.name}, a codebook layer; its factors are quantized "
                             f"uniformly: use quant_mode uniform or rank 1")
        kron = f & (form[..., l.index] == KRONECKER)
        if np.any(kron & channels_pruned(l, ratio, gran)):
                raise ValueError(f"plan.rank {r} factorizes layer {l.name} in form kronecker, but its own or its input "
                                 f"channels are pruned; a Kronecker layer keeps every channel: use form svd or ratio 0")


def channels_pruned(layer: Layer, ratio: np.ndarray, granularity: np.ndarray) -> np.ndarray:
    """bool [...]: whether plans (tied ratio and granularity, [..., L]) prune the layer (its
    group's ratio > 0) or remove channels of its input (a producing group prunes by channel):
    what a Kronecker layer cannot take (it keeps every channel)."""
    ratio, granularity = np.asarray(ratio), np.asarray(granularity)
    out = ratio[..., layer.index] > 0
    for src, _ in layer.reads:
        if src >= 0:
            out = out | ((granularity[..., src] == CHANNEL) & (ratio[..., src] > 0))
    return out


def describe(layer: Layer, rank: float, form: int) -> dict:
    """What config.json records about a layer's factorization: the plan's ratio, the achieved
    rank r, the form, the full rank in that form and (Kronecker) the factor shapes."""
    fact = rank < 1 and form_problem(layer, form) is None
    out = {"rank_ratio": float(rank), "rank": int(achieved_rank(rank, full_rank(layer, form))) if fact else None,
           "form": FORM_NAMES.get(int(form), str(form)) if fact else None,
           "full_rank": full_rank(layer, form if fact else SVD) if factorizable(layer) else None}
    if fact and int(form) == KRONECKER:
        (m1, m2), (n1, n2) = kron_split(layer.fan_in), kron_split(layer.out_channels)
        out["kronecker"] = {"a": [m1, n1], "b": [m2, n2]}
    return out
