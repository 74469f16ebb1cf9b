"""demosaic-images: joint demosaicking and denoising data from scikit-image's bundled colour images.

Every image is RGB in [0, 1]. Its Bayer mosaic (RGGB) gets additive Gaussian noise of a fixed,
known standard deviation (NOISE_SIGMA) and is packed as DemosaicNet reads it (Gharbi et al.
2016): 4 half-resolution planes, one per position of the 2x2 block, plus a constant plane
holding the noise level. The target is the clean RGB image. Training uses random patches of the
training images; validation and test use whole held-out images, centre-cropped to one size.
The seed decides which images are held out, where the patches are and the noise.

The reference is bilinear demosaicking by convolution (the standard 3x3 kernels on the masked
mosaic, reflect-padded so the Bayer phase holds at the border), scored with models.metrics'
PSNR on the same full images as the model (no border crop): info["bilinear_psnr_db"].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models import metrics
from models.data import _frozen
from models.demosaicnet import BILINEAR_KERNELS, masked_mosaic
from models.task import Dataset

NOISE_SIGMA = 0.02  # standard deviation of the additive Gaussian noise, data range [0, 1]
# Natural photographs that can be held out (both sides >= EVAL_SIZE); bundled, offline.
EVAL_POOL = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "immunohistochemistry")
TRAIN_ONLY = ("retina", "colorwheel", "logo")  # not photographs: training only
EVAL_SIZE = 256  # side of the centre crop of held-out images (even: the crop keeps RGGB)
N_VAL, N_TEST = 1, 2  # held-out images per split (the other photographs train)
PATCH = 48  # side of a training patch, full resolution (even)
N_PATCHES = 2048  # training patches

# bilinear demosaicking's kernels, HWIO [3, 3, 1, 3] for a depthwise conv over R, G, B
_BILINEAR_HWIO = BILINEAR_KERNELS[:, :, None, :]


def _rgb(name: str) -> np.ndarray:
    """A bundled sample image as float32 RGB in [0, 1], cropped to even sides (an alpha
    channel is composited on white; stereo_motorcycle is its left view)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):
        img = img[0]
    img = img.astype(np.float32) / 255.0
    if img.shape[-1] == 4:
        img = img[..., :3] * img[..., 3:] + (1.0 - img[..., 3:])
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    return np.ascontiguousarray(img[:h, :w, :3])


def mosaic(rgb: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] -> [..., H, W] RGGB Bayer mosaic: each pixel keeps one colour's sample."""
    out = rgb[..., 1].copy()
    out[..., 0::2, 0::2] = rgb[..., 0::2, 0::2, 0]
    out[..., 1::2, 1::2] = rgb[..., 1::2, 1::2, 2]
    return out


def pack(bayer: np.ndarray) -> np.ndarray:
    """[..., H, W] mosaic -> [..., H/2, W/2, 4] planes R, G (red rows), G (blue rows), B: plane
    2 dy + dx holds the pixels (2i + dy, 2j + dx). models.demosaicnet.masked_mosaic unpacks."""
    return np.stack([bayer[..., 0::2, 0::2], bayer[..., 0::2, 1::2],
                     bayer[..., 1::2, 0::2], bayer[..., 1::2, 1::2]], axis=-1)


def network_input(rgb: np.ndarray, rng: np.random.Generator, sigma: float = NOISE_SIGMA) -> np.ndarray:
    """[..., H, W, 3] clean RGB -> [..., H/2, W/2, 5] DemosaicNet input: the packed mosaic with
    N(0, sigma^2) noise added, then a constant plane holding sigma."""
    noisy = mosaic(rgb) + rng.normal(0.0, sigma, rgb.shape[:-1]).astype(np.float32)
    planes = pack(noisy)
    level = np.full(planes.shape[:-1] + (1,), sigma, np.float32)
    return np.concatenate([planes, level], axis=-1).astype(np.float32)


@jax.jit
def bilinear(packed: jax.Array) -> jax.Array:
    """[N, h, w, >= 4] network inputs -> [N, 2h, 2w, 3] bilinear demosaicking of their mosaic
    (the noise is left in): a depthwise 3x3 convolution of the masked mosaic, reflect-padded
    by one pixel (a reflection keeps every pixel's Bayer colour). Pure JAX: a Flax module
    can call it."""
    full = jnp.pad(masked_mosaic(packed[..., :4]), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return jax.lax.conv_general_dilated(full, jnp.asarray(_BILINEAR_HWIO), (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)


def bilinear_psnr_db(x: np.ndarray, y: np.ndarray) -> float:
    """Mean PSNR in dB of bilinear(x) against the targets y: models.metrics.psnr_db per image,
    then the mean, as the model's quality on a split is computed."""
    return float(np.asarray(metrics.psnr_db(bilinear(jnp.asarray(x)), jnp.asarray(y))).mean())


def _centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    top, left = (img.shape[0] - size) // 4 * 2, (img.shape[1] - size) // 4 * 2  # even: RGGB stays
    return img[top:top + size, left:left + size]


def load_demosaic_images(seed: int = 0, n_patches: int = N_PATCHES) -> Dataset:
    """Noisy packed mosaics of patches of the training images; whole held-out images for
    validation and test; targets the clean RGB."""
    rng = np.random.default_rng(seed)
    order = [EVAL_POOL[i] for i in rng.permutation(len(EVAL_POOL))]
    val_names, test_names = order[:N_VAL], order[N_VAL:N_VAL + N_TEST]
    train_names = sorted(order[N_VAL + N_TEST:]) + list(TRAIN_ONLY)

    def held_out(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        rgb = np.stack([_centre_crop(_rgb(n), EVAL_SIZE) for n in names])
        return network_input(rgb, rng), rgb

    x_val, y_val = held_out(val_names)
    x_test, y_test = held_out(test_names)

    images = [_rgb(n) for n in train_names]
    which = rng.integers(0, len(images), n_patches)
    y_tr = np.empty((n_patches, PATCH, PATCH, 3), np.float32)
    for i, k in enumerate(which):
        top = 2 * rng.integers(0, (images[k].shape[0] - PATCH) // 2 + 1)  # even: RGGB stays
        left = 2 * rng.integers(0, (images[k].shape[1] - PATCH) // 2 + 1)
        y_tr[i] = images[k][top:top + PATCH, left:left + PATCH]
    x_tr = network_input(y_tr, rng)

    info = {
        "noise_sigma": NOISE_SIGMA, "pattern": "RGGB", "patch": PATCH, "eval_size": EVAL_SIZE,
        "train_images": train_names, "val_images": val_names, "test_images": test_names,
        "bilinear_psnr_db": {"train": bilinear_psnr_db(x_tr, y_tr), "val": bilinear_psnr_db(x_val, y_val),
                             "test": bilinear_psnr_db(x_test, y_test)},
    }
    return Dataset(
        name="demosaic-images", kind="regression",
        x_train=_frozen(x_tr), y_train=_frozen(y_tr), x_val=_frozen(x_val), y_val=_frozen(y_val),
        x_test=_frozen(x_test), y_test=_frozen(y_test),
        num_classes=None, seed=seed, source="scikit-image bundled sample images", info=info,
    )
