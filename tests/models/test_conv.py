"""The depthwise conv and the 2x2 pool: the same values and gradients as lax and nn."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from models.conv import depthwise_conv
from models.lenet import max_pool2


@pytest.mark.parametrize("shape, k, stride, padding", [
    ((2, 8, 8, 16), 3, 1, "SAME"), ((2, 7, 7, 8), 3, 2, "SAME"), ((2, 9, 9, 4), 3, 2, "VALID"),
    ((2, 6, 6, 4), 3, 1, ((1, 1), (2, 0))),
])
def test_depthwise_matches_lax_values_and_gradients(shape, k, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((k, k, 1, shape[-1])).astype(np.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(conv, x, w):
        y = conv(x, w, (stride, stride), padding, dimension_numbers=dn,
                 feature_group_count=shape[-1], precision="highest")
        return jnp.sum(jnp.sin(y)), y

    (_, ya), ga = jax.value_and_grad(loss, (1, 2), has_aux=True)(lax.conv_general_dilated, x, w)
    (_, yb), gb = jax.jit(jax.value_and_grad(loss, (1, 2), has_aux=True),
                          static_argnums=0)(depthwise_conv, x, w)
    np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-5)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_dense_conv_falls_through_to_lax():
    x = np.ones((1, 5, 5, 3), np.float32)
    w = np.ones((3, 3, 3, 4), np.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    y = depthwise_conv(x, w, (1, 1), "VALID", dimension_numbers=dn)
    np.testing.assert_array_equal(y, np.full((1, 3, 3, 4), 27.0, np.float32))


def test_max_pool2_matches_nn_max_pool():
    x = np.random.default_rng(1).standard_normal((2, 9, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(max_pool2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
