"""DemosaicNet (Gharbi et al., SIGGRAPH Asia 2016, "Deep Joint Demosaicking and Denoising").

A Bayer mosaic (RGGB: R at (0, 0), G at (0, 1) and (1, 0), B at (1, 1) of every 2x2 block) is
packed into 4 half-resolution planes, one per position of the 2x2 block, and the known noise
level is appended as a fifth, constant plane (the paper's noisy variant). A stack of 3x3 convs
at half resolution predicts 12 values per 2x2 block: 3 colours at 4 positions, unpacked to full
resolution (depth-to-space). That image is concatenated with the masked input mosaic (each
pixel's sample in its own colour channel, zeros elsewhere) and a 3x3 conv and a 1x1 conv at full
resolution produce the RGB output (the paper's second stage).

The upsampling is a fixed depth-to-space (a reshape and a transpose): the reference code's
grouped 2x2 transposed conv after a 1x1 conv is the same linear map as this 1x1 conv to 12
channels, and the ONNX export handles reshapes and transposes but not transposed convs.

Initialization: the full-resolution convs start as bilinear demosaicking of the masked mosaic
(the first 3 channels of `fullres` hold the bilinear kernels, `output` reads them), so training
begins at the classical method, as VDSR begins at bicubic, and learns what improves on it.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The colour of each packed plane: index 2 * row + column within the 2x2 RGGB block.
PLANE_COLOURS = ((1, 0, 0), (0, 1, 0), (0, 1, 0), (0, 0, 1))  # [4 planes, 3 colours] 0/1

# Bilinear interpolation of the masked mosaic: green from its 4 neighbours, red and blue from
# 2 or 4 (the bilinear method that Malvar et al. 2004 compare against).
_K_GREEN = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4
_K_RED_BLUE = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 4
BILINEAR_KERNELS = np.stack([_K_RED_BLUE, _K_GREEN, _K_RED_BLUE], axis=-1)  # [3, 3, colour]


def depth_to_space(x: jax.Array) -> jax.Array:
    """[B, h, w, 4 C] -> [B, 2h, 2w, C]: channel 4 c + 2 dy + dx goes to pixel (2i + dy, 2j + dx)
    of colour c (PyTorch's pixel_shuffle order; Shi et al. 2016's sub-pixel convolution)."""
    b, h, w, c4 = x.shape
    c = c4 // 4
    x = x.reshape(b, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, 2 * h, 2 * w, c)


def masked_mosaic(packed: jax.Array) -> jax.Array:
    """[B, h, w, 4] packed RGGB planes -> [B, 2h, 2w, 3] full-resolution mosaic with each
    sample in its own colour channel and zeros in the other two (the inverse of packing)."""
    colours = np.asarray(PLANE_COLOURS, np.float32)  # [4, 3]
    blocks = [packed * colours[:, c] for c in range(3)]  # colour-major, as depth_to_space reads
    return depth_to_space(jnp.concatenate(blocks, axis=-1))


def _fullres_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """`fullres` kernel [3, 3, 6, W]: Flax's default init, then output channels 0-2 replaced by
    the bilinear kernels on input channels 0-2 (the masked mosaic's R, G, B)."""
    start = np.zeros((*shape[:3], 3), np.float32)
    for c in range(3):
        start[:, :, c, c] = BILINEAR_KERNELS[..., c]
    return nn.initializers.lecun_normal()(key, shape, dtype).at[..., :3].set(jnp.asarray(start, dtype))


def _output_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """`output` kernel [1, 1, W, 3]: colour c reads `fullres` channel c, nothing else."""
    k = np.zeros(shape, np.float32)
    k[0, 0, :3, :3] = np.eye(3)
    return jnp.asarray(k, dtype)


class DemosaicNet(nn.Module):
    """Joint demosaicking and denoising: [B, h, w, 4 + noise planes] -> [B, 2h, 2w, 3] RGB.

    Layers: conv1..conv{depth} (3x3, `width` channels, ReLU, half resolution), `subpixel`
    (1x1 to 12 = 3 colours x 4 positions, unpacked by depth_to_space), `fullres` (3x3 on the
    6 channels of mosaic and unpacked image, `width` channels, ReLU) and `output` (1x1 to RGB).
    The paper: depth 15, width 64. width >= 3 (the bilinear start uses 3 channels).
    """

    depth: int = 6  # 3x3 convs at half resolution (the paper: 15)
    width: int = 32  # channels of the hidden convs (the paper: 64)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for i in range(self.depth):
            h = nn.relu(nn.Conv(self.width, (3, 3), padding="SAME", name=f"conv{i + 1}")(h))
        up = depth_to_space(nn.Conv(12, (1, 1), name="subpixel")(h))
        h = jnp.concatenate([masked_mosaic(x[..., :4]), up], axis=-1)
        h = nn.relu(nn.Conv(self.width, (3, 3), padding="SAME", kernel_init=_fullres_init, name="fullres")(h))
        return nn.Conv(3, (1, 1), kernel_init=_output_init, name="output")(h)
