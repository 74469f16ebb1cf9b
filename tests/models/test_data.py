"""Data sets: deterministic seeded splits, value ranges, the missing Fashion-MNIST error."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from models import load_dataset
from models.data import (
    FASHION_MNIST_DIR,
    load_digits,
    load_fashion_mnist,
    read_idx,
    split_indices,
)
from models.data_sr import load_sr_images
from models.errors import ModelError
from search.cli import main as cli_main

SPLITS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


def test_digits_splits_are_deterministic_and_seeded():
    a, b, c = load_digits(0), load_digits(0), load_digits(1)
    for s in SPLITS:
        np.testing.assert_array_equal(getattr(a, s), getattr(b, s))
    assert not np.array_equal(a.x_test, c.x_test)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (1257, 180, 360)
    assert a.x_train.dtype == np.float32 and a.x_train.shape[1:] == (8, 8, 1)
    assert 0.0 <= a.x_train.min() and a.x_train.max() == 1.0


def test_split_indices_partition_the_set():
    tr, va, te = split_indices(1797, 180, 360, seed=0)
    together = np.concatenate([tr, va, te])
    assert len(together) == 1797 and sorted(together.tolist()) == list(range(1797))


def test_datasets_are_read_only_and_shared():
    d = load_dataset("digits", seed=3)
    assert d is load_dataset("digits", seed=3)
    with pytest.raises(ValueError):
        d.x_train[0, 0, 0, 0] = 1.0


def test_missing_fashion_mnist_gives_one_line_error(tmp_path):
    with pytest.raises(ModelError) as e:
        load_fashion_mnist(tmp_path / "nowhere")
    msg = str(e.value)
    assert "\n" not in msg
    assert "dataset-fashion-mnist" in msg and "--data-dir" in msg and "nowhere" in msg


def test_missing_fashion_mnist_from_cli(tmp_path, capsys):
    rc = cli_main(["train", "--model", "lenet300", "--dataset", "fashion-mnist",
                   "--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "dataset-fashion-mnist" in err


def _write_idx(path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_round_trip_and_truncation(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    with gzip.open(tmp_path / "b.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ModelError, match="truncated"):
        read_idx(tmp_path / "b.gz")


def test_fashion_mnist_from_a_data_dir(tmp_path):
    """A small Fashion-MNIST-shaped set in IDX files: the loader's splits and scaling."""
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (5100, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 5100))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (7, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 7))
    d = load_fashion_mnist(tmp_path, seed=0)
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (100, 5000, 7)
    assert d.x_train.shape[1:] == (28, 28, 1) and d.x_train.max() <= 1.0
    np.testing.assert_array_equal(d.x_val, load_fashion_mnist(tmp_path, seed=0).x_val)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_shapes():
    d = load_dataset("fashion-mnist")
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (55000, 5000, 10000)
    assert sorted(np.unique(d.y_test).tolist()) == list(range(10))


def test_sr_images_deterministic_and_bicubic_info():
    a, b = load_sr_images(0, n_patches=64), load_sr_images(0, n_patches=64)
    for s in SPLITS:
        np.testing.assert_array_equal(getattr(a, s), getattr(b, s))
    c = load_sr_images(1, n_patches=64)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == a.y_train.shape == (64, 32, 32, 1)
    assert a.x_test.shape[1:] == (256, 256, 1) and len(a.x_val) == 2 and len(a.x_test) == 3
    held_out = set(a.info["val_images"]) | set(a.info["test_images"])
    assert not held_out & set(a.info["train_images"])
    # bicubic is a real loss of detail, but not a catastrophic one
    for split in ("train", "val", "test"):
        assert 20.0 < a.info["bicubic_psnr_db"][split] < 50.0


def test_digits_are_scikit_learns_without_importing_it():
    """The bundled file read directly gives exactly sklearn.datasets.load_digits' arrays, and
    loading digits imports no scikit-learn (seconds of every search's start)."""
    import subprocess
    import sys
    from pathlib import Path

    from sklearn.datasets import load_digits as sk_digits

    from models.data import _digits_arrays

    images, target = _digits_arrays()
    d = sk_digits()
    np.testing.assert_array_equal(images, d.images)
    np.testing.assert_array_equal(target, d.target)
    code = "import sys; from models.data import load_digits; load_digits(0); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"
