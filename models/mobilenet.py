"""A small MobileNet-style CNN: the family HAQ, AMC and NetAdapt report on.

Depthwise-separable blocks (a depthwise 3x3 conv with one filter per channel, then a
pointwise 1x1 conv) so that the search meets depthwise layers too.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from models.conv import depthwise_conv


class SeparableBlock(nn.Module):
    """Depthwise 3x3 (groups = channels) + ReLU, then pointwise 1x1 + ReLU."""

    features: int  # output channels of the pointwise conv
    stride: int = 1  # stride of the depthwise conv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = nn.Conv(c, (3, 3), strides=self.stride, padding="SAME", feature_group_count=c,
                    conv_general_dilated=depthwise_conv, name="dw")(x)
        x = nn.relu(x)
        return nn.relu(nn.Conv(self.features, (1, 1), name="pw")(x))


class MobileNet(nn.Module):
    """Stem conv 3x3, separable blocks, global average pool, dense classifier."""

    num_classes: int = 10
    stem: int = 16  # channels of the stem conv
    stem_stride: int = 1  # 1 for 8x8 inputs, 2 for 28x28
    blocks: tuple[tuple[int, int], ...] = ((32, 1), (64, 2), (128, 2))  # (features, stride)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(self.stem, (3, 3), strides=self.stem_stride, padding="SAME",
                            name="stem")(x))
        for i, (features, stride) in enumerate(self.blocks):
            x = SeparableBlock(features, stride, name=f"block{i + 1}")(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)
