"""What a task is: a Flax module with named layers, its data, a loss and a quality metric.

Every split is a fixed-shape numpy array so one jitted step serves every batch and every
plan. Inputs are NHWC float32 (an MLP flattens them itself).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import numpy as np


@dataclass(frozen=True, eq=False)
class Dataset:
    """Deterministic train / validation / test splits of one data set."""

    name: str  # registry name, e.g. "digits"
    kind: Literal["classification", "regression"]  # what the targets are
    x_train: np.ndarray  # [N, H, W, C] float32
    y_train: np.ndarray  # [N] int32 labels, or [N, H, W, C] float32 targets
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None = None  # classes for classification, None otherwise
    seed: int = 0  # the seed the splits were drawn with
    source: str = ""  # where the data came from (package, directory)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. bicubic PSNR for sr-images

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch axis."""
        return tuple(self.x_train.shape[1:])

    def fingerprint(self) -> str:
        """A short content hash: the cache key changes when the data does."""
        import hashlib

        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


# loss(outputs [B, ...], targets [B, ...]) -> scalar mean loss, differentiable.
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
# metric(outputs [B, ...], targets [B, ...]) -> [B] per-example quality, higher is better;
# the quality of a split is the mean over its examples.
MetricFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclass(frozen=True)
class TrainConfig:
    """Baseline training hyper-parameters (they are part of the cache key)."""

    steps: int = 2000  # optimizer steps
    batch_size: int = 128  # examples per step
    learning_rate: float = 1e-3  # peak Adam learning rate (cosine decay)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    seed: int = 0  # parameter init and batch order


@dataclass(frozen=True, eq=False)
class Task:
    """A model to compress: module + data + loss + metric."""

    name: str  # registry name of the model, e.g. "lenet300"
    module: nn.Module  # a Flax Linen module whose Dense/Conv layers have explicit names
    data: Dataset  # the splits
    loss: LossFn  # training loss
    metric: MetricFn  # per-example quality, higher is better
    metric_name: str  # "accuracy" or "psnr_db"
    train: TrainConfig = TrainConfig()  # how the baseline is trained
    hparams: dict[str, Any] = field(default_factory=dict)  # model options (depth, width, ...)

    def init_params(self, seed: int | None = None) -> Any:
        """Fresh parameters for this module and input shape.

        Jitted: one compile of the whole init is much faster on CPU than compiling each
        initializer op eagerly (the values are the same).
        """
        rng = jax.random.PRNGKey(self.train.seed if seed is None else seed)
        x = np.zeros((1, *self.data.input_shape), np.float32)
        return _jit_init(self.module)(rng, x)["params"]


@functools.lru_cache(maxsize=64)
def _jit_init(module: nn.Module) -> Callable:
    """module.init compiled once per (hashable, immutable) module."""
    return jax.jit(module.init)
