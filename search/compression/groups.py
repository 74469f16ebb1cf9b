"""A plan as the channel groups run it (search.compression.graph traces the groups): one
pruning decision per group, exact kept-channel counts."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from search.compression.plan import CHANNEL, UNSTRUCTURED


def kept_channels(ratio: np.ndarray, channels: Any) -> np.ndarray:
    """Channels a channel-pruned group of `channels` keeps at `ratio` (the masks' count:
    C - round(ratio * C) in float32, at least 1), float64, broadcast."""
    c = np.asarray(channels, np.float32)
    pruned = np.clip(np.round(np.asarray(ratio, np.float32) * c), 0, np.maximum(c - 1, 0))
    return (c - pruned).astype(np.float64)


def tie_plan(plan: Any, layers: Sequence[Any]) -> Any:
    """The plan as the layers run it ([..., L] numpy or jax arrays): every layer takes its
    group leader's prune ratio and granularity (one decision per group), and a group whose
    channels are fixed (`Layer.fixed`) is pruned unstructured where the plan says channel.
    Bit widths and quantization modes stay per layer."""
    leaders = np.array([layer.group for layer in layers], np.int64)
    fixed = np.array([layer.fixed is not None for layer in layers], bool)
    xp = np if isinstance(plan.ratio, np.ndarray) else jax.numpy
    gran = plan.granularity[..., leaders]
    gran = xp.where(fixed & (gran == CHANNEL), UNSTRUCTURED, gran)
    return dataclasses.replace(plan, ratio=plan.ratio[..., leaders], granularity=gran)


def group_members(layers: Sequence[Any]) -> dict[int, list[int]]:
    """{leader index: the indices of its group's layers}, in forward order."""
    out: dict[int, list[int]] = {}
    for layer in layers:
        out.setdefault(layer.group, []).append(layer.index)
    return out
