"""Fake quantization with traced bit widths and a straight-through estimator.

Weights: symmetric, one scale per output channel (the last kernel axis).
  b >= 2: qmax = 2**(b-1) - 1, scale = max|w| / B, q = clip(round(w / scale), -qmax, qmax), where
    the bound B (`weight_bound`) is qmax + 0.5 up to EXTENDED_BOUND_MAX_BITS and qmax above.
    With B = qmax, the outermost codes catch only the half step [qmax - 0.5, qmax] of the
    range, and at 2 bits {-1, 0, 1} rounds every |w| < max|w| / 2 to 0 (89-92% of LeNet-5's
    conv2 and FC weights); B = qmax + 0.5 gives every code a full step (Google's qwix, whose
    `get_symmetric_bound` extends the bound for int2-int7 "for a better utilization of the
    qmax bucket"; its extra code -2**(b-1) only catches the tie at -max|w| and is not used here,
    so the grid stays symmetric, as ONNX Runtime's and TFLite's int8 weights are).
  b == 1: w_hat = sign(w) * mean|w| over the channel's non-zero weights (pruned ones stay 0);
  b == 32 (FLOAT): untouched.
  The engine computes these scales once per trial from the pretrained kernel and keeps them
  while fine-tuning (compress.weight_scales; a weight that grows past the grid clips), and
  the exporter packs with the engine's scales.
Activations (per tensor, the input of a layer), from a calibrated range [lo, hi]:
  lo = min(lo, 0), hi = max(hi, 0), s = (hi - lo) / (2**b - 1), z = round(-lo / s),
  x_q = clip(round(x / s) + z, 0, 2**b - 1), x_hat = (x_q - z) * s.
The exporter packs integers with exactly these formulas (`quantize_weight`, `act_qparams`).
Quantizing an already fake-quantized tensor gives it back (to float rounding).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from search.compression.plan import FLOAT


def ste(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Exactly x_hat in the forward pass (x - x is 0), identity gradient in the backward pass."""
    return jax.lax.stop_gradient(x_hat) + (x - jax.lax.stop_gradient(x))


def pow2(bits) -> jax.Array:
    """2**bits as an exact float32 (XLA's exp2 is an approximation), for traced int bits."""
    b = jnp.clip(jnp.asarray(bits, jnp.int32), 0, 30)
    return jnp.left_shift(jnp.int32(1), b).astype(jnp.float32)


def _reduce_axes(w: jax.Array) -> tuple[int, ...]:
    return tuple(range(w.ndim - 1))


# The widest weight bit width whose grid bound is qmax + 0.5 (module docstring). Measured on
# LeNet-5/Fashion-MNIST, 300 steps, 3 seeds (bench/bench_grid.py): test accuracy after fine-tuning
# 2 bits 88.51% against 87.24% (before it 75.1% against 37.6%), 3 bits 90.05 / 90.06% (before:
# 89.11 / 86.75%), 4 bits 90.51 / 90.50% but 89.92 / 90.48% before fine-tuning.
EXTENDED_BOUND_MAX_BITS = 3


def weight_qmax(bits) -> jax.Array:
    """Largest symmetric weight code at a traced bit width: 2**(b-1) - 1."""
    return pow2(jnp.asarray(bits) - 1) - 1.0


def weight_bound(bits) -> jax.Array:
    """The grid bound B at traced bit widths (scale = max|w| / B): qmax + 0.5 up to
    EXTENDED_BOUND_MAX_BITS, qmax above."""
    b = jnp.asarray(bits)
    return weight_qmax(b) + jnp.where(b <= EXTENDED_BOUND_MAX_BITS, 0.5, 0.0)


def grid_bound(bits: int) -> float:
    """`weight_bound` of one bit width, outside a trace (packing, size accounting)."""
    return float((1 << (int(bits) - 1)) - 1) + (0.5 if int(bits) <= EXTENDED_BOUND_MAX_BITS else 0.0)


def scale_from_amax(amax: jax.Array, bound: jax.Array) -> jax.Array:
    """The uniform grid's scale, max|w| / bound (1 for an all-zero channel)."""
    return jnp.where(amax > 0, amax / jnp.maximum(bound, 1.0), 1.0)


def grid_scales(w2: np.ndarray, bits: int, mask: np.ndarray | None = None) -> np.ndarray:
    """[out] float32 scales of the uniform grid at b >= 2 bits for a kernel w2 [n, out] (mask:
    the weights that count). A kernel already on its grid (fake-quantized) has its largest
    magnitude at code qmax, so max|w| / qmax reproduces it exactly; any other kernel gets
    max|w| / B (`grid_bound`), the grid the engine would give it."""
    w2 = np.asarray(w2, np.float32)
    amax = (np.abs(w2) if mask is None else np.where(mask, np.abs(w2), 0)).max(axis=0)
    qmax = np.float32((1 << (int(bits) - 1)) - 1)
    on = np.where(amax > 0, amax / qmax, np.float32(1.0)).astype(np.float32)
    q = np.round(w2 / on)
    exact = (np.abs(w2 - q * on) <= 1e-5 * amax).all(axis=0)
    own = np.where(amax > 0, amax / np.float32(grid_bound(bits)), np.float32(1.0)).astype(np.float32)
    return np.where(exact, on, own).astype(np.float32)


