"""LeNet-300-100 and the Caffe LeNet-5, the models of Han et al. and Deep Compression."""
from __future__ import annotations

import flax.linen as nn
import jax


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, as a reshape and a max: the same values as nn.max_pool,
    but its gradient is cheap on XLA:CPU (select_and_scatter is slow there). Odd sizes
    drop the last row/column, as VALID pooling does."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LeNet300(nn.Module):
    """MLP 300-100-classes with ReLU; flattens NHWC input itself."""

    num_classes: int = 10
    hidden: tuple[int, ...] = (300, 100)  # widths of the hidden Dense layers

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"fc{i + 1}")(x))
        return nn.Dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x)


class LeNet5(nn.Module):
    """Caffe LeNet-5: conv 5x5x20, pool 2, conv 5x5x50, pool 2, dense 500, dense classes.

    Caffe's model has no activation between the convolutions; like most ports we put a ReLU
    after every layer but the last. VALID padding matches Caffe on 28x28; 8x8 inputs need SAME.
    """

    num_classes: int = 10
    padding: str = "VALID"  # "VALID" (28x28 as in Caffe) or "SAME" (small inputs)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(20, (5, 5), padding=self.padding, name="conv1")(x))
        x = max_pool2(x)
        x = nn.relu(nn.Conv(50, (5, 5), padding=self.padding, name="conv2")(x))
        x = max_pool2(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(500, name="fc1")(x))
        return nn.Dense(self.num_classes, name="fc2")(x)
