"""Masks: exact counts for traced ratios, known answers, and no recompiles across plans."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from search.engine.compiles import count_compiles
from search.compression.layers import Layer
from search.compression.masks import (channel_mask, compute_masks, layer_mask, nm_mask, pruned_counts,
                          unstructured_mask)
from search.compression.plan import CHANNEL, NM, NM_GROUP, UNSTRUCTURED, make_plan

JIT = [False, True]
RNG = np.random.default_rng(0)


def _normal(*shape):
    """Test weights from numpy (jax.random's compile time varies wildly with shape on this CPU)."""
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _maybe_jit(f, jit):
    return jax.jit(f) if jit else f


def test_unstructured_known_answer():
    w = jnp.array([[1.0, -5.0], [3.0, 0.5]])
    m = unstructured_mask(w, jnp.float32(0.5))
    np.testing.assert_array_equal(m, [[0, 1], [1, 0]])  # |1| and |0.5| are the two smallest


@pytest.mark.parametrize("jit", JIT)
def test_unstructured_exact_count_with_ties(jit):
    f = _maybe_jit(unstructured_mask, jit)
    w = jnp.ones((7, 13))  # every magnitude tied: a threshold would prune all or nothing
    for r in (0.0, 0.1, 0.33, 0.5, 0.9, 0.99):
        pruned = int((np.asarray(f(w, jnp.float32(r))) == 0).sum())
        assert abs(pruned - r * w.size) <= 1, (r, pruned)


@pytest.mark.parametrize("jit", JIT)
def test_channel_known_answer_and_count(jit):
    f = _maybe_jit(channel_mask, jit)
    w = jnp.array([[1.0, -4.0, 0.5, 2.0], [1.0, 0.0, -0.2, 2.0]])  # L1: 2, 4, 0.7, 4
    np.testing.assert_array_equal(np.asarray(f(w, jnp.float32(0.5)))[0], [0, 1, 0, 1])
    w = _normal(3, 3, 8, 10)
    for r in (0.0, 0.25, 0.5, 0.75, 0.99):
        m = np.asarray(f(w, jnp.float32(r)))
        per_channel = m.reshape(-1, 10).sum(0)
        assert set(np.unique(per_channel)) <= {0, 72}  # whole channels only
        assert abs((per_channel == 0).sum() - r * 10) <= 1
        assert (per_channel > 0).sum() >= 1  # a layer always keeps a channel


@pytest.mark.parametrize("jit", JIT)
def test_nm_two_of_four(jit):
    f = _maybe_jit(nm_mask, jit)
    w = _normal(16, 6)
    m = np.asarray(f(w, jnp.float32(0.5)))
    groups = m.reshape(4, NM_GROUP, 6)  # consecutive fan-in weights, per output
    assert (groups.sum(axis=1) == 2).all()
    # the kept ones are the two largest of each group
    a = np.abs(np.asarray(w)).reshape(4, NM_GROUP, 6)
    kept_min = np.where(groups == 1, a, np.inf).min(axis=1)
    pruned_max = np.where(groups == 0, a, -np.inf).max(axis=1)
    assert (kept_min >= pruned_max).all()


def test_nm_ragged_fan_in_and_conv():
    w = _normal(3, 3, 1, 5)  # fan-in 9 = 2 groups + 1
    m = np.asarray(nm_mask(w, jnp.float32(0.5))).reshape(9, 5)
    assert (m[:8].reshape(2, 4, 5).sum(1) == 2).all()
    assert (m[8] == 0).all()  # a group of one real weight: round(0.5 * 4) = 2, capped at the 1 there is
    layer = Layer(0, "c", ("c",), "depthwise", (3, 3, 1, 5), (4, 4, 5), (4, 4, 5), 5, True, 0, 0)
    plan = make_plan([0.5], NM)
    assert pruned_counts([layer], plan)[0] == (m == 0).sum()


def test_layer_mask_selects_granularity_from_traced_code():
    w = _normal(8, 4)
    f = jax.jit(layer_mask)
    r = jnp.float32(0.5)
    np.testing.assert_array_equal(f(w, r, UNSTRUCTURED), unstructured_mask(w, r))
    np.testing.assert_array_equal(f(w, r, CHANNEL), channel_mask(w, r))
    np.testing.assert_array_equal(f(w, r, NM), nm_mask(w, r))


def test_compute_masks_matches_pruned_counts_without_recompiling():
    shapes = {"a": (64, 30), "b": (3, 3, 4, 8), "c": (30, 10)}
    params = {k: {"kernel": _normal(*s), "bias": jnp.zeros(s[-1])}
              for k, s in shapes.items()}
    layers = [Layer(i, k, (k,), "dense" if len(s) == 2 else "conv", s, (), (), 1, True, 0, 0)
              for i, (k, s) in enumerate(shapes.items())]
    f = jax.jit(lambda p, plan: compute_masks(p, layers, plan))
    rng = np.random.default_rng(0)
    f(params, make_plan([0.1, 0.2, 0.3], UNSTRUCTURED))
    with count_compiles() as c:
        for _ in range(6):
            plan = make_plan(rng.uniform(0, 0.99, 3), rng.integers(0, 3, 3))
            masks = f(params, plan)
            zeros = [int((np.asarray(masks[l.name]) == 0).sum()) for l in layers]
            np.testing.assert_array_equal(zeros, pruned_counts(layers, plan))
    assert c.count == 0
