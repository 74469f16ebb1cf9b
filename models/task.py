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

from models.errors import ModelError

KINDS = ("classification", "regression")  # what a data set's targets are
# (what a message calls the split, input field, target field), in the order they are checked
SPLITS = (("training", "x_train", "y_train"), ("validation", "x_val", "y_val"), ("test", "x_test", "y_test"))


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

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """ModelError, one line naming the split and the fix, unless every split can be used:
        present and non-empty, as many targets as inputs, finite numeric inputs [N, ...] with
        the training split's rank and last axis (channels), and for classification integer
        labels [N] in 0..num_classes-1 (regression: finite targets). Runs at construction."""
        if self.kind not in KINDS:
            raise ModelError(f"data set {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "classification" and self.num_classes is not None and (
                not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1):
            raise ModelError(f"data set {self.name!r}: num_classes={self.num_classes!r} must be a positive integer "
                             "(or None to take it from the model's outputs)")
        first = None
        for split, xf, yf in SPLITS:
            x, y = _split_arrays(self, split, xf, yf)
            _check_split(self, split, xf, yf, x, y, first)
            first = first if first is not None else x

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


def _split_arrays(d: Dataset, split: str, xf: str, yf: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one split as numpy arrays (no copy of numpy input)."""
    x, y = getattr(d, xf), getattr(d, yf)
    if x is None or y is None:
        raise ModelError(f"data set {d.name!r}: the {split} split is missing ({xf if x is None else yf} is None): "
                         "give inputs and targets for every split (train, validation, test)")
    try:
        return np.asarray(x), np.asarray(y)
    except (TypeError, ValueError) as e:
        raise ModelError(f"data set {d.name!r}: the {split} split is not an array ({type(e).__name__}: {e}); "
                         "give numpy arrays") from None


def _check_split(d: Dataset, split: str, xf: str, yf: str, x: np.ndarray, y: np.ndarray,
                 first: np.ndarray | None) -> None:
    """ModelError naming `split` and the fix when its arrays cannot be used (see Dataset.check)."""
    where = f"data set {d.name!r}, {split} split:"
    if x.ndim < 2 or x.dtype.kind not in "biuf":
        raise ModelError(f"{where} {xf} has shape {x.shape} and dtype {x.dtype}: give numeric inputs of shape "
                         "[N, ...] (one example per row, e.g. [N, H, W, C] float32)")
    if len(x) == 0:
        raise ModelError(f"{where} it is empty ({xf} has shape {x.shape}): give it at least one example "
                         "(e.g. hold out part of the training data)")
    if y.ndim == 0 or len(y) != len(x):
        raise ModelError(f"{where} {xf} has {len(x)} examples but {yf} has {len(y) if y.ndim else 0} targets: "
                         "give one target per input")
    if first is not None and (x.ndim != first.ndim or x.shape[-1] != first.shape[-1]):
        raise ModelError(f"{where} {xf} has examples of shape {x.shape[1:]} but x_train's are {first.shape[1:]}: "
                         "give every split the same kind of input (rank and channels)")
    _check_finite(where, xf, x)
    if d.kind == "regression":
        if y.dtype.kind not in "biuf":
            raise ModelError(f"{where} {yf} has dtype {y.dtype}: give numeric regression targets")
        _check_finite(where, yf, y)
        return
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise ModelError(f"{where} {yf} has shape {y.shape} and dtype {y.dtype}: give integer class labels "
                         "of shape [N] (e.g. y.astype(np.int32), not one-hot)")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise ModelError(f"{where} {yf} holds the negative label {lo}: give class labels 0..C-1")
    if d.num_classes is not None and hi >= d.num_classes:
        raise ModelError(f"{where} {yf} holds label {hi} but num_classes={d.num_classes}: give labels "
                         f"0..{d.num_classes - 1} or raise num_classes")


def _check_finite(where: str, fname: str, a: np.ndarray) -> None:
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
        n = int(bad.sum())
        raise ModelError(f"{where} {fname} has NaN or infinite values in {n} example{'s' * (n != 1)} (the first "
                         f"is example {int(np.argmax(bad))}): replace or drop them")


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

    def check(self, batch_size: int | None = None, variables: Any = None) -> None:
        """ModelError, one line naming the split and the fix, unless the data can train and
        evaluate this model: a training split of at least
        `batch_size` examples, and for a Linen module outputs that fit every split's targets
        (classification: [N, C] scores with C = num_classes and every label < C; regression:
        the targets' shape), found by jax.eval_shape, so nothing is computed. `variables`: the
        trained weights (variables dict or bare params); None checks a fresh init's shapes.
        The splits themselves were checked when the Dataset was built (Dataset.check), once:
        a search builds several Engines, and each calls this."""
        d = self.data
        if batch_size is not None and batch_size > len(d.x_train):
            raise ModelError(f"data set {d.name!r}, training split: it has {len(d.x_train)} examples, fewer than "
                             f"the batch size {batch_size}: give at least {batch_size} training examples or use "
                             f"a batch size of at most {len(d.x_train)} (--finetune-batch-size; compress(finetune_batch_size=...))")
        if not isinstance(self.module, nn.Module):  # NNX modules and functions are checked as they run
            return
        kwargs = dict(self.eval_kwargs)
        if variables is None:  # a fresh init's shapes, for the training split's examples
            x = jax.ShapeDtypeStruct((1, *d.input_shape), np.float32)
            variables = self._run(lambda x: self.module.init(jax.random.PRNGKey(0), x, **kwargs), "training", x)
        variables = join_variables(*split_variables(variables))
        outputs: dict[tuple[int, ...], Any] = {}
        for split, xf, yf in SPLITS:
            shape, y = tuple(np.shape(getattr(d, xf))[1:]), np.asarray(getattr(d, yf))
            if shape not in outputs:
                x = jax.ShapeDtypeStruct((1, *shape), np.float32)
                outputs[shape] = self._run(lambda v, x: self.module.apply(v, x, **kwargs), split, variables, x)
            self._check_output(outputs[shape], split, yf, y)

    def _run(self, fn: Callable, split: str, *args: Any) -> Any:
        """jax.eval_shape(fn, *args), the last arg one example of `split`; ModelError when the
        model does not run on it."""
        x = args[-1]
        try:
            return jax.eval_shape(fn, *args)
        except Exception as e:  # noqa: BLE001 - the user's model on the user's data: say so in one line
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            raise ModelError(f"model {self.name!r} does not run on the {split} split of {self.data.name!r} "
                             f"(examples of shape {tuple(x.shape[1:])}): {type(e).__name__}: {msg}; give every split "
                             "examples of the shape the model and its weights were built for") from e

    def _check_output(self, out: Any, split: str, yf: str, y: np.ndarray) -> None:
        """ModelError when the abstract output `out` of one example does not fit targets `y`."""
        d, where = self.data, f"model {self.name!r} on the {split} split of {self.data.name!r}:"
        if not hasattr(out, "shape"):
            return  # several outputs: the task's own loss and metric take them
        if d.kind == "regression":
            if tuple(out.shape[1:]) != tuple(y.shape[1:]):
                raise ModelError(f"{where} outputs have shape {tuple(out.shape[1:])} per example but {yf} has "
                                 f"{tuple(y.shape[1:])}: give targets of the model's output shape")
            return
        scores = int(out.shape[1]) if len(out.shape) == 2 else None
        if scores is None or (d.num_classes is not None and scores != d.num_classes):
            want = d.num_classes if d.num_classes is not None else "C"
            raise ModelError(f"{where} outputs have shape {tuple(out.shape[1:])} per example but a classifier "
                             f"gives one score per class, [N, {want}]: end the model in nn.Dense({want})")
        if int(y.max()) >= scores:
            raise ModelError(f"{where} {yf} holds label {int(y.max())} but the model gives {scores} class scores: "
                             f"give labels 0..{scores - 1} or a model with more outputs")


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
