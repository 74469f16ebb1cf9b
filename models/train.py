"""Baseline training (AdamW + cosine decay under jit) and a checkpoint cache.

The step is jitted once and driven from Python: on XLA:CPU the backward pass of a conv runs
much slower inside lax.scan than as separate calls. Batches are gathered on the device from
index arrays, so the data crosses to the device once.

Cache: results/cache/<key>/ holds params.safetensors (params tree flattened with '/' keys)
and meta.json. The key hashes the task name, hparams, the data fingerprint, the TrainConfig
and the seed, so a second run with the same inputs loads instead of training.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from models.errors import ModelError
from models.task import Task, TrainConfig

PARAMS_FILE = "params.safetensors"
META_FILE = "meta.json"
EVAL_ELEMENTS = 1 << 20  # input floats per evaluation batch


def cache_key(task: Task) -> str:
    """A hash of everything the trained baseline depends on."""
    desc = {
        "model": task.name,
        "module": type(task.module).__name__,
        "dataset": task.data.name,
        "data": task.data.fingerprint(),
        "hparams": task.hparams,
        "train": dataclasses.asdict(task.train),
        "seed": task.data.seed,
    }
    blob = json.dumps(desc, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with a short warm-up and cosine decay, gradients clipped at norm 1."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup_steps=max(1, cfg.steps // 20), decay_steps=max(2, cfg.steps))
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def train_step(module: nn.Module, loss_fn, tx: optax.GradientTransformation):
    """A jitted step(params, opt_state, x_all, y_all, idx) -> (params, opt_state, loss) of plain
    training on the examples `idx` (the baseline's, and the reference step bench_engine times)."""
    @jax.jit
    def step(params, opt_state, x_all, y_all, idx):
        x, y = x_all[idx], y_all[idx]

        def objective(p):
            return loss_fn(module.apply({"params": p}, x), y)

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch] example indices: seeded epochs of a permutation, no example twice per epoch."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(n)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
            for _ in range(epochs)]
    return np.concatenate(rows)[:steps].astype(np.int32)


def fit(task: Task, params: Any = None, log_every: int = 0) -> tuple[Any, dict[str, Any]]:
    """Train from fresh (or given) params for task.train.steps; returns (params, stats)."""
    cfg = task.train
    params = task.init_params() if params is None else params
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    step = train_step(task.module, task.loss, tx)
    x_all, y_all = jnp.asarray(task.data.x_train), jnp.asarray(task.data.y_train)
    order = batch_order(len(task.data.x_train), cfg.batch_size, cfg.steps, cfg.seed)
    t0 = time.perf_counter()
    loss = jnp.nan
    for i in range(cfg.steps):
        params, opt_state, loss = step(params, opt_state, x_all, y_all, order[i])
        if log_every and (i + 1) % log_every == 0:
            print(f"  step {i + 1}/{cfg.steps} loss {float(loss):.4f}", flush=True)
    jax.block_until_ready(params)
    return params, {"steps": cfg.steps, "final_loss": float(loss),
                    "train_seconds": time.perf_counter() - t0}


@functools.lru_cache(maxsize=32)
def _eval_fn(module: nn.Module, metric):
    @jax.jit
    def run(params, x, y):
        return metric(module.apply({"params": params}, x), y)

    return run


