"""Small Flax architectures for the channel-group, export and cost tests: the cases of issue 14
(conv+BN chains with Dropout and a flatten, ResNet basic blocks with identity and projection
shortcuts, a concatenation block, MobileNetV2 inverted residuals with and without the
residual, a layer called twice), and numpy-filled variables for them."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def _bn(name):
    return nn.BatchNorm(use_running_average=True, name=name)


class ConvBN(nn.Module):
    """conv (no bias) + BN + ReLU, twice, then flatten and Dense: a plain chain."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(_bn("b1")(nn.Conv(4, (3, 3), use_bias=False, name="c1")(x)))
        x = nn.relu(_bn("b2")(nn.Conv(6, (3, 3), strides=2, use_bias=False, name="c2")(x)))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(10, name="fc")(x.reshape(x.shape[0], -1))


class Basic(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN + shortcut (identity or 1x1 projection)."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        y = nn.relu(_bn("bn1")(nn.Conv(self.features, (3, 3), self.stride, use_bias=False, name="conv1")(x)))
        y = _bn("bn2")(nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _bn("proj_bn")(nn.Conv(self.features, (1, 1), self.stride, use_bias=False, name="proj")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(_bn("stem_bn")(nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)))
        x = Basic(8, name="b1")(x)  # identity shortcut: stem, b1/conv2 coupled
        x = Basic(8, name="b2")(x)  # ... and b2/conv2
        x = Basic(16, 2, name="b3")(x)  # projection: b3/proj and b3/conv2 coupled, a new group
        return nn.Dense(10, name="fc")(x.mean(axis=(1, 2)))


class Concat(nn.Module):
    """Inception/DenseNet style: two branches concatenated along channels."""

    @nn.compact
    def __call__(self, x):
        a = nn.relu(nn.Conv(4, (1, 1), name="a")(x))
        b = nn.relu(nn.Conv(6, (3, 3), name="b")(x))
        y = jnp.concatenate([a, b], axis=-1)
        y = nn.relu(nn.Conv(5, (1, 1), name="mix")(y))
        return nn.Dense(3, name="fc")(y.mean(axis=(1, 2)))


class Inverted(nn.Module):
    """MobileNetV2 inverted residual: expand 1x1, depthwise 3x3, linear project 1x1 (+ x)."""

    out: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1] * 4
        y = nn.relu6(_bn("bn_e")(nn.Conv(c, (1, 1), use_bias=False, name="expand")(x)))
        y = nn.relu6(_bn("bn_d")(nn.Conv(c, (3, 3), self.stride, feature_group_count=c, use_bias=False, name="dw")(y)))
        y = _bn("bn_p")(nn.Conv(self.out, (1, 1), use_bias=False, name="project")(y))
        return x + y if self.stride == 1 and x.shape[-1] == self.out else y


class MobileV2(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu6(_bn("stem_bn")(nn.Conv(4, (3, 3), use_bias=False, name="stem")(x)))
        x = Inverted(4, name="i1")(x)  # residual: stem and i1/project coupled
        x = Inverted(6, 2, name="i2")(x)  # no residual
        return nn.Dense(3, name="fc")(x.mean(axis=(1, 2)))


class Shared(nn.Module):
    """One Dense called on two inputs (shared weights)."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        a = nn.Dense(8, name="a")(x)
        b = nn.Dense(8, name="b")(x)
        shared = nn.Dense(5, name="shared")
        return nn.Dense(2, name="fc")(shared(a) + shared(b))


def init_variables(module, x, **kwargs):
    """Variables filled from numpy (eager init compiles every initializer op on this CPU)."""
    shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(0)
    fill = lambda path, s: (rng.uniform(0.5, 1.5, s.shape) if path[-1].key == "var" else rng.normal(size=s.shape) * 0.1)
    return jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(fill(p, s), jnp.float32), shapes)
