"""What a task is: a Flax module with named layers, its data, a loss and a quality metric.

Every split is a fixed-shape numpy array so one jitted step serves every batch and every
plan. Inputs are NHWC float32 (an MLP flattens them itself).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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
    seed: int = 0  # parameter init, batch order and augmentation
    crop: int = 0  # augmentation: random shifts of up to this many pixels (zero fill); 0: none
    flip: bool = False  # augmentation: random horizontal flips (not for digits: 2 is not a 5)


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
    # call arguments of module.apply at evaluation, e.g. {"train": False} (BatchNorm uses its
    # running averages); also used at init
    eval_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # call arguments while training the baseline, e.g. {"train": True} (BatchNorm uses batch
    # statistics and updates its running averages)
    train_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def init_variables(self, seed: int | None = None) -> dict[str, Any]:
        """Fresh variables for this module and input shape: every collection, e.g.
        {"params": ..., "batch_stats": ...} ({"params": ...} for a stateless module).

        Called with eval_kwargs. Compiled whole, once per module: much faster on CPU than
        compiling each initializer op eagerly (the values are the same).
        """
        rng = jax.random.PRNGKey(self.train.seed if seed is None else seed)
        x = np.zeros((1, *self.data.input_shape), np.float32)
        kwargs = tuple(sorted(self.eval_kwargs.items()))
        if isinstance(rng, jax.core.Tracer):  # under jax.eval_shape / jit: trace, don't compile
            return dict(functools.partial(self.module.init, **dict(kwargs))(rng, x))
        return dict(_compiled_init(self.module, kwargs, x.shape)(rng, x))

    def init_params(self, seed: int | None = None) -> Any:
        """Fresh parameters: init_variables(seed)["params"]."""
        return self.init_variables(seed)["params"]


@functools.lru_cache(maxsize=64)
def _compiled_init(module: nn.Module, kwargs: tuple[tuple[str, Any], ...],
                   shape: tuple[int, ...]) -> Callable:
    """module.init(rng, x, **kwargs) compiled once per (hashable, immutable) module and shape.

    At backend optimization level 1: init runs once, and XLA:CPU's default level 3 spent ~20 s
    on the threefry of a small ResNet's initializers (~5 s at level 1; for every zoo model the
    values were bit-identical to level 3's, and to eager init; level 0 changed the last bit).
    """
    init = jax.jit(functools.partial(module.init, **dict(kwargs)))
    lowered = init.lower(jax.random.PRNGKey(0), np.zeros(shape, np.float32))
    try:
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 1})
    except Exception:  # noqa: BLE001 - a backend without the option: compile as usual
        return init


def split_variables(tree: Any) -> tuple[Any, dict[str, Any]]:
    """(params, state) of a Flax variables dict or of a bare params tree.

    A Mapping with a "params" key that is itself a Mapping is a variables dict
    ({"params": ..., "batch_stats": ...}): params is tree["params"] and state every other
    collection. Anything else is a bare params tree: (tree, {}). (A bare params tree whose
    top-level layer were named "params" would be taken for a variables dict: the zoo names
    no layer so.)
    """
    if isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping):
        return tree["params"], {k: v for k, v in tree.items() if k != "params"}
    return tree, {}


def join_variables(params: Any, state: Mapping[str, Any]) -> dict[str, Any]:
    """The Flax variables dict {"params": params, **state} (split_variables' inverse)."""
    return {"params": params, **state}
