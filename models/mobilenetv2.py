"""MobileNetV2 of Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
sized for small inputs.

Inverted residual blocks: expand 1x1 (by t) + BN + ReLU6, depthwise 3x3 + BN + ReLU6, project
1x1 + BN with no activation (the linear bottleneck), and a residual add when the block keeps
stride 1 and its channel count. The paper's table 2 is for 224x224 ImageNet; the default
blocks here are the first four rows shortened, with strides for 28x28 (Fashion-MNIST).
The stem keeps stride 1 on such small inputs.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax

from models.conv import depthwise_conv
from models.resnet import batch_norm, he_normal

# (t expansion, c output channels, n repeats, s stride of the first repeat), as table 2
Blocks = tuple[tuple[int, int, int, int], ...]
BLOCKS_28 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2))  # 28 -> 14 -> 7 -> 4
BLOCKS_8 = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 2, 2))  # 8 -> 8 -> 4 -> 2


def make_divisible(v: float, divisor: int = 8) -> int:
    """`v` rounded to the nearest multiple of `divisor`, never below it nor 10% below `v`
    (the reference implementation's `_make_divisible`)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """Expand 1x1 (skipped when t == 1), depthwise 3x3, linear project 1x1; residual add
    when stride == 1 and in == out channels. Names: "expand", "expand_bn", "dw", "dw_bn",
    "project", "project_bn"."""

    features: int  # output channels (c)
    stride: int = 1  # stride of the depthwise conv (s)
    expansion: int = 6  # hidden channels = expansion * input channels (t)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = functools.partial(batch_norm, use_running_average=not train)
        cin = x.shape[-1]
        hidden = cin * self.expansion
        h = x
        if self.expansion != 1:
            h = nn.Conv(hidden, (1, 1), use_bias=False, kernel_init=he_normal, name="expand")(h)
            h = nn.relu6(norm(name="expand_bn")(h))
        h = nn.Conv(hidden, (3, 3), strides=self.stride, padding="SAME", use_bias=False,
                    feature_group_count=hidden, kernel_init=he_normal,
                    conv_general_dilated=depthwise_conv, name="dw")(h)
        h = nn.relu6(norm(name="dw_bn")(h))
        h = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=he_normal, name="project")(h)
        h = norm(name="project_bn")(h)
        return x + h if self.stride == 1 and cin == self.features else h


class MobileNetV2(nn.Module):
    """Stem conv 3x3 (32 * width channels) + BN + ReLU6, inverted residual blocks "b1", "b2",
    ... (one per repeat), conv 1x1 "last" + BN + ReLU6, global average pool, dense "fc".

    Channels are make_divisible(c * width); `last` is not reduced when width < 1 (as in the
    paper).
    """

    num_classes: int = 10
    width: float = 1.0  # width multiplier of every layer
    blocks: Blocks = BLOCKS_28  # rows (t, c, n, s) of table 2
    last: int = 256  # channels of the final 1x1 conv (1280 in the paper)
    stem: int = 32  # channels of the stem conv (before the width multiplier)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = functools.partial(batch_norm, use_running_average=not train)
        x = nn.Conv(make_divisible(self.stem * self.width), (3, 3), padding="SAME", use_bias=False,
                    kernel_init=he_normal, name="stem")(x)
        x = nn.relu6(norm(name="stem_bn")(x))
        i = 0
        for t, c, n, s in self.blocks:
            for r in range(n):
                i += 1
                x = InvertedResidual(make_divisible(c * self.width), s if r == 0 else 1, t,
                                     name=f"b{i}")(x, train)
        last = make_divisible(self.last * max(1.0, self.width))
        x = nn.Conv(last, (1, 1), use_bias=False, kernel_init=he_normal, name="last")(x)
        x = nn.relu6(norm(name="last_bn")(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)