def on_grid(w: jax.Array, scale: jax.Array, qmax: jax.Array) -> jax.Array:
    """w rounded to the nearest point of the grid scale * {-qmax..qmax}."""
    return jnp.clip(jnp.round(w / scale), -qmax, qmax) * scale


def _uniform_scale(w: jax.Array, bits: jax.Array) -> tuple[jax.Array, jax.Array]:
    amax = jnp.max(jnp.abs(w), axis=_reduce_axes(w), keepdims=True)
    return scale_from_amax(amax, weight_bound(bits)), weight_qmax(bits)


def uniform_weight(w: jax.Array, bits: jax.Array) -> jax.Array:
    """Symmetric per-output-channel quantize-dequantize (b >= 2), no STE."""
    scale, qmax = _uniform_scale(w, bits)
    return on_grid(w, scale, qmax)


def _binary_scale(w: jax.Array) -> jax.Array:
    axes = _reduce_axes(w)
    nz = jnp.sum((w != 0).astype(w.dtype), axis=axes, keepdims=True)
    return jnp.sum(jnp.abs(w), axis=axes, keepdims=True) / jnp.maximum(nz, 1.0)


def binary_weight(w: jax.Array) -> jax.Array:
    """1 bit: sign(w) times the mean magnitude of the channel's non-zero weights, no STE."""
    return jnp.sign(w) * _binary_scale(w)


def fake_quant_weight(w: jax.Array, bits: jax.Array) -> jax.Array:
    """Quantize-dequantize a kernel at a traced bit width (FLOAT = untouched), with STE."""
    bits = jnp.asarray(bits)
    w_hat = jnp.where(bits >= FLOAT, w, jnp.where(bits == 1, binary_weight(w), uniform_weight(w, bits)))
    return ste(w, w_hat)


def quantize_weight(w, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integers and per-output-channel scales for packing: w ~= q * scale[out] (`grid_scales`:
    exactly, for a fake-quantized kernel)."""
    w = np.asarray(w, np.float32)
    if not 1 <= int(bits) < FLOAT:
        raise ValueError(f"quantize_weight needs 1 <= bits < {FLOAT}, got {bits}")
    if int(bits) == 1:
        scale = np.asarray(_binary_scale(jnp.asarray(w)))
        return np.sign(w).astype(np.int32), scale.reshape(-1)
    qmax = (1 << (int(bits) - 1)) - 1
    scale = grid_scales(w.reshape(-1, w.shape[-1]), bits)
    q = np.clip(np.round(w / scale), -qmax, qmax).astype(np.int32)
    return q, scale


def act_qparams(lo, hi, bits):
    """(scale, zero point, levels) of the asymmetric activation grid for a range [lo, hi]."""
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    levels = pow2(bits) - 1.0
    s = (hi - lo) / levels
    s = jnp.where(s > 0, s, 1.0)
    return s, jnp.round(-lo / s), levels


def fake_quant_act(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: jax.Array) -> jax.Array:
    """Quantize-dequantize an activation tensor (FLOAT = untouched), with STE."""
    s, z, levels = act_qparams(lo, hi, bits)
    return fake_quant_act_grid(x, s, z, levels, jnp.asarray(bits) >= FLOAT)


@jax.custom_vjp
def fake_quant_act_grid(x: jax.Array, s: jax.Array, z: jax.Array, levels: jax.Array,
                        is_float: jax.Array) -> jax.Array:
    """`fake_quant_act` on a grid from `act_qparams` (so a model's layers can share one
    vectorized computation of their grids). The gradient passes to x unchanged, as a custom
    VJP: no rounding arithmetic is differentiated or compiled in the backward pass."""
    x_hat = (jnp.clip(jnp.round(x / s) + z, 0.0, levels) - z) * s
    return jnp.where(is_float, x, x_hat)


def _act_fwd(x, s, z, levels, is_float):
    return fake_quant_act_grid(x, s, z, levels, is_float), None


def _act_bwd(res, g):
    return g, None, None, None, None  # the grid is calibrated, not trained


fake_quant_act_grid.defvjp(_act_fwd, _act_bwd)


def round_ste(v: jax.Array) -> jax.Array:
    """round(v) in the forward pass, identity gradient in the backward pass."""
    return v + jax.lax.stop_gradient(jnp.round(v) - v)


def fake_quant_act_learned(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: jax.Array) -> jax.Array:
    """`fake_quant_act` with a trainable range: the same forward values, differentiated as LSQ
    does (Esser et al., ICLR 2020, "Learned Step Size Quantization"; LSQ+ for the offset, Bhalgat
    et al. 2020), with the straight-through estimator only on the roundings. Inside the range
    dx_hat/dx = 1 and dx_hat/ds = round(x/s) - x/s; a clipped value has dx_hat/dx = 0 and
    dx_hat/ds = its end of the grid, so the gradient pulls hi down where rounding error
    dominates and up where clipping does. s = (hi - lo) / (2**b - 1) and z = round(-lo / s)
    carry the gradient to lo and hi. FLOAT: x untouched, no gradient to the range."""
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    levels = pow2(bits) - 1.0
    s = (hi - lo) / levels
    s = jnp.where(s > 0, s, 1.0)
    z = round_ste(-lo / s)
    x_hat = (jnp.clip(round_ste(x / s) + z, 0.0, levels) - z) * s
    return jnp.where(jnp.asarray(bits) >= FLOAT, x, x_hat)
