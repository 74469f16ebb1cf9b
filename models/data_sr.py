"""sr-images: x2 super-resolution data from scikit-image's bundled sample images.

Every image is turned to grayscale in [0, 1]; its low-resolution version is a bicubic x2
downscale, and the network input is that image upscaled back by bicubic interpolation (as
in VDSR), so input and target have the same size. Training uses random patches of the
training images; validation and test use whole held-out images, centre-cropped to one
size. The seed decides which images are held out and where the patches are.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.data import _frozen
from models.task import Dataset

SCALE = 2  # upscaling factor
# Images that can be held out (both sides >= EVAL_SIZE); bundled with scikit-image, offline.
EVAL_POOL = ("camera", "astronaut", "coffee", "chelsea", "rocket", "moon", "coins", "clock",
             "immunohistochemistry", "grass", "gravel", "brick")
TRAIN_ONLY = ("page", "text")  # too small to crop for evaluation, still good training data
EVAL_SIZE = 256  # side of the centre crop of held-out images
N_VAL, N_TEST = 2, 3  # held-out images per split
PATCH = 32  # side of a training patch
N_PATCHES = 4096  # training patches


def _gray(name: str) -> np.ndarray:
    """A bundled sample image as float32 grayscale in [0, 1], cropped to even sides."""
    import skimage.color
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 3:
        img = skimage.color.rgb2gray(img[..., :3])
    else:
        img = img.astype(np.float64) / 255.0
    h, w = (img.shape[0] // SCALE) * SCALE, (img.shape[1] // SCALE) * SCALE
    return img[:h, :w].astype(np.float32)


def bicubic_pair(hr: np.ndarray) -> np.ndarray:
    """The network input for one high-resolution image: bicubic down x2, then up x2."""
    h, w = hr.shape
    lr = jax.image.resize(jnp.asarray(hr), (h // SCALE, w // SCALE), "cubic", antialias=True)
    up = jax.image.resize(lr, (h, w), "cubic")
    return np.clip(np.asarray(up), 0.0, 1.0).astype(np.float32)


def _centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[top:top + size, left:left + size]


def _psnr(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over examples of the per-example PSNR in dB (data range 1)."""
    err = np.mean((x - y) ** 2, axis=tuple(range(1, x.ndim)))
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(err, 1e-12))))


def load_sr_images(seed: int = 0, n_patches: int = N_PATCHES) -> Dataset:
    """Patches of the training images; whole held-out images for validation and test."""
    rng = np.random.default_rng(seed)
    order = [EVAL_POOL[i] for i in rng.permutation(len(EVAL_POOL))]
    val_names, test_names = order[:N_VAL], order[N_VAL:N_VAL + N_TEST]
    train_names = sorted(order[N_VAL + N_TEST:]) + list(TRAIN_ONLY)

    def held_out(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        hr = np.stack([_centre_crop(_gray(n), EVAL_SIZE) for n in names])
        return np.stack([bicubic_pair(h) for h in hr])[..., None], hr[..., None]

    x_val, y_val = held_out(val_names)
    x_test, y_test = held_out(test_names)

    hrs = [_gray(n) for n in train_names]
    ups = [bicubic_pair(h) for h in hrs]
    which = rng.integers(0, len(hrs), n_patches)
    x_tr = np.empty((n_patches, PATCH, PATCH, 1), np.float32)
    y_tr = np.empty_like(x_tr)
    for i, k in enumerate(which):
        top = rng.integers(0, hrs[k].shape[0] - PATCH + 1)
        left = rng.integers(0, hrs[k].shape[1] - PATCH + 1)
        x_tr[i, ..., 0] = ups[k][top:top + PATCH, left:left + PATCH]
        y_tr[i, ..., 0] = hrs[k][top:top + PATCH, left:left + PATCH]

    info = {
        "scale": SCALE, "patch": PATCH, "eval_size": EVAL_SIZE,
        "train_images": train_names, "val_images": val_names, "test_images": test_names,
        "bicubic_psnr_db": {"train": _psnr(x_tr, y_tr), "val": _psnr(x_val, y_val),
                            "test": _psnr(x_test, y_test)},
    }
    return Dataset(
        name="sr-images", kind="regression",
        x_train=_frozen(x_tr), y_train=_frozen(y_tr), x_val=_frozen(x_val), y_val=_frozen(y_val),
        x_test=_frozen(x_test), y_test=_frozen(y_test),
        num_classes=None, seed=seed, source="scikit-image bundled sample images", info=info,
    )
