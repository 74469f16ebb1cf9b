"""VDSR (Kim et al.): a stack of 3x3 convs that learns the residual over bicubic upscaling."""
from __future__ import annotations

import flax.linen as nn
import jax


class VDSR(nn.Module):
    """depth 3x3 convs (ReLU between), `width` channels, output added to the bicubic input.

    The input is the bicubic-upscaled low-resolution image, so the network only has to learn
    the missing detail. The last conv starts at zero: training begins exactly at bicubic.
    """

    depth: int = 8  # number of conv layers (the paper: 20)
    width: int = 32  # channels of the hidden convs (the paper: 64)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for i in range(self.depth - 1):
            h = nn.relu(nn.Conv(self.width, (3, 3), padding="SAME", name=f"conv{i + 1}")(h))
        r = nn.Conv(x.shape[-1], (3, 3), padding="SAME", kernel_init=nn.initializers.zeros,
                    name=f"conv{self.depth}")(h)
        return x + r
