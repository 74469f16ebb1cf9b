"""Fake quantization and codebooks: known answers, value counts, STE gradients, traced bits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from search.compression.codebook import SLOTS, codebook_weight, kmeans_codebook
from search.engine.compiles import count_compiles
from search.compression.quant import (EXTENDED_BOUND_MAX_BITS, act_qparams, fake_quant_act, fake_quant_weight,
                                     quantize_weight)
from search.compression.plan import FLOAT, WEIGHT_BITS

RNG = np.random.default_rng(0)
JIT = [False, True]


def _normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def test_weight_known_answer():
    # one output channel, max|w| = 1; 2 bits: qmax = 1, bound 1.5, scale = 2/3:
    # 1.5 -> 2, clipped to 1; -1.05 -> -1; 0.45 -> 0; -0.3 -> 0
    w = jnp.array([[1.0], [-0.7], [0.3], [-0.2]])
    np.testing.assert_allclose(fake_quant_weight(w, 2), [[2 / 3], [-2 / 3], [0.0], [0.0]], rtol=1e-6)
    # 3 bits: qmax = 3, bound 3.5: 3.5 -> 4 -> 3, -2.45 -> -2, 1.05 -> 1, -0.7 -> -1
    np.testing.assert_allclose(fake_quant_weight(w, 3), np.array([[3], [-2], [1], [-1]]) / 3.5, rtol=1e-6)
    # above EXTENDED_BOUND_MAX_BITS the bound is qmax: 8 bits, scale 1/127
    np.testing.assert_allclose(fake_quant_weight(w, 8), np.round(np.asarray(w) * 127) / 127, rtol=1e-6)
    # 1 bit: sign * mean|w| of the non-zero weights
    np.testing.assert_allclose(fake_quant_weight(w, 1), [[0.55], [-0.55], [0.55], [-0.55]], rtol=1e-6)
    np.testing.assert_array_equal(fake_quant_weight(w, FLOAT), w)


@pytest.mark.parametrize("jit", JIT)
def test_distinct_values_per_channel(jit):
    f = jax.jit(fake_quant_weight) if jit else fake_quant_weight
    w = _normal(3, 3, 16, 6)
    for bits in (1, 2, 3, 4, 5, 8):
        q = np.asarray(f(w, jnp.int32(bits))).reshape(-1, 6)
        for c in range(6):
            assert len(np.unique(q[:, c])) <= 2**bits, (bits, c)


def test_pruned_stay_zero_and_integers_reproduce():
    w = np.array(_normal(40, 5))
    w[::3] = 0.0
    for bits in (1, 2, 4, 8, 16):
        fq = np.asarray(fake_quant_weight(jnp.asarray(w), bits))
        assert (fq[::3] == 0).all()
        q, scale = quantize_weight(fq, bits)  # the exporter's integers, from the effective kernel
        np.testing.assert_allclose(q * scale, fq, rtol=1e-6, atol=1e-7)
        qmax = 1 if bits == 1 else 2 ** (bits - 1) - 1
        assert np.abs(q).max() <= qmax and scale.shape == (5,)
        q2, scale2 = quantize_weight(w, bits)
        np.testing.assert_array_equal(q2, q)  # quantizing the effective kernel again is a no-op


def test_low_bit_grid_gives_every_code_a_full_step():
    """Issue 16: at 2-4 bits the scale is max|w| / (qmax + 0.5) (qwix's bound), so the outer
    codes catch a full step and 2 bits zero only |w| < max|w| / 3 (max|w| / 2 before); every
    code of the symmetric grid is used; wider grids keep max|w| / qmax."""
    w = np.asarray(_normal(4000, 3))
    amax = np.abs(w).max(axis=0)
    for bits in range(2, 9):
        fq = np.asarray(fake_quant_weight(jnp.asarray(w), bits))
        q, scale = quantize_weight(fq, bits)
        qmax = 2 ** (bits - 1) - 1
        bound = qmax + 0.5 if bits <= EXTENDED_BOUND_MAX_BITS else qmax
        np.testing.assert_allclose(scale, amax / bound, rtol=1e-6)
        for c in range(3 if bits <= 4 else 0):  # every code; the end opposite the largest |w| may stay unused
            used = set(np.unique(q[:, c]).tolist())
            assert used <= set(range(-qmax, qmax + 1)) and len(used) >= 2 * qmax, (bits, c, used)
    zero = np.mean(np.asarray(fake_quant_weight(jnp.asarray(w), 2)) == 0)
    assert zero == pytest.approx(np.mean(np.abs(w) < amax / 3), abs=1e-3)
    assert zero < np.mean(np.abs(w) < amax / 2) - 0.1


def test_straight_through_gradient():
    w = _normal(10, 4)
    for bits in (1, 4, FLOAT):
        g = jax.grad(lambda v: jnp.sum(fake_quant_weight(v, bits) * 3.0))(w)
        np.testing.assert_allclose(g, 3.0)


def test_traced_bits_compile_once():
    f = jax.jit(fake_quant_weight)
    w = _normal(8, 3)
    f(w, jnp.int32(8))
    with count_compiles() as c:
        for b in WEIGHT_BITS:
            f(w, jnp.int32(b))
    assert c.count == 0


@pytest.mark.parametrize("jit", JIT)
def test_activation_grid(jit):
    f = jax.jit(fake_quant_act) if jit else fake_quant_act
    x = jnp.linspace(-1.0, 3.0, 101)
    lo, hi = jnp.float32(-1.0), jnp.float32(3.0)
    for bits in (4, 5, 8):
        y = np.asarray(f(x, lo, hi, jnp.int32(bits)))
        assert len(np.unique(y)) <= 2**bits
        s, z, _ = act_qparams(lo, hi, bits)
        np.testing.assert_allclose(s, 4.0 / (2**bits - 1))
        assert np.abs(y - np.asarray(x)).max() <= float(s) / 2 + 1e-6
        assert 0.0 in y  # zero is exactly representable (zero point)
    np.testing.assert_array_equal(f(x, lo, hi, jnp.int32(FLOAT)), x)
    # values outside the calibrated range clip to it; a positive-only range still holds 0
    y = np.asarray(f(jnp.array([-5.0, 0.0, 9.0]), jnp.float32(0.5), jnp.float32(2.0), jnp.int32(8)))
    np.testing.assert_allclose(y, [0.0, 0.0, 2.0], atol=1e-6)


def test_kmeans_known_clusters():
    w = jnp.array([[-1.1], [-0.9], [0.9], [1.1], [5.0]])
    mask = jnp.array([[1.0], [1.0], [1.0], [1.0], [0.0]])  # the outlier is pruned: not clustered
    c, assign = kmeans_codebook(w, mask, jnp.int32(1))
    assert c.shape == (SLOTS,)
    np.testing.assert_allclose(np.sort(np.asarray(c[:2])), [-1.0, 1.0], rtol=1e-6)
    assert (np.asarray(c[2:]) == 0).all()  # inactive slots
    y = np.asarray(codebook_weight(c, assign, mask)).ravel()
    np.testing.assert_allclose(y, [-1.0, -1.0, 1.0, 1.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("jit", JIT)
def test_codebook_value_count_and_centroid_gradient(jit):
    km = jax.jit(kmeans_codebook) if jit else kmeans_codebook
    w = _normal(30, 8)
    mask = jnp.asarray(RNG.uniform(size=(30, 8)) > 0.3, jnp.float32)
    for bits in (1, 2, 3, 5):
        c, a = km(w, mask, jnp.int32(bits))
        y = np.asarray(codebook_weight(c, a, mask))
        assert (y[np.asarray(mask) == 0] == 0).all()
        assert len(np.unique(y[np.asarray(mask) == 1])) <= 2**bits
    # the gradient of a centroid is the sum of the gradients of the weights that share it
    g_w = _normal(30, 8)
    g_c = jax.grad(lambda cc: jnp.sum(codebook_weight(cc, a, mask) * g_w))(c)
    expect = np.zeros(SLOTS)
    np.add.at(expect, np.asarray(a).ravel(), (np.asarray(g_w) * np.asarray(mask)).ravel())
    np.testing.assert_allclose(g_c, expect, rtol=1e-5, atol=1e-5)
