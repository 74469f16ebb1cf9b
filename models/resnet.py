"""The CIFAR ResNets of He et al. 2016, "Deep Residual Learning for Image Recognition",
section 4.2: 6n+2 layers (n = `depth` basic blocks per stage; n=3 is ResNet-20).

A stem conv 3x3 with 16 filters, three stages of basic blocks with 16, 32 and 64 filters
(times `width`) on feature maps of size s, s/2 and s/4 (stride 2 at the first conv of stages
2 and 3), global average pooling and a dense classifier. Convolutions have no bias: the
BatchNorm after each one has it. Residual adds and BatchNorm give the search the dependency
groups and BN folding it has to handle.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's BatchNorm defaults (momentum 0.1 there is 1 - 0.9 here), as the paper's Torch code
batch_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # He et al. 2015


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    The shortcut is the identity when the shapes match; otherwise "projection" (option B:
    conv 1x1 with the block's stride, no bias, + BN, named "proj" and "proj_bn") or
    "padding" (option A: take every stride-th pixel and append zero channels; no params).
    """

    features: int  # output channels of both convs
    stride: int = 1  # stride of conv1 (and of the shortcut)
    shortcut: str = "projection"  # "projection" (option B) or "padding" (option A)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = functools.partial(batch_norm, use_running_average=not train)
        conv = functools.partial(nn.Conv, self.features, use_bias=False, kernel_init=he_normal)
        y = conv((3, 3), strides=self.stride, padding="SAME", name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv((3, 3), padding="SAME", name="conv2")(y)
        y = norm(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.shortcut == "projection":
                x = conv((1, 1), strides=self.stride, padding="VALID", name="proj")(x)
                x = norm(name="proj_bn")(x)
            else:
                x = x[:, :: self.stride, :: self.stride, :]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.features - x.shape[-1])))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet-(6*depth+2): stem, three stages of `depth` basic blocks, pool, dense.

    Layer names: "stem", "stem_bn", blocks "s{stage}b{block}" (1-based) holding "conv1",
    "bn1", "conv2", "bn2" and, on a projection shortcut, "proj", "proj_bn"; the head "fc".
    """

    num_classes: int = 10
    depth: int = 3  # basic blocks per stage (n of the paper: 3 -> ResNet-20, 9 -> ResNet-56)
    width: float = 1.0  # multiplier of the stage widths (16, 32, 64)
    shortcut: str = "projection"  # where shapes change: "projection" (B) or "padding" (A)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        widths = [max(1, round(c * self.width)) for c in (16, 32, 64)]
        x = nn.Conv(widths[0], (3, 3), padding="SAME", use_bias=False, kernel_init=he_normal,
                    name="stem")(x)
        x = nn.relu(batch_norm(use_running_average=not train, name="stem_bn")(x))
        for s, features in enumerate(widths):
            for b in range(self.depth):
                stride = 2 if s > 0 and b == 0 else 1
                x = BasicBlock(features, stride, self.shortcut, name=f"s{s + 1}b{b + 1}")(x, train)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)
