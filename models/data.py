"""Classification data sets: scikit-learn's bundled digits and Fashion-MNIST from IDX files.

Splits are drawn once from a seed and returned as read-only float32 NHWC arrays, so the
same seed always gives the same arrays and a cached baseline stays valid.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from models.errors import ModelError
from models.task import Dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's package puts it
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only contiguous copy: datasets are shared between tasks in one process."""
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def split_indices(n: int, n_val: int, n_test: int, seed: int) -> tuple[np.ndarray, ...]:
    """(train, val, test) index arrays of a seeded permutation of range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float64, labels [1797]) of scikit-learn's bundled digits.

    Read from scikit-learn's own data file without importing scikit-learn (with SciPy that
    import was 1-3 s of every search on a 2-core CPU); through sklearn.datasets if the file
    is not where scikit-learn keeps it."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package, imports nothing
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root, "datasets", "data", "digits.csv.gz")
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")  # 64 pixels, then the label, per row
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return d.images, d.target


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8x8 digits scaled to [0, 1]: 1257 train, 180 val, 360 test."""
    images, target = _digits_arrays()
    x = (images / 16.0).astype(np.float32)[..., None]
    y = target.astype(np.int32)
    tr, va, te = split_indices(len(x), 180, 360, seed)
    return Dataset(
        name="digits", kind="classification",
        x_train=_frozen(x[tr]), y_train=_frozen(y[tr]),
        x_val=_frozen(x[va]), y_val=_frozen(y[va]),
        x_test=_frozen(x[te]), y_test=_frozen(y[te]),
        num_classes=10, seed=seed, source="scikit-learn bundled digits",
    )


def _idx_path(data_dir: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ModelError(f"{path} is not an unsigned-byte IDX file: reinstall dataset-fashion-mnist")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ModelError(f"{path} is truncated ({data.size} bytes, expected {int(np.prod(dims))}): "
                         "reinstall dataset-fashion-mnist")
    return data.reshape(dims)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """Fashion-MNIST 28x28: 55000 train and 5000 val drawn from the official train set by
    the seed, the official 10000 test images as test."""
    root = Path(data_dir or FASHION_MNIST_DIR)
    paths = {k: _idx_path(root, stem) for k, stem in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] + ".gz" for k, p in paths.items() if p is None]
    if missing:
        raise ModelError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): install the "
            f"Debian package dataset-fashion-mnist or pass --data-dir DIR with the IDX files")
    arr = {k: read_idx(p) for k, p in paths.items()}
    x_all = (arr["x_train"].astype(np.float32) / 255.0)[..., None]
    y_all = arr["y_train"].astype(np.int32)
    tr, va, _ = split_indices(len(x_all), 5000, 0, seed)
    return Dataset(
        name="fashion-mnist", kind="classification",
        x_train=_frozen(x_all[tr]), y_train=_frozen(y_all[tr]),
        x_val=_frozen(x_all[va]), y_val=_frozen(y_all[va]),
        x_test=_frozen((arr["x_test"].astype(np.float32) / 255.0)[..., None]),
        y_test=_frozen(arr["y_test"].astype(np.int32)),
        num_classes=10, seed=seed, source=str(root),
    )
