"""Layer discovery: every Dense and Conv of a Flax model, from one abstract forward pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Layer:
    """One compressible layer; index is its position in every plan array."""

    index: int  # position in the [L] plan axis (order of the forward pass)
    name: str  # "/".join(path), e.g. "conv1" or "block1/dw"
    path: tuple[str, ...]  # path of the module's params in the params tree
    kind: Literal["dense", "conv", "depthwise"]  # depthwise: feature_group_count == in channels
    kernel_shape: tuple[int, ...]  # Dense [in, out]; Conv [kh, kw, in/groups, out]
    in_shape: tuple[int, ...]  # input activation shape of one example (no batch axis)
    out_shape: tuple[int, ...]  # output activation shape of one example
    groups: int  # feature_group_count (1 for Dense)
    has_bias: bool  # whether a bias follows the kernel
    macs: int  # multiply-accumulates for one example
    params: int  # kernel + bias parameter count

    @property
    def out_channels(self) -> int:
        return int(self.kernel_shape[-1])

    @property
    def fan_in(self) -> int:
        """Weights feeding one output unit (kernel size without the output axis)."""
        n = 1
        for d in self.kernel_shape[:-1]:
            n *= int(d)
        return n

    @property
    def weight_count(self) -> int:
        return self.fan_in * self.out_channels
