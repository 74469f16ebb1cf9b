"""Losses and per-example quality metrics, one pair per kind of task.

A metric returns one value per example (accuracy 0/1, PSNR in dB per image) so that the
quality of a split is simply its mean, whatever the batch size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross entropy over integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """[B] 1.0 where the arg-max class is the label, else 0.0."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every pixel of the batch."""
    return jnp.mean(jnp.square(pred - target))


def psnr_db(pred: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
    """[B] peak signal-to-noise ratio per image in dB; predictions are clipped to the range."""
    pred = jnp.clip(pred, 0.0, data_range)
    err = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(err, 1e-12))