def per_example_metric(task: Task, params: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[N] task.metric of every example, in fixed-size batches (the last one padded)."""
    n = len(x)
    batch = int(max(1, min(n, EVAL_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))))
    run = _eval_fn(task.module, task.metric)
    out = []
    for start in range(0, n, batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        pad = batch - len(xb)
        if pad:
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
            yb = np.concatenate([yb, np.repeat(yb[-1:], pad, 0)])
        out.append(np.asarray(run(params, xb, yb))[: batch - pad])
    return np.concatenate(out)


def evaluate(task: Task, params: Any, split: str = "test") -> float:
    """Mean of task.metric over a split: "train", "val" or "test"."""
    if split not in ("train", "val", "test"):
        raise ModelError(f"unknown split {split!r}: choose train, val or test")
    x, y = getattr(task.data, f"x_{split}"), getattr(task.data, f"y_{split}")
    return float(per_example_metric(task, params, x, y).mean())


def save_params(params: Any, path: str | os.PathLike) -> None:
    """Write a params tree as safetensors with '/'-joined keys."""
    from safetensors.numpy import save_file

    flat = traverse_util.flatten_dict(params, sep="/")
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}, str(path))


def load_params(path: str | os.PathLike, like: Any) -> Any:
    """Read safetensors written by save_params into the structure of `like`.

    Raises ValueError when the names or shapes differ from `like`.
    """
    from safetensors.numpy import load_file

    flat = load_file(str(path))
    want = traverse_util.flatten_dict(like, sep="/")
    if set(flat) != set(want):
        raise ValueError(f"{path}: parameter names differ from the model's")
    for k, v in want.items():
        if tuple(flat[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: {k} has shape {flat[k].shape}, model has {v.shape}")
    return traverse_util.unflatten_dict({k: jnp.asarray(flat[k]) for k in want}, sep="/")


def _read_cache(task: Task, entry: Path) -> tuple[Any, dict[str, Any]] | None:
    if not (entry / PARAMS_FILE).is_file() or not (entry / META_FILE).is_file():
        return None
    from safetensors import SafetensorError

    try:
        meta = json.loads((entry / META_FILE).read_text())
        meta = {k: meta[k] for k in ("val_metric", "test_metric", "train_seconds")}
        like = jax.eval_shape(task.init_params)
        params = load_params(entry / PARAMS_FILE, like)
    except (ValueError, OSError, KeyError, TypeError, SafetensorError):
        return None  # a stale or broken entry: train again and overwrite it
    return params, meta


def _write_cache(entry: Path, params: Any, meta: dict[str, Any]) -> None:
    """Write into a temporary directory, then rename: readers never see half an entry."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like results/
    save_params(params, tmp / PARAMS_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    if entry.exists():
        shutil.rmtree(entry, ignore_errors=True)
    try:
        os.replace(tmp, entry)
    except OSError:  # another process wrote the same entry first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def train_baseline(task: Task, cache_dir: str | os.PathLike = "results/cache",
                   force: bool = False, log_every: int = 0) -> tuple[Any, dict[str, Any]]:
    """The trained dense baseline of a task: loaded from the cache, or trained and cached.

    info: cache_key, cache_path, loaded, val_metric, test_metric, train_seconds, steps_run.
    """
    key = cache_key(task)
    entry = Path(cache_dir) / key
    if not force:
        hit = _read_cache(task, entry)
        if hit is not None:
            params, meta = hit
            return params, {**meta, "cache_key": key, "cache_path": str(entry), "loaded": True,
                            "steps_run": 0, "metric_name": task.metric_name}
    params, stats = fit(task, log_every=log_every)
    info = {
        "cache_key": key, "cache_path": str(entry), "loaded": False,
        "val_metric": evaluate(task, params, "val"), "test_metric": evaluate(task, params, "test"),
        "train_seconds": stats["train_seconds"], "steps_run": stats["steps"],
        "metric_name": task.metric_name,
    }
    meta = {**info, "model": task.name, "dataset": task.data.name, "hparams": task.hparams,
            "train": dataclasses.asdict(task.train), "seed": task.data.seed,
            "data_fingerprint": task.data.fingerprint(), "final_loss": stats["final_loss"],
            "data_info": task.data.info}
    meta.pop("loaded"), meta.pop("steps_run")
    _write_cache(entry, params, meta)
    return params, info


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def user_baseline(task: Task, path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The user's own trained weights for a zoo model (safetensors, '/'-joined names as
    `save_params` writes them) in place of the cached baseline; checked name by name and
    shape by shape against the model. info is shaped like train_baseline's."""
    from safetensors import SafetensorError

    fix = f"give the weights of {task.name} on {task.data.name} as `hwcompress train` saves them"
    try:
        digest = file_sha256(path)
        params = load_params(path, jax.eval_shape(task.init_params))
    except OSError as e:
        raise ModelError(f"--weights {path}: cannot read it ({e.strerror or e}): {fix}") from None
    except (SafetensorError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, SafetensorError):
            msg = f"{path}: not a safetensors file ({msg})"
        raise ModelError(f"--weights {msg}: {fix}") from None
    return params, {
        "cache_key": f"weights-{digest[:16]}", "cache_path": str(path), "loaded": True,
        "val_metric": evaluate(task, params, "val"), "test_metric": evaluate(task, params, "test"),
        "train_seconds": 0.0, "steps_run": 0, "metric_name": task.metric_name, "sha256": digest,
    }
